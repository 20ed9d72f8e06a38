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


class SecureProcessor(Protocol):
    """The PSP as the host kernel reaches it (the ``sev-dev`` driver's mailbox).

    Primitive types only: handles, ASIDs, system-physical addresses, opaque blobs
    and firmware status codes (0 = SUCCESS). Keys never cross this port.
    """

    def platform_init(self, *, es: bool) -> int:
        """INIT the platform if it is not (with SEV-ES support when ``es``), and
        DF_FLUSH, as Linux's ``sev_platform_init``."""
        ...

    def platform_status(self) -> tuple[int, bytes]: ...

    def pdh_cert_export(self) -> tuple[int, bytes, bytes]:
        """(status, PDH certificate, platform chain PEK‖OCA‖CEK)."""
        ...

    def launch_start(self, handle: int, policy: int, pdh: bytes, session: bytes) -> tuple[int, int]:
        """(status, guest handle)."""
        ...

    def activate(self, handle: int, asid: int) -> int: ...

    def deactivate(self, handle: int) -> int: ...

    def df_flush(self) -> int: ...

    def decommission(self, handle: int) -> int: ...

    def launch_update_data(self, handle: int, spa: int, length: int) -> int: ...

    def launch_measure(self, handle: int) -> tuple[int, bytes]: ...

    def launch_secret(self, handle: int, header: bytes, spa: int, length: int, transport: bytes) -> int: ...

    def launch_finish(self, handle: int) -> int: ...

    def guest_status(self, handle: int) -> tuple[int, int, int]:
        """(status, policy, guest state)."""
        ...

    def dbg_decrypt(self, handle: int, spa: int, length: int) -> tuple[int, bytes]: ...

    def dbg_encrypt(self, handle: int, spa: int, data: bytes) -> int: ...
