"""The Migration Handler: the firmware's code that moves private pages for a VMM.

It runs on the vCPUs of a mirror VM (``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``): same
ASID as the guest, so ``gpa | C-bit`` reaches the guest's private plaintext,
while the guest's own vCPUs stay stopped. MH vCPU ``i`` (``cpu.vcpu_id``)
serves the mailbox at ``MH_MAILBOX_GPA + i * MAILBOX_STRIDE`` (shared pages:
read and written without the C-bit); the wire formats are
:mod:`confmig.proto.mailbox`'s.

Entry. A VMM starts an MH vCPU at ``MH_ENTRY`` (the image's table says where)
and enters it with ``KVM_RUN`` whenever it published a command. Each entry is
one step: it serves every block of its mailbox whose ``go`` is 1 (the v1
block, then the slots), writes the outputs and ``ret``, then ``go = 0``, then
``done = 1``, and halts to the host; an idle MH never spins. Nothing is kept
in Python between steps: the MH's state is in its private pages (below).

Who serves what::

    v1 block, every MH vCPU      INIT, RESET
    v1 block, MH vCPU 0          ENCRYPT, DECRYPT (version 1: one page, stream V1_STREAM)
    slots, every MH vCPU         EXPORT, IMPORT (stream = the MH vCPU's index)
    slots, MH vCPU 0             PARK, FINISH, VERIFY, COMPLETE, ABORT, RESUME

Anything else, and any command in a state that does not allow it, returns -1.
INIT reads the io header as version-2 parameters only when it holds exactly
their 24 bytes (a version-1 client never writes it before INIT, and it may
still hold an ENCRYPT's record); a target's INIT empties it, a source's leaves
its answer there (the session's migration id).

A VMM starts an MH vCPU with ``rip`` at the table's entry, ``rflags`` 2 and
every other register 0 (the MH reads none of them); ``cpu.vcpu_id`` is the MH
vCPU's index. MH vCPUs from ``MH_VCPUS_MAX`` up have no mailbox and only halt.
MH vCPU 0 is the only writer of the session page, MH vCPU ``i`` the only
writer of its own state page and imported-page bitmap: the engine's
read-modify-write of a private page is not atomic between vCPUs, so no page
has two writers.

State (private, in the MH's area, zeroed by the firmware at boot)::

    session page   8s magic "CMMHSES2" | le32 phase | le32 streams | 16s migration id
                   | 16s challenge (a target's own, in AWAITING; in SENT, the one
                   FINISH sealed; else zero)
                   RUNNING   the guest runs here; it may migrate out. A source's
                             session id is drawn by INIT on MH vCPU 0.
                   SENT      FINISH sealed the guest's state for a target: the run
                             gate is closed, only RESUME reopens it
                   AWAITING  a target-mode boot: the guest has not run here and may
                             be imported (nothing else may be). Entering it draws
                             the target's challenge (16 random bytes), stored here
                             and published in MH vCPU 0's mailbox at
                             CHALLENGE_OFFSET (shared; the firmware zeroed the
                             mailboxes before, and no command writes there)
                   ABORTED   ABORT sealed a token: the guest never runs here
    vCPU page i    le32 role | le32 flags | 16s migration id | le64 records
                   | le64 pages | le64 epoch: stream i's count of records and
                   pages, and its last epoch, under that migration id
    bitmap i       the pages stream i imported under its migration id (one bit
                   per GFN below 16 GiB, as the page-state list)

The session's phases, and the commands each allows (:data:`_COMMANDS` is the
table; the first phase is the firmware's: RUNNING, or AWAITING in target mode)::

    RUNNING   INIT (source, v1 source), ENCRYPT, EXPORT, PARK (SEV-ES), FINISH -> SENT
    SENT      RESUME -> RUNNING (a new INIT starts the next migration)
    AWAITING  INIT (target, v1 target), DECRYPT, IMPORT, VERIFY, COMPLETE -> RUNNING,
              ABORT -> ABORTED, RESET of a v1 target that imported -> RUNNING
    ABORTED   ABORT (the same token again)
    any       RESET (this MH vCPU leaves the session)

Keys and nonces. The transport key is HKDF-SHA256 of the master key (secret
entry ``MIGRATION_TRANSPORT_KEY_GUID``, 32 bytes, read from the secret area on
every command) with the migration id as salt. A nonce (stream, seq) is never
used twice under one key: a stream's counters start at 0 only when its
migration id changes, and a source's ids are random (drawn by the MH: an id a
host chose could be chosen twice, with different memory under the same
nonces); the sequence number is stored before the ciphertext leaves. A
completion record is sealed once per id (FINISH is refused in SENT, and
RESUME ends the session). An abort token has a fixed nonce but a key of its
own, derived with the aborting target's challenge: two targets of one
migration never seal under the same key and nonce, and one target's token is
the same bytes however often it is asked for.

One migration per target: the first target INIT, on MH vCPU 0, writes the
migration id into the session page; INIT with any other id, or on another MH
vCPU first, is -1. Version 1 needs the owner's opt-in (the secret entry
``MIGRATION_V1_ALLOWED_GUID``, one byte 1): without it a version-1 INIT is -2,
since version 1 has neither completion record nor run gate.

FINISH takes the target's challenge in its slot's data area, ``length`` =
``CHALLENGE_SIZE`` (16; any other length is -1 and changes nothing), and seals
it with every stream's totals into the completion record, and keeps it in the
session page (SENT). The source cannot check the challenge: whatever 16 bytes
the host gives are sealed. An abort token names the aborting target's
challenge; RESUME opens only a token naming the challenge FINISH sealed, so a
host cannot abort one target and complete another.

SEV-ES. The VMMs cannot read or set the guest's registers through KVM (they are in its
encrypted VMSAs), so the MH carries them, as the 2020 blueprint proposed. PARK
(source, SEV-ES only) closes the run gate with SAVING: each vCPU that runs the
kernel saves its registers into the save area (:mod:`confmig.guest.saved_state`)
at its next step and parks; PARK answers ``length`` 1 once all did, 0 before
(the VMM asks again, with a deadline). An SEV-ES guest's FINISH is -1 until
then, and seals the save area into the completion record: the vCPU state is
authenticated with the completion and cannot be left behind by a host that
skips a page. RESET on MH vCPU 0 of a parked guest opens the gate again (the
migration did not happen). A target's COMPLETE refuses a record whose vCPU
state does not match its own guest's kind (state for an SEV guest, none or a
wrong size for an SEV-ES one), and installs the state into its save area before
the session is RUNNING; its firmware, waiting in RESTORE, loads it then.

The run gate of a target is INCOMING from the first page any stream imports
(and again after the gate's own page arrives, whose copy is the source's), until
COMPLETE opens it or ABORT closes it for good: a reboot in between parks, so a
half-imported guest, perhaps with its source's secret area already, never boots.

What a target accepts. On stream ``i``, records of stream ``i`` only, with the
next sequence number, an epoch no older than the last, the stream's migration
id, a tag that verifies, and page-aligned GPAs in RAM (the boot info's map),
below 16 GiB and outside the MH's area, none twice, each on its own stream
(``proto.mailbox.stream_of``: chunks of 128 GFNs, round-robin over the streams,
the count the source's MH vCPU 0 was INITed with, sealed in
every record; one source session seals every record of a migration and a
target imports one migration, so the count is the same in all of them). Any
failure is -2 and nothing is written. A page has one stream, so its versions
arrive in its stream's order: a host cannot import an older version after a
newer one. COMPLETE accepts the source's completion record only if it was
sealed for this target's challenge (the session page's: the completion of a
recorded stream replayed to another target, or to this one after it booted
again, names another), every stream's records and pages match and every
private page (the page-state list as imported, RAM but the MH's area) was
imported in this migration. VERIFY makes those checks alone and changes
nothing, so that a VMM asks the owner to commit only for a migration its
target will take. COMPLETE's data is that record and, right after
it, the guest owner's commit grant (``proto.mailbox.commit_body``, sealed
under the migration's key with ``commit_purpose`` of this target's challenge):
the owner decides once per ticket whether the target runs (this grant) or the
source does (an abort token, byte for byte this MH's own, that the owner makes
when the target cannot), so a target and its source never both run.

Limits, honestly. The MH cannot see which pages the guest dirtied: a host that
skips a page's re-export leaves the target an older version of that page (the
guarantee is authenticity, binding to GPA, per-page order and that every
private page arrived). Version 1, where the owner allows it, has no completion record and
no run gate: a host that chooses it can start a target with pages missing, or
several targets, as under the RFC. The challenge is in
private memory that plain SEV does not protect from replay: a host that puts
back an older ciphertext of the session page puts back an older challenge, and
one that puts back a completed target's AWAITING session page gets that
target's abort token, which resumes the source while the target runs: plain
SEV cannot stop a fork by memory replay (SEV-SNP's RMP can).
RESET on a version-1 target that imported a page ends the import (the RFC's
cleanup): the guest may run from then on.
"""

