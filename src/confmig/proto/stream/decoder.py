"""Bytes to events: the receiving half of the migration stream, sans-IO (after h11).

Bytes go in through ``get_buffer()`` + ``buffer_updated(n)`` (``recv_into``/``readinto`` straight
into the decoder's buffer) or ``receive_data(data)`` (one copy); ``feed_eof()`` says the input
ended. ``next_event()`` returns one event, or ``NEED_DATA``::

    decoder = StreamDecoder()
    while not isinstance(event := decoder.next_event(), End):
        if event is NEED_DATA:
            n = sock.recv_into(decoder.get_buffer())
            decoder.buffer_updated(n) if n else decoder.feed_eof()
        else:
            handle(event)

Arrays in events (``RamPages.data``) are views into the decoder's buffer: consume them before
the next call on the decoder. Every decode failure raises :class:`StreamError` naming what was
wrong and the stream offset, and leaves the decoder failed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Final, Generic, NoReturn, TypeVar

import numpy as np

from confmig.common.errors import StateError, StreamError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE, MiB
from confmig.proto.stream.format import (
    MAX_BLOB,
    MAX_MACHINE_TYPE,
    MAX_RAM_BLOCKS,
    PAGE_RECORD_SIZE,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_FLAG_MASK,
    RAM_SECTION_IDSTR,
    RAM_SECTION_INSTANCE,
    RAM_SECTION_VERSION,
    ZERO_RECORD_SIZE,
    ConfidentialSubtype,
    IndexArray,
    PageArray,
    RamFlag,
    SectionType,
)

DEFAULT_BUFFER_SIZE: Final = 4 * MiB
"""About 1000 page records: one ``RamPages`` event per ~4 MiB read keeps Python out of the
per-page path."""

_BE64: Final = np.dtype(">u8")
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U8_U32 = struct.Struct(">BI")
_U32_U32 = struct.Struct(">II")
_PAGE_CONTINUE: Final = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_CONTINUE: Final = int(RamFlag.ZERO | RamFlag.CONTINUE)


def fill_views(views: list[memoryview], data: memoryview | bytes) -> None:
    """Copy ``data`` into the start of ``views``, in order (no more than they hold)."""
    done = 0
    for view in views:
        if done == len(data):
            break
        n = min(len(view), len(data) - done)
        view[:n] = data[done : done + n]
        done += n


def views_after(views: list[memoryview], done: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``done`` bytes are filled."""
    for k, view in enumerate(views):
        if done < len(view):
            return [view[done:], *views[k + 1 :]] if done else views[k:]
        done -= len(view)
    return []


class NeedData(Enum):
    """``next_event`` needs more input before it can return an event."""

    NEED_DATA = auto()


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class End:
    """The input ended, cleanly, after a complete stream."""


E = TypeVar("E")


