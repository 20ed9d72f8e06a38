"""The in-kernel half of a vCPU: ``KVM_RUN`` and the other vCPU ioctls.

Runs in the vCPU's own process (started by the host, see :mod:`confmig.hostd`),
so vCPUs of different VMs, and the host's own work, use different cores instead
of queueing behind one interpreter lock. Two channels reach it: the vCPU fd the
VMM holds (ioctls) and a control channel from the host (memory slots, caps).

SEV-ES: the host gives an SEV-ES vCPU a VMSA page (``CTL_SET_VMSA``: a page of
a memfd KVM owns, at a system-physical address) and then, with the vCPU
stopped, asks for what the SEV commands need: the register file written into
it in plaintext before LAUNCH_UPDATE_VMSA (``CTL_VMSA_SYNC``), the page taken
as the register file after it (``CTL_VMSA_LAUNCHED``), the registers stored
into it before SEND_UPDATE_VMSA (``CTL_VMSA_SAVE``) and loaded from it after
RECEIVE_UPDATE_VMSA (``CTL_VMSA_LOAD``). The core does the encrypting,
decrypting and checking; this code only maps the page. Those four are answered
on the control channel with a :class:`~confmig.proto.ioctl.Reply` (``EBUSY``
inside ``KVM_RUN``: real KVM would wait for the vCPU's mutex instead).

Moving the encryption context (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``): the host
first takes every vCPU's mutex of both VMs (``CTL_LOCK``: ``EBUSY`` inside
``KVM_RUN``, as above). A locked vCPU does not read its vCPU fd, so the VMM's
ioctls wait, as they would behind the mutex. The destination's vCPUs then get
the ASID and, SEV-ES, the source vCPUs' VMSA pages (``CTL_SET_VMSA`` and
``CTL_VMSA_ADOPT``) before ``CTL_UNLOCK``; the source's get ``CTL_VM_DEAD``:
they drop the page and the ASID and answer ``EIO`` to every later ioctl.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

import numpy as np

from confmig.common.errors import ProtocolError
from confmig.common.svm import SvmExitCode, VmExit
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.common.x86 import KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE
from confmig.kvm import channel
from confmig.kvm.memslots import MappedSlot, SlotLayout
from confmig.kvm.ports import CoreFactory
from confmig.proto import ioctl
from confmig.proto.ioctl import (
    ExitFailEntry,
    ExitHlt,
    ExitHypercall,
    ExitInternalError,
    ExitIntr,
    ExitIo,
    ExitMmio,
    ExitMsr,
    ExitShutdown,
    VcpuExit,
)

U64_MASK = (1 << 64) - 1

POLL_INTERVAL_NS = 1_000_000
"""How often a running vCPU looks for kicks and interrupts: bounds kick latency."""

# Host → vCPU process control messages (internal to the emulated kernel).
CTL_SET_SLOT = 0xFF00_0101
"""Map a memory slot: two fds (RAM, dirty counters), payload the slot's layout. Replied to,
even inside ``KVM_RUN`` (0, or ``EFAULT``): the memslot update waits for every vCPU."""
CTL_DELETE_SLOT = 0xFF00_0102
CTL_SET_CAPS = 0xFF00_0103
CTL_SET_MSR_FILTER = 0xFF00_0104
CTL_SET_ASID = 0xFF00_0105
CTL_VMSA_LAUNCHED = 0xFF00_0106
"""SEV-ES, after LAUNCH_UPDATE_VMSA: the register file now lives in the encrypted VMSA
(``guest_state_protected``). Replied to."""
CTL_SET_VMSA = 0xFF00_0107
"""SEV-ES: the vCPU's VMSA page: one fd (KVM's memfd), payload ``<QQ`` offset, SPA."""
CTL_VMSA_SYNC = 0xFF00_0108
"""SEV-ES, before LAUNCH_UPDATE_VMSA: the register file into the page, plaintext. Replied to."""
CTL_VMSA_SAVE = 0xFF00_0109
"""SEV-ES, before SEND_UPDATE_VMSA: the registers into the page, encrypted. Replied to."""
CTL_VMSA_LOAD = 0xFF00_010A
"""SEV-ES, after RECEIVE_UPDATE_VMSA: the registers from the page, checked. Replied to."""
CTL_LOCK = 0xFF00_010B
"""The host takes the vCPU's mutex (``kvm_lock_all_vcpus``, to move the encryption context):
0, or ``EBUSY`` inside ``KVM_RUN``. Until ``CTL_UNLOCK`` or ``CTL_VM_DEAD`` the vCPU fd is not
read. Replied to."""
CTL_UNLOCK = 0xFF00_010C
CTL_VMSA_ADOPT = 0xFF00_010D
"""SEV-ES, a move: the page just given (``CTL_SET_VMSA``) holds a source vCPU's protected
state and is this vCPU's register file from now on; the next VMRUN loads it."""
CTL_VM_DEAD = 0xFF00_010E
"""``kvm_vm_dead``: the VM's encryption context moved away. The vCPU gives up its VMSA page
and its ASID, and every later ioctl fails ``EIO``. Ends a lock."""
VMSA_REQUESTS = frozenset({CTL_VMSA_LAUNCHED, CTL_VMSA_SYNC, CTL_VMSA_SAVE, CTL_VMSA_LOAD})
REPLIED_REQUESTS = VMSA_REQUESTS | {CTL_LOCK}
"""Control requests the vCPU answers with a :class:`~confmig.proto.ioctl.Reply` when stopped
(``EBUSY`` inside ``KVM_RUN``); ``CTL_SET_SLOT`` is answered at any time."""
VMSA_PAGE = struct.Struct("<QQ")
CAP_EXIT_MAP_GPA_RANGE = 1 << 0
CAP_USER_SPACE_MSR = 1 << 1
VCPU_READY = b"R"
"""The first byte a vCPU process sends on its control channel: it is up."""