from __future__ import annotations

import itertools
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confmig.common.units import PAGE_SHIFT, PAGE_SIZE, MemoryRange
from confmig.guest import gate, mem_encrypt, saved_state
from confmig.guest.firmware import bootinfo, secret
from confmig.guest.layout import (
    MH_AREA_GPA,
    MH_AREA_SIZE,
    MH_ENTRY,
    MH_IMPORTED_SIZE,
    MH_MAILBOX_GPA,
    MH_SESSION_GPA,
    MH_STATE_END,
    MH_VCPUS_MAX,
    PAGE_STATE_GPA,
    PAGE_STATE_LIMIT,
    RUN_GATE_GPA,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
    mh_imported,
    mh_vcpu_state,
)
from confmig.platform.cpu.abi import MSR_AMD64_SEV_ES_ENABLED, GuestCpu, GuestFault
from confmig.proto import mailbox as mb

TRANSPORT_KEY_SIZE: Final = 32
SESSION_MAGIC: Final = b"CMMHSES3"
NO_ID: Final = bytes(mb.MIGRATION_ID_SIZE)
NO_CHALLENGE: Final = bytes(mb.CHALLENGE_SIZE)
NO_TICKET: Final = bytes(mb.TICKET_SIZE)
NO_KEY: Final = bytes(TRANSPORT_KEY_SIZE)
_SESSION: Final = struct.Struct(
    f"<8sII{mb.MIGRATION_ID_SIZE}s{mb.CHALLENGE_SIZE}s{mb.TICKET_SIZE}s{TRANSPORT_KEY_SIZE}s")
_STREAM: Final = struct.Struct(f"<II16sQQQ{TRANSPORT_KEY_SIZE}s")
_BLOCK: Final = mb.COMMAND.size + mb.V2_FIELDS.size
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_PAGE_MASK: Final = np.uint64(PAGE_SIZE - 1)
_GATE_PAGE: Final = RUN_GATE_GPA & ~(PAGE_SIZE - 1)
_OK: Final = int(mb.MhReturn.SUCCESS)
_INVALID: Final = int(mb.MhReturn.INVALID_FUNC)
_REFUSED: Final = int(mb.MhReturn.AUTH_ERR)


class SessionPhase(IntEnum):
    RUNNING = 1
    SENT = 2
    AWAITING = 3
    ABORTED = 4


class StreamRole(IntEnum):
    NONE = 0
    V1_SOURCE = 1
    V1_TARGET = 2
    SOURCE = 3
    TARGET = 4


ID_ADOPTED: Final = 1 << 0
"""A version-1 target's stream took its migration id from the first record it opened."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    phase: SessionPhase
    migration_id: bytes = NO_ID
    challenge: bytes = NO_CHALLENGE
    """A target's own challenge (AWAITING; drawn by :func:`await_incoming`): the only one its
    COMPLETE accepts; in SENT, the one FINISH sealed. All zero in every other phase."""
    nstreams: int = 1
    """A source's streams (MH vCPU 0's INIT says how many): GFN ``g`` leaves on stream
    ``stream_of(g)`` only."""
    ticket: bytes = NO_TICKET
    """The owner's ticket: a source's, from its VMM at INIT (the target's, which that target
    published); a target's own, from its launch secret."""
    target_key: bytes = field(default=NO_KEY, repr=False)
    """A target's key for its ticket, from its launch secret (copied here at boot: the import
    overwrites the secret area with the source's)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stream:
    role: StreamRole = StreamRole.NONE
    flags: int = 0
    migration_id: bytes = NO_ID
    records: int = 0
    """Records sealed (source) or opened (target): the next sequence number."""
    pages: int = 0
    epoch: int = 0
    """The last record's epoch."""
    key: bytes = field(default=NO_KEY, repr=False)
    """A version-2 stream's transport key, derived at its INIT and kept here, in the MH's own
    private page (never exported by an MH), not derived again for every batch; forgotten
    when the session ends (FINISH, COMPLETE, ABORT) or the stream does (RESET)."""


# --- the firmware's part: preparing the area ------------------------------------------------------


def prepare(cpu: GuestCpu, mask: int) -> None:
    """At boot, after the mailboxes were made shared: every MH state page zero, the session
    RUNNING (RAM need not start zeroed, and a reboot finds the old state)."""
    npages = (MH_STATE_END - MH_SESSION_GPA) // PAGE_SIZE
    cpu.write_pages(MH_SESSION_GPA | mask, np.zeros((npages, PAGE_SIZE), np.uint8))
    _store_session(cpu, Session(phase=SessionPhase.RUNNING), mask)


def launch_ticket(cpu: GuestCpu, mask: int) -> tuple[bytes, bytes] | None:
    """The owner's migration ticket and its key, if the launch secret holds them: the owner
    launched this guest as a migration target."""
    area = cpu.read(SECRET_AREA_GPA | mask, SECRET_AREA_SIZE)
    table = secret.parse_secret_table(area)
    ticket = secret.find_entry(table, secret.MIGRATION_TICKET_GUID)
    key = secret.find_entry(table, secret.MIGRATION_TARGET_KEY_GUID)
    if ticket is None or key is None or ticket.length != mb.TICKET_SIZE or key.length != TRANSPORT_KEY_SIZE:
        return None
    return secret.entry_data(area, ticket), secret.entry_data(area, key)


