"""A VM's ioctls in the host kernel (``kvm.host.Vm``), called in-process: no socket, no vCPU."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from sev_hosts import SevHost

from confmig.common.units import MiB
from confmig.hostd.launcher import SubprocessLauncher
from confmig.kvm import channel
from confmig.kvm import sev as ksev
from confmig.kvm.host import KvmHost, VcpuHandle, Vm
from confmig.kvm.memslots import MappedSlot
from confmig.kvm.vcpu import CTL_LOCK, Vcpu
from confmig.proto import ioctl


@pytest.fixture
def vm() -> Iterator[Vm]:
    the_vm = Vm(vm_id=1, host=KvmHost(SubprocessLauncher()))  # no vCPU: nothing is spawned
    yield the_vm
    the_vm.destroy()


def memfd(size: int) -> int:
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def add_slot(vm: Vm, slot: int, gpa: int, size: int, fd: int, offset: int = 0) -> int:
    """KVM_SET_USER_MEMORY_REGION as the host service runs it: a descriptor the host received
    for the request, closed after the call unless the slot took it."""
    region = ioctl.UserspaceMemoryRegion(slot=slot, flags=0, guest_phys_addr=gpa, memory_size=size,
                                         offset=offset)
    fds = [os.dup(fd)]
    try:
        return vm.set_user_memory_region(region.encode(), fds)
    finally:
        for left in fds:
            os.close(left)


def spa_ranges(vm: Vm) -> list[tuple[int, int]]:
    return sorted((s.layout.spa, s.layout.spa + s.layout.size) for s in vm.slots.values())


# -- KVM_ENABLE_CAP --------------------------------------------------------------------------


def test_user_space_msr_takes_linuxs_exit_reasons(vm: Vm) -> None:
    assert (ioctl.KVM_MSR_EXIT_REASON_INVAL, ioctl.KVM_MSR_EXIT_REASON_UNKNOWN,
            ioctl.KVM_MSR_EXIT_REASON_FILTER) == (1 << 0, 1 << 1, 1 << 2)  # include/uapi/linux/kvm.h

    def enable(reasons: int) -> int:
        return vm.enable_cap(ioctl.EnableCap(cap=ioctl.KVM_CAP_X86_USER_SPACE_MSR, args=(reasons, 0, 0, 0)))

    assert enable(ioctl.KVM_MSR_EXIT_REASON_FILTER) == 0
    assert enable(1 << 3) == -errno.EINVAL  # no such reason: Linux refuses it
    assert enable(ioctl.KVM_MSR_EXIT_REASON_FILTER | 1 << 63) == -errno.EINVAL
    assert enable(0) == 0


# -- KVM_SET_USER_MEMORY_REGION ----------------------------------------------------------------


def test_a_read_only_file_is_efault_and_leaks_no_descriptor(vm: Vm) -> None:
    ram = memfd(MiB)
    read_only = os.open(f"/proc/self/fd/{ram}", os.O_RDONLY | os.O_CLOEXEC)  # the same memory, O_RDONLY
    before = len(os.listdir("/proc/self/fd"))
    for slot in range(5):
        assert add_slot(vm, slot, 0, MiB, read_only) == -errno.EFAULT
    assert len(os.listdir("/proc/self/fd")) == before
    assert not vm.slots
    assert add_slot(vm, 0, 0, MiB, ram) == 0  # the same memory, read-write: accepted
    os.close(read_only)
    os.close(ram)


def test_two_slots_never_share_a_physical_address_after_a_file_grows(vm: Vm) -> None:
    first, second = memfd(MiB), memfd(MiB)
    assert add_slot(vm, 0, 0, MiB, first) == 0
    assert add_slot(vm, 1, 4 * MiB, MiB, second) == 0
    os.ftruncate(first, 8 * MiB)  # grown after its first use
    assert add_slot(vm, 2, 16 * MiB, 4 * MiB, first, offset=4 * MiB) == 0
    assert add_slot(vm, 3, 32 * MiB, MiB, first, offset=MiB) == 0
    ranges = spa_ranges(vm)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(ranges)), ranges
    # A slot over both the old and the new pages would need two ranges: refused.
    assert add_slot(vm, 4, 64 * MiB, 2 * MiB, first, offset=0) == -errno.EINVAL


def test_the_same_pages_keep_their_physical_address_in_another_vm(vm: Vm) -> None:
    ram = memfd(2 * MiB)
    assert add_slot(vm, 0, 0, MiB, ram, offset=MiB) == 0
    other = Vm(vm_id=2, host=vm.host)
    try:
        assert add_slot(other, 5, 8 * MiB, MiB, ram, offset=MiB) == 0  # handed over (local migration)
        assert other.slots[5].layout.spa == vm.slots[0].layout.spa
    finally:
        other.destroy()
        os.close(ram)


class ThreadLauncher:
    """vCPUs served by threads of this process, each mapping slots slowly (as a vCPU process
    filling its page tables for 1 GiB of preallocated RAM does)."""

    MAP_DELAY = 0.2

    def __init__(self) -> None:
        self.vcpus: list[Vcpu] = []
        self.threads: list[threading.Thread] = []

    def spawn(self, vcpu_id: int, vcpu_fd: int, control_fd: int) -> SimpleNamespace:
        core = SimpleNamespace(set_asid=lambda *_a, **_k: None)
        vcpu = Vcpu(vcpu_id, socket.socket(fileno=os.dup(vcpu_fd)),
                    socket.socket(fileno=os.dup(control_fd)), lambda _i, _m: core)
        set_slot = vcpu.memory.set_slot

        def slow_set_slot(slot: MappedSlot) -> None:
            time.sleep(self.MAP_DELAY)
            set_slot(slot)

        vcpu.memory.set_slot = slow_set_slot  # type: ignore[method-assign]
        self.vcpus.append(vcpu)
        thread = threading.Thread(target=vcpu.serve, daemon=True)
        thread.start()
        self.threads.append(thread)  # it ends when the host closes its end of the control channel
        return SimpleNamespace(pid=0, terminate=lambda: None, wait=lambda _t=None: 0)


def test_a_memory_slot_is_mapped_by_every_vcpu_when_the_ioctl_returns() -> None:
    """As Linux's memslot update: once KVM_SET_USER_MEMORY_REGION (or KVM_CREATE_VCPU, for the
    slots there are) returns, every vCPU sees the slot; mapping is never left to run on into
    whatever the VMM does next (a migration, which it used to slow down)."""
    launcher = ThreadLauncher()
    vm = Vm(vm_id=1, host=KvmHost(launcher))  # type: ignore[arg-type]
    ram = memfd(MiB)
    try:
        assert add_slot(vm, 0, 0, MiB, ram) == 0
        assert vm.create_vcpu(0)[0] == 0
        assert [s.layout.slot for s in launcher.vcpus[0].memory.slots] == [0]  # mapped at create
        assert vm.create_vcpu(1)[0] == 0
        assert add_slot(vm, 1, 4 * MiB, MiB, ram) == 0
        for vcpu in launcher.vcpus:
            assert [s.layout.slot for s in vcpu.memory.slots] == [0, 1]
    finally:
        vm.destroy()
        for thread, vcpu in zip(launcher.threads, launcher.vcpus, strict=True):
            thread.join(5)
            vcpu.sock.close()
            vcpu.control.close()
        os.close(ram)


# -- KVM_MEMORY_ENCRYPT_OP -------------------------------------------------------------------


def test_sev_init_is_refused_once_the_vm_has_vcpus(host_a: SevHost) -> None:
    for init in (ksev.KVM_SEV_INIT, ksev.KVM_SEV_ES_INIT):
        vm = host_a.vm()
        vm.vmsa[0] = 0x1000  # a vCPU exists
        reply = vm.op(init)
        assert (reply.result, reply.error) == (-errno.EINVAL, ksev.SEV_RET_NO_FW_CALL)
        assert not vm.sev.state.active
    vm = host_a.vm()
    assert vm.op(ksev.KVM_SEV_INIT).result == 0


def test_a_late_answer_to_a_request_that_timed_out_is_never_taken_for_the_next() -> None:
    """A vCPU that answers after the host gave up (a slot that took long to map) leaves that
    answer queued: the next request's answer must be its own, or a CTL_LOCK the vCPU took would
    read as refused, and the vCPU would stay locked."""
    host_end, vcpu_end = socket.socketpair()
    handle = VcpuHandle(vcpu_id=0, process=SimpleNamespace(), control=host_end)  # type: ignore[arg-type]
    try:
        assert handle.ask(CTL_LOCK)
        assert handle.answer(CTL_LOCK, time.monotonic() + 0.05) == -errno.EIO  # no answer in time
        assert handle.ask(CTL_LOCK)
        for seq, result in ((1, -errno.EBUSY), (2, 0)):  # the late one, then the one asked now
            channel.send_reply(vcpu_end, ioctl.Reply(CTL_LOCK, seq, result, b""))
        assert handle.answer(CTL_LOCK, time.monotonic() + 5) == 0
        assert handle.ask(CTL_LOCK)
        channel.send_reply(vcpu_end, ioctl.Reply(CTL_LOCK, 7, 0, b""))  # a request never asked
        assert handle.answer(CTL_LOCK, time.monotonic() + 5) == -errno.EIO
    finally:
        host_end.close()
        vcpu_end.close()
