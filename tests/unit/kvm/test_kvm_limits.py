"""What one open ``/dev/kvm`` may hold of a host (``kvm.host.HostLimits``), in-process: the
limits whose live checks would cost too much (vCPUs are processes) run here with small
bounds and vCPU processes that only say they are ready.

The live host's limits (request size, VMs, memory) are in ``tests/fuzz/test_serving_processes``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pytest

from confmig.kvm.host import HostLimits, KvmHost, KvmOpenFile, Vm
from confmig.kvm.vcpu import VCPU_READY
from confmig.proto import ioctl


@dataclass
class ReadyProcess:
    """A vCPU process that said it is ready and holds its end of the control channel."""

    control: int
    pid: int = 0

    def terminate(self) -> None:
        if self.control >= 0:
            os.close(self.control)
            self.control = -1

    def wait(self, timeout: float | None = None) -> int | None:
        return 0


class ReadyLauncher:
    def __init__(self) -> None:
        self.spawned: list[ReadyProcess] = []

    def spawn(self, vcpu_id: int, vcpu_fd: int, control_fd: int) -> ReadyProcess:
        control = os.dup(control_fd)
        os.write(control, VCPU_READY)
        self.spawned.append(ReadyProcess(control))
        return self.spawned[-1]


@pytest.fixture
def host() -> KvmHost:
    return KvmHost(ReadyLauncher(), limits=HostLimits(vcpus=3, vms=2, vm_memory=4 << 20, memory=6 << 20))


def test_vcpus_are_bounded_per_open_dev_kvm_and_given_back(host: KvmHost) -> None:
    opened = KvmOpenFile(host.limits)
    first, second = Vm(vm_id=1, host=host, opened_by=opened), Vm(vm_id=2, host=host, opened_by=opened)
    try:
        results = [first.create_vcpu(0), first.create_vcpu(1), second.create_vcpu(0)]
        assert [r[0] for r in results] == [0, 0, 0]
        for _, _, fds in results:
            os.close(fds[0])
        assert second.create_vcpu(1)[0] == -errno.EMFILE  # the fourth of this open /dev/kvm
        other = Vm(vm_id=3, host=host, opened_by=KvmOpenFile(host.limits))
        result, _, fds = other.create_vcpu(0)  # another open /dev/kvm's are its own
        assert result == 0
        os.close(fds[0])
        other.destroy()
        first.destroy()
        result, _, fds = second.create_vcpu(1)  # the destroyed VM's vCPUs were given back
        assert result == 0
        os.close(fds[0])
        assert opened.vcpus == 2
    finally:
        first.destroy()
        second.destroy()


def test_vms_are_counted_per_open_dev_kvm(host: KvmHost) -> None:
    opened = KvmOpenFile(host.limits)
    assert opened.take("vms") and opened.take("vms") and not opened.take("vms")
    opened.give_back("vms")
    assert opened.take("vms")
    assert opened.take("memory", host.limits.memory) and not opened.take("memory", 1)


def slot(vm: Vm, slot_id: int, gpa: int, size: int) -> int:
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fds = [fd]
    region = ioctl.UserspaceMemoryRegion(slot=slot_id, flags=0, guest_phys_addr=gpa, memory_size=size,
                                         offset=0)
    try:
        return vm.set_user_memory_region(region.encode(), fds)
    finally:
        for left in fds:
            os.close(left)


def test_memory_is_bounded_per_vm_and_per_open_dev_kvm_and_given_back(host: KvmHost) -> None:
    opened = KvmOpenFile(host.limits)
    first, second = Vm(vm_id=1, host=host, opened_by=opened), Vm(vm_id=2, host=host, opened_by=opened)
    try:
        assert slot(first, 0, 0, 4 << 20) == 0
        assert slot(first, 1, 4 << 20, 4096) == -errno.ENOMEM  # the VM's 4 MiB
        assert slot(second, 0, 0, 2 << 20) == 0
        assert slot(second, 1, 2 << 20, 4096) == -errno.ENOMEM  # the connection's 6 MiB
        assert slot(first, 0, 0, 0) == 0  # deleted: its memory is free again
        assert slot(second, 1, 2 << 20, 2 << 20) == 0
        assert opened.memory == 4 << 20
        first.destroy()
        second.destroy()
        assert opened.memory == 0
        assert slot(first, 0, 0, 1 << 30) == -errno.ENOMEM
        assert opened.memory == 0  # a refusal charges nothing
    finally:
        first.destroy()
        second.destroy()