_SLOT = struct.Struct("<IIQQQQ")


def encode_slot(layout: SlotLayout) -> bytes:
    return _SLOT.pack(layout.slot, layout.flags, layout.gpa, layout.size, layout.offset, layout.spa)


def decode_slot(data: bytes) -> SlotLayout:
    slot, flags, gpa, size, offset, spa = _SLOT.unpack(data)
    return SlotLayout(slot=slot, flags=flags, gpa=gpa, size=size, offset=offset, spa=spa)


class SlotMemory:
    """Guest-physical memory seen from one vCPU: lookups in the slots, and dirty
    counting in this vCPU's row of each slot's counters (data first, then count)."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.slots: list[MappedSlot] = []
        self._bases: list[int] = []

    def set_slot(self, slot: MappedSlot) -> None:
        self.delete_slot(slot.layout.slot)
        self.slots.append(slot)
        self.slots.sort(key=lambda s: s.layout.gpa)
        self._bases = [s.layout.gpa for s in self.slots]

    def delete_slot(self, slot_id: int) -> None:
        for s in [s for s in self.slots if s.layout.slot == slot_id]:
            self.slots.remove(s)
            s.close()
        self._bases = [s.layout.gpa for s in self.slots]

    def _find(self, gpa: int, size: int) -> tuple[MappedSlot, int] | None:
        i = bisect.bisect_right(self._bases, gpa) - 1
        if i < 0:
            return None
        s = self.slots[i]
        off = gpa - s.layout.gpa
        if off + size > s.layout.size:
            return None
        return s, off

    def _slot(self, gpa: int, size: int) -> tuple[MappedSlot, int]:
        found = self._find(gpa, size)
        if found is None:
            raise ValueError(f"no memory slot backs {gpa:#x}+{size:#x}")
        return found

    def backed(self, gpa: int, size: int) -> bool:
        return self._find(gpa, size) is not None

    def spa(self, gpa: int) -> int:
        s, off = self._slot(gpa, 1)
        return s.layout.spa + off

    def load(self, gpa: int, size: int) -> bytes:
        s, off = self._slot(gpa, size)
        return s.bytes[off : off + size].tobytes()

    def store(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        s, off = self._slot(gpa, n)
        s.bytes[off : off + n] = np.frombuffer(data, dtype=np.uint8)
        s.counters[self.row, off >> PAGE_SHIFT : ((off + n - 1) >> PAGE_SHIFT) + 1] += 1

    def view_pages(self, gpa: int, npages: int) -> np.ndarray:
        s, off = self._slot(gpa, npages * PAGE_SIZE)
        first = off >> PAGE_SHIFT
        return s.pages[first : first + npages]

    def store_pages(self, gpa: int, data: np.ndarray) -> None:
        n = data.shape[0]
        s, off = self._slot(gpa, n * PAGE_SIZE)
        first = off >> PAGE_SHIFT
        s.pages[first : first + n] = data
        s.counters[self.row, first : first + n] += 1

    def update_pages(self, gpa: int, npages: int, fill: Callable[[np.ndarray], object]) -> None:
        s, off = self._slot(gpa, npages * PAGE_SIZE)
        first = off >> PAGE_SHIFT
        try:
            fill(s.pages[first : first + npages])
        finally:  # what a fill that failed half-way wrote is written all the same
            s.counters[self.row, first : first + npages] += 1


class MappedVmsaPage:
    """A vCPU's VMSA page mapped from KVM's memfd: host memory, not guest RAM."""

    def __init__(self, fd: int, offset: int, spa: int) -> None:
        try:
            self._map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                  offset=offset)
        finally:
            close_quietly(fd)  # the mapping keeps the memory
        self._spa = spa

    @property
    def spa(self) -> int:
        return self._spa

    def read(self) -> bytes:
        return self._map[:PAGE_SIZE]

    def write(self, data: bytes) -> None:
        if len(data) != PAGE_SIZE:
            raise ValueError("a VMSA is one page")
        self._map[:PAGE_SIZE] = data

    def close(self) -> None:
        self._map.close()


class Vcpu:
    """Serves one vCPU fd until the VMM closes it or the host says stop."""

    def __init__(self, vcpu_id: int, sock: socket.socket, control: socket.socket,
                 core_factory: CoreFactory) -> None:
        self.vcpu_id = vcpu_id
        self.sock = sock
        self.control = control
        self.memory = SlotMemory(vcpu_id)
        self.core = core_factory(vcpu_id, self.memory)
        self.caps = 0
        self.kick_pending = False
        self.state_protected = False
        self.vmsa: MappedVmsaPage | None = None
        self.pending: VcpuExit | None = None
        """The last exit, until the next KVM_RUN delivers its completion."""
        self.locked = False
        """The host holds this vCPU's mutex: the vCPU fd waits (``CTL_LOCK``)."""
        self.dead = False
        """The VM is dead (its encryption context moved away): every ioctl fails ``EIO``."""

    # --- the serve loop -------------------------------------------------------

    def serve(self) -> None:
        self.control.sendall(VCPU_READY)
        try:
            while True:
                watched = [self.control] if self.locked else [self.control, self.sock]
                ready, _, _ = select.select(watched, [], [])
                if self.control in ready:
                    if not self._control_message(running=False):
                        return
                    continue  # it may have locked the vCPU: look again before reading the fd
                if self.sock in ready and not self._vcpu_message(running=False):
                    return
        except channel.ChannelClosed:
            return

    def _control_message(self, *, running: bool) -> bool:
        try:
            req, fds = channel.recv_request(self.control)
        except channel.ChannelClosed:
            return False
        if req.request in REPLIED_REQUESTS:
            if running:
                result = -errno.EBUSY
            elif req.request == CTL_LOCK:
                self.locked, result = True, 0
            else:
                result = self._vmsa_request(req.request)
            channel.send_reply(self.control, ioctl.Reply(req.request, req.seq, result, b""))
        elif req.request == CTL_UNLOCK:
            self.locked = False
        elif req.request == CTL_VM_DEAD:
            self._die()
        elif req.request == CTL_VMSA_ADOPT:
            # The page is the protected state a source vCPU left (kvm.sev: a move): this vCPU's
            # registers are the guest's now, as after LAUNCH_UPDATE_VMSA.
            self.core.vmsa_launched()
            self.state_protected = True
        elif req.request == CTL_SET_VMSA:
            offset, spa = VMSA_PAGE.unpack(req.payload)
            if self.vmsa is not None:
                self.vmsa.close()
            self.vmsa = MappedVmsaPage(fds[0], offset, spa)
            self.core.set_vmsa(self.vmsa)
        elif req.request == CTL_SET_SLOT:  # answered even while running: memslots change any time
            try:
                self.memory.set_slot(MappedSlot(decode_slot(req.payload), fds[0], fds[1]))
                result = 0
            except (OSError, ValueError, IndexError, struct.error):
                for fd in fds:
                    close_quietly(fd)
                result = -errno.EFAULT
            channel.send_reply(self.control, ioctl.Reply(req.request, req.seq, result, b""))
        elif req.request == CTL_DELETE_SLOT:
            self.memory.delete_slot(struct.unpack("<I", req.payload)[0])
        elif req.request == CTL_SET_CAPS:
            (self.caps,) = struct.unpack("<Q", req.payload)
            self.core.msr_user_exit = bool(self.caps & CAP_USER_SPACE_MSR)
        elif req.request == CTL_SET_MSR_FILTER:
            self.core.msr_exits = frozenset(ioctl.decode_msr_filter(req.payload))
        elif req.request == CTL_SET_ASID:
            asid, es = struct.unpack("<IB", req.payload)
            self.core.set_asid(asid, es=bool(es))
        return True

    def _die(self) -> None:
        """``kvm_vm_dead``: the context is the destination's now. This vCPU never runs again:
        it gives up the ASID and the VMSA page (the destination's vCPU has that page now). Only
        a locked vCPU is told, so it is never inside ``KVM_RUN`` here."""
        self.dead, self.locked = True, False
        self.pending = None
        self.state_protected = False
        self.core.set_vmsa(None)
        if self.vmsa is not None:
            self.vmsa.close()
            self.vmsa = None
        self.core.set_asid(0)

    def _vmsa_request(self, request: int) -> int:
        """SEV-ES requests of the host, with the vCPU stopped; the core does the work."""
        core = self.core
        if request == CTL_VMSA_SYNC:
            return 0 if not self.state_protected and core.vmsa_sync() else -errno.EINVAL
        if request == CTL_VMSA_LAUNCHED:
            core.vmsa_launched()
            self.state_protected = True
            return 0
        if request == CTL_VMSA_SAVE:
            if not self.state_protected:
                return -errno.EINVAL  # nothing launched or received: no VMSA to store
            return 0 if core.vmsa_save() else -errno.EIO
        # CTL_VMSA_LOAD
        if not core.vmsa_load():
            return -errno.EIO  # the page failed the core's check: the old state stays
        self.state_protected = True
        return 0

    def _vcpu_message(self, *, running: bool) -> bool:
        """Handle one request on the vCPU fd. While running, only the asynchronous
        ones (kick, NMI, interrupt) are possible: the VMM's vCPU thread is blocked
        in KVM_RUN, and KVM serialises every other vCPU ioctl behind it."""
        req, _fds = channel.recv_request(self.sock)
        if req.request in ioctl.ASYNC_VCPU_REQUESTS:
            if not self.dead:  # no reply to give: a dead vCPU drops them
                self._async(req)
            return True
        if running:
            raise ProtocolError(f"{ioctl.name(req.request)} while KVM_RUN is in progress")
        result, payload = self._ioctl(req)
        channel.send_reply(self.sock, ioctl.Reply(req.request, req.seq, result, payload))
        return True

    def _async(self, req: ioctl.Request) -> None:
        if req.request == ioctl.VCPU_SIG_IPI:
            self.kick_pending = True
        elif req.request == ioctl.KVM_NMI:
            self.core.inject_nmi()
        elif req.request == ioctl.KVM_INTERRUPT and len(req.payload) == 4:
            self.core.inject_irq(struct.unpack("<I", req.payload)[0] & 0xFF)

    def _ioctl(self, req: ioctl.Request) -> tuple[int, bytes]:
        r = req.request
        if self.dead:
            return -errno.EIO, b""  # kvm_vcpu_ioctl on a dead VM
        try:
            if r == ioctl.KVM_RUN:
                ex = self.run(ioctl.RunRequest.decode(req.payload))
                return (-errno.EINTR if isinstance(ex, ExitIntr) else 0), ioctl.encode_exit(ex)
            if r in (ioctl.KVM_GET_REGS, ioctl.KVM_SET_REGS) and self.state_protected:
                return -errno.EINVAL, b""  # the registers are in the encrypted VMSA
            if r == ioctl.KVM_GET_REGS:
                return 0, ioctl.REGS.pack(*self.core.get_regs_tuple())
            if r == ioctl.KVM_SET_REGS:
                self.core.set_regs_tuple(ioctl.REGS.unpack(req.payload))
                return 0, b""
            if r == ioctl.KVM_GET_MSRS:
                out: dict[int, int] = {}
                for index in ioctl.decode_msrs(req.payload):
                    value = self.core.get_msr(index)
                    if value is None:
                        break  # KVM stops at the first MSR it cannot read
                    out[index] = value
                return len(out), ioctl.encode_msrs(out)
            if r == ioctl.KVM_SET_MSRS:
                done = 0
                for index, value in ioctl.decode_msrs(req.payload).items():
                    if not self.core.set_msr(index, value):
                        break
                    done += 1
                return done, b""
            if r == ioctl.KVM_SET_CPUID2:
                self.core.set_cpuid(ioctl.decode_cpuid(req.payload))
                return 0, b""
            if r == ioctl.KVM_GET_MP_STATE:
                state = ioctl.KVM_MP_STATE_HALTED if self.core.halted else ioctl.KVM_MP_STATE_RUNNABLE
                return 0, struct.pack("<I", state)
            if r == ioctl.KVM_SET_MP_STATE:
                (state,) = struct.unpack("<I", req.payload)
                if state not in (ioctl.KVM_MP_STATE_RUNNABLE, ioctl.KVM_MP_STATE_HALTED):
                    return -errno.EINVAL, b""
                self.core.halted = state == ioctl.KVM_MP_STATE_HALTED
                return 0, b""
        except (struct.error, ProtocolError, PermissionError):
            return -errno.EINVAL, b""
        return -errno.ENOTTY, b""

    # --- KVM_RUN ----------------------------------------------------------------

    def run(self, req: ioctl.RunRequest) -> VcpuExit:
        if not self.core.enter():
            # VMRUN refused the guest (an SEV ASID not runnable, an SEV-ES VMSA that failed its
            # check): svm_handle_exit reports SVM_EXIT_ERR as KVM_EXIT_FAIL_ENTRY, the exit code
            # as the reason, and KVM_RUN succeeds. Unlike Linux, VMRUN's checks come before the
            # previous exit's completion (dropped) and immediate_exit: an SEV-ES completion
            # needs the registers loaded from the VMSA.
            self.pending = None
            return ExitFailEntry(SvmExitCode.ERR & U64_MASK)
        self._complete(req.completion)
        if req.immediate_exit or self.kick_pending:
            self.kick_pending = False
            return ExitIntr()
        core = self.core
        next_poll = 0
        while True:
            now = time.monotonic_ns()
            if now >= next_poll:
                if self._poll_async():
                    self.kick_pending = False
                    return ExitIntr()
                core.fire_timer_if_due()
                next_poll = now + POLL_INTERVAL_NS
            if core.halted:
                due = core.timer_due_ns()
                if due is None:
                    core.halted = False  # userspace HLT: the VMM waits for an event
                    return ExitHlt()
                if not core.fire_timer_if_due():
                    select.select([self.sock, self.control], [], [], max(0.0, (due - now) / 1e9))
                    next_poll = 0
                continue
            try:
                vmexit = core.step()
            except Exception as exc:  # a bug in guest code: KVM's emulation failure
                return ExitInternalError(f"{type(exc).__name__}: {exc}")
            if vmexit is not None:
                ex = self._handle(vmexit)
                if ex is not None:
                    self.pending = ex
                    return ex

    def _poll_async(self) -> bool:
        """Drain pending control and async vCPU messages; True if kicked."""
        while True:
            ready, _, _ = select.select([self.control, self.sock], [], [], 0)
            if not ready:
                return self.kick_pending
            if self.control in ready and not self._control_message(running=True):
                raise channel.ChannelClosed
            if self.sock in ready:
                self._vcpu_message(running=True)

    def _complete(self, completion: bytes) -> None:
        """Apply the VMM's answer to the previous exit (``complete_userspace_io``)."""
        ex, self.pending = self.pending, None
        if isinstance(ex, ExitIo) and ex.direction == ioctl.KVM_EXIT_IO_IN:
            self.core.complete(int.from_bytes(completion[: ex.size].ljust(ex.size, b"\0"), "little"))
        elif (isinstance(ex, ExitMmio) and not ex.is_write) or isinstance(ex, ExitHypercall):
            self.core.complete(int.from_bytes(completion[:8].ljust(8, b"\0"), "little"))

    def _handle(self, ex: VmExit) -> VcpuExit | None:
        """Turn a #VMEXIT into a userspace exit, or handle it in the kernel (None)."""
        match ex.code:
            case SvmExitCode.IOIO:
                if ex.write:
                    count = max(1, len(ex.data) // max(ex.size, 1))
                    return ExitIo(ioctl.KVM_EXIT_IO_OUT, ex.size, ex.port, count, ex.data)
                return ExitIo(ioctl.KVM_EXIT_IO_IN, ex.size, ex.port, 1)
            case SvmExitCode.NPF:
                return ExitMmio(ex.gpa, ex.size, ex.write, ex.data)
            case SvmExitCode.VMMCALL:
                if ex.nr == KVM_HC_MAP_GPA_RANGE and self.caps & CAP_EXIT_MAP_GPA_RANGE:
                    return ExitHypercall(ex.nr, ex.args)
                self.core.complete(-KVM_ENOSYS & U64_MASK)
                return None
            case SvmExitCode.MSR:
                return ExitMsr(True, ex.msr, ex.value)
            case SvmExitCode.HLT:
                return None  # in-kernel halt: the run loop waits for the timer or an interrupt
            case SvmExitCode.SHUTDOWN:
                print(f"vcpu{self.vcpu_id}: shutdown: {ex.reason}", file=sys.stderr, flush=True)
                return ExitShutdown()
        return ExitInternalError(f"unhandled #VMEXIT {ex.code!r}")


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
