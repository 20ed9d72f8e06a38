"""The Migration Handler's mailbox: shared guest pages through which a VMM drives the MH.

Sans-IO: layouts, codecs and checks only. The VMM (untrusted) and the MH in the
guest firmware (trusted) both import this module; neither trusts what the
other wrote, so every decoder here bounds what it reads.

Where it is. The firmware image's GUIDed table (migration handler block,
:mod:`confmig.guest.firmware.image`) gives the MH entry point, the mailbox's
guest-physical base and its size; nothing is hard-coded in the VMM (the 2021
RFC hard-coded 0x820000). Each MH vCPU ``i`` (a vCPU of the mirror VM) owns
the mailbox at ``base + i * MAILBOX_STRIDE``.

Protocol version 1 (the RFC's layout, exactly; little-endian, packed)::

    +0x000  command block, 32 bytes:
            u64 cmd | u64 gpa | i32 prefetch | i32 ret | i32 go | i32 done
    +0x800  io header: u32 len | len bytes (len <= 1024)
    +0x1000 io page: 4096 bytes

    commands INIT 0, ENCRYPT 1, DECRYPT 2, RESET 3; returns 0 ok, -1 invalid
    function, -2 authentication error. The VMM writes the parameters, then
    ``done = 0``, ``ret = -1`` and last ``go = 1``; the MH clears ``go`` and sets
    ``done`` last.

Protocol version 2 (confmig's): the same page 0 plus :data:`SLOTS` slots, each
a command block of its own with a batch of up to :data:`BATCH_PAGES` pages::

    slot j at +SLOT0 + j * SLOT_STRIDE:
      +0x000  command block (as v1) followed by the v2 fields:
              +0x20 u32 npages | u32 length (record bytes in the data area)
              | u64 epoch
      +0x1000 data area, SLOT_DATA bytes: a GPA list (EXPORT, request) or a
              sealed record (EXPORT reply, IMPORT request, FINISH/COMPLETE
              tokens)

The MH serves every slot whose ``go`` is set each time it is entered, then
halts to the host (HLT exit); the VMM kicks it by entering it again (KVM_RUN).
So one slot can be sent while the MH fills the next, and several MH vCPUs
serve several channels.

Sealed records (v2 EXPORT/IMPORT, and v1 ENCRYPT/DECRYPT with one page). A
record is what travels in the migration stream, opaque to the host::

    header, 56 bytes: u8 version (2) | u8 alg (1: AES-256-GCM) | u16 kind
        | u32 stream | u64 seq | u64 epoch | u32 npages | u32 nzero
        | u32 body | u32 nstreams | 16 bytes migration id
    npages entries u64: GPA | 1 if the page is zero (then it carries no data)
    ciphertext: the non-zero pages in list order, then ``body`` bytes (a
        token's contents: :class:`RecordKind`)
    16-byte GCM tag

The AEAD's associated data is the header and the GPA list; the nonce is
``u32 stream | u64 seq`` (unique per key: a key serves one migration). The
host sees how many pages a record holds, their GPAs and which are zero — what
the page's address and the host's own dirty log already told it — never their
contents.

A version-1 record (ENCRYPT/DECRYPT) holds one page of stream
:data:`V1_STREAM` and is never zero-elided (the RFC's io page always carries
4096 bytes). It is split across the v1 area: the io header's data is the
record's header, its GPA-list entry and its tag (:data:`V1_IO_HDR_LEN` = 80
bytes, in that order); the io page is the page's 4096 bytes of ciphertext.
:func:`split_v1_record` and :func:`join_v1_record` convert; a VMM that moves
io header and io page as opaque bytes, as QEMU does, needs neither.

Which MH vCPU serves what (the MH's side: :mod:`confmig.guest.firmware.mh`):
INIT and RESET in the v1 block of every MH vCPU; ENCRYPT and DECRYPT in MH
vCPU 0's v1 block; EXPORT and IMPORT in the slots of every MH vCPU, whose
index is its stream number; PARK, FINISH, COMPLETE, ABORT and RESUME in MH vCPU
0's slots.

A target MH publishes, at :data:`CHALLENGE_OFFSET` of its vCPU 0 mailbox, its
challenge (:data:`CHALLENGE_SIZE` random bytes) then its ticket
(:data:`TICKET_SIZE` bytes: the guest owner's key broker drew it when it released
that target's transport key, once). The source's VMM gets both from the target's.
A source's INIT takes the ticket in its ``migration id`` field (its MH derives
the ticket's key from the guest's own) and answers with the session's migration
id there (:func:`decode_init` reads it): the source MH draws the id itself, at
INIT of MH vCPU 0, and the other MH vCPUs join that session, whatever id the VMM
asked for. A target's INIT takes the id the VMM gives (the source's, from the
records). FINISH takes the target's challenge in slot 0's data area, with
``length`` = 16, and seals it into the completion record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfmigError
from confmig.common.units import PAGE_SIZE

# --- version 1: the RFC's layout -------------------------------------------------------------

CMD_OFFSET: Final = 0x000
IO_HDR_OFFSET: Final = 0x800
IO_PAGE_OFFSET: Final = 0x1000
IO_HDR_MAX: Final = 1024
"""Most bytes the io header carries (QEMU checks it on both sides)."""
COMMAND: Final = struct.Struct("<QQiiii")
"""cmd, gpa, prefetch, ret, go, done."""
GO_OFFSET: Final = 0x18
DONE_OFFSET: Final = 0x1C
RET_OFFSET: Final = 0x14


class MhCommand(IntEnum):
    """Mailbox commands. 0-3 are the RFC's; 4 and up are protocol version 2."""

    INIT = 0
    ENCRYPT = 1
    DECRYPT = 2
    RESET = 3
    EXPORT = 4
    """Seal the slot's GPA list's pages into one record (source)."""
    IMPORT = 5
    """Open the slot's record and write its pages (target)."""
    FINISH = 6
    """Source: seal the completeness record; from now on the guest may not run here."""
    COMPLETE = 7
    """Target: check the completeness record; only then may the guest run."""
    ABORT = 8
    """Target: the guest never ran and never will here; seal an abort token."""
    RESUME = 9
    """Source: open an abort token; the guest may run here again."""
    PARK = 10
    """Source, SEV-ES: the guest's vCPUs save their registers into private memory and park;
    answers ``length`` 1 once all did (0: ask again). FINISH seals that state."""
    VERIFY = 11
    """Target: every check of COMPLETE but the owner's grant, changing nothing: the VMM asks
    the owner to commit only for a migration its target will take."""


