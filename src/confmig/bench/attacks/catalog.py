"""Which attacks run against which backend, and what the design says must come of each.

A :class:`Case` is one row of the table: an attack on the live stream through the proxy, or a
scenario around it (the migration redirected to a target the host controls, a recorded stream
replayed to a second target, a saved one restored on a second target). Its
:class:`Expected` is the design's answer, with the reason; the harness records what
happened and whether the two agree.

A new backend joins with an entry in :data:`CASES` (and a way to start its pair of VMs in
``harness``). ``local`` (cpr-transfer) is not in it: it sends no page over a network (the
guest's RAM and encryption context move by file descriptor to a new VMM on the same host,
and the main channel carries only device state), so no stream attack has a page to act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from confmig.bench.attacks.edits import (
    FINAL,
    LAST,
    Attack,
    CutShort,
    Drop,
    Duplicate,
    Flip,
    Inject,
    Reorder,
    Replay,
    StaleReplay,
    Swap,
    Truncate,
)
from confmig.bench.attacks.records import Kind, Part
from confmig.bench.scenario import SEV_POLICY
from confmig.platform.psp.policy import PolicyFlag


class Scenario(Enum):
    PROXY = "proxy"
    """The proxy's attack on the live stream of one migration."""
    ROGUE_TARGET = "rogue-target"
    """The host sends the guest to a target it chose, not the one the owner meant."""
    REPLAY_STREAM = "replay-stream"
    """A completed migration's recorded stream, played to a second target (a clone)."""
    RESTORE_FILE = "restore-file"
    """A stream saved with ``migrate file:``, restored on a second target (a clone, or a
    rollback to the saved state)."""
    ROGUE_PDH = "rogue-pdh"
    """PSP: the source is told a PDH the host made; the host takes the stream itself."""


class Expected(Enum):
    """What the design says comes of an attack."""

    CAUGHT = "caught"
    """The target refuses the stream; no copy of the guest runs there."""
    CORRUPTED = "not caught: corrupted"
    """The target runs the guest with pages the source did not have (its self-check fails)."""
    HARMLESS = "not caught: harmless"
    """The target runs the guest, intact: nothing the guest relies on changed."""
    COPY_RUNS = "not caught: a copy runs"
    """A copy of the guest runs on a target the owner did not send it to."""
    READ = "not caught: memory read"
    """The host decrypted the guest's private pages."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    name: str
    what: str
    """What the host does, in words."""
    expected: Expected
    why: str
    """The design's reason for :attr:`expected`."""
    attack: Attack | None = None
    scenario: Scenario = Scenario.PROXY
    mh_vcpus: int = 1
    """MH: Migration Handler vCPUs (streams); two where the attack needs a second stream."""
    policy: int = SEV_POLICY
    """PSP: the guest's SEV policy."""


def _proxy(name: str, what: str, attack: Attack, expected: Expected, why: str, *, mh_vcpus: int = 1) -> Case:
    return Case(name=name, what=what, attack=attack, expected=expected, why=why, mh_vcpus=mh_vcpus)


C, X, H, R, READ = Expected.CAUGHT, Expected.CORRUPTED, Expected.HARMLESS, Expected.COPY_RUNS, Expected.READ

_NO_INTEGRITY = "no integrity: the target loads whatever page records arrive"
_NO_ORDER = "records of distinct pages commute: each lands at its own address, whatever the order"
_PSP_NO_ADDRESS = "the packet MAC does not cover the GPA (docs/psp.md, 'What the SEV API does not stop')"
_PSP_NO_SEQUENCE = ("the PSP keeps no sequence number or record of packets seen within one SEND_START "
                    "(docs/psp.md, 'What the SEV API does not stop')")
_PSP_MAC = "the packet MAC (HMAC under the TIK) covers flags, IV, lengths and ciphertext: BAD_MEASUREMENT"
_FRAMING = "the stream ends inside a record: the target's decoder says truncated; the guest never ran"
_MH_SEQ = "each MH stream's records carry a sequence number inside the seal; IMPORT takes only the next one"
_MH_SEAL = "the whole record (header, GPA list, ciphertext) is sealed with AES-256-GCM: AUTH_ERR"
_MH_COMPLETE = "the completion record seals each stream's last sequence number: COMPLETE refuses a gap"
_PSP_ANY_TARGET = ("SEND_START seals the session for whichever certified platform the host names; the owner "
                   "attests launches, not receives (docs/psp.md)")
