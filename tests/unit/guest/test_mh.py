"""The Migration Handler on real cores and engines: a guest's private pages sealed by its MH
on one host and opened by its MH on another (other system-physical addresses, another VEK),
and everything a host may do to the records or the mailbox refused with nothing written.

The test is both VMMs (:mod:`mhhost`). The firmware's part (shared mailboxes, target mode)
and the kernel's run gate are in ``test_mh_guest.py``."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace

import numpy as np
import pytest
from mhhost import RAM_SIZE, TICKET, Guest, commit_grant, seal, transport_key, transport_key_bytes

from confmig.common.units import PAGE_SIZE, GiB
from confmig.guest import gate, saved_state
from confmig.guest.firmware import mh
from confmig.guest.firmware.mh import NO_KEY
from confmig.guest.layout import (
    FW_CFG_BOUNCE_GPA,
    KERNEL_DATA_GPA,
    MH_AREA_GPA,
    MH_AREA_SIZE,
    MH_MAILBOX_GPA,
    MH_SESSION_GPA,
    MH_VCPUS_MAX,
    PAGE_STATE_LIMIT,
    SECRET_AREA_GPA,
)
from confmig.owner.arbiter import Arbiter
from confmig.platform.cpu.abi import C_BIT, Registers
from confmig.proto import mailbox as mb
from confmig.proto.keybroker import DecisionRequest

KEY = os.urandom(32)
SRC_SPA = 0x1_0000_0000
DST_SPA = 0x7_4000_0000
CLONE_SPA = 0x9_0000_0000
HIGH = MH_AREA_GPA + MH_AREA_SIZE
"""The first page above the MH's area: the guest's own data from here."""
OK, INVALID, REFUSED = (int(r) for r in (mb.MhReturn.SUCCESS, mb.MhReturn.INVALID_FUNC,
                                         mb.MhReturn.AUTH_ERR))
Cmd = mb.MhCommand


@pytest.fixture
def src() -> Iterator[Guest]:
    with closing(Guest(spa=SRC_SPA, master=KEY, seed=1)) as g:
        yield g


@pytest.fixture
def dst() -> Iterator[Guest]:
    with closing(Guest(spa=DST_SPA, master=KEY, target=True, seed=2)) as g:
        yield g


def start(src: Guest, dst: Guest, nvcpus: int = 1) -> bytes:
    """INIT every MH vCPU of both sides; the source's migration id."""
    ret, mid = src.init(0, mb.Role.SOURCE, nstreams=nvcpus)
    assert ret == OK
    for i in range(1, nvcpus):
        assert src.init(i, mb.Role.SOURCE, nstreams=nvcpus) == (OK, mid)
    for i in range(nvcpus):
        assert dst.init(i, mb.Role.TARGET, mid)[0] == OK
    return mid


def batches(gpas: list[int], n: int = mb.BATCH_PAGES) -> list[list[int]]:
    return [gpas[i : i + n] for i in range(0, len(gpas), n)]