def await_incoming(cpu: GuestCpu, mask: int) -> bool:
    """Target mode: this guest's memory may be imported, once (until COMPLETE or ABORT), if
    its owner launched it as a target (False if not: its launch secret has no ticket).

    Keeps the ticket's key in the session page, draws the target's challenge, keeps it there
    too and publishes challenge and ticket in MH vCPU 0's mailbox at
    :data:`~confmig.proto.mailbox.CHALLENGE_OFFSET` (shared), for the host to hand to the
    source. Called after the mailboxes were made shared and zeroed."""
    launched = launch_ticket(cpu, mask)
    if launched is None:
        return False
    ticket, key = launched
    challenge = secrets.token_bytes(mb.CHALLENGE_SIZE)  # RDRAND on hardware
    _store_session(cpu, Session(phase=SessionPhase.AWAITING, challenge=challenge, ticket=ticket,
                                target_key=key), mask)
    cpu.write(MH_MAILBOX_GPA + mb.CHALLENGE_OFFSET, challenge + ticket)  # shared: no C-bit
    return True


def load_session(cpu: GuestCpu, mask: int) -> Session | None:
    """The session page; None if the firmware never prepared one."""
    magic, phase, nstreams, migration_id, challenge, ticket, target_key = _SESSION.unpack(
        cpu.read(MH_SESSION_GPA | mask, _SESSION.size))
    if magic != SESSION_MAGIC or phase not in SessionPhase.__members__.values():
        return None
    return Session(phase=SessionPhase(phase), migration_id=migration_id, challenge=challenge,
                   ticket=ticket, target_key=target_key,
                   nstreams=max(nstreams, 1))


def _store_session(cpu: GuestCpu, s: Session, mask: int) -> None:
    cpu.write(MH_SESSION_GPA | mask,
              _SESSION.pack(SESSION_MAGIC, s.phase, s.nstreams, s.migration_id, s.challenge, s.ticket,
                            s.target_key))


def load_stream(cpu: GuestCpu, index: int, mask: int) -> Stream:
    role, flags, migration_id, records, pages, epoch, key = _STREAM.unpack(
        cpu.read(mh_vcpu_state(index) | mask, _STREAM.size))
    if role not in StreamRole.__members__.values():
        role = StreamRole.NONE
    return Stream(role=StreamRole(role), flags=flags, migration_id=migration_id, records=records,
                  pages=pages, epoch=epoch, key=key)


def _store_stream(cpu: GuestCpu, index: int, st: Stream, mask: int) -> None:
    cpu.write(mh_vcpu_state(index) | mask,
              _STREAM.pack(st.role, st.flags, st.migration_id, st.records, st.pages, st.epoch, st.key))


# --- one entry ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    """One command being served: where, by which MH vCPU, with which mask."""

    cpu: GuestCpu
    index: int
    mailbox: int
    block: int
    mask: int
    cmd: mb.Command
    session: Session
    """As the step found it (only MH vCPU 0 changes it, in its own commands)."""

    @property
    def data(self) -> int:
        """GPA of the slot's data area."""
        return self.mailbox + self.block + mb.SLOT_HEADER

    def stream(self, index: int | None = None) -> Stream:
        return load_stream(self.cpu, self.index if index is None else index, self.mask)

    def set_stream(self, st: Stream) -> None:
        _store_stream(self.cpu, self.index, st, self.mask)


@dataclass(frozen=True, slots=True)
class _Reply:
    ret: int
    length: int | None = None
    """A record's length in the slot's data area, when the command answers with one."""


def step(cpu: GuestCpu) -> None:
    """One entry of an MH vCPU: serve every block whose ``go`` is set, then halt."""
    index = cpu.vcpu_id
    cpu.regs.rip = MH_ENTRY
    if 0 <= index < MH_VCPUS_MAX:
        mask = mem_encrypt.encryption_mask(cpu)
        mailbox = MH_MAILBOX_GPA + index * mb.MAILBOX_STRIDE
        for block in (mb.CMD_OFFSET, *(mb.slot_offset(j) for j in range(mb.SLOTS))):
            _serve(cpu, index, mailbox, block, mask)
    cpu.hlt()  # the VMM enters us again when it has published a command


def _serve(cpu: GuestCpu, index: int, mailbox: int, block: int, mask: int) -> None:
    at = mailbox + block
    # SECURITY: the command block is the host's: every field is checked where it is used.
    cmd = mb.decode_command(cpu.read(at, _BLOCK))
    if cmd.go != 1:
        return
    reply = _dispatch(cpu, index, mailbox, block, mask, cmd)
    if reply.length is not None:
        cpu.write(at + mb.LENGTH_OFFSET, _U32.pack(reply.length))
    cpu.write(at + mb.RET_OFFSET, _I32.pack(reply.ret))
    cpu.write(at + mb.GO_OFFSET, _I32.pack(0))
    cpu.write(at + mb.DONE_OFFSET, _I32.pack(1))  # last: the VMM reads the answer after it


def _dispatch(cpu: GuestCpu, index: int, mailbox: int, block: int, mask: int,
              cmd: mb.Command) -> _Reply:
    session = load_session(cpu, mask) if mask else None
    if session is None:
        return _Reply(_INVALID)  # not an SEV guest, or a firmware that prepared no MH
    rule = _COMMANDS.get((block == mb.CMD_OFFSET, cmd.cmd))
    if rule is None or (rule.control and index != 0) or session.phase not in rule.phases:
        return _Reply(_INVALID)
    return rule.handler(_Call(cpu=cpu, index=index, mailbox=mailbox, block=block, mask=mask, cmd=cmd,
                              session=session))


# --- keys and records ----------------------------------------------------------------------------


def _master_key(call: _Call) -> bytes | None:
    """The guest's own transport key, from its secret area: its launch secret, or, on a target
    that completed, the secret its source was launched with (the page migrated)."""
    area = call.cpu.read(SECRET_AREA_GPA | call.mask, SECRET_AREA_SIZE)
    table = secret.parse_secret_table(area)
    entry = secret.find_entry(table, secret.MIGRATION_TRANSPORT_KEY_GUID)
    if entry is None or entry.length != TRANSPORT_KEY_SIZE:
        return None
    return secret.entry_data(area, entry)


def ticket_key(master: bytes, ticket: bytes) -> bytes:
    """The key of one migration ticket: what the owner's broker releases to that ticket's target
    (and to no other), and what a source derives from its own key for the ticket it is given."""
    return HKDF(algorithm=hashes.SHA256(), length=TRANSPORT_KEY_SIZE, salt=ticket,
                info=mb.TICKET_KDF_INFO).derive(master)


def _base_key(call: _Call, *, v1: bool) -> bytes | None:
    """What a migration's keys derive from: a target's ticket key (AWAITING, ABORTED); a
    source's key for the ticket its VMM named; version 1, the guest's own key."""
    if v1:
        return _master_key(call)
    s = call.session
    if s.phase in (SessionPhase.AWAITING, SessionPhase.ABORTED):
        return None if s.target_key == NO_KEY else s.target_key
    master = _master_key(call)
    if master is None or s.ticket == NO_TICKET:
        return None
    return ticket_key(master, s.ticket)


