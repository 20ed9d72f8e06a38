"""The guest's two address maps: where its code runs and where its data lives.

Code (instruction addresses, ``rip``). Each program is a RomRegion; inside it,
``rip - base`` is the program's phase, so the program counter is also the
state machine's state::

    firmware   0xFFFF_0000 .. 0xFFFF_FFFF      64 KiB below 4 GiB, like a flash BIOS;
                                               RESET_VECTOR (0xFFFF_FFF0) is its entry
    kernel     0xFFFF_FFFF_8100_0000 + 4 KiB   Linux's __START_KERNEL
    workloads  0xFFFF_FFFF_C000_0000 + k MiB   one MiB of phases per workload

Data (guest-physical addresses). Everything the guest knows lives here or in
its registers (the guest-state rule)::

    0x0000_0000  4 KiB  unused: a null page
    0x0000_1000  4 KiB  fw_cfg DMA bounce buffer: FWCfgDmaAccess + data     SHARED  firmware <-> fw_cfg
    0x0000_2000  4 KiB  boot info: memory map, CPU count, command line, SEV firmware -> kernel
    0x0000_3000  4 KiB  kernel data: timer tick, NMI frame, workload params  kernel
    0x0000_4000  4 KiB  workload state: counters, cursors, self-check       workload
    0x0000_5000  4 KiB  SEV secret area (OVMF table: SEV secret block)      PSP (LAUNCH_SECRET) -> firmware
    0x0000_6000  4 KiB  UEFI variable store                                  firmware -> kernel
    0x0000_7000         reserved up to 1 MiB (firmware and kernel growth)
    0x0010_0000         workload memory, up to the end of RAM in both RAM
                        regions (below 3 GiB and from 4 GiB): the kv queue
                        (SHARED) and hash table, the dirty workload's version
                        table and working set
    4 GiB - 64 KiB      the firmware image (``-bios``), as flash below 4 GiB

In an SEV guest every page is private (accessed with the C-bit) except the
ones marked SHARED: the host's devices read and write those.
"""

from __future__ import annotations

from collections.abc import Iterable

from confmig.common.units import PAGE_SIZE, GiB, Gpa, MemoryRange, MiB

# --- instruction addresses ---------------------------------------------------------------

FIRMWARE_BASE = 0xFFFF_0000
FIRMWARE_SIZE = 0x1_0000
KERNEL_BASE = 0xFFFF_FFFF_8100_0000
KERNEL_SIZE = 0x1000
WORKLOAD_CODE_BASE = 0xFFFF_FFFF_C000_0000
WORKLOAD_CODE_SIZE = 0x10_0000


def workload_code(index: int) -> int:
    """Base instruction address of the ``index``-th workload."""
    return WORKLOAD_CODE_BASE + index * WORKLOAD_CODE_SIZE


# --- guest-physical memory -----------------------------------------------------------------

FW_CFG_BOUNCE_GPA = 0x1000
"""The one page through which fw_cfg DMA passes: shared in an SEV guest."""
FW_CFG_DMA_ACCESS_GPA = FW_CFG_BOUNCE_GPA
FW_CFG_DMA_DATA_GPA = FW_CFG_BOUNCE_GPA + 0x40
FW_CFG_DMA_DATA_MAX = PAGE_SIZE - 0x40
"""The largest fw_cfg item the firmware reads in one transfer."""

BOOT_INFO_GPA = 0x2000
KERNEL_DATA_GPA = 0x3000
WORKLOAD_STATE_GPA = 0x4000
SECRET_AREA_GPA = 0x5000
"""Where the guest owner's LAUNCH_SECRET lands; the image's OVMF table says so."""
SECRET_AREA_SIZE = PAGE_SIZE
VARSTORE_GPA = 0x6000
"""The firmware's UEFI variable store, read by the kernel (EFI runtime services)."""
VARSTORE_SIZE = PAGE_SIZE
WORKLOAD_MEMORY_BASE = 1 * MiB
"""Workload memory starts here; below it only firmware and kernel structures live."""


def workload_memory(ram: Iterable[MemoryRange]) -> list[MemoryRange]:
    """The RAM a workload may use: the RAM ranges from 1 MiB up, whole pages, by address."""
    free = []
    for r in sorted(ram, key=lambda r: r.start):
        start = (max(r.start, WORKLOAD_MEMORY_BASE) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = r.end & ~(PAGE_SIZE - 1)
        if end > start:
            free.append(MemoryRange(start=Gpa(start), size=end - start))
    return free


# --- the firmware image (flash) ------------------------------------------------------------

FLASH_TOP = 4 * GiB
"""The firmware image ends here, as pflash does: its last 16 bytes hold the reset vector."""
FIRMWARE_IMAGE_SIZE = 64 * 1024
"""The image confmig builds: it sits exactly under the firmware's code region."""
FLASH_WINDOW = MemoryRange(start=Gpa(FLASH_TOP - 16 * MiB), size=16 * MiB)
"""Where a firmware image may be mapped (the VMM's limit is 16 MiB). RAM the host's
e820 claims there is the flash, not RAM: the firmware reports it reserved."""