def send(src: Guest, dst: Guest, gpas: list[int], nvcpus: int = 1, epoch: int = 0) -> None:
    """Export ``gpas`` batch by batch, each page on its stream (``stream_of``), importing each."""
    for i in range(nvcpus):
        mine = [g for g in gpas if mb.stream_of(np.array([g // PAGE_SIZE]), nvcpus)[0] == i]
        for k, batch in enumerate(batches(mine)):
            ret, record = src.export(i, batch, slot=k % mb.SLOTS, epoch=epoch)
            assert ret == OK
            assert dst.import_(i, record, slot=k % mb.SLOTS) == OK


def migrate(src: Guest, dst: Guest, nvcpus: int = 1) -> bytes:
    """A whole migration: every private page, FINISH, COMPLETE. The completion record."""
    start(src, dst, nvcpus)
    send(src, dst, src.private_gpas(), nvcpus)
    ret, completion = src.token(Cmd.FINISH, dst.challenge())
    assert ret == OK
    assert dst.token(Cmd.COMPLETE, completion)[0] == OK
    return completion


def session(g: Guest) -> mh.Session:
    s = mh.load_session(g.view, C_BIT)
    assert s is not None
    return s


def run_gate(g: Guest) -> int:
    return gate.load(g.view, C_BIT)


# --- pages: sealed on one host, opened on another ---------------------------------------------------


@pytest.mark.parametrize("nvcpus", [1, 2, MH_VCPUS_MAX])
def test_pages_sealed_on_one_host_open_on_another_to_the_same_plaintext(src: Guest, dst: Guest,
                                                                        nvcpus: int) -> None:
    gpas = src.private_gpas()
    assert len(gpas) == RAM_SIZE // PAGE_SIZE - MH_AREA_SIZE // PAGE_SIZE - 1  # all but the bounce page
    before = dst.read_pages(HIGH, 16)
    migrate(src, dst, nvcpus)
    for first, n in ((0, MH_AREA_GPA // PAGE_SIZE), (HIGH, (RAM_SIZE - HIGH) // PAGE_SIZE)):
        ours, theirs = src.read_pages(first, n), dst.read_pages(first, n)
        if first == 0:  # the source's run gate closed after its page left; the bounce page is shared
            ours[KERNEL_DATA_GPA // PAGE_SIZE, 0xF00:0xF08] = 0
            theirs[FW_CFG_BOUNCE_GPA // PAGE_SIZE] = ours[FW_CFG_BOUNCE_GPA // PAGE_SIZE]
        assert (ours == theirs).all()
    assert not (before == dst.read_pages(HIGH, 16)).all()  # the target's own pages were replaced
    assert src.ram.load(HIGH, PAGE_SIZE) != dst.ram.load(HIGH, PAGE_SIZE)  # under another key, address
    assert session(dst).phase == mh.SessionPhase.RUNNING and run_gate(dst) == gate.OPEN
    assert session(src).phase == mh.SessionPhase.SENT and run_gate(src) == gate.MIGRATED_AWAY


def test_zero_pages_travel_as_a_flag_and_arrive_as_zeros(src: Guest, dst: Guest) -> None:
    start(src, dst)
    gpas = [HIGH + i * PAGE_SIZE for i in range(8)]
    for i in (1, 2, 6):
        src.write_pages(gpas[i], np.zeros((1, PAGE_SIZE), np.uint8))
    ret, record = src.export(0, gpas)
    header = mb.decode_record_header(record)
    assert ret == OK and header.npages == 8 and header.nzero == 3
    assert len(record) == mb.record_size(8, 3)  # five pages of ciphertext, not eight
    assert [e & mb.ZERO_FLAG for e in mb.gpa_entries(record, header).tolist()] == [0, 1, 1, 0, 0, 0, 1, 0]
    assert dst.read_pages(gpas[1], 1).any()
    assert dst.import_(0, record) == OK
    assert (dst.read_pages(gpas[0], 8) == src.read_pages(gpas[0], 8)).all()
    assert not dst.read_pages(gpas[1], 2).any() and not dst.read_pages(gpas[6], 1).any()


def test_each_stream_numbers_its_records_and_counts_its_pages(src: Guest, dst: Guest) -> None:
    start(src, dst, nvcpus=2)
    headers = [mb.decode_record_header(src.export(i, [HIGH + (i * mb.STREAM_CHUNK + k) * PAGE_SIZE])[1])
               for k in range(3) for i in (0, 1)]
    assert [(h.stream, h.seq) for h in headers] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert mh.load_stream(src.view, 1, C_BIT).pages == 3


# --- what a host may do to records ---------------------------------------------------------------


def flip(record: bytes, offset: int, bit: int = 1) -> bytes:
    b = bytearray(record)
    b[offset] ^= bit
    return bytes(b)


GPA_LIST = mb.RECORD_HEADER.size
TAMPERING: dict[str, Callable[[list[bytes], bytes], list[tuple[int, bytes]]]] = {
    # each: the records of streams 0 (r[0], r[1], r[2]) and 1 (other) -> imports (vCPU, record)
    "swapped-stream": lambda r, other: [(0, other)],
    "reordered": lambda r, other: [(0, r[1])],
    "dropped": lambda r, other: [(0, r[0]), (0, r[2])],
    "replayed": lambda r, other: [(0, r[0]), (0, r[1]), (0, r[0])],
    "duplicated": lambda r, other: [(0, r[0]), (0, r[0])],
    "forged": lambda r, other: [(0, seal(os.urandom(32), mb.decode_record_header(r[0]).migration_id,
                                         stream=0, seq=0, gpas=[HIGH]))],
    "ciphertext-bit": lambda r, other: [(0, flip(r[0], GPA_LIST + 4 * 8 + 100))],
    "tag-bit": lambda r, other: [(0, flip(r[0], len(r[0]) - 1))],
    "gpa-bit": lambda r, other: [(0, flip(r[0], GPA_LIST + 1, 0x10))],  # the first page, 4 KiB on
    "zero-flag-bit": lambda r, other: [(0, flip(r[0], GPA_LIST + 8))],
    "sequence-bit": lambda r, other: [(0, r[0]), (0, flip(r[2], 8, 0x03))],  # seq 2 claims 1
    "epoch-bit": lambda r, other: [(0, flip(r[0], 16))],
    "migration-id-bit": lambda r, other: [(0, flip(r[0], 40))],
    "stream-bit": lambda r, other: [(1, flip(r[0], 4))],  # stream 0's record claims stream 1
    "truncated": lambda r, other: [(0, r[0][:-1])],
    "garbage": lambda r, other: [(0, os.urandom(len(r[0])))],
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_records_are_refused_and_nothing_is_written(src: Guest, dst: Guest, case: str) -> None:
    start(src, dst, nvcpus=2)
    assert (HIGH // PAGE_SIZE) % (2 * mb.STREAM_CHUNK) == 0  # stream 0's chunk; stream 1's is next
    records = [src.export(0, [HIGH + (4 * k + j) * PAGE_SIZE for j in range(4)])[1] for k in range(3)]
    other = src.export(1, [HIGH + (mb.STREAM_CHUNK + 1) * PAGE_SIZE])[1]
    *good, (vcpu, bad) = TAMPERING[case](records, other)
    for i, record in good:
        assert dst.import_(i, record) == OK
    before = dst.outside_mailboxes()
    assert dst.import_(vcpu, bad) == REFUSED
    assert dst.outside_mailboxes() == before  # no page, no counter, no bitmap bit
    n = len(good)
    if all(rec is records[k] for k, (_, rec) in enumerate(good)):
        assert dst.import_(0, records[n]) == OK  # the genuine next record still goes in


def test_a_page_travels_on_its_own_stream_only(src: Guest, dst: Guest) -> None:
    """Two streams each ordered by their sequence numbers could still deliver a page's old
    version after its new one if the page travelled on both; so a page's stream is its GFN
    (``stream_of``: chunks of GFNs over the streams, whose count is sealed in every record),
    and the target refuses any other."""
    mid = start(src, dst, nvcpus=2)
    even, odd = HIGH, HIGH + mb.STREAM_CHUNK * PAGE_SIZE  # chunks of streams 0 and 1
    assert src.export(0, [odd])[0] == REFUSED and src.export(1, [even])[0] == REFUSED
    before = dst.outside_mailboxes()
    for stream, gpa in ((0, odd), (1, even)):  # genuine records (the key), wrong stream
        assert dst.import_(stream, seal(KEY, mid, stream=stream, seq=0, gpas=[gpa], nstreams=2)) == REFUSED
    assert dst.outside_mailboxes() == before
    assert dst.import_(0, seal(KEY, mid, stream=0, seq=0, gpas=[even], nstreams=2)) == OK


BAD_TARGET_GPAS = {
    "mh-session-page": [MH_SESSION_GPA],
    "mailbox": [MH_MAILBOX_GPA],
    "mh-area-last-page": [MH_AREA_GPA + MH_AREA_SIZE - PAGE_SIZE],
    "outside-ram": [RAM_SIZE],
    "above-16-GiB": [PAGE_STATE_LIMIT + HIGH],
    "unaligned": [HIGH + 0x10],
    "twice": [HIGH, HIGH],
}


@pytest.mark.parametrize("gpas", BAD_TARGET_GPAS.values(), ids=BAD_TARGET_GPAS.keys())
def test_a_genuine_record_naming_a_page_the_mh_must_not_write_is_refused(src: Guest, dst: Guest,
                                                                        gpas: list[int]) -> None:
    mid = start(src, dst)
    before = dst.outside_mailboxes()
    assert dst.import_(0, seal(KEY, mid, stream=0, seq=0, gpas=[HIGH + PAGE_SIZE, *gpas])) == REFUSED
    assert dst.outside_mailboxes() == before
    assert dst.import_(0, seal(KEY, mid, stream=0, seq=0, gpas=[HIGH])) == OK  # the key was right


BAD_SOURCE_GPAS = {
    "shared": [FW_CFG_BOUNCE_GPA],
    "mh-session-page": [MH_SESSION_GPA],
    "mailbox": [MH_MAILBOX_GPA + PAGE_SIZE],
    "outside-ram": [RAM_SIZE],
    "above-16-GiB": [16 * GiB],
    "unaligned": [HIGH + 8],
    "twice": [HIGH, HIGH],
}


@pytest.mark.parametrize("gpas", BAD_SOURCE_GPAS.values(), ids=BAD_SOURCE_GPAS.keys())
def test_the_source_refuses_to_export_what_it_must_not(src: Guest, dst: Guest, gpas: list[int]) -> None:
    start(src, dst)
    assert src.export(0, [HIGH, *gpas])[0] == REFUSED
    assert mh.load_stream(src.view, 0, C_BIT).records == 0  # no sequence number spent


def test_a_batch_may_list_its_pages_in_any_order_but_each_once(src: Guest, dst: Guest) -> None:
    start(src, dst)
    falling = [HIGH + 2 * PAGE_SIZE, HIGH, HIGH + PAGE_SIZE]
    ret, record = src.export(0, falling)
    assert ret == OK
    entries = mb.gpa_entries(record, mb.decode_record_header(record))
    assert [e & ~(PAGE_SIZE - 1) for e in entries.tolist()] == falling
    assert dst.import_(0, record) == OK
    assert (dst.read_pages(HIGH, 3) == src.read_pages(HIGH, 3)).all()
    assert src.export(0, [HIGH + PAGE_SIZE, HIGH, HIGH + PAGE_SIZE])[0] == REFUSED


def test_each_streams_key_stays_in_the_mhs_private_state_and_reset_erases_it(src: Guest, dst: Guest) -> None:
    """INIT derives a stream's transport key once and keeps it in the MH vCPU's state page,
    private memory that no migration carries: the host sees only its ciphertext there."""
    mid = start(src, dst)
    key = transport_key_bytes(KEY, mid)
    for g in (src, dst):
        stream = mh.load_stream(g.view, 0, C_BIT)
        assert stream.key == key
        assert key not in g.ram.load(0, RAM_SIZE)  # what the host reads of the guest's RAM
        assert key.hex() not in repr(stream) and repr(key) not in repr(stream)  # nor a log line
    assert src.command(0, Cmd.RESET).ret == OK
    assert mh.load_stream(src.view, 0, C_BIT).key == NO_KEY
    assert src.export(0, [HIGH])[0] == INVALID  # no stream, no key: INIT again
    assert src.init(0, mb.Role.SOURCE)[0] == OK
    keyless = replace(mh.load_stream(src.view, 0, C_BIT), key=NO_KEY)
    mh._store_stream(src.view, 0, keyless, C_BIT)  # a stream that lost its key (no host can do this)
    assert src.export(0, [HIGH])[0] == REFUSED and mh.load_stream(src.view, 0, C_BIT).records == 0


def keys(g: Guest, nvcpus: int) -> list[bytes]:
    return [mh.load_stream(g.view, i, C_BIT).key for i in range(nvcpus)]


@pytest.mark.parametrize("end", ["complete", "abort"])
def test_no_stream_keeps_its_key_once_the_session_is_over(src: Guest, dst: Guest, end: str) -> None:
    start(src, dst, nvcpus=2)
    send(src, dst, src.private_gpas(), nvcpus=2)
    assert NO_KEY not in keys(src, 2) + keys(dst, 2)
    ret, completion = src.token(Cmd.FINISH, dst.challenge())
    assert ret == OK and keys(src, 2) == [NO_KEY] * 2  # FINISH: the source seals no batch again
    assert NO_KEY not in keys(dst, 2)
    if end == "complete":
        assert dst.token(Cmd.COMPLETE, completion)[0] == OK
    else:
        ret, token = dst.token(Cmd.ABORT)
        assert ret == OK and src.token(Cmd.RESUME, token)[0] == OK
    assert keys(dst, 2) == [NO_KEY] * 2
    assert keys(src, 2) == [NO_KEY] * 2 and src.export(0, [HIGH])[0] == INVALID
    assert mh.load_stream(dst.view, 1, C_BIT).records > 0  # the counters stay: only the keys go


def test_batch_sizes_and_epochs_the_mailbox_cannot_carry_are_invalid(src: Guest, dst: Guest) -> None:
    start(src, dst)
    assert src.command(0, Cmd.EXPORT, slot=0, npages=0).ret == INVALID
    assert src.command(0, Cmd.EXPORT, slot=0, npages=mb.BATCH_PAGES + 1).ret == INVALID
    assert src.export(0, [HIGH], epoch=3)[0] == OK
    assert src.export(0, [HIGH], epoch=2)[0] == INVALID  # epochs never go back on a stream
    assert dst.command(0, Cmd.IMPORT, slot=0, length=mb.SLOT_DATA + 1).ret == INVALID
    assert dst.command(0, Cmd.IMPORT, slot=0, length=10).ret == INVALID
    full = src.export(0, [HIGH + i * PAGE_SIZE for i in range(mb.BATCH_PAGES)], epoch=3)[1]
    assert len(full) == mb.SLOT_DATA  # a full batch of non-zero pages fills the data area exactly


# --- the end of a migration ------------------------------------------------------------------------


def test_complete_refuses_a_migration_that_missed_a_private_page(src: Guest, dst: Guest) -> None:
    start(src, dst)
    gpas = src.private_gpas()
    send(src, dst, gpas[:100] + gpas[101:])  # the VMM "forgot" one: every record arrives
    ret, completion = src.token(Cmd.FINISH, dst.challenge())
    assert ret == OK
    assert dst.token(Cmd.COMPLETE, completion)[0] == REFUSED
    assert session(dst).phase == mh.SessionPhase.AWAITING and run_gate(dst) == gate.INCOMING
    assert dst.token(Cmd.ABORT)[0] == OK  # the target may still give up


def test_complete_refuses_when_a_streams_totals_differ(src: Guest, dst: Guest) -> None:
    start(src, dst)
    send(src, dst, src.private_gpas())
    ret, late = src.export(0, [HIGH])  # a page dirtied again, its record never delivered
    assert ret == OK
    completion = src.token(Cmd.FINISH, dst.challenge())[1]
    assert dst.token(Cmd.COMPLETE, completion)[0] == REFUSED
    assert dst.import_(0, late) == OK
    assert dst.token(Cmd.COMPLETE, completion)[0] == OK


def test_complete_refuses_a_completion_record_that_is_not_the_sources(src: Guest, dst: Guest) -> None:
    start(src, dst)
    send(src, dst, src.private_gpas())
    completion = src.token(Cmd.FINISH, dst.challenge())[1]
    for bad in (flip(completion, len(completion) - 20), flip(completion, 12)):
        assert dst.token(Cmd.COMPLETE, bad)[0] == REFUSED
    assert dst.token(Cmd.COMPLETE, completion[:-1])[0] == INVALID  # not a record, then the grant
    assert dst.token(Cmd.COMPLETE, completion)[0] == OK


def test_complete_needs_the_owners_commit_grant_for_this_target(src: Guest, dst: Guest) -> None:
    """The owner decides once per ticket, commit or abort: a target runs only with its grant,
    so that an abort token given to the source instead can never leave two copies running."""
    mid = start(src, dst)
    send(src, dst, src.private_gpas())
    completion = src.token(Cmd.FINISH, dst.challenge())[1]
    owner, dst.owner = dst.owner, None  # the host sends what it likes after the completion
    assert owner is not None
    grant = commit_grant(owner[0], completion, dst.challenge(), owner[1])
    arbiter = Arbiter()
    arbiter.issued(TICKET, mh.ticket_key(KEY, TICKET))
    abort = arbiter.decide(DecisionRequest(ticket=TICKET, migration_id=mid, challenge=dst.challenge(),
                                           outcome="abort"))[0].token
    other_target = commit_grant(KEY, completion, os.urandom(16))
    other_ticket = commit_grant(KEY, completion, dst.challenge(), ticket=os.urandom(16))
    assert dst.token(Cmd.COMPLETE, completion)[0] == INVALID  # no grant
    for bad in (abort, other_target, other_ticket, flip(grant, len(grant) - 1)):
        assert dst.token(Cmd.COMPLETE, completion + bad)[0] == REFUSED
    assert run_gate(dst) == gate.INCOMING
    assert dst.token(Cmd.VERIFY, flip(completion, 12))[0] == REFUSED
    assert dst.token(Cmd.VERIFY, completion)[0] == OK  # what the VMM asks before the owner
    assert dst.token(Cmd.VERIFY, completion)[0] == OK  # and it changed nothing
    assert run_gate(dst) == gate.INCOMING
    assert dst.token(Cmd.COMPLETE, completion + grant)[0] == OK


def test_the_owners_abort_token_is_the_targets_own_and_resumes_the_source(src: Guest, dst: Guest) -> None:
    """A target that died after FINISH cannot say ABORT; its owner, who holds the ticket's key,
    makes the same token (and then gives the target no commit grant)."""
    mid = start(src, dst)
    send(src, dst, src.private_gpas())
    assert src.token(Cmd.FINISH, dst.challenge())[0] == OK
    arbiter = Arbiter()
    arbiter.issued(TICKET, mh.ticket_key(KEY, TICKET))
    token = arbiter.decide(DecisionRequest(ticket=TICKET, migration_id=mid, challenge=dst.challenge(),
                                           outcome="abort"))[0].token
    assert dst.token(Cmd.ABORT) == (OK, token)  # byte for byte the target MH's own
    assert run_gate(src) == gate.MIGRATED_AWAY
    assert src.token(Cmd.RESUME, token)[0] == OK
    assert run_gate(src) == gate.OPEN


def opened_completion(completion: bytes) -> mb.Completion:
    """What a completion record says (the test holds the master key)."""
    header = mb.decode_record_header(completion)
    aad = mb.associated_data(completion, header)
    body = transport_key(KEY, header.migration_id).decrypt(
        mb.nonce(header.stream, header.seq), completion[len(aad) :], aad)
    return mb.decode_completion(body)


def test_a_target_publishes_a_challenge_of_its_own_that_commands_leave_alone(src: Guest, dst: Guest) -> None:
    challenge = dst.challenge()
    assert challenge != bytes(mb.CHALLENGE_SIZE) and session(dst).challenge == challenge
    assert src.challenge() == bytes(mb.CHALLENGE_SIZE)  # a running guest publishes none
    assert session(src).challenge == bytes(mb.CHALLENGE_SIZE)
    other = Guest(spa=CLONE_SPA, master=KEY, target=True, seed=2)
    try:
        assert other.challenge() not in (bytes(mb.CHALLENGE_SIZE), challenge)
    finally:
        other.close()
    mid = start(src, dst, nvcpus=2)
    send(src, dst, src.private_gpas()[:300], nvcpus=2)
    assert dst.command(1, Cmd.RESET).ret == OK
    assert dst.init(1, mb.Role.TARGET, mid)[0] == OK
    assert dst.command(0, Cmd.COMPLETE, slot=1, length=3).ret == INVALID
    assert dst.challenge() == challenge and session(dst).challenge == challenge


def test_finish_seals_the_challenge_it_was_given_and_that_target_completes(src: Guest, dst: Guest) -> None:
    completion = migrate(src, dst, nvcpus=2)
    sent = opened_completion(completion)
    assert sent.challenge == dst.challenge()
    assert [t.stream for t in sent.totals] == list(range(MH_VCPUS_MAX))
    assert session(dst).phase == mh.SessionPhase.RUNNING and run_gate(dst) == gate.OPEN


@pytest.mark.parametrize("length", [0, mb.CHALLENGE_SIZE - 1, mb.CHALLENGE_SIZE + 1, mb.SLOT_DATA])
def test_finish_without_a_challenge_of_16_bytes_is_invalid_and_the_source_runs_on(
        src: Guest, dst: Guest, length: int) -> None:
    start(src, dst)
    send(src, dst, src.private_gpas()[:200])
    src.store(src.data(0, 0), dst.challenge().ljust(length, b"\xa5")[:length])
    before = src.outside_mailboxes()
    assert src.command(0, Cmd.FINISH, slot=0, length=length).ret == INVALID
    assert src.outside_mailboxes() == before  # no session change, no gate change, no record
    assert session(src).phase == mh.SessionPhase.RUNNING and run_gate(src) == gate.OPEN
    assert src.export(0, [HIGH])[0] == OK  # the migration goes on
    assert src.token(Cmd.FINISH, dst.challenge())[0] == OK


def record_a_migration(src: Guest, dst: Guest) -> tuple[bytes, list[bytes], bytes]:
    """A migration to ``dst`` as a host records it: (migration id, page records, completion)."""
    mid = start(src, dst)
    recorded = []
    for batch in batches(src.private_gpas()):
        ret, record = src.export(0, batch)
        assert ret == OK and dst.import_(0, record) == OK
        recorded.append(record)
    ret, completion = src.token(Cmd.FINISH, dst.challenge())
    assert ret == OK
    return mid, recorded, completion


def test_a_recorded_stream_opens_on_no_other_target_the_owner_launched(src: Guest, dst: Guest) -> None:
    """The owner's broker gives each target launch a ticket of its own: a clone's key opens
    none of the records sealed for another ticket."""
    mid, recorded, completion = record_a_migration(src, dst)
    clone = Guest(spa=CLONE_SPA, master=KEY, target=True, seed=3, ticket=os.urandom(16))
    try:
        assert clone.init(0, mb.Role.TARGET, mid)[0] == OK
        assert all(clone.import_(0, record) == REFUSED for record in recorded[:4])
        assert clone.token(Cmd.COMPLETE, completion)[0] == REFUSED
        assert session(clone).phase == mh.SessionPhase.AWAITING
    finally:
        clone.close()


def test_even_a_target_given_the_same_ticket_does_not_complete_another_targets_stream(
        src: Guest, dst: Guest) -> None:
    """Were a ticket's key released twice (the broker never does), the completion record still
    names one target's challenge."""
    mid, recorded, completion = record_a_migration(src, dst)
    assert dst.token(Cmd.COMPLETE, completion)[0] == OK
    clone = Guest(spa=CLONE_SPA, master=KEY, target=True, seed=3)
    try:
        assert clone.init(0, mb.Role.TARGET, mid)[0] == OK
        for record in recorded:
            assert clone.import_(0, record) == OK  # genuine records: every one opens
        assert clone.token(Cmd.COMPLETE, completion)[0] == REFUSED
        assert session(clone).phase == mh.SessionPhase.AWAITING and run_gate(clone) == gate.INCOMING
        assert clone.token(Cmd.COMPLETE, completion)[0] == REFUSED  # and again
        assert clone.token(Cmd.ABORT)[0] == OK
    finally:
        clone.close()


def test_a_target_booted_again_mid_import_is_no_target_any_more(src: Guest, dst: Guest) -> None:
    """The import overwrote its secret area with the source's: its ticket is gone, so the
    stream saved from its migration has nowhere to be restored."""
    mid, _recorded, _completion = record_a_migration(src, dst)
    mh.prepare(dst.view, C_BIT)
    assert not mh.await_incoming(dst.view, C_BIT)
    assert session(dst).phase == mh.SessionPhase.RUNNING
    assert dst.init(0, mb.Role.TARGET, mid)[0] == INVALID


def test_complete_refuses_a_completion_sealed_for_a_challenge_no_target_drew(src: Guest, dst: Guest) -> None:
    start(src, dst)
    send(src, dst, src.private_gpas())
    completion = src.token(Cmd.FINISH, bytes(mb.CHALLENGE_SIZE))[1]  # read before the target drew one
    assert dst.token(Cmd.COMPLETE, completion)[0] == REFUSED
    assert session(dst).phase == mh.SessionPhase.AWAITING and run_gate(dst) == gate.INCOMING


def test_after_finish_nothing_leaves_the_source_and_its_gate_stays_closed(src: Guest, dst: Guest) -> None:
    start(src, dst)
    assert src.token(Cmd.FINISH, dst.challenge())[0] == OK
    assert run_gate(src) == gate.MIGRATED_AWAY
    assert src.export(0, [HIGH])[0] == INVALID
    assert src.token(Cmd.FINISH, dst.challenge())[0] == INVALID  # one completion record per migration id
    assert src.init(0, mb.Role.SOURCE)[0] == INVALID
    assert src.command(0, Cmd.RESET).ret == OK  # the RFC's cleanup answers, and changes nothing
    assert session(src).phase == mh.SessionPhase.SENT and run_gate(src) == gate.MIGRATED_AWAY


def test_the_run_gate_the_target_imports_is_closed_until_complete_opens_it(src: Guest, dst: Guest) -> None:
    start(src, dst)
    gate.store(src.view, gate.MIGRATED_AWAY, C_BIT)  # a copy sealed as FINISH closed the gate
    gpas = src.private_gpas()
    send(src, dst, gpas)
    assert run_gate(dst) == gate.INCOMING  # imported: not the guest's until COMPLETE
    completion = src.token(Cmd.FINISH, dst.challenge())[1]
    assert dst.token(Cmd.COMPLETE, completion)[0] == OK
    assert run_gate(dst) == gate.OPEN
    data = dst.read_pages(KERNEL_DATA_GPA, 1)
    assert (data[0, :0xF00] == src.read_pages(KERNEL_DATA_GPA, 1)[0, :0xF00]).all()


def test_an_abort_token_resumes_the_source_and_closes_the_target_for_good(src: Guest, dst: Guest) -> None:
    mid = start(src, dst)
    gpas = src.private_gpas()
    send(src, dst, gpas[:300])
    assert src.token(Cmd.FINISH, dst.challenge())[0] == OK
    ret, token = dst.token(Cmd.ABORT)
    assert ret == OK and mb.decode_record_header(token).kind == mb.RecordKind.ABORT
    assert session(dst).phase == mh.SessionPhase.ABORTED and run_gate(dst) == gate.ABORTED
    assert dst.token(Cmd.ABORT) == (OK, token)  # the same token again, if it got lost
    assert dst.import_(0, seal(KEY, mid, stream=0, seq=3, gpas=[HIGH])) == INVALID
    assert dst.init(0, mb.Role.TARGET, mid)[0] == INVALID
    assert dst.token(Cmd.COMPLETE, token)[0] == INVALID
    assert src.token(Cmd.RESUME, token)[0] == OK
    assert session(src).phase == mh.SessionPhase.RUNNING and run_gate(src) == gate.OPEN
    assert src.token(Cmd.RESUME, token)[0] == INVALID
    assert src.export(0, [HIGH])[0] == INVALID  # that migration is over
    ret, again = src.init(0, mb.Role.SOURCE)
    assert ret == OK and again != mid


def test_resume_opens_only_the_targets_abort_token_for_this_migration(src: Guest, dst: Guest) -> None:
    start(src, dst)
    completion = src.token(Cmd.FINISH, dst.challenge())[1]
    token = dst.token(Cmd.ABORT)[1]
    other = Guest(spa=DST_SPA, master=KEY, target=True)
    try:
        assert other.init(0, mb.Role.TARGET, os.urandom(16))[0] == OK
        foreign = other.token(Cmd.ABORT)[1]
    finally:
        other.close()
    for bad in (flip(token, len(token) - 1), flip(token, 60), completion, foreign):
        assert src.token(Cmd.RESUME, bad)[0] == REFUSED
    assert run_gate(src) == gate.MIGRATED_AWAY
    assert src.token(Cmd.RESUME, token)[0] == OK


def test_resume_opens_only_the_token_of_the_target_finish_was_sealed_for(src: Guest, dst: Guest) -> None:
    """Two attested targets with the same transport key in one migration: the host FINISHes for
    one and aborts the other. The other's token is genuine, same migration id, but names
    another challenge, so the source stays stopped: the guest runs on one host at most."""
    mid = start(src, dst)
    other = Guest(spa=DST_SPA, master=KEY, target=True, seed=2)
    try:
        assert other.init(0, mb.Role.TARGET, mid)[0] == OK
        assert src.token(Cmd.FINISH, dst.challenge())[0] == OK
        ret, decoy = other.token(Cmd.ABORT)
        assert ret == OK and mb.decode_record_header(decoy).migration_id == mid
    finally:
        other.close()
    assert src.token(Cmd.RESUME, decoy)[0] == REFUSED
    assert run_gate(src) == gate.MIGRATED_AWAY
    ret, token = dst.token(Cmd.ABORT)  # the target FINISH named gives the guest back
    assert ret == OK and src.token(Cmd.RESUME, token)[0] == OK and run_gate(src) == gate.OPEN


def test_two_targets_of_one_migration_never_seal_under_one_key_and_nonce(src: Guest, dst: Guest) -> None:
    """Abort tokens have a fixed nonce; each target's has a key of its own (its challenge), so
    a host that collects two tokens learns nothing from their XOR (a nonce reused under one
    GCM key would give it the plaintexts' XOR and the authentication key)."""
    mid = start(src, dst)
    other = Guest(spa=DST_SPA, master=KEY, target=True, seed=3)
    try:
        assert other.init(0, mb.Role.TARGET, mid)[0] == OK
        t1, t2 = dst.token(Cmd.ABORT)[1], other.token(Cmd.ABORT)[1]
    finally:
        other.close()
    h1, h2 = mb.decode_record_header(t1), mb.decode_record_header(t2)
    assert (h1.stream, h1.seq) == (h2.stream, h2.seq) and h1.migration_id == h2.migration_id == mid
    head = mb.RECORD_HEADER.size
    body1, body2 = mb.abort_body(dst.challenge()), mb.abort_body(bytes(16))  # any body of that length
    c1, c2 = t1[head : head + len(body1)], t2[head : head + len(body2)]
    p_xor = bytes(a ^ b for a, b in zip(body1[: len(mb.ABORT_NEVER_RAN)], mb.ABORT_NEVER_RAN, strict=True))
    c_xor = bytes(a ^ b for a, b in zip(c1, c2, strict=True))[: len(mb.ABORT_NEVER_RAN)]
    assert p_xor == bytes(len(mb.ABORT_NEVER_RAN))  # same words in both bodies ...
    assert c_xor != p_xor  # ... yet different ciphertext: two keystreams, not one


def test_a_target_imports_one_migration_only(src: Guest, dst: Guest) -> None:
    """MH vCPU 0's first INIT names the target's migration; another id (an old or a throwaway
    session of the same source, whose records also open under the key) is refused on every MH
    vCPU, so no stream can mix in a page of another migration."""
    ret, mid = src.init(0, mb.Role.SOURCE)
    assert ret == OK
    assert dst.init(1, mb.Role.TARGET, mid)[0] == INVALID  # MH vCPU 0 names it first
    assert dst.init(0, mb.Role.TARGET, mid)[0] == OK
    assert session(dst).migration_id == mid
    for i in (0, 1):
        assert dst.init(i, mb.Role.TARGET, os.urandom(16))[0] == INVALID
    assert dst.init(1, mb.Role.TARGET, mid)[0] == OK  # the same migration: joined


# --- sessions ---------------------------------------------------------------------------------------


def test_the_source_draws_the_migration_id_and_its_vcpus_join_it(src: Guest) -> None:
    """The VMM names the target's ticket; the MH draws the session's id itself."""
    assert src.init(1, mb.Role.SOURCE)[0] == INVALID  # MH vCPU 0 opens the session
    assert src.init(0, mb.Role.SOURCE, bytes(16))[0] == INVALID  # no ticket: no key
    odd = HIGH + mb.STREAM_CHUNK * PAGE_SIZE  # stream 1 of 2 takes the second chunk of GFNs
    ret, mid = src.init(0, mb.Role.SOURCE, nstreams=2)
    assert ret == OK and mid != TICKET and session(src).ticket == TICKET
    assert src.init(1, mb.Role.SOURCE, b"b" * 16)[0] == INVALID  # another ticket: another session
    assert src.init(1, mb.Role.SOURCE, nstreams=7) == (OK, mid)  # the session's count
    assert src.init(2, mb.Role.SOURCE) == (INVALID, TICKET)  # no stream 2 in a session of 2
    assert src.export(1, [odd])[0] == OK
    assert mb.decode_record_header(src.export(1, [odd + 2 * PAGE_SIZE])[1]).nstreams == 2
    assert src.export(1, [HIGH])[0] == REFUSED  # the first chunk is stream 0's
    ret, new = src.init(0, mb.Role.SOURCE, nstreams=2)
    assert ret == OK and new != mid
    assert src.export(1, [odd])[0] == INVALID  # vCPU 1 still serves the old session
    assert src.init(1, mb.Role.SOURCE) == (OK, new)
    assert mb.decode_record_header(src.export(1, [odd])[1]).seq == 0


def test_a_target_that_inits_again_keeps_its_place_in_the_stream(src: Guest, dst: Guest) -> None:
    mid = start(src, dst)
    r0, r1 = (src.export(0, [HIGH + k * PAGE_SIZE])[1] for k in range(2))
    assert dst.import_(0, r0) == OK
    assert dst.command(0, Cmd.RESET).ret == OK
    assert dst.import_(0, r1) == INVALID  # left the session
    assert dst.init(0, mb.Role.TARGET, mid)[0] == OK
    assert dst.import_(0, r0) == REFUSED
    assert dst.import_(0, r1) == OK


def test_a_running_guest_is_never_a_target(src: Guest) -> None:
    assert src.init(0, mb.Role.TARGET, os.urandom(16))[0] == INVALID


def test_without_a_transport_key_init_is_refused() -> None:
    for target in (False, True):
        g = Guest(spa=SRC_SPA, master=None, target=target)
        try:
            # A source has no key; a target without its ticket never became one.
            role = mb.Role.TARGET if target else mb.Role.SOURCE
            assert g.init(0, role)[0] == (INVALID if target else REFUSED)
            assert g.export(0, [HIGH])[0] == INVALID
        finally:
            g.close()


def test_commands_in_the_wrong_place_are_invalid(src: Guest, dst: Guest) -> None:
    start(src, dst, nvcpus=2)
    assert src.command(0, Cmd.EXPORT, npages=1).ret == INVALID  # the v1 block has no data area
    assert src.command(0, Cmd.INIT, slot=1).ret == INVALID
    assert src.command(1, Cmd.FINISH, slot=0).ret == INVALID  # control commands are vCPU 0's
    assert src.command(1, Cmd.ENCRYPT, gpa=HIGH).ret == INVALID
    assert src.command(0, 99).ret == INVALID
    assert dst.export(0, [HIGH])[0] == INVALID  # a target exports nothing
    assert src.import_(0, src.export(0, [HIGH])[1]) == INVALID  # a source imports nothing
    src.io_header(0, bytes(mb.IO_HDR_MAX + 1))
    assert src.command(0, Cmd.INIT).ret == INVALID


def test_an_idle_mh_halts_without_touching_its_mailbox(src: Guest) -> None:
    for index in (0, MH_VCPUS_MAX - 1, MH_VCPUS_MAX):  # the last: a vCPU without a mailbox
        before = src.ram.bytes.copy()
        src.enter(index)
        assert (src.ram.bytes == before).all()
        assert src.core(index).halted


# --- version 1: the RFC's client ----------------------------------------------------------------------

RFC_CMD = struct.Struct("<QQiiii")
"""``CGSMigHelperCmdParams``: cmd_type, gpa, prefetch, ret, go, done."""


def rfc_command(g: Guest, cmd: int, gpa: int = 0) -> int:
    """QEMU's ``send_command_to_cgs_mig_helper``, on MH vCPU 0's mailbox."""
    base = g.mailbox(0)
    g.ram.store(base, RFC_CMD.pack(cmd, gpa, 0, -1, 0, 0))
    g.ram.store(base + 0x18, struct.pack("<i", 1))  # go, after the parameters
    g.enter(0)
    _, _, _, ret, go, done = RFC_CMD.unpack(g.ram.load(base, RFC_CMD.size))
    assert go == 0 and done == 1
    return int(ret)


@pytest.fixture
def v1_src() -> Iterator[Guest]:
    with closing(Guest(spa=SRC_SPA, master=KEY, seed=1, v1=True)) as g:
        yield g


@pytest.fixture
def v1_dst() -> Iterator[Guest]:
    with closing(Guest(spa=DST_SPA, master=KEY, target=True, seed=2, v1=True)) as g:
        yield g


def test_version_1_needs_the_owners_opt_in(src: Guest, dst: Guest) -> None:
    """Version 1 has no completion record and no run gate: without the owner's secret entry
    saying it accepts that, neither side speaks it."""
    assert rfc_command(src, 0) == REFUSED
    assert rfc_command(dst, 0) == REFUSED
    assert session(dst).phase == mh.SessionPhase.AWAITING and run_gate(src) == gate.OPEN


def test_a_client_of_the_rfcs_mailbox_moves_pages_sealed(v1_src: Guest, v1_dst: Guest) -> None:
    src, dst = v1_src, v1_dst
    page = HIGH + 5 * PAGE_SIZE
    src.write_pages(page, np.frombuffer(b"CANARY-v1-" * 409 + bytes(6), np.uint8).reshape(1, PAGE_SIZE))
    assert rfc_command(src, 0) == OK  # INIT: the io header says nothing
    assert rfc_command(dst, 0) == OK
    hdrs, pages = [], []
    for gpa in (page, page + PAGE_SIZE, FW_CFG_BOUNCE_GPA):
        ret = rfc_command(src, 1, gpa)  # ENCRYPT
        if gpa == FW_CFG_BOUNCE_GPA:
            assert ret == REFUSED  # shared: the VMM sends it itself
            continue
        base = src.mailbox(0)
        (n,) = struct.unpack("<I", src.ram.load(base + 0x800, 4))
        assert ret == OK and n == mb.V1_IO_HDR_LEN
        hdrs.append(src.ram.load(base + 0x804, n))
        pages.append(src.ram.load(base + 0x1000, PAGE_SIZE))
        assert b"CANARY" not in pages[-1]
    header = mb.decode_record_header(mb.join_v1_record(hdrs[0], pages[0]))
    assert (header.stream, header.seq, header.npages) == (mb.V1_STREAM, 0, 1)

    def put(k: int) -> None:
        base = dst.mailbox(0)
        dst.ram.store(base + 0x800, struct.pack("<I", len(hdrs[k])) + hdrs[k])
        dst.ram.store(base + 0x1000, pages[k])

    put(0)
    assert rfc_command(dst, 2, page + PAGE_SIZE) == REFUSED  # DECRYPT to another GPA: a swap
    assert rfc_command(dst, 2, page) == OK
    assert rfc_command(dst, 2, page) == REFUSED  # a replay
    assert rfc_command(dst, 0) == OK  # INIT again: the stream keeps its place
    assert rfc_command(dst, 2, page) == REFUSED
    put(1)
    assert rfc_command(dst, 2, page + PAGE_SIZE) == OK
    assert (dst.read_pages(page, 2) == src.read_pages(page, 2)).all()
    assert rfc_command(dst, 3) == OK and rfc_command(src, 3) == OK  # RESET: the import is over
    assert session(dst).phase == mh.SessionPhase.RUNNING
    assert rfc_command(dst, 2, page) == INVALID
    assert rfc_command(src, 0) == OK  # a later migration: INIT finds the old record in the header
    assert rfc_command(src, 1, page) == OK
    later = mb.join_v1_record(src.ram.load(src.mailbox(0) + 0x804, mb.V1_IO_HDR_LEN),
                              src.ram.load(src.mailbox(0) + 0x1000, PAGE_SIZE))
    assert mb.decode_record_header(later).migration_id != header.migration_id  # a fresh key


def test_v1_records_split_and_join() -> None:
    record = bytes(range(256)) * 16 + os.urandom(mb.V1_IO_HDR_LEN)
    hdr, page = mb.split_v1_record(record)
    assert len(hdr) == mb.V1_IO_HDR_LEN and len(page) == PAGE_SIZE
    assert mb.join_v1_record(hdr, page) == record
    with pytest.raises(mb.MailboxError):
        mb.split_v1_record(record[:-1])
    with pytest.raises(mb.MailboxError):
        mb.join_v1_record(hdr[:-1], page)


# --- what the host can see ------------------------------------------------------------------------


def test_neither_the_key_nor_private_plaintext_reaches_shared_memory(src: Guest, dst: Guest) -> None:
    canary = b"PRIVATE-CANARY:" + os.urandom(8).hex().encode()
    src.write_pages(HIGH + 7 * PAGE_SIZE,
                    np.frombuffer(canary.ljust(PAGE_SIZE, b"\0"), np.uint8).reshape(1, PAGE_SIZE))
    completion = migrate(src, dst, nvcpus=2)
    mid = mb.decode_record_header(completion).migration_id
    derived = transport_key(KEY, mid)
    assert canary in dst.view.read(HIGH + 7 * PAGE_SIZE | C_BIT, len(canary))
    secret_page = src.view.read(SECRET_AREA_GPA | C_BIT, PAGE_SIZE)
    assert KEY in secret_page  # where the owner put it: in private memory
    for g in (src, dst):
        host = g.ram.bytes.tobytes()  # everything the host can read: shared pages, ciphertext
        assert KEY not in host and canary not in host and b"PRIVATE-CANARY" not in host
    assert derived.encrypt(bytes(12), b"x", None) != transport_key(os.urandom(32), mid).encrypt(
        bytes(12), b"x", None)


def test_the_mh_keeps_nothing_in_the_core_between_entries(src: Guest, dst: Guest) -> None:
    """Each command may run on a fresh core: the MH's state is in guest RAM."""
    mid = start(src, dst)
    record = src.export(0, [HIGH])[1]
    dst.cores.pop(0)
    assert dst.import_(0, record) == OK
    src.cores.pop(0)
    assert mb.decode_record_header(src.export(0, [HIGH])[1]).seq == 1
    assert mb.decode_record_header(record).migration_id == mid


# --- SEV-ES: the vCPUs' state travels with the completion record ------------------------------------


@pytest.fixture
def es_src() -> Iterator[Guest]:
    with closing(Guest(spa=SRC_SPA, master=KEY, seed=1, es=True)) as g:
        yield g


@pytest.fixture
def es_dst() -> Iterator[Guest]:
    with closing(Guest(spa=DST_SPA, master=KEY, target=True, seed=2, es=True)) as g:
        yield g


class GuestVcpu:
    """The guest's BSP as :mod:`confmig.guest.saved_state` sees it (through the test's view)."""

    vcpu_id = 0

    def __init__(self, g: Guest, rip: int) -> None:
        self.g = g
        self.regs = Registers((*range(1, 17), rip, 0x246))

    def write(self, gpa: int, data: bytes) -> None:
        self.g.view.write(gpa, data)

    def read(self, gpa: int, size: int) -> bytes:
        return self.g.view.read(gpa, size)


def park(g: Guest) -> int:
    """PARK: 0 while the guest's vCPUs have not all saved their state, 1 once they have."""
    answer = g.command(0, Cmd.PARK, slot=0)
    assert answer.ret == OK
    return answer.length


def test_an_sev_es_guest_parks_its_vcpus_and_its_state_reaches_the_target(es_src: Guest,
                                                                          es_dst: Guest) -> None:
    start(es_src, es_dst)
    send(es_src, es_dst, es_src.private_gpas())
    assert es_src.token(Cmd.FINISH, es_dst.challenge())[0] == INVALID  # the vCPUs did not park
    assert park(es_src) == 0 and run_gate(es_src) == gate.SAVING
    bsp = GuestVcpu(es_src, rip=0xFFFF_FFFF_C000_0040)
    saved_state.save(bsp, C_BIT)  # what the kernel does at the vCPU's next step
    assert park(es_src) == 1 and park(es_src) == 1  # asking again changes nothing
    ret, completion = es_src.token(Cmd.FINISH, es_dst.challenge())
    assert ret == OK and opened_completion(completion).vcpu_state == saved_state.carried(bsp, C_BIT)
    assert saved_state.load(es_dst.view, 0, C_BIT) is None  # nothing installed before COMPLETE
    assert es_dst.token(Cmd.COMPLETE, completion)[0] == OK
    assert saved_state.load(es_dst.view, 0, C_BIT) == bsp.regs


def test_a_migration_that_did_not_happen_lets_the_parked_guest_run_on(es_src: Guest, es_dst: Guest) -> None:
    start(es_src, es_dst)
    assert park(es_src) == 0 and run_gate(es_src) == gate.SAVING
    assert es_src.command(0, Cmd.RESET).ret == OK
    assert run_gate(es_src) == gate.OPEN


def test_park_is_for_a_source_of_an_sev_es_guest_only(src: Guest, es_dst: Guest) -> None:
    assert es_dst.command(0, Cmd.PARK, slot=0).ret == INVALID  # a target
    assert src.command(0, Cmd.PARK, slot=0).ret == INVALID  # before INIT
    src.init(0, mb.Role.SOURCE)
    assert src.command(0, Cmd.PARK, slot=0).ret == INVALID  # an SEV guest: its VMM moves registers
    assert run_gate(src) == gate.OPEN


def test_complete_refuses_vcpu_state_that_does_not_match_the_targets_guest(
        src: Guest, es_src: Guest, dst: Guest, es_dst: Guest) -> None:
    # An SEV source's completion carries no vCPU state: an SEV-ES target would have no registers.
    start(src, es_dst)
    send(src, es_dst, src.private_gpas())
    ret, completion = src.token(Cmd.FINISH, es_dst.challenge())
    assert ret == OK and opened_completion(completion).vcpu_state == b""
    assert es_dst.token(Cmd.COMPLETE, completion)[0] == REFUSED
    # An SEV-ES source's does: an SEV target's VMM sets registers itself, and would overwrite them.
    start(es_src, dst)
    send(es_src, dst, es_src.private_gpas())
    park(es_src)
    saved_state.save(GuestVcpu(es_src, rip=0x1000), C_BIT)
    assert park(es_src) == 1
    ret, completion = es_src.token(Cmd.FINISH, dst.challenge())
    assert ret == OK
    assert dst.token(Cmd.COMPLETE, completion)[0] == REFUSED
