"""Intra-host migration: ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`` (sev-platform.md §4.9).

Over the host's socket, as a VMM (``build_host`` wiring, real vCPU processes): an SEV
guest (``roms/mirror_rom.py``: the source's vCPU writes a private page, the target's
reads it) and an SEV-ES guest (``roms/vmsa_rom.py``: it reports its own registers)
handed to a new VM, the kernel's refusals, and mirror VMs following their owner. With
vCPUs that run in threads on a core that computes forever (:class:`ThreadLauncher`): a
vCPU inside ``KVM_RUN`` refuses the move, and a held vCPU's ioctls wait. In process, on
the SEV hosts of ``sev_hosts.py``: who tears the moved context down, and when.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sev_hosts import SevHost
from sev_hosts import launch as sev_launch
from test_kvm_mirror_vm import (
    PRIVATE_GPA,
    READER,
    SECRET,
    Guest,
    Host,
    free_asids,
    launched_source,
    mirror_of,
    new_vm,
    refused,
    regs,
    report,
)
from test_kvm_sev_es_vmsa import OLD, REGS, es_vm
from test_kvm_sev_es_vmsa import Guest as EsGuest
from test_kvm_sev_es_vmsa import Host as EsHost
from test_kvm_sev_es_vmsa import launch as es_launch
from test_kvm_sev_es_vmsa import report as es_report

from confmig.common.svm import VmExit
from confmig.common.units import PAGE_SIZE
from confmig.hostd.main import build_host
from confmig.kvm import sev as ksev
from confmig.kvm.client import Kvm, SevCommandError, VcpuFd
from confmig.kvm.host import KvmHost, VcpuHandle, Vm
from confmig.kvm.sev import SevState
from confmig.kvm.vcpu import CTL_LOCK, CTL_UNLOCK, CTL_VM_DEAD, VCPU_READY, Vcpu
from confmig.platform.psp import GuestState, PlatformIdentity
from confmig.proto import ioctl

MOVE = ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
KVM_X86_SEV_ES_VM = 3
"""Linux's VM type for an SEV-ES guest set up with ``KVM_SEV_INIT2`` (this host makes none)."""


# -- hosts --------------------------------------------------------------------------------------


def _serve(identity: PlatformIdentity, path: Path, rom: str) -> Iterator[KvmHost]:
    host = build_host(identity, rom=rom)
    host.listen(str(path))
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield host
    host.close()
    thread.join(5)


