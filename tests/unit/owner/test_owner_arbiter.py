"""The owner's commit point (``owner.arbiter``): one decision per migration ticket."""

from __future__ import annotations

import os
import threading

import pytest

from confmig.owner.arbiter import Arbiter
from confmig.owner.errors import DecisionRefused
from confmig.proto import mailbox as mb
from confmig.proto.keybroker import DecisionRequest

TICKET = bytes(range(16))
MID = b"m" * 16
CHALLENGE = b"c" * 16


def ask(arbiter: Arbiter, outcome: str, *, ticket: bytes = TICKET, mid: bytes = MID,
        challenge: bytes = CHALLENGE) -> bytes:
    return arbiter.decide(DecisionRequest(ticket=ticket, migration_id=mid, challenge=challenge,
                                          outcome=outcome))[0].token


@pytest.fixture
def arbiter() -> Arbiter:
    a = Arbiter()
    a.issued(TICKET, os.urandom(32))
    return a


@pytest.mark.parametrize(("first", "then"), [("commit", "abort"), ("abort", "commit")])
def test_the_first_request_decides_and_the_other_outcome_is_refused(
        arbiter: Arbiter, first: str, then: str) -> None:
    token = ask(arbiter, first)
    header = mb.decode_record_header(token)
    assert header.kind == (mb.RecordKind.COMMIT if first == "commit" else mb.RecordKind.ABORT)
    assert header.migration_id == MID and header.seq == 0 and header.npages == 0
    with pytest.raises(DecisionRefused, match=f"decided already: {first}"):
        ask(arbiter, then)
    assert ask(arbiter, first) == token  # the same request again: the same bytes
    assert arbiter.decide(DecisionRequest(ticket=TICKET, migration_id=MID, challenge=CHALLENGE,
                                          outcome=first))[1] is False  # and no new decision


def test_a_decision_is_for_one_migration_and_one_challenge(arbiter: Arbiter) -> None:
    ask(arbiter, "abort")
    with pytest.raises(DecisionRefused):
        ask(arbiter, "abort", mid=b"n" * 16)  # a token for another migration id: no
    with pytest.raises(DecisionRefused):
        ask(arbiter, "abort", challenge=b"d" * 16)


def test_a_ticket_never_issued_gets_nothing(arbiter: Arbiter) -> None:
    with pytest.raises(DecisionRefused, match="no migration target was given this ticket"):
        ask(arbiter, "abort", ticket=bytes(16))


def test_racing_commit_and_abort_get_one_decision(arbiter: Arbiter) -> None:
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def run(outcome: str) -> None:
        start.wait()
        try:
            results[outcome] = ask(arbiter, outcome)
        except DecisionRefused as exc:
            results[outcome] = exc

    threads = [threading.Thread(target=run, args=(o,)) for o in ("commit", "abort")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(v).__name__ for v in results.values()) == ["DecisionRefused", "bytes"]


def test_the_tickets_remembered_are_bounded_and_a_forgotten_one_gets_no_outcome() -> None:
    arbiter = Arbiter(max_tickets=2)
    arbiter.issued(b"a" * 16, os.urandom(32))
    arbiter.issued(b"b" * 16, os.urandom(32))
    ask(arbiter, "commit", ticket=b"a" * 16)
    arbiter.issued(b"c" * 16, os.urandom(32))  # the oldest, decided or not, makes room
    for outcome in ("commit", "abort"):  # forgotten with its decision: neither, never the other
        with pytest.raises(DecisionRefused, match="no migration target was given this ticket"):
            ask(arbiter, outcome, ticket=b"a" * 16)
    assert ask(arbiter, "abort", ticket=b"b" * 16)
    for n in range(10):  # a host launching targets without end never stops new ones
        arbiter.issued(bytes([n]) * 16, os.urandom(32))
