"""The ``ram`` section: which pages to send, putting them on the wire, landing them.

Source: a migration bitmap per RAM block (all set at the start), refreshed at
each sync from KVM's dirty log of every slot and the VMM's own writes
(:class:`RamSender`, the engine's :class:`DirtyLog`). A round takes every set
bit, clears it and hands the pages out in batches; :class:`MainChannelSink`
sends a batch as one gather write, record headers and pages straight from
guest RAM (zero pages found by sampling and left out). Target: scatter whole
batches into guest RAM with numpy (:class:`RamLanding`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from confmig.common.clock import Clock
from confmig.common.units import PAGE_SHIFT
from confmig.kvm.client import VmFd
from confmig.proto.stream.encoder import is_run
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import DeviceSection, StreamWriter
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration.transport import Channel

BATCH_PAGES = 1024
"""Pages per batch unless a backend asks otherwise (4 MiB, two gather writes of 512 records):
the engine looks for a cancel and paces the bandwidth between batches."""
MAX_BATCH_PAGES = 8192
"""The largest batch a backend may ask for (32 MiB): the main channel's writer is sized for it."""
ZERO_BATCH_PAGES = 8192
"""Zero pages per record batch: 9 bytes each on the wire, so batches can be big."""
BANDWIDTH_WINDOW = 0.1
"""QEMU's BUFFER_DELAY: bandwidth is limited over 100 ms windows."""


class Cancelled(Exception):
    """``migrate_cancel`` was called; unwinds the migration thread."""


class RateLimiter:
    """``max-bandwidth`` over 100 ms windows, as QEMU's rate limiter."""

    def __init__(self, max_bandwidth: int, cancel: threading.Event, clock: Clock) -> None:
        self.max_bandwidth = max_bandwidth
        self._cancel = cancel
        self._clock = clock
        self._window_start = clock.monotonic()
        self._window_bytes = 0

    def account(self, nbytes: int) -> None:
        self._window_bytes += nbytes
        budget = self.max_bandwidth * BANDWIDTH_WINDOW
        if self._window_bytes < budget:
            return
        wait = self._window_start + self._window_bytes / self.max_bandwidth - self._clock.monotonic()
        if wait > 0 and self._cancel.wait(wait):
            raise Cancelled
        self._window_start = self._clock.monotonic()
        self._window_bytes = 0


@dataclass
class RoundCounters:
    """What one batch (or a whole round) put on the wire."""

    normal: int = 0
    """Pages sent with their contents (in whatever form the backend sends them)."""
    zero: int = 0
    """Pages sent as zero pages (QEMU's ``duplicate``)."""
    bytes: int = 0

    def __iadd__(self, other: RoundCounters) -> RoundCounters:
        self.normal += other.normal
        self.zero += other.zero
        self.bytes += other.bytes
        return self


Batch = tuple[RamBlock, npt.NDArray[np.int64], bool]
"""A block, page indices within it, and whether they are known to be zero."""


class PageSink(Protocol):
    """Puts batches of a block's pages on the wire; returns what was sent."""

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters: ...

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters: ...


class DirtyLog(Protocol):
    """Which pages still have to be sent (QEMU's migration bitmap)."""

    def sync(self) -> int:
        """Fold in what was written since the last sync; return how many pages are dirty."""
        ...

    def take_round(self, batch_pages: int) -> Iterator[Batch]:
        """Hand out every dirty page once, in batches of up to ``batch_pages``, clearing them
        as they go."""
        ...


class RamSender:
    """The source's migration bitmap (a :class:`DirtyLog` over KVM's log and the VMM's writes)."""

    def __init__(self, memory: GuestMemory, vm: VmFd) -> None:
        self.memory = memory
        self.vm = vm
        self.bitmap: dict[str, npt.NDArray[np.bool_]] = {
            b.idstr: np.ones(b.npages, dtype=bool) for b in memory.blocks
        }
        self._holes: dict[str, npt.NDArray[np.bool_]] | None = {
            b.idstr: b.holes() for b in memory.blocks
        }
        """Never-written pages, known zero for the first round only."""

    def dirty_pages(self) -> int:
        return int(sum(int(np.count_nonzero(bm)) for bm in self.bitmap.values()))

    def sync(self) -> int:
        """Fold KVM's dirty log and the VMM's own writes into the bitmap (QEMU's
        ``migration_bitmap_sync``); return how many pages are now dirty."""
        for block in self.memory.blocks:
            bm = self.bitmap[block.idstr]
            for r in block.regions:
                first = r.offset >> PAGE_SHIFT
                n = r.size >> PAGE_SHIFT
                bm[first : first + n] |= self.vm.get_dirty_log(r.slot, n)
            bm |= block.take_vmm_dirty()
        return self.dirty_pages()

    def take_round(self, batch_pages: int) -> Iterator[Batch]:
        """Yield (block, batch of page indices, known zero) for every dirty page,
        clearing the bits as the pages are handed out (a page dirtied later is set
        again at the next sync). In the first round, never-written pages come as
        known-zero batches of their own."""
        holes, self._holes = self._holes, None
        for block in self.memory.blocks:
            bm = self.bitmap[block.idstr]
            idx = np.flatnonzero(bm).astype(np.int64, copy=False)
            bm.fill(False)  # every bit that was set is in idx (a fancy clear took ~3 ms per GiB)
            if holes is not None and (hole := holes[block.idstr]).any():
                known_zero = hole[idx]
                yield from _batches(block, idx[known_zero], True, ZERO_BATCH_PAGES)
                idx = idx[~known_zero]
            yield from _batches(block, idx, False, batch_pages)


