"""One live migration between two VMs of a lab, driven over QMP like libvirt would."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confmig.bench.deadline import DeadlineExceeded, StepTimeout
from confmig.bench.lab import FAILED_RUNSTATES, Lab, VmProc
from confmig.common.errors import ConfmigError
from confmig.platform.psp.policy import PolicyFlag

MIGRATION_TIMEOUT = 600.0
"""Seconds one migration may take: a 4 GiB guest through the PSP path takes minutes."""

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationSettings:
    downtime_limit_ms: int = 300
    max_bandwidth: int = 100 << 30
    """Bytes/s; QEMU's default is 128 MiB/s, a demo wants the real speed."""
    channels: int = 1
    """1 = the main channel only; more = the multifd capability."""
    events: bool = True
    sev_target_certs: bool = False
    """Hand the source the target's SEV certificates (``sev-pdh``, ``sev-plat-cert``, from the
    target's ``query-sev-capabilities``) and the AMD chain, as libvirt does for an SEV guest."""
    amd_root: Path = Path()
    """With ``sev_target_certs``: the AMD root directory (the lab's ``amd_root``)."""
    confidential_backend: str = ""
    """``x-confidential-backend`` (empty: the guest's default)."""


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
    if s.confidential_backend:
        params["x-confidential-backend"] = s.confidential_backend
    vm.qmp.execute("migrate-set-parameters", **params)


def incoming_uri(dst: VmProc) -> str:
    """``migrate-incoming tcp:127.0.0.1:0`` then read the port QEMU-style from query-migrate."""
    dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    addrs = dst.qmp.execute("query-migrate").get("socket-address", [])
    if not addrs:
        raise ConfmigError("target did not report its socket address")
    a = addrs[0]
    return f"tcp:{a['host']}:{a['port']}"


def aim_source(src: VmProc, dst: VmProc, settings: MigrationSettings) -> None:
    """Tell the source whom it sends to, as a management layer does: the target's PSP
    certificates (``sev_target_certs``) or its Migration Handler's challenge (``mh``)."""
    if settings.sev_target_certs:
        src.qmp.execute("migrate-set-parameters", **sev_target_certificates(dst, settings.amd_root))
    if settings.confidential_backend == "mh":
        src.qmp.execute("migrate-set-parameters", **mh_target_challenge(dst))


def prepare(src: VmProc, dst: VmProc, settings: MigrationSettings) -> str:
    """Both sides configured, the target listening, the source aimed at it: the URI to migrate to."""
    configure(src, settings)
    configure(dst, settings)
    uri = incoming_uri(dst)
    aim_source(src, dst, settings)
    return uri


def migrate(src: VmProc, dst: VmProc | None, uri: str | None = None, *,
            settings: MigrationSettings = MigrationSettings(),
            progress: Progress = lambda _i: None) -> MigrationResult:
    if dst is not None:
        uri = prepare(src, dst, settings)
    else:
        configure(src, settings)
    assert uri is not None
    t0 = time.monotonic()
    src.qmp.execute("migrate", uri=uri)

    def finished() -> dict[str, Any] | None:
        info: dict[str, Any] = src.qmp.execute("query-migrate")
        progress(info)
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    try:
        info = src.deadline.wait("the migration to finish", finished, timeout=MIGRATION_TIMEOUT)
    except (StepTimeout, DeadlineExceeded):
        with contextlib.suppress(ConfmigError, OSError):
            src.qmp.execute("migrate_cancel")  # the source keeps its guest
        raise
    wall = time.monotonic() - t0
    if dst is not None and info["status"] == "completed":
        wait_status(dst, "running")
    return MigrationResult(status=info["status"], info=info, wall_s=wall, events=list(src.qmp.events))


def sev_target_certificates(dst: VmProc, amd_root: Path) -> dict[str, str]:
    """The migration parameters that tell the source's PSP whom it may send the guest to:
    the target's PDH and platform chain (its ``query-sev-capabilities``) and the AMD chain."""
    from confmig.platform.psp.identity import amd_chain

    caps = dst.qmp.execute("query-sev-capabilities")
    return {"sev-pdh": caps["pdh"], "sev-plat-cert": caps["cert-chain"],
            "sev-amd-cert": base64.b64encode(amd_chain(amd_root)).decode()}


SEV_POLICY = int(PolicyFlag.NODBG)
"""An SEV guest's policy here: no debugging of its memory."""
SEV_ES_POLICY = int(PolicyFlag.NODBG | PolicyFlag.ES)


def sev_args(policy: int = SEV_POLICY, *, owner: str | None = None, extra: str = "") -> list[str]:
    """The command line of an SEV guest (SEV-ES with :data:`SEV_ES_POLICY`), as QEMU spells it;
    ``owner``: the guest owner's key broker that attests the launch."""
    obj = f"sev-guest,id=sev0,policy={policy:#x}" + (f",owner={owner}" if owner else "") + extra
    return ["-object", obj, "-machine", "q35,confidential-guest-support=sev0"]


MH_TARGET_ARGS = ("-fw_cfg", "name=opt/ovmf/PcdSevIsMigrationTarget,string=1")
MH_TARGET_READY = re.compile(rb"Waiting for incoming confidential migration")
"""What an MH target's firmware prints once its Migration Handler is ready."""
"""A Migration Handler target: launched and attested like any SEV guest, its firmware runs
only the MH until the stream arrives (the 2021 RFC's fw_cfg name)."""


def mh_args(mh_vcpus: int, vcpus: int = 1) -> list[str]:
    """``-smp`` with Migration Handler vCPUs (a mirror VM)."""
    return ["-smp", f"{vcpus},mirrorvcpus={mh_vcpus}"]


def mh_guest_args(lab: Lab, mh_vcpus: int = 1, *, key: bytes | None = None,
                  secrets: tuple[tuple[uuid.UUID, bytes], ...] = (),
                  audit: Callable[[Mapping[str, object]], None] | None = None,
                  policy: int = SEV_POLICY) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The command lines of an SEV guest (SEV-ES with :data:`SEV_ES_POLICY`) with MH vCPUs and
    of its MH target: both launched by one owner (started here), who gives both the same
    transport key (``key``, or a fresh one)."""
    from confmig.owner import MIGRATION_TRANSPORT_KEY_GUID

    owner = lab.owner(firmware=lab.bios, policy=policy, audit=audit, mh_vcpus=mh_vcpus,
                      secrets=[*secrets, (MIGRATION_TRANSPORT_KEY_GUID, key or os.urandom(32))])
    source = (*sev_args(policy, owner=owner.url), *mh_args(mh_vcpus))
    return source, (*source, *MH_TARGET_ARGS)


def mh_target_challenge(dst: VmProc) -> dict[str, str]:
    """The source's parameter naming the target MH it may complete on, read from the target as
    a management layer would (once the target's firmware is ready)."""
    info = dst.qmp.execute("x-query-migration-handler")
    return {"x-mh-target-challenge": str(info["target-challenge"])}


def wait_status(vm: VmProc, status: str, timeout: float = 30.0) -> None:
    """Wait for run state ``status``; a VM that fails first ends the wait."""

    def reached() -> bool | None:
        if vm.proc.poll() is not None:
            raise vm.fail(f"its VMM exited with {vm.proc.returncode}")
        now = vm.qmp.execute("query-status")["status"]
        if now in FAILED_RUNSTATES and now != status:
            raise vm.fail(f"run state {now}")
        return True if now == status else None

    vm.deadline.wait(f"{vm.name} to reach run state {status}", reached, timeout=timeout)
