"""The emulated KVM host, driven through the real ioctl channel and vCPU processes."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from confmig.common.errors import KvmError
from confmig.common.x86 import (
    KVM_CPUID_FEATURES,
    KVM_ENOSYS,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
)
from confmig.hostd.launcher import SubprocessLauncher
from confmig.kvm.client import Kvm, VmFd
from confmig.kvm.host import KvmHost
from confmig.proto import ioctl

MiB = 1 << 20


def serve(tmp_path: Path, rom: str) -> Iterator[str]:
    path = str(tmp_path / "host.sock")
    host = KvmHost(SubprocessLauncher(rom))
    host.listen(path)
    t = threading.Thread(target=host.serve_forever, daemon=True)
    t.start()
    yield path
    host.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path, "kvm_test_rom:rom")


@pytest.fixture
def writer_host(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path, "kvm_test_rom:writer_rom")


def vm_with_ram(path: str, size: int = MiB, flags: int = 0) -> tuple[Kvm, VmFd, int]:
    kvm = Kvm(path)
    vm = kvm.create_vm()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    region = ioctl.UserspaceMemoryRegion(slot=0, flags=flags, guest_phys_addr=0,
                                         memory_size=size, offset=0)
    vm.set_user_memory_region(region, fd)
    return kvm, vm, fd


def test_exits_reach_the_vmm_in_order(host: str) -> None:
    kvm, vm, fd = vm_with_ram(host, flags=ioctl.KVM_MEM_LOG_DIRTY_PAGES)
    assert kvm.check_extension(ioctl.KVM_CAP_IMMEDIATE_EXIT) == 1
    v = vm.create_vcpu(0)
    ex = v.run()
    assert ex == ioctl.ExitIo(ioctl.KVM_EXIT_IO_OUT, 1, 0x3F8, 6, b"hello\n")
    ex = v.run()
    assert ex == ioctl.ExitIo(ioctl.KVM_EXIT_IO_IN, 2, 0x510, 1, b"")
    # phase 2 halts with a timer (woken in the kernel), phase 3 halts without one (exits)
    assert isinstance(v.run(b"\x34\x12"), ioctl.ExitHlt)
    regs = v.get_regs()
    assert regs[2] == 0x1234  # rcx: the `in` value arrived in rax before the next step
    assert regs[3] == 0xEC  # rdx: the timer interrupt vector
    dirty = vm.get_dirty_log(0, 256)
    assert list(np.flatnonzero(dirty)) == list(range(16, 26))
    assert not vm.get_dirty_log(0, 256).any()  # harvested: clean until written again
    with mmap.mmap(fd, MiB) as m:
        assert m[0x10000:0x10004] == b"\x07" * 4
    assert isinstance(v.run(), ioctl.ExitShutdown)  # 4: hypercall in-kernel, 5: double exit
    regs = v.get_regs()
    assert regs[4] == -KVM_ENOSYS & (2**64 - 1)  # rsi: the result of an unknown hypercall


def test_guest_fault_is_a_shutdown_exit(host: str) -> None:
    _kvm, vm, _fd = vm_with_ram(host)
    v = vm.create_vcpu(0)
    v.set_regs((0,) * 16 + (0xFFFF_FFF0, 2))
    regs = list(v.get_regs())
    regs[1] = 5  # rbx: jump to the phase that issues two exits in one step
    v.set_regs(tuple(regs))
    assert isinstance(v.run(), ioctl.ExitShutdown)


def test_kick_and_immediate_exit(host: str) -> None:
    _kvm, vm, _fd = vm_with_ram(host)
    v = vm.create_vcpu(0)
    assert isinstance(v.run(immediate_exit=True), ioctl.ExitIntr)
    v.kick()
    assert isinstance(v.run(), ioctl.ExitIntr)  # a kick before KVM_RUN is not lost


def test_vcpu_and_slot_errors(host: str) -> None:
    _kvm, vm, fd = vm_with_ram(host)
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vm.create_vcpu(0)
    assert e.value.errno == errno.EEXIST
    overlap = ioctl.UserspaceMemoryRegion(slot=1, flags=0, guest_phys_addr=0x8000,
                                          memory_size=MiB, offset=0)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(overlap, fd)
    assert e.value.errno == errno.EEXIST
    bad = ioctl.UserspaceMemoryRegion(slot=2, flags=1 << 7, guest_phys_addr=0x100000,
                                      memory_size=MiB, offset=0)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(bad, fd)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0, 256)  # logging not enabled on the slot
    assert e.value.errno == errno.ENOENT
    with pytest.raises(KvmError) as e:
        vm.clear_dirty_log(0, 0, np.ones(256, dtype=bool))  # needs MANUAL_DIRTY_LOG_PROTECT2
    assert e.value.errno == errno.EINVAL


def test_read_only_ram_is_refused_cleanly_and_costs_the_host_no_descriptor(host: str) -> None:
    """The host runs in this process: /proc/self/fd counts its descriptors."""
    _kvm, vm, ram = vm_with_ram(host)
    read_only = os.open(f"/proc/self/fd/{ram}", os.O_RDONLY | os.O_CLOEXEC)
    region = ioctl.UserspaceMemoryRegion(slot=1, flags=0, guest_phys_addr=4 * MiB,
                                         memory_size=MiB, offset=0)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(region, read_only)
        assert e.value.errno == errno.EFAULT
    # No more than before: a leak adds one per refusal; an earlier test's thread that closes a
    # socket meanwhile (this process hosts them all) may take one away.
    assert len(os.listdir("/proc/self/fd")) <= before
    vm.create_vcpu(0).run()  # the VM is still served
    os.close(read_only)


def test_no_write_is_lost_while_the_vm_runs(writer_host: str) -> None:
    """The guest writes counters while the VMM harvests the dirty log and copies
    pages; after a final harvest with the vCPU stopped, the copy equals RAM."""
    _kvm, vm, fd = vm_with_ram(writer_host, flags=ioctl.KVM_MEM_LOG_DIRTY_PAGES)
    v = vm.create_vcpu(0)
    ram = np.frombuffer(mmap.mmap(fd, MiB), dtype=np.uint8).reshape(-1, 4096)
    copy = np.zeros_like(ram[:64])
    stop = threading.Event()
    runner = threading.Thread(target=lambda: [v.run() for _ in iter(stop.is_set, True)])
    runner.start()
    harvests = 0
    deadline = time.monotonic() + 30
    while harvests < 200 and time.monotonic() < deadline:
        dirty = np.flatnonzero(vm.get_dirty_log(0, 256)[:64])
        copy[dirty] = ram[dirty]  # clear (harvest) first, then copy
        harvests += bool(len(dirty))  # count only harvests that raced with the guest
    stop.set()
    v.kick()
    runner.join()
    dirty = np.flatnonzero(vm.get_dirty_log(0, 256)[:64])
    copy[dirty] = ram[dirty]
    assert int(v.get_regs()[0]) > 1000  # the guest really ran concurrently
    assert np.array_equal(copy, ram[:64])


def test_manual_protect_clear(writer_host: str) -> None:
    _kvm, vm, _fd = vm_with_ram(writer_host)
    vm.enable_cap(ioctl.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
    region = ioctl.UserspaceMemoryRegion(slot=0, flags=ioctl.KVM_MEM_LOG_DIRTY_PAGES,
                                         guest_phys_addr=0, memory_size=MiB, offset=0)
    vm.set_user_memory_region(region, None)
    v = vm.create_vcpu(0)
    t = threading.Thread(target=v.run)
    t.start()
    while int(np.count_nonzero(vm.get_dirty_log(0, 256))) < 64:
        time.sleep(0.01)  # the guest has written all 64 pages at least once
    v.kick()
    t.join()
    first = vm.get_dirty_log(0, 256)
    assert first[:64].all()
    assert vm.get_dirty_log(0, 256)[:64].all()  # GET alone does not re-protect
    vm.clear_dirty_log(0, 0, first)
    assert not vm.get_dirty_log(0, 256).any()


@pytest.fixture
def negotiator_host(tmp_path: Path) -> Iterator[str]:
    yield from serve(tmp_path, "kvm_test_rom:negotiator_rom")


def test_cpuid_and_the_msr_filter(negotiator_host: str) -> None:
    _kvm, vm, _fd = vm_with_ram(negotiator_host)
    v = vm.create_vcpu(0)
    v.set_cpuid({(KVM_CPUID_FEATURES, 0): (1 << KVM_FEATURE_MIGRATION_CONTROL, 0, 0, 0)})
    vm.set_msr_filter([MSR_KVM_MIGRATION_CONTROL])
    vm.enable_cap(ioctl.KVM_CAP_X86_USER_SPACE_MSR, ioctl.KVM_MSR_EXIT_REASON_FILTER)
    assert v.run() == ioctl.ExitMsr(True, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    assert v.get_regs()[2] == 1  # rcx: the guest saw the feature bit the VMM set


def test_a_filtered_msr_without_user_space_exits_faults(negotiator_host: str) -> None:
    _kvm, vm, _fd = vm_with_ram(negotiator_host)
    v = vm.create_vcpu(0)
    vm.set_msr_filter([MSR_KVM_MIGRATION_CONTROL])
    assert isinstance(v.run(), ioctl.ExitShutdown)  # #GP → triple fault in this model
