"""Multifd channels in QEMU 7.2's layout, sans-IO: ``MultiFDInit_t`` once per channel, then
``MultiFDPacket_t`` headers each followed by their pages (no compression).

What QEMU leaves stale we ignore: a SYNC packet without pages keeps the previous packet's
``ramblock``, ``next_packet_size`` and offsets, and entries of ``offset[]`` past
``normal_pages`` are leftovers too. Everything else is checked.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.errors import StateError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream.decoder import (
    DEFAULT_BUFFER_SIZE,
    End,
    NeedData,
    ReceiveBuffer,
    fill_views,
    views_after,
)
from confmig.proto.stream.encoder import check_indices, gathered
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
_NO_RESERVED: Final = bytes(32)
_U64_MAX: Final = 2**64 - 1
_SYNC: Final = int(MultifdFlag.SYNC)  # an int: the flag tested per packet, not an enum operation
_BE_U64: Final = np.dtype(">u8")


@functools.cache
def _run_form(n: int) -> tuple[int, int]:
    """``(R, S)`` for ``n`` big-endian u64 digits: ``R`` has a 1 in each, ``S`` holds
    ``k * PAGE_SIZE`` in digit ``k`` (the most significant is digit 0)."""
    digits = steps = 0
    for k in range(n):
        digits = (digits << 64) | 1
        steps = (steps << 64) | (k << PAGE_SHIFT)
    return digits, steps


def multifd_init(uuid: bytes, channel: int) -> bytes:
    """``MultiFDInit_t``: the first 64 bytes on every multifd channel."""
    if len(uuid) != _UUID_SIZE or not 0 <= channel <= 0xFF:
        raise ValueError("uuid must be 16 bytes and channel 0..255")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel, b"")


def header_size(pages_per_packet: int) -> int:
    """A packet header carries one u64 offset slot per page it could hold, used or not."""
    return MULTIFD_PACKET_FIXED_SIZE + 8 * pages_per_packet


_FIXED_FIELDS = [
    ("magic", ">u4"), ("version", ">u4"), ("flags", ">u4"), ("pages_alloc", ">u4"),
    ("normal_pages", ">u4"), ("next_packet_size", ">u4"), ("packet_num", ">u8"),
    ("reserved", "V32"), ("ramblock", f"S{MULTIFD_RAMBLOCK_SIZE}"),
]
"""The fields ``_PACKET`` unpacks, in its order (QEMU calls ``reserved`` ``unused``)."""


def _header_dtype(pages_per_packet: int) -> np.dtype[np.void]:
    """``MultiFDPacket_t`` as a numpy record: the fixed part, then ``offset[pages_alloc]``."""
    dtype = np.dtype([*_FIXED_FIELDS, ("offset", ">u8", (pages_per_packet,))])
    # The same layout as the decoder's struct: the name at 64, the offsets after the fixed part.
    assert dtype.fields is not None and dtype.fields["ramblock"][1] == 64
    assert dtype.fields["offset"][1] == _PACKET.size and dtype.itemsize == header_size(pages_per_packet)
    return dtype


def _packets(npages: int, pages_per_packet: int) -> int:
    """How many packets ``npages`` pages take, each full but the last."""
    return -(-npages // pages_per_packet)


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketBatch:
    """Packets of one RAM block as the buffers of one gather write: each packet's header from
    the encoder, then its pages where they lie in guest RAM (one buffer per run of
    consecutive pages). Valid until the encoder's next ``encode``; a page written after
    encoding goes out as it is then (it is dirty and goes again, as in QEMU)."""

    heads: npt.NDArray[np.uint8]
    """``(packets, header_size)``: every packet's header."""
    pages: PageArray
    """The RAM block."""
    indices: IndexArray
    """The pages, in the order they go: ``pages_per_packet`` per packet, the last one short."""
    pages_per_packet: int

    @property
    def packets(self) -> int:
        return len(self.heads)

    def iovec(self) -> npt.NDArray[np.uint64]:
        """``struct iovec`` rows ``(base, length)``: a header, the runs of its packet's pages,
        the next header... Pointers into the arrays above, which must outlive the write."""
        idx, per, k, heads = self.indices, self.pages_per_packet, self.packets, self.heads
        n = len(idx)
        if k != _packets(n, per) or n == 0:
            raise ValueError(f"{n} pages do not fill {k} packets of up to {per}")
        # SECURITY: addresses for the kernel: the headers are rows of one C-contiguous byte
        # array, exactly a header wide; the block is contiguous, every page inside it.
        if (heads.dtype != np.uint8 or heads.ndim != 2 or heads.shape[1] != header_size(per)
                or not heads.flags.c_contiguous):
            raise ValueError(f"headers must be C-contiguous ({k}, {header_size(per)}) bytes")
        check_indices(self.pages, idx)
        # A run starts at each packet's first page and wherever the pages stop being consecutive.
        starts = np.ones(n, dtype=bool)
        starts[1:] = np.diff(idx) != 1
        starts[::per] = True
        first = np.flatnonzero(starts)
        length = np.diff(first, append=n)
        packet = first // per
        iov = np.empty((len(first) + k, 2), dtype=np.uint64)
        # Packet j's header goes before its first run, behind the j headers and runs before it.
        at_head = np.searchsorted(packet, np.arange(k)) + np.arange(k)
        iov[at_head, 0] = heads.ctypes.data + heads.shape[1] * np.arange(k, dtype=np.uint64)
        iov[at_head, 1] = heads.shape[1]
        at_run = np.arange(len(first)) + packet + 1
        iov[at_run, 0] = self.pages.ctypes.data + (idx[first].astype(np.uint64) << PAGE_SHIFT)
        iov[at_run, 1] = length.astype(np.uint64) << PAGE_SHIFT
        return iov

    @property
    def wire(self) -> bytes:
        """The packets as one ``bytes`` (tests): what a channel writes."""
        return gathered(self.iovec())


