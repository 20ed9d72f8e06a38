"""Mirror VMs: ``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM`` (sev-platform.md §4.8).

Two ways in. Over the host's socket, as a VMM (``build_host`` wiring, real vCPU
processes running ``roms/mirror_rom.py``): the fd checks, the copy's refusals and
a mirror vCPU reading the guest's private memory. In process, on the SEV hosts of
``sev_hosts.py`` (KVM's SEV code on a real PSP and engine, no processes): what a
mirror may issue, SEV-ES VMSAs, and who frees the ASID when.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sev_hosts import SevHost, launch
from sev_hosts import Vm as SevVmHarness

from confmig.common.errors import KvmError
from confmig.common.units import PAGE_SIZE, MiB
from confmig.hostd.main import build_host
from confmig.kvm import sev as ksev
from confmig.kvm.client import Kvm, SevCommandError, VcpuFd, VmFd
from confmig.kvm.host import KvmHost, Vm
from confmig.kvm.sev import AsidAllocator, SevVm
from confmig.platform.psp import GuestState, PlatformIdentity
from confmig.proto import ioctl

ROM = "mirror_rom:rom"
REPORT_PORT = 0x5E6  # roms/mirror_rom.py
WRITER, READER = 0xFFFF_0000, 0xFFFF_1000  # roms/mirror_rom.py
PRIVATE_GPA = 0x3000
PATTERN = tuple(int.from_bytes(hashlib.sha256(b"the source guest's secret %d" % i).digest()[:8], "little")
                for i in range(8))
"""r8..r15 of the writer: the page it writes is these 64 bytes repeated."""
SECRET = struct.pack("<8Q", *PATTERN)
COPY = ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
EINVAL = -errno.EINVAL
NO_FW_CALL = ksev.SEV_RET_NO_FW_CALL


# -- a host serving its socket, and the VMM's side -------------------------------------------


@dataclass
class Host:
    kvm: KvmHost
    socket: str

    def vm(self, fd: VmFd) -> Vm:
        """KVM's VM behind a VMM's VM fd (the test and the host share a process)."""
        vm = self.kvm.vm_of(fd.fileno())
        assert vm is not None
        return vm

    def wait_destroyed(self, vm: Vm) -> None:
        """Until the host has torn ``vm`` down (its VMM closed the VM fd)."""
        deadline = time.monotonic() + 10
        while vm.vm_id in self.kvm.vms or vm.slots:
            assert time.monotonic() < deadline, "the host did not destroy the VM"
            time.sleep(0.01)
        with vm.lock:  # Vm.destroy empties the slots under it: wait for the rest of it
            pass


def _serve(identity: PlatformIdentity, path: Path) -> Iterator[Host]:
    host = build_host(identity, rom=ROM)
    host.listen(str(path))
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield Host(host, str(path))
    host.close()
    thread.join(5)


@pytest.fixture
def mirror_host(identity_a: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    yield from _serve(identity_a, tmp_path / "a.sock")


@pytest.fixture
def other_host(identity_b: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    yield from _serve(identity_b, tmp_path / "b.sock")


@dataclass
class Guest:
    kvm: Kvm
    vm: VmFd
    ram: int
    vcpu: VcpuFd | None = None

    def close(self) -> None:
        for fd in (self.vcpu, self.vm, self.kvm):
            if fd is not None:
                fd.close()
        os.close(self.ram)


def new_vm(host: Host, ram: int | None = None) -> Guest:
    """A VM with 1 MiB of RAM at GPA 0: a new memfd, or ``ram`` (a mirror registers the guest's)."""
    kvm = Kvm(host.socket)
    vm = kvm.create_vm()
    if ram is None:
        ram = os.memfd_create("ram")
        os.ftruncate(ram, MiB)
    else:
        ram = os.dup(ram)
    vm.set_user_memory_region(ioctl.UserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=0, memory_size=MiB, offset=0), ram)
    return Guest(kvm, vm, ram)


