"""Tiny guest programs for exercising the emulated KVM without the real firmware.

Phase in rbx; each step ends in at most one exiting instruction.
"""

from __future__ import annotations

import numpy as np

from confmig.platform.cpu.abi import (
    COM1_PORT,
    MSR_IA32_TSC_DEADLINE,
    RESET_VECTOR,
    GuestCpu,
    RomRegion,
)

PAGES_GPA = 0x10000


def exits(cpu: GuestCpu) -> None:
    """Walks through one exit of each kind."""
    r = cpu.regs
    phase = r.rbx
    r.rbx = phase + 1
    if phase == 0:
        cpu.outs(COM1_PORT, b"hello\n")
    elif phase == 1:
        cpu.inp(0x510, 2)
    elif phase == 2:
        r.rcx = r.rax  # the value the VMM returned for the `in`
        cpu.write_pages(PAGES_GPA, np.full((10, 4096), 7, dtype=np.uint8))
        cpu.wrmsr(MSR_IA32_TSC_DEADLINE, cpu.rdtsc() + 20_000_000)
        cpu.hlt()  # in-kernel: wakes on the timer
    elif phase == 3:
        r.rdx = cpu.pending_interrupt() or 0
        cpu.hlt()  # no timer armed: exits to the VMM
    elif phase == 4:
        cpu.hypercall(99)
    elif phase == 5:
        r.rsi = r.rax
        cpu.outs(COM1_PORT, b"x" * 1)
        cpu.outs(COM1_PORT, b"y")  # two exits in one step: a fault
    else:
        cpu.shutdown()


def writer(cpu: GuestCpu) -> None:
    """Writes a counter into page (n % 64) of the first 64 pages, forever."""
    r = cpu.regs
    n = r.rax
    page = n % 64
    cpu.write(page * 4096, int(n).to_bytes(8, "little"))
    r.rax = n + 1


def rom() -> list[RomRegion]:
    return [RomRegion(name="exits", base=RESET_VECTOR & ~0xFFFF, size=0x10000, step=exits)]


def writer_rom() -> list[RomRegion]:
    return [RomRegion(name="writer", base=RESET_VECTOR & ~0xFFFF, size=0x10000, step=writer)]


def negotiator(cpu: GuestCpu) -> None:
    """Reads the KVM feature leaf, then writes the migration-control MSR."""
    from confmig.platform.cpu.abi import (
        KVM_CPUID_FEATURES,
        KVM_FEATURE_MIGRATION_CONTROL,
        KVM_MIGRATION_READY,
        MSR_KVM_MIGRATION_CONTROL,
    )

    r = cpu.regs
    if r.rbx == 0:
        r.rbx = 1
        r.rcx = (cpu.cpuid(KVM_CPUID_FEATURES)[0] >> KVM_FEATURE_MIGRATION_CONTROL) & 1
        cpu.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    else:
        cpu.shutdown()


def negotiator_rom() -> list[RomRegion]:
    return [RomRegion(name="negotiator", base=RESET_VECTOR & ~0xFFFF, size=0x10000, step=negotiator)]