_PSP_ANY_PDH = ("under neither the SEV nor the DOMAIN policy bit SEND_START only sanity-checks the PDH "
                "the host names (docs/psp.md): whoever holds its private key unwraps TEK and TIK")
_PSP_SEV_BIT = ("the SEV policy bit: SEND_START verifies the PDH's chain (PEK, CEK, ASK) up to the AMD root "
                "it trusts")
_PSP_REPLAY = ("RECEIVE_START accepts any session sealed for the target's PDH, and the stream does not name "
               "its target VM (docs/psp.md)")
_MH_TICKET = ("the owner releases the transport key per target (a ticket), and the source's MH seals for one "
              "target's challenge: no record opens elsewhere")


def _stream_cases(kind: Kind) -> list[Case]:
    """The proxy's attacks, placed where they can hurt: MH records anywhere (the first round);
    PSP and plain records in the stop-and-copy part, among the pages the guest checks (a record
    changed earlier is usually sent again in a later round)."""
    if kind is Kind.MH:
        return [
            _proxy("swap", "two records of one stream exchange places", Swap(), C, _MH_SEQ, mh_vcpus=2),
            _proxy("replay", "a record again, three records later", Replay(), C, _MH_SEQ),
            _proxy("reorder", "two consecutive records in the opposite order", Reorder(), C, _MH_SEQ,
                   mh_vcpus=2),
            _proxy("drop", "one record never arrives", Drop(), C, _MH_SEQ),
            _proxy("duplicate", "one record twice in a row", Duplicate(), C, _MH_SEQ),
            _proxy("inject", "a forged record (genuine header and GPAs, random ciphertext and tag) "
                   "before the genuine one", Inject(), C, _MH_SEAL),
            _proxy("flip-header", "one bit of the record header (the epoch)", Flip(part=Part.HEADER), C,
                   _MH_SEAL),
            _proxy("flip-address", "one bit of a GPA in the record's list", Flip(part=Part.GPA_LIST), C,
                   _MH_SEAL),
            _proxy("flip-payload", "one bit of the ciphertext", Flip(part=Part.CIPHERTEXT), C, _MH_SEAL),
            _proxy("truncate", "the record loses its last page; header and GPA list made to agree",
                   Truncate(), C, _MH_SEAL),
            _proxy("cut", "the connection ends halfway through a record", CutShort(), C, _FRAMING),
            _proxy("drop-last", "the stop-and-copy part's last record never arrives", Drop(at=LAST), C,
                   _MH_COMPLETE),
        ]
    psp = kind is Kind.PSP
    order = _PSP_NO_SEQUENCE if psp else _NO_INTEGRITY
    return [
        _proxy("swap", "two pages' contents exchange addresses (A's record lands at B, B's at A)",
               Swap(at=FINAL, distance=1), X, _PSP_NO_ADDRESS if psp else _NO_INTEGRITY),
        _proxy("replay", "a page's previous version, from an earlier round, again after its newer one",
               StaleReplay(), X, order),
        _proxy("reorder", "two consecutive records (of distinct pages) in the opposite order",
               Reorder(at=FINAL), H, _NO_ORDER),
        _proxy("drop", "one record of the stop-and-copy part never arrives (the target keeps the older "
               "version)", Drop(at=FINAL), X, order),
        _proxy("duplicate", "one record twice in a row", Duplicate(at=FINAL), H,
               "the same version of the page, written twice"),
        _proxy("inject", "a forged record (genuine address, random content" + (" and MAC)" if psp else ")")
               + (" before" if psp else " after") + " the genuine one",
               Inject(at=FINAL, after=not psp), C if psp else X, _PSP_MAC if psp else _NO_INTEGRITY),
        _proxy("flip-header", "one bit of the packet header (its IV)" if psp else
               "one bit of the record header (its offset: the page lands one page further)",
               Flip(at=FINAL, part=Part.HEADER), C if psp else X, _PSP_MAC if psp else _NO_INTEGRITY),
        _proxy("flip-address", "one bit of the page's address (the envelope's GPA)" if psp else
               "one bit of the page's address (the record's offset)",
               Flip(at=FINAL, part=Part.GPA_LIST), X, _PSP_NO_ADDRESS if psp else _NO_INTEGRITY),
        _proxy("flip-payload", "one bit of the page's " + ("ciphertext" if psp else "data"),
               Flip(at=FINAL, part=Part.CIPHERTEXT), C if psp else X, _PSP_MAC if psp else _NO_INTEGRITY),
        _proxy("truncate", "the packet's transport data 16 bytes short, its length made to agree" if psp else
               "the page's record becomes a zero-page record", Truncate(at=FINAL), C if psp else X,
               "the VMM's envelope check: a PSP page must be one whole page (and the MAC covers the "
               "lengths)" if psp else _NO_INTEGRITY),
        _proxy("cut", "the connection ends halfway through a record", CutShort(), C, _FRAMING),
        _proxy("drop-last", "the stop-and-copy part's last record never arrives", Drop(at=LAST), X, order),
    ]


