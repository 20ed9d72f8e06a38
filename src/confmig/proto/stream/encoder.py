"""Events to bytes: the sending half of the migration stream, with no I/O.

Framing functions return small ``bytes``; the hot path (:class:`PageBatchEncoder`) returns the
buffers of one gather write, the pages as views of guest RAM, so that no page is copied on the
way to the socket.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream.format import (
    MAX_BLOB,
    MAX_IDSTR,
    MAX_MACHINE_TYPE,
    MAX_RAM_BLOCKS,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
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

DEFAULT_BATCH_PAGES: Final = 1024
"""4 MiB of pages per batch: large enough that per-batch Python costs vanish."""
_ZERO_CHECK_CHUNK: Final = 256
"""Candidate pages copied at once by :func:`find_zero_pages` (1 MiB, cache-sized)."""
_SAMPLE_WORDS: Final = (0, PAGE_SIZE // 16, PAGE_SIZE // 8 - 1)
"""u64 words of a page read first: one of them is non-zero on almost every non-zero page."""

_PAGE_CONTINUE: Final = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_CONTINUE: Final = int(RamFlag.ZERO | RamFlag.CONTINUE)
_U64 = struct.Struct(">Q")
_TYPE_ID = struct.Struct(">BI")  # u8 section type, u32 section id


def header(machine_type: str) -> bytes:
    """File magic, version, and the CONFIGURATION record naming the machine type."""
    name = machine_type.encode()
    if not 0 < len(name) <= MAX_MACHINE_TYPE:
        raise ValueError(f"machine type must be 1..{MAX_MACHINE_TYPE} bytes, got {len(name)}")
    return (
        struct.pack(">IIBI", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, SectionType.CONFIGURATION, len(name))
        + name
    )


def ram_setup(section_id: int, blocks: Sequence[tuple[str, int]]) -> bytes:
    """The ``ram`` SECTION_START: header, MEM_SIZE record listing ``(idstr, used_length)``,
    EOS, footer, as QEMU's ``ram_save_setup``."""
    if not 0 < len(blocks) <= MAX_RAM_BLOCKS:
        raise ValueError(f"need 1..{MAX_RAM_BLOCKS} RAM blocks, got {len(blocks)}")
    entries = []
    for idstr, size in blocks:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM block {idstr}: size {size} is not a positive multiple of 4 KiB")
        entries.append(_counted(idstr) + _U64.pack(size))
    total = sum(size for _, size in blocks)
    return (
        _section_header(
            SectionType.SECTION_START,
            section_id,
            RAM_SECTION_IDSTR,
            RAM_SECTION_INSTANCE,
            RAM_SECTION_VERSION,
        )
        + _U64.pack(total | RamFlag.MEM_SIZE)
        + b"".join(entries)
        + eos_and_footer(section_id)
    )


def ram_part_begin(section_id: int) -> bytes:
    """SECTION_PART header opening one precopy iteration of the ``ram`` section."""
    return _TYPE_ID.pack(SectionType.SECTION_PART, section_id)


def ram_end_begin(section_id: int) -> bytes:
    """SECTION_END header opening the final (stop-and-copy) part of the ``ram`` section."""
    return _TYPE_ID.pack(SectionType.SECTION_END, section_id)


def eos_and_footer(section_id: int) -> bytes:
    """Close a ``ram`` section part: the EOS record, then the section footer."""
    return _U64.pack(RamFlag.EOS) + _TYPE_ID.pack(SectionType.SECTION_FOOTER, section_id)


def confidential_record(subtype: ConfidentialSubtype, payload: bytes) -> bytes:
    """A RAM record with flag CONFIDENTIAL (offset 0): u8 subtype, u32 length, payload.

    Not bound to a RAM block: any addressing lives inside the payload.
    """
    return confidential_header(subtype, len(payload)) + payload


def confidential_header(subtype: ConfidentialSubtype, length: int) -> bytes:
    """What comes before a CONFIDENTIAL record's ``length``-byte payload (for a writer that
    sends the payload from where it lies)."""
    if length > MAX_BLOB:
        raise ValueError(f"confidential payload of {length} bytes exceeds {MAX_BLOB}")
    return struct.pack(">QBI", RamFlag.CONFIDENTIAL, subtype, length)


def device_section(section_id: int, idstr: str, instance_id: int, version_id: int, state: bytes) -> bytes:
    """A SECTION_FULL whose body is u32 length + opaque device state, then the footer."""
    if idstr == RAM_SECTION_IDSTR:
        raise ValueError("'ram' is an iterative section, not a device section")
    if len(state) > MAX_BLOB:
        raise ValueError(f"device {idstr}: state of {len(state)} bytes exceeds {MAX_BLOB}")
    return (
        _section_header(SectionType.SECTION_FULL, section_id, idstr, instance_id, version_id)
        + struct.pack(">I", len(state))
        + state
        + _TYPE_ID.pack(SectionType.SECTION_FOOTER, section_id)
    )


def eof() -> bytes:
    return bytes([SectionType.EOF])


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDescription:
    """What the vmdescription says about one device section."""

    idstr: str
    instance_id: int
    version_id: int
    state_size: int


