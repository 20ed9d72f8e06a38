"""The page records a hostile host can move, drop, copy or change, one kind per backend.

A migration stream carries a guest's pages as records of one of three kinds:

* ``plain``: QEMU's RAM page records (``PAGE``, ``PAGE|CONTINUE``): the block offset, then
  the page as the host sees it. Nothing in them is sealed.
* ``psp``: CONFIDENTIAL records of subtype PSP_PACKET, kind PAGE
  (:mod:`confmig.proto.stream.psp`): the GPA in the envelope, then the Secure Processor's
  packet (52-byte header with IV and MAC, and the page re-encrypted under the TEK). The MAC
  covers the packet, not the GPA.
* ``mh``: CONFIDENTIAL records of subtype MH_RECORD: a Migration Handler's sealed record
  (header, GPA list, ciphertext, tag), all of it authenticated, up to
  ``BATCH_PAGES`` pages each.

:class:`PageRecord` is one such record as the proxy holds it, with what a host can see of
it (addresses, and for MH its stream, sequence number and epoch) and the operations the
attacks use: re-encoding (:meth:`PageRecord.wire`), moving a record's content to another
record's address (:meth:`PageRecord.readdressed`), forging, flipping and truncating.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final, NamedTuple

from confmig.common.units import PAGE_SIZE
from confmig.proto import mailbox as mb
from confmig.proto.stream import psp as psp_records
from confmig.proto.stream.encoder import confidential_record
from confmig.proto.stream.format import ConfidentialSubtype, RamFlag


class Kind(Enum):
    """Which backend's page records a proxy parses (the others pass as bytes)."""

    PLAIN = "plain"
    PSP = "psp"
    MH = "mh"


class RecordId(NamedTuple):
    """A page record's place: its MH stream and sequence number as the source's header says;
    for the other kinds stream 0 and the record's position among the page records sent."""

    stream: int
    seq: int


class Part(Enum):
    """Where in a record a bit flips."""

    HEADER = "header"
    """MH: the epoch (offset 16), still a well-formed header. PSP: a bit of the packet
    header's IV. Plain: the record header's offset (the page goes one page further)."""
    GPA_LIST = "gpa-list"
    """The address: MH, bit 12 of the first GPA of its (sealed) list; PSP, of the envelope's
    GPA; plain, of the record's offset."""
    CIPHERTEXT = "ciphertext"
    """The first page's data, 100 bytes in (plain: the page itself)."""
    TAG = "tag"
    """MH: the tag's last byte; PSP: the MAC's last byte (plain has none: the data)."""


