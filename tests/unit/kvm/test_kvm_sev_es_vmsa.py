"""SEV-ES register state in real, encrypted VMSA pages: two in-process hosts, real vCPU processes.

Each host is what ``confmig host`` wires (``hostd.main.build_host``): KVM serving
its socket, the PSP on the host's memory, the key slots and the TMR shared with
the vCPU processes. The test is the VMM: it speaks ioctls over the socket. The
guest (``roms/vmsa_rom.py``) reports its own registers on an I/O port at every
step, which is how the test sees, from the trusted side, what the core holds.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from confmig.common.errors import KvmError
from confmig.common.units import MiB
from confmig.hostd.main import build_host
from confmig.kvm import sev as ksev
from confmig.kvm.client import Kvm, SevCommandError, VcpuFd, VmFd
from confmig.kvm.host import KvmHost, VmsaArea
from confmig.platform.psp import PlatformIdentity, SevStatus, TransportKeys, vmsa_image
from confmig.platform.psp.measure import compute_measure, launch_digest
from confmig.platform.psp.version import FirmwareVersion
from confmig.platform.psp.vmsa import VMSA_REGISTER_OFFSETS
from confmig.proto import ioctl

ROM = "vmsa_rom:rom"
REPORT_PORT = 0x5E5  # roms/vmsa_rom.py
ES_POLICY = 0x5  # NODBG | ES
NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")  # fmt: skip
RIP = 0xFFFF_1000
REGS = (*(0x5EC0_0000_0000_0000 | (i + 1) << 24 | 0xA5A5 for i in range(16)), RIP, 0x202)
"""What the VMM sets before the launch: distinctive values, easy to look for in host memory."""
OLD = (*range(1, 17), 0xFFFF_2000, 0x2)
"""The target vCPU's own registers before it receives the source's."""
VMRUN_FAILED = ioctl.ExitFailEntry(hardware_entry_failure_reason=2**64 - 1)
"""KVM_EXIT_FAIL_ENTRY with SVM_EXIT_ERR (-1): the core refused VMRUN (VMEXIT_INVALID)."""


@dataclass
class Host:
    kvm: KvmHost
    socket: str
    amd_chain: bytes
    """ASK‖ARK of the installation (what a VMM gets from AMD's key server)."""

    def vmsa(self) -> VmsaArea:
        """The host's view of its (single) VM's VMSA pages."""
        (vm,) = self.kvm.vms.values()
        assert vm.vmsa is not None
        return vm.vmsa


def _serve(identity: PlatformIdentity, path: Path) -> Iterator[Host]:
    host = build_host(identity, rom=ROM)
    host.listen(str(path))
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield Host(host, str(path), identity.certificates.amd_chain())
    host.close()
    thread.join(5)


@pytest.fixture
def es_host_a(identity_a: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    yield from _serve(identity_a, tmp_path / "a.sock")


@pytest.fixture
def es_host_b(identity_b: PlatformIdentity, tmp_path: Path) -> Iterator[Host]:
    yield from _serve(identity_b, tmp_path / "b.sock")


# -- the VMM's side ---------------------------------------------------------------------------


@dataclass
class Guest:
    kvm: Kvm
    vm: VmFd
    vcpu: VcpuFd
    ram: int

    def close(self) -> None:
        for fd in (self.vcpu, self.vm, self.kvm):
            fd.close()
        os.close(self.ram)


def es_vm(host: Host, regs: tuple[int, ...]) -> Guest:
    """A VM with 1 MiB of RAM and one vCPU whose registers are ``regs``; SEV-ES initialised."""
    kvm = Kvm(host.socket)
    vm = kvm.create_vm()
    ram = os.memfd_create("ram")
    os.ftruncate(ram, MiB)
    vm.set_user_memory_region(ioctl.UserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=0, memory_size=MiB, offset=0), ram)
    vm.memory_encrypt_op(ksev.KVM_SEV_ES_INIT)  # before any vCPU exists, as KVM requires
    vcpu = vm.create_vcpu(0)
    vcpu.set_regs(regs)
    return Guest(kvm, vm, vcpu, ram)


def launch(guest: Guest) -> bytes:
    """LAUNCH_START (no owner), LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE, LAUNCH_FINISH: the measurement."""
    vm = guest.vm
    vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, ES_POLICY, 0, 0, 0, 0, 0, 0))
    vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
    _err, out = vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_MEASURE, ksev.LAUNCH_MEASURE.pack(0, 48, 0))
    vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_FINISH)
    return out[ksev.LAUNCH_MEASURE.size :]


def report(vcpu: VcpuFd) -> dict[str, int]:
    """KVM_RUN until the guest's report: the registers it had after its step."""
    ex = vcpu.run()
    assert isinstance(ex, ioctl.ExitIo) and ex.port == REPORT_PORT, ex
    return dict(zip(NAMES, struct.unpack("<18Q", ex.data), strict=True))


