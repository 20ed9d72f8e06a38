"""The narrow ports through which the host kernel reaches the emulated silicon.

KVM must not import :mod:`confmig.platform`; it sees the CPU core only through
these protocols, and :mod:`confmig.hostd` (the composition root) supplies the
implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from confmig.common.svm import VmExit


class VmsaPage(Protocol):
    """An SEV-ES vCPU's VMSA page as KVM maps it: 4 KiB of host memory at a system-physical
    address. KVM only ever sees what is stored there (ciphertext once launched)."""

    @property
    def spa(self) -> int: ...

    def read(self) -> bytes: ...

    def write(self, data: bytes) -> None: ...


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

    # -- SEV-ES: the VMSA (the core encrypts, decrypts and checks; KVM only names the page) --

    def set_vmsa(self, page: VmsaPage | None) -> None:
        """The VMCB's VMSA pointer."""
        ...

    def vmsa_sync(self) -> bool:
        """Before LAUNCH_UPDATE_VMSA: the register file into the page in plaintext."""
        ...

    def vmsa_launched(self) -> None:
        """After LAUNCH_UPDATE_VMSA: the (now encrypted) page is the register file."""
        ...

    def vmsa_save(self) -> bool:
        """#VMEXIT: the registers into the page, encrypted; the checksum into the TMR."""
        ...

    def vmsa_load(self) -> bool:
        """The registers from the page, if it passes the TMR check (after RECEIVE_UPDATE_VMSA)."""
        ...

    def enter(self) -> bool:
        """VMRUN: load the VMSA first if the state is there. False (VMEXIT_INVALID) if the
        guest may not run: an SEV ASID the PSP has not made runnable, or a VMSA that failed
        its check."""
        ...


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

    def launch_update_vmsa(self, handle: int, spa: int) -> int:
        """LAUNCH_UPDATE_VMSA of the 4 KiB SEV-ES VMSA page at ``spa``."""
        ...

    # -- migration (the SEV API's SEND_* / RECEIVE_*; packets are opaque here) --

    def send_start(
        self, handle: int, pdh: bytes, plat_certs: bytes, amd_certs: bytes, session_len: int
    ) -> tuple[int, int, bytes, int]:
        """(status, policy, session blob, session_len) for the receiver whose PDH, PEK‖OCA‖CEK
        and ASK‖ARK are given. ``session_len`` ≠ 128 fails INVALID_LEN with 128 (the query)."""
        ...

    def send_update_data(
        self, handle: int, hdr_len: int, spa: int, length: int, trans_len: int
    ) -> tuple[int, bytes, bytes, int]:
        """(status, packet header, transport data, hdr_len) for ``length`` bytes at ``spa``.
        ``hdr_len`` < 52 fails INVALID_LEN with 52 (the query)."""
        ...

    def send_update_vmsa(
        self, handle: int, hdr_len: int, spa: int, length: int, trans_len: int
    ) -> tuple[int, bytes, bytes, int]:
        """As :meth:`send_update_data`, for the VMSA page at ``spa`` (SEV-ES)."""
        ...

    def send_finish(self, handle: int) -> int: ...

    def send_cancel(self, handle: int) -> int: ...

    def receive_start(self, handle: int, policy: int, pdh: bytes, session: bytes) -> tuple[int, int]:
        """(status, guest handle) from the *sender's* PDH and its session blob; handle 0 = new guest."""
        ...

    def receive_update_data(
        self, handle: int, header: bytes, spa: int, length: int, transport: bytes
    ) -> int: ...

    def receive_update_vmsa(
        self, handle: int, header: bytes, spa: int, length: int, transport: bytes
    ) -> int: ...

    def receive_finish(self, handle: int) -> int: ...