def _scenario_cases(kind: Kind) -> list[Case]:
    if kind is Kind.MH:
        return [
            Case(name="rogue-target", scenario=Scenario.ROGUE_TARGET, expected=C, why=_MH_TICKET,
                 what="the migration goes to an MH target the host launched for another guest (another "
                      "owner's launch: another transport key)"),
            Case(name="replay-stream", scenario=Scenario.REPLAY_STREAM, expected=C, why=_MH_TICKET,
                 what="a completed migration's recorded stream, played to a second attested target"),
            Case(name="restore-file", scenario=Scenario.RESTORE_FILE, expected=C, why=_MH_TICKET,
                 what="a stream saved with migrate file: for one target, restored on a second one"),
        ]
    psp = kind is Kind.PSP
    rogue_pdh = [
        Case(name="rogue-pdh", scenario=Scenario.ROGUE_PDH, expected=READ, why=_PSP_ANY_PDH,
             what="sev-pdh names a PDH the host made (policy 0x1: neither SEV nor DOMAIN bit); the host "
                  "takes the stream, unwraps the session and decrypts the pages"),
        Case(name="rogue-pdh-sev-bit", scenario=Scenario.ROGUE_PDH, expected=C, why=_PSP_SEV_BIT,
             policy=SEV_POLICY | PolicyFlag.SEV,
             what="the same, for a guest whose policy sets the SEV bit (0x21)"),
    ] if psp else []
    return [
        *rogue_pdh,
        Case(name="rogue-target", scenario=Scenario.ROGUE_TARGET, expected=R,
             why=_PSP_ANY_TARGET if psp else _NO_INTEGRITY,
             what="the migration goes to a target on a third host the host controls" +
                  (" (its PDH: the host chose it)" if psp else "")),
        Case(name="replay-stream", scenario=Scenario.REPLAY_STREAM, expected=R,
             why=_PSP_REPLAY if psp else _NO_INTEGRITY,
             what="a completed migration's recorded stream, played to a second target" +
                  (" on the same platform" if psp else "")),
        Case(name="restore-file", scenario=Scenario.RESTORE_FILE, expected=R,
             why=_PSP_REPLAY if psp else _NO_INTEGRITY,
             what="a stream saved with migrate file:" + (" for a platform" if psp else "") +
                  ", restored on a second target" + (" there" if psp else "")),
    ]


BACKENDS: Final = {"plain": Kind.PLAIN, "psp": Kind.PSP, "mh": Kind.MH}
"""The backends whose pages cross a network, and their page records."""
NOT_APPLICABLE: Final = {
    "local": "cpr-transfer sends no page over a network: the guest's RAM (memfds) and its encryption "
             "context move by file descriptor to a new VMM on the same host, and the main channel "
             "carries device state only. No stream attack has a page to act on; the host that could "
             "attack it owns both VMMs and the kernel between them.",
}
CASES: Final = {name: [*_stream_cases(kind), *_scenario_cases(kind)] for name, kind in BACKENDS.items()}
QUICK: Final = {"plain": ("swap",), "psp": ("replay", "flip-payload")}
"""The fast subset of the default test run: one attack PSP does not catch and one it does, and
one that shows plain migration has no integrity."""