def regs(rip: int) -> tuple[int, ...]:
    """rax..r15, rip, rflags: ``rcx`` the private page, ``r8``..``r15`` the pattern."""
    return (0, 0, PRIVATE_GPA, 0, 0, 0, 0, 0, *PATTERN, rip, 0x2)


def launched_source(host: Host) -> Guest:
    """An SEV guest (policy 0: debugging allowed) launched with no owner, its vCPU at the writer."""
    guest = new_vm(host)
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_INIT)
    guest.vcpu = guest.vm.create_vcpu(0)
    guest.vcpu.set_regs(regs(WRITER))
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, 0, 0, 0, 0, 0, 0, 0))
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_MEASURE, ksev.LAUNCH_MEASURE.pack(0, 48, 0))
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_FINISH)
    return guest


def mirror_of(host: Host, source: Guest) -> Guest:
    """What a VMM does for a migration helper: a new VM sharing the guest's encryption context,
    the guest's RAM registered in it, then its vCPU (at the reader)."""
    kvm = Kvm(host.socket)
    vm = kvm.create_vm()
    vm.enable_cap_fd(COPY, source.vm.fileno())
    ram = os.dup(source.ram)
    vm.set_user_memory_region(ioctl.UserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=0, memory_size=MiB, offset=0), ram)
    mirror = Guest(kvm, vm, ram, vm.create_vcpu(0))
    assert mirror.vcpu is not None
    mirror.vcpu.set_regs(regs(READER))
    return mirror


def report(vcpu: VcpuFd | None) -> bytes:
    assert vcpu is not None
    ex = vcpu.run()
    assert isinstance(ex, ioctl.ExitIo) and ex.port == REPORT_PORT, ex
    return ex.data


def refused(call: object, *args: object) -> int:
    """The errno a client call failed with."""
    assert callable(call)
    with pytest.raises(KvmError) as caught:
        call(*args)
    return caught.value.errno


def untouched(host: Host, mirror: Guest, source: Guest | None = None) -> bool:
    """A refused copy changed nothing: the mirror is no SEV guest, the source has no mirror."""
    vm = host.vm(mirror.vm)
    if vm.asid or (vm.sev is not None and (vm.sev.state.active or vm.sev.enc_context_owner)):
        return False
    owner = host.vm(source.vm).sev if source is not None else None
    return owner is None or not owner.mirror_vms


def mirrors(host: Host, guest: Guest) -> list[SevVm]:
    sev = host.vm(guest.vm).sev
    return sev.mirror_vms if sev is not None else []


def free_asids(asids: AsidAllocator) -> list[int]:
    """The ASIDs ``asids`` would hand out, each as often as it would (it is left as it was)."""
    taken: list[int] = []
    for es in (False, True):
        while (asid := asids.allocate(es=es)) is not None:
            taken.append(asid)
    for asid in reversed(taken):
        asids.release(asid)
    return taken


# -- over the socket, as a VMM -----------------------------------------------------------------


def test_the_capability_has_linuxs_numbers_and_is_advertised(mirror_host: Host) -> None:
    assert (ioctl.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM) == (197, 206)
    assert ioctl.cap_name(197) == "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM"
    kvm = Kvm(mirror_host.socket)
    vm = kvm.create_vm()
    assert kvm.check_extension(COPY) == vm.check_extension(COPY) == 1
    assert kvm.check_extension(ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM) == 1
    vm.close()
    kvm.close()


