"""The guest's two address maps: where its code runs and where its data lives.

Code (instruction addresses, ``rip``). Each program is a RomRegion; inside it,
``rip - base`` is the program's phase, so the program counter is also the
state machine's state::

    firmware   0xFFFF_0000 .. 0xFFFF_FFFF      64 KiB below 4 GiB, like a flash BIOS;
                                               RESET_VECTOR (0xFFFF_FFF0) is its entry,
                                               MH_ENTRY (0xFFFF_8000) the Migration Handler's
    kernel     0xFFFF_FFFF_8100_0000 + 4 KiB   Linux's __START_KERNEL
    workloads  0xFFFF_FFFF_C000_0000 + k MiB   one MiB of phases per workload

Data (guest-physical addresses). Everything the guest knows lives here or in
its registers (the guest-state rule)::

    0x0000_0000  4 KiB  unused: a null page
    0x0000_1000  4 KiB  fw_cfg DMA bounce buffer: FWCfgDmaAccess + data     SHARED  firmware <-> fw_cfg
    0x0000_2000  4 KiB  boot info: memory map, CPU count, command line, SEV firmware -> kernel
    0x0000_3000  4 KiB  kernel data: timer tick, NMI frame, workload params  kernel
                        (+0xF00: the run gate, :mod:`confmig.guest.gate`)    MH -> kernel
    0x0000_4000  4 KiB  workload state: counters, cursors, self-check       workload
    0x0000_5000  4 KiB  SEV secret area (OVMF table: SEV secret block)      PSP -> firmware, MH
    0x0000_6000  4 KiB  UEFI variable store                                  firmware -> kernel
    0x0000_7000  4 KiB  SEV-ES vCPU save area (:mod:`confmig.guest.saved_state`) kernel -> firmware
    0x0000_8000         reserved up to 1 MiB (firmware and kernel growth)
    0x0010_0000 512 KiB page-state list: 1 bit per GFN below 16 GiB,   mem_encrypt -> MH
                        set = SHARED (the guest's own record of its C-bits)
    0x0018_0000         reserved up to 2 MiB
    0x0020_0000  14 MiB the Migration Handler's area (never migrated as guest memory):
                        MH_VCPUS_MAX mailboxes (SHARED, 2072 KiB each: two slots of a
                        256-page batch), then the MH's state: a session page, one
                        page per MH vCPU, one imported-page bitmap per MH vCPU
                        (512 KiB each); the rest unused
    0x0100_0000         workload memory, up to the end of RAM in both RAM
                        regions (below 3 GiB and from 4 GiB): the kv queue
                        (SHARED) and hash table, the dirty workload's version
                        table and working set
    4 GiB - 64 KiB      the firmware image (``-bios``), as flash below 4 GiB

In an SEV guest every page is private (accessed with the C-bit) except the
ones marked SHARED: the host's devices read and write those. A guest whose RAM
ends below 16 MiB has no Migration Handler and no workload memory.
"""

from __future__ import annotations

from collections.abc import Iterable

from confmig.common.units import PAGE_SIZE, GiB, Gpa, KiB, MemoryRange, MiB
from confmig.proto.mailbox import MAILBOX_STRIDE

# --- instruction addresses ---------------------------------------------------------------

FIRMWARE_BASE = 0xFFFF_0000
FIRMWARE_SIZE = 0x1_0000
KERNEL_BASE = 0xFFFF_FFFF_8100_0000
KERNEL_SIZE = 0x1000
WORKLOAD_CODE_BASE = 0xFFFF_FFFF_C000_0000
WORKLOAD_CODE_SIZE = 0x10_0000
MH_ENTRY = FIRMWARE_BASE + 0x8000
"""Where an MH vCPU runs (:mod:`confmig.guest.firmware.mh`): a phase of the firmware's code,
so the Migration Handler is measured with the firmware image. The image's table says so."""


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
VCPU_SAVE_GPA = 0x7000
"""SEV-ES: where the guest's vCPUs save their registers for a Migration Handler migration."""
VCPU_SAVE_SIZE = PAGE_SIZE
RUN_GATE_GPA = KERNEL_DATA_GPA + 0xF00
"""The run gate (:mod:`confmig.guest.gate`): in the kernel data page, which the kernel reads
on every step anyway, at an offset the kernel's own data never reaches."""

PAGE_STATE_GPA = 1 * MiB
"""The page-state list: bit ``gfn % 8`` of byte ``gfn // 8`` is set when the page is shared."""
PAGE_STATE_SIZE = 512 * KiB
PAGE_STATE_LIMIT = PAGE_STATE_SIZE * 8 * PAGE_SIZE
"""16 GiB: pages from here up are private and cannot be made shared; the Migration Handler
neither exports nor imports them."""

MH_AREA_GPA = 2 * MiB
MH_AREA_SIZE = 14 * MiB
"""The Migration Handler's area: each side's MH owns its own, so a VMM migrates none of it."""
MH_VCPUS_MAX = 4
"""MH vCPUs the firmware has mailboxes and state for."""
MH_MAILBOX_GPA = MH_AREA_GPA
MH_MAILBOX_SIZE = MH_VCPUS_MAX * MAILBOX_STRIDE
MH_SESSION_GPA = MH_MAILBOX_GPA + MH_MAILBOX_SIZE
"""The MH's session page (private): what the migration of this guest has come to."""
MH_VCPU_STATE_GPA = MH_SESSION_GPA + PAGE_SIZE
"""One private page per MH vCPU: its stream."""
MH_IMPORTED_GPA = MH_VCPU_STATE_GPA + MH_VCPUS_MAX * PAGE_SIZE
MH_IMPORTED_SIZE = PAGE_STATE_SIZE
"""One private bitmap per MH vCPU, laid out as the page-state list: the pages its stream
imported in this migration."""
MH_STATE_END = MH_IMPORTED_GPA + MH_VCPUS_MAX * MH_IMPORTED_SIZE
assert MH_MAILBOX_SIZE % PAGE_SIZE == 0 and MH_STATE_END <= MH_AREA_GPA + MH_AREA_SIZE


def mh_vcpu_state(index: int) -> int:
    """GPA of MH vCPU ``index``'s state page."""
    return MH_VCPU_STATE_GPA + index * PAGE_SIZE


def mh_imported(index: int) -> int:
    """GPA of MH vCPU ``index``'s imported-page bitmap."""
    return MH_IMPORTED_GPA + index * MH_IMPORTED_SIZE


WORKLOAD_MEMORY_BASE = 16 * MiB
"""Workload memory starts here; below it only firmware, kernel and Migration Handler
structures live."""


def workload_memory(ram: Iterable[MemoryRange]) -> list[MemoryRange]:
    """The RAM a workload may use: the RAM ranges from 16 MiB up, whole pages, by address."""
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
