"""The host kernel's KVM service: ``/dev/kvm``, VM fds, memory slots, dirty logs.

One :class:`KvmHost` per emulated host. Every VMM connection to its Unix socket
is an open ``/dev/kvm``; ``KVM_CREATE_VM`` hands back a VM fd (a socket whose
other end this service holds) and ``KVM_CREATE_VCPU`` a vCPU fd connected to
the vCPU's own process. Because fds are sockets, they can be passed between
processes and back to the host, which recognises them by inode: unforgeable
handles, as real fds are. A VM fd comes back in ``KVM_ENABLE_CAP`` of
``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM`` (:meth:`Vm.copy_enc_context_from`) and
``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`` (:meth:`Vm.move_enc_context_from`): the
descriptor rides with the request, and :meth:`KvmHost.vm_of` finds its VM.

Intra-host migration (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``, on the destination
VM, the source VM's fd in ``args[0]``): with both VMs locked and every vCPU of
both held (``kvm_lock_all_vcpus``; ``EBUSY`` for one inside ``KVM_RUN``, where
Linux would wait), the destination takes the source's SEV context (see
:mod:`confmig.kvm.sev`) and, SEV-ES, its VMSA pages: the :class:`VmsaArea` moves
whole, at its system-physical addresses, and the i-th destination vCPU (in
creation order) takes the i-th source vCPU's page as its register file, after
that vCPU stored its registers there (the ``#VMEXIT`` the move waited for). The
source VM is then dead (``kvm_vm_dead``): every later ioctl on it or its vCPUs
fails ``EIO``. Guest memory is not touched: the destination's VMM registers the
same memfds, which keep their physical addresses (:class:`PhysicalAddressSpace`),
so the guest's ciphertext stays valid under the same ASID.

SEV-ES VMSA pages: each SEV-ES VM gets a memfd of :data:`KVM_MAX_VCPUS`
pages (:class:`VmsaArea`), host memory KVM owns and no memory slot maps into
the guest, at an emulated system-physical range of its own. Page ``i`` is
vCPU ``i``'s VMSA: the PSP reaches it through :meth:`KvmHost.spa_window` (the
memory controller's view of host memory), the vCPU process maps its page
(``CTL_SET_VMSA``), and KVM only ever has the bytes stored there, ciphertext
from LAUNCH_UPDATE_VMSA or RECEIVE_UPDATE_VMSA on.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from confmig.common import bitmap
from confmig.common.errors import ProtocolError
from confmig.common.units import PAGE_SIZE, GiB, MiB, format_size
from confmig.common.x86 import KVM_HC_MAP_GPA_RANGE
from confmig.kvm import channel
from confmig.kvm.memslots import (
    KVM_MAX_VCPUS,
    KVM_USER_MEM_SLOTS,
    DirtyLog,
    MappedSlot,
    SlotLayout,
    new_counters_fd,
)
from confmig.kvm.ports import SecureProcessor, VcpuLauncher, VcpuProcess
from confmig.kvm.sev import SEV_ISSUE_CMD, AsidAllocator, SevVm, issue_sev_cmd
from confmig.kvm.vcpu import (
    CAP_EXIT_MAP_GPA_RANGE,
    CAP_USER_SPACE_MSR,
    CTL_DELETE_SLOT,
    CTL_LOCK,
    CTL_SET_ASID,
    CTL_SET_CAPS,
    CTL_SET_MSR_FILTER,
    CTL_SET_SLOT,
    CTL_SET_VMSA,
    CTL_UNLOCK,
    CTL_VM_DEAD,
    CTL_VMSA_ADOPT,
    CTL_VMSA_LAUNCHED,
    CTL_VMSA_LOAD,
    CTL_VMSA_SAVE,
    CTL_VMSA_SYNC,
    VCPU_READY,
    VMSA_PAGE,
    encode_slot,
)
from confmig.proto import ioctl

log = logging.getLogger(__name__)

SPA_ALIGN = 2 * MiB
"""Emulated physical ranges are 2 MiB aligned, as huge-page-backed RAM would be."""

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

VCPU_START_TIMEOUT = 60.0
"""Seconds a vCPU process may take to start (imports on a loaded 2-core machine)."""
VCPU_CONTROL_TIMEOUT = 30.0
"""Seconds a stopped vCPU may take to answer a VMSA request (it answers at once)."""

EXTENSIONS = {
    ioctl.KVM_CAP_USER_MEMORY: 1,
    ioctl.KVM_CAP_NR_VCPUS: os.cpu_count() or 1,
    ioctl.KVM_CAP_MAX_VCPUS: KVM_MAX_VCPUS,
    ioctl.KVM_CAP_IMMEDIATE_EXIT: 1,
    ioctl.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: (
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
    ),
    ioctl.KVM_CAP_EXIT_HYPERCALL: 1 << KVM_HC_MAP_GPA_RANGE,
    ioctl.KVM_CAP_X86_USER_SPACE_MSR: 1,
    ioctl.KVM_CAP_X86_MSR_FILTER: 1,
    ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: 1,
    ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: 1,
}
KVM_X86_DEFAULT_VM = 0
"""The only VM type ``KVM_CREATE_VM`` makes here (no ``KVM_SEV_INIT2`` VM types yet)."""

# --- what one VMM may hold of a host that other VMs share (HostLimits) -----------------------
MAX_REQUEST_PAYLOAD: Final = 4 * MiB
"""Largest request payload the host takes (``-E2BIG`` past it). The largest legitimate one is
``KVM_CLEAR_DIRTY_LOG``'s bitmap: 2 MiB for a slot of :data:`MAX_VM_MEMORY`; every other
request is a struct of a few KiB at most. (Replies may be larger: :data:`ioctl.MAX_PAYLOAD`.)"""
MAX_VMS_PER_OPEN: Final = 8
"""VMs one open ``/dev/kvm`` may hold at once (``-EMFILE`` past it, as a process out of file
descriptors gets): a VMM needs two (the guest and the Migration Handler's mirror); each VM is a
thread of the host, an SEV ASID once launched, and up to ``KVM_MAX_VCPUS`` vCPU processes."""
MAX_VCPUS_PER_OPEN: Final = 2 * KVM_MAX_VCPUS
"""vCPUs all VMs of one open ``/dev/kvm`` may hold at once (``-EMFILE`` past it): each is a
process of the host. Room for a guest of ``KVM_MAX_VCPUS`` and as many Migration Handler vCPUs."""
MAX_VM_MEMORY: Final = 64 * GiB
"""Guest memory one VM may map in its slots (``-ENOMEM`` past it). The host keeps per guest page
a dirty counter per possible vCPU (128 bytes) and copies of them for the dirty log."""
MAX_OPEN_MEMORY: Final = 2 * MAX_VM_MEMORY
"""Guest memory all VMs of one open ``/dev/kvm`` may map (``-ENOMEM`` past it): room for a guest
of :data:`MAX_VM_MEMORY` and its mirror VM, which maps the same memory again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLimits:
    """Per-connection bounds: one VMM cannot exhaust the host the other VMs share."""

    request_payload: int = MAX_REQUEST_PAYLOAD
    vms: int = MAX_VMS_PER_OPEN
    vcpus: int = MAX_VCPUS_PER_OPEN
    vm_memory: int = MAX_VM_MEMORY
    memory: int = MAX_OPEN_MEMORY


Resource = Literal["vms", "vcpus", "memory"]
"""What a :class:`KvmOpenFile` counts, by the name of its :class:`HostLimits` field."""


class KvmOpenFile:
    """One open ``/dev/kvm`` (one connection to the host's socket): the VMs it made that still
    live and the guest memory they map, charged against :class:`HostLimits`. Its VMs outlive
    the connection (their fds are their own), and so does their charge."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self.vms = 0
        self.vcpus = 0
        self.memory = 0
        self._lock = threading.Lock()

    def take(self, resource: Resource, amount: int = 1) -> bool:
        """Count ``amount`` more of ``resource`` if its limit allows it (False: refused)."""
        with self._lock:
            used = getattr(self, resource)
            if used + amount > getattr(self.limits, resource):
                return False
            setattr(self, resource, used + amount)
            return True

    def give_back(self, resource: Resource, amount: int = 1) -> None:
        with self._lock:
            setattr(self, resource, getattr(self, resource) - amount)


def fd_identity(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file: the same for every descriptor of it, in any process."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class PhysicalAddressSpace:
    """Assigns the pages of memfds emulated system-physical addresses, stable for their life.

    Keyed by the memfd's identity and the page's offset in it, not by VM or slot: the same
    memory handed to another VM (intra-host migration) keeps its physical addresses, as real
    pages do, and two different pages never share one (nor, so, the engine's tweak). A file
    gets a range as large as it is when a slot first maps it; pages it grows later get a
    range of their own when a slot first maps them. A slot's addresses are contiguous, so a
    slot must lie within one range. Each host starts at its own random base, so two hosts
    never agree.
    """

    def __init__(self, seed: int | None = None) -> None:
        rnd = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self._next = (1 << 40) + (rnd % (1 << 20)) * SPA_ALIGN
        self._ranges: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        """File identity -> its ranges, in file order: (first byte, end, SPA of the first byte)."""
        self._lock = threading.Lock()

    def slot_spa(self, fd: int, offset: int, size: int, file_size: int) -> int | None:
        """The SPA of bytes ``[offset, offset + size)`` of the file (``file_size`` bytes long
        now); None if they straddle two of its ranges."""
        key = fd_identity(fd)
        with self._lock:
            ranges = self._ranges.setdefault(key, [])
            mapped_end = ranges[-1][1] if ranges else 0
            if offset >= mapped_end:  # new pages (a new file, or one that grew): a new range
                ranges.append((mapped_end, file_size, self._reserve(file_size - mapped_end)))
            for start, end, spa in ranges:
                if start <= offset and offset + size <= end:
                    return spa + offset - start
            return None

    def allocate(self, size: int) -> int:
        """A fresh range for memory only the host kernel uses (VMSA pages)."""
        with self._lock:
            return self._reserve(size)

    def _reserve(self, size: int) -> int:
        base = self._next
        self._next += (size + SPA_ALIGN - 1) // SPA_ALIGN * SPA_ALIGN + SPA_ALIGN
        return base


class VmsaArea:
    """The VMSA pages of one SEV-ES VM: a memfd KVM owns, page ``i`` for vCPU ``i``, at a
    system-physical range of its own. Not guest RAM: no memory slot maps it."""

    SIZE = KVM_MAX_VCPUS * PAGE_SIZE

    def __init__(self, physical: PhysicalAddressSpace) -> None:
        self.fd = os.memfd_create("confmig:sev-es-vmsa", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.SIZE)
        self.spa = physical.allocate(self.SIZE)
        self._map = mmap.mmap(self.fd, self.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def page_spa(self, vcpu_id: int) -> int:
        return self.spa + vcpu_id * PAGE_SIZE

    def window(self, spa: int, size: int) -> memoryview | None:
        if self.spa <= spa and spa + size <= self.spa + self.SIZE:
            off = spa - self.spa
            return memoryview(self._map)[off : off + size]
        return None

    def page(self, vcpu_id: int) -> bytes:
        """What the host sees of a vCPU's VMSA page."""
        off = vcpu_id * PAGE_SIZE
        return self._map[off : off + PAGE_SIZE]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a PSP command still holding a view: GC frees it
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class VcpuHandle:
    vcpu_id: int
    process: VcpuProcess
    control: socket.socket
    vmsa_page: int | None = None
    """SEV-ES: the page of the VM's :class:`VmsaArea` the vCPU was given (``CTL_SET_VMSA``):
    page ``vcpu_id``, unless a move gave it a source vCPU's."""
    control_seq: int = 0

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A control message the vCPU process takes in order, unanswered."""
        channel.send_request(self.control, ioctl.Request(request, 0, payload, len(fds or ())), fds)

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """A control request the vCPU process answers: its result, or -``EIO`` if the process
        does not answer (gone, or stuck past :data:`VCPU_CONTROL_TIMEOUT`)."""
        if not self.ask(request, payload, fds):
            return -errno.EIO
        return self.answer(request, time.monotonic() + VCPU_CONTROL_TIMEOUT)

    def ask(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bool:
        """The first half of :meth:`call`: send the request (False if the vCPU is gone), so
        that several vCPUs can work on one request at once before :meth:`answer` collects."""
        self.control_seq = (self.control_seq + 1) & 0xFFFF_FFFF
        try:
            channel.send_request(
                self.control, ioctl.Request(request, self.control_seq, payload, len(fds or ())), fds)
        except OSError:
            return False
        return True

    def answer(self, request: int, deadline: float) -> int:
        """The second half of :meth:`call`: the vCPU's result for the request just asked, by
        ``deadline`` (a monotonic time). The late answer to a request that timed out before
        is read and dropped, so that it is never taken for this one's."""
        while True:
            try:
                self.control.settimeout(max(0.0, deadline - time.monotonic()))
                reply, fds = channel.recv_reply(self.control)
            except (OSError, channel.ChannelClosed, ProtocolError):
                return -errno.EIO
            finally:
                with contextlib.suppress(OSError):
                    self.control.settimeout(None)
            for fd in fds:
                os.close(fd)
            if reply.seq == self.control_seq:
                return reply.result if reply.request == request else -errno.EIO
            if (self.control_seq - reply.seq) & 0xFFFF_FFFF >= 1 << 31:
                return -errno.EIO  # the answer to a request not asked yet: a confused peer
            # else the late answer to an earlier request, which timed out: dropped


@dataclass
class Slot:
    layout: SlotLayout
    mapped: MappedSlot
    dirty: DirtyLog | None = None


@dataclass
class Vm:
    """One VM: its slots, vCPUs and enabled capabilities."""

    vm_id: int
    host: KvmHost
    file: tuple[int, int] = (0, 0)
    """:func:`fd_identity` of the VM fd the VMM holds: how the host knows it when it comes back."""
    vm_type: int = KVM_X86_DEFAULT_VM
    slots: dict[int, Slot] = field(default_factory=dict)
    vcpus: dict[int, VcpuHandle] = field(default_factory=dict)
    manual_protect: bool = False
    initially_set: bool = False
    vcpu_caps: int = 0
    msr_filter: bytes = b""
    asid: int = 0
    es: bool = False
    sev: SevVm | None = None
    vmsa: VmsaArea | None = None
    """SEV-ES: the vCPUs' VMSA pages (allocated when first needed)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    migration_in_progress: threading.Lock = field(default_factory=threading.Lock)
    """``sev->migration_in_progress``: held, taken without waiting, while the encryption context
    is copied or moved to or from this VM, so two VMs locking each other fail ``EBUSY`` instead
    of deadlocking (``sev_lock_two_vms``)."""
    dead: bool = False
    """``kvm->vm_dead``: its encryption context moved to another VM; every ioctl fails ``EIO``."""
    opened_by: KvmOpenFile | None = None
    """The open ``/dev/kvm`` that made this VM, charged for its memory (None: made in-process)."""

    # --- dispatch -----------------------------------------------------------

    def dispatch(self, req: ioctl.Request, fds: list[int]) -> tuple[int, bytes, list[int]]:
        r = req.request
        with self.lock:
            if self.dead:
                return -errno.EIO, b"", []  # kvm_vm_ioctl on a dead VM
            if r == ioctl.KVM_SET_USER_MEMORY_REGION:
                return self.set_user_memory_region(req.payload, fds), b"", []
            if r == ioctl.KVM_CREATE_VCPU:
                return self.create_vcpu(_arg(req.payload))
            if r == ioctl.KVM_GET_DIRTY_LOG:
                return self.get_dirty_log(req.payload)
            if r == ioctl.KVM_CLEAR_DIRTY_LOG:
                return self.clear_dirty_log(req.payload), b"", []
            if r == ioctl.KVM_ENABLE_CAP:
                return self.enable_cap(ioctl.EnableCap.decode(req.payload), fds), b"", []
            if r == ioctl.KVM_CHECK_EXTENSION:
                return EXTENSIONS.get(_arg(req.payload), 0), b"", []
            if r == ioctl.KVM_MEMORY_ENCRYPT_OP:
                return (*self.memory_encrypt_op(req.payload), [])
            if r == ioctl.KVM_X86_SET_MSR_FILTER:
                ioctl.decode_msr_filter(req.payload)  # validate before keeping it
                self.msr_filter = req.payload
                for v in self.vcpus.values():
                    self._send_msr_filter(v)
                return 0, b"", []
        return -errno.ENOTTY, b"", []

    # --- memory slots --------------------------------------------------------

    def set_user_memory_region(self, payload: bytes, fds: list[int]) -> int:
        region = ioctl.UserspaceMemoryRegion.decode(payload)
        # SECURITY: every field is VMM-controlled; check it as KVM does.
        if region.slot >= KVM_USER_MEM_SLOTS:
            return -errno.EINVAL
        if region.flags & ~(ioctl.KVM_MEM_LOG_DIRTY_PAGES | ioctl.KVM_MEM_READONLY):
            return -errno.EINVAL
        if (region.guest_phys_addr | region.memory_size | region.offset) % PAGE_SIZE:
            return -errno.EINVAL
        old = self.slots.get(region.slot)
        if region.memory_size == 0:
            if old is None:
                return -errno.EINVAL
            self._delete_slot(region.slot)
            return 0
        if old is not None:
            same = (old.layout.gpa, old.layout.size) == (region.guest_phys_addr, region.memory_size)
            if not same:
                return -errno.EINVAL  # KVM only lets an existing slot change its flags
            self._set_dirty_logging(old, bool(region.flags & ioctl.KVM_MEM_LOG_DIRTY_PAGES))
            return 0
        if len(fds) != 1:
            return -errno.EFAULT
        end = region.guest_phys_addr + region.memory_size
        for s in self.slots.values():
            if s.layout.gpa < end and region.guest_phys_addr < s.layout.gpa + s.layout.size:
                return -errno.EEXIST
        ram_fd = fds[0]
        try:
            fsize = os.fstat(ram_fd).st_size
        except OSError:
            return -errno.EBADF
        if region.offset + region.memory_size > fsize:
            return -errno.EFAULT
        err = self._charge(region.memory_size)
        if err:
            return err
        try:
            return self._add_slot(region, ram_fd, fsize, fds)
        finally:
            if region.slot not in self.slots:
                self._uncharge(region.memory_size)

    def _charge(self, size: int) -> int:
        """Count ``size`` more bytes of guest memory against the VM's and its opener's limits."""
        limits = self.host.limits
        mapped = sum(s.layout.size for s in self.slots.values())
        if mapped + size > limits.vm_memory:
            log.warning("vm %d: KVM_SET_USER_MEMORY_REGION refused (-ENOMEM): %s more guest memory "
                        "would exceed the %s a VM may map", self.vm_id, format_size(size),
                        format_size(limits.vm_memory))
            return -errno.ENOMEM
        if self.opened_by is not None and not self.opened_by.take("memory", size):
            log.warning("vm %d: KVM_SET_USER_MEMORY_REGION refused (-ENOMEM): %s more guest memory "
                        "would exceed the %s the VMs of one /dev/kvm may map", self.vm_id,
                        format_size(size), format_size(self.opened_by.limits.memory))
            return -errno.ENOMEM
        return 0

    def _uncharge(self, size: int) -> None:
        if self.opened_by is not None:
            self.opened_by.give_back("memory", size)

    def _add_slot(self, region: ioctl.UserspaceMemoryRegion, ram_fd: int, fsize: int,
                  fds: list[int]) -> int:
        spa = self.host.physical.slot_spa(ram_fd, region.offset, region.memory_size, fsize)
        if spa is None:
            return -errno.EINVAL  # ours: the slot spans two ranges, see PhysicalAddressSpace
        layout = SlotLayout(
            slot=region.slot, flags=region.flags, gpa=region.guest_phys_addr,
            size=region.memory_size, offset=region.offset, spa=spa,
        )
        counters_fd = new_counters_fd(layout.npages)
        try:
            mapped = MappedSlot(layout, ram_fd, counters_fd)
        except (OSError, ValueError):
            # SECURITY: the VMM chose the descriptor. One the host cannot map for reading and
            # writing (opened O_RDONLY, a pipe) is memory KVM cannot get: -EFAULT, as when
            # Linux's get_user_pages fails. The passed descriptor stays the caller's to close.
            os.close(counters_fd)
            return -errno.EFAULT
        slot = Slot(layout=layout, mapped=mapped)
        fds.clear()  # now owned by the mapped slot
        self.slots[layout.slot] = slot
        self._set_dirty_logging(slot, bool(region.flags & ioctl.KVM_MEM_LOG_DIRTY_PAGES))
        self._install_slot(slot, list(self.vcpus.values()))
        return 0

    def _set_dirty_logging(self, slot: Slot, on: bool) -> None:
        if on and slot.dirty is None:
            slot.dirty = DirtyLog(slot.mapped, len(self.vcpus))
            if self.initially_set:
                slot.dirty.seen[:] = slot.mapped.counters - 1  # every page starts dirty
        elif not on:
            slot.dirty = None

    def _delete_slot(self, slot_id: int) -> None:
        slot = self.slots.pop(slot_id)
        self._uncharge(slot.layout.size)
        for v in self.vcpus.values():
            channel.send_request(v.control, ioctl.Request(CTL_DELETE_SLOT, 0, struct.pack("<I", slot_id)))
        slot.mapped.close()

    def _install_slot(self, slot: Slot, vcpus: list[VcpuHandle]) -> None:
        """Map ``slot`` into every vCPU in ``vcpus`` and wait until each has: as Linux's memslot
        update, which returns once no vCPU can still see the old layout. Mapping fills the
        vCPU's page tables for the pages that exist (a target's preallocated RAM); waiting puts
        that work inside the ioctl, not inside whatever the VMM does next (a migration). The
        vCPUs map at once, each in its own process. A vCPU that fails to map (or is gone) sees
        no memory there and fails its next access; KVM would have refused to run it."""
        asked = [v for v in vcpus if v.ask(CTL_SET_SLOT, encode_slot(slot.layout),
                                           [slot.mapped.ram_fd, slot.mapped.counters_fd])]
        deadline = time.monotonic() + VCPU_CONTROL_TIMEOUT  # one for all: they map side by side
        for v in asked:
            if (err := v.answer(CTL_SET_SLOT, deadline)) < 0:
                log.warning("vm %d: vCPU %d did not map slot %d: %s", self.vm_id, v.vcpu_id,
                            slot.layout.slot, errno.errorcode.get(-err, err))

    def get_dirty_log(self, payload: bytes) -> tuple[int, bytes, list[int]]:
        slot_id, _pad = ioctl.DIRTY_LOG.unpack(payload)
        slot = self.slots.get(slot_id)
        if slot is None or slot.dirty is None:
            return -errno.ENOENT, b"", []
        dirty = slot.dirty.get(len(self.vcpus), manual_protect=self.manual_protect)
        return 0, bitmap.pack(dirty).tobytes(), []

    def clear_dirty_log(self, payload: bytes) -> int:
        if not self.manual_protect:
            return -errno.EINVAL
        slot_id, num_pages, first_page = ioctl.CLEAR_DIRTY_LOG.unpack_from(payload)
        slot = self.slots.get(slot_id)
        if slot is None or slot.dirty is None:
            return -errno.ENOENT
        npages = slot.layout.npages
        # SECURITY: range checks as KVM's kvm_clear_dirty_log_protect().
        if first_page % 64 or first_page + num_pages > npages or num_pages == 0:
            return -errno.EINVAL
        if num_pages % 64 and first_page + num_pages != npages:
            return -errno.EINVAL
        bm = payload[ioctl.CLEAR_DIRTY_LOG.size :]
        if len(bm) < (num_pages + 7) // 8:
            return -errno.EFAULT
        flags = bitmap.unpack(np.frombuffer(bm, dtype=np.uint8), num_pages)
        slot.dirty.clear(first_page, flags)
        return 0

    # --- capabilities ------------------------------------------------------------

    def enable_cap(self, cap: ioctl.EnableCap, fds: list[int] | None = None) -> int:
        """``KVM_ENABLE_CAP``; ``fds`` are the descriptors that came with it (a cap whose
        ``args[0]`` is an fd takes it from there: the number means nothing in this process)."""
        if cap.flags:
            return -errno.EINVAL
        if cap.cap == ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM:
            return self.copy_enc_context_from(fds or [])
        if cap.cap == ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM:
            return self.move_enc_context_from(fds or [])
        if cap.cap == ioctl.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            supported = EXTENSIONS[ioctl.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2]
            if cap.args[0] & ~supported:
                return -errno.EINVAL
            self.manual_protect = bool(cap.args[0] & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.initially_set = bool(cap.args[0] & KVM_DIRTY_LOG_INITIALLY_SET)
            return 0
        if cap.cap == ioctl.KVM_CAP_EXIT_HYPERCALL:
            if cap.args[0] & ~EXTENSIONS[ioctl.KVM_CAP_EXIT_HYPERCALL]:
                return -errno.EINVAL
            self._set_vcpu_cap(CAP_EXIT_MAP_GPA_RANGE, bool(cap.args[0]))
            return 0
        if cap.cap == ioctl.KVM_CAP_X86_USER_SPACE_MSR:
            if cap.args[0] & ~ioctl.KVM_MSR_EXIT_REASON_VALID_MASK:
                return -errno.EINVAL  # as Linux: a reason it does not know
            if cap.args[0] & ~ioctl.KVM_MSR_EXIT_REASON_FILTER:
                # Ours: INVAL and UNKNOWN exits are not modelled. A guest's RDMSR completes
                # within its step, so a failed one cannot leave to the VMM; refusing the
                # request beats accepting it and faulting the guest where Linux would exit.
                return -errno.EINVAL
            self._set_vcpu_cap(CAP_USER_SPACE_MSR, bool(cap.args[0] & ioctl.KVM_MSR_EXIT_REASON_FILTER))
            return 0
        return -errno.EINVAL

    def copy_enc_context_from(self, fds: list[int]) -> int:
        """``sev_vm_copy_enc_context_from``: this VM becomes a mirror of the VM whose fd came
        with the request (see :meth:`SevVm.copy_enc_context_from` for what it copies and when it
        refuses), with :meth:`_lock_two_vms`'s refusals. Called under this VM's lock."""
        return self._lock_two_vms(fds, self._copy_from)

    def _copy_from(self, source: Vm) -> int:
        owner = source.sev
        mirror = self._sev() if owner is not None else None
        if owner is None or mirror is None:
            return -errno.EINVAL  # the source never issued an SEV command
        return mirror.copy_enc_context_from(owner)

    def move_enc_context_from(self, fds: list[int]) -> int:
        """``sev_vm_move_enc_context_from``: this VM takes over the SEV guest of the VM whose
        fd came with the request, which is dead afterwards. Refusals, in Linux's order, each
        leaving both VMs as they were: :meth:`_lock_two_vms`'s (``EBADF``, ``EINVAL``,
        ``EBUSY``); ``EINVAL`` unless both VMs have the same type, this VM is no SEV guest
        and the source is one (:meth:`SevVm.check_move_from`); ``EBUSY`` if a vCPU of either
        is inside ``KVM_RUN`` (Linux would wait for it); SEV-ES, ``EINVAL`` unless both have
        as many vCPUs and every source vCPU has protected state (a launched or received
        VMSA). ``EIO`` if a vCPU process does not answer. Called under this VM's lock."""
        return self._lock_two_vms(fds, self._move_from)

    def _move_from(self, source: Vm) -> int:
        theirs = source.sev
        ours = self._sev() if theirs is not None else None
        if theirs is None or ours is None or self.vm_type != source.vm_type:
            return -errno.EINVAL
        err = ours.check_move_from(theirs)
        if err:
            return err
        held: dict[int, list[VcpuHandle]] = {id(self): [], id(source): []}
        moved = False
        try:
            for vm in (self, source):
                for v in vm.vcpus.values():
                    err = v.call(CTL_LOCK)
                    if err:
                        return err
                    held[id(vm)].append(v)
            es = theirs.state.es
            if es:
                err = self._check_source_vmsas(source)
                if err:
                    return err
            # The point of no return: nothing below refuses.
            ours.move_enc_context_from(theirs)  # binds our vCPUs to the ASID
            if es:
                self._take_vmsas(source)
            source._die()  # lets its vCPUs go, dead
            moved = True
            return 0
        finally:
            for v in held[id(self)] + ([] if moved else held[id(source)]):
                with contextlib.suppress(OSError):  # a vCPU process that is gone holds nothing
                    v.send(CTL_UNLOCK)

    def _check_source_vmsas(self, source: Vm) -> int:
        """``sev_check_source_vcpus`` for SEV-ES, all vCPUs held: as many vCPUs on each side,
        and every source vCPU's protected state stored in its VMSA page (a stopped vCPU's
        registers are in the core until its ``#VMEXIT`` stores them)."""
        if len(self.vcpus) != len(source.vcpus):
            return -errno.EINVAL
        for v in source.vcpus.values():
            if v.vmsa_page is None:
                return -errno.EINVAL  # never launched nor received: no VMSA
            err = source.save_vmsa(v.vcpu_id)  # EINVAL if its state is not protected
            if err < 0:
                return err
        return 0

    def _take_vmsas(self, source: Vm) -> None:
        """The SEV-ES half of ``sev_migrate_from``: the source's VMSA pages become ours, where
        they are (ciphertext tweaked by their physical address, checked against the TMR), and
        our i-th vCPU takes the i-th source vCPU's page as its register file."""
        area, source.vmsa = source.vmsa, None
        if self.vmsa is not None:
            self.vmsa.close()  # cannot hold a page: only an SEV-ES guest's vCPUs get one
        self.vmsa = area
        for ours, theirs in zip(self.vcpus.values(), source.vcpus.values(), strict=True):
            page, theirs.vmsa_page = theirs.vmsa_page, None
            assert area is not None and page is not None  # _check_source_vmsas
            ours.vmsa_page = page
            with contextlib.suppress(OSError):  # a vCPU process that is gone never runs again
                ours.send(CTL_SET_VMSA, VMSA_PAGE.pack(page * PAGE_SIZE, area.page_spa(page)),
                          [area.fd])
                ours.send(CTL_VMSA_ADOPT)

    def _die(self) -> None:
        """``kvm_vm_dead``, the context moved away: every later ioctl fails ``EIO``; the vCPUs
        (held) give up the ASID and their VMSA pages and are let go. Under this VM's lock."""
        self.dead = True
        self.asid, self.es = 0, False
        for v in self.vcpus.values():
            v.vmsa_page = None
            with contextlib.suppress(OSError):  # a vCPU process that is gone has nothing to drop
                v.send(CTL_VM_DEAD)

    def _lock_two_vms(self, fds: list[int], action: Callable[[Vm], int]) -> int:
        """``sev_lock_two_vms`` around ``action(source)``, the source being the VM whose fd came
        with the request: ``EBADF`` unless the fd is a VM fd of this host; ``EINVAL`` for this
        VM's own fd; ``EBUSY`` if either VM is in another copy or move. Under this VM's lock."""
        # SECURITY: the VMM chose the descriptor; only the inode of a live VM's fd names a VM.
        source = self.host.vm_of(fds[0]) if len(fds) == 1 else None
        if source is None:
            return -errno.EBADF
        if source is self:
            return -errno.EINVAL
        if not self.migration_in_progress.acquire(blocking=False):
            return -errno.EBUSY
        try:
            if not source.migration_in_progress.acquire(blocking=False):
                return -errno.EBUSY
            try:
                # Safe to wait: only this path holds two VMs' locks, and the flags above let
                # each VM be in one such path at a time.
                with source.lock:
                    return action(source)
            finally:
                source.migration_in_progress.release()
        finally:
            self.migration_in_progress.release()

    def memory_encrypt_op(self, payload: bytes) -> tuple[int, bytes]:
        sev = self._sev()
        if sev is None:
            return -errno.ENOTTY, b""  # no SEV on this host
        return sev.encrypt_op(payload)

    def _sev(self) -> SevVm | None:
        """The VM's SEV side (``kvm_sev_info``), made when first needed; None on a host
        without a PSP."""
        psp = self.host.psp
        if psp is None:
            return None
        if self.sev is None:
            self.sev = SevVm(psp, self.host.asids, self.gpa_to_spa,
                             lambda asid, es: self.bind_asid(asid, es=es), self)
        return self.sev

    def gpa_to_spa(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """Guest-physical range → physically contiguous (SPA, length) chunks, as KVM
        pins and translates user pages before a PSP command."""
        out: list[tuple[int, int]] = []
        end = gpa + length
        while gpa < end:
            slot = next((s for s in self.slots.values()
                         if s.layout.gpa <= gpa < s.layout.gpa + s.layout.size), None)
            if slot is None:
                raise ProtocolError(f"GPA {gpa:#x} is not backed by a memory slot")
            n = min(end, slot.layout.gpa + slot.layout.size) - gpa
            out.append((slot.layout.spa + gpa - slot.layout.gpa, n))
            gpa += n
        return out

    def _set_vcpu_cap(self, bit: int, on: bool) -> None:
        self.vcpu_caps = (self.vcpu_caps | bit) if on else (self.vcpu_caps & ~bit)
        for v in self.vcpus.values():
            self._send_caps(v)

    def _send_msr_filter(self, v: VcpuHandle) -> None:
        if self.msr_filter:
            channel.send_request(v.control, ioctl.Request(CTL_SET_MSR_FILTER, 0, self.msr_filter))

    # --- SEV-ES: VMSA pages (kvm.sev.EsVcpus; called under the VM lock) ---------------

    def vcpu_ids(self) -> list[int]:
        return sorted(self.vcpus)

    def vmsa_page(self, vcpu_id: int) -> int:
        """The SPA of ``vcpu_id``'s VMSA page; the vCPU is given it first if need be (page
        ``vcpu_id``, or the first free one if a moved-in vCPU holds that)."""
        v = self.vcpus.get(vcpu_id)
        if v is None:
            return -errno.EINVAL
        if self.vmsa is None:
            self.vmsa = VmsaArea(self.host.physical)
        if v.vmsa_page is None:
            taken = {u.vmsa_page for u in self.vcpus.values()}
            page = vcpu_id if vcpu_id not in taken else min(set(range(KVM_MAX_VCPUS)) - taken)
            try:
                v.send(CTL_SET_VMSA, VMSA_PAGE.pack(page * PAGE_SIZE, self.vmsa.page_spa(page)),
                       [self.vmsa.fd])
            except OSError:
                return -errno.EIO
            v.vmsa_page = page
        return self.vmsa.page_spa(v.vmsa_page)

    def _vmsa_request(self, vcpu_id: int, request: int) -> int:
        """Ask a stopped vCPU for ``request`` on its VMSA page: its SPA, or -errno."""
        spa = self.vmsa_page(vcpu_id)
        if spa < 0:
            return spa
        result = self.vcpus[vcpu_id].call(request)
        return result if result < 0 else spa

    def sync_vmsa(self, vcpu_id: int) -> int:
        return self._vmsa_request(vcpu_id, CTL_VMSA_SYNC)

    def vmsa_launched(self, vcpu_id: int) -> int:
        return min(0, self._vmsa_request(vcpu_id, CTL_VMSA_LAUNCHED))

    def save_vmsa(self, vcpu_id: int) -> int:
        return self._vmsa_request(vcpu_id, CTL_VMSA_SAVE)

    def load_vmsa(self, vcpu_id: int) -> int:
        return min(0, self._vmsa_request(vcpu_id, CTL_VMSA_LOAD))

    def bind_asid(self, asid: int, *, es: bool) -> None:
        """SEV: every vCPU of this VM now runs under ``asid`` (a handle, never a key)."""
        self.asid, self.es = asid, es
        for v in self.vcpus.values():
            with contextlib.suppress(OSError):  # a vCPU process that is gone never runs again
                self._send_asid(v)

    def _send_asid(self, v: VcpuHandle) -> None:
        if self.asid:
            payload = struct.pack("<IB", self.asid, self.es)
            channel.send_request(v.control, ioctl.Request(CTL_SET_ASID, 0, payload))

    def _send_caps(self, v: VcpuHandle) -> None:
        channel.send_request(v.control, ioctl.Request(CTL_SET_CAPS, 0, struct.pack("<Q", self.vcpu_caps)))

    # --- vCPUs --------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> tuple[int, bytes, list[int]]:
        if vcpu_id >= KVM_MAX_VCPUS:
            return -errno.EINVAL, b"", []
        if vcpu_id in self.vcpus:
            return -errno.EEXIST, b"", []
        opened = self.opened_by
        if opened is not None and not opened.take("vcpus"):
            log.warning("vm %d: KVM_CREATE_VCPU refused (-EMFILE): the VMs of one /dev/kvm may hold "
                        "%d vCPUs at once", self.vm_id, opened.limits.vcpus)
            return -errno.EMFILE, b"", []
        try:
            result = self._spawn_vcpu(vcpu_id)
        except BaseException:
            if opened is not None:
                opened.give_back("vcpus")
            raise
        if opened is not None and result[0] < 0:
            opened.give_back("vcpus")
        return result

    def _spawn_vcpu(self, vcpu_id: int) -> tuple[int, bytes, list[int]]:
        vmm_end, vcpu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_ctl, vcpu_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = self.host.launcher.spawn(vcpu_id, vcpu_end.fileno(), vcpu_ctl.fileno())
        finally:
            vcpu_end.close()
            vcpu_ctl.close()
        # KVM_CREATE_VCPU returns a vCPU that exists: wait for the process to say so,
        # so its start-up never lands inside a later KVM_RUN (or a migration's downtime).
        host_ctl.settimeout(VCPU_START_TIMEOUT)
        try:
            ready = host_ctl.recv(1)
        except OSError:
            ready = b""
        host_ctl.settimeout(None)
        if ready != VCPU_READY:
            process.terminate()
            host_ctl.close()
            return -errno.ENOMEM, b"", []
        handle = VcpuHandle(vcpu_id=vcpu_id, process=process, control=host_ctl)
        self.vcpus[vcpu_id] = handle
        for slot in self.slots.values():
            self._install_slot(slot, [handle])
        self._send_caps(handle)
        self._send_msr_filter(handle)
        self._send_asid(handle)
        fd = vmm_end.detach()
        return 0, b"", [fd]

    def destroy(self) -> None:
        with self.lock:
            if self.sev is not None:
                self.sev.destroy()
            for v in self.vcpus.values():
                v.control.close()
                v.process.terminate()
            for v in self.vcpus.values():
                if self.opened_by is not None:
                    self.opened_by.give_back("vcpus")
                v.process.wait(5)
            self.vcpus.clear()
            for slot in self.slots.values():
                slot.mapped.close()
                self._uncharge(slot.layout.size)
            self.slots.clear()
            if self.vmsa is not None:
                self.vmsa.close()
                self.vmsa = None


def _arg(payload: bytes) -> int:
    if len(payload) != 8:
        raise ProtocolError("ioctl argument must be a u64")
    return int.from_bytes(payload, "little")


class KvmHost:
    """Serves ``/dev/kvm`` on a Unix socket; one thread per open fd."""

    def __init__(self, launcher: VcpuLauncher, *, spa_seed: int | None = None,
                 psp: SecureProcessor | None = None, limits: HostLimits | None = None) -> None:
        self.launcher = launcher
        self.limits = limits or HostLimits()
        """What one VMM's connection may hold of this host (:class:`HostLimits`)."""
        self.psp = psp
        """The host's Secure Processor, if it has one (an SEV-capable host)."""
        self.asids = AsidAllocator()
        self.physical = PhysicalAddressSpace(spa_seed)
        self.vms: dict[int, Vm] = {}
        self._next_vm = 1
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._closing = threading.Event()

    def vm_of(self, fd: int) -> Vm | None:
        """The live VM whose VM fd ``fd`` is (a descriptor passed back by a VMM), or None."""
        try:
            file = fd_identity(fd)
        except OSError:
            return None
        with self._lock:
            return next((vm for vm in self.vms.values() if vm.file == file), None)

    def spa_window(self, spa: int, size: int) -> memoryview | None:
        """The host mapping of ``[spa, spa + size)`` (within one slot, or within a VM's
        VMSA pages), for the platform's memory controller; None if nothing holds it."""
        for vm in list(self.vms.values()):
            for slot in list(vm.slots.values()):
                lay = slot.layout
                if lay.spa <= spa and spa + size <= lay.spa + lay.size:
                    off = spa - lay.spa
                    return memoryview(slot.mapped.bytes[off : off + size])  # type: ignore[arg-type]
            area = vm.vmsa
            if area is not None:
                view = area.window(spa, size)
                if view is not None:
                    return view
        return None

    def listen(self, path: str) -> None:
        try:
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(path)
            probe.close()
            raise OSError(errno.EADDRINUSE, f"a host is already serving {path}")
        except (FileNotFoundError, ConnectionRefusedError):
            if os.path.exists(path):
                os.unlink(path)  # stale socket of a host that is gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(64)
        self._listener = s

    def serve_forever(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                break
            threading.Thread(target=self._serve_system, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes serve_forever's accept()
            self._listener.close()
        for vm in list(self.vms.values()):
            vm.destroy()

    # --- /dev/kvm --------------------------------------------------------------

    def _serve_system(self, conn: socket.socket) -> None:
        with conn:
            self._serve(conn, functools.partial(self._system_ioctl, KvmOpenFile(self.limits)),
                        self.limits.request_payload)

    def _system_ioctl(self, opened: KvmOpenFile, req: ioctl.Request,
                      fds: list[int]) -> tuple[int, bytes, list[int]]:
        r = req.request
        if r == ioctl.KVM_GET_API_VERSION:
            return ioctl.KVM_API_VERSION, b"", []
        if r == ioctl.KVM_CHECK_EXTENSION:
            return EXTENSIONS.get(_arg(req.payload), 0), b"", []
        if r == ioctl.KVM_GET_VCPU_MMAP_SIZE:
            return PAGE_SIZE, b"", []
        if r == SEV_ISSUE_CMD:
            if self.psp is None:
                return -errno.ENODEV, b"", []
            return (*issue_sev_cmd(self.psp, req.payload), [])
        if r == ioctl.KVM_CREATE_VM:
            if _arg(req.payload) != 0:
                return -errno.EINVAL, b"", []  # only the default VM type so far
            return self._create_vm(opened)
        return -errno.ENOTTY, b"", []

    def _create_vm(self, opened: KvmOpenFile) -> tuple[int, bytes, list[int]]:
        if not opened.take("vms"):
            log.warning("KVM_CREATE_VM refused (-EMFILE): one /dev/kvm may hold %d VMs at once",
                        opened.limits.vms)
            return -errno.EMFILE, b"", []
        try:
            vmm_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            opened.give_back("vms")
            return -(exc.errno or errno.ENOMEM), b"", []
        with self._lock:
            vm = Vm(vm_id=self._next_vm, host=self, file=fd_identity(vmm_end.fileno()), opened_by=opened)
            self._next_vm += 1
            self.vms[vm.vm_id] = vm
        threading.Thread(target=self._serve_vm, args=(vm, host_end), daemon=True).start()
        return 0, b"", [vmm_end.detach()]

    def _serve_vm(self, vm: Vm, conn: socket.socket) -> None:
        with conn:
            try:
                self._serve(conn, vm.dispatch, self.limits.request_payload)
            finally:
                with self._lock:
                    self.vms.pop(vm.vm_id, None)
                vm.destroy()
                if vm.opened_by is not None:
                    vm.opened_by.give_back("vms")
                log.info("vm %d destroyed", vm.vm_id)

    @staticmethod
    def _serve(conn: socket.socket, handler: object, max_payload: int) -> None:
        assert callable(handler)
        dispatch: Callable[[ioctl.Request, list[int]], tuple[int, bytes, list[int]]] = handler
        while True:
            try:
                req, fds = channel.recv_request(conn, max_payload=max_payload)
            except (channel.ChannelClosed, ConnectionError):
                return
            except channel.RequestTooLarge as exc:
                # Skipped whole: answer it as KVM answers an oversized argument, and go on.
                log.warning("refused (-E2BIG): %s", exc)
                try:
                    channel.send_reply(conn, ioctl.Reply(exc.request, exc.seq, -errno.E2BIG, b""))
                except OSError:
                    return
                continue
            except ProtocolError as exc:
                log.warning("dropping a client: %s", exc)
                return
            try:
                result, payload, out_fds = dispatch(req, fds)
            except (ProtocolError, struct.error, ValueError) as exc:
                log.warning("%s: bad request: %s", ioctl.name(req.request), exc)
                result, payload, out_fds = -errno.EINVAL, b"", []
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                channel.send_reply(conn, ioctl.Reply(req.request, req.seq, result, payload), out_fds)
            except OSError:
                return  # the client left without its answer
            finally:
                for fd in out_fds:
                    os.close(fd)
