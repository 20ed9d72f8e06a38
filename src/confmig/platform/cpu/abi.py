"""The guest-visible CPU: what guest code (firmware, kernel, workloads) may do.

Guest code is a set of *programs*, each a step function ``step(cpu) -> None``
mapped at a range of guest-virtual instruction addresses (a :class:`RomRegion`).
The core calls the program whose range contains ``rip``; the program reads its
state from guest RAM and registers, does a bounded amount of work, updates
RAM/registers and returns.

The guest-state rule: a program keeps no Python state between steps. All of a
guest lives in RAM and in :class:`Registers` (plus the MSRs and run state the
core saves), so a migrated guest continues exactly where it stopped.

Exiting instructions. ``out``/``outs``/``inp``, ``mmio_read``/``mmio_write``,
``hypercall``, ``wrmsr`` of a host-handled MSR, ``hlt`` and ``shutdown`` may
leave the guest to the host. A step may issue **at most one** of them and it
must be the **last** thing the step does, like an instruction boundary: a step
is the unit that completes atomically. Results (``inp`` data, ``mmio_read``
data, ``hypercall`` return value) arrive in ``regs.rax`` before the next step
runs. A program that needs the result therefore advances its own phase (for
example in ``rip``) before issuing the instruction.

Time. ``rdtsc()`` counts guest nanoseconds (the model's TSC runs at 1 GHz).
``hlt()`` with an armed ``IA32_TSC_DEADLINE`` sleeps in the kernel until the
deadline or an interrupt; with nothing armed it exits to the VMM (HLT exit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from confmig.common.x86 import (  # re-exported: the guest's view of the architecture
    COM1_PORT,
    FW_CFG_PORT_DATA,
    FW_CFG_PORT_DMA_HI,
    FW_CFG_PORT_DMA_LO,
    FW_CFG_PORT_SEL,
    INTERRUPT_VECTOR_KV,
    ISA_DEBUG_EXIT_PORT,
    KV_PORT_BASE,
    KV_PORT_COUNT,
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    KVM_ENOSYS,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MIGRATION_READY,
    KVM_SIGNATURE,
    LOCAL_TIMER_VECTOR,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
    NMI_VECTOR,
)

__all__ = [
    "COM1_PORT",
    "CPUID_AMD_SEV",
    "C_BIT",
    "C_BIT_POSITION",
    "FW_CFG_PORT_DATA",
    "FW_CFG_PORT_DMA_HI",
    "FW_CFG_PORT_DMA_LO",
    "FW_CFG_PORT_SEL",
    "INTERRUPT_VECTOR_KV",
    "ISA_DEBUG_EXIT_PORT",
    "KVM_CPUID_FEATURES",
    "KVM_CPUID_SIGNATURE",
    "KVM_ENOSYS",
    "KVM_FEATURE_HC_MAP_GPA_RANGE",
    "KVM_FEATURE_MIGRATION_CONTROL",
    "KVM_HC_MAP_GPA_RANGE",
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "KVM_MIGRATION_READY",
    "KVM_SIGNATURE",
    "KV_PORT_BASE",
    "KV_PORT_COUNT",
    "LOCAL_TIMER_VECTOR",
    "MSR_AMD64_SEV",
    "MSR_AMD64_SEV_ENABLED",
    "MSR_AMD64_SEV_ES_ENABLED",
    "MSR_IA32_TSC",
    "MSR_IA32_TSC_DEADLINE",
    "MSR_KVM_MIGRATION_CONTROL",
    "NMI_VECTOR",
    "RESET_VECTOR",
    "TSC_HZ",
    "GuestCpu",
    "GuestFault",
    "GuestProgram",
    "Pages",
    "Registers",
    "RomRegion",
]  # fmt: skip

# --- architectural constants -------------------------------------------------

TSC_HZ = 1_000_000_000
"""The model's TSC frequency: one tick per nanosecond."""

RESET_VECTOR = 0xFFFF_FFF0
"""Where every x86 vCPU starts executing (``CS:IP`` after reset)."""