def _derive_key(call: _Call, migration_id: bytes, *, purpose: bytes = b"", v1: bool = False) -> bytes | None:
    """The migration's transport key; a ``purpose`` derives a key of its own (an abort token's
    names the target's challenge)."""
    base = _base_key(call, v1=v1)
    if base is None:
        return None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=TRANSPORT_KEY_SIZE, salt=migration_id,
                info=mb.TRANSPORT_KDF_INFO + purpose)
    return hkdf.derive(base)


def _transport_key(call: _Call, migration_id: bytes, *, purpose: bytes = b"",
                   v1: bool = False) -> AESGCM | None:
    """:func:`_derive_key`'s AEAD, derived afresh (for tokens and version 1; a version-2 stream's
    batches use the key its INIT kept, :func:`_stream_key`). No key object outlives the command."""
    key = _derive_key(call, migration_id, purpose=purpose, v1=v1)
    return None if key is None else AESGCM(key)


def _stream_key(st: Stream) -> AESGCM | None:
    """The AEAD of a version-2 stream's batches: the key its INIT derived."""
    return None if st.key == NO_KEY else AESGCM(st.key)


def _v1_allowed(call: _Call) -> bool:
    """The owner's opt-in to the RFC's version 1 (a secret-table entry; never the host's word)."""
    area = call.cpu.read(SECRET_AREA_GPA | call.mask, SECRET_AREA_SIZE)
    entry = secret.find_entry(secret.parse_secret_table(area), secret.MIGRATION_V1_ALLOWED_GUID)
    return entry is not None and secret.entry_data(area, entry) == b"\x01"


def _header(kind: mb.RecordKind, *, stream: int, seq: int, migration_id: bytes, epoch: int = 0,
            npages: int = 0, nzero: int = 0, body: int = 0, nstreams: int = 1) -> mb.RecordHeader:
    return mb.RecordHeader(mb.RECORD_VERSION, mb.ALG_AES_256_GCM, kind, stream, seq, epoch, npages,
                           nzero, body, nstreams, migration_id)


def _on_stream(gpas: npt.NDArray[np.uint64], stream: int, nstreams: int) -> bool:
    """Every page's GFN belongs to ``stream``: a page has one stream, whose sequence orders its
    versions (two streams could otherwise deliver an old version after a new one)."""
    if not 0 <= stream < nstreams:
        return False
    return bool((mb.stream_of(gpas >> np.uint64(PAGE_SHIFT), nstreams) == stream).all())


def _seal(aead: AESGCM, header: mb.RecordHeader, entries: npt.NDArray[np.uint64],
          plaintext: bytes) -> bytes:
    head = header.pack() + entries.astype("<u8").tobytes()
    return head + aead.encrypt(mb.nonce(header.stream, header.seq), plaintext, head)


def _seal_into(call: _Call, aead: AESGCM, header: mb.RecordHeader, entries: npt.NDArray[np.uint64],
               plaintext: npt.NDArray[np.uint8]) -> int:
    """:func:`_seal` into the slot's data area, from the plaintext where it lies; returns the
    record's length."""
    head = header.pack() + entries.astype("<u8").tobytes()
    record = np.empty(len(head) + plaintext.nbytes + mb.TAG_SIZE, np.uint8)
    record[: len(head)] = np.frombuffer(head, np.uint8)
    # SECURITY: sealed in the MH's own memory, then copied out once. A cipher may read its
    # output back to hash it (OpenSSL's generic GCM does); in the shared slot, the host could
    # change the ciphertext between the write and the read and have its bytes authenticated.
    aead.encrypt_into(mb.nonce(header.stream, header.seq), plaintext.data, head, record[len(head) :].data)
    call.cpu.write(call.data, record.data)
    return len(record)


def _unseal(aead: AESGCM, record: bytes, header: mb.RecordHeader) -> bytes | None:
    aad = mb.associated_data(record, header)
    try:
        return aead.decrypt(mb.nonce(header.stream, header.seq), record[len(aad) :], aad)
    except InvalidTag:
        return None


def _unseal_into(aead: AESGCM, record: bytes, header: mb.RecordHeader, out: npt.NDArray[np.uint8]) -> bool:
    """Open a record's body into ``out``, which must be its plaintext's size."""
    aad = mb.associated_data(record, header)
    if len(record) - len(aad) != out.nbytes + mb.TAG_SIZE:
        return False
    try:
        aead.decrypt_into(mb.nonce(header.stream, header.seq), memoryview(record)[len(aad) :], aad, out.data)
    except InvalidTag:
        return False
    return True


def _token(call: _Call, record: bytes, kind: mb.RecordKind, stream: int,
           migration_id: bytes, *, purpose: bytes = b"") -> bytes | None:
    """The body of a token (a record without pages), if it is the one expected and genuine."""
    try:
        header = mb.decode_record_header(record)
    except mb.MailboxError:
        return None
    if (header.kind != kind or header.stream != stream or header.seq != 0 or header.npages != 0
            or header.migration_id != migration_id):
        return None
    aead = _transport_key(call, migration_id, purpose=purpose)
    return None if aead is None else _unseal(aead, record, header)


def _read_record(call: _Call) -> bytes | None:
    """The record the host put in the slot's data area, copied once (what is checked is what
    is used)."""
    # SECURITY: the length is the host's; a record is at least a header and fits the area.
    if not mb.RECORD_HEADER.size <= call.cmd.length <= mb.SLOT_DATA:
        return None
    return call.cpu.read(call.data, call.cmd.length)


# --- addresses -----------------------------------------------------------------------------------


def _ram(call: _Call) -> list[MemoryRange] | None:
    try:
        return bootinfo.load_ram(call.cpu, call.mask)
    except GuestFault:
        return None  # no sealed boot info: the guest knows no RAM map


def _valid_gpas(gpas: npt.NDArray[np.uint64], ram: list[MemoryRange]) -> bool:
    """Whole pages of RAM below 16 GiB, outside the MH's area, none twice."""
    # SECURITY: GPAs come from the host (EXPORT) or from the stream (IMPORT).
    if len(gpas) == 0 or (gpas & _PAGE_MASK).any() or (gpas >= PAGE_STATE_LIMIT).any():
        return False
    if ((gpas >= MH_AREA_GPA) & (gpas < MH_AREA_GPA + MH_AREA_SIZE)).any():
        return False
    inside = np.zeros(len(gpas), np.bool_)
    for r in ram:
        inside |= (gpas >= r.start) & (gpas + PAGE_SIZE <= r.end)
    if not inside.all():
        return False
    # A rising list (what a VMM's dirty-page scan gives) has no page twice; any other is sorted.
    return bool((gpas[1:] > gpas[:-1]).all()) or len(np.unique(gpas)) == len(gpas)