def vmdescription(devices: Iterable[DeviceDescription]) -> bytes:
    """The JSON trailer after EOF, in the shape QEMU's ``scripts/analyze-migration.py`` reads:
    each device is a u32 ``length`` field then a ``state`` buffer of that size."""
    desc = {
        "page_size": PAGE_SIZE,
        "devices": [
            {
                "name": d.idstr,
                "instance_id": d.instance_id,
                "vmsd_name": d.idstr,
                "version": d.version_id,
                "fields": [
                    {"name": "length", "type": "uint32", "size": 4},
                    {"name": "state", "type": "buffer", "size": d.state_size},
                ],
            }
            for d in devices
        ],
    }
    text = json.dumps(desc, separators=(",", ":")).encode()
    # analyze-migration.py finds the JSON as the first '{' after the last NUL byte, which is
    # inside our length field: a length byte equal to '{' would fool it. Pad until none is.
    while b"{" in struct.pack(">I", len(text)):
        text += b" "
    if len(text) > MAX_BLOB:
        raise ValueError(f"vmdescription of {len(text)} bytes exceeds {MAX_BLOB}")
    return struct.pack(">BI", SectionType.VMDESCRIPTION, len(text)) + text


def find_zero_pages(pages: PageArray, indices: IndexArray | None = None) -> npt.NDArray[np.bool_]:
    """Boolean mask: which of ``pages[indices]`` (or of all ``pages``) are entirely zero.

    Use it on the bulk first pass, where most pages of a fresh guest are zero: filtered here,
    they are never copied. Later passes can leave zero detection to :class:`PageBatchEncoder`.
    """
    words = _words(pages)
    if indices is None:
        return np.asarray(~words.any(axis=1), dtype=bool)
    mask = np.zeros(len(indices), dtype=bool)
    for start in range(0, len(indices), _ZERO_CHECK_CHUNK):
        chunk = indices[start : start + _ZERO_CHECK_CHUNK]
        mask[start + _zero_rows(words, chunk)] = True
    return mask


def encode_zero_pages(block: str, indices: IndexArray) -> bytes:
    """ZERO records for ``indices`` of ``block``: one standalone record naming the block,
    then ZERO|CONTINUE records of 9 bytes, built without a per-page loop."""
    n = len(indices)
    if n == 0:
        return b""
    name = _counted(block)
    out = np.empty(len(name) + n * ZERO_RECORD_SIZE, dtype=np.uint8)
    rows = out[len(name) :].reshape(n, ZERO_RECORD_SIZE)
    offsets = np.asarray(indices, dtype=np.int64) << PAGE_SHIFT
    rows[:, :8] = (offsets | _ZERO_CONTINUE).astype(">u8").view(np.uint8).reshape(n, 8)
    rows[:, 8] = 0
    # The first record also carries the block name; it ends exactly at row 0's fill byte.
    struct.pack_into(f">Q{len(name)}s", out.data, 0, int(offsets[0]) | RamFlag.ZERO, name)
    return out.tobytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class PageBatch:
    """One encoded batch, as the buffers of one gather write (QEMU's ``writev`` of an iovec
    list): record headers from the encoder, pages straight from guest RAM. Valid until the
    encoder's next ``encode``; a page sent later than encoded goes out as it is then (a page
    written meanwhile is dirty and goes again, as in QEMU)."""

    first: npt.NDArray[np.uint8]
    """The standalone first record's header: u64, u8 length, idstr."""
    heads: npt.NDArray[Any]
    """Every record's 8-byte header, as big-endian u64 (the first one's is replaced by ``first``)."""
    pages: PageArray
    """The RAM block."""
    sent: IndexArray
    """The non-zero pages, in the order given: one PAGE record each."""
    zero: IndexArray
    """Pages found to be zero and left out: send them with :func:`encode_zero_pages`, or the
    destination keeps their old contents."""

    def iovec(self) -> npt.NDArray[np.uint64]:
        """The records as ``struct iovec`` entries, ``(base, length)`` per row: header, page,
        header, page... Pointers into the arrays above, which must outlive the write."""
        m = len(self.sent)
        iov = np.empty((2 * m, 2), dtype=np.uint64)
        if m == 0:
            return iov
        # SECURITY: addresses for the kernel: the block is contiguous, every page inside it.
        check_indices(self.pages, self.sent)
        if len(self.heads) < m:
            raise IndexError(f"{m} pages but {len(self.heads)} record headers")
        iov[0::2, 0] = self.heads.ctypes.data + 8 * np.arange(m, dtype=np.uint64)
        iov[0::2, 1] = 8
        iov[0] = (self.first.ctypes.data, len(self.first))
        iov[1::2, 0] = self.pages.ctypes.data + (self.sent.astype(np.uint64) << PAGE_SHIFT)
        iov[1::2, 1] = PAGE_SIZE
        return iov

    @property
    def wire(self) -> bytes:
        """The records as one ``bytes`` (tests, the stream analyzer): what a channel writes."""
        return gathered(self.iovec())


