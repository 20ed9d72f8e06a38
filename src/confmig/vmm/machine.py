"""The model machine: guest RAM, memory slots, vCPU threads, devices, run state.

Like QEMU, each vCPU has a thread that loops on ``KVM_RUN`` and dispatches the
exits to devices. Stopping the VM kicks every vCPU out of ``KVM_RUN``; a vCPU
leaving with an unfinished exit (an ``in`` whose value is not delivered yet)
completes it with ``immediate_exit`` first, so the saved registers are exact.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from confmig.common.errors import ConfigError, KvmError, StateError
from confmig.common.x86 import (
    ISA_DEBUG_EXIT_PORT,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
)
from confmig.kvm.client import Kvm, VcpuFd, VmFd
from confmig.proto import cpr, ioctl
from confmig.vmm.cmdline import MachineConfig
from confmig.vmm.cpr import move_enc_context
from confmig.vmm.devices import PortIoDevice
from confmig.vmm.devices.fw_cfg import FwCfg
from confmig.vmm.devices.kv import KvDevice
from confmig.vmm.devices.serial import Serial
from confmig.vmm.firmware import FirmwareImage
from confmig.vmm.memory import GuestMemory
from confmig.vmm.mh import MigrationHandler
from confmig.vmm.migration.cpr import CprReceived
from confmig.vmm.runstate import RunState, check_transition
from confmig.vmm.sev import SecretArea, SevGuest

log = logging.getLogger(__name__)

MACHINE_TYPE = "pc-q35-7.2"
VCPU_STOP_TIMEOUT = 5.0
"""A vCPU polls for kicks every millisecond; seconds means the vCPU process is gone."""
HLT_WAIT = 0.05
"""Longest a vCPU thread sleeps on a userspace HLT before looking again."""

REGS_COUNT = ioctl.REGS.size // 8
"""Fields of ``struct kvm_regs`` (all u64)."""
MSRS_TO_MIGRATE = (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KVM_MIGRATION_CONTROL)

EventSink = Callable[[str, "dict[str, object] | None"], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuState:
    """Everything of a vCPU that migrates: registers, MSRs, run state."""

    regs: tuple[int, ...]
    msrs: dict[int, int]
    mp_state: int

    def encode(self) -> bytes:
        return ioctl.REGS.pack(*self.regs) + ioctl.encode_msrs(self.msrs) + struct.pack("<I", self.mp_state)

    @classmethod
    def decode(cls, data: bytes) -> CpuState:
        n = ioctl.REGS.size
        regs = ioctl.REGS.unpack_from(data)
        (count,) = struct.unpack_from("<I", data, n)
        msr_len = 8 + count * ioctl.MSR_ENTRY.size
        msrs = ioctl.decode_msrs(data[n : n + msr_len])
        (mp,) = struct.unpack_from("<I", data, n + msr_len)
        if len(data) != n + msr_len + 4:
            raise ValueError("cpu state: trailing bytes")
        return cls(regs=regs, msrs=msrs, mp_state=mp)


class VcpuThread(threading.Thread):
    """One vCPU: loops on KVM_RUN while the VM runs, parks while it is stopped."""

    def __init__(self, machine: Machine, fd: VcpuFd) -> None:
        super().__init__(name=f"vcpu{fd.vcpu_id}", daemon=True)
        self.machine = machine
        self.fd = fd
        self._cond = threading.Condition()
        self._should_run = False
        self._quit = False
        self._irq = False
        self.parked = threading.Event()
        self.parked.set()

    def run(self) -> None:
        completion = b""
        while True:
            with self._cond:
                while not self._should_run and not self._quit:
                    self.parked.set()
                    self._cond.wait()
                if self._quit:
                    self.parked.set()
                    return
            try:
                ex = self.fd.run(completion)
                completion = self.machine.handle_exit(self, ex)
                if completion and not self._should_run:
                    self.fd.run(completion, immediate_exit=True)
                    completion = b""
            except Exception as exc:
                log.error("vcpu%d: %s", self.fd.vcpu_id, exc)
                self.machine.internal_error(f"vcpu{self.fd.vcpu_id}: {exc}")
                completion = b""

    def resume(self) -> None:
        with self._cond:
            self.parked.clear()
            self._should_run = True
            self._cond.notify_all()

    def request_stop(self) -> None:
        with self._cond:
            self._should_run = False
            self._cond.notify_all()
        self.fd.kick()

    def wait_parked(self) -> bool:
        return self.parked.wait(VCPU_STOP_TIMEOUT)

    def quit(self) -> None:
        with self._cond:
            self._quit = True
            self._should_run = False
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.fd.kick()

    def interrupt(self, vector: int) -> None:
        self.fd.interrupt(vector)
        with self._cond:
            self._irq = True
            self._cond.notify_all()

    def wait_for_event(self) -> None:
        """A userspace HLT: sleep until an interrupt is raised or the VM stops."""
        with self._cond:
            self._cond.wait_for(lambda: self._irq or not self._should_run, HLT_WAIT)
            self._irq = False


class Machine:
    """A VM on a ``confmig host``: created, started, stopped, saved, loaded.

    ``cpr``: what an old VMM handed over on the ``cpr`` channel (``cpr-transfer``): this
    machine maps the guest's RAM from it and takes the guest's contexts in :meth:`take_over`
    instead of allocating RAM and launching a guest of its own."""

    def __init__(self, config: MachineConfig, *, events: EventSink, console: Callable[[bytes], None],
                 cpr: CprReceived | None = None) -> None:
        self.config = config
        self.cpr = cpr
        self.handed_over: str | None = None
        """Why this VMM may not run its guest any more: it handed it to a new VMM process on
        this host (``cpr-transfer``), which shares its RAM and may run it."""
        self._events = events
        self._state_lock = threading.RLock()
        self._runstate = RunState.INMIGRATE if config.incoming else RunState.PRELAUNCH
        self.shutdown_reason: str | None = None
        self.autostart = not config.start_paused
        """Run the guest once an incoming migration has loaded (cleared by ``stop``)."""
        self.kvm = Kvm(config.host)
        self.vm: VmFd = self.kvm.create_vm()
        ram_fds = self._cpr_ram() if cpr is not None else {}
        self.memory = GuestMemory.pc(config.ram_size, fd=ram_fds.pop("pc.ram", None))
        self.firmware = FirmwareImage.load(config.bios) if config.bios else None
        if self.firmware is not None:
            self.memory.add_block("pc.bios", self.firmware.data, gpa=self.firmware.gpa, slot=2,
                                  fd=ram_fds.pop("pc.bios", None))
        if ram_fds:
            raise ConfigError(f"cpr-transfer: the old VMM has RAM blocks this machine has not: "
                              f"{', '.join(sorted(ram_fds))} (start the new VMM with the same options)")
        if cpr is None and (config.prealloc or config.incoming or config.mh_target):
            for block in self.memory.blocks:
                block.prealloc()  # an incoming migration must not pay first-touch costs
        self._dirty_logging = False
        self._register_memslots()
        self.sev: SevGuest | None = None
        if config.sev is not None:
            self.sev = SevGuest(config.sev, config.name, self.kvm, self.vm,
                                kvm_features=config.cpu.kvm_pv_features())
            self.sev.init(context=cpr is None)  # else the context arrives with the move (take_over)
            if cpr is not None:
                self.sev.handle = cpr.state.sev_handle
        self.serial = Serial(console)
        self.fw_cfg = FwCfg(
            self.memory, ram_size=config.ram_size, nb_cpus=config.smp,
            cmdline=config.guest.kernel_cmdline(), files=dict(config.fw_cfg_files),
        )
        self.devices: list[PortIoDevice] = [self.serial, self.fw_cfg]
        self.kv: KvDevice | None = None
        if config.kv_socket:
            kv = KvDevice(self.memory, self.raise_irq, config.kv_socket)
            self.kv = kv
            self.devices.append(kv)
        self._ports: dict[int, PortIoDevice] = {p: d for d in self.devices for p in d.ports}
        self.vcpus = [VcpuThread(self, self.vm.create_vcpu(i)) for i in range(config.smp)]
        self.mh: MigrationHandler | None = None
        """The Migration Handler's mirror VM (``-smp N,mirrorvcpus=M``): made during the launch."""
        self.awaiting_guest = config.mh_target
        """An MH target whose guest has not arrived yet: its devices do not serve."""
        if config.mirror_vcpus:
            self._check_migration_handler(config.mirror_vcpus)
        if self.sev is not None:
            for v in self.vcpus:
                v.fd.set_cpuid(self.sev.cpuid())
            if cpr is not None:
                if config.mirror_vcpus:
                    self.mh = self._migration_handler(self.sev, config.mirror_vcpus, moved=True)
            elif self.psp_guest is None or not config.incoming:
                self._sev_launch(self.sev)
            # else: the guest context arrives with the stream (RECEIVE_START)
        for v in self.vcpus:
            v.start()

    def _check_migration_handler(self, nvcpus: int) -> None:
        why = None
        if self.sev is None or self.sev.config.x_plain_copy:
            why = "they serve an SEV guest (-object sev-guest ... -machine confidential-guest-support=...)"
        elif self.config.incoming and self.cpr is None:
            why = ("a mirror VM copies a launched guest's context; a Migration Handler target starts "
                   "without -incoming, with -fw_cfg name=opt/ovmf/PcdSevIsMigrationTarget,string=1")
        elif self.firmware is None or self.firmware.migration_handler() is None:
            why = "the firmware (-bios) declares no Migration Handler"
        if why is not None:
            raise ConfigError(f"-smp mirrorvcpus={nvcpus}: {why}")

    def _migration_handler(self, sev: SevGuest, nvcpus: int, *, moved: bool = False) -> MigrationHandler:
        """The mirror VM: made once the guest's context exists (LAUNCH_START), before the
        launch is measured: an SEV-ES mirror's VMSAs are measured with the guest's. ``moved``
        (cpr-transfer): a new mirror VM that takes the old one's context later (take_over)."""
        assert self.firmware is not None
        block = self.firmware.migration_handler()
        assert block is not None
        es = sev.config.es
        return MigrationHandler(self.kvm, None if moved else self.vm, self.memory, block, nvcpus,
                                lambda: self._slot_regions(0), protected=es,
                                launch_vmsas=sev.launch_update_vmsa if es and not moved else None)

    # --- cpr-transfer -----------------------------------------------------------------

    def _cpr_ram(self) -> dict[str, int]:
        """The old VMM's RAM memfds by block idstr (ours now)."""
        assert self.cpr is not None
        out: dict[str, int] = {}
        for index, entry in self.cpr.state.ram():
            # SECURITY: names and sizes come from another process; RamBlock checks each size
            # against the memfd and this machine's own layout decides what is mapped where.
            if entry.name in out:
                raise ConfigError(f"cpr-transfer: RAM block {entry.name} handed over twice")
            out[entry.name] = self.cpr.take(index)
        return out

    def cpr_state(self) -> tuple[cpr.CprState, list[int]]:
        """What a new VMM needs to take this guest over (``cpr-transfer``): every RAM block's
        memfd, and for an SEV guest its VM fd and its mirror VM's fd, which the new VMM names
        in ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``. The descriptors stay this VMM's too."""
        entries = [(cpr.CprFd(kind=cpr.FdKind.RAM, name=b.idstr, size=b.size), b.fd)
                   for b in self.memory.blocks]
        if self.sev is not None:
            entries.append((cpr.CprFd(kind=cpr.FdKind.VM), self.vm.fileno()))
            if self.mh is not None:
                entries.append((cpr.CprFd(kind=cpr.FdKind.MIRROR_VM), self.mh.mirror.fileno()))
        state = cpr.CprState(fds=tuple(e for e, _ in entries), sev_handle=self.sev.handle if self.sev else 0)
        return state, [fd for _, fd in entries]

    def take_over(self) -> None:
        """cpr-transfer, the old VMM's vCPUs stopped and its state loaded: the guest's SEV
        context moves to this VM (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``; no PSP command), then
        its mirror's to our mirror VM. The old VMs are dead afterwards. If the guest's own
        move fails nothing changed (the old VMM resumes); once it succeeded the guest is ours,
        and a mirror that fails to follow leaves this guest without its Migration Handler."""
        assert self.cpr is not None
        try:
            source = self.cpr.take_kind(cpr.FdKind.VM)
            mirror = self.cpr.take_kind(cpr.FdKind.MIRROR_VM)
            if self.sev is None:
                return  # a plain guest: its RAM is all it had
            if source is None:
                raise ConfigError("cpr-transfer: the old VMM sent no VM fd for its SEV guest")
            move_enc_context(self.vm, source)
            log.info("cpr-transfer: SEV context moved here (handle %d)", self.sev.handle)
            if self.mh is not None:
                if mirror is None:
                    log.error("cpr-transfer: no mirror VM fd: the Migration Handler stays behind")
                    self.mh.close()
                    self.mh = None
                    return
                try:
                    move_enc_context(self.mh.mirror, mirror)  # SEV-ES: its VMSAs with it
                except KvmError as exc:  # the guest is ours already: it runs without its MH
                    log.error("cpr-transfer: the mirror VM did not follow: %s", exc)
                    self.mh.close()
                    self.mh = None
        finally:
            self.cpr.close()  # the old VMM's VM fds: dead now, or never needed

    def _sev_launch(self, sev: SevGuest) -> None:
        """Measure and encrypt the firmware, then let the owner check and provision."""
        fw = self.firmware
        measured = [(fw.gpa, len(fw.data))] if fw is not None else []
        area = fw.secret_area() if fw is not None else None

        def mirror() -> None:
            if self.config.mirror_vcpus:
                self.mh = self._migration_handler(sev, self.config.mirror_vcpus)

        sev.launch(measured, SecretArea(gpa=area[0], size=area[1]) if area else None,
                   before_measure=mirror, migration_target=self.config.mh_target)

    @property
    def psp_guest(self) -> SevGuest | None:
        """The SEV guest whose private pages migrate through the PSP; None for a plain
        guest, or one whose RAM the test-only ``x-plain-copy`` sends as the host sees it."""
        return self.sev if self.sev is not None and not self.sev.config.x_plain_copy else None

    def migration_blockers(self) -> list[str]:
        return self.sev.blockers() if self.sev is not None else []

    # --- run state -----------------------------------------------------------

    @property
    def runstate(self) -> RunState:
        return self._runstate

    def set_runstate(self, new: RunState) -> None:
        with self._state_lock:
            check_transition(self._runstate, new)
            self._runstate = new

    def start(self) -> None:
        """``cont``: run the vCPUs (QEMU's ``vm_start``)."""
        with self._state_lock:
            if self._runstate == RunState.RUNNING:
                return
            if self._runstate in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                raise StateError("cont", self._runstate, "a VM that can run")
            if (away := self.migrated_away()) is not None:
                raise StateError("cont", self._runstate, f"a guest that was not migrated away: {away}, "
                                 "so running it here too would fork it")
            if self.sev is not None:
                self.sev.receive_finish()  # an incoming SEV guest becomes RUNNING in the PSP
            self.set_runstate(RunState.RUNNING)
            for v in self.vcpus:
                v.resume()
        self.resume_devices()
        self._events("RESUME", None)

    def migrated_away(self) -> str | None:
        """Why this guest left this VMM for good, if it did: one copy of a guest runs."""
        if self.handed_over is not None:
            return self.handed_over
        if self.mh is not None and self.mh.sent_away:
            return "its Migration Handler sealed its final state for the target"
        if self.sev is not None and self.sev.state() == "sent":
            return "its PSP sent it to the target (SEND_FINISH; the SEV API has no way back)"
        return None

    def stop(self, new_state: RunState = RunState.PAUSED) -> None:
        """QEMU's ``vm_stop``: every vCPU out of KVM_RUN, parked, exits completed."""
        with self._state_lock:
            was_running = self._runstate == RunState.RUNNING
            if self._runstate != new_state:
                self.set_runstate(new_state)
            for v in self.vcpus:
                v.request_stop()
            for v in self.vcpus:
                if not v.wait_parked():
                    raise StateError("stop", f"vcpu{v.fd.vcpu_id} not responding", "parked vCPUs")
        if was_running:
            self._events("STOP", None)

    def quiesce_devices(self) -> None:
        """Switch-over: devices that write guest RAM on their own stop doing so, so
        the final RAM pass and their saved state are consistent."""
        if self.kv is not None:
            self.kv.stop()

    def resume_devices(self) -> None:
        """Undo :meth:`quiesce_devices` (the VM stays here after all). A Migration Handler target
        serves nobody before its guest arrived: its firmware runs, but the guest is not there."""
        if self.awaiting_guest:
            return
        if self.kv is not None and not self.kv.listening:
            self.kv.start()

    @property
    def running(self) -> bool:
        return self._runstate == RunState.RUNNING

    # --- exits -----------------------------------------------------------------

    def handle_exit(self, vcpu: VcpuThread, ex: ioctl.VcpuExit) -> bytes:
        """Serve one exit; return the completion for the next KVM_RUN."""
        match ex:
            case ioctl.ExitIo(direction=ioctl.KVM_EXIT_IO_OUT):
                if ex.port == ISA_DEBUG_EXIT_PORT:
                    self.guest_shutdown("guest-shutdown")
                    return b""
                dev = self._ports.get(ex.port)
                if dev is not None:
                    dev.io_out(ex.port, ex.data)
                return b""
            case ioctl.ExitIo():
                dev = self._ports.get(ex.port)
                return dev.io_in(ex.port, ex.size) if dev is not None else b"\xff" * ex.size
            case ioctl.ExitMmio(is_write=False):
                return b"\xff" * ex.length  # no MMIO devices: reads float high
            case ioctl.ExitHlt():
                vcpu.wait_for_event()
            case ioctl.ExitShutdown():
                self.guest_shutdown("guest-reset")
            case ioctl.ExitInternalError():
                self.internal_error(ex.message)
            case ioctl.ExitFailEntry():  # QEMU's words; it stops the VM with internal-error too
                reason = ex.hardware_entry_failure_reason
                self.internal_error(f"KVM: entry failed, hardware error {reason:#x}")
            case ioctl.ExitHypercall():
                if self.sev is not None and ex.nr == KVM_HC_MAP_GPA_RANGE:
                    return struct.pack("<Q", self.sev.map_gpa_range(*ex.args[:3]))
                return struct.pack("<Q", -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF)
            case ioctl.ExitMsr(write=True):
                if self.sev is None or not self.sev.wrmsr(ex.index, ex.data):
                    log.warning("guest wrote MSR %#x = %#x: refused", ex.index, ex.data)
        return b""

    def guest_shutdown(self, reason: str) -> None:
        self.shutdown_reason = reason
        threading.Thread(target=self._shutdown, args=(reason,), daemon=True).start()

    def _shutdown(self, reason: str) -> None:
        with self._state_lock:
            if self._runstate in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                return
            self.stop(RunState.SHUTDOWN)
        self._events("SHUTDOWN", {"guest": True, "reason": reason})

    def internal_error(self, message: str) -> None:
        log.error("internal error: %s", message)
        self.shutdown_reason = message
        with self._state_lock:
            if self._runstate == RunState.RUNNING:
                self._runstate = RunState.INTERNAL_ERROR
        for v in self.vcpus:
            with v._cond:
                v._should_run = False

    def raise_irq(self, vector: int) -> None:
        """Deliver an interrupt to vCPU 0 (the model has no IOAPIC routing)."""
        self.vcpus[0].interrupt(vector)

    def inject_nmi(self) -> None:
        for v in self.vcpus:
            v.fd.nmi()
            v.interrupt(2)

    # --- memory slots and dirty logging ------------------------------------------

    def _slot_regions(self, flags: int) -> list[tuple[ioctl.UserspaceMemoryRegion, int]]:
        return [
            (ioctl.UserspaceMemoryRegion(slot=r.slot, flags=flags, guest_phys_addr=r.gpa,
                                         memory_size=r.size, offset=r.offset), block.fd)
            for block in self.memory.blocks for r in block.regions
        ]

    def _register_memslots(self) -> None:
        for region, fd in self._slot_regions(0):
            self.vm.set_user_memory_region(region, fd)

    def set_dirty_logging(self, on: bool) -> None:
        """Flip ``KVM_MEM_LOG_DIRTY_PAGES`` on every slot (the fd stays KVM's)."""
        if on != self._dirty_logging:
            flags = ioctl.KVM_MEM_LOG_DIRTY_PAGES if on else 0
            for region, _fd in self._slot_regions(flags):
                self.vm.set_user_memory_region(region, None)
            self._dirty_logging = on

    # --- state for migration -------------------------------------------------------

    @property
    def _registers_protected(self) -> bool:
        """SEV-ES: the register file lives in the encrypted VMSA, out of the VMM's reach;
        it migrates as a VMSA record and the cpu section carries zeros in its place."""
        return self.sev is not None and self.sev.config.es

    def save_cpu(self, vcpu: VcpuThread) -> CpuState:
        fd = vcpu.fd
        regs = (0,) * REGS_COUNT if self._registers_protected else fd.get_regs()
        msrs = fd.get_msrs(list(MSRS_TO_MIGRATE))
        if self.sev is not None:
            # Writes of this MSR exit to us (the MSR filter): its value is the VMM's to keep.
            msrs[MSR_KVM_MIGRATION_CONTROL] = self.sev.migration_control
        return CpuState(regs=regs, msrs=msrs, mp_state=fd.get_mp_state())

    def load_cpu(self, vcpu: VcpuThread, state: CpuState) -> None:
        fd = vcpu.fd
        if not self._registers_protected:
            fd.set_regs(state.regs)
        if self.sev is not None and MSR_KVM_MIGRATION_CONTROL in state.msrs:
            # The guest enabled migration on the source; it will not write the MSR again.
            self.sev.wrmsr(MSR_KVM_MIGRATION_CONTROL, state.msrs[MSR_KVM_MIGRATION_CONTROL])
        fd.set_msrs(state.msrs)
        fd.set_mp_state(state.mp_state)

    def device(self, vmsd_name: str) -> PortIoDevice | None:
        return next((d for d in self.devices if d.vmsd_name == vmsd_name), None)

    # --- teardown --------------------------------------------------------------------

    def retire(self) -> None:
        """After handing the guest over (cpr-transfer): the vCPU threads end and this VMM's
        vCPU, VM and mirror VM fds close (an SEV guest's are dead: EIO to everything). Guest
        RAM stays mapped until :meth:`close`: the new VMM has its own mapping of it."""
        for v in self.vcpus:
            v.quit()
        for v in self.vcpus:
            v.join(2)
            v.fd.close()
        if self.mh is not None:
            self.mh.close()
        self.vm.close()

    def close(self) -> None:
        if self.cpr is not None:
            self.cpr.close()
        self.retire()
        if self.kv is not None:
            self.kv.stop()
        self.kvm.close()
        self.memory.close()
