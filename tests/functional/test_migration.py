"""Live migration end to end: real hosts, real VMMs, real guests, driven over QMP.

Every test migrates a guest running the ``dirty`` workload, whose self-check
(an NMI; ``confmig-selfcheck: PASS|FAIL`` on the console) verifies every page
it ever wrote: its GPA, its version against the guest's own version table and
a checksum. A page lost, stale or misplaced by the migration fails it.

The self-check cannot see the loss of *every* write after some instant (the
guest's own state page is lost with them, so the older memory is consistent).
So wherever both guests can be held still (the source in ``postmigrate``, the
target kept paused after loading), the two VMMs' RAM is also compared byte for
byte before the target is let run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from confmig.bench.lab import SELFCHECK_RE, WORKING_SET_WRITTEN, HostProc, Lab, VmProc, confmig_argv
from confmig.bench.scenario import MigrationSettings, configure, incoming_uri

BIOS = 64 * 1024
"""The built-in firmware image: a RAM block of its own (``pc.bios``), migrated as in QEMU."""

MiB = 1 << 20
PAGE = 4096
FINISHED = ("completed", "failed", "cancelled")
TIMEOUT = 60.0

WSS_PAGES_BIG = 16384
BIG_GUEST = f"dirty,rate=2000,wss={WSS_PAGES_BIG * PAGE // MiB}M,fill=random,prefill=on"
"""256 MiB guest: 64 MiB of random pages written up front, then 2000 pages/s."""
WSS_PAGES_SMALL = 4096
SMALL_GUEST = f"dirty,rate=2000,wss={WSS_PAGES_SMALL * PAGE // MiB}M,fill=random,prefill=on"
"""128 MiB guest: 16 MiB working set."""

PREFILLED = re.compile(rb"dirty: working set written \((\d+) pages\)")
SELFCHECK = re.compile(r"confmig-selfcheck: (PASS|FAIL) pages=(\d+) writes=(\d+)")


# --- helpers -------------------------------------------------------------------------------


def start_guest(lab: Lab, name: str, host: HostProc, ram: str, guest: str) -> VmProc:
    """A running VM whose working set is fully written (so RAM holds real data)."""
    vm = lab.vm(name, host, ram=ram, guest=guest)
    vm.wait_console(PREFILLED, timeout=TIMEOUT)
    return vm


def target(lab: Lab, name: str, host: HostProc, ram: str, guest: str, incoming: str = "defer",
           extra: list[str] | None = None) -> VmProc:
    return lab.vm(name, host, ram=ram, guest=guest, incoming=incoming, extra=extra)


def wait_migration(vm: VmProc, states: tuple[str, ...] = FINISHED, timeout: float = TIMEOUT
                   ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = vm.qmp.execute("query-migrate")
        if info.get("status") in states:
            return info
        assert time.monotonic() < deadline, f"{vm.name}: migration stuck at {info}"
        time.sleep(0.02)


def runstate(vm: VmProc) -> str:
    status: str = vm.qmp.execute("query-status")["status"]
    return status


def wait_runstate(vm: VmProc, state: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (now := runstate(vm)) != state:
        assert time.monotonic() < deadline, f"{vm.name} is {now}, never {state}"
        time.sleep(0.02)


def migration_statuses(vm: VmProc, last: str, timeout: float = 10.0) -> list[str]:
    """The ``MIGRATION`` event statuses this VM sent, once ``last`` has arrived. An event
    may trail the status change that query-migrate already shows: poll for it."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [e["data"]["status"] for e in vm.qmp.events if e["event"] == "MIGRATION"]
        if last in statuses or time.monotonic() > deadline:
            return statuses
        vm.qmp.execute("query-status")  # reads whatever events arrived meanwhile
        time.sleep(0.02)


def event_names(vm: VmProc) -> list[str]:
    return [str(e["event"]) for e in vm.qmp.events]


def selfcheck(vm: VmProc) -> tuple[int, int]:
    """Run the guest's self-check; it must PASS. Returns (pages checked, pages written)."""
    line = vm.selfcheck(timeout=TIMEOUT)
    m = SELFCHECK.match(line)
    assert m is not None and m.group(1) == "PASS", f"{vm.name}: {line}"
    return int(m.group(2)), int(m.group(3))