# SEV discovery, as a guest kernel does it.
CPUID_AMD_SEV = 0x8000_001F
"""EAX bit 1: SEV, bit 3: SEV-ES; EBX[5:0]: C-bit position, EBX[11:6]: physical-address bits lost."""
MSR_AMD64_SEV = 0xC001_0131
"""Read-only: bit 0 SEV is active for this guest, bit 1 SEV-ES is."""
MSR_AMD64_SEV_ENABLED = 1 << 0
MSR_AMD64_SEV_ES_ENABLED = 1 << 1
C_BIT_POSITION = 51
"""Where the C-bit sits in a guest-physical address on Milan and Genoa (QEMU's ``cbitpos=51``)."""
C_BIT = 1 << C_BIT_POSITION

class Registers:
    """The general-purpose register file, in ``struct kvm_regs`` order.

    All values are unsigned 64-bit. Mutable, because a CPU register file is.
    """

    NAMES = (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags",
    )  # fmt: skip
    __slots__ = NAMES

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int

    def __init__(self, values: tuple[int, ...] | None = None) -> None:
        vals = values if values is not None else (0,) * 17 + (0x2,)
        if len(vals) != len(self.NAMES):
            raise ValueError(f"kvm_regs has {len(self.NAMES)} registers, got {len(vals)}")
        for name, v in zip(self.NAMES, vals, strict=True):
            object.__setattr__(self, name, v & 0xFFFF_FFFF_FFFF_FFFF)

    def __setattr__(self, name: str, value: int) -> None:
        object.__setattr__(self, name, value & 0xFFFF_FFFF_FFFF_FFFF)

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in self.NAMES)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registers) and self.as_tuple() == other.as_tuple()

    def __repr__(self) -> str:
        return f"Registers(rip={self.rip:#x}, rax={self.rax:#x})"


Pages = npt.NDArray[np.uint8]
"""A block of whole pages, shape ``(n, PAGE_SIZE)``."""


class GuestCpu(Protocol):
    """What a guest program can do with the CPU it runs on."""

    @property
    def vcpu_id(self) -> int: ...

    @property
    def regs(self) -> Registers: ...

    # -- memory: every access goes through the memory-encryption engine ------
    def read(self, gpa: int, size: int) -> bytes:
        """Read guest-physical memory (may cross pages)."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest-physical memory (may cross pages); marks pages dirty."""
        ...

    def read_pages(self, gpa: int, npages: int, out: Pages | None = None) -> Pages:
        """Read whole pages into ``out``, or a fresh ``(npages, PAGE_SIZE)`` array."""
        ...

    def write_pages(self, gpa: int, data: Pages) -> None:
        """Write whole pages from a ``(n, PAGE_SIZE)`` array; marks them dirty."""
        ...

    # -- non-exiting instructions ---------------------------------------------
    def rdtsc(self) -> int: ...

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]: ...

    def rdmsr(self, msr: int) -> int:
        """Read an in-kernel MSR (TSC, TSC_DEADLINE, MIGRATION_CONTROL). Unknown: #GP."""
        ...

    def pending_interrupt(self) -> int | None:
        """Acknowledge and return the highest pending interrupt vector, if any."""
        ...

    # -- exiting instructions: at most one per step, and last ------------------
    def wrmsr(self, msr: int, value: int) -> None: ...

    def out(self, port: int, value: int, size: int = 1) -> None: ...

    def outs(self, port: int, data: bytes) -> None:
        """``rep outsb``: one exit carrying all bytes."""
        ...

    def inp(self, port: int, size: int = 1) -> None:
        """``in``: the value arrives in ``regs.rax`` for the next step."""
        ...

    def mmio_write(self, gpa: int, data: bytes) -> None: ...

    def mmio_read(self, gpa: int, size: int) -> None:
        """The value arrives in ``regs.rax`` for the next step."""
        ...

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0) -> None:
        """``vmmcall``: the return value arrives in ``regs.rax`` for the next step."""
        ...

    def hlt(self) -> None: ...

    def shutdown(self) -> None:
        """Triple fault: the VM is dead (SHUTDOWN exit)."""
        ...


GuestProgram = Callable[[GuestCpu], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RomRegion:
    """Guest code mapped at ``[base, base + size)`` of the instruction address space."""

    name: str
    base: int
    size: int
    step: GuestProgram

    def contains(self, rip: int) -> bool:
        return self.base <= rip < self.base + self.size


class GuestFault(Exception):
    """The guest did something the CPU refuses (#GP, bad address, two exits in a step).

    Raised inside the core; the vCPU turns it into a SHUTDOWN exit, as a triple
    fault would.
    """