class MultifdPacketEncoder:
    """Builds ``MultiFDPacket_t`` packets, any number at once, without copying a page."""

    def __init__(self, pages_per_packet: int = MULTIFD_PAGES_PER_PACKET) -> None:
        if pages_per_packet <= 0:
            raise ValueError("pages_per_packet must be positive")
        self.pages_per_packet = pages_per_packet
        self._dtype = _header_dtype(pages_per_packet)
        self._heads = np.zeros(0, dtype=self._dtype)

    def packets(self, npages: int) -> int:
        """How many packets ``npages`` pages take."""
        return _packets(npages, self.pages_per_packet)

    def encode(self, block: str, pages: PageArray, indices: IndexArray, first_packet: int,
               *, sync: bool = False) -> PacketBatch:
        """``pages[indices]`` as packets numbered from ``first_packet``, each full but the
        last. With ``sync`` the last one carries the SYNC flag too: QEMU sends SYNC on a
        packet of its own (:meth:`sync`), but the format allows pages in it, and the
        decoder takes both."""
        n = len(indices)
        if n == 0:
            raise ValueError("a packet batch needs pages (a SYNC alone is sync())")
        if not 0 <= first_packet <= _U64_MAX + 1 - self.packets(n):
            raise ValueError(f"packet numbers from {first_packet} do not fit QEMU's u64 packet_num")
        name = block.encode()
        if not 0 < len(name) <= MAX_IDSTR:
            raise ValueError(f"RAM block name {block!r} must be 1..{MAX_IDSTR} bytes")
        indices = np.asarray(indices, dtype=np.int64)  # bounds: PacketBatch.iovec checks them
        per, k = self.pages_per_packet, self.packets(n)
        heads = self._fixed(k, name)
        normal = np.full(k, per, dtype=np.uint32)
        normal[-1] = n - per * (k - 1)
        heads["normal_pages"] = normal
        heads["next_packet_size"] = normal * PAGE_SIZE
        heads["packet_num"] = first_packet + np.arange(k, dtype=np.uint64)
        if sync:
            heads["flags"][-1] = MultifdFlag.SYNC
        offsets = np.zeros(k * per, dtype=np.int64)  # slots past a short packet's pages: zero
        offsets[:n] = indices << PAGE_SHIFT
        heads["offset"] = offsets.reshape(k, per)
        return PacketBatch(heads=heads.view(np.uint8).reshape(k, -1), pages=pages,
                           indices=indices, pages_per_packet=per)

    def sync(self, packet_num: int) -> bytes:
        """A packet without pages that only carries the SYNC flag."""
        head = np.zeros(1, dtype=self._dtype)
        self._fill_fixed(head, b"")
        head["flags"] = MultifdFlag.SYNC
        head["packet_num"] = packet_num
        return head.tobytes()

    def _fixed(self, k: int, name: bytes) -> npt.NDArray[np.void]:
        """``k`` headers from the encoder's reusable array, their constant fields set."""
        if len(self._heads) < k:
            self._heads = np.zeros(k, dtype=self._dtype)
        heads = self._heads[:k]
        self._fill_fixed(heads, name)
        return heads

    def _fill_fixed(self, heads: npt.NDArray[np.void], name: bytes) -> None:
        heads["magic"] = MULTIFD_MAGIC
        heads["version"] = MULTIFD_VERSION
        heads["flags"] = 0
        heads["pages_alloc"] = self.pages_per_packet
        heads["ramblock"] = name


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
    """(``direct`` decoders) A packet's header: its pages, page ``indices[i]`` of ``block`` at
    ``i * PAGE_SIZE``, come next. The caller asks :meth:`MultifdDecoder.payload_views` where
    to receive them (given where they belong) and reports each receive with
    :meth:`MultifdDecoder.views_received`."""

    block: str
    packet_num: int
    npages: int
    """Pages in the packet (QEMU's ``normal_pages``)."""
    run: int | None
    """The first page when the pages are consecutive (one range of guest RAM, as a sender's
    packets mostly are), else None."""
    scattered: IndexArray | None
    """The pages when they are not a run, else None (a run needs no array)."""

    @property
    def indices(self) -> IndexArray:
        if self.scattered is not None:
            return self.scattered
        assert self.run is not None
        return np.arange(self.run, self.run + self.npages, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.npages * PAGE_SIZE


MultifdEvent = MultifdInit | MultifdPages | MultifdPayload | MultifdSync | End


class _State(Enum):
    INIT = auto()
    PACKETS = auto()
    PAYLOAD = auto()  # direct: the caller is receiving a packet's pages
    DONE = auto()


class MultifdDecoder(ReceiveBuffer[MultifdEvent]):
    """Decodes one multifd channel. ``blocks`` maps RAM block idstr to its size in bytes (as
    in ``RamMemSize``); it is consulted whenever a packet names another block than the one
    before, so blocks may be added after creation (a block's size must not change)."""

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
        self._last_ramblock: tuple[bytes, tuple[str, int]] = (b"", ("", 0))

    def payload_views(self, dest: list[memoryview]) -> list[memoryview]:
        """(``direct``, after a :class:`MultifdPayload`) Where to receive the rest of its packet:
        ``dest`` (where its pages belong, ``nbytes`` in all) less what the decoder already
        held, copied there now; then the decoder's own space for the next header, which may
        come in the same receive (not after a SYNC-flagged packet: the peer may send nothing
        more until the target moves on). Empty when the decoder held all the pages. Report
        each receive into them with :meth:`views_received`."""
        if self._state is not _State.PAYLOAD or sum(map(len, dest)) != self._payload_left:
            raise StateError("payload_views", self._state.name, "views for the payload left")
        held = min(self._payload_left, self._end - self._start)
        if held:
            fill_views(dest, self._view[self._start : self._start + held])
            self._start += held
            self._payload_left -= held
            dest = views_after(dest, held)
        if not self._payload_left:
            return self._payload_in()
        if self._sync is not None:
            return dest
        return [*dest, self.get_buffer()[: self._header_size]]

    def views_received(self, views: list[memoryview], nbytes: int) -> list[memoryview]:
        """``nbytes`` were received into ``views`` (from :meth:`payload_views` or from this):
        what is left of them while the payload is not all in, else nothing."""
        if self._state is not _State.PAYLOAD or not 0 < nbytes <= sum(map(len, views)):
            raise StateError("views_received", self._state.name, "bytes into the views given")
        mine = min(nbytes, self._payload_left)
        self._base += mine  # they passed the stream by this buffer
        self._payload_left -= mine
        if nbytes > mine:
            self.buffer_updated(nbytes - mine)
        if not self._payload_left:
            return self._payload_in()
        return views_after(views, nbytes)

    def _payload_in(self) -> list[memoryview]:
        """The packet's pages are all in: headers again, nothing more to receive for it."""
        self._state = _State.PACKETS
        return []

    def _step(self) -> MultifdEvent | NeedData:
        if self._state is _State.PAYLOAD:
            raise StateError("next_event", "inside a payload", "payload_views/views_received first")
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
        if flags & ~_SYNC:
            self._fail(f"multifd flags 0x{flags:x} (only SYNC, without compression)", p + 8)
        if pages_alloc != self._pages_per_packet:
            self._fail(
                f"packet sized for {pages_alloc} pages, channel uses {self._pages_per_packet}",
                p + 12,
            )
        if normal > pages_alloc:
            self._fail(f"{normal} pages in a packet of {pages_alloc}", p + 16)
        if reserved != _NO_RESERVED:
            self._fail("non-zero reserved bytes in MultiFDPacket_t", p + 32)
        if normal == 0:
            if not flags & _SYNC:
                self._fail("packet with neither pages nor SYNC", p + 8)
            self._start = p + self._header_size
            return MultifdSync(packet_num=packet_num)
        if next_size != normal * PAGE_SIZE:
            self._fail(f"next_packet_size {next_size} for {normal} uncompressed pages", p + 20)
        block, block_pages = self._ramblock(p + 64, ramblock)
        # SECURITY: peer-controlled offsets become indices into guest RAM: bounds-check all.
        at = p + MULTIFD_PACKET_FIXED_SIZE
        run = self._run(at, normal, block_pages)
        sync = packet_num if flags & _SYNC else None
        total = self._header_size + normal * PAGE_SIZE
        if self._eof and avail < total:  # the input ended: the pages will never come
            return self._wait(total, "multifd pages")
        if run is not None and self._direct:  # the common case: no array at all
            return self._payload(p, MultifdPayload(block=block, packet_num=packet_num, npages=normal,
                                                   run=run, scattered=None), sync)
        offsets = np.frombuffer(self._buf, _BE_U64, normal, at).astype(np.uint64)
        if run is None and (int(np.bitwise_or.reduce(offsets)) & RAM_FLAG_MASK
                            or int(np.maximum.reduce(offsets)) >> PAGE_SHIFT >= block_pages):
            # Every offset page-aligned (no bit of the OR of all below a page) and inside the
            # block (the largest one): two reductions instead of a mask per offset.
            j = int((((offsets & RAM_FLAG_MASK) != 0) | (offsets >> PAGE_SHIFT >= block_pages)).argmax())
            self._fail(f"page offset 0x{int(offsets[j]):x} not a page of RAM block {block!r}", at + 8 * j)
        indices = (offsets >> PAGE_SHIFT).view(np.int64)  # < 2**52 after the check: same values
        if self._direct:
            return self._payload(p, MultifdPayload(block=block, packet_num=packet_num, npages=normal,
                                                   run=None, scattered=indices), sync)
        if avail < total:
            return self._wait(total, "multifd pages")
        self._start = p + total
        self._sync = sync
        data = np.ndarray((normal, PAGE_SIZE), np.uint8, self._buf, p + self._header_size)
        return MultifdPages(block=block, packet_num=packet_num, indices=indices, data=data)

    def _payload(self, p: int, event: MultifdPayload, sync: int | None) -> MultifdPayload:
        """(``direct``) Past the header at ``p``: its pages are the caller's to receive."""
        self._start = p + self._header_size
        self._state = _State.PAYLOAD
        self._payload_left = event.npages * PAGE_SIZE
        self._sync = sync  # returned once the payload is in
        return event

    def _run(self, at: int, n: int, block_pages: int) -> int | None:
        """The first page if the ``n`` offsets at ``at`` are consecutive pages, all in a block
        of ``block_pages`` (then they need no other check); else None. Read as one big-endian
        integer, the offsets of the run from offset ``f`` are ``f * R + S`` (``R`` has a 1 in
        each 64-bit digit, ``S`` the steps 0, 4096, 8192...), and no digit can carry inside
        a block: one integer comparison instead of an array."""
        digits, steps = _run_form(n)
        value = int.from_bytes(self._view[at : at + 8 * n], "big")
        first = value >> (64 * (n - 1))
        if first & RAM_FLAG_MASK or value != first * digits + steps:
            return None
        first >>= PAGE_SHIFT
        return first if first + n <= block_pages else None

    def _ramblock(self, at: int, field: bytes) -> tuple[str, int]:
        """The block a packet names, and its size in pages; the last one found is remembered
        (every packet of a channel names one block, as a rule)."""
        if field == self._last_ramblock[0]:
            return self._last_ramblock[1]
        length = field.find(b"\0")
        if length <= 0:
            self._fail("ramblock name empty or not NUL-terminated", at)
        if field.count(0, length) != len(field) - length:
            self._fail("bytes after the NUL of the ramblock name", at + length)
        name = self._text(at, length, "ramblock name")
        size = self._blocks.get(name)
        if size is None:
            self._fail(f"unknown RAM block {name!r}", at)
        self._last_ramblock = (field, (name, size >> PAGE_SHIFT))
        return name, size >> PAGE_SHIFT

    def _check_magic_version(self, p: int, magic: int, version: int) -> None:
        if magic != MULTIFD_MAGIC:
            self._fail(f"bad multifd magic 0x{magic:08x} (expected 0x{MULTIFD_MAGIC:08x})", p)
        if version != MULTIFD_VERSION:
            self._fail(f"multifd version {version} (only {MULTIFD_VERSION} is known)", p + 4)
