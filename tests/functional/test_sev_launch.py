"""An SEV guest launched through the emulated PSP, driven by the VMM as QEMU would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from confmig.bench.lab import WORKLOAD_READY_RE, Lab
from confmig.vmm.qmp.client import QmpCommandError

SEV = ["-object", "sev-guest,id=sev0,policy=0x1", "-machine", "q35,confidential-guest-support=sev0"]


def firmware(path: Path) -> str:
    path.write_bytes(os.urandom(64 * 1024))  # any image: measured and encrypted by the PSP
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


def test_sev_guest_is_blocked_from_migrating(lab: Lab) -> None:
    host = lab.host("hostA")
    vm = lab.vm("sev", host, ram="64M", guest="idle", extra=SEV)
    vm.wait_console(WORKLOAD_READY_RE)
    blocked = vm.qmp.execute("query-migrate").get("blocked-reasons", [])
    assert any("MSR_KVM_MIGRATION_CONTROL" in b for b in blocked)
    assert any("confidential migration backend" in b for b in blocked)
    with pytest.raises(QmpCommandError, match="MSR_KVM_MIGRATION_CONTROL"):
        vm.qmp.execute("migrate", uri="tcp:127.0.0.1:1")
    assert vm.qmp.execute("query-status")["status"] == "running"


def test_plain_guest_has_no_sev(lab: Lab) -> None:
    vm = lab.vm("plain", lab.host("hostA"), ram="64M", guest="idle")
    with pytest.raises(QmpCommandError, match="SEV feature is not available"):
        vm.qmp.execute("query-sev")
    assert vm.qmp.execute("query-sev-capabilities")["cbitpos"] == 51  # the host has a PSP
