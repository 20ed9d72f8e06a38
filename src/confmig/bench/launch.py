"""``confmig launch``: an attested SEV launch, end to end, on one emulated host.

The guest owner's key broker runs in this process and expects the built-in
firmware image and the chosen policy. The VMM (a ``confmig vm`` process) asks
it for a launch session for its platform, launches the guest through the PSP,
sends LAUNCH_MEASURE's result back and, if the owner accepts it, injects the
owner's secret with LAUNCH_SECRET. The guest's firmware then reports what it
found in its secret area, and its kernel whether it allows live migration (the
three-way negotiation). ``--wrong-firmware`` makes the owner expect another
image, to show that a launch it does not recognise gets nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench.deadline import LAUNCH_TIMEOUT, Deadline, DeadlineExceeded, StepTimeout
from confmig.bench.lab import WORKLOAD_STARTED, GuestFailed, Lab, VmProc, check_host_memory, check_vm
from confmig.bench.scenario import SEV_ES_POLICY, SEV_POLICY, sev_args
from confmig.common.errors import ConfigError, ConfmigError
from confmig.owner import DISK_PASSPHRASE_GUID

READY_TIMEOUT = 60.0
"""Seconds for an attested launch to reach the workload (certificates, session, measurement)."""

FIRMWARE_SEV_RE = re.compile(rb"confmig firmware [^\n]*\b(SEV(?:-ES)?) \(C-bit (\d+)\)")
SECRET_RE = re.compile(rb"confmig firmware: launch secret: ([^\n]*)")
KERNEL_SEV_RE = re.compile(rb"confmig kernel: SEV: ([^\n]*)")


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchOptions:
    sev_es: bool = False
    ram: str = "256M"
    guest: str = "idle"
    wrong_firmware: bool = False
    keep: bool = False
    timeout: float = LAUNCH_TIMEOUT
    """Seconds for the whole launch."""

    @property
    def policy(self) -> int:
        return SEV_ES_POLICY if self.sev_es else SEV_POLICY

    def check(self) -> None:
        """Refuse, before anything starts and saying what to change, what the VM would refuse
        or where its guest would halt."""
        if not self.timeout > 0:
            raise ConfigError(f"--timeout {self.timeout:g}: a positive number of seconds")
        try:
            config = check_vm(self.ram, self.guest, tuple(sev_args(self.policy)))
        except ConfigError as exc:
            raise ConfigError(f"--ram {self.ram} --guest {self.guest}: {exc}") from None
        check_host_memory(config.ram_size, f"--ram {self.ram}")


def run_launch(opts: LaunchOptions, *, as_json: bool = False) -> bool:
    """Launch one attested SEV guest and report. True if the owner decided as it should: released
    its secret to the expected firmware, or (``wrong_firmware``) refused the other one."""
    opts.check()
    console = Console(stderr=as_json)
    with Lab(keep=opts.keep, deadline=Deadline(opts.timeout)) as lab:
        console.print(f"[bold]confmig launch[/]: one emulated host in {lab.root}")
        host = lab.host("hostA")
        bios = lab.bios
        expected = bios
        if opts.wrong_firmware:
            expected = lab.root / "other-firmware.fd"
            expected.write_bytes(os.urandom(len(bios.read_bytes())))
        passphrase = os.urandom(32)
        verdicts: list[Mapping[str, object]] = []
        owner = lab.owner(firmware=expected, policy=opts.policy, secrets=[(DISK_PASSPHRASE_GUID, passphrase)],
                          audit=verdicts.append)
        digest = owner.broker.profile("sev").expected.digest
        console.print(f"guest owner's key broker on {owner.url}: expects policy {opts.policy:#x} and "
                      f"launch digest {digest.hex()[:16]}…")
        kind = "SEV-ES" if opts.sev_es else "SEV"
        extra = [*sev_args(opts.policy, owner=owner.url), "-bios", str(bios)]
        if opts.guest == "kv":
            extra += lab.kv_device("sev")
        with console.status(f"launching an {kind} guest (certificates, session, measurement, secret)..."):
            try:
                vm = lab.vm("sev", host, ram=opts.ram, guest=opts.guest, extra=extra)
                vm.wait_console(WORKLOAD_STARTED[opts.guest], timeout=READY_TIMEOUT)
                summary = _summary(vm, opts)
                ok = True
            except (GuestFailed, DeadlineExceeded, StepTimeout):
                raise  # not a verdict of the owner's: the launch itself went wrong
            except ConfmigError as exc:
                summary = {"launched": False, "error": _vmm_error(lab, str(exc))}
                ok = False
        summary["owner"] = "; ".join(_verdict(v) for v in verdicts) or "never asked"
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print(console, summary)
    if opts.wrong_firmware:  # what must happen: the owner refused, and so the launch failed
        return not ok and any(v["event"] in ("refused", "launch-refused") for v in verdicts)
    return ok


def _summary(vm: VmProc, opts: LaunchOptions) -> dict[str, Any]:
    sev = vm.qmp.execute("query-sev")
    measure = vm.qmp.execute("query-sev-launch-measure")["data"]
    caps = vm.qmp.execute("query-sev-capabilities")
    text = vm.console_text()
    kernel = vm.wait_console(KERNEL_SEV_RE, timeout=READY_TIMEOUT).group(1).decode()
    firmware = FIRMWARE_SEV_RE.search(text)
    secret = SECRET_RE.search(text)
    blocked = vm.qmp.execute("query-migrate").get("blocked-reasons", [])
    return {
        "launched": True,
        "sev-type": sev["sev-type"],
        "state": sev["state"],
        "handle": sev["handle"],
        "policy": sev["policy"],
        "platform": hashlib.sha256(base64.b64decode(caps["pdh"])).hexdigest()[:16],
        "measurement": base64.b64decode(measure)[:32].hex(),
        "guest-firmware": firmware.group(0).decode() if firmware else "(no SEV banner)",
        "guest-secret": secret.group(1).decode() if secret else "(no secret line)",
        "guest-kernel": kernel,
        "migration-blockers": blocked,
    }


def _vmm_error(lab: Lab, fallback: str) -> str:
    """The VMM's own one-line error, from the lab's process log."""
    try:
        lines = (lab.root / "processes.log").read_text(errors="replace").splitlines()
    except OSError:
        return fallback
    errors = [line for line in lines if "guest owner" in line or "SEV" in line]
    return errors[-1].strip() if errors else fallback


def _verdict(record: Mapping[str, object]) -> str:
    """One line of the owner's audit trail."""
    reason = record.get("reason")
    return f"{record['event']} ({reason})" if reason else str(record["event"])


def _print(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="attested launch", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        if isinstance(value, list):
            value = "\n".join(value) or "(none)"
        table.add_row(key, str(value))
    console.print(table)