def guest_ram(vm: VmProc) -> Path:
    """The VMM's guest RAM memfd (``confmig:pc.ram``), reachable as /proc/PID/fd/N."""
    fds = Path(f"/proc/{vm.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:confmig:pc.ram"):
                return fd
        except OSError:
            continue
    raise AssertionError(f"{vm.name}: no guest RAM memfd among {fds}")


FULL_SPEED = MigrationSettings()


def assert_same_ram(src: VmProc, dst: VmProc) -> None:
    """Both VMMs' guest RAM, compared page by page. Only meaningful while neither guest
    can write: the source in ``postmigrate``, the target paused after loading (``-S``,
    or ``stop`` while ``inmigrate``, as in QEMU). The RAM is a memfd; Linux lets the
    parent of the VMM open it as /proc/PID/fd/N."""
    assert runstate(src) == "postmigrate"
    assert runstate(dst) == "paused"
    chunk = 16 * MiB
    nonzero_pages = 0
    with guest_ram(src).open("rb") as a, guest_ram(dst).open("rb") as b:
        offset = 0
        while x := a.read(chunk):
            y = b.read(chunk)
            assert len(x) == len(y), "the RAM sizes differ"
            pa = np.frombuffer(x, np.uint8).reshape(-1, PAGE)
            if x != y:
                pb = np.frombuffer(y, np.uint8).reshape(-1, PAGE)
                bad = np.flatnonzero((pa != pb).any(axis=1))
                raise AssertionError(f"{len(bad)} pages differ, the first at offset "
                                     f"{offset + int(bad[0]) * PAGE:#x}")
            nonzero_pages += int(pa.any(axis=1).sum())
            offset += len(x)
        assert b.read(1) == b"", "the RAM sizes differ"
    assert nonzero_pages >= WSS_PAGES_SMALL  # the comparison covered real data


def resume(dst: VmProc) -> None:
    """``cont`` a target kept paused after loading (it must not have run before)."""
    assert "RESUME" not in event_names(dst)
    dst.qmp.execute("cont")
    assert runstate(dst) == "running"


def live_migrate(src: VmProc, dst: VmProc, settings: MigrationSettings = FULL_SPEED) -> dict[str, Any]:
    configure(src, settings)
    configure(dst, settings)
    src.qmp.execute("migrate", uri=incoming_uri(dst))
    return wait_migration(src)


def confmig_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(confmig_argv(*args), capture_output=True, text=True, timeout=60)


# --- tests ---------------------------------------------------------------------------------


def test_live_migration_over_tcp_of_a_guest_dirtying_memory(
    lab: Lab, hosts: tuple[HostProc, HostProc]
) -> None:
    src = start_guest(lab, "src", hosts[0], "256M", BIG_GUEST)
    dst = target(lab, "dst", hosts[1], "256M", BIG_GUEST)

    info = live_migrate(src, dst)

    assert info["status"] == "completed", info
    assert runstate(src) == "postmigrate"
    wait_runstate(dst, "running")
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_BIG  # every page of the working set was checked

    ram = info["ram"]
    assert ram["total"] == 256 * MiB + BIOS  # QEMU counts the firmware's RAM block too
    assert ram["normal"] + ram["duplicate"] >= (256 * MiB + BIOS) // PAGE  # every page went at least once
    assert ram["normal"] >= WSS_PAGES_BIG  # the random working set cannot travel as zero pages
    assert ram["normal-bytes"] == ram["normal"] * PAGE
    assert ram["transferred"] > ram["normal"] * PAGE  # pages plus their headers
    assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
    assert ram["remaining"] == 0
    assert ram["dirty-sync-count"] >= 2
    assert ram["multifd-bytes"] == 0
    assert 0 <= info["downtime"] <= info["total-time"]
    assert 0 <= info["setup-time"] <= info["total-time"]

    assert migration_statuses(src, "completed") == ["setup", "active", "device", "completed"]
    passes = [e["data"]["pass"] for e in src.qmp.events if e["event"] == "MIGRATION_PASS"]
    assert passes and passes == sorted(set(passes)), passes
    assert "STOP" in event_names(src)  # the switch-over stopped the source's vCPUs
    assert migration_statuses(dst, "completed") == ["setup", "active", "completed"]
    dst_info = wait_migration(dst)
    assert dst_info["status"] == "completed"
    assert dst_info["ram"]["normal"] == ram["normal"]  # the target landed what was sent
    assert dst_info["ram"]["duplicate"] == ram["duplicate"]

    # The target guest goes on dirtying memory where the source left off.
    _pages, writes_before = selfcheck(dst)
    time.sleep(0.3)
    _pages, writes_after = selfcheck(dst)
    assert writes_after > writes_before


