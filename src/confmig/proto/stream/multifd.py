"""Multifd channels in QEMU 7.2's layout, sans-IO: ``MultiFDInit_t`` once per channel, then
``MultiFDPacket_t`` headers each followed by their pages (no compression).

What QEMU leaves stale we ignore: a SYNC packet without pages keeps the previous packet's
``ramblock``, ``next_packet_size`` and offsets, and entries of ``offset[]`` past
``normal_pages`` are leftovers too. Everything else is checked.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

import numpy as np

from confmig.common.errors import StateError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream.decoder import DEFAULT_BUFFER_SIZE, End, NeedData, ReceiveBuffer
from confmig.proto.stream.encoder import check_indices, gather_pages, is_run
from confmig.proto.stream.format import (
    MAX_IDSTR,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_FIXED_SIZE,
    MULTIFD_PAGES_PER_PACKET,
    MULTIFD_RAMBLOCK_SIZE,
    MULTIFD_VERSION,
    RAM_FLAG_MASK,
    IndexArray,
    MultifdFlag,
    PageArray,
)

_INIT = struct.Struct(">II16sB39s")
_PACKET = struct.Struct(f">IIIIIIQ32s{MULTIFD_RAMBLOCK_SIZE}s")
assert _INIT.size == MULTIFD_INIT_SIZE and _PACKET.size == MULTIFD_PACKET_FIXED_SIZE
_UUID_SIZE: Final = 16


def multifd_init(uuid: bytes, channel: int) -> bytes:
    """``MultiFDInit_t``: the first 64 bytes on every multifd channel."""
    if len(uuid) != _UUID_SIZE or not 0 <= channel <= 0xFF:
        raise ValueError("uuid must be 16 bytes and channel 0..255")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel, b"")


def header_size(pages_per_packet: int) -> int:
    """A packet header carries one u64 offset slot per page it could hold, used or not."""
    return MULTIFD_PACKET_FIXED_SIZE + 8 * pages_per_packet


class MultifdPacketEncoder:
    """Builds ``MultiFDPacket_t`` packets: a header, then the pages gathered into one buffer."""

    def __init__(self, pages_per_packet: int = MULTIFD_PAGES_PER_PACKET) -> None:
        if pages_per_packet <= 0:
            raise ValueError("pages_per_packet must be positive")
        self.pages_per_packet = pages_per_packet
        self._pages = np.empty((pages_per_packet, PAGE_SIZE), dtype=np.uint8)

    def encode(
        self,
        block: str,
        pages: PageArray,
        indices: IndexArray,
        packet_num: int,
        *,
        sync: bool = False,
    ) -> tuple[bytes, memoryview]:
        """``(header, page data)`` for ``pages[indices]``; the page data is valid until the
        next ``encode``. A run of consecutive pages is not copied: the data is a view
        of ``pages`` itself."""
        n = len(indices)
        if not 0 < n <= self.pages_per_packet:
            raise ValueError(f"packet of {n} pages (allowed 1..{self.pages_per_packet})")
        name = block.encode()
        if not 0 < len(name) <= MAX_IDSTR:
            raise ValueError(f"RAM block name {block!r} must be 1..{MAX_IDSTR} bytes")
        indices = np.asarray(indices, dtype=np.int64)
        flags = MultifdFlag.SYNC if sync else 0
        head = self._header(flags, n, packet_num, name, indices)
        if is_run(indices):
            check_indices(pages, indices)
            first = int(indices[0])
            return head, pages[first : first + n].reshape(-1).data  # a run: straight from RAM
        gather_pages(pages, indices, self._pages[:n])
        return head, self._pages[:n].reshape(-1).data

    def sync(self, packet_num: int) -> bytes:
        """A packet without pages that only carries the SYNC flag."""
        return self._header(MultifdFlag.SYNC, 0, packet_num, b"", np.empty(0, dtype=np.int64))

    def _header(self, flags: int, n: int, packet_num: int, name: bytes, indices: IndexArray) -> bytes:
        offsets = np.zeros(self.pages_per_packet, dtype=">u8")
        offsets[:n] = indices << PAGE_SHIFT
        fixed = _PACKET.pack(
            MULTIFD_MAGIC,
            MULTIFD_VERSION,
            flags,
            self.pages_per_packet,
            n,
            n * PAGE_SIZE,
            packet_num,
            b"",
            name,
        )
        return fixed + offsets.tobytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class MultifdInit:
    """A channel opened. The engine checks ``uuid`` against its own and ``channel`` against
    the number of channels it expects."""

    uuid: bytes
    channel: int


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MultifdPages:
    """``data[i]`` is page ``indices[i]`` of ``block``; ``data`` is a view into the decoder's
    buffer, valid until the next call on the decoder."""

    block: str
    packet_num: int
    indices: IndexArray
    data: PageArray


@dataclass(frozen=True, slots=True, kw_only=True)
class MultifdSync:
    packet_num: int


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MultifdPayload:
    """(``direct`` decoders) A packet's header: its ``nbytes`` of pages, page ``indices[i]`` of
    ``block`` at ``i * PAGE_SIZE``, come next. The caller takes what the decoder already
    holds with :meth:`MultifdDecoder.take_payload`, receives the rest where the pages
    belong, and reports it with :meth:`MultifdDecoder.payload_received`."""

    block: str
    packet_num: int
    indices: IndexArray
    nbytes: int


MultifdEvent = MultifdInit | MultifdPages | MultifdPayload | MultifdSync | End


class _State(Enum):
    INIT = auto()
    PACKETS = auto()
    PAYLOAD = auto()  # direct: the caller is receiving a packet's pages
    DONE = auto()


class MultifdDecoder(ReceiveBuffer[MultifdEvent]):
    """Decodes one multifd channel. ``blocks`` maps RAM block idstr to its size in bytes (as
    in ``RamMemSize``); it is consulted per packet, so it may be filled in after creation."""

    def __init__(
        self,
        blocks: Mapping[str, int],
        *,
        pages_per_packet: int = MULTIFD_PAGES_PER_PACKET,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        direct: bool = False,
    ) -> None:
        super().__init__(buffer_size)
        self._blocks = blocks
        self._pages_per_packet = pages_per_packet
        self._header_size = header_size(pages_per_packet)
        self._state = _State.INIT
        self._sync: int | None = None  # SYNC of a packet whose pages were just returned
        self._direct = direct
        self._payload_left = 0

    def take_payload(self) -> memoryview:
        """(``direct``) The part of the current packet's pages already received, consumed."""
        if self._state is not _State.PAYLOAD:
            raise StateError("take_payload", self._state.name, "a packet's payload")
        n = min(self._payload_left, self._end - self._start)
        out = self._view[self._start : self._start + n]
        self._start += n
        self._payload_left -= n
        self._payload_done()
        return out

    def payload_received(self, nbytes: int) -> None:
        """(``direct``) The caller received ``nbytes`` more of the current packet's pages."""
        if self._state is not _State.PAYLOAD or not 0 <= nbytes <= self._payload_left:
            raise StateError("payload_received", self._state.name, "at most the payload left")
        if nbytes and self._end != self._start:
            raise StateError("payload_received", "payload still buffered", "take_payload first")
        self._base += nbytes  # they passed the stream by this buffer
        self._payload_left -= nbytes
        self._payload_done()

    def _payload_done(self) -> None:
        if self._payload_left == 0:
            self._state = _State.PACKETS

    def _step(self) -> MultifdEvent | NeedData:
        if self._state is _State.PAYLOAD:
            raise StateError("next_event", "inside a payload", "take_payload/payload_received first")
        if self._sync is not None:
            event = MultifdSync(packet_num=self._sync)
            self._sync = None
            return event
        if self._state is _State.PACKETS:
            return self._packet()
        if self._state is _State.INIT:
            return self._init()
        return End()

    def _init(self) -> MultifdInit | NeedData:
        p = self._start
        if self._end - p < MULTIFD_INIT_SIZE:
            return self._wait(MULTIFD_INIT_SIZE, "MultiFDInit_t")
        magic, version, uuid, channel, reserved = _INIT.unpack_from(self._buf, p)
        self._check_magic_version(p, magic, version)
        if any(reserved):
            self._fail("non-zero reserved bytes in MultiFDInit_t", p + 25)
        self._start = p + MULTIFD_INIT_SIZE
        self._state = _State.PACKETS
        return MultifdInit(uuid=uuid, channel=channel)

    def _packet(self) -> MultifdEvent | NeedData:
        p, avail = self._start, self._end - self._start
        if avail == 0 and self._eof:
            self._state = _State.DONE
            return End()
        if avail < self._header_size:
            return self._wait(self._header_size, "MultiFDPacket_t")
        magic, version, flags, pages_alloc, normal, next_size, packet_num, reserved, ramblock = (
            _PACKET.unpack_from(self._buf, p)
        )
        self._check_magic_version(p, magic, version)
        if flags & ~int(MultifdFlag.SYNC):
            self._fail(f"multifd flags 0x{flags:x} (only SYNC, without compression)", p + 8)
        if pages_alloc != self._pages_per_packet:
            self._fail(
                f"packet sized for {pages_alloc} pages, channel uses {self._pages_per_packet}",
                p + 12,
            )
        if normal > pages_alloc:
            self._fail(f"{normal} pages in a packet of {pages_alloc}", p + 16)
        if any(reserved):
            self._fail("non-zero reserved bytes in MultiFDPacket_t", p + 32)
        if normal == 0:
            if not flags & MultifdFlag.SYNC:
                self._fail("packet with neither pages nor SYNC", p + 8)
            self._start = p + self._header_size
            return MultifdSync(packet_num=packet_num)
        if next_size != normal * PAGE_SIZE:
            self._fail(f"next_packet_size {next_size} for {normal} uncompressed pages", p + 20)
        block, npages = self._ramblock(p + 64, ramblock)
        # SECURITY: peer-controlled offsets become indices into guest RAM: bounds-check all.
        offsets = np.ndarray((normal,), ">u8", self._buf, p + MULTIFD_PACKET_FIXED_SIZE)
        bad = ((offsets & RAM_FLAG_MASK) != 0) | ((offsets >> PAGE_SHIFT) >= npages)
        if bad.any():
            j = int(bad.argmax())
            self._fail(
                f"page offset 0x{int(offsets[j]):x} not a page of RAM block {block!r}",
                p + MULTIFD_PACKET_FIXED_SIZE + 8 * j,
            )
        indices = (offsets >> PAGE_SHIFT).astype(np.int64)
        sync = packet_num if flags & MultifdFlag.SYNC else None
        if self._direct:
            self._start = p + self._header_size
            self._state = _State.PAYLOAD
            self._payload_left = normal * PAGE_SIZE
            self._sync = sync  # returned once the payload is in
            return MultifdPayload(block=block, packet_num=packet_num, indices=indices,
                                  nbytes=self._payload_left)
        total = self._header_size + normal * PAGE_SIZE
        if avail < total:
            return self._wait(total, "multifd pages")
        self._start = p + total
        self._sync = sync
        data = np.ndarray((normal, PAGE_SIZE), np.uint8, self._buf, p + self._header_size)
        return MultifdPages(block=block, packet_num=packet_num, indices=indices, data=data)

    def _ramblock(self, at: int, field: bytes) -> tuple[str, int]:
        length = field.find(b"\0")
        if length <= 0:
            self._fail("ramblock name empty or not NUL-terminated", at)
        if any(field[length:]):
            self._fail("bytes after the NUL of the ramblock name", at + length)
        name = self._text(at, length, "ramblock name")
        size = self._blocks.get(name)
        if size is None:
            self._fail(f"unknown RAM block {name!r}", at)
        return name, size >> PAGE_SHIFT

    def _check_magic_version(self, p: int, magic: int, version: int) -> None:
        if magic != MULTIFD_MAGIC:
            self._fail(f"bad multifd magic 0x{magic:08x} (expected 0x{MULTIFD_MAGIC:08x})", p)
        if version != MULTIFD_VERSION:
            self._fail(f"multifd version {version} (only {MULTIFD_VERSION} is known)", p + 4)
