"""SEV guests end to end: the owner's attested launch, what the host can see, the
three-way migration negotiation, and ciphertext bound to its host.

Every VM here is a real ``confmig vm`` process on a real ``confmig host``; the
guest owner's key broker runs in this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping

import pytest
from procmem import process_memory
from relay import Relay

from confmig.bench.firmware import default_bios
from confmig.bench.lab import SELFCHECK_RE, WORKING_SET_WRITTEN, WORKLOAD_READY_RE, HostProc, Lab, VmProc
from confmig.bench.scenario import (
    SEV_ES_POLICY,
    SEV_POLICY,
    MigrationSettings,
    configure,
    incoming_uri,
    migrate,
    sev_args,
)
from confmig.common.errors import ConfmigError
from confmig.owner import DISK_PASSPHRASE_GUID

KERNEL_SEV_RE = re.compile(rb"confmig kernel: SEV: live migration (allowed|not allowed)[^\n]*")
BLOCKER_MSR = "MSR_KVM_MIGRATION_CONTROL"
PRIVATE_MAGICS = (b"CMKERN01", b"CMBOOT01", b"CMVARS01")
"""The magics of the kernel data page, the boot info and the variable store: all three
live in private pages of an SEV guest, so the host must never see them in plaintext."""


def vmm_pid(vm: VmProc) -> int:
    """The VMM's pid: ``confmig vm`` runs the VMM in its own process."""
    return vm.proc.pid


def test_the_host_never_sees_the_owners_secret_the_guests_private_pages_or_a_key(
        lab: Lab, captured_keys: list[bytes]) -> None:
    host = lab.host("hostA")
    passphrase = os.urandom(32)
    verdicts: list[Mapping[str, object]] = []
    owner = lab.owner(firmware=default_bios(), policy=SEV_POLICY,
                      secrets=[(DISK_PASSPHRASE_GUID, passphrase)],
                      audit=verdicts.append)
    proxy = Relay(owner.server_address[:2])  # type: ignore[arg-type]
    try:
        vm = lab.vm("sev", host, ram="64M", guest="dirty,rate=500,wss=4M,prefill=on",
                    extra=sev_args(owner=proxy.url))
        vm.wait_console(WORKING_SET_WRITTEN)
        console = vm.console_text()
        assert b"launch secret: 1 entr" in console  # the guest found the owner's secret ...
        assert [v["event"] for v in verdicts] == ["launch", "released"]
        assert len(captured_keys) == 2 and len(proxy.seen) > 10_000  # ... carried through the proxy
        canaries = [passphrase, *captured_keys, *PRIVATE_MAGICS]

        for region in process_memory(vmm_pid(vm)):  # the VMM, guest RAM mappings included
            for canary in canaries:
                assert canary not in region, f"VMM memory holds {canary[:8]!r}"
        for path in lab.root.rglob("*"):  # what the VMM and host wrote: consoles, logs
            if path.is_file() and not path.is_relative_to(lab.amd_root):
                data = path.read_bytes()
                for canary in (passphrase, *captured_keys):
                    assert canary not in data, f"{path.name} holds a secret"
        for canary in canaries:
            assert canary not in proxy.seen, "the owner's traffic carries plaintext"
        assert vm.selfcheck().startswith("confmig-selfcheck: PASS")  # and the guest is fine
    finally:
        proxy.close()


def test_a_launch_the_owner_does_not_expect_gets_nothing(lab: Lab) -> None:
    host = lab.host("hostA")
    other = lab.root / "other.fd"
    other.write_bytes(os.urandom(64 * 1024))
    verdicts: list[Mapping[str, object]] = []
    owner = lab.owner(firmware=other, policy=SEV_POLICY,
                      secrets=[(DISK_PASSPHRASE_GUID, b"x" * 16)],
                      audit=verdicts.append)
    with pytest.raises(ConfmigError, match="exited"):
        vm = lab.vm("wrong-fw", host, ram="64M", extra=sev_args(owner=owner.url))
        vm.wait_console(WORKLOAD_READY_RE, timeout=30)
    with pytest.raises(ConfmigError, match="exited"):
        vm = lab.vm("wrong-policy", host, ram="64M", extra=sev_args(0x3, owner=owner.url))
        vm.wait_console(WORKLOAD_READY_RE, timeout=30)
    log = (lab.root / "processes.log").read_text()
    assert "guest owner refused: launch measurement does not match" in log
    assert "guest owner refused: VM 'wrong-policy': policy 0x3 is not the configured policy" in log
    assert [v["event"] for v in verdicts] == ["launch", "refused", "launch-refused"]


@pytest.mark.parametrize("missing, args, guest", [
    (None, [], "idle"),
    ("hypervisor", ["-cpu", "host,-kvm-migration-control"], "idle"),
    ("firmware", ["-fw_cfg", "name=opt/confmig/no-migration,string=1"], "idle"),
    ("kernel", [], "idle,sev_migration=off"),
])
def test_three_way_negotiation(lab: Lab, missing: str | None, args: list[str], guest: str) -> None:
    vm = lab.vm("neg", lab.host("hostA"), ram="64M", guest=guest, extra=[*sev_args(), *args])
    verdict = vm.wait_console(KERNEL_SEV_RE, timeout=30).group(0).decode()
    blocked = vm.qmp.execute("query-migrate").get("blocked-reasons", [])
    if missing is None:
        assert "live migration allowed" in verdict
        assert not any(BLOCKER_MSR in b for b in blocked)
    else:
        assert "not allowed" in verdict and missing in verdict
        assert any(BLOCKER_MSR in b for b in blocked)