def test_target_ram_equals_source_ram_byte_for_byte(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """Live, the guest dirtying memory all along: the target's RAM is the source's."""
    src = start_guest(lab, "src", hosts[0], "128M", SMALL_GUEST)
    dst = target(lab, "dst", hosts[1], "128M", SMALL_GUEST)
    dst.qmp.execute("stop")  # QEMU: the target stays paused after loading

    info = live_migrate(src, dst)

    assert info["status"] == "completed", info
    assert wait_migration(dst)["status"] == "completed"
    assert_same_ram(src, dst)
    resume(dst)
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_SMALL


def test_multifd_with_two_channels(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "256M", BIG_GUEST)
    dst = target(lab, "dst", hosts[1], "256M", BIG_GUEST)
    dst.qmp.execute("stop")

    info = live_migrate(src, dst, MigrationSettings(channels=2))

    assert info["status"] == "completed", info
    caps = {c["capability"]: c["state"] for c in dst.qmp.execute("query-migrate-capabilities")}
    assert caps["multifd"] is True
    assert dst.qmp.execute("query-migrate-parameters")["multifd-channels"] == 2
    ram = info["ram"]
    assert ram["multifd-bytes"] >= WSS_PAGES_BIG * PAGE  # the pages went on the multifd channels
    assert ram["normal"] >= WSS_PAGES_BIG
    assert wait_migration(dst)["status"] == "completed"
    assert_same_ram(src, dst)  # no page overtook its newer copy on another channel
    resume(dst)
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_BIG


def test_cancel_mid_way_leaves_the_source_running(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "256M", BIG_GUEST)
    dst = target(lab, "dst", hosts[1], "256M", BIG_GUEST)
    slow = MigrationSettings(max_bandwidth=20_000_000)  # 64 MiB of pages: more than 3 s
    configure(src, slow)
    configure(dst, slow)
    src.qmp.execute("migrate", uri=incoming_uri(dst))
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = src.qmp.execute("query-migrate")
        if info["status"] == "active" and info["ram"]["transferred"] >= 4 * MiB:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    assert info["ram"]["transferred"] < WSS_PAGES_BIG * PAGE  # really mid-way

    src.qmp.execute("migrate_cancel")

    assert wait_migration(src)["status"] == "cancelled"
    assert migration_statuses(src, "cancelled") == ["setup", "active", "cancelling", "cancelled"]
    assert runstate(src) == "running"
    pages, writes_before = selfcheck(src)
    assert pages == WSS_PAGES_BIG
    time.sleep(0.3)
    _pages, writes_after = selfcheck(src)
    assert writes_after > writes_before  # the guest makes progress

    dst_info = wait_migration(dst)
    assert dst_info["status"] == "failed"
    assert runstate(dst) == "inmigrate"  # a half-loaded guest never runs
    assert "RESUME" not in event_names(dst)

    # Nothing was lost by the cancelled attempt: a second one to a fresh target completes.
    dst2 = target(lab, "dst2", hosts[1], "256M", BIG_GUEST)
    info = live_migrate(src, dst2)
    assert info["status"] == "completed", info
    wait_runstate(dst2, "running")
    pages, writes = selfcheck(dst2)
    assert pages == WSS_PAGES_BIG and writes >= writes_after


def test_save_to_file_analyze_and_restore(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "128M", SMALL_GUEST)
    path = lab.root / "saved.mig"
    configure(src, MigrationSettings())
    src.qmp.execute("migrate", uri=f"file:{path}")

    info = wait_migration(src)

    assert info["status"] == "completed", info
    assert runstate(src) == "postmigrate"
    assert migration_statuses(src, "completed") == ["setup", "active", "device", "completed"]
    assert info["ram"]["transferred"] == path.stat().st_size  # every byte counted

    text = confmig_cli("analyze", str(path))
    assert text.returncode == 0, text.stderr
    assert "stream version 3" in text.stdout
    assert f"normal pages: {info['ram']['normal']:,}" in text.stdout

    done = confmig_cli("analyze", "--json", str(path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["size"] == path.stat().st_size
    assert report["version"] == 3
    sections = {s["idstr"]: s for s in report["sections"]}
    assert sections["ram"]["full"] is False
    assert sections["ram"]["parts"] >= 3  # START, at least one PART, END
    assert sections["cpu"]["full"] is True
    assert report["ram"]["blocks"] == {"pc.ram": 128 * MiB, "pc.bios": BIOS}
    assert report["ram"]["pages"] == info["ram"]["normal"]
    assert report["ram"]["zero_pages"] == info["ram"]["duplicate"]
    assert report["ram"]["pages"] >= WSS_PAGES_SMALL
    devices = {d["idstr"] for d in report["devices"]}
    assert {"cpu", "serial", "fw_cfg"} <= devices
    assert report["vmdescription"] is not None

    dst = target(lab, "dst", hosts[1], "128M", SMALL_GUEST, incoming=f"file:{path}", extra=["-S"])
    assert wait_migration(dst)["status"] == "completed"
    assert_same_ram(src, dst)
    resume(dst)
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_SMALL


def test_exec_transport(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "128M", SMALL_GUEST)
    path = lab.root / "exec.mig"
    src.qmp.execute("migrate", uri=f"exec:cat > {path}")
    info = wait_migration(src)
    assert info["status"] == "completed", info
    assert runstate(src) == "postmigrate"
    assert path.stat().st_size == info["ram"]["transferred"]

    dst = target(lab, "dst", hosts[1], "128M", SMALL_GUEST)  # -incoming defer
    dst.qmp.execute("stop")
    dst.qmp.execute("migrate-incoming", uri=f"exec:cat {path}")
    assert wait_migration(dst)["status"] == "completed"
    assert_same_ram(src, dst)
    resume(dst)
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_SMALL


def test_unix_transport(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "128M", SMALL_GUEST)
    sock = str(lab.root / "migrate.sock")
    dst = target(lab, "dst", hosts[1], "128M", SMALL_GUEST, incoming=f"unix:{sock}", extra=["-S"])
    listening = dst.qmp.execute("query-migrate")
    assert listening["socket-address"] == [{"type": "unix", "path": sock}]

    src.qmp.execute("migrate", uri=f"unix:{sock}")

    assert wait_migration(src)["status"] == "completed"
    assert wait_migration(dst)["status"] == "completed"
    assert_same_ram(src, dst)
    resume(dst)
    pages, _writes = selfcheck(dst)
    assert pages == WSS_PAGES_SMALL
    assert not os.path.exists(sock)  # the target removed its listening socket


def test_an_nmi_injected_into_a_paused_vm_waits_for_cont(lab: Lab) -> None:
    # As QEMU: inject-nmi on a paused VM is accepted and the vCPU takes the NMI when it runs
    # (the attack harness checks a target that arrived paused this way, before it runs).
    vm = lab.vm("nmi", lab.host("hostA"), ram="64M", guest="dirty,rate=300,wss=2M,prefill=on")
    vm.wait_console(WORKING_SET_WRITTEN)
    vm.qmp.execute("stop")
    mark = len(vm.console_text())
    vm.qmp.execute("inject-nmi")
    time.sleep(0.5)
    assert SELFCHECK_RE.search(vm.console_text()[mark:]) is None  # paused: nothing ran
    vm.qmp.execute("cont")
    verdict = vm.wait_console(SELFCHECK_RE, after=mark, timeout=30).group(0).decode()
    assert verdict.startswith("confmig-selfcheck: PASS"), verdict