def test_a_mirror_vcpu_reads_the_private_page_the_source_guest_wrote(mirror_host: Host) -> None:
    source = launched_source(mirror_host)
    assert report(source.vcpu) == b"\x01"  # the guest wrote the page, encrypted under its ASID
    seen_by_host = os.pread(source.ram, PAGE_SIZE, PRIVATE_GPA)
    assert SECRET not in seen_by_host

    mirror = mirror_of(mirror_host, source)
    src, mir = mirror_host.vm(source.vm), mirror_host.vm(mirror.vm)
    assert mir.asid == src.asid != 0 and not mir.es
    assert mir.sev is not None and src.sev is not None
    assert mir.sev.state.handle == src.sev.state.handle and mir.sev.enc_context_owner is src.sev
    assert src.sev.mirror_vms == [mir.sev]
    # The same memfd pages: the same system-physical addresses, so the same tweak.
    assert mir.slots[0].layout.spa == src.slots[0].layout.spa

    data = report(mirror.vcpu)
    assert data[:64] == SECRET  # through the C-bit: the plaintext
    assert data[64:] == seen_by_host[:64] != SECRET  # without it: what the host sees

    # What a mirror may still ask: the guest's status, debug access (policy 0 allows it).
    _err, out = mirror.vm.memory_encrypt_op(ksev.KVM_SEV_GUEST_STATUS, ksev.GUEST_STATUS.pack(0, 0, 0))
    assert ksev.GUEST_STATUS.unpack(out)[1] == GuestState.RUNNING
    _err, plain = mirror.vm.memory_encrypt_op(ksev.KVM_SEV_DBG_DECRYPT, ksev.DBG.pack(PRIVATE_GPA, 0, 64, 0))
    assert plain == SECRET
    # And what it may not: the owner manages the context.
    with pytest.raises(SevCommandError) as launch_start:
        mirror.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, 0, 0, 0, 0, 0, 0, 0))
    assert (launch_start.value.errno, launch_start.value.fw_error) == (errno.EINVAL, NO_FW_CALL)
    mirror.close()
    source.close()


def test_only_a_vm_fd_of_this_host_names_a_source(mirror_host: Host, other_host: Host) -> None:
    source = launched_source(mirror_host)
    mirror = new_vm(mirror_host)
    elsewhere = new_vm(other_host)
    assert source.vcpu is not None
    for not_a_vm in (mirror.ram, source.vcpu.fileno(), source.kvm.fileno(), elsewhere.vm.fileno()):
        assert refused(mirror.vm.enable_cap_fd, COPY, not_a_vm) == errno.EBADF
        assert untouched(mirror_host, mirror, source)
    assert refused(mirror.vm.enable_cap, COPY, 0) == errno.EBADF  # a number alone names nothing
    assert refused(mirror.vm.enable_cap_fd, COPY, mirror.vm.fileno()) == errno.EINVAL  # itself
    assert untouched(mirror_host, mirror, source)
    mirror.vm.enable_cap_fd(COPY, source.vm.fileno())  # the same VM fd is accepted
    for guest in (elsewhere, mirror, source):
        guest.close()


def test_a_copy_that_would_break_a_rule_is_einval_and_changes_nothing(mirror_host: Host) -> None:
    source = launched_source(mirror_host)

    # The mirror already has a vCPU (set up as a plain one).
    with_vcpu = new_vm(mirror_host)
    with_vcpu.vcpu = with_vcpu.vm.create_vcpu(0)
    assert refused(with_vcpu.vm.enable_cap_fd, COPY, source.vm.fileno()) == errno.EINVAL
    assert untouched(mirror_host, with_vcpu, source)

    # The mirror is an SEV guest already.
    sev_guest = new_vm(mirror_host)
    sev_guest.vm.memory_encrypt_op(ksev.KVM_SEV_INIT)
    own = mirror_host.vm(sev_guest.vm)
    assert own.sev is not None
    asid = own.sev.state.asid
    assert refused(sev_guest.vm.enable_cap_fd, COPY, source.vm.fileno()) == errno.EINVAL
    assert own.sev.state.asid == asid and own.sev.enc_context_owner is None
    assert not mirrors(mirror_host, source)

    # The source is no SEV guest (never KVM_SEV_INIT).
    plain, mirror = new_vm(mirror_host), new_vm(mirror_host)
    assert refused(mirror.vm.enable_cap_fd, COPY, plain.vm.fileno()) == errno.EINVAL
    assert untouched(mirror_host, mirror, plain)

    # A mirror of a mirror, and a mirror mirroring again.
    mirror.vm.enable_cap_fd(COPY, source.vm.fileno())
    second = new_vm(mirror_host)
    assert refused(second.vm.enable_cap_fd, COPY, mirror.vm.fileno()) == errno.EINVAL
    assert untouched(mirror_host, second, mirror)
    assert refused(mirror.vm.enable_cap_fd, COPY, source.vm.fileno()) == errno.EINVAL
    assert refused(mirror.vm.enable_cap_fd, COPY, sev_guest.vm.fileno()) == errno.EINVAL
    assert mirrors(mirror_host, source) == [mirror_host.vm(mirror.vm).sev]
    assert not mirrors(mirror_host, sev_guest)

    # Flags are refused for every cap.
    payload = ioctl.EnableCap(cap=COPY, flags=1).encode()
    result, _, _ = second.vm.ioctl(ioctl.KVM_ENABLE_CAP, payload, [source.vm.fileno()], check=False)
    assert result == EINVAL and untouched(mirror_host, second, None)
    for guest in (second, mirror, plain, sev_guest, with_vcpu, source):
        guest.close()


