"""The Migration Handler as the VMM sees it: a mirror VM, its vCPUs, and their mailboxes.

``-smp N,mirrorvcpus=M`` gives an SEV guest M Migration Handler vCPUs, in a
mirror VM: a second KVM VM that shares the guest's encryption context
(``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``) and the guest's memory slots, but has
vCPUs of its own, so that the MH in the guest's firmware reads and writes
private memory while the guest's own vCPUs are stopped. The firmware image
says where the MH starts and where its mailbox is (its GUIDed table).

The VMM drives the MH through the mailbox (:mod:`confmig.proto.mailbox`) in
shared pages it reads directly: it writes a command, sets ``go`` and enters
the MH vCPU with ``KVM_RUN``; the MH serves every slot whose ``go`` is set,
sets ``done`` and halts back to the host. An idle MH costs nothing: it is a
halted vCPU nobody enters (the reviewers' request to the 2021 RFC, whose MH
spun). Every entry has a deadline: an MH that does not halt in time is kicked
out and the command fails.

The VMM is never given the transport key or a private page's plaintext: it hands
the MH GPA lists and sealed records and gets sealed records and return codes.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final

from confmig.common.errors import MigrationError
from confmig.kvm.client import Kvm, VcpuFd, VmFd
from confmig.proto import ioctl
from confmig.proto import mailbox as mb
from confmig.proto.ovmf_table import MH_INITIAL_RFLAGS, MigrationHandlerBlock
from confmig.vmm.memory import GuestMemory

log = logging.getLogger(__name__)

MH_TIMEOUT: Final = 30.0
"""Seconds one entry of an MH vCPU may take (a full batch takes milliseconds)."""

SlotRegions = Callable[[], Iterable[tuple[ioctl.UserspaceMemoryRegion, int]]]


class MhError(MigrationError):
    """The Migration Handler refused a command, or did not answer."""


class Watchdog:
    """Kicks a vCPU out of ``KVM_RUN`` once an entry has lasted ``timeout`` seconds: one thread
    that looks twice a second (a timer thread per entry cost more than a small batch's work)."""

    POLL: Final = 0.5

    def __init__(self, kick: Callable[[], None], timeout: float, name: str) -> None:
        self._kick = kick
        self._timeout = timeout
        self._lock = threading.Lock()
        self._since: float | None = None
        self._stop = threading.Event()
        self.name = name
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def arm(self) -> None:
        with self._lock:
            self._since = time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._since = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL):
            with self._lock:  # an entry that ends meanwhile waits in disarm: no stale kick
                late = self._since is not None and time.monotonic() - self._since >= self._timeout
                if late:
                    self._since = None
                    try:
                        self._kick()
                    except OSError as exc:  # the vCPU fd is gone: nothing left to kick
                        log.warning("Migration Handler watchdog %s: kick failed: %s", self.name, exc)