def certificates(host: Host) -> tuple[bytes, bytes, bytes]:
    """PDH, PEK‖OCA‖CEK (``/dev/sev``) and ASK‖ARK of ``host``: SEND_START's inputs."""
    status, out = Kvm(host.socket).sev_issue_cmd(ksev.SEV_PDH_CERT_EXPORT)
    assert status == 0
    pdh_len, chain_len = struct.unpack_from("<II", out)
    pdh, chain = out[8 : 8 + pdh_len], out[8 + pdh_len : 8 + pdh_len + chain_len]
    return pdh, chain, host.amd_chain


def send_start(vm: VmFd, target: tuple[bytes, bytes, bytes]) -> tuple[int, bytes]:
    pdh, chain, amd = target
    body = ksev.SEND_START.pack(0, 0, 0, len(pdh), 0, 0, len(chain), 0, 0, len(amd), 0, 0, 128, 0)
    _err, out = vm.memory_encrypt_op(ksev.KVM_SEV_SEND_START, body + pdh + chain + amd)
    return ksev.SEND_START.unpack_from(out)[0], out[ksev.SEND_START.size :]


def send_vmsa(vm: VmFd, vcpu_id: int = 0) -> tuple[bytes, bytes]:
    body = ksev.SEND_UPDATE_VMSA.pack(vcpu_id, 0, 0, ksev.PACKET_HEADER_LEN, 0, 0, 4096, 0)
    _err, out = vm.memory_encrypt_op(ksev.KVM_SEV_SEND_UPDATE_VMSA, body)
    data = out[ksev.SEND_UPDATE_VMSA.size :]
    return data[: ksev.PACKET_HEADER_LEN], data[ksev.PACKET_HEADER_LEN :]


def receive_vmsa(vm: VmFd, hdr: bytes, trans: bytes, vcpu_id: int = 0) -> None:
    body = ksev.RECEIVE_UPDATE_VMSA.pack(vcpu_id, 0, 0, len(hdr), 0, 0, len(trans), 0)
    vm.memory_encrypt_op(ksev.KVM_SEV_RECEIVE_UPDATE_VMSA, body + hdr + trans)


def register_bytes(values: tuple[int, ...] | list[int]) -> list[bytes]:
    return [struct.pack("<Q", v) for v in values if v > 0xFFFF]  # small values occur by chance


def firmware_version(host: Host) -> FirmwareVersion:
    _status, info = Kvm(host.socket).sev_issue_cmd(ksev.SEV_PLATFORM_STATUS)
    api_major, api_minor, _state, _flags, build, _count = struct.unpack_from("<BBBIBI", info)
    return FirmwareVersion(api_major=api_major, api_minor=api_minor, build=build)


# -- the tests --------------------------------------------------------------------------------


def test_an_es_vcpu_migrates_through_the_psp_with_its_registers(es_host_a: Host, es_host_b: Host) -> None:
    source = es_vm(es_host_a, REGS)
    measurement = launch(source)
    with pytest.raises(KvmError) as refused:
        source.vcpu.get_regs()
    assert refused.value.errno == errno.EINVAL
    # What the owner hashes for an SEV-ES launch: each vCPU's VMSA image as KVM built it
    # (no firmware here). Without an owner, the launch channel's TIK is zero.
    image = vmsa_image(dict(zip(NAMES, REGS, strict=True)))
    digest = launch_digest([image])
    expected = compute_measure(TransportKeys.zero().tik, firmware=firmware_version(es_host_a),
                               policy=ES_POLICY, digest=digest, mnonce=measurement[32:])
    assert measurement[:32] == expected
    # The host's copy of the page is ciphertext from the launch on.
    launched = es_host_a.vmsa().page(0)
    assert launched != image and all(v not in launched for v in register_bytes(REGS))

    reports = [report(source.vcpu) for _ in range(3)]
    assert reports[0] == dict(zip(NAMES, REGS, strict=True)) | {"rax": REGS[0] + 1, "rip": RIP + 1}
    last = reports[-1]
    assert (last["rax"], last["rip"]) == (REGS[0] + 3, RIP + 3)

    target = es_vm(es_host_b, OLD)
    policy, session = send_start(source.vm, certificates(es_host_b))
    pdh_a = certificates(es_host_a)[0]
    body = ksev.RECEIVE_START.pack(0, policy, 0, len(pdh_a), 0, 0, len(session), 0)
    target.vm.memory_encrypt_op(ksev.KVM_SEV_RECEIVE_START, body + pdh_a + session)

    hdr, trans = send_vmsa(source.vm)
    saved = es_host_a.vmsa().page(0)  # the source's page after the vCPU stored its registers
    assert saved != launched  # new state, newly encrypted
    for seen in (saved, trans):
        assert all(v not in seen for v in register_bytes(list(last.values())))

    # A packet changed in transit: BAD_MEASUREMENT, nothing written, the target keeps its state.
    tampered = trans[:100] + bytes([trans[100] ^ 0x80]) + trans[101:]
    with pytest.raises(SevCommandError) as bad:
        receive_vmsa(target.vm, hdr, tampered)
    assert (bad.value.errno, bad.value.fw_error) == (errno.EIO, SevStatus.BAD_MEASUREMENT)
    assert target.vcpu.get_regs() == OLD
    assert not any(es_host_b.vmsa().page(0))

    assert target.vcpu.run() == VMRUN_FAILED  # not before RECEIVE_FINISH
    receive_vmsa(target.vm, hdr, trans)
    received = es_host_b.vmsa().page(0)
    assert any(received) and all(v not in received for v in register_bytes(list(last.values())))
    with pytest.raises(KvmError):
        target.vcpu.get_regs()  # sealed on the target too
    with pytest.raises(KvmError):
        target.vcpu.set_regs(OLD)
    assert target.vcpu.run() == VMRUN_FAILED
    target.vm.memory_encrypt_op(ksev.KVM_SEV_RECEIVE_FINISH)
    source.vm.memory_encrypt_op(ksev.KVM_SEV_SEND_FINISH)
    assert source.vcpu.run() == VMRUN_FAILED  # SENT: never again, not to fork the guest

    # The target's guest continues exactly where the source's stopped.
    assert report(target.vcpu) == last | {"rax": last["rax"] + 1, "rip": last["rip"] + 1}
    source.close()
    target.close()


