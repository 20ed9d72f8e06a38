"""Memory encryption as the guest sees it: is this an SEV guest, which address is private,
and how a page changes between private and shared (Linux's ``arch/x86/mm/mem_encrypt*``).

Detection is architectural and repeated in every step that needs it, so it is
never Python state: CPUID 0x8000001F EAX bit 1 says the CPU has SEV, and only
then is ``MSR_AMD64_SEV`` read (on a CPU without SEV the MSR does not exist);
bit 0 of the MSR says this guest runs encrypted, and CPUID EBX[5:0] is where
the C-bit sits in a guest-physical address. The firmware records the result in
the boot info for the kernel, as OVMF's and Linux's ``sme_enable`` both find it
out. A step finds the mask out once (Linux keeps it in ``sme_me_mask``) and
hands it to what it calls: functions that take ``mask=None`` find it out
themselves only when called without one (tools and tests).

An access to ``gpa | C-bit`` is private: it goes through the memory-encryption
engine. Without the C-bit it is shared: the host reads and writes the same
plaintext. In a plain guest the mask is 0 and :func:`private` returns the
address unchanged, so plain guests run exactly as before.

Page-state reports (``KVM_HC_MAP_GPA_RANGE``) are made only by an SEV guest whose
hypervisor advertises ``KVM_FEATURE_MIGRATION_CONTROL``, as Linux
(``kvm_init_platform``) and OVMF (``MemEncryptSevLiveMigrationIsEnabled``) do.

The page-state list. Every C-bit change of the guest goes through
:func:`move_to_shared` and :func:`move_to_private`, which keep the guest's own
record of it: a private bitmap at ``PAGE_STATE_GPA``, one bit per GFN below
``PAGE_STATE_LIMIT`` (16 GiB), set when the page is shared. The firmware
clears it at reset (:func:`clear_page_state`). It is what the Migration
Handler believes, not the host's list: it migrates with the guest's memory like
any private data, and pages above the limit can only be private.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.guest.layout import PAGE_STATE_GPA, PAGE_STATE_LIMIT, PAGE_STATE_SIZE
from confmig.platform.cpu.abi import (
    CPUID_AMD_SEV,
    KVM_CPUID_SIGNATURE,
    KVM_ENOSYS,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SIGNATURE,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ENABLED,
    GuestCpu,
    GuestFault,
)

CPUID_SEV_BIT = 1 << 1
"""CPUID 0x8000001F EAX: the CPU supports SEV."""
KVM_CPUID_BASE_END = 0x4001_0000
"""Hypervisor leaves are searched in steps of 0x100 up to here (Linux's ``cpuid_base``)."""
PAGE_STATE_BATCH = 256
"""Most pages one private<->shared change moves: about a millisecond of work."""
_U64 = 1 << 64


def encryption_mask(cpu: GuestCpu) -> int:
    """The C-bit if this guest's memory is encrypted (SEV), else 0."""
    eax, ebx, _, _ = cpu.cpuid(CPUID_AMD_SEV)
    if not eax & CPUID_SEV_BIT:
        return 0
    if not cpu.rdmsr(MSR_AMD64_SEV) & MSR_AMD64_SEV_ENABLED:
        return 0
    return 1 << (ebx & 0x3F)


def step_mask(cpu: GuestCpu, mask: int | None) -> int:
    """``mask`` when the step already knows it, else :func:`encryption_mask`."""
    return encryption_mask(cpu) if mask is None else mask


def private(cpu: GuestCpu, gpa: int, mask: int | None = None) -> int:
    """The address through which guest-private data at ``gpa`` is reached."""
    return gpa | step_mask(cpu, mask)


def sev_status(cpu: GuestCpu) -> int:
    """``MSR_AMD64_SEV`` (0 on a CPU without SEV)."""
    eax, _, _, _ = cpu.cpuid(CPUID_AMD_SEV)
    return cpu.rdmsr(MSR_AMD64_SEV) if eax & CPUID_SEV_BIT else 0


def c_bit_position(cpu: GuestCpu) -> int:
    return cpu.cpuid(CPUID_AMD_SEV)[1] & 0x3F


def kvm_features(cpu: GuestCpu) -> int:
    """EAX of the KVM features leaf, or 0 when no KVM signature is found."""
    for base in range(KVM_CPUID_SIGNATURE, KVM_CPUID_BASE_END, 0x100):
        _, ebx, ecx, edx = cpu.cpuid(base)
        signature = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
        if signature == KVM_SIGNATURE:
            return cpu.cpuid(base + 1)[0]
    return 0


def has_migration_control(cpu: GuestCpu) -> bool:
    return bool(kvm_features(cpu) >> KVM_FEATURE_MIGRATION_CONTROL & 1)


def reports_page_state(cpu: GuestCpu, mask: int | None = None) -> bool:
    """Whether this guest tells the host about its page-state changes."""
    return bool(step_mask(cpu, mask)) and has_migration_control(cpu)


def move_to_shared(cpu: GuestCpu, gpa: int, npages: int, mask: int | None = None, *,
                   zero: bool = False) -> None:
    """Make ``npages`` from ``gpa`` shared, keeping what the guest sees in them (with
    ``zero``: they read as zeros instead): the host can read them from now on. The
    page-state list says so. No-op in a plain guest."""
    mask = step_mask(cpu, mask)
    if mask:
        _check_batch(gpa, npages)
        pages = np.zeros((npages, PAGE_SIZE), np.uint8) if zero else cpu.read_pages(gpa | mask, npages)
        _mark(cpu, gpa >> PAGE_SHIFT, npages, shared=True, mask=mask)
        cpu.write_pages(gpa, pages)


def move_to_private(cpu: GuestCpu, gpa: int, npages: int, mask: int | None = None) -> None:
    """Make ``npages`` from ``gpa`` private again, keeping their contents (re-encrypted
    in place); the host sees ciphertext from now on. No-op in a plain guest."""
    mask = step_mask(cpu, mask)
    if mask:
        _check_batch(gpa, npages)
        cpu.write_pages(gpa | mask, cpu.read_pages(gpa, npages))
        _mark(cpu, gpa >> PAGE_SHIFT, npages, shared=False, mask=mask)


def _check_batch(gpa: int, npages: int) -> None:
    if gpa % PAGE_SIZE or not 0 < npages <= PAGE_STATE_BATCH:
        raise GuestFault(f"page-state change of {npages} pages at {gpa:#x}")
    if gpa + npages * PAGE_SIZE > PAGE_STATE_LIMIT:
        raise GuestFault(f"page-state change at {gpa:#x}: pages from {PAGE_STATE_LIMIT:#x} up "
                         "stay private (the page-state list ends there)")


# --- the page-state list -------------------------------------------------------------------


def clear_page_state(cpu: GuestCpu, mask: int) -> None:
    """Every page private (the firmware, at reset: RAM need not start zeroed)."""
    cpu.write_pages(PAGE_STATE_GPA | mask, np.zeros((PAGE_STATE_SIZE // PAGE_SIZE, PAGE_SIZE), np.uint8))


def _mark(cpu: GuestCpu, gfn: int, npages: int, *, shared: bool, mask: int) -> None:
    first, last = gfn >> 3, (gfn + npages - 1) >> 3
    at = (PAGE_STATE_GPA + first) | mask
    bits = np.unpackbits(np.frombuffer(cpu.read(at, last - first + 1), np.uint8), bitorder="little")
    bits[gfn - first * 8 : gfn - first * 8 + npages] = shared
    cpu.write(at, np.packbits(bits, bitorder="little").tobytes())


def shared_pages(cpu: GuestCpu, gfns: npt.NDArray[np.int64], mask: int) -> npt.NDArray[np.bool_]:
    """Which of ``gfns`` (each below the limit) the page-state list says are shared; reads
    only the list's pages those GFNs fall in."""
    return bitmap_bits(cpu, PAGE_STATE_GPA, gfns, mask)


def bitmap_bits(cpu: GuestCpu, base: int, gfns: npt.NDArray[np.int64], mask: int) -> npt.NDArray[np.bool_]:
    """Bits ``gfns`` of the private bitmap at ``base`` (laid out as the page-state list)."""
    out = np.zeros(len(gfns), np.bool_)
    for here, first, octets in _bitmap_spans(cpu, base, gfns, mask):
        out[here] = (octets[(gfns[here] >> 3) - first] >> (gfns[here] & 7)) & 1 == 1
    return out


def set_bitmap_bits(cpu: GuestCpu, base: int, gfns: npt.NDArray[np.int64], mask: int) -> None:
    """Set bits ``gfns`` of the private bitmap at ``base``: one read and write per page of it,
    of the bytes between the first and the last bit set there."""
    for here, first, octets in _bitmap_spans(cpu, base, gfns, mask):
        octets = octets.copy()
        np.bitwise_or.at(octets, (gfns[here] >> 3) - first, (1 << (gfns[here] & 7)).astype(np.uint8))
        cpu.write((base + first) | mask, octets.tobytes())


def _bitmap_spans(cpu: GuestCpu, base: int, gfns: npt.NDArray[np.int64],
                  mask: int) -> Iterator[tuple[npt.NDArray[np.bool_] | slice, int, npt.NDArray[np.uint8]]]:
    """For each page of the bitmap that ``gfns`` fall in: which of them, the first byte they
    touch, and the bytes from there to the last one they touch (read once)."""
    if not len(gfns):
        return
    byte = gfns >> 3
    first, last = int(byte.min()), int(byte.max())
    if first >> PAGE_SHIFT == last >> PAGE_SHIFT:  # the usual batch: one page of the bitmap
        yield slice(None), first, np.frombuffer(cpu.read((base + first) | mask, last - first + 1), np.uint8)
        return
    for page in np.unique(byte >> PAGE_SHIFT).tolist():
        here = (byte >> PAGE_SHIFT) == page
        first, last = int(byte[here].min()), int(byte[here].max())
        yield here, first, np.frombuffer(cpu.read((base + first) | mask, last - first + 1), np.uint8)


def map_gpa_range(cpu: GuestCpu, gpa: int, npages: int, *, encrypted: bool) -> None:
    """Report a page-state change to the host (4 KiB pages). Exits: the result
    arrives in ``rax`` for the next step (:func:`hypercall_error`)."""
    attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if encrypted else 0
    cpu.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages, attrs)


def hypercall_error(rax: int) -> int:
    """A hypercall's result as a signed number: 0 for success, ``-errno`` otherwise."""
    rax %= _U64
    return rax - _U64 if rax >> 63 else rax


def hypercall_failure_line(who: str, rax: int) -> str:
    """The one console line a boot prints when the host refuses page-state reports."""
    error = hypercall_error(rax)
    why = " (KVM_CAP_EXIT_HYPERCALL not enabled)" if error == -KVM_ENOSYS else ""
    return (f"confmig {who}: KVM_HC_MAP_GPA_RANGE failed with {error}{why}; "
            "page-state changes are not reported to the host")