def gathered(iov: npt.NDArray[np.uint64]) -> bytes:
    """The bytes ``struct iovec`` rows point at, in order, copied."""
    return b"".join(ctypes.string_at(int(base), int(n)) for base, n in iov)


class PageBatchEncoder:
    """Encodes batches of one RAM block's pages as PAGE records, without copying a page.

    Layout of a batch: a standalone PAGE record naming the block (so a batch never depends on
    what was sent before it), then uniform PAGE|CONTINUE records of 4104 bytes that the
    decoder recognises at a fixed stride. Each record is two buffers of a gather write: its
    8-byte header from a reusable array, its page where it lies in guest RAM, the way QEMU's
    ``ram_save_page`` queues a page with ``qemu_put_buffer_async``. Zero pages are found by
    sampling a few words of each page and reading in full only the pages that sample zero.
    """

    def __init__(self, max_pages: int = DEFAULT_BATCH_PAGES) -> None:
        if max_pages <= 0:
            raise ValueError("max_pages must be positive")
        self.max_pages = max_pages
        self._heads = np.empty(max_pages, dtype=">u8")
        self._first = np.empty(8 + 1 + MAX_IDSTR, dtype=np.uint8)

    def encode(self, block: str, pages: PageArray, indices: IndexArray) -> PageBatch:
        """Encode ``pages[indices]`` (``pages``: the whole block as ``(npages, 4096)``)."""
        n = len(indices)
        if not 0 < n <= self.max_pages:
            raise ValueError(f"batch of {n} pages (allowed 1..{self.max_pages})")
        indices = np.asarray(indices, dtype=np.int64)
        name = _counted(block)
        check_indices(pages, indices)  # numpy would wrap a negative index round
        zero_at = _zero_rows(pages.view(np.uint64), indices)
        if zero_at.size:
            keep = np.ones(n, dtype=bool)
            keep[zero_at] = False
            sent, zero = indices[keep], indices[zero_at]
        else:
            sent, zero = indices, indices[:0]
        m = len(sent)
        heads = self._heads[:m]
        first = self._first[: 8 + len(name)]
        if m:
            heads[:] = (sent << PAGE_SHIFT) | _PAGE_CONTINUE
            first_header = (int(sent[0]) << PAGE_SHIFT) | RamFlag.PAGE
            struct.pack_into(f">Q{len(name)}s", first.data, 0, first_header, name)
        return PageBatch(first=first, heads=heads, pages=pages, sent=sent, zero=zero)


def is_run(indices: IndexArray) -> bool:
    """Whether ``indices`` are consecutive pages (as a first round's mostly are)."""
    n = len(indices)
    if n == 0 or int(indices[-1]) - int(indices[0]) != n - 1:
        return False
    return n == 1 or not np.count_nonzero(indices[1:] - indices[:-1] != 1)


def check_indices(pages: PageArray, indices: IndexArray) -> None:
    """``pages`` is a whole RAM block (``(npages, 4096)`` bytes, C-contiguous) and every one of
    ``indices`` a page of it: IndexError or ValueError otherwise."""
    _check_pages(pages)
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(pages)):
        raise IndexError(f"page index out of range for a RAM block of {len(pages)} pages")


def _check_pages(pages: PageArray) -> None:
    if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE or pages.dtype != np.uint8:
        raise ValueError(f"pages must be (n, {PAGE_SIZE}) uint8, got {pages.shape} {pages.dtype}")
    if not pages.flags.c_contiguous:
        raise ValueError("pages must be C-contiguous (a RAM block view), or numpy would copy it")


def _words(pages: PageArray) -> npt.NDArray[np.uint64]:
    """``pages`` as ``(npages, 512)`` u64 words, without a copy."""
    _check_pages(pages)
    return pages.view(np.uint64)


def _zero_rows(words: npt.NDArray[np.uint64], rows: IndexArray) -> IndexArray:
    """Positions ``j`` such that page ``rows[j]`` of ``words`` is all zero. The sampled words,
    one after another, rule out nearly every non-zero page at its first (one cache line read
    per page, as QEMU's ``buffer_is_zero`` stops at the first non-zero bytes); only pages
    that sample zero throughout are read whole."""
    candidates = np.flatnonzero(words[rows, _SAMPLE_WORDS[0]] == 0)
    for w in _SAMPLE_WORDS[1:]:
        if not candidates.size:
            return candidates
        candidates = candidates[words[rows[candidates], w] == 0]
    if candidates.size:
        candidates = candidates[~words[rows[candidates]].any(axis=1)]
    return candidates


def _counted(idstr: str) -> bytes:
    """A name as the stream carries it: u8 length, then the bytes."""
    raw = idstr.encode()
    if not 0 < len(raw) <= MAX_IDSTR:
        raise ValueError(f"name {idstr!r} must be 1..{MAX_IDSTR} bytes")
    return bytes([len(raw)]) + raw


def _section_header(
    kind: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int
) -> bytes:
    return _TYPE_ID.pack(kind, section_id) + _counted(idstr) + struct.pack(">II", instance_id, version_id)
