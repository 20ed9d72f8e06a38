"""One intra-host hand-over (``cpr-transfer``): a new VMM process takes over a running guest.

Driven over QMP as QEMU 10 documents it: the new VMM starts with the old one's
options plus two ``-incoming`` (the main channel and a ``cpr`` channel, both
UNIX sockets) and waits on the cpr channel; the old VMM gets
``migrate-set-parameters mode=cpr-transfer`` and a ``migrate`` naming both
channels. The new VMM opens its monitor once it has the guest's descriptors,
so it is connected to only after the ``migrate``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from confmig.bench.lab import START_TIMEOUT, Lab, VmProc, VmSpec
from confmig.bench.scenario import MIGRATION_TIMEOUT, MigrationResult, wait_status
from confmig.common.errors import ConfmigError


def channel(kind: str, path: Path | str) -> dict[str, Any]:
    """QEMU's ``MigrationChannel`` for a unix socket."""
    return {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": str(path)}}


def new_vmm_spec(lab: Lab, spec: VmSpec) -> tuple[VmSpec, Path, Path]:
    """``spec`` (the old VMM's options under a new name) as a new VMM waiting for a hand-over:
    with its main and cpr ``-incoming`` channels, whose paths come back too."""
    main, cpr = lab.root / f"{spec.name}.main.sock", lab.root / f"{spec.name}.cpr.sock"
    extra = (*spec.extra, "-incoming", f"unix:{main}", "-incoming", json.dumps(channel("cpr", cpr)))
    return replace(spec, extra=extra), main, cpr


def begin_hand_over(lab: Lab, src: VmProc, spec: VmSpec, *, events: bool = True,
                    main_via: Path | None = None) -> tuple[VmProc | None, float]:
    """Start a new VMM from ``spec`` and issue ``src``'s ``migrate`` to it; return the new VMM
    once it serves QMP (None if it failed first) and when ``migrate`` was issued. ``main_via``:
    a socket the old VMM connects its main channel to instead (a relay of a test)."""
    spec, main, cpr = new_vmm_spec(lab, spec)
    src.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": events}])
    src.qmp.execute("migrate-set-parameters", mode="cpr-transfer")
    issued: dict[str, Any] = {}

    def migrate() -> None:
        """Once the new VMM listens on its cpr channel: the old one's ``migrate``. (A thread of
        its own: the new VMM is started by this one, the thread it dies with.)"""
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not cpr.exists():
                if time.monotonic() > deadline:
                    raise ConfmigError(f"{spec.name} never listened on its cpr channel {cpr}")
                time.sleep(0.005)
            issued["t0"] = time.monotonic()
            src.qmp.execute("migrate", channels=[channel("main", main_via or main), channel("cpr", cpr)])
        except BaseException as exc:  # surfaced below
            issued["error"] = exc

    thread = threading.Thread(target=migrate, name=f"migrate-to-{spec.name}", daemon=True)
    thread.start()
    dst: VmProc | None = None
    with contextlib.suppress(ConfmigError):  # a new VMM that failed: the migration says why
        dst = lab.start_vms(spec)[0]
    thread.join(START_TIMEOUT)
    if "error" in issued:
        raise issued["error"]
    return dst, issued["t0"]


def wait_hand_over(src: VmProc, t0: float) -> MigrationResult:
    """The old VMM's view of the hand-over, once it ended."""

    def finished() -> dict[str, Any] | None:
        info: dict[str, Any] = src.qmp.execute("query-migrate")
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    info = src.deadline.wait("the hand-over to finish", finished, timeout=MIGRATION_TIMEOUT, interval=0.01)
    return MigrationResult(status=info["status"], info=info, wall_s=time.monotonic() - t0,
                           events=list(src.qmp.events))


def hand_over(lab: Lab, src: VmProc, spec: VmSpec, *, events: bool = True,
              wait_running: bool = True) -> tuple[VmProc | None, MigrationResult]:
    """Start a new VMM from ``spec`` and hand it ``src``'s guest; return it (None if it never
    served QMP) and the old VMM's view of the migration."""
    dst, t0 = begin_hand_over(lab, src, spec, events=events)
    result = wait_hand_over(src, t0)
    if dst is not None and result.status == "completed" and wait_running:
        wait_status(dst, "running")
    return dst, result