_EPOCH_OFFSET: Final = 16
"""Of the epoch field in :data:`confmig.proto.mailbox.RECORD_HEADER` (``<BBHIQ`` before it)."""
_PSP_PACKET_HEADER: Final = 1 + 8 + 4
"""Where a PSP PAGE payload's packet header starts (kind, GPA, u32 length)."""
_PSP_IV: Final = 4
"""The IV's offset in the 52-byte packet header (after the u32 flags)."""
_ADDRESS_BIT: Final = PAGE_SIZE
"""The address bit a flip changes: the page one page further (or nearer)."""
PLAIN_HEADER_SIZE: Final = 8
"""A ``PAGE|CONTINUE`` record's u64 header before its page."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PageRecord:
    """One page record of a stream (an MH completion record too: ``index`` -1)."""

    kind: Kind
    index: int
    """Position among the page records of this kind the source sent (0-based)."""
    stream: int
    seq: int
    epoch: int
    """MH: the header's epoch. Others: 0 in the precopy rounds, 1 in the stop-and-copy part."""
    gpas: tuple[int, ...]
    """The guest addresses the host reads off the record (plain: block offsets, which are
    GPAs below 3 GiB); an MH record lists its GPAs inside the seal."""
    payload: bytes
    """MH: the sealed record. PSP: the CONFIDENTIAL record's payload. Plain: the page."""
    block: str = ""
    """Plain: the RAM block."""
    zero: bool = False
    """Plain: the page goes as a zero-page record (its data dropped)."""
    mh: mb.RecordHeader | None = None
    """MH: the header as the source sent it (an edited payload may say otherwise)."""

    @property
    def id(self) -> RecordId:
        return RecordId(self.stream, self.seq)

    @property
    def is_page(self) -> bool:
        return self.mh is None or self.mh.kind == mb.RecordKind.PAGES

    @property
    def is_completion(self) -> bool:
        return self.mh is not None and self.mh.kind == mb.RecordKind.COMPLETION

    @property
    def gpa(self) -> int:
        return self.gpas[0] if self.gpas else -1

    def wire(self) -> bytes:
        """The record as a stream carries it (plain: a standalone record naming its block,
        so that it stands anywhere among the block's records)."""
        if self.kind is Kind.MH:
            return confidential_record(ConfidentialSubtype.MH_RECORD, self.payload)
        if self.kind is Kind.PSP:
            return confidential_record(ConfidentialSubtype.PSP_PACKET, self.payload)
        name = self.block.encode()
        head = struct.pack(">QB", self.gpa | (RamFlag.ZERO if self.zero else RamFlag.PAGE), len(name)) + name
        return head + (b"\0" if self.zero else self.payload)

    def edited(self, payload: bytes) -> PageRecord:
        return replace(self, payload=payload)

    def readdressed(self, other: PageRecord) -> PageRecord:
        """This record's content at ``other``'s address: what a host can do where the address
        is outside the seal (PSP, plain). An MH record keeps its sealed GPA list."""
        return self.at(other.gpa)

    def at(self, gpa: int) -> PageRecord:
        if self.kind is Kind.MH:
            return self
        if self.kind is Kind.PSP:
            page = psp_records.decode(self.payload)
            assert isinstance(page, psp_records.PspPage)
            payload = psp_records.encode(replace(page, gpa=gpa))
            return replace(self, payload=payload, gpas=(gpa,))
        return replace(self, gpas=(gpa,))

    def forged(self, seed: int) -> PageRecord:
        """A record with this one's addressing and random content (and MAC or tag)."""
        rng = random.Random(seed)
        if self.kind is Kind.MH:
            assert self.mh is not None
            head = mb.RECORD_HEADER.size + 8 * self.mh.npages
            return self.edited(self.payload[:head] + rng.randbytes(len(self.payload) - head))
        if self.kind is Kind.PSP:
            page = psp_records.decode(self.payload)
            assert isinstance(page, psp_records.PspPage)
            fake = replace(page, header=page.header[:_PSP_IV] + rng.randbytes(len(page.header) - _PSP_IV),
                           transport=rng.randbytes(len(page.transport)))
            return self.edited(psp_records.encode(fake))
        return self.edited(rng.randbytes(PAGE_SIZE))

    def flipped(self, part: Part) -> PageRecord:
        """One bit of ``part`` flipped."""
        if self.kind is not Kind.MH and part is Part.GPA_LIST:
            return self.at(self.gpa ^ _ADDRESS_BIT)
        if self.kind is Kind.PLAIN and part is Part.HEADER:
            return self.at(self.gpa ^ _ADDRESS_BIT)  # all a plain record's header says
        data = bytearray(self.payload)
        where, bit = self._flip_at(part)
        data[where] ^= 1 << bit
        return self.edited(bytes(data))

    def _flip_at(self, part: Part) -> tuple[int, int]:
        if self.kind is Kind.MH:
            assert self.mh is not None
            gpas = mb.RECORD_HEADER.size
            return {
                Part.HEADER: (_EPOCH_OFFSET, 0),
                Part.GPA_LIST: (gpas + 1, 4),
                Part.CIPHERTEXT: (gpas + 8 * self.mh.npages + 100, 0),
                Part.TAG: (len(self.payload) - 1, 0),
            }[part]
        if self.kind is Kind.PSP:
            header_len = struct.unpack_from(">I", self.payload, 1 + 8)[0]
            transport = _PSP_PACKET_HEADER + header_len + 4
            return {
                Part.HEADER: (_PSP_PACKET_HEADER + _PSP_IV + 5, 0),
                Part.CIPHERTEXT: (transport + 100, 0),
                Part.TAG: (_PSP_PACKET_HEADER + header_len - 1, 0),
            }[part]
        return 100, 0  # plain: the page (no header beyond the address, no tag)

    def truncated(self) -> PageRecord:
        """A well-formed, shorter record: MH, its last page gone and header and GPA list made to
        agree (the tag is the source's, for the whole record); PSP, the packet's transport data
        16 bytes short with its length saying so; plain, a zero-page record in its place."""
        if self.kind is Kind.PLAIN:
            return replace(self, zero=True)
        if self.kind is Kind.PSP:
            page = psp_records.decode(self.payload)
            assert isinstance(page, psp_records.PspPage)
            short = page.transport[:-16]
            payload = (bytes([psp_records.PspRecordKind.PAGE]) + struct.pack(">Q", page.gpa)
                       + struct.pack(">I", len(page.header)) + page.header
                       + struct.pack(">I", len(short)) + short)
            return self.edited(payload)
        h = self.mh
        assert h is not None
        gpas = mb.RECORD_HEADER.size
        entries = struct.unpack_from(f"<{h.npages}Q", self.payload, gpas)
        zero = bool(entries[-1] & mb.ZERO_FLAG)
        shorter = replace(h, npages=h.npages - 1, nzero=h.nzero - zero)
        body = self.payload[gpas + 8 * h.npages : -mb.TAG_SIZE]
        if not zero:
            body = body[:-PAGE_SIZE]  # the pages' ciphertext is in GPA-list order
        tag = self.payload[-mb.TAG_SIZE :]
        return self.edited(shorter.pack() + struct.pack(f"<{h.npages - 1}Q", *entries[:-1]) + body + tag)


def mh_record(payload: bytes, *, index: int) -> PageRecord:
    """An MH record from its sealed bytes (:class:`~confmig.proto.mailbox.MailboxError` if its
    header does not parse)."""
    # SECURITY: bytes from the source host; only the header is read, bounded by its decoder.
    h = mb.decode_record_header(payload)
    gpas: tuple[int, ...] = ()
    if h.kind == mb.RecordKind.PAGES and len(payload) >= mb.RECORD_HEADER.size + 8 * h.npages:
        entries = struct.unpack_from(f"<{h.npages}Q", payload, mb.RECORD_HEADER.size)
        gpas = tuple(e & ~(PAGE_SIZE - 1) for e in entries)
    return PageRecord(kind=Kind.MH, index=index if h.kind == mb.RecordKind.PAGES else -1, stream=h.stream,
                      seq=h.seq, epoch=h.epoch, gpas=gpas, payload=payload, mh=h)


def psp_record(payload: bytes, *, index: int, epoch: int) -> PageRecord | None:
    """A PSP PAGE record, or None for the other PSP records (session, VMSA), which pass."""
    record = psp_records.decode(payload)
    if not isinstance(record, psp_records.PspPage):
        return None
    return PageRecord(kind=Kind.PSP, index=index, stream=0, seq=index, epoch=epoch, gpas=(record.gpa,),
                      payload=payload)


def plain_record(block: str, offset: int, page: bytes, *, index: int, epoch: int) -> PageRecord:
    return PageRecord(kind=Kind.PLAIN, index=index, stream=0, seq=index, epoch=epoch, gpas=(offset,),
                      payload=page, block=block)