class MhVcpu:
    """One MH vCPU and its mailbox (a window of guest RAM, shared pages)."""

    def __init__(self, fd: VcpuFd, index: int, mailbox: memoryview, gpa: int) -> None:
        self.fd = fd
        self.index = index
        self.mailbox = mailbox
        self.gpa = gpa
        self.lock = threading.Lock()
        """One entry at a time per MH vCPU (the slots of one vCPU share its entries)."""
        self.broken: str | None = None
        """Why an entry failed: the MH's state is unknown, no command is sent to it again."""
        self.entered = False
        """It was entered at the MH's entry point once (:meth:`MigrationHandler.start`): before,
        its registers are the reset state's, and an entry would run the guest's boot code."""
        self.watchdog = Watchdog(fd.kick, MH_TIMEOUT, f"mh{index}-watchdog")

    def data(self, slot: int) -> memoryview:
        """The data area of ``slot``."""
        start = mb.slot_offset(slot) + mb.SLOT_HEADER
        return self.mailbox[start : start + mb.SLOT_DATA]

    def io_header(self, data: bytes) -> None:
        """The v1 io header: ``u32 len`` and the bytes."""
        if len(data) > mb.IO_HDR_MAX:
            raise MhError(f"io header of {len(data)} bytes (at most {mb.IO_HDR_MAX})")
        struct.pack_into(f"<I{len(data)}s", self.mailbox, mb.IO_HDR_OFFSET, len(data), data)

    def read_io_header(self) -> bytes:
        """What the MH left in the v1 io header (bounded: the guest wrote the length)."""
        (n,) = struct.unpack_from("<I", self.mailbox, mb.IO_HDR_OFFSET)
        if n > mb.IO_HDR_MAX:
            raise MhError(f"Migration Handler vCPU {self.index} left an io header of {n} bytes")
        return bytes(self.mailbox[mb.IO_HDR_OFFSET + 4 : mb.IO_HDR_OFFSET + 4 + n])

    def command(self, cmd: mb.MhCommand, *, slot: int | None = None, npages: int = 0, length: int = 0,
                epoch: int = 0, gpa: int = 0) -> mb.Command:
        """Issue ``cmd`` in ``slot`` (None: the v1 block), enter the MH, return its answer."""
        base = mb.CMD_OFFSET if slot is None else mb.slot_offset(slot)
        with self.lock:
            if self.broken is not None:
                raise MhError(f"Migration Handler vCPU {self.index} failed earlier ({self.broken})")
            if not self.entered:
                raise MhError(f"Migration Handler vCPU {self.index} is not started "
                              "(start-migration-handler)")
            self.mailbox[base : base + mb.COMMAND.size + mb.V2_FIELDS.size] = mb.encode_request(
                cmd, gpa=gpa, npages=npages, length=length, epoch=epoch)
            struct.pack_into("<i", self.mailbox, base + mb.GO_OFFSET, 1)  # published last
            try:
                self._enter()
            except MhError as exc:
                # A command the MH did not serve must not run at its next entry.
                struct.pack_into("<i", self.mailbox, base + mb.GO_OFFSET, 0)
                self.broken = str(exc)
                raise
            answer = mb.decode_command(self.mailbox[base : base + mb.COMMAND.size + mb.V2_FIELDS.size])
        if not answer.done or answer.go:
            raise MhError(f"Migration Handler vCPU {self.index} did not complete {cmd.name} "
                          f"(go={answer.go}, done={answer.done})")
        return answer

    def enter(self) -> None:
        """An entry with no command: the MH finds nothing to serve and halts."""
        with self.lock:
            self._enter()
            self.entered = True

    def _enter(self) -> None:
        """KVM_RUN until the MH halts; kicked out after :data:`MH_TIMEOUT`."""
        self.watchdog.arm()
        try:
            ex = self.fd.run()
        finally:
            self.watchdog.disarm()
        match ex:
            case ioctl.ExitHlt():
                return
            case ioctl.ExitIntr():
                raise MhError(f"Migration Handler vCPU {self.index} did not halt within {MH_TIMEOUT:.0f} s")
            case ioctl.ExitShutdown():
                raise MhError(f"Migration Handler vCPU {self.index} shut down (the MH faulted)")
            case ioctl.ExitFailEntry():
                raise MhError(f"Migration Handler vCPU {self.index}: entry failed "
                              f"(hardware error {ex.hardware_entry_failure_reason:#x})")
            case _:
                raise MhError(f"Migration Handler vCPU {self.index}: unexpected exit {type(ex).__name__}")