@pytest.fixture
def sev_host(identity_a: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    for kvm in _serve(identity_a, tmp_path / "a.sock", "mirror_rom:rom"):
        yield Host(kvm, str(tmp_path / "a.sock"))


@pytest.fixture
def other_host(identity_b: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    for kvm in _serve(identity_b, tmp_path / "b.sock", "mirror_rom:rom"):
        yield Host(kvm, str(tmp_path / "b.sock"))


@pytest.fixture
def es_host(identity_a: PlatformIdentity, tmp_path: Path) -> Iterator[EsHost]:
    for kvm in _serve(identity_a, tmp_path / "es.sock", "vmsa_rom:rom"):
        yield EsHost(kvm, str(tmp_path / "es.sock"), identity_a.certificates.amd_chain())


class SpinningCore:
    """A core whose guest computes forever: ``KVM_RUN`` returns only when kicked."""

    halted = False
    msr_exits: frozenset[int] = frozenset()
    msr_user_exit = False

    def __init__(self) -> None:
        self.steps = 0
        self.asid = 0
        self.vmsa: object | None = None
        self.regs = (0,) * 18

    def step(self) -> VmExit | None:
        self.steps += 1
        time.sleep(0.0005)  # two cores shared with other tests: compute slowly
        return None

    def enter(self) -> bool:
        return True

    def set_asid(self, asid: int, *, es: bool = False) -> None:
        self.asid = asid

    def set_vmsa(self, page: object | None) -> None:
        self.vmsa = page

    def get_regs_tuple(self) -> tuple[int, ...]:
        return self.regs

    def set_regs_tuple(self, values: tuple[int, ...]) -> None:
        self.regs = values

    def set_cpuid(self, entries: object) -> None: ...

    def complete(self, value: int) -> None: ...

    def get_msr(self, index: int) -> int | None:
        return None

    def set_msr(self, index: int, value: int) -> bool:
        return False

    def timer_due_ns(self) -> int | None:
        return None

    def fire_timer_if_due(self) -> bool:
        return False

    def inject_nmi(self) -> None: ...

    def inject_irq(self, vector: int) -> None: ...

    def vmsa_sync(self) -> bool:
        return False

    def vmsa_launched(self) -> None: ...

    def vmsa_save(self) -> bool:
        return False

    def vmsa_load(self) -> bool:
        return False


class VcpuThread:
    """A vCPU served by a thread of the test's process (a :class:`VcpuProcess`)."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._serve, args=(vcpu,), daemon=True)
        self._thread.start()

    @staticmethod
    def _serve(vcpu: Vcpu) -> None:
        try:
            vcpu.serve()
        finally:
            vcpu.sock.close()
            vcpu.control.close()

    def terminate(self) -> None: ...  # it ends when the host closes its control channel

    def wait(self, timeout: float | None = None) -> int | None:
        self._thread.join(timeout)
        return 0


class ThreadLauncher:
    """Starts each vCPU as a :class:`VcpuThread` on a :class:`SpinningCore`."""

    def __init__(self) -> None:
        self.cores: list[SpinningCore] = []

    def spawn(self, vcpu_id: int, vcpu_fd: int, control_fd: int) -> VcpuThread:
        core = SpinningCore()
        self.cores.append(core)
        # The host closes its copies when spawn returns, as after a fork.
        sock, control = socket.socket(fileno=os.dup(vcpu_fd)), socket.socket(fileno=os.dup(control_fd))
        return VcpuThread(Vcpu(vcpu_id, sock, control, lambda _id, _memory: core))


@pytest.fixture
def thread_host(identity_a: PlatformIdentity, tmp_path: Path) -> Iterator[tuple[Host, ThreadLauncher]]:
    launcher = ThreadLauncher()
    for kvm in _serve(identity_a, tmp_path / "t.sock", "mirror_rom:rom"):
        kvm.launcher = launcher
        yield Host(kvm, str(tmp_path / "t.sock")), launcher


# -- helpers ------------------------------------------------------------------------------------


def sev_state(host: Host, guest: Guest) -> SevState:
    sev = host.vm(guest.vm).sev
    return SevState() if sev is None else SevState(**vars(sev.state))


def untouched(host: Host, source: Guest, state: SevState, *targets: Guest) -> None:
    """A refused move changed nothing: the source has its context and lives, no target has one."""
    src = host.vm(source.vm)
    assert not src.dead and sev_state(host, source) == state and src.asid == state.asid
    for target in targets:
        dst = host.vm(target.vm)
        assert not dst.dead and dst.asid == 0 and not sev_state(host, target).active


class PspRecorder:
    """The host's PSP port, recording every command KVM issues through it."""

    def __init__(self, psp: object) -> None:
        self._psp = psp
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        self.calls.append(name)
        return getattr(self._psp, name)


def watch_psp(kvm: KvmHost, source: Vm) -> PspRecorder:
    """Record what KVM asks the PSP from now on: for the source's context, and for any VM's
    that is made from now on (the destination's, at the move)."""
    assert source.sev is not None
    recorder = PspRecorder(kvm.psp)
    kvm.psp = source.sev.psp = recorder  # type: ignore[assignment]
    return recorder


def dead(guest: Guest) -> None:
    """Every ioctl on the VM and on its vCPU fails EIO (``kvm_vm_dead``)."""
    vm, vcpu = guest.vm, guest.vcpu
    assert vcpu is not None
    region = ioctl.UserspaceMemoryRegion(slot=1, flags=0, guest_phys_addr=1 << 30, memory_size=PAGE_SIZE,
                                         offset=0)
    calls: list[Callable[[], object]] = [
        lambda: vm.check_extension(COPY),
        lambda: vm.create_vcpu(7),
        lambda: vm.set_user_memory_region(region, guest.ram),
        lambda: vm.memory_encrypt_op(ksev.KVM_SEV_GUEST_STATUS, ksev.GUEST_STATUS.pack(0, 0, 0)),
        lambda: vm.enable_cap(ioctl.KVM_CAP_EXIT_HYPERCALL, 0),
        vcpu.run,
        vcpu.get_regs,
        lambda: vcpu.set_regs(regs(READER)),
    ]
    for call in calls:
        assert refused(call) == errno.EIO


# -- an SEV guest, over the socket --------------------------------------------------------------


def test_an_sev_guest_moves_to_a_new_vm_without_a_psp_command(sev_host: Host) -> None:
    kvm = sev_host.kvm
    assert kvm.psp is not None
    source = launched_source(sev_host)
    assert report(source.vcpu) == b"\x01"  # the guest wrote its private page
    ciphertext = os.pread(source.ram, PAGE_SIZE, PRIVATE_GPA)
    src = sev_host.vm(source.vm)
    state = sev_state(sev_host, source)
    assert state.active and state.asid and state.handle

    target = new_vm(sev_host, source.ram)  # the new VMM registers the guest's memfd
    target.vcpu = target.vm.create_vcpu(0)
    target.vcpu.set_regs(regs(READER))
    psp = watch_psp(kvm, src)
    target.vm.enable_cap_fd(MOVE, source.vm.fileno())
    assert psp.calls == []

    dst = sev_host.vm(target.vm)
    assert sev_state(sev_host, target) == state and (dst.asid, dst.es) == (state.asid, False)
    assert sev_state(sev_host, source) == SevState() and src.dead and src.asid == 0
    assert dst.slots[0].layout.spa == src.slots[0].layout.spa  # the same pages, the same tweak
    assert os.pread(source.ram, PAGE_SIZE, PRIVATE_GPA) == ciphertext  # nothing copied or rewritten
    assert report(target.vcpu)[:64] == SECRET  # through the C-bit, under the moved ASID
    late = target.vm.create_vcpu(1)  # created after the move: it runs under the ASID too
    late.set_regs(regs(READER))
    assert report(late)[:64] == SECRET
    dead(source)
    assert refused(source.vm.enable_cap_fd, MOVE, target.vm.fileno()) == errno.EIO
    assert refused(target.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL  # nothing left
    assert kvm.psp.guest_status(state.handle)[2] == GuestState.RUNNING

    source.close()  # the old VMM exits: its dead VM frees nothing
    sev_host.wait_destroyed(src)
    assert state.asid not in free_asids(kvm.asids)
    assert report(target.vcpu)[:64] == SECRET
    late.close()
    target.close()
    sev_host.wait_destroyed(dst)
    assert state.asid in free_asids(kvm.asids)
    assert kvm.psp.guest_status(state.handle)[2] == GuestState.INVALID  # decommissioned


def test_each_refusal_has_the_kernels_errno_and_leaves_the_source_running(
        sev_host: Host, other_host: Host) -> None:
    source = launched_source(sev_host)
    assert report(source.vcpu) == b"\x01"
    state = sev_state(sev_host, source)
    target = new_vm(sev_host, source.ram)
    assert source.vcpu is not None

    # Not a VM fd of this host: EBADF.
    elsewhere = new_vm(other_host)
    for not_a_vm in (source.ram, source.vcpu.fileno(), source.kvm.fileno(), elsewhere.vm.fileno()):
        assert refused(target.vm.enable_cap_fd, MOVE, not_a_vm) == errno.EBADF
    assert refused(target.vm.enable_cap, MOVE, 0) == errno.EBADF  # a number alone names nothing
    # Itself: EINVAL (sev_lock_two_vms).
    assert refused(source.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL
    # Either VM in another copy or move: EBUSY.
    for busy in (sev_host.vm(source.vm), sev_host.vm(target.vm)):
        with busy.migration_in_progress:
            assert refused(target.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EBUSY
    untouched(sev_host, source, state, target)

    # The destination is an SEV guest already: one of its own, or a mirror.
    own = new_vm(sev_host)
    own.vm.memory_encrypt_op(ksev.KVM_SEV_INIT)
    own_state = sev_state(sev_host, own)
    assert refused(own.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL
    assert sev_state(sev_host, own) == own_state
    mirror = new_vm(sev_host)
    mirror.vm.enable_cap_fd(COPY, source.vm.fileno())
    assert refused(mirror.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL
    mirror.close()
    # The source is no SEV guest.
    plain = new_vm(sev_host)
    assert refused(target.vm.enable_cap_fd, MOVE, plain.vm.fileno()) == errno.EINVAL
    # The VM types differ (only KVM_X86_DEFAULT_VM is made here: set by hand).
    dst = sev_host.vm(target.vm)
    dst.vm_type = KVM_X86_SEV_ES_VM
    assert refused(target.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL
    dst.vm_type = 0
    # Flags are refused for every cap.
    payload = ioctl.EnableCap(cap=MOVE, flags=1, args=(source.vm.fileno(), 0, 0, 0)).encode()
    result, _, _ = target.vm.ioctl(ioctl.KVM_ENABLE_CAP, payload, [source.vm.fileno()], check=False)
    assert result == -errno.EINVAL
    untouched(sev_host, source, state, target, plain)
    assert report(source.vcpu) == b"\x01"  # the guest runs on under the old VMM

    target.vm.enable_cap_fd(MOVE, source.vm.fileno())  # and the move itself is fine
    assert sev_state(sev_host, target) == state
    for guest in (plain, own, elsewhere, target, source):
        guest.close()


def test_mirror_vms_follow_the_guest(sev_host: Host) -> None:
    kvm = sev_host.kvm
    assert kvm.psp is not None
    source = launched_source(sev_host)
    report(source.vcpu)
    mirror = mirror_of(sev_host, source)
    state = sev_state(sev_host, source)
    src, old_mirror = sev_host.vm(source.vm), sev_host.vm(mirror.vm)

    # The new VMM's migration handler: its mirror VM takes the old one's place.
    new_mirror = new_vm(sev_host, source.ram)
    new_mirror.vm.enable_cap_fd(MOVE, mirror.vm.fileno())
    new_mirror.vcpu = new_mirror.vm.create_vcpu(0)
    new_mirror.vcpu.set_regs(regs(READER))
    nm = sev_host.vm(new_mirror.vm)
    assert src.sev is not None and nm.sev is not None
    assert src.sev.mirror_vms == [nm.sev] and nm.sev.enc_context_owner is src.sev
    assert sev_state(sev_host, new_mirror) == state and old_mirror.dead
    assert report(new_mirror.vcpu)[:64] == SECRET
    dead(mirror)
    with pytest.raises(SevCommandError) as still_a_mirror:
        new_mirror.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(*[0] * 8))
    assert still_a_mirror.value.errno == errno.EINVAL  # only the owner manages the context

    # Then the guest itself: its mirrors are the new VM's now.
    target = new_vm(sev_host, source.ram)
    target.vm.enable_cap_fd(MOVE, source.vm.fileno())
    dst = sev_host.vm(target.vm)
    assert dst.sev is not None and dst.sev.mirror_vms == [nm.sev] and nm.sev.enc_context_owner is dst.sev
    assert src.sev.mirror_vms == [] and src.dead
    assert report(new_mirror.vcpu)[:64] == SECRET

    # The old VMM exits (both its VMs dead): nothing is freed. The context goes with the
    # last of the new guest VM and its mirror.
    source.close()
    mirror.close()
    sev_host.wait_destroyed(src)
    sev_host.wait_destroyed(old_mirror)
    target.close()
    sev_host.wait_destroyed(dst)
    assert state.asid not in free_asids(kvm.asids)
    assert kvm.psp.guest_status(state.handle)[2] == GuestState.RUNNING
    assert report(new_mirror.vcpu)[:64] == SECRET
    new_mirror.close()
    sev_host.wait_destroyed(nm)
    assert state.asid in free_asids(kvm.asids)
    assert kvm.psp.guest_status(state.handle)[2] == GuestState.INVALID


# -- an SEV-ES guest: the VMSAs move ------------------------------------------------------------


def es_target(host: EsHost, ram: int) -> EsGuest:
    """What a new VMM makes for an SEV-ES guest it takes over: a VM that is no SEV guest, the
    guest's memfd registered, one vCPU with registers of its own (:data:`OLD`)."""
    kvm = Kvm(host.socket)
    vm = kvm.create_vm()
    ram = os.dup(ram)
    vm.set_user_memory_region(ioctl.UserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=0, memory_size=os.fstat(ram).st_size, offset=0), ram)
    vcpu = vm.create_vcpu(0)
    vcpu.set_regs(OLD)
    return EsGuest(kvm, vm, vcpu, ram)


def test_an_sev_es_guest_moves_with_its_vmsas_and_registers(es_host: EsHost) -> None:
    kvm = es_host.kvm
    source = es_vm(es_host, REGS)
    es_launch(source)
    last = [es_report(source.vcpu) for _ in range(2)][-1]
    src = kvm.vm_of(source.vm.fileno())
    assert src is not None and src.vmsa is not None
    area, spa = src.vmsa, src.vmsa.page_spa(0)

    asid = src.asid
    # SEV-ES: as many vCPUs on each side (the destination has none here).
    no_vcpus = new_vm(Host(kvm, es_host.socket), source.ram)
    assert refused(no_vcpus.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EINVAL
    # SEV-ES: every source vCPU has a VMSA (this one's launch never got to LAUNCH_UPDATE_VMSA).
    target = es_target(es_host, source.ram)
    unlaunched = es_vm(es_host, REGS)
    unlaunched.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, 5, 0, 0, 0, 0, 0, 0))
    assert refused(target.vm.enable_cap_fd, MOVE, unlaunched.vm.fileno()) == errno.EINVAL
    assert unlaunched.vcpu.get_regs() == REGS  # still the host's to read
    unlaunched.close()
    assert not src.dead and src.asid == asid and src.vmsa is area
    step = es_report(source.vcpu)  # the source ran on, from where it was
    assert (step["rax"], step["rip"]) == (last["rax"] + 1, last["rip"] + 1)

    psp = watch_psp(kvm, src)
    target.vm.enable_cap_fd(MOVE, source.vm.fileno())
    assert psp.calls == []  # the cores store and load the registers; the PSP is not involved
    dst = kvm.vm_of(target.vm.fileno())
    assert dst is not None and dst.vmsa is area and src.vmsa is None  # the pages stay where they are
    assert (dst.asid, dst.es) == (asid, True) and src.dead
    assert refused(target.vcpu.get_regs) == errno.EINVAL  # the registers are the guest's
    moved = es_report(target.vcpu)
    assert moved == step | {"rax": step["rax"] + 1, "rip": step["rip"] + 1}  # not OLD
    assert kvm.spa_window(spa, PAGE_SIZE) is not None  # the page is where it was, now the target's
    for call in (source.vcpu.run, source.vcpu.get_regs):
        assert refused(call) == errno.EIO

    # And back again, to a third VMM's VM: the guest goes on where it was.
    third = es_target(es_host, source.ram)
    third.vm.enable_cap_fd(MOVE, target.vm.fileno())
    again = es_report(third.vcpu)
    assert again == moved | {"rax": moved["rax"] + 1, "rip": moved["rip"] + 1}
    assert refused(target.vcpu.run) == errno.EIO
    for guest in (third, target, no_vcpus, source):
        guest.close()


# -- vCPUs inside KVM_RUN, and held vCPUs (threads on a spinning core) ---------------------------


def running(vcpu: VcpuFd, core: SpinningCore) -> tuple[threading.Thread, list[ioctl.VcpuExit]]:
    """``KVM_RUN`` on a thread of its own, returned once the guest is computing."""
    exits: list[ioctl.VcpuExit] = []
    thread = threading.Thread(target=lambda: exits.append(vcpu.run()), daemon=True)
    steps = core.steps
    thread.start()
    deadline = time.monotonic() + 10
    while core.steps == steps:
        assert time.monotonic() < deadline, "the vCPU did not enter the guest"
        time.sleep(0.001)
    return thread, exits


def stop(vcpu: VcpuFd, thread: threading.Thread, exits: list[ioctl.VcpuExit]) -> None:
    vcpu.kick()
    thread.join(10)
    assert exits == [ioctl.ExitIntr()]


def test_a_vcpu_inside_kvm_run_makes_the_move_ebusy(thread_host: tuple[Host, ThreadLauncher]) -> None:
    host, launcher = thread_host
    source = launched_source(host)  # its vCPU: launcher.cores[0]
    state = sev_state(host, source)
    target = new_vm(host, source.ram)
    target.vcpu = target.vm.create_vcpu(0)  # launcher.cores[1]
    assert source.vcpu is not None
    source_core, target_core = launcher.cores

    for vcpu, core in ((source.vcpu, source_core), (target.vcpu, target_core)):
        thread, exits = running(vcpu, core)
        # Linux would wait for the vCPU's mutex; here the move fails at once, changing nothing.
        assert refused(target.vm.enable_cap_fd, MOVE, source.vm.fileno()) == errno.EBUSY
        untouched(host, source, state, target)
        stop(vcpu, thread, exits)
    assert source.vcpu.get_regs() == source_core.regs  # every vCPU was let go
    assert (source_core.asid, target_core.asid) == (state.asid, 0)

    target.vm.enable_cap_fd(MOVE, source.vm.fileno())
    # A vCPU takes the host's messages before its next ioctl: look once each has answered one.
    assert refused(source.vcpu.run) == errno.EIO
    stop(target.vcpu, *running(target.vcpu, target_core))  # the target's vCPU runs the guest
    assert (source_core.asid, target_core.asid) == (0, state.asid)
    target.close()
    source.close()


def test_a_held_vcpu_waits_and_a_dead_one_answers_eio() -> None:
    vmm_end, vcpu_end = socket.socketpair()
    host_end, control_end = socket.socketpair()
    core = SpinningCore()
    core.asid, core.vmsa = 9, object()
    thread = VcpuThread(Vcpu(0, vcpu_end, control_end, lambda _id, _memory: core))
    assert host_end.recv(1) == VCPU_READY
    handle = VcpuHandle(vcpu_id=0, process=thread, control=host_end)
    vcpu = VcpuFd(vmm_end, 0)

    assert handle.call(CTL_LOCK) == 0
    answers: list[tuple[int, ...]] = []
    waiting = threading.Thread(target=lambda: answers.append(vcpu.get_regs()), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not answers  # behind the mutex
    handle.send(CTL_UNLOCK)
    waiting.join(10)
    assert answers == [core.regs]

    run, exits = running(vcpu, core)
    assert handle.call(CTL_LOCK) == -errno.EBUSY  # inside KVM_RUN: not taken
    stop(vcpu, run, exits)

    assert handle.call(CTL_LOCK) == 0
    handle.send(CTL_VM_DEAD)
    for call in (vcpu.get_regs, vcpu.run, lambda: vcpu.set_regs(regs(READER))):
        assert refused(call) == errno.EIO
    vcpu.kick()  # no reply to give: dropped
    vcpu.interrupt(0x30)
    assert refused(vcpu.get_regs) == errno.EIO
    assert (core.asid, core.vmsa) == (0, None)  # the ASID and the VMSA page are given up
    host_end.close()
    thread.wait(10)
    vmm_end.close()


# -- in process: the moved context's life --------------------------------------------------------


@pytest.mark.parametrize("order", ["guest first", "mirrors first"])
def test_the_moved_context_is_torn_down_by_the_last_of_its_new_users(host_a: SevHost, order: str) -> None:
    source = host_a.vm()
    sev_launch(source, 0, {0: SECRET * 64})
    asid, handle = source.asid, source.handle
    copies = [host_a.vm(), host_a.vm()]
    for mirror in copies:
        assert mirror.sev.copy_enc_context_from(source.sev) == 0
    target = host_a.vm()
    assert target.sev.check_move_from(source.sev) == 0
    target.sev.move_enc_context_from(source.sev)
    assert target.bound == [(asid, False)] and source.bound == [(asid, False)]
    assert target.sev.mirror_vms == [c.sev for c in copies]
    assert all(c.sev.enc_context_owner is target.sev for c in copies)
    assert (target.asid, target.handle, source.asid, source.handle) == (asid, handle, 0, 0)
    # A mirror leaving that still saw the old owner (it raced the move) is sent on to the new one.
    assert source.sev._put(mirror=copies[0].sev) is False
    assert target.sev.mirror_vms == [c.sev for c in copies]

    source.sev.destroy()  # the old VM: nothing of the context is its own any more
    assert asid not in free_asids(host_a.asids) and host_a.slots.runnable(asid)
    last, *rest = [target, *copies] if order == "mirrors first" else [*copies[::-1], target]
    for vm in rest[::-1]:
        vm.sev.destroy()
        assert asid not in free_asids(host_a.asids)
        assert host_a.port.guest_status(handle)[2] == GuestState.RUNNING
    last.sev.destroy()
    assert asid in free_asids(host_a.asids) and not host_a.slots.runnable(asid)
    assert host_a.port.guest_status(handle)[2] == GuestState.INVALID


def test_a_moved_mirror_takes_its_place_in_the_owners_list(host_a: SevHost) -> None:
    owner = host_a.vm()
    sev_launch(owner, 0, {0: SECRET * 64})
    first, mirror, last = host_a.vm(), host_a.vm(), host_a.vm()
    for vm in (first, mirror, last):
        assert vm.sev.copy_enc_context_from(owner.sev) == 0
    target = host_a.vm()
    assert target.sev.check_move_from(mirror.sev) == 0
    target.sev.move_enc_context_from(mirror.sev)
    assert owner.sev.mirror_vms == [first.sev, target.sev, last.sev]
    assert target.sev.enc_context_owner is owner.sev and mirror.sev.enc_context_owner is None
    assert (target.asid, target.handle) == (owner.asid, owner.handle)
    # Still a mirror: only the owner manages the context.
    reply = target.op(ksev.KVM_SEV_SEND_START, bytes(ksev.SEND_START.size))
    assert (reply.result, reply.error) == (-errno.EINVAL, ksev.SEV_RET_NO_FW_CALL)
    assert target.op(ksev.KVM_SEV_DBG_DECRYPT, ksev.DBG.pack(0, 0, 64, 0)).out == SECRET
    mirror.sev.destroy()
    assert owner.sev.mirror_vms == [first.sev, target.sev, last.sev]


def test_a_move_needs_a_fresh_destination_and_an_sev_source(host_a: SevHost) -> None:
    source, fresh, plain, sev_guest = host_a.vm(), host_a.vm(), host_a.vm(), host_a.vm()
    sev_launch(source, 0, {})
    assert sev_guest.op(ksev.KVM_SEV_INIT).result == 0
    assert sev_guest.sev.check_move_from(source.sev) == -errno.EINVAL
    assert fresh.sev.check_move_from(plain.sev) == -errno.EINVAL
    fresh.sev.move_enc_context_from(source.sev)
    assert host_a.vm().sev.check_move_from(source.sev) == -errno.EINVAL  # nothing left to move
