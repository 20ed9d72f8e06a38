"""The ``ram`` section: which pages to send, and landing them on the target.

Source: a migration bitmap per RAM block (all set at the start), refreshed at
each sync from KVM's dirty log of every slot and the VMM's own writes. A round
takes every set bit, clears it and sends the pages in batches: one numpy gather
per batch into the wire buffer, zero pages detected on that buffer, one
``send`` per batch. Target: scatter whole batches into guest RAM with numpy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.kvm.client import VmFd
from confmig.proto.stream import encoder as enc
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.transport import Channel

BATCH_PAGES = 256
"""Pages per send: 1 MiB writes are what loopback TCP needs to approach its limit."""
BANDWIDTH_WINDOW = 0.1
"""QEMU's BUFFER_DELAY: bandwidth is limited over 100 ms windows."""


class Cancelled(Exception):
    """``migrate_cancel`` was called; unwinds the migration thread."""


class RateLimiter:
    """``max-bandwidth`` over 100 ms windows, as QEMU's rate limiter."""

    def __init__(self, max_bandwidth: int, cancel: threading.Event) -> None:
        self.max_bandwidth = max_bandwidth
        self._cancel = cancel
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def account(self, nbytes: int) -> None:
        self._window_bytes += nbytes
        budget = self.max_bandwidth * BANDWIDTH_WINDOW
        if self._window_bytes < budget:
            return
        wait = self._window_start + self._window_bytes / self.max_bandwidth - time.monotonic()
        if wait > 0 and self._cancel.wait(wait):
            raise Cancelled
        self._window_start = time.monotonic()
        self._window_bytes = 0


@dataclass
class RoundCounters:
    normal: int = 0
    zero: int = 0
    bytes: int = 0


PageSink = Callable[[RamBlock, npt.NDArray[np.int64]], RoundCounters]
"""Sends one batch of pages of a block; returns what went on the wire."""


class RamSender:
    """The source's migration bitmap and page batching."""

    def __init__(self, memory: GuestMemory, vm: VmFd) -> None:
        self.memory = memory
        self.vm = vm
        self.bitmap: dict[str, npt.NDArray[np.bool_]] = {
            b.idstr: np.ones(b.npages, dtype=bool) for b in memory.blocks
        }

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

    def take_round(self) -> Iterator[tuple[RamBlock, npt.NDArray[np.int64]]]:
        """Yield (block, batch of page indices) for every dirty page, clearing the
        bits as the pages are handed out (a page dirtied later is set again at
        the next sync)."""
        for block in self.memory.blocks:
            bm = self.bitmap[block.idstr]
            idx = np.flatnonzero(bm).astype(np.int64)
            bm[idx] = False
            for start in range(0, len(idx), BATCH_PAGES):
                yield block, idx[start : start + BATCH_PAGES]


class MainChannelSink:
    """Pages on the main channel as QEMU's ``ram`` records (normal and zero)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.encoder = enc.PageBatchEncoder(BATCH_PAGES)

    def __call__(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        batch = self.encoder.encode(block.idstr, block.pages, indices)
        sent = self.channel.send_all(batch.wire) if len(batch.wire) else 0
        nzero = len(batch.zero)
        if nzero:
            sent += self.channel.send_all(enc.encode_zero_pages(block.idstr, batch.zero))
        return RoundCounters(normal=len(indices) - nzero, zero=nzero, bytes=sent)


def send_round(sender: RamSender, sink: PageSink, stats: MigrationStats, limiter: RateLimiter,
               cancel: threading.Event, *, downtime: bool = False) -> RoundCounters:
    total = RoundCounters()
    for block, indices in sender.take_round():
        if cancel.is_set():
            raise Cancelled
        c = sink(block, indices)
        total.normal += c.normal
        total.zero += c.zero
        total.bytes += c.bytes
        stats.normal += c.normal
        stats.duplicate += c.zero
        stats.transferred += c.bytes
        if downtime:
            stats.downtime_bytes += c.bytes
        else:
            stats.precopy_bytes += c.bytes
            limiter.account(c.bytes)
    return total


def land_pages(block: RamBlock, indices: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]) -> None:
    """Scatter a batch of received pages into guest RAM (one numpy copy)."""
    if len(indices) and indices[-1] - indices[0] == len(indices) - 1:
        block.pages[indices[0] : indices[0] + len(indices)] = data  # a run: plain slice copy
    else:
        block.pages[indices] = data


def land_zero_pages(block: RamBlock, indices: npt.NDArray[np.int64]) -> None:
    block.pages[indices] = 0


def page_bytes(npages: int) -> int:
    return npages * PAGE_SIZE
