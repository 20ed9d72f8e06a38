"""One live migration between two VMs of a lab, driven over QMP like libvirt would."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confmig.bench.lab import WORKLOAD_READY_RE, Lab, VmProc
from confmig.common.errors import ConfmigError

POLL_INTERVAL = 0.05
MIGRATION_TIMEOUT = 600.0

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationSettings:
    downtime_limit_ms: int = 300
    max_bandwidth: int = 100 << 30
    """Bytes/s; QEMU's default is 128 MiB/s, a demo wants the real speed."""
    channels: int = 1
    """1 = the main channel only; more = the multifd capability."""
    events: bool = True


@dataclass
class MigrationResult:
    status: str
    info: dict[str, Any]
    wall_s: float
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ram(self) -> dict[str, Any]:
        ram: dict[str, Any] = self.info.get("ram", {})
        return ram


def configure(vm: VmProc, s: MigrationSettings) -> None:
    caps = [{"capability": "events", "state": s.events},
            {"capability": "multifd", "state": s.channels > 1}]
    vm.qmp.execute("migrate-set-capabilities", capabilities=caps)
    params: dict[str, Any] = {"downtime-limit": s.downtime_limit_ms, "max-bandwidth": s.max_bandwidth}
    if s.channels > 1:
        params["multifd-channels"] = s.channels
    vm.qmp.execute("migrate-set-parameters", **params)


def incoming_uri(dst: VmProc) -> str:
    """``migrate-incoming tcp:127.0.0.1:0`` then read the port QEMU-style from query-migrate."""
    dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    addrs = dst.qmp.execute("query-migrate").get("socket-address", [])
    if not addrs:
        raise ConfmigError("target did not report its socket address")
    a = addrs[0]
    return f"tcp:{a['host']}:{a['port']}"


def migrate(src: VmProc, dst: VmProc | None, uri: str | None = None, *,
            settings: MigrationSettings = MigrationSettings(),
            progress: Progress = lambda _i: None) -> MigrationResult:
    configure(src, settings)
    if dst is not None:
        configure(dst, settings)
        uri = incoming_uri(dst)
    assert uri is not None
    t0 = time.monotonic()
    src.qmp.execute("migrate", uri=uri)
    deadline = t0 + MIGRATION_TIMEOUT
    while True:
        info = src.qmp.execute("query-migrate")
        progress(info)
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            src.qmp.execute("migrate_cancel")
            raise ConfmigError("migration did not finish in time")
        time.sleep(POLL_INTERVAL)
    wall = time.monotonic() - t0
    if dst is not None and info["status"] == "completed":
        wait_status(dst, "running")
    return MigrationResult(status=info["status"], info=info, wall_s=wall, events=list(src.qmp.events))


def wait_status(vm: VmProc, status: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while vm.qmp.execute("query-status")["status"] != status:
        if time.monotonic() > deadline:
            raise ConfmigError(f"{vm.name} never reached run state {status}")
        time.sleep(0.02)


def wait_guest_ready(vm: VmProc, timeout: float = 120.0) -> None:
    """Wait until the guest workload announced it runs (its first console line)."""
    vm.wait_console(WORKLOAD_READY_RE, timeout=timeout)


def two_hosts(lab: Lab, *, ram: str, guest: str, extra: list[str] | None = None
              ) -> tuple[VmProc, VmProc]:
    a, b = lab.host("hostA"), lab.host("hostB")
    src = lab.vm("src", a, ram=ram, guest=guest, extra=extra)
    dst = lab.vm("dst", b, ram=ram, guest=guest, incoming="defer", extra=extra)
    return src, dst
