"""Memory slots: guest-physical windows onto VMM memfds, and their dirty counters.

Dirty tracking. Real KVM write-protects pages and sets a bit on the first write
fault. Here every vCPU process counts its own writes in a shared array, one
``u32`` per page and one row per vCPU (each row has a single writer, so no
increment is ever lost). The CPU stores the data *before* it bumps the counter;
``KVM_GET_DIRTY_LOG`` snapshots the counters *before* the VMM copies pages. A
write that races with a harvest therefore always shows up, in this harvest or
the next: the clear-then-copy rule, and no write is ever lost.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SHIFT, PAGE_SIZE

KVM_MAX_VCPUS = 32
"""Rows of a dirty-counter array; vCPU ids must stay below this."""
KVM_USER_MEM_SLOTS = 32
"""Memory slots per VM (the real limit is larger; the pc machine uses two)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotLayout:
    """Plain data describing a slot; what the host tells a vCPU process."""

    slot: int
    flags: int
    gpa: int
    size: int
    offset: int
    spa: int
    """Emulated system-physical address of the slot's first page."""

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


def counters_size(npages: int) -> int:
    return KVM_MAX_VCPUS * npages * 4


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux 5.14+; Python names it only from 3.12 on."""


class MappedSlot:
    """A slot mapped into this process: its RAM and its dirty counters."""

    def __init__(self, layout: SlotLayout, ram_fd: int, counters_fd: int) -> None:
        self.layout = layout
        self.ram_fd = ram_fd
        self.counters_fd = counters_fd
        # Either both mappings exist or neither does: a failure leaves the descriptors to the caller.
        self._ram_map = mmap.mmap(ram_fd, layout.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=layout.offset)
        try:
            self._cnt_map = mmap.mmap(counters_fd, counters_size(layout.npages), mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._ram_map.close()
            raise
        self._populate_allocated()
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._ram_map, dtype=np.uint8)
        self.pages = self.bytes.reshape(layout.npages, PAGE_SIZE)
        self.counters: npt.NDArray[np.uint32] = np.frombuffer(
            self._cnt_map, dtype=np.uint32).reshape(KVM_MAX_VCPUS, layout.npages)

    def _populate_allocated(self) -> None:
        """Fill this process's page tables for the slot's pages that already exist in the file
        (a target VMM preallocates all of them), never for holes (populating allocates). The
        kernel does the same work at each page's first touch otherwise: a Migration Handler
        writing a target's pages took a page fault per page during the migration."""
        start, end = self.layout.offset, self.layout.offset + self.layout.size
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.ram_fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data from pos on
                return
            if data >= end:
                return
            hole = min(os.lseek(self.ram_fd, data, os.SEEK_HOLE), end)
            first = data & ~(PAGE_SIZE - 1)
            try:
                self._ram_map.madvise(MADV_POPULATE_WRITE, first - start, hole - first)
            except OSError:  # kernels before 5.14: pages fault in as they are touched
                return
            pos = hole

    def close(self) -> None:
        del self.bytes, self.pages, self.counters
        self._ram_map.close()
        self._cnt_map.close()
        for fd in (self.ram_fd, self.counters_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def new_counters_fd(npages: int) -> int:
    fd = os.memfd_create("confmig:dirty-counters", os.MFD_CLOEXEC)
    os.ftruncate(fd, counters_size(npages))
    return fd


class DirtyLog:
    """The dirty log of one slot, as ``KVM_GET_DIRTY_LOG``/``KVM_CLEAR_DIRTY_LOG`` see it."""

    def __init__(self, slot: MappedSlot, nr_vcpus: int) -> None:
        self.slot = slot
        # Rows of vCPUs that do not exist yet stay untouched (np.zeros does not fault
        # pages in, where np.zeros_like fills them: a 4 GiB slot has 128 MiB of counters, and
        # filling them was in every migration's setup); a vCPU created later starts counting
        # from zero, as they do.
        self.seen = np.zeros(slot.counters.shape, dtype=slot.counters.dtype)
        self.seen[:nr_vcpus] = slot.counters[:nr_vcpus]
        """Counter values as of the last clear: a page is dirty where they differ."""
        self.reported: npt.NDArray[np.uint32] | None = None
        """Counters at the last GET in manual-protect mode, awaiting CLEAR."""

    def get(self, nr_vcpus: int, *, manual_protect: bool) -> npt.NDArray[np.bool_]:
        rows = max(nr_vcpus, 1)
        now = self.slot.counters[:rows].copy()  # snapshot first: later writes show next time
        dirty: npt.NDArray[np.bool_] = (now != self.seen[:rows]).any(axis=0)
        if manual_protect:
            self.reported = now
        else:
            self.seen[:rows] = now
        return dirty

    def clear(self, first_page: int, flags: npt.NDArray[np.bool_]) -> None:
        """Re-protect the pages set in ``flags`` (relative to ``first_page``)."""
        if self.reported is None:
            return
        rows = self.reported.shape[0]
        idx = first_page + np.flatnonzero(flags)
        self.seen[:rows, idx] = self.reported[:, idx]
