"""Guest RAM as the VMM owns it: RAM blocks backed by memfds, mapped shared.

QEMU vocabulary: a *RAM block* (``RAMBlock``, named by an idstr such as
``pc.ram``) is one contiguous host allocation; it is mapped into guest-physical
space by one or more *regions* (``ram-below-4g``, ``ram-above-4g``), each of
which becomes a KVM memory slot. The migration stream addresses pages by RAM
block and offset, never by GPA.

The VMM also writes guest RAM itself (device DMA, rings of the kv device); KVM
does not see those writes, so, as QEMU's ``memory_region_set_dirty`` does, every
VMM write is recorded here in a per-block dirty bitmap that migration consumes.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfigError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE, GiB, Gpa, MemoryRange

BELOW_4G_LIMIT = 3 * GiB
"""As on QEMU's q35 machine: RAM above this GPA moves to 4 GiB (PCI hole below)."""
ABOVE_4G_BASE = 4 * GiB
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux 5.14+; Python names it only from 3.12 on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RamRegion:
    """A window of a RAM block in guest-physical space; one KVM memory slot."""

    name: str
    gpa: Gpa
    offset: int
    size: int
    slot: int

    @property
    def range(self) -> MemoryRange:
        return MemoryRange(start=self.gpa, size=self.size)


def pc_regions(ram_size: int) -> list[RamRegion]:
    """The regions of ``pc.ram`` on QEMU's pc/q35 machine: below 3 GiB, the rest from 4 GiB.
    Pure, so that a front end can know the guest's RAM map before any VM exists."""
    low = min(ram_size, BELOW_4G_LIMIT)
    regions = [RamRegion(name="ram-below-4g", gpa=Gpa(0), offset=0, size=low, slot=0)]
    if ram_size > low:
        regions.append(RamRegion(name="ram-above-4g", gpa=Gpa(ABOVE_4G_BASE), offset=low,
                                 size=ram_size - low, slot=1))
    return regions


class RamBlock:
    """One memfd-backed RAM block, mapped shared into this process."""

    def __init__(self, idstr: str, size: int, *, fd: int | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"RAM block {idstr}: size {size} is not a positive multiple of 4 KiB")
        self.idstr = idstr
        self.size = size
        self.npages = size >> PAGE_SHIFT
        if fd is None:
            fd = os.memfd_create(f"confmig:{idstr}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            # SECURITY: a descriptor from another process (cpr-transfer): map no more than it has.
            raise ConfigError(f"RAM block {idstr}: the memfd holds {os.fstat(fd).st_size} bytes, "
                              f"the machine needs {size}")
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)
        """The whole block as a flat byte array (a view of the mapping, not a copy)."""
        self.pages: npt.NDArray[np.uint8] = self.bytes.reshape(self.npages, PAGE_SIZE)
        """The same memory as ``(npages, PAGE_SIZE)``."""
        self.regions: list[RamRegion] = []
        self._vmm_dirty = np.zeros(self.npages, dtype=bool)
        self._dirty_lock = threading.Lock()

    def prealloc(self) -> None:
        """Fault every page in now (QEMU's ``prealloc=on``): first touch costs ~1.4 GB/s
        here, and must not happen during an incoming migration. Only for RAM that
        holds nothing yet (a VM about to receive one)."""
        try:
            self._map.madvise(MADV_POPULATE_WRITE)
        except OSError:  # kernels before 5.14: touch every page (the memory is still zero)
            self.pages[:, 0] = 0

    def gpas(self, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The guest-physical address of each page index (-1 where no region maps it)."""
        out = np.full(len(indices), -1, dtype=np.int64)
        offsets = indices << PAGE_SHIFT
        for r in self.regions:
            inside = (offsets >= r.offset) & (offsets < r.offset + r.size)
            out[inside] = offsets[inside] - r.offset + r.gpa
        return out

    def holes(self) -> npt.NDArray[np.bool_]:
        """Pages that were never written (holes of the memfd): zero without reading
        them. Reading a hole of shmem would allocate it, so this is cheaper twice over."""
        if os.fstat(self.fd).st_blocks * 512 >= self.size:
            # Every page allocated (in memory or swapped: both count): no hole to look for.
            # The walk below costs ~7 ms per GiB of data (the kernel visits every page).
            return np.zeros(self.npages, dtype=bool)
        zero = np.ones(self.npages, dtype=bool)
        off = 0
        while off < self.size:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            zero[data >> PAGE_SHIFT : (hole + PAGE_SIZE - 1) >> PAGE_SHIFT] = False
            off = hole
        return zero

    def mark_dirty(self, offset: int, size: int) -> None:
        """Record a write by the VMM itself (KVM does not see it)."""
        first, last = offset >> PAGE_SHIFT, (offset + size - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            self._vmm_dirty[first : last + 1] = True

    def take_vmm_dirty(self) -> npt.NDArray[np.bool_]:
        """Return and clear the VMM-written pages since the last call."""
        with self._dirty_lock:
            out = self._vmm_dirty.copy()
            self._vmm_dirty[:] = False
        return out

    def close(self) -> None:
        del self.pages, self.bytes
        self._map.close()
        os.close(self.fd)


class GuestMemory:
    """All RAM blocks of a VM and their guest-physical layout."""

    def __init__(self) -> None:
        self.blocks: list[RamBlock] = []

    @classmethod
    def pc(cls, ram_size: int, *, fd: int | None = None) -> GuestMemory:
        """QEMU pc/q35 layout: one ``pc.ram`` block, split at 3 GiB around the PCI hole.
        ``fd``: an existing memfd of ``ram_size`` bytes to map (a new VMM taking over a guest,
        ``cpr-transfer``) instead of a new one."""
        mem = cls()
        block = RamBlock("pc.ram", ram_size, fd=fd)
        block.regions.extend(pc_regions(ram_size))
        mem.blocks.append(block)
        return mem

    def add_block(self, idstr: str, data: bytes, *, gpa: int, slot: int, fd: int | None = None) -> RamBlock:
        """A block holding ``data`` (a firmware image), mapped at ``gpa``. With ``fd``, the
        block is that memfd as it is (it holds the image already, possibly encrypted by the
        launch): ``data`` only gives its size."""
        block = RamBlock(idstr, len(data), fd=fd)
        if fd is None:
            block.bytes[:] = np.frombuffer(data, dtype=np.uint8)
        block.regions.append(RamRegion(name=idstr, gpa=Gpa(gpa), offset=0, size=len(data), slot=slot))
        self.blocks.append(block)
        return block

    @property
    def ram_size(self) -> int:
        return sum(b.size for b in self.blocks)

    def block(self, idstr: str) -> RamBlock:
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        raise KeyError(idstr)

    def translate(self, gpa: int, size: int = 1) -> tuple[RamBlock, int]:
        """Map a guest-physical range to (block, offset); it must not cross a region."""
        for b in self.blocks:
            for r in b.regions:
                if r.range.contains(gpa, size):
                    return b, r.offset + (gpa - r.gpa)
        raise ValueError(f"GPA range {gpa:#x}+{size:#x} is not backed by guest RAM")

    def read(self, gpa: int, size: int) -> bytes:
        block, off = self.translate(gpa, size)
        return block.bytes[off : off + size].tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        block, off = self.translate(gpa, len(data))
        block.bytes[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        block.mark_dirty(off, len(data))

    def close(self) -> None:
        for b in self.blocks:
            b.close()
        self.blocks.clear()
