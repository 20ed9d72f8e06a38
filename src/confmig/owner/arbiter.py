"""The owner's commit point: one decision per migration ticket, commit or abort.

A guest that migrates through its Migration Handler must never run in two
places, and should run in one whatever fails. The source's MH stops the guest at FINISH and
lets it run again only with an abort token; the target's MH lets it run only
with the owner's commit grant. Both go through the guest owner, who issued the
target its ticket and now decides, once per ticket, which side it gives a proof
to: the first request decides; a request for the same outcome (same migration,
same challenge) gets the same bytes again; any other is refused. So a target
that died after FINISH (or a link that did) no longer strands the guest: its
source asks for the abort, and a target that comes back later gets no grant.

The proofs are the MH's own formats (:mod:`confmig.proto.mailbox`): records
without pages, sealed with AES-256-GCM under the migration's key for the
ticket, with a purpose that names the target's challenge. An abort token made
here is byte for byte the one the target's MH would make (ABORT). Who asks is
not authenticated, and need not be: a host can ask for either outcome, but
never get both.

Limits, honestly: tickets and decisions live in this process's memory. An owner
that restarts knows no ticket any more and refuses both outcomes for every one:
that fails safe (no fork), but a migration under way then ends with no copy
running once its source stopped (after FINISH). A real broker would keep both in
stable storage; it must never keep the tickets without their decisions, or it
could decide one twice. Only the latest :data:`MAX_TICKETS` tickets are kept, for
the same reason an older one is forgotten whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confmig.owner.errors import DecisionRefused
from confmig.proto import mailbox as mb
from confmig.proto.keybroker import DecisionRequest, DecisionResponse

MAX_TICKETS: Final = 4096
"""Tickets remembered at once (one per attested target launch): the oldest is forgotten, key
and decision together, so that a forgotten ticket gets neither outcome."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the owner decided for one ticket, for which migration and target boot, and the
    proof it gave (given again, the same bytes, to the same request)."""

    outcome: str
    migration_id: bytes
    challenge: bytes
    token: bytes


class Arbiter:
    """The tickets the broker issued, each with the guest's transport key, and their decisions."""

    def __init__(self, *, max_tickets: int = MAX_TICKETS) -> None:
        self._keys: dict[bytes, bytes] = {}
        """Ticket -> that ticket's key (what its target got at launch)."""
        self._decided: dict[bytes, Decision] = {}
        self._max = max_tickets
        self._lock = threading.Lock()

    def issued(self, ticket: bytes, ticket_key: bytes) -> None:
        """The broker released ``ticket`` and its key to one target launch."""
        with self._lock:
            while len(self._keys) >= self._max:
                oldest = next(iter(self._keys))
                del self._keys[oldest]
                self._decided.pop(oldest, None)
            self._keys[ticket] = ticket_key

    def decide(self, request: DecisionRequest) -> tuple[DecisionResponse, bool]:
        """The decision for ``request``'s ticket, and whether this request made it (False: the
        same request came before, and gets the same proof again)."""
        made = False
        with self._lock:
            key = self._keys.get(request.ticket)
            if key is None:
                raise DecisionRefused("no migration target was given this ticket")
            wanted = (request.outcome, request.migration_id, request.challenge)
            done = self._decided.get(request.ticket)
            if done is None:
                done = Decision(*wanted, token=_seal(key, *wanted))
                self._decided[request.ticket] = done
                made = True
            elif (done.outcome, done.migration_id, done.challenge) != wanted:
                raise DecisionRefused(
                    f"this migration was decided already: {done.outcome}"
                    + (" (its target may run the guest)" if done.outcome == "commit"
                       else " (its source may run the guest again)"))
        return DecisionResponse(outcome=done.outcome, token=done.token), made


def _seal(ticket_key: bytes, outcome: str, migration_id: bytes, challenge: bytes) -> bytes:
    """The MH's token for ``outcome``: a record of no pages, sequence 0, under the migration's
    key with the outcome's purpose (the target MH's ``_transport_key`` and ``_seal``)."""
    if outcome == "commit":
        kind, stream = mb.RecordKind.COMMIT, mb.COMMIT_STREAM
        purpose, body = mb.commit_purpose(challenge), mb.commit_body(challenge)
    else:
        kind, stream = mb.RecordKind.ABORT, mb.ABORT_STREAM
        purpose, body = mb.abort_purpose(challenge), mb.abort_body(challenge)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id,
               info=mb.TRANSPORT_KDF_INFO + purpose).derive(ticket_key)
    header = mb.RecordHeader(mb.RECORD_VERSION, mb.ALG_AES_256_GCM, kind, stream, 0, 0, 0, 0,
                             len(body), 1, migration_id).pack()
    return header + AESGCM(key).encrypt(mb.nonce(stream, 0), body, header)