def test_plain_copy_of_sev_ram_leaves_the_target_guest_with_garbage(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """TEST ONLY switch x-plain-copy: the RAM goes as the host sees it. The target's own
    launch gives it another key, and ciphertext is bound to key and address."""
    a, b = hosts
    plain_copy = sev_args(extra=",x-plain-copy=on")
    src = lab.vm("src", a, ram="64M", guest="dirty,rate=200,wss=2M,prefill=on", extra=plain_copy)
    dst = lab.vm("dst", b, ram="64M", guest="dirty,rate=200,wss=2M,prefill=on", incoming="defer",
                 extra=plain_copy)
    src.wait_console(WORKING_SET_WRITTEN)
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")
    settings = MigrationSettings(downtime_limit_ms=300)
    configure(dst, settings)
    result = migrate(src, None, incoming_uri(dst), settings=settings)
    assert result.status == "completed"
    assert _target_outcome(dst) != "PASS", "the target read the source's private pages: no binding"


def _target_outcome(vm: VmProc) -> str:
    """``PASS``/``FAIL`` from the target guest's self-check, or the fault that stopped it first:
    its first VMRUN (the flash, the source's ciphertext, holds no image under the target's key)
    or its kernel (a data page lost its magic)."""
    deadline = time.monotonic() + 30
    while vm.qmp.execute("query-status")["status"] == "inmigrate" and time.monotonic() < deadline:
        time.sleep(0.05)
    mark = len(vm.console_text())
    with contextlib.suppress(ConfmigError):
        vm.qmp.execute("inject-nmi")
        return vm.wait_console(SELFCHECK_RE, after=mark, timeout=10).group(1).decode()
    status = vm.qmp.execute("query-status")["status"]
    log = (vm.console.parent / "processes.log").read_text()
    faults = ("kernel: data page lost its magic", "VMRUN refused: the flash at 0xffff0000 holds no firmware")
    assert status in ("shutdown", "internal-error") and any(f in log for f in faults), status
    return status


def test_sev_es_guest_runs_a_workload_in_private_memory(lab: Lab) -> None:
    vm = lab.vm("es", lab.host("hostA"), ram="64M", guest="dirty,rate=500,wss=2M,prefill=on",
                extra=sev_args(SEV_ES_POLICY))
    vm.wait_console(WORKING_SET_WRITTEN)
    for region in process_memory(vmm_pid(vm)):
        for magic in PRIVATE_MAGICS:
            assert magic not in region
    assert vm.selfcheck().startswith("confmig-selfcheck: PASS")


def test_kv_serves_from_an_sev_guest_through_its_shared_ring(lab: Lab) -> None:
    from confmig.bench.kv_client import KvClient

    sock = str(lab.root / "kv.sock")
    vm = lab.vm("kv", lab.host("hostA"), ram="64M", guest="kv",
                extra=[*sev_args(), "-device", f"confmig-kv,path={sock}"])
    vm.wait_console(WORKLOAD_READY_RE)
    client = KvClient(sock)
    client.put(b"canary-key", b"canary-value")
    assert client.get(b"canary-key") == b"canary-value"
    shared = vm.qmp.execute("x-query-sev-shared-regions")
    assert {"start": 0x1000, "size": 0x1000} in shared  # the fw_cfg bounce buffer
    assert len(shared) >= 2 and all(r["start"] < 64 << 20 for r in shared)  # and the kv ring
    # The host's view of guest RAM (the VMM's mapping of the pc.ram memfd): the value is
    # there in the clear only inside the shared ring, never in the private hash table.
    ram = guest_ram(vmm_pid(vm))
    hits = [m.start() for m in re.finditer(b"canary-value", ram)]
    assert hits, "the ring (shared) should carry the value in the clear"
    for gpa in hits:
        assert any(r["start"] <= gpa < r["start"] + r["size"] for r in shared), f"private {gpa:#x} in clear"


def guest_ram(pid: int) -> bytes:
    """Guest RAM below 3 GiB as the VMM maps it (GPA = offset in the ``pc.ram`` block)."""
    with open(f"/proc/{pid}/maps") as maps:
        lines = [line for line in maps if "confmig:pc.ram" in line]
    start, end = (int(x, 16) for x in lines[0].split()[0].split("-"))
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(start)
        return mem.read(end - start)


def test_an_sev_es_launch_is_attested_with_its_vmsas(lab: Lab) -> None:
    """The owner expects the firmware and then each vCPU's reset VMSA (LAUNCH_UPDATE_VMSA)."""
    host = lab.host("hostA")
    verdicts: list[Mapping[str, object]] = []
    owner = lab.owner(firmware=default_bios(), policy=SEV_ES_POLICY,
                      secrets=[(DISK_PASSPHRASE_GUID, b"k" * 32)],
                      audit=verdicts.append, vcpus=2)
    vm = lab.vm("es", host, ram="64M", extra=[*sev_args(SEV_ES_POLICY, owner=owner.url), "-smp", "2"])
    vm.wait_console(WORKLOAD_READY_RE)
    assert b"launch secret: 1 entry" in vm.console_text()
    assert [v["event"] for v in verdicts] == ["launch", "released"]
