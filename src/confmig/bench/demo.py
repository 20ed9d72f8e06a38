"""``confmig demo``: the embedded default — two hosts, a running guest, one live migration."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from confmig.bench.firmware import default_bios
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, VmProc
from confmig.bench.scenario import (
    SEV_ES_POLICY,
    SEV_POLICY,
    MigrationSettings,
    migrate,
    sev_args,
    two_hosts,
    wait_guest_ready,
)
from confmig.common.units import parse_size
from confmig.owner import DISK_PASSPHRASE_GUID


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    ram: str = "1G"
    guest: str = "dirty"
    dirty_rate: int = 2000
    wss: str = "256M"
    downtime_limit: int = 300
    max_bandwidth: int = 100 << 30
    channels: int = 1
    mode: str = "plain"
    """``plain`` (an ordinary guest) or ``psp`` (an SEV guest, pages re-encrypted by the PSP)."""
    sev_es: bool = False
    keep: bool = False

    def guest_arg(self) -> str:
        if self.guest == "dirty":
            return f"dirty,rate={self.dirty_rate},wss={self.wss},fill=random,prefill=on"
        return self.guest


def _sev_pair(lab: Lab, opts: DemoOptions, audit: Callable[[Mapping[str, object]], None]
              ) -> tuple[VmProc, VmProc]:
    """An SEV source launched with its owner's attestation (the owner runs in this process and
    releases a disk key only to the expected firmware), and its target waiting."""
    a, b = lab.host("hostA"), lab.host("hostB")
    policy = SEV_ES_POLICY if opts.sev_es else SEV_POLICY
    owner = lab.owner(firmware=default_bios(), policy=policy, audit=audit,
                      secrets=[(DISK_PASSPHRASE_GUID, os.urandom(32))])
    src = lab.vm("src", a, ram=opts.ram, guest=opts.guest_arg(),
                 extra=sev_args(policy, owner=owner.url))
    dst = lab.vm("dst", b, ram=opts.ram, guest=opts.guest_arg(), incoming="defer",
                 extra=sev_args(policy))
    return src, dst


def run_demo(opts: DemoOptions, *, as_json: bool = False) -> bool:
    console = Console(stderr=as_json, quiet=False)
    confidential = opts.mode == "psp"
    with Lab(keep=opts.keep) as lab:
        settings = MigrationSettings(downtime_limit_ms=opts.downtime_limit,
                                     max_bandwidth=opts.max_bandwidth, channels=opts.channels,
                                     sev_target_certs=confidential, amd_root=lab.amd_root)
        console.print(f"[bold]confmig demo[/]: two emulated hosts in {lab.root}")
        verdicts: list[Mapping[str, object]] = []
        if confidential:
            src, dst = _sev_pair(lab, opts, verdicts.append)
            console.print("guest owner (in this process) attested the source's launch: "
                          + ", ".join(str(v["event"]) for v in verdicts))
        else:
            src, dst = two_hosts(lab, ram=opts.ram, guest=opts.guest_arg())
        kind = f"{'SEV-ES' if opts.sev_es else 'SEV'} guest (PSP migration)" if confidential else "guest"
        console.print(f"source {kind} on hostA ({opts.ram}, workload: {opts.guest_arg()}); "
                      "target on hostB waiting (-incoming defer)")
        with console.status("booting the guest and filling its working set..."):
            if opts.guest == "dirty":
                src.wait_console(WORKING_SET_WRITTEN, timeout=600)
            else:
                wait_guest_ready(src)
        total = parse_size(opts.ram)
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("migrating", total=total, detail="setup")

            def progress(info: dict[str, Any]) -> None:
                ram = info.get("ram", {})
                done = ram.get("transferred", 0)
                bar.update(task, completed=min(done, total), detail=(
                    f"{info.get('status')}  pass {ram.get('dirty-sync-count', 0)}  "
                    f"{ram.get('mbps', 0):.0f} Mbit/s  remaining {ram.get('remaining', 0) >> 20} MiB"))

            result = migrate(src, dst, settings=settings, progress=progress)
            bar.update(task, completed=total, detail=result.status)
        verdict = ""
        if result.status == "completed" and opts.guest == "dirty":
            with console.status("in-guest self-check on the target..."):
                verdict = dst.selfcheck()
        summary = _summary(result.info, result.wall_s, verdict, opts)
    ok = result.status == "completed" and (opts.guest != "dirty" or "PASS" in verdict)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print(console, summary)
    return ok


def _summary(info: dict[str, Any], wall_s: float, verdict: str, opts: DemoOptions) -> dict[str, Any]:
    ram = info.get("ram", {})
    total_ms = info.get("total-time", 0)
    extra = info.get("x-confmig", {})
    return {
        "options": asdict(opts),
        "status": info.get("status"),
        "error": info.get("error-desc"),
        "total-time-ms": total_ms,
        "downtime-ms": info.get("downtime"),
        "setup-time-ms": info.get("setup-time"),
        "transferred-bytes": ram.get("transferred"),
        "throughput-MBps": round(ram.get("transferred", 0) / (total_ms / 1000) / 1e6, 1) if total_ms else 0,
        "rounds": extra.get("rounds"),
        "dirty-sync-count": ram.get("dirty-sync-count"),
        "pages": {"normal": ram.get("normal"), "zero": ram.get("duplicate")},
        "downtime-breakdown-ms": extra.get("downtime-breakdown-ms"),
        "confidential": extra.get("confidential"),
        "selfcheck": verdict or None,
        "wall-s": round(wall_s, 3),
    }


def _print(console: Console, s: dict[str, Any]) -> None:
    t = Table(title="live migration", show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value")
    rows = [
        ("status", s["status"] + (f" ({s['error']})" if s.get("error") else "")),
        ("total time", f"{s['total-time-ms']} ms"),
        ("downtime", f"{s['downtime-ms']} ms"),
        ("setup time", f"{s['setup-time-ms']} ms"),
        ("transferred", f"{(s['transferred-bytes'] or 0) / 1e6:.1f} MB"),
        ("throughput", f"{s['throughput-MBps']} MB/s"),
        ("rounds", str(s["rounds"])),
        ("pages: normal / zero", f"{s['pages']['normal']} / {s['pages']['zero']}"),
    ]
    if s.get("downtime-breakdown-ms"):
        rows.append(("downtime breakdown", ", ".join(
            f"{k} {v:.1f} ms" for k, v in s["downtime-breakdown-ms"].items())))
    if s.get("confidential"):
        c = s["confidential"]
        rows.append((f"confidential ({c['backend']})",
                     f"{c['private-pages']} private pages, {c['shared-pages']} shared pages, "
                     f"{c['psp-commands']} PSP commands"))
    if s.get("selfcheck"):
        rows.append(("guest self-check", s["selfcheck"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