class MhReturn(IntEnum):
    SUCCESS = 0
    INVALID_FUNC = -1
    AUTH_ERR = -2


# --- version 2: slots ----------------------------------------------------------------------

PROTOCOL_VERSION: Final = 2
SLOT0: Final = 0x2000
"""The v1 area (command page and io page) comes first."""
BATCH_PAGES: Final = 256
"""Most pages in one EXPORT or IMPORT (1 MiB). A command's fixed cost in the MH (its checks,
the session and the keys it reads from private memory, an entry) is about 0.3 ms here, spread
over the batch (ad hoc, not saved: batches of 512 pages moved a 1 GiB guest about twice as
fast as batches of 128; 256 were within the noise of 512). Bounded by the MH's
area: two slots of this for each of four MH vCPUs."""
SLOTS: Final = 2
"""Slots per MH vCPU: the VMM moves one while the MH works on the other."""
SLOT_HEADER: Final = 0x1000
V2_FIELDS: Final = struct.Struct("<IIQ")
"""npages, length, epoch: at +0x20 of a slot's command block."""
V2_FIELDS_OFFSET: Final = COMMAND.size
LENGTH_OFFSET: Final = V2_FIELDS_OFFSET + 4
"""Where a slot's ``length`` sits: the MH writes it when it answers with a record."""
RECORD_HEADER: Final = struct.Struct("<BBHIQQIIII16s")
"""version, alg, kind, stream, seq, epoch, npages, nzero, body, nstreams, migration id."""
BODY_MAX: Final = 4096
"""Most bytes of a token's body."""
TAG_SIZE: Final = 16
MIGRATION_ID_SIZE: Final = 16
ZERO_FLAG: Final = 1
"""Low bit of a GPA-list entry: the page is zero and carries no data."""
SLOT_DATA: Final = RECORD_HEADER.size + BATCH_PAGES * (8 + PAGE_SIZE) + TAG_SIZE
"""The largest page record (a full batch with no zero page); tokens are far smaller."""
SLOT_STRIDE: Final = SLOT_HEADER + ((SLOT_DATA + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
MAILBOX_STRIDE: Final = SLOT0 + SLOTS * SLOT_STRIDE
"""One MH vCPU's mailbox: the v1 pages and its slots."""
ALG_AES_256_GCM: Final = 1
RECORD_VERSION: Final = 2
V1_STREAM: Final = 0xFFFF_FFFF
"""Stream number of records made by v1 commands (one page each)."""
COMPLETION_STREAM: Final = 0xFFFF_FFFE
"""Stream number of a completion record (sequence 0: one FINISH per migration id)."""
ABORT_STREAM: Final = 0xFFFF_FFFD
"""Stream number of an abort token (sequence 0; the target seals only this one record)."""
COMMIT_STREAM: Final = 0xFFFF_FFFC
"""Stream number of the guest owner's commit grant (sequence 0; one per target and migration)."""
TRANSPORT_KDF_INFO: Final = b"confmig mh transport v2"
"""HKDF-SHA256 label of a migration's keys (salt: the migration id; base: the ticket's key)."""
TICKET_KDF_INFO: Final = b"confmig mh ticket v1"
"""HKDF-SHA256 label of a ticket's key (salt: the ticket; base: the guest's transport key)."""


class RecordKind(IntEnum):
    PAGES = 1
    """Pages of one epoch."""
    COMPLETION = 2
    """The source's last record: every stream's last sequence number and page count."""
    ABORT = 3
    """The target's token: this migration never ran there and never will."""
    COMMIT = 4
    """The guest owner's grant: this target may run the guest (and its source never will)."""


class MailboxError(ConfmigError):
    """A mailbox field or record that does not fit its format (offset and reason)."""


def slot_offset(slot: int) -> int:
    if not 0 <= slot < SLOTS:
        raise MailboxError(f"slot {slot} out of range 0..{SLOTS - 1}")
    return SLOT0 + slot * SLOT_STRIDE


def mailbox_base(base: int, size: int, mh_vcpu: int) -> int:
    """The mailbox of MH vCPU ``mh_vcpu`` inside the firmware's area ``[base, base + size)``."""
    if not 0 <= mh_vcpu < max_mh_vcpus(size):
        raise MailboxError(f"MH vCPU {mh_vcpu}: the mailbox area holds {max_mh_vcpus(size)}")
    return base + mh_vcpu * MAILBOX_STRIDE


def max_mh_vcpus(size: int) -> int:
    return max(size, 0) // MAILBOX_STRIDE


@dataclass(frozen=True, slots=True)
class Command:
    """A command block as read from shared memory (v1 fields, then the v2 ones)."""

    cmd: int
    gpa: int
    ret: int
    go: int
    done: int
    npages: int = 0
    length: int = 0
    epoch: int = 0


def decode_command(block: bytes | memoryview) -> Command:
    """A slot's (or the v1) command block; ``block`` is at least 48 bytes."""
    if len(block) < COMMAND.size + V2_FIELDS.size:
        raise MailboxError(f"command block of {len(block)} bytes at offset 0")
    cmd, gpa, _prefetch, ret, go, done = COMMAND.unpack_from(block, 0)
    npages, length, epoch = V2_FIELDS.unpack_from(block, V2_FIELDS_OFFSET)
    return Command(cmd, gpa, ret, go, done, npages, length, epoch)


def encode_request(cmd: int, *, gpa: int = 0, npages: int = 0, length: int = 0, epoch: int = 0) -> bytes:
    """The parameters a VMM writes before ``go`` (``ret = -1``, ``done = 0``, ``go`` still 0)."""
    return COMMAND.pack(cmd, gpa, 0, -1, 0, 0) + V2_FIELDS.pack(npages, length, epoch)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    version: int
    alg: int
    kind: int
    stream: int
    seq: int
    epoch: int
    npages: int
    nzero: int
    body: int
    nstreams: int
    """How many streams the migration has: a page travels on :func:`stream_of` its GFN only,
    so each page's versions are ordered by its stream's sequence."""
    migration_id: bytes

    def pack(self) -> bytes:
        return RECORD_HEADER.pack(self.version, self.alg, self.kind, self.stream, self.seq,
                                  self.epoch, self.npages, self.nzero, self.body, self.nstreams,
                                  self.migration_id)

    @property
    def data_pages(self) -> int:
        return self.npages - self.nzero

    @property
    def size(self) -> int:
        """The whole record's length in bytes."""
        return record_size(self.npages, self.nzero, self.body)


def record_size(npages: int, nzero: int = 0, body: int = 0) -> int:
    return RECORD_HEADER.size + 8 * npages + (npages - nzero) * PAGE_SIZE + body + TAG_SIZE


def decode_record_header(data: bytes | memoryview, *, limit: int = SLOT_DATA) -> RecordHeader:
    """The header of a sealed record, its sizes checked against ``len(data)`` and ``limit``
    (the tag is not: only the key holder can check it)."""
    if len(data) < RECORD_HEADER.size:
        raise MailboxError(f"record of {len(data)} bytes: shorter than its {RECORD_HEADER.size}-byte header")
    h = RecordHeader(*RECORD_HEADER.unpack_from(data, 0))
    if h.version != RECORD_VERSION:
        raise MailboxError(f"record version {h.version} at offset 0 (expected {RECORD_VERSION})")
    if h.alg != ALG_AES_256_GCM:
        raise MailboxError(f"record algorithm {h.alg} at offset 1 (expected {ALG_AES_256_GCM})")
    if h.kind not in RecordKind.__members__.values():
        raise MailboxError(f"record kind {h.kind} at offset 2")
    if h.npages > BATCH_PAGES or h.nzero > h.npages:
        raise MailboxError(f"record of {h.npages} pages ({h.nzero} zero) at offset 24: "
                           f"at most {BATCH_PAGES}, zero ones among them")
    if h.body > BODY_MAX:
        raise MailboxError(f"record body of {h.body} bytes at offset 32 (at most {BODY_MAX})")
    if h.size > limit or h.size != len(data):
        raise MailboxError(f"record of {len(data)} bytes; its header says {h.size} (limit {limit})")
    return h


def gpa_entries(record: bytes | memoryview, header: RecordHeader) -> npt.NDArray[np.uint64]:
    """The record's GPA-list entries, each a page address with low bit :data:`ZERO_FLAG` (a
    copy: the record may be the host's memory)."""
    return np.frombuffer(record, "<u8", header.npages, RECORD_HEADER.size).astype(np.uint64)


def associated_data(record: bytes | memoryview, header: RecordHeader) -> bytes:
    """What the AEAD authenticates besides the ciphertext: the header and the GPA list."""
    return bytes(record[: RECORD_HEADER.size + 8 * header.npages])


def nonce(stream: int, seq: int) -> bytes:
    return struct.pack("<IQ", stream, seq)


V1_IO_HDR_LEN: Final = RECORD_HEADER.size + 8 + TAG_SIZE
"""The io header's data of a version-1 record: header, one GPA-list entry, tag."""


def split_v1_record(record: bytes | memoryview) -> tuple[bytes, bytes]:
    """A one-page record as ENCRYPT leaves it: ``(io header data, io page)``."""
    if len(record) != V1_IO_HDR_LEN + PAGE_SIZE:
        raise MailboxError(f"a version-1 record is {V1_IO_HDR_LEN + PAGE_SIZE} bytes, got {len(record)}")
    head = RECORD_HEADER.size + 8
    return bytes(record[:head]) + bytes(record[-TAG_SIZE:]), bytes(record[head : head + PAGE_SIZE])


def join_v1_record(io_header: bytes | memoryview, io_page: bytes | memoryview) -> bytes:
    """The one-page record DECRYPT opens, from the io header's data and the io page."""
    if len(io_header) != V1_IO_HDR_LEN or len(io_page) != PAGE_SIZE:
        raise MailboxError(f"a version-1 record is an io header of {V1_IO_HDR_LEN} bytes and a "
                           f"{PAGE_SIZE}-byte io page, got {len(io_header)} and {len(io_page)}")
    head = RECORD_HEADER.size + 8
    return bytes(io_header[:head]) + bytes(io_page) + bytes(io_header[head:])


# --- INIT and the tokens' bodies -----------------------------------------------------------


class Role(IntEnum):
    """What INIT makes of an MH: the side of the migration it serves."""

    V1 = 0
    """No parameters (the RFC's INIT): migration id all zero, both commands allowed."""
    SOURCE = 1
    TARGET = 2


INIT_PARAMS: Final = struct.Struct("<III16s")
"""v2 INIT's io header: protocol version, role, streams (a source's MH vCPUs), migration id."""


@dataclass(frozen=True, slots=True)
class Init:
    role: Role
    migration_id: bytes
    nstreams: int = 1
    """A source's number of streams (its MH vCPUs); a target takes it from the records."""


def encode_init(role: Role, migration_id: bytes, nstreams: int = 1) -> bytes:
    if len(migration_id) != MIGRATION_ID_SIZE:
        raise MailboxError(f"a migration id is {MIGRATION_ID_SIZE} bytes, got {len(migration_id)}")
    return INIT_PARAMS.pack(PROTOCOL_VERSION, role, nstreams, migration_id)


def decode_init(io_header: bytes | memoryview) -> Init:
    """INIT's parameters from the io header's data (empty: a v1 INIT)."""
    if len(io_header) == 0:
        return Init(Role.V1, bytes(MIGRATION_ID_SIZE))
    if len(io_header) != INIT_PARAMS.size:
        raise MailboxError(f"INIT parameters of {len(io_header)} bytes (expected 0 or {INIT_PARAMS.size})")
    version, role, nstreams, migration_id = INIT_PARAMS.unpack(io_header)
    if version != PROTOCOL_VERSION:
        raise MailboxError(f"INIT protocol version {version} (this MH speaks {PROTOCOL_VERSION})")
    if role not in (Role.SOURCE, Role.TARGET):
        raise MailboxError(f"INIT role {role} at offset 4")
    if not 1 <= nstreams <= MAX_STREAMS:
        raise MailboxError(f"INIT of {nstreams} streams at offset 8 (1 to {MAX_STREAMS})")
    return Init(Role(role), migration_id, nstreams)


STREAM_TOTAL: Final = struct.Struct("<IIQQ")
"""One stream in a completion record: stream, 0, records (= next sequence number), pages."""
MAX_STREAMS: Final = 64
STREAM_CHUNK: Final = BATCH_PAGES
"""Pages per stream chunk: GFNs ``[k * 128, (k + 1) * 128)`` travel on stream ``k % nstreams``,
so a page has one stream and a batch of consecutive pages stays one run."""


def stream_of(gfns: npt.NDArray[np.uint64] | npt.NDArray[np.int64], nstreams: int) -> npt.NDArray[np.int64]:
    """The stream each GFN travels on, in a migration of ``nstreams`` streams."""
    return (np.asarray(gfns, dtype=np.int64) // STREAM_CHUNK) % nstreams


@dataclass(frozen=True, slots=True)
class StreamTotal:
    stream: int
    records: int
    pages: int


CHALLENGE_SIZE: Final = 16
TICKET_SIZE: Final = 16
CHALLENGE_OFFSET: Final = 0x100
"""Where a target MH publishes its challenge and its ticket (:data:`TARGET_OFFER_SIZE` bytes): in
MH vCPU 0's mailbox, between the v1 command block and the io header (shared: the host reads
them and hands them to the source)."""
TARGET_OFFER_SIZE: Final = CHALLENGE_SIZE + TICKET_SIZE


@dataclass(frozen=True, slots=True)
class Completion:
    """A completion record's body: the target it is for, and every stream's totals."""

    challenge: bytes
    """The target MH's challenge, as the source's VMM gave it to FINISH: only that target's
    COMPLETE accepts this record, so a recorded stream completes on no other target."""
    totals: list[StreamTotal]
    vcpu_state: bytes = b""
    """SEV-ES: the guest's vCPU save area as its vCPUs left it when they parked (opaque here;
    the target MH installs it at COMPLETE). Empty for an SEV guest, whose VMM moves registers."""


VCPU_STATE_MAX: Final = 4096
"""The largest vCPU save area a completion record carries (one page)."""


def encode_completion(c: Completion) -> bytes:
    if len(c.challenge) != CHALLENGE_SIZE:
        raise MailboxError(f"a challenge is {CHALLENGE_SIZE} bytes, got {len(c.challenge)}")
    if len(c.totals) > MAX_STREAMS:
        raise MailboxError(f"{len(c.totals)} streams (at most {MAX_STREAMS})")
    if len(c.vcpu_state) > VCPU_STATE_MAX:
        raise MailboxError(f"a vCPU save area of {len(c.vcpu_state)} bytes (at most {VCPU_STATE_MAX})")
    return (c.challenge + struct.pack("<I", len(c.totals))
            + b"".join(STREAM_TOTAL.pack(t.stream, 0, t.records, t.pages) for t in c.totals)
            + struct.pack("<I", len(c.vcpu_state)) + c.vcpu_state)


def decode_completion(body: bytes | memoryview) -> Completion:
    head = CHALLENGE_SIZE + 4
    if len(body) < head:
        raise MailboxError(f"completion body of {len(body)} bytes")
    (n,) = struct.unpack_from("<I", body, CHALLENGE_SIZE)
    end = head + n * STREAM_TOTAL.size
    if n > MAX_STREAMS or len(body) < end + 4:
        raise MailboxError(f"completion body of {len(body)} bytes for {n} streams")
    totals = []
    for i in range(n):
        stream, _, records, pages = STREAM_TOTAL.unpack_from(body, head + i * STREAM_TOTAL.size)
        totals.append(StreamTotal(stream, records, pages))
    (state_len,) = struct.unpack_from("<I", body, end)
    if state_len > VCPU_STATE_MAX or len(body) != end + 4 + state_len:
        raise MailboxError(f"completion body of {len(body)} bytes with a vCPU save area of {state_len}")
    return Completion(bytes(body[:CHALLENGE_SIZE]), totals, bytes(body[end + 4 :]))


ABORT_NEVER_RAN: Final = b"confmig-mh-abort: the target never ran and never will\0"
"""An abort token's body starts with the target MH's word, sealed under the migration's key,
and ends with the target's challenge (:func:`abort_body`)."""


def abort_body(challenge: bytes) -> bytes:
    """What an abort token says: this target (its challenge) never ran the guest and never
    will. The source's MH opens only a token naming the challenge it sealed at FINISH, so a
    host cannot abort one target and complete another."""
    return ABORT_NEVER_RAN + _challenge(challenge)


COMMIT_GRANTED: Final = b"confmig-mh-commit: the owner lets this target run the guest\0"
"""A commit grant's body starts with the owner's word and ends with the target's challenge."""


def commit_body(challenge: bytes) -> bytes:
    """What the owner's commit grant says: the target with this challenge may run the guest.
    The owner decides once per ticket, commit or abort: a target runs only with this grant,
    a source resumes only with an abort token, so never both."""
    return COMMIT_GRANTED + _challenge(challenge)


def abort_purpose(challenge: bytes) -> bytes:
    """The HKDF label suffix of an abort token's key: the aborting target's own (every target
    of one migration seals its token, fixed nonce, under a key of its own)."""
    return b" abort " + _challenge(challenge)


def commit_purpose(challenge: bytes) -> bytes:
    """The HKDF label suffix of a commit grant's key: the committing target's own."""
    return b" commit " + _challenge(challenge)


def split_records(data: bytes | memoryview) -> list[bytes]:
    """Records laid end to end (COMPLETE's data: the completion record, then the owner's commit
    grant), each one's length from its own header; each is checked again on its own."""
    out = []
    at = 0
    while at < len(data):
        if len(data) - at < RECORD_HEADER.size:
            raise MailboxError(f"{len(data) - at} bytes at offset {at}: shorter than a record header")
        # SECURITY: the host's bytes; a header can claim any size (negative with nzero > npages).
        size = RecordHeader(*RECORD_HEADER.unpack_from(data, at)).size
        if not RECORD_HEADER.size + TAG_SIZE <= size <= len(data) - at:
            raise MailboxError(f"record at offset {at} says {size} bytes; {len(data) - at} are left")
        out.append(bytes(data[at : at + size]))
        at += size
    return out


def _challenge(challenge: bytes) -> bytes:
    if len(challenge) != CHALLENGE_SIZE:
        raise MailboxError(f"a challenge is {CHALLENGE_SIZE} bytes, got {len(challenge)}")
    return challenge