def _batches(block: RamBlock, idx: npt.NDArray[np.int64], zero: bool, size: int) -> Iterator[Batch]:
    for start in range(0, len(idx), size):
        yield block, idx[start : start + size], zero


class MainChannelSink:
    """The main channel's records, written through the stream's writer, so that nothing can
    leave out of QEMU's order: the engine opens and closes the parts, backends (which get
    only this object, not the channel) put RAM records inside them: QEMU's normal and zero
    pages, and confidential records."""

    def __init__(self, channel: Channel, writer: StreamWriter) -> None:
        self._channel = channel
        self._writer = writer

    # --- the engine's: the stream's frame ---------------------------------------------

    def open_stream(self, blocks: Sequence[tuple[str, int]]) -> None:
        self._channel.send_all(self._writer.setup(blocks))

    def begin_round(self) -> None:
        self._channel.send_all(self._writer.begin_round())

    def begin_final(self) -> None:
        self._channel.send_all(self._writer.begin_final())

    def end_part(self) -> None:
        self._channel.send_all(self._writer.end_part())

    def close_stream(self, sections: Iterable[DeviceSection]) -> None:
        """Every device section, EOF and the vmdescription, in one write."""
        w = self._writer
        self._channel.send_all(b"".join(w.device(s) for s in sections) + w.eof())

    # --- records inside a part (backends) -----------------------------------------------

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        batch = self._writer.pages(block.idstr, block.pages, indices)
        sent = self._channel.send_iovec(batch.iovec(), owner=batch)
        nzero = len(batch.zero)
        if nzero:
            sent += self._channel.send_all(self._writer.zero_pages(block.idstr, batch.zero))
        return RoundCounters(normal=len(indices) - nzero, zero=nzero, bytes=sent)

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        sent = self._channel.send_all(self._writer.zero_pages(block.idstr, indices))
        return RoundCounters(zero=len(indices), bytes=sent)

    def confidential(self, subtype: ConfidentialSubtype, payloads: Sequence[bytes | memoryview]) -> int:
        """CONFIDENTIAL records, one per payload, in one gather write (each payload sent from
        where it lies: a Migration Handler's record from its mailbox); returns the bytes sent."""
        parts: list[bytes | memoryview] = []
        for p in payloads:
            parts += (self._writer.confidential_header(subtype, memoryview(p).nbytes), p)
        return self._channel.send_parts(parts)


class RamLanding:
    """Where received pages go on the target. Guest RAM of an incoming VM starts
    zero, so a zero page only needs writing where data landed before (unless
    ``starts_zero`` is False: a target that ran before)."""

    def __init__(self, memory: GuestMemory, *, starts_zero: bool = True) -> None:
        self.blocks = {b.idstr: b for b in memory.blocks}
        self._written = {b.idstr: np.full(b.npages, not starts_zero) for b in memory.blocks}

    def pages(self, block: str, indices: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]) -> None:
        """Scatter a batch of received pages into guest RAM (one numpy copy)."""
        b = self.blocks[block]
        n = len(indices)
        if is_run(indices):
            b.pages[indices[0] : indices[0] + n] = data  # a run: plain slice copy
        else:
            b.pages[indices] = data
        self._written[block][indices] = True

    def run_destination(self, block: str, first: int, npages: int) -> memoryview:
        """Where pages ``first`` to ``first + npages`` of ``block`` go, to receive them in
        place. The caller checked the run against the block."""
        self._written[block][first : first + npages] = True
        start = first << PAGE_SHIFT
        return self.blocks[block].bytes.data[start : start + (npages << PAGE_SHIFT)]

    def page_destinations(self, block: str, indices: npt.NDArray[np.int64]) -> list[memoryview]:
        """Where pages ``indices`` of ``block`` go, one view per page. The caller checked the
        indices against the block."""
        self._written[block][indices] = True
        pages = self.blocks[block].pages
        return [pages[int(i)].data for i in indices]

    def zeros(self, block: str, indices: npt.NDArray[np.int64]) -> None:
        written = self._written[block]
        dirty = indices[written[indices]]
        if len(dirty):
            self.blocks[block].pages[dirty] = 0
            written[dirty] = False