class ReceiveBuffer(Generic[E]):
    """Received, not yet decoded bytes in one large buffer (asyncio ``BufferedProtocol`` style).

    The unconsumed tail moves to the front only when the free space behind it runs short,
    and the buffer grows only when one record is larger than it (bounded by the records'
    own size limits).
    """

    def __init__(self, capacity: int) -> None:
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet decoded
        self._end = 0  # end of received bytes
        self._base = 0  # stream offset of self._buf[0]
        self._need = 1  # bytes from _start the decoder needs to make progress
        self._eof = False
        self._error: StreamError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet decoded."""
        return self._base + self._start

    def get_buffer(self) -> memoryview:
        """Writable space to receive into; report how much was written with ``buffer_updated``."""
        if self._eof:
            raise StateError("get_buffer", "input ended", "before feed_eof")
        pending = self._end - self._start
        self._make_room(max(self._need - pending, len(self._buf) // 4))
        return self._view[self._end :]

    def wanted(self) -> int:
        """Bytes the decoder still needs to make progress: a reader that receives no more than
        this leaves what follows (a payload it can receive elsewhere) in the socket."""
        return max(self._need - (self._end - self._start), 1)

    def buffer_updated(self, nbytes: int) -> None:
        if self._eof:
            raise StateError("buffer_updated", "input ended", "before feed_eof")
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({nbytes}) exceeds the buffer handed out")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append a copy of ``data``."""
        if self._eof:
            raise StateError("receive_data", "input ended", "before feed_eof")
        n = len(data)
        self._make_room(n)
        self._view[self._end : self._end + n] = data
        self._end += n

    def feed_eof(self) -> None:
        """The input ended: from now on a record cut short is an error, not a wait."""
        self._eof = True

    def next_event(self) -> E | NeedData:
        if self._error is not None:
            raise StreamError(f"stream already failed: {self._error}")
        try:
            return self._step()
        except StreamError as exc:
            self._error = exc
            raise

    def _step(self) -> E | NeedData:
        raise NotImplementedError

    def _make_room(self, n: int) -> None:
        """Ensure ``n`` writable bytes after ``_end``."""
        pending = self._end - self._start
        if len(self._buf) - self._end >= n:
            return
        if pending + n <= len(self._buf):
            # memoryview assignment memmoves overlapping ranges (bytearray's would memcpy).
            self._view[:pending] = self._view[self._start : self._end]
        else:
            grown = bytearray(pending + n)
            grown[:pending] = self._view[self._start : self._end]
            self._buf, self._view = grown, memoryview(grown)
        self._base += self._start
        self._start, self._end = 0, pending

    def _wait(self, size: int, what: str) -> NeedData:
        """Ask for ``size`` bytes from ``_start``; at end of input that means truncation."""
        if self._eof:
            self._fail(
                f"truncated: {what} needs {size} bytes, input ends after {self._end - self._start}",
                self._start,
            )
        self._need = size
        return NEED_DATA

    def _error_at(self, message: str, at: int) -> StreamError:
        return StreamError(f"{message} (at stream offset {self._base + at})")

    def _fail(self, message: str, at: int) -> NoReturn:
        raise self._error_at(message, at)

    def _text(self, at: int, length: int, what: str) -> str:
        # SECURITY: peer-controlled bytes; strict UTF-8 or a StreamError.
        try:
            return str(self._view[at : at + length], "utf-8")
        except UnicodeDecodeError as exc:
            raise self._error_at(f"{what} is not UTF-8", at) from exc


# Events, in stream order. -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    version: int
    machine_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionStart:
    """SECTION_START (``full=False``, only ``ram``) or SECTION_FULL (a device)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    full: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionPart:
    section_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionEnd:
    section_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionFooter:
    section_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RamMemSize:
    blocks: tuple[tuple[str, int], ...]
    """``(idstr, used_length in bytes)`` for every RAM block."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RamPages:
    """Pages of one block: ``data[i]`` is page ``indices[i]``. ``data`` is a view into the
    decoder's buffer, valid until the next call on the decoder."""

    block: str
    indices: IndexArray
    data: PageArray


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RamZeroPages:
    block: str
    indices: IndexArray


@dataclass(frozen=True, slots=True, kw_only=True)
class RamEos:
    """End of this part of the ``ram`` section."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Confidential:
    subtype: ConfidentialSubtype
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    state: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Eof:
    """QEMU_VM_EOF: the migration state is complete (a vmdescription may follow)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VmDescription:
    json: dict[str, Any]


StreamEvent = (
    Header
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFooter
    | RamMemSize
    | RamPages
    | RamZeroPages
    | RamEos
    | Confidential
    | DeviceState
    | Eof
    | VmDescription
    | End
)


class _State(Enum):
    HEADER = auto()
    SECTION = auto()  # between sections: a section header or EOF comes next
    RAM = auto()  # inside a ram section part: RAM records until EOS
    DEVICE = auto()  # inside a SECTION_FULL: u32 length + state
    FOOTER = auto()
    AFTER_EOF = auto()  # a vmdescription or the end of input
    AFTER_VMDESCRIPTION = auto()  # only the end of input
    DONE = auto()