def test_a_vm_in_another_copy_is_ebusy(mirror_host: Host) -> None:
    source = launched_source(mirror_host)
    mirror = new_vm(mirror_host)
    for busy in (mirror_host.vm(source.vm), mirror_host.vm(mirror.vm)):
        with busy.migration_in_progress:  # as a concurrent copy or move holds it
            assert refused(mirror.vm.enable_cap_fd, COPY, source.vm.fileno()) == errno.EBUSY
            assert untouched(mirror_host, mirror, source)
    mirror.vm.enable_cap_fd(COPY, source.vm.fileno())
    mirror.close()
    source.close()


def test_the_asid_lives_until_the_last_of_source_and_mirror_is_destroyed(mirror_host: Host) -> None:
    kvm = mirror_host.kvm
    assert kvm.psp is not None
    source = launched_source(mirror_host)
    report(source.vcpu)
    mirror = mirror_of(mirror_host, source)
    src = mirror_host.vm(source.vm)
    assert src.sev is not None
    asid, handle = src.sev.state.asid, src.sev.state.handle
    assert asid not in free_asids(kvm.asids)

    source.close()  # the guest's VMM is gone: KVM destroys the VM, not the context
    mirror_host.wait_destroyed(src)
    assert asid not in free_asids(kvm.asids)
    assert kvm.psp.guest_status(handle)[2] == GuestState.RUNNING
    assert report(mirror.vcpu)[:64] == SECRET  # the mirror runs on, under the same key
    other = new_vm(mirror_host)
    other.vm.memory_encrypt_op(ksev.KVM_SEV_INIT)
    other_sev = mirror_host.vm(other.vm).sev
    assert other_sev is not None and other_sev.state.asid not in (0, asid)

    mir = mirror_host.vm(mirror.vm)
    mirror.close()
    mirror_host.wait_destroyed(mir)
    assert asid in free_asids(kvm.asids)
    assert kvm.psp.guest_status(handle)[2] == GuestState.INVALID  # decommissioned
    other.close()


# -- in process: what a mirror may issue, and the context's life ------------------------------


def sev_mirror(host: SevHost, source: SevVmHarness) -> SevVmHarness:
    mirror = host.vm()
    assert mirror.sev.copy_enc_context_from(source.sev) == 0
    return mirror