def test_a_vmsa_the_host_changed_is_caught_by_the_psp_and_by_vmrun(es_host_a: Host, es_host_b: Host) -> None:
    guest = es_vm(es_host_a, REGS)
    launch(guest)
    area = es_host_a.vmsa()
    spa = area.page_spa(0)
    first = report(guest.vcpu)

    def tamper(data: bytes) -> None:
        view = area.window(spa, 4096)
        assert view is not None
        view[:] = data

    send_start(guest.vm, certificates(es_host_b))
    send_vmsa(guest.vm)  # the vCPU stored its state: the page is current
    good = area.page(0)
    flipped = bytearray(good)
    flipped[VMSA_REGISTER_OFFSETS["rax"]] ^= 1
    tamper(bytes(flipped))
    with pytest.raises(SevCommandError) as caught:
        send_vmsa(guest.vm)  # the page is not stored again: the PSP reads what the host left
    assert caught.value.fw_error == SevStatus.INVALID_PARAM  # the TMR checksum
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_SEND_CANCEL)
    assert guest.vcpu.run() == VMRUN_FAILED
    tamper(good)  # put it back: VMRUN accepts it and the guest runs on
    second = report(guest.vcpu)
    assert (second["rax"], second["rip"]) == (first["rax"] + 1, first["rip"] + 1)

    # A replay: the page as it was stored earlier, after the guest has moved on.
    report(guest.vcpu)
    send_start(guest.vm, certificates(es_host_b))
    send_vmsa(guest.vm)
    assert area.page(0) != good
    tamper(good)
    with pytest.raises(SevCommandError) as replayed:
        send_vmsa(guest.vm)
    assert replayed.value.fw_error == SevStatus.INVALID_PARAM
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_SEND_CANCEL)
    assert guest.vcpu.run() == VMRUN_FAILED
    guest.close()


def test_vmsa_commands_need_a_launched_vcpu_and_launch_it_once(es_host_a: Host) -> None:
    guest = es_vm(es_host_a, REGS)
    start = ksev.LAUNCH_START.pack(0, ES_POLICY, 0, 0, 0, 0, 0, 0)
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, start)
    # Not launched yet: no VMSA state to store (the registers are still the host's).
    with pytest.raises(SevCommandError) as early:
        send_vmsa(guest.vm)
    assert (early.value.errno, early.value.fw_error) == (errno.EINVAL, ksev.SEV_RET_NO_FW_CALL)
    assert guest.vcpu.get_regs() == REGS
    assert guest.vcpu.run() == VMRUN_FAILED  # activated, but the launch has not finished
    guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
    with pytest.raises(SevCommandError) as twice:
        guest.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)  # already sealed
    assert twice.value.errno == errno.EINVAL
    guest.close()


def test_the_vmsa_image_layout() -> None:
    """The SEV-ES save area's offsets (APM vol. 2 table B-4, Linux ``struct sev_es_save_area``)."""
    image = vmsa_image({"rip": 0x1122, "rflags": 0x2, "rsp": 0x3344, "rax": 0x55, "rcx": 0x66, "r15": 0x77})
    assert len(image) == 4096
    at = {off: struct.unpack_from("<Q", image, off)[0] for off in (0x170, 0x178, 0x1D8, 0x1F8, 0x308, 0x378)}
    assert at == {0x170: 0x2, 0x178: 0x1122, 0x1D8: 0x3344, 0x1F8: 0x55, 0x308: 0x66, 0x378: 0x77}
    assert hashlib.sha256(vmsa_image({})).digest() == hashlib.sha256(bytes(4096)).digest()
    with pytest.raises(ValueError):
        vmsa_image({"cr3": 1})