def _runs(gpas: npt.NDArray[np.int64], ram: list[MemoryRange]) -> list[tuple[int, int]]:
    """``(first index, count)`` of the list's runs of consecutive pages within one RAM range."""
    cut = np.diff(gpas) != PAGE_SIZE
    for r in ram:  # a handful of ranges: cheaper than np.isin's sort
        cut |= gpas[1:] == r.start
    breaks = [0, *(np.flatnonzero(cut) + 1).tolist(), len(gpas)]
    return [(a, b - a) for a, b in itertools.pairwise(breaks)]


def _read_pages(call: _Call, gpas: npt.NDArray[np.int64], ram: list[MemoryRange]) -> npt.NDArray[np.uint8]:
    pages = np.empty((len(gpas), PAGE_SIZE), np.uint8)
    for first, n in _runs(gpas, ram):
        call.cpu.read_pages(int(gpas[first]) | call.mask, n, out=pages[first : first + n])
    return pages


def _write_pages(call: _Call, gpas: npt.NDArray[np.int64], pages: npt.NDArray[np.uint8],
                 ram: list[MemoryRange]) -> None:
    for first, n in _runs(gpas, ram):
        call.cpu.write_pages(int(gpas[first]) | call.mask, pages[first : first + n])


# --- INIT and RESET ------------------------------------------------------------------------------


def _init(call: _Call) -> _Reply:
    s = call.session
    hdr = call.mailbox + mb.IO_HDR_OFFSET
    (length,) = _U32.unpack(call.cpu.read(hdr, 4))
    # SECURITY: the io header's length is the host's.
    if length > mb.IO_HDR_MAX:
        return _Reply(_INVALID)
    # A version-1 client never writes the io header before INIT: what it holds then (an
    # earlier ENCRYPT's record) is not parameters. Only the v2 parameters' size is read as such.
    params = call.cpu.read(hdr + 4, length) if length == mb.INIT_PARAMS.size else b""
    try:
        init = mb.decode_init(params)
    except mb.MailboxError:
        return _Reply(_INVALID)
    role, migration_id = init.role, init.migration_id
    st = call.stream()
    if role == mb.Role.V1:
        return _init_v1(call, s, st)
    if role == mb.Role.SOURCE:
        ticket = migration_id  # a source's INIT names the target's ticket; its answer, the session
        if s.phase != SessionPhase.RUNNING or ticket == NO_TICKET:
            return _Reply(_INVALID)
        if call.index == 0:
            migration_id = secrets.token_bytes(mb.MIGRATION_ID_SIZE)  # RDRAND on hardware
            s = Session(phase=SessionPhase.RUNNING, migration_id=migration_id, nstreams=init.nstreams,
                        ticket=ticket)
        elif s.migration_id == NO_ID or ticket != s.ticket:
            return _Reply(_INVALID)  # MH vCPU 0 opens a source's session; the others join it
        else:
            migration_id = s.migration_id
        key = _derive_key(replace(call, session=s), migration_id)
        if key is None:
            return _Reply(_REFUSED)
        if call.index == 0:
            _store_session(call.cpu, s, call.mask)
            nstreams = init.nstreams
        else:
            nstreams = s.nstreams  # the session's, whatever this INIT said
        if call.index >= nstreams:
            return _Reply(_INVALID)  # no stream of this session
        call.set_stream(_adopt(st, StreamRole.SOURCE, migration_id, key))
        reply = mb.encode_init(mb.Role.SOURCE, migration_id, nstreams)
        call.cpu.write(hdr, _U32.pack(len(reply)) + reply)
        return _Reply(_OK)
    if s.phase != SessionPhase.AWAITING:
        return _Reply(_INVALID)  # only a target-mode guest, which never ran, is imported into
    # One migration per target: MH vCPU 0's INIT names it (the session page), the others join
    # it. Streams of two migrations could otherwise mix an old page into a later one.
    if s.migration_id != NO_ID and s.migration_id != migration_id:
        return _Reply(_INVALID)
    if s.migration_id == NO_ID and call.index != 0:
        return _Reply(_INVALID)  # MH vCPU 0 names the target's migration; the others join it
    key = _derive_key(call, migration_id)
    if key is None:
        return _Reply(_REFUSED)
    if s.migration_id == NO_ID:
        _store_session(call.cpu, replace(s, migration_id=migration_id), call.mask)
    if st.migration_id != migration_id:
        _clear_imported(call)
    call.set_stream(_adopt(st, StreamRole.TARGET, migration_id, key))
    call.cpu.write(hdr, _U32.pack(0))  # consumed: a later version-1 INIT must not find it
    return _Reply(_OK)


def _init_v1(call: _Call, s: Session, st: Stream) -> _Reply:
    """The RFC's INIT: a source if the guest runs here, a target if it awaits its import."""
    if call.index != 0:
        return _Reply(_INVALID)
    if not _v1_allowed(call):
        return _Reply(_REFUSED)  # the owner did not accept version 1's missing guarantees
    if s.phase == SessionPhase.AWAITING and s.migration_id != NO_ID:
        return _Reply(_INVALID)  # a version-2 migration named this target already
    if s.phase == SessionPhase.RUNNING:
        migration_id = secrets.token_bytes(mb.MIGRATION_ID_SIZE)
        if _transport_key(call, migration_id, v1=True) is None:
            return _Reply(_REFUSED)
        call.set_stream(Stream(role=StreamRole.V1_SOURCE, migration_id=migration_id))
        return _Reply(_OK)
    if s.phase == SessionPhase.AWAITING:
        if _transport_key(call, NO_ID, v1=True) is None:
            return _Reply(_REFUSED)
        if st.flags & ID_ADOPTED:  # named by a record already: its counters go on
            call.set_stream(replace(st, role=StreamRole.V1_TARGET))
        else:
            call.set_stream(Stream(role=StreamRole.V1_TARGET))  # the first record names the migration
        return _Reply(_OK)
    return _Reply(_INVALID)


def _adopt(st: Stream, role: StreamRole, migration_id: bytes, key: bytes) -> Stream:
    """The stream under ``migration_id`` and its ``key``: its counters go on if it was already
    that migration's (a nonce is never reused, a record never opened twice), else start at 0."""
    if st.migration_id == migration_id:
        return replace(st, role=role, key=key)
    return Stream(role=role, migration_id=migration_id, key=key)


def _forget_stream_keys(call: _Call) -> None:
    """The session is over (FINISH, COMPLETE, ABORT): no stream seals or opens a batch again,
    so none keeps its key (the counters stay: FINISH's totals and a later INIT's read them)."""
    for i in range(MH_VCPUS_MAX):
        st = call.stream(i)
        if st.key != NO_KEY:
            _store_stream(call.cpu, i, replace(st, key=NO_KEY), call.mask)


def _clear_imported(call: _Call) -> None:
    npages = MH_IMPORTED_SIZE // PAGE_SIZE
    call.cpu.write_pages(mh_imported(call.index) | call.mask, np.zeros((npages, PAGE_SIZE), np.uint8))