def test_a_mirror_issues_only_vmsa_status_and_debug_commands(host_a: SevHost) -> None:
    source = host_a.vm()
    launch(source, 0, {0: SECRET * 64})
    mirror = sev_mirror(host_a, source)
    assert mirror.bound == [(source.asid, False)]
    commands = {v for k, v in vars(ksev).items() if k.startswith("KVM_SEV_") and isinstance(v, int)}
    owner_only = sorted(commands - ksev.MIRROR_COMMANDS)
    assert ksev.KVM_SEV_INIT in owner_only and ksev.KVM_SEV_SEND_START in owner_only
    for cmd_id in owner_only:
        reply = mirror.op(cmd_id, bytes(256))
        assert (reply.result, reply.error, reply.out) == (EINVAL, NO_FW_CALL, b""), ksev.sev_cmd_name(cmd_id)
    assert source.guest_state() == GuestState.RUNNING
    assert (mirror.asid, mirror.handle) == (source.asid, source.handle)

    status = mirror.op(ksev.KVM_SEV_GUEST_STATUS, ksev.GUEST_STATUS.pack(0, 0, 0))
    assert (status.result, ksev.GUEST_STATUS.unpack(status.out)[1]) == (0, GuestState.RUNNING)
    page = mirror.op(ksev.KVM_SEV_DBG_DECRYPT, ksev.DBG.pack(0, 0, 64, 0))
    assert (page.result, page.out) == (0, SECRET)
    written = mirror.op(ksev.KVM_SEV_DBG_ENCRYPT, ksev.DBG.pack(0, 0x1000, 16, 0) + b"from the mirror!")
    assert written.result == 0
    assert host_a.plaintext(source.asid, 0x1000, 16) == b"from the mirror!"
    # Let through, and then refused as for any SEV (not SEV-ES) guest, as Linux does.
    assert mirror.op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA).result == -errno.ENOTTY


def test_launch_update_vmsa_on_an_es_mirror_launches_the_mirrors_own_vcpus(host_a: SevHost) -> None:
    source = host_a.vm()
    assert source.op(ksev.KVM_SEV_ES_INIT).result == 0
    source.vmsa[0] = 0x8000
    start = source.op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, 0x5, 0, 0, 0, 0, 0, 0))
    assert start.result == 0
    mirror = sev_mirror(host_a, source)
    assert mirror.bound == [(source.asid, True)]
    mirror.vmsa[1] = 0x9000  # the mirror's vCPU, created after the copy
    reply = mirror.op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert (reply.result, reply.error) == (0, 0)
    assert mirror.vcpu_calls == [("sync", 1), ("launched", 1)]
    assert source.vcpu_calls == []
    assert host_a.ram[0x9000 : 0xA000] != bytes(PAGE_SIZE)  # encrypted in place by the PSP


def test_a_mirror_cannot_be_made_with_vcpus_or_from_a_non_sev_vm(host_a: SevHost) -> None:
    source = host_a.vm()
    launch(source, 0, {})
    mirror = host_a.vm()
    mirror.vmsa[0] = 0x1000  # a vCPU exists
    assert mirror.sev.copy_enc_context_from(source.sev) == EINVAL
    assert not mirror.sev.state.active and not source.sev.mirror_vms and mirror.bound == []
    fresh = host_a.vm()
    assert fresh.sev.copy_enc_context_from(host_a.vm().sev) == EINVAL
    assert not fresh.sev.state.active


@pytest.mark.parametrize("order", ["source first", "mirrors first"])
def test_the_last_one_out_frees_the_context(host_a: SevHost, order: str) -> None:
    source = host_a.vm()
    launch(source, 0, {0: SECRET * 64})
    asid, handle = source.asid, source.handle
    copies = [sev_mirror(host_a, source), sev_mirror(host_a, source)]
    last, *rest = [source, *copies] if order == "mirrors first" else [*copies[::-1], source]
    for vm in rest[::-1]:
        vm.sev.destroy()
        assert asid not in free_asids(host_a.asids)
        assert host_a.slots.runnable(asid)
        assert host_a.port.guest_status(handle)[2] == GuestState.RUNNING
    if last is not source:
        assert last.op(ksev.KVM_SEV_DBG_DECRYPT, ksev.DBG.pack(0, 0, 64, 0)).out == SECRET
    last.sev.destroy()
    assert asid in free_asids(host_a.asids)
    assert not host_a.slots.runnable(asid)
    assert host_a.port.guest_status(handle)[2] == GuestState.INVALID
    for vm in (source, *copies):
        vm.sev.destroy()  # a second teardown does nothing
    assert free_asids(host_a.asids).count(asid) == 1
