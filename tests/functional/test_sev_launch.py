"""An SEV guest launched through the emulated PSP, driven by the VMM as QEMU would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from confmig.bench.lab import WORKLOAD_READY_RE, Lab
from confmig.bench.scenario import SEV_ES_POLICY, sev_args
from confmig.guest.firmware.image import build_firmware_image
from confmig.vmm.qmp.client import QmpCommandError

SEV = sev_args()


def firmware(path: Path) -> str:
    """An image of this guest code (measured and encrypted by the PSP): a vCPU runs no guest
    code whose digest the image in its flash does not carry."""
    path.write_bytes(build_firmware_image())
    return str(path)


def test_sev_guest_launches_and_reports_its_state(lab: Lab) -> None:
    host = lab.host("hostA")
    vm = lab.vm("sev", host, ram="64M", guest="idle",
                extra=[*SEV, "-bios", firmware(lab.root / "fw.bin")])
    vm.wait_console(WORKLOAD_READY_RE)
    info = vm.qmp.execute("query-sev")
    assert info["enabled"] and info["state"] == "running" and info["handle"] > 0
    assert info["policy"] == 1 and info["sev-type"] == "sev"
    caps = vm.qmp.execute("query-sev-capabilities")
    assert caps["cbitpos"] == 51 and len(caps["pdh"]) > 100 and len(caps["cert-chain"]) > 100


def test_sev_guest_that_did_not_enable_migration_is_blocked(lab: Lab) -> None:
    host = lab.host("hostA")
    vm = lab.vm("sev", host, ram="64M", guest="idle,sev_migration=off", extra=SEV)
    vm.wait_console(WORKLOAD_READY_RE)
    blocked = vm.qmp.execute("query-migrate").get("blocked-reasons", [])
    assert blocked == [
        "SEV: the guest has not enabled live migration (MSR_KVM_MIGRATION_CONTROL bit 0 not set)"]
    with pytest.raises(QmpCommandError, match="MSR_KVM_MIGRATION_CONTROL"):
        vm.qmp.execute("migrate", uri="tcp:127.0.0.1:1")
    assert vm.qmp.execute("query-status")["status"] == "running"


def test_plain_guest_has_no_sev(lab: Lab) -> None:
    vm = lab.vm("plain", lab.host("hostA"), ram="64M", guest="idle")
    with pytest.raises(QmpCommandError, match="SEV feature is not available"):
        vm.qmp.execute("query-sev")
    assert vm.qmp.execute("query-sev-capabilities")["cbitpos"] == 51  # the host has a PSP


def test_sev_es_guest_registers_are_out_of_the_hosts_reach(lab: Lab) -> None:
    import errno

    from confmig.common.errors import KvmError
    from confmig.kvm.client import Kvm
    from confmig.proto import ioctl

    host = lab.host("hostA")
    es = sev_args(SEV_ES_POLICY)
    vm = lab.vm("es", host, ram="64M", guest="idle", extra=es)
    vm.wait_console(WORKLOAD_READY_RE)
    assert vm.qmp.execute("query-sev")["sev-type"] == "sev-es"
    # The same ioctls a VMM would use, from a second VM driven here directly.
    kvm = Kvm(host.socket)
    other = kvm.create_vm()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 1 << 20)
    other.set_user_memory_region(ioctl.UserspaceMemoryRegion(
        slot=0, flags=0, guest_phys_addr=0, memory_size=1 << 20, offset=0), fd)
    from confmig.kvm import sev as ksev

    other.memory_encrypt_op(ksev.KVM_SEV_ES_INIT)  # before any vCPU exists, as KVM requires
    vcpu = other.create_vcpu(0)
    vcpu.get_regs()  # readable before the launch seals it

    other.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, 0x5, 0, 0, 0, 0, 0, 0))
    other.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
    with pytest.raises(KvmError) as e:
        vcpu.get_regs()
    assert e.value.errno == errno.EINVAL