def _reset(call: _Call) -> _Reply:
    """The RFC's cleanup: this MH vCPU leaves the session. A version-1 target that imported
    a page has finished its import (the RFC has no other end). The counters stay."""
    s = call.session
    st = call.stream()
    if (st.role == StreamRole.V1_TARGET and st.flags & ID_ADOPTED
            and s.phase == SessionPhase.AWAITING):
        _store_session(call.cpu, Session(phase=SessionPhase.RUNNING), call.mask)
    if (call.index == 0 and s.phase == SessionPhase.RUNNING
            and gate.load(call.cpu, call.mask) == gate.SAVING):
        gate.store(call.cpu, gate.OPEN, call.mask)  # PARK's migration did not happen: run on
    call.set_stream(replace(st, role=StreamRole.NONE, key=NO_KEY))
    return _Reply(_OK)


# --- version 1: one page through the io header and io page ---------------------------------------


def _encrypt(call: _Call) -> _Reply:
    st = call.stream()
    if st.role != StreamRole.V1_SOURCE:
        return _Reply(_INVALID)
    gpas = np.array([call.cmd.gpa], np.uint64)
    sealer = _sealer(call, gpas, st)
    if sealer is None:
        return _Reply(_REFUSED)
    aead, _ram_map = sealer
    page = call.cpu.read_pages(call.cmd.gpa | call.mask, 1)
    header = _header(mb.RecordKind.PAGES, stream=mb.V1_STREAM, seq=st.records,
                     migration_id=st.migration_id, npages=1)
    call.set_stream(replace(st, records=st.records + 1, pages=st.pages + 1))  # the nonce is spent
    io_header, io_page = mb.split_v1_record(_seal(aead, header, gpas, page.tobytes()))
    call.cpu.write(call.mailbox + mb.IO_HDR_OFFSET, _U32.pack(len(io_header)) + io_header)
    call.cpu.write(call.mailbox + mb.IO_PAGE_OFFSET, io_page)
    return _Reply(_OK)


def _decrypt(call: _Call) -> _Reply:
    st = call.stream()
    if st.role != StreamRole.V1_TARGET:
        return _Reply(_INVALID)
    hdr = call.mailbox + mb.IO_HDR_OFFSET
    (length,) = _U32.unpack(call.cpu.read(hdr, 4))
    # SECURITY: the io header's length is the host's.
    if length > mb.IO_HDR_MAX:
        return _Reply(_INVALID)
    if length != mb.V1_IO_HDR_LEN:
        return _Reply(_REFUSED)
    record = mb.join_v1_record(call.cpu.read(hdr + 4, length),
                               call.cpu.read(call.mailbox + mb.IO_PAGE_OFFSET, PAGE_SIZE))
    adopted = bool(st.flags & ID_ADOPTED)
    opened = _open_pages(call, record, st, stream=mb.V1_STREAM,
                         migration_id=st.migration_id if adopted else None)
    if opened is None:
        return _Reply(_REFUSED)
    header, gpas, pages, ram = opened
    if header.npages != 1 or header.nzero != 0 or int(gpas[0]) != call.cmd.gpa:
        return _Reply(_REFUSED)  # the record is for another page: a swap
    _write_pages(call, gpas, pages, ram)
    call.set_stream(replace(st, flags=st.flags | ID_ADOPTED, migration_id=header.migration_id,
                            records=st.records + 1, pages=st.pages + 1, epoch=header.epoch))
    return _Reply(_OK)


# --- version 2: batches --------------------------------------------------------------------------


