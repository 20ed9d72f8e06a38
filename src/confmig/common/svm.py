"""Architectural VMEXITs: how the (emulated) CPU hands control to the host kernel.

On AMD SVM a guest instruction the CPU does not complete by itself ends in a
#VMEXIT with an exit code and exit information in the VMCB; KVM then either
emulates it in the kernel or turns it into a ``KVM_EXIT_*`` for the VMM. The CPU
core (:mod:`confmig.platform.cpu`) produces :class:`VmExit`; the host kernel
(:mod:`confmig.kvm.vcpu`) consumes it. Codes are SVM's (APM vol. 2, appendix C).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SvmExitCode(enum.IntEnum):
    ERR = -1
    """VMEXIT_INVALID (Linux's ``SVM_EXIT_ERR``): VMRUN refused the guest; it never ran."""
    INTR = 0x60
    HLT = 0x78
    IOIO = 0x7B
    MSR = 0x7C
    SHUTDOWN = 0x7F
    VMMCALL = 0x81
    NPF = 0x400
    """Nested page fault: here only for MMIO (a GPA that no memory slot backs)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VmExit:
    """One #VMEXIT. Fields that a code does not use stay at their defaults."""

    code: SvmExitCode
    port: int = 0
    size: int = 0
    write: bool = False
    data: bytes = b""
    msr: int = 0
    value: int = 0
    gpa: int = 0
    nr: int = 0
    args: tuple[int, ...] = ()
    reason: str = ""