class MigrationHandler:
    """The mirror VM of one SEV guest and its MH vCPUs."""

    def __init__(self, kvm: Kvm, guest_vm: VmFd | None, memory: GuestMemory, block: MigrationHandlerBlock,
                 nvcpus: int, slot_regions: SlotRegions, *,
                 launch_vmsas: Callable[[VmFd], None] | None = None, protected: bool = False) -> None:
        """The mirror VM copies ``guest_vm``'s context before its vCPUs exist (the kernel's
        rule); ``guest_vm`` None: the context arrives later, moved from another VMM's mirror
        (cpr-transfer: ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`` on :attr:`mirror`), with its VMSAs if
        ``protected`` (SEV-ES).
        ``launch_vmsas``: an SEV-ES guest's LAUNCH_UPDATE_VMSA for the mirror, during the
        guest's launch: the MH vCPUs' registers are set to the entry here, then sealed into
        their VMSAs and measured; nobody sets them again (the host cannot)."""
        if nvcpus > mb.max_mh_vcpus(block.mailbox_size):
            raise MhError(f"-smp mirrorvcpus={nvcpus}: the firmware's mailbox serves at most "
                          f"{mb.max_mh_vcpus(block.mailbox_size)} Migration Handler vCPUs")
        self.block = block
        self.memory = memory
        self.mirror = kvm.create_vm()
        self.vcpus: list[MhVcpu] = []
        try:
            if guest_vm is not None:
                self.mirror.enable_cap_fd(ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, guest_vm.fileno())
            for region, fd in slot_regions():
                self.mirror.set_user_memory_region(region, fd)
            for i in range(nvcpus):
                self.vcpus.append(self._vcpu(i))
            if launch_vmsas is not None:
                for v in self.vcpus:
                    v.fd.set_regs(self._entry_registers())
                launch_vmsas(self.mirror)
        except BaseException:
            self.close()
            raise
        self.protected = protected or launch_vmsas is not None
        """SEV-ES: the MH vCPUs' registers are in their VMSAs, set at the launch."""
        self._start_lock = threading.Lock()
        self.started = False
        self.sent_away = False
        """The source MH sealed the guest's final state (FINISH): the guest may not run here."""

    def _vcpu(self, i: int) -> MhVcpu:
        gpa = mb.mailbox_base(self.block.mailbox_gpa, self.block.mailbox_size, i)
        try:
            ram, offset = self.memory.translate(gpa, mb.MAILBOX_STRIDE)
        except ValueError:
            raise MhError(f"the Migration Handler's mailbox at {gpa:#x} is not in guest RAM") from None
        view = ram.bytes[offset : offset + mb.MAILBOX_STRIDE].data.cast("B")
        return MhVcpu(self.mirror.create_vcpu(i), i, view, gpa)

    @property
    def area(self) -> tuple[int, int]:
        """The MH's guest-physical area (GPA, size): mailboxes and its own state. Never migrated
        as guest memory: each side's MH owns its own."""
        return self.block.mailbox_gpa, self.block.area_size

    def target_challenge(self) -> bytes:
        """What a target MH published for the source: its challenge (for FINISH) and the
        owner's ticket (for INIT); zeros before its firmware is ready, or on a guest that is no
        target."""
        box = self.vcpus[0].mailbox
        return bytes(box[mb.CHALLENGE_OFFSET : mb.CHALLENGE_OFFSET + mb.TARGET_OFFER_SIZE])

    def query(self, *, target: bool) -> dict[str, object]:
        """``x-query-migration-handler``."""
        info: dict[str, object] = {
            "mh-vcpus": len(self.vcpus), "started": self.started, "sent-away": self.sent_away,
            "mailbox": {"gpa": self.block.mailbox_gpa, "size": self.block.mailbox_size},
        }
        if target:
            info["target-challenge"] = self.target_challenge().hex()
        return info

    def start(self) -> None:
        """``start-migration-handler``: every MH vCPU at the MH's entry point, entered once
        (it finds no command and halts). Idempotent."""
        with self._start_lock:  # QMP's start-migration-handler may race a migration's setup
            if self.started:
                return
            for v in self.vcpus:
                if not self.protected:
                    with v.lock:
                        v.fd.set_regs(self._entry_registers())
                v.enter()
            self.started = True

    def _entry_registers(self) -> tuple[int, ...]:
        """An MH vCPU at the firmware's entry (``proto.ovmf_table``): ``rip`` and ``rflags``."""
        regs = [0] * (ioctl.REGS.size // 8)
        regs[16], regs[17] = self.block.entry, MH_INITIAL_RFLAGS  # rip, rflags
        return tuple(regs)

    def close(self) -> None:
        for v in self.vcpus:
            v.watchdog.close()
            v.fd.close()
        self.mirror.close()