def _shared(call: _Call, gpas: npt.NDArray[np.uint64]) -> bool:
    gfns = (gpas >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    return bool(mem_encrypt.shared_pages(call.cpu, gfns, call.mask).any())


def _sealer(call: _Call, gpas: npt.NDArray[np.uint64],
            st: Stream) -> tuple[AESGCM, list[MemoryRange]] | None:
    """The migration's AEAD and the RAM map, if every page of ``gpas`` may leave: RAM the guest
    keeps private, not the MH's own. A host that calls a private page shared, or asks for the
    MH's area, gets a refusal."""
    ram = _ram(call)
    if ram is None or not _valid_gpas(gpas, ram) or _shared(call, gpas):
        return None
    v1 = st.role == StreamRole.V1_SOURCE
    aead = _transport_key(call, st.migration_id, v1=True) if v1 else _stream_key(st)
    return None if aead is None else (aead, ram)


def _export(call: _Call) -> _Reply:
    s = call.session
    st = call.stream()
    cmd = call.cmd
    if st.role != StreamRole.SOURCE or st.migration_id != s.migration_id:
        return _Reply(_INVALID)  # no session, or an old one
    # SECURITY: npages and epoch are the host's.
    if not 0 < cmd.npages <= mb.BATCH_PAGES or cmd.epoch < st.epoch:
        return _Reply(_INVALID)
    gpas = np.frombuffer(call.cpu.read(call.data, 8 * cmd.npages), "<u8").astype(np.uint64)
    sealer = _sealer(call, gpas, st) if _on_stream(gpas, call.index, s.nstreams) else None
    if sealer is None:
        return _Reply(_REFUSED)
    aead, ram = sealer
    addresses = gpas.astype(np.int64)
    pages = _read_pages(call, addresses, ram)
    zero = ~pages.view(np.uint64).any(axis=1)  # by words: a few times faster than by bytes
    entries = gpas | zero.astype(np.uint64) * np.uint64(mb.ZERO_FLAG)
    header = _header(mb.RecordKind.PAGES, stream=call.index, seq=st.records,
                     migration_id=st.migration_id, epoch=cmd.epoch, npages=cmd.npages,
                     nzero=int(zero.sum()), nstreams=s.nstreams)
    call.set_stream(replace(st, records=st.records + 1, pages=st.pages + cmd.npages, epoch=cmd.epoch))
    length = _seal_into(call, aead, header, entries, pages[~zero] if header.nzero else pages)  # seq spent
    return _Reply(_OK, length)


_Opened = tuple[mb.RecordHeader, npt.NDArray[np.int64], npt.NDArray[np.uint8], list[MemoryRange]]


def _open_pages(call: _Call, record: bytes, st: Stream, *, stream: int,
                migration_id: bytes | None) -> _Opened | None:
    """A page record checked whole before anything is written: ``(header, GPAs, pages, RAM)``.
    ``migration_id`` None: a version-1 target's first record, which names the migration."""
    # SECURITY: the record is the host's until its tag verifies, and its GPAs are checked
    # even then (a source MH checks them too, but the target trusts no other machine).
    try:
        header = mb.decode_record_header(record)
    except mb.MailboxError:
        return None
    if (header.kind != mb.RecordKind.PAGES or header.stream != stream or header.body != 0
            or header.npages == 0 or header.seq != st.records or header.epoch < st.epoch):
        return None  # another stream's, a replay, a reordering, a drop, or an old epoch
    if migration_id is not None and header.migration_id != migration_id:
        return None
    entries = mb.gpa_entries(record, header)
    flags = entries & _PAGE_MASK
    if (flags & ~np.uint64(mb.ZERO_FLAG)).any():
        return None
    zero = flags == np.uint64(mb.ZERO_FLAG)
    gpas = entries & ~_PAGE_MASK
    if stream != mb.V1_STREAM and not _on_stream(gpas, stream, header.nstreams):
        return None  # a page on a stream that is not its own
    ram = _ram(call)
    if int(zero.sum()) != header.nzero or ram is None or not _valid_gpas(gpas, ram):
        return None
    # A version-2 stream's migration id is the record's (checked above): its key is the one.
    v1 = stream == mb.V1_STREAM
    aead = _transport_key(call, header.migration_id, v1=True) if v1 else _stream_key(st)
    plain = np.empty((header.data_pages, PAGE_SIZE), np.uint8)
    if aead is None or not _unseal_into(aead, record, header, plain):
        return None
    if header.nzero:
        pages = np.zeros((header.npages, PAGE_SIZE), np.uint8)
        pages[~zero] = plain
    else:
        pages = plain
    return header, gpas.astype(np.int64), pages, ram


def _import(call: _Call) -> _Reply:
    st = call.stream()
    if st.role != StreamRole.TARGET:
        return _Reply(_INVALID)  # before INIT
    record = _read_record(call)
    if record is None:
        return _Reply(_INVALID)
    opened = _open_pages(call, record, st, stream=call.index, migration_id=st.migration_id)
    if opened is None:
        return _Reply(_REFUSED)
    header, gpas, pages, ram = opened
    if st.records == 0:
        # Not the guest's until COMPLETE, from the first page written: the source's secret area
        # may arrive before the page with the gate, and a reboot in between must not boot it.
        gate.store(call.cpu, gate.INCOMING, call.mask)
    _write_pages(call, gpas, pages, ram)
    mem_encrypt.set_bitmap_bits(call.cpu, mh_imported(call.index), gpas >> PAGE_SHIFT, call.mask)
    if (gpas == _GATE_PAGE).any():
        gate.store(call.cpu, gate.INCOMING, call.mask)  # the imported copy holds the source's
    call.set_stream(replace(st, records=st.records + 1, pages=st.pages + header.npages,
                            epoch=header.epoch))
    return _Reply(_OK)


# --- the end of a migration ----------------------------------------------------------------------


def _totals(call: _Call, migration_id: bytes) -> list[mb.StreamTotal]:
    totals = []
    for i in range(MH_VCPUS_MAX):
        st = call.stream(i)
        mine = st.migration_id == migration_id
        totals.append(mb.StreamTotal(stream=i, records=st.records if mine else 0,
                                     pages=st.pages if mine else 0))
    return totals


def _sev_es(call: _Call) -> bool:
    """This guest's registers are in encrypted VMSAs: they migrate through the MH."""
    return bool(mem_encrypt.sev_status(call.cpu) & MSR_AMD64_SEV_ES_ENABLED)


def _park(call: _Call) -> _Reply:
    """SEV-ES: ask the guest's vCPUs to save their registers and park (the gate SAVING). The
    answer's length is 1 once every vCPU that runs the kernel did, 0 before: ask again."""
    s = call.session
    st = call.stream()
    if st.role != StreamRole.SOURCE or st.migration_id != s.migration_id or not _sev_es(call):
        return _Reply(_INVALID)
    if gate.load(call.cpu, call.mask) != gate.SAVING:
        saved_state.clear_all(call.cpu, call.mask)  # only what the vCPUs save from now on counts
        gate.store(call.cpu, gate.SAVING, call.mask)
    return _Reply(_OK, int(saved_state.all_saved(call.cpu, call.mask)))


def _saved_vcpus(call: _Call) -> bytes | None:
    """What FINISH seals of the guest's vCPUs: SEV-ES, the save area once every vCPU parked
    (None before: FINISH must wait for PARK); SEV, nothing (the VMM moves the registers)."""
    if not _sev_es(call):
        return b""
    if gate.load(call.cpu, call.mask) != gate.SAVING or not saved_state.all_saved(call.cpu, call.mask):
        return None
    return saved_state.carried(call.cpu, call.mask)


def _finish(call: _Call) -> _Reply:
    s = call.session
    st = call.stream()
    if st.role != StreamRole.SOURCE or st.migration_id != s.migration_id:
        return _Reply(_INVALID)
    vcpu_state = _saved_vcpus(call)
    if vcpu_state is None:
        return _Reply(_INVALID)  # an SEV-ES guest whose vCPUs did not park (PARK first)
    # SECURITY: the length is the host's; the challenge's bytes are whatever the host says
    # (a target accepts only its own).
    if call.cmd.length != mb.CHALLENGE_SIZE:
        return _Reply(_INVALID)
    challenge = call.cpu.read(call.data, mb.CHALLENGE_SIZE)  # copied once: what is sealed
    aead = _transport_key(call, s.migration_id)
    if aead is None:
        return _Reply(_REFUSED)
    body = mb.encode_completion(mb.Completion(challenge, _totals(call, s.migration_id), vcpu_state))
    header = _header(mb.RecordKind.COMPLETION, stream=mb.COMPLETION_STREAM, seq=0,
                     migration_id=s.migration_id, body=len(body))
    # The guest stops here before its sealed state can leave: no fork. The challenge stays,
    # for RESUME: only that target's abort token lets the guest run here again.
    _store_session(call.cpu, replace(s, phase=SessionPhase.SENT, challenge=challenge), call.mask)
    gate.store(call.cpu, gate.MIGRATED_AWAY, call.mask)
    record = _seal(aead, header, np.zeros(0, np.uint64), body)
    _forget_stream_keys(call)
    call.cpu.write(call.data, record)
    return _Reply(_OK, len(record))


def _verify(call: _Call) -> _Reply:
    """Every check of COMPLETE on the completion record alone; nothing changes."""
    if call.stream().role != StreamRole.TARGET:
        return _Reply(_INVALID)
    record = _read_record(call)
    if record is None:
        return _Reply(_INVALID)
    checked = _check_completion(call, record)
    return checked if isinstance(checked, _Reply) else _Reply(_OK)


def _complete(call: _Call) -> _Reply:
    """VERIFY's checks, then the owner's commit grant after the record: the guest may run here."""
    if call.stream().role != StreamRole.TARGET:
        return _Reply(_INVALID)
    data = _read_record(call)
    if data is None:
        return _Reply(_INVALID)
    try:
        record, grant = mb.split_records(data)
    except (mb.MailboxError, ValueError):  # not two records
        return _Reply(_INVALID)
    checked = _check_completion(call, record)
    if isinstance(checked, _Reply):
        return checked
    # The owner's word: without its grant this target never runs the guest, so that the owner
    # can give the source an abort token instead (one decision per ticket).
    s = call.session
    granted = _token(call, grant, mb.RecordKind.COMMIT, mb.COMMIT_STREAM, call.stream().migration_id,
                     purpose=mb.commit_purpose(s.challenge))
    if granted != mb.commit_body(s.challenge):
        return _Reply(_REFUSED)
    if checked.vcpu_state:
        saved_state.put_carried(call.cpu, checked.vcpu_state, call.mask)  # the firmware loads it next
    _store_session(call.cpu, Session(phase=SessionPhase.RUNNING), call.mask)
    _forget_stream_keys(call)
    gate.store(call.cpu, gate.OPEN, call.mask)  # whatever the imported copy of its page said
    return _Reply(_OK)


def _check_completion(call: _Call, record: bytes) -> mb.Completion | _Reply:
    """The source's completion record, if it is genuine, sealed for this target and matched by
    what arrived (every record, every private page, the vCPU state of this kind of guest)."""
    s = call.session
    st = call.stream()
    if s.challenge == NO_CHALLENGE:
        return _Reply(_REFUSED)
    body = _token(call, record, mb.RecordKind.COMPLETION, mb.COMPLETION_STREAM, st.migration_id)
    if body is None:
        return _Reply(_REFUSED)
    try:
        sent = mb.decode_completion(body)
    except mb.MailboxError:
        return _Reply(_REFUSED)
    if sent.challenge != s.challenge:
        return _Reply(_REFUSED)  # sealed for another target (or another boot of this one)
    want = {t.stream: (t.records, t.pages) for t in sent.totals}
    if len(want) != len(sent.totals) or any(want[i] != (0, 0) for i in want if i >= MH_VCPUS_MAX):
        return _Reply(_REFUSED)
    have = _totals(call, st.migration_id)
    if any(want.get(t.stream, (0, 0)) != (t.records, t.pages) for t in have):
        return _Reply(_REFUSED)  # a record dropped, or one the source never counted
    if not _every_private_page_imported(call, st.migration_id):
        return _Reply(_REFUSED)
    if len(sent.vcpu_state) != (saved_state.CARRIED_SIZE if _sev_es(call) else 0):
        return _Reply(_REFUSED)  # an SEV-ES guest needs its vCPUs' state; an SEV one has none here
    return sent


def _every_private_page_imported(call: _Call, migration_id: bytes) -> bool:
    """Every page of RAM that the page-state list (as imported) calls private, but the MH's
    area, was imported in this migration by one stream or another."""
    ram = _ram(call)
    if not ram:
        return False
    top = max(r.end for r in ram)
    if top > PAGE_STATE_LIMIT:
        return False  # pages the MH never moves: it cannot vouch for them
    ngfns = -(-top // PAGE_SIZE)
    nbytes = -(-ngfns // 8)
    span = -(-nbytes // PAGE_SIZE) * PAGE_SIZE

    def bits(base: int) -> npt.NDArray[np.bool_]:
        raw = np.frombuffer(call.cpu.read(base | call.mask, span), np.uint8)
        return np.unpackbits(raw, bitorder="little")[:ngfns].astype(np.bool_)

    need = np.zeros(ngfns, np.bool_)
    for r in ram:
        need[r.start >> PAGE_SHIFT : r.end >> PAGE_SHIFT] = True
    need[MH_AREA_GPA >> PAGE_SHIFT : (MH_AREA_GPA + MH_AREA_SIZE) >> PAGE_SHIFT] = False
    need &= ~bits(PAGE_STATE_GPA)
    for i in range(MH_VCPUS_MAX):
        if call.stream(i).migration_id == migration_id:
            need &= ~bits(mh_imported(i))
    return not need.any()


def _abort(call: _Call) -> _Reply:
    s = call.session
    st = call.stream()
    if st.role != StreamRole.TARGET:
        return _Reply(_INVALID)
    if s.phase == SessionPhase.ABORTED and s.migration_id != st.migration_id:
        return _Reply(_INVALID)  # another migration's token
    aead = _transport_key(call, st.migration_id, purpose=mb.abort_purpose(s.challenge))
    if aead is None:
        return _Reply(_REFUSED)
    _store_session(call.cpu, replace(s, phase=SessionPhase.ABORTED, migration_id=st.migration_id),
                   call.mask)  # the same token again
    gate.store(call.cpu, gate.ABORTED, call.mask)
    body = mb.abort_body(s.challenge)
    header = _header(mb.RecordKind.ABORT, stream=mb.ABORT_STREAM, seq=0,
                     migration_id=st.migration_id, body=len(body))
    token = _seal(aead, header, np.zeros(0, np.uint64), body)  # the same every time
    _forget_stream_keys(call)
    call.cpu.write(call.data, token)
    return _Reply(_OK, len(token))


def _resume(call: _Call) -> _Reply:
    s = call.session
    record = _read_record(call)
    if record is None:
        return _Reply(_INVALID)
    body = _token(call, record, mb.RecordKind.ABORT, mb.ABORT_STREAM, s.migration_id,
                  purpose=mb.abort_purpose(s.challenge))
    # Only the target FINISH sealed the guest for may give it back: another target's token
    # (same key, same migration) would let a host abort one and complete the other.
    if s.challenge == NO_CHALLENGE or body != mb.abort_body(s.challenge):
        return _Reply(_REFUSED)
    _store_session(call.cpu, Session(phase=SessionPhase.RUNNING), call.mask)  # this session is over
    gate.store(call.cpu, gate.OPEN, call.mask)
    call.set_stream(replace(call.stream(), role=StreamRole.NONE, key=NO_KEY))  # FINISH forgot it
    return _Reply(_OK)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Rule:
    handler: Callable[[_Call], _Reply]
    phases: frozenset[SessionPhase]
    """The session phases in which the command may run (else -1)."""
    control: bool = False
    """Only MH vCPU 0 serves it: it writes the session page."""


_ANY: Final = frozenset(SessionPhase)
_RUNNING: Final = frozenset({SessionPhase.RUNNING})
_AWAITING: Final = frozenset({SessionPhase.AWAITING})
_COMMANDS: Final[dict[tuple[bool, int], _Rule]] = {
    # (in the v1 block?, command): the rule
    (True, mb.MhCommand.INIT): _Rule(handler=_init, phases=_RUNNING | _AWAITING),
    (True, mb.MhCommand.RESET): _Rule(handler=_reset, phases=_ANY),
    (True, mb.MhCommand.ENCRYPT): _Rule(handler=_encrypt, phases=_RUNNING, control=True),
    (True, mb.MhCommand.DECRYPT): _Rule(handler=_decrypt, phases=_AWAITING, control=True),
    (False, mb.MhCommand.EXPORT): _Rule(handler=_export, phases=_RUNNING),
    (False, mb.MhCommand.IMPORT): _Rule(handler=_import, phases=_AWAITING),
    (False, mb.MhCommand.PARK): _Rule(handler=_park, phases=_RUNNING, control=True),
    (False, mb.MhCommand.FINISH): _Rule(handler=_finish, phases=_RUNNING, control=True),
    (False, mb.MhCommand.VERIFY): _Rule(handler=_verify, phases=_AWAITING, control=True),
    (False, mb.MhCommand.COMPLETE): _Rule(handler=_complete, phases=_AWAITING, control=True),
    (False, mb.MhCommand.ABORT): _Rule(
        handler=_abort, phases=_AWAITING | {SessionPhase.ABORTED}, control=True),
    (False, mb.MhCommand.RESUME): _Rule(handler=_resume, phases=frozenset({SessionPhase.SENT}),
                                        control=True),
}
