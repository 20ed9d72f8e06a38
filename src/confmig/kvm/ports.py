"""The narrow ports through which the host kernel reaches the emulated silicon.

KVM must not import :mod:`confmig.platform`; it sees the CPU core only through
these protocols, and :mod:`confmig.hostd` (the composition root) supplies the
implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from confmig.common.svm import VmExit


class CpuCore(Protocol):
    """What the vCPU run loop needs from a CPU core."""

    halted: bool
    msr_exits: frozenset[int]
    msr_user_exit: bool

    def set_cpuid(self, entries: dict[tuple[int, int], tuple[int, int, int, int]]) -> None: ...

    def set_asid(self, asid: int, *, es: bool = False) -> None: ...

    def step(self) -> VmExit | None: ...

    def complete(self, value: int) -> None: ...

    def get_regs_tuple(self) -> tuple[int, ...]: ...

    def set_regs_tuple(self, values: tuple[int, ...]) -> None: ...

    def get_msr(self, index: int) -> int | None: ...

    def set_msr(self, index: int, value: int) -> bool: ...

    def timer_due_ns(self) -> int | None: ...

    def fire_timer_if_due(self) -> bool: ...

    def inject_nmi(self) -> None: ...

    def inject_irq(self, vector: int) -> None: ...


CoreFactory = Callable[[int, object], CpuCore]
"""``factory(vcpu_id, memory) -> core``; ``memory`` is a :class:`confmig.kvm.vcpu.SlotMemory`."""


class VcpuProcess(Protocol):
    pid: int

    def terminate(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


class VcpuLauncher(Protocol):
    """Starts the process that runs one vCPU (a core of its own, not a thread)."""

    def spawn(self, vcpu_id: int, vcpu_fd: int, control_fd: int) -> VcpuProcess: ...