class StreamDecoder(ReceiveBuffer[StreamEvent]):
    """Decodes one migration stream (the main channel) into :data:`StreamEvent` values.

    Runs of uniform PAGE|CONTINUE records (ZERO|CONTINUE records) in the buffer come out as one
    ``RamPages`` (``RamZeroPages``) event, found by checking every record header at once at a
    fixed stride.
    """

    def __init__(self, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        super().__init__(buffer_size)
        self._state = _State.HEADER
        self._section = -1  # the section whose body or footer comes next
        self._section_ids: set[int] = set()
        self._device: SectionStart | None = None
        self._ram_section: int | None = None
        self._ram_open = False
        self._blocks: dict[str, int] = {}  # idstr -> pages, from MEM_SIZE
        self._block: str | None = None  # block of the last record that named one
        self._block_pages = 0

    def _step(self) -> StreamEvent | NeedData:
        state = self._state
        if state is _State.RAM:
            return self._ram_record()
        if state is _State.SECTION:
            return self._section_header()
        if state is _State.FOOTER:
            return self._footer()
        if state is _State.DEVICE:
            return self._device_state()
        if state is _State.HEADER:
            return self._header()
        if state is _State.AFTER_EOF:
            return self._vmdescription()
        if state is _State.AFTER_VMDESCRIPTION:
            return self._end_of_input()
        return End()

    def _header(self) -> Header | NeedData:
        p, avail = self._start, self._end - self._start
        if avail < 8:
            return self._wait(8, "file header")
        magic, version = _U32_U32.unpack_from(self._buf, p)
        if magic != QEMU_VM_FILE_MAGIC:
            self._fail(f"bad file magic 0x{magic:08x} (expected 0x{QEMU_VM_FILE_MAGIC:08x})", p)
        if version != QEMU_VM_FILE_VERSION:
            self._fail(f"stream version {version} (only {QEMU_VM_FILE_VERSION} is known)", p + 4)
        if avail > 8 and self._buf[p + 8] != SectionType.CONFIGURATION:
            tag = self._buf[p + 8]
            self._fail(f"expected CONFIGURATION (0x07) after the file header, got 0x{tag:02x}", p + 8)
        if avail < 13:
            return self._wait(13, "CONFIGURATION record")
        (length,) = _U32.unpack_from(self._buf, p + 9)
        if not 0 < length <= MAX_MACHINE_TYPE:
            self._fail(f"machine type length {length} (allowed 1..{MAX_MACHINE_TYPE})", p + 9)
        if avail < 13 + length:
            return self._wait(13 + length, "CONFIGURATION record")
        machine_type = self._text(p + 13, length, "machine type")
        self._start = p + 13 + length
        self._state = _State.SECTION
        return Header(version=version, machine_type=machine_type)

    def _section_header(self) -> StreamEvent | NeedData:
        p, avail = self._start, self._end - self._start
        if avail < 1:
            return self._wait(1, "section header")
        kind = self._buf[p]
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            return self._section_open(p, avail, full=kind == SectionType.SECTION_FULL)
        if kind in (SectionType.SECTION_PART, SectionType.SECTION_END):
            if avail < 5:
                return self._wait(5, "section header")
            (section_id,) = _U32.unpack_from(self._buf, p + 1)
            name = SectionType(kind).name
            if section_id != self._ram_section or not self._ram_open:
                self._fail(f"{name} for section {section_id}, not an open 'ram' section", p + 1)
            self._ram_open = kind == SectionType.SECTION_PART
            self._section = section_id
            self._start = p + 5
            self._state = _State.RAM
            if kind == SectionType.SECTION_PART:
                return SectionPart(section_id=section_id)
            return SectionEnd(section_id=section_id)
        if kind == SectionType.EOF:
            if self._ram_open:
                self._fail(f"EOF while 'ram' section {self._ram_section} has not ended", p)
            self._start = p + 1
            self._state = _State.AFTER_EOF
            return Eof()
        try:
            what = f"{SectionType(kind).name} (0x{kind:02x}) where a section header belongs"
        except ValueError:
            what = f"unknown section type 0x{kind:02x}"
        self._fail(what, p)

    def _section_open(self, p: int, avail: int, *, full: bool) -> SectionStart | NeedData:
        if avail < 6:
            return self._wait(6, "section header")
        section_id, length = _U32.unpack_from(self._buf, p + 1)[0], self._buf[p + 5]
        if length == 0:
            self._fail("empty section idstr", p + 5)
        if avail < 14 + length:
            return self._wait(14 + length, "section header")
        idstr = self._text(p + 6, length, "section idstr")
        instance_id, version_id = _U32_U32.unpack_from(self._buf, p + 6 + length)
        if section_id in self._section_ids:
            self._fail(f"section id {section_id} opened twice", p + 1)
        if idstr == RAM_SECTION_IDSTR:
            if full:
                self._fail("'ram' sent as SECTION_FULL; it is an iterative section", p)
            if self._ram_section is not None:
                self._fail("a second 'ram' section", p)
            if (instance_id, version_id) != (RAM_SECTION_INSTANCE, RAM_SECTION_VERSION):
                self._fail(
                    f"'ram' instance {instance_id} version {version_id} (expected "
                    f"{RAM_SECTION_INSTANCE}, {RAM_SECTION_VERSION})",
                    p + 6 + length,
                )
            self._ram_section = section_id
            self._ram_open = True
            self._state = _State.RAM
        elif not full:
            self._fail(f"SECTION_START for {idstr!r}: only 'ram' is iterative", p)
        else:
            self._state = _State.DEVICE
        self._section_ids.add(section_id)
        self._section = section_id
        self._start = p + 14 + length
        event = SectionStart(
            section_id=section_id,
            idstr=idstr,
            instance_id=instance_id,
            version_id=version_id,
            full=full,
        )
        self._device = event if full else None
        return event

    def _footer(self) -> SectionFooter | NeedData:
        p = self._start
        if self._end - p < 5:
            return self._wait(5, "section footer")
        tag, section_id = _U8_U32.unpack_from(self._buf, p)
        if tag != SectionType.SECTION_FOOTER:
            self._fail(f"expected the footer of section {self._section}, got 0x{tag:02x}", p)
        if section_id != self._section:
            self._fail(f"footer names section {section_id}, open is {self._section}", p + 1)
        self._start = p + 5
        self._state = _State.SECTION
        return SectionFooter(section_id=section_id)

    def _device_state(self) -> DeviceState | NeedData:
        p, avail = self._start, self._end - self._start
        if avail < 4:
            return self._wait(4, "device state")
        (length,) = _U32.unpack_from(self._buf, p)
        # SECURITY: peer-controlled length; bounded before it can size the buffer.
        if length > MAX_BLOB:
            self._fail(f"device state of {length} bytes (limit {MAX_BLOB})", p)
        if avail < 4 + length:
            return self._wait(4 + length, "device state")
        head = self._device
        assert head is not None  # set with _State.DEVICE
        self._start = p + 4 + length
        self._state = _State.FOOTER
        return DeviceState(
            section_id=head.section_id,
            idstr=head.idstr,
            instance_id=head.instance_id,
            version_id=head.version_id,
            state=bytes(self._view[p + 4 : p + 4 + length]),
        )

    # RAM records ---------------------------------------------------------------------

    def _ram_record(self) -> StreamEvent | NeedData:
        p, avail = self._start, self._end - self._start
        if avail < 8:
            return self._wait(8, "RAM record")
        (word,) = _U64.unpack_from(self._buf, p)
        flags = word & RAM_FLAG_MASK
        if flags == _PAGE_CONTINUE:
            return self._page_run(p, avail)
        if flags == _ZERO_CONTINUE:
            return self._zero_run(p, avail)
        offset = word ^ flags
        if flags in (RamFlag.PAGE, RamFlag.ZERO):
            return self._named_page(p, avail, offset, flags)
        if flags == RamFlag.EOS:
            if offset:
                self._fail(f"EOS record with offset bits 0x{offset:x}", p)
            self._start = p + 8
            self._state = _State.FOOTER
            return RamEos()
        if flags == RamFlag.MEM_SIZE:
            return self._mem_size(p, offset)
        if flags == RamFlag.CONFIDENTIAL:
            return self._confidential(p, avail, offset)
        self._fail(f"unsupported RAM record flags 0x{flags:03x} ({RamFlag(flags).name})", p)

    def _page_run(self, p: int, avail: int) -> RamPages | NeedData:
        if self._block is None:
            self._fail("PAGE|CONTINUE before any record named a RAM block", p)
        n = avail // PAGE_RECORD_SIZE
        if n == 0:
            return self._wait(PAGE_RECORD_SIZE, "page record")
        heads = np.ndarray((n,), _BE64, self._buf, p, (PAGE_RECORD_SIZE,))
        if n > 1:
            other = (heads & RAM_FLAG_MASK) != _PAGE_CONTINUE
            if other.any():
                n = int(other.argmax())
                heads = heads[:n]
        indices = (heads >> PAGE_SHIFT).astype(np.int64)
        self._check_in_block(indices, p, PAGE_RECORD_SIZE)
        self._start = p + n * PAGE_RECORD_SIZE
        data = np.ndarray((n, PAGE_SIZE), np.uint8, self._buf, p + 8, (PAGE_RECORD_SIZE, 1))
        return RamPages(block=self._block, indices=indices, data=data)

    def _zero_run(self, p: int, avail: int) -> RamZeroPages | NeedData:
        if self._block is None:
            self._fail("ZERO|CONTINUE before any record named a RAM block", p)
        n = avail // ZERO_RECORD_SIZE
        if n == 0:
            return self._wait(ZERO_RECORD_SIZE, "zero-page record")
        heads = np.ndarray((n,), _BE64, self._buf, p, (ZERO_RECORD_SIZE,))
        if n > 1:
            other = (heads & RAM_FLAG_MASK) != _ZERO_CONTINUE
            if other.any():
                n = int(other.argmax())
                heads = heads[:n]
        fills = np.ndarray((n,), np.uint8, self._buf, p + 8, (ZERO_RECORD_SIZE,))
        if fills.any():
            j = int(fills.argmax())
            self._fail(f"zero-page fill byte 0x{int(fills[j]):02x} (must be 0)", p + j * 9 + 8)
        indices = (heads >> PAGE_SHIFT).astype(np.int64)
        self._check_in_block(indices, p, ZERO_RECORD_SIZE)
        self._start = p + n * ZERO_RECORD_SIZE
        return RamZeroPages(block=self._block, indices=indices)

    def _named_page(self, p: int, avail: int, offset: int, flags: int) -> RamPages | RamZeroPages | NeedData:
        if avail < 9:
            return self._wait(9, "RAM record")
        length = self._buf[p + 8]
        if length == 0:
            self._fail("empty RAM block idstr", p + 8)
        size = 9 + length + (PAGE_SIZE if flags == RamFlag.PAGE else 1)
        if avail < size:
            return self._wait(size, "RAM record")
        name = self._text(p + 9, length, "RAM block idstr")
        npages = self._blocks.get(name)
        if npages is None:
            self._fail(f"RAM block {name!r} was not announced by MEM_SIZE", p + 9)
        self._block, self._block_pages = name, npages
        indices = np.array([offset >> PAGE_SHIFT], dtype=np.int64)
        self._check_in_block(indices, p, 0)
        self._start = p + size
        if flags == RamFlag.PAGE:
            data = np.ndarray((1, PAGE_SIZE), np.uint8, self._buf, p + 9 + length)
            return RamPages(block=name, indices=indices, data=data)
        fill = self._buf[p + 9 + length]
        if fill:
            self._fail(f"zero-page fill byte 0x{fill:02x} (must be 0)", p + 9 + length)
        return RamZeroPages(block=name, indices=indices)

    def _check_in_block(self, indices: IndexArray, p: int, stride: int) -> None:
        # SECURITY: peer-controlled offsets become indices into guest RAM: bounds-check all.
        beyond = indices >= self._block_pages
        if beyond.any():
            j = int(beyond.argmax())
            self._fail(
                f"page offset 0x{int(indices[j]) << PAGE_SHIFT:x} beyond RAM block "
                f"{self._block!r} of {self._block_pages << PAGE_SHIFT} bytes",
                p + j * stride,
            )

    def _mem_size(self, p: int, total: int) -> RamMemSize | NeedData:
        if self._blocks:
            self._fail("a second MEM_SIZE record", p)
        if total == 0:
            self._fail("MEM_SIZE announces no RAM", p)
        blocks: list[tuple[str, int]] = []
        q, remaining = p + 8, total
        while remaining:
            if len(blocks) == MAX_RAM_BLOCKS:
                self._fail(f"MEM_SIZE lists more than {MAX_RAM_BLOCKS} RAM blocks", q)
            if self._end - q < 1:
                return self._wait(q + 1 - p, "MEM_SIZE record")
            length = self._buf[q]
            if length == 0:
                self._fail("empty RAM block idstr", q)
            if self._end - q < 9 + length:
                return self._wait(q + 9 + length - p, "MEM_SIZE record")
            name = self._text(q + 1, length, "RAM block idstr")
            (size,) = _U64.unpack_from(self._buf, q + 1 + length)
            if size == 0 or size % PAGE_SIZE or size > remaining:
                self._fail(
                    f"RAM block {name!r} of {size} bytes: not a positive multiple of "
                    f"{PAGE_SIZE} within the {remaining} bytes MEM_SIZE has left",
                    q + 1 + length,
                )
            if any(name == seen for seen, _ in blocks):
                self._fail(f"RAM block {name!r} listed twice", q + 1)
            blocks.append((name, size))
            remaining -= size
            q += 9 + length
        self._blocks = {name: size >> PAGE_SHIFT for name, size in blocks}
        self._start = q
        return RamMemSize(blocks=tuple(blocks))

    def _confidential(self, p: int, avail: int, offset: int) -> Confidential | NeedData:
        if offset:
            self._fail(f"CONFIDENTIAL record with offset bits 0x{offset:x}", p)
        if avail < 13:
            return self._wait(13, "confidential record")
        # SECURITY: peer-controlled length; bounded before it can size the buffer.
        raw_subtype, length = _U8_U32.unpack_from(self._buf, p + 8)
        try:
            subtype = ConfidentialSubtype(raw_subtype)
        except ValueError as exc:
            raise self._error_at(f"unknown confidential subtype {raw_subtype}", p + 8) from exc
        if length > MAX_BLOB:
            self._fail(f"confidential payload of {length} bytes (limit {MAX_BLOB})", p + 9)
        if avail < 13 + length:
            return self._wait(13 + length, "confidential record")
        self._start = p + 13 + length
        return Confidential(subtype=subtype, payload=bytes(self._view[p + 13 : p + 13 + length]))

    # After EOF -------------------------------------------------------------------------

    def _vmdescription(self) -> VmDescription | End | NeedData:
        p, avail = self._start, self._end - self._start
        if avail == 0:
            return self._end_of_input()
        if self._buf[p] != SectionType.VMDESCRIPTION:
            self._fail(f"0x{self._buf[p]:02x} after EOF (only a VMDESCRIPTION may follow)", p)
        if avail < 5:
            return self._wait(5, "vmdescription")
        (length,) = _U32.unpack_from(self._buf, p + 1)
        # SECURITY: peer-controlled length; bounded before it can size the buffer.
        if length > MAX_BLOB:
            self._fail(f"vmdescription of {length} bytes (limit {MAX_BLOB})", p + 1)
        if avail < 5 + length:
            return self._wait(5 + length, "vmdescription")
        try:
            # SECURITY: peer-controlled JSON, size-bounded above.
            desc = json.loads(bytes(self._view[p + 5 : p + 5 + length]))
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise self._error_at(f"vmdescription is not valid JSON: {exc}", p + 5) from exc
        if not isinstance(desc, dict):
            self._fail("vmdescription is not a JSON object", p + 5)
        self._start = p + 5 + length
        self._state = _State.AFTER_VMDESCRIPTION
        return VmDescription(json=desc)

    def _end_of_input(self) -> End | NeedData:
        if self._end > self._start:
            self._fail("trailing bytes after the end of the stream", self._start)
        if not self._eof:
            self._need = 1
            return NEED_DATA
        self._state = _State.DONE
        return End()
