"""``confmig bench --suite psp``: plain against PSP migration of the same guest, in one run.

The same workload (1 GiB, every page random, same seed) runs once as a plain
guest and once as an SEV guest; each is live-migrated between the same two
hosts. The PSP path re-encrypts every private page with one SEND_UPDATE_DATA
on the source and one RECEIVE_UPDATE_DATA on the target, each a command through
KVM to the PSP: what it costs here is what its structure costs (no PSP cost
model is configured). Reported: total time, downtime, guest throughput, PSP
commands per second, and the ratio of the two paths' throughputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench.chart import Bar, bar_chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, check_host_memory, check_vm
from confmig.bench.perf import RANDOM_GUEST, machine_info
from confmig.bench.scenario import MigrationSettings, migrate, sev_args
from confmig.common.units import GiB, parse_size

GUEST = RANDOM_GUEST
GUEST_TIMEOUT = 900.0
"""Seconds to fill, or to self-check, a 1 GiB SEV guest's RAM (every page through the core's MEE)."""


def _one(kind: str, ram: str, log: Any, deadline: Deadline) -> dict[str, Any]:
    confidential = kind == "psp"
    extra = sev_args() if confidential else []
    with Lab(deadline=deadline) as lab:
        a, b = lab.start_hosts("hostA", "hostB")
        src = lab.vm("src", a, ram=ram, guest=GUEST, extra=extra)
        log(f"{kind}: writing random contents into all {ram} of guest RAM ...")
        src.wait_console(WORKING_SET_WRITTEN, timeout=GUEST_TIMEOUT)
        dst = lab.vm("dst", b, ram=ram, guest=GUEST, incoming="defer", extra=extra)
        result = migrate(src, dst, settings=MigrationSettings(sev_target_certs=confidential,
                                                                 amd_root=lab.amd_root))
        verdict = dst.selfcheck(timeout=GUEST_TIMEOUT) if result.status == "completed" else ""
    info = result.info
    total_ms = max(int(info.get("total-time", 0)), 1)
    conf = info.get("x-confmig", {}).get("confidential") or {}
    row = {
        "kind": kind,
        "status": result.status,
        "error": info.get("error-desc"),
        "total_ms": total_ms,
        "downtime_ms": info.get("downtime"),
        "transferred": info.get("ram", {}).get("transferred", 0),
        "guest_MBps": parse_size(ram) / (total_ms / 1000) / 1e6,
        "private_pages": conf.get("private-pages", 0),
        "shared_pages": conf.get("shared-pages", 0),
        "psp_commands": conf.get("psp-commands", 0),
        "psp_commands_per_s": conf.get("psp-commands", 0) / (total_ms / 1000),
        "selfcheck": verdict,
    }
    log(f"  {kind}: {result.status}, total {total_ms} ms, downtime {row['downtime_ms']} ms, "
        f"{row['guest_MBps']:.0f} MB/s of guest RAM, {row['psp_commands_per_s']:.0f} PSP commands/s")
    return row


def run_psp_benchmark(*, save_dir: str | None, ram: str = "1G",
                      deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    config = check_vm(ram, GUEST, tuple(sev_args()))
    check_host_memory(2 * config.ram_size, f"--ram {ram}")  # the target preallocates, the source fills
    console = Console(width=max(Console().width, 130))
    t0 = time.time()
    rows = [_one(kind, ram, console.print, deadline) for kind in ("plain", "psp")]
    plain, psp = rows
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": machine_info(),
        "ram_gib": parse_size(ram) / GiB,
        "guest": GUEST,
        "psp_cost_model": "none (the structural cost: one command per page through KVM to the PSP)",
        "runs": rows,
        "psp_over_plain_throughput": psp["guest_MBps"] / plain["guest_MBps"] if plain["guest_MBps"] else 0,
        "duration_s": time.time() - t0,
    }
    _print(console, report)
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _print(console: Console, report: dict[str, Any]) -> None:
    t = Table(title=f"plain vs PSP migration, {report['ram_gib']:g} GiB random guest")
    for col in ("path", "status", "total ms", "downtime ms", "guest MB/s", "private pages",
                "shared pages", "PSP cmds", "PSP cmds/s", "self-check"):
        t.add_column(col)
    for r in report["runs"]:
        t.add_row(r["kind"], r["status"], str(r["total_ms"]), str(r["downtime_ms"]),
                  f"{r['guest_MBps']:.0f}", str(r["private_pages"]), str(r["shared_pages"]),
                  str(r["psp_commands"]), f"{r['psp_commands_per_s']:.0f}", r["selfcheck"][:40])
    console.print(t)
    console.print(f"PSP / plain throughput: {report['psp_over_plain_throughput']:.3f}")


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (directory / f"psp-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Plain vs PSP migration, {report['date']}", "",
             f"Machine: {report['machine']}. Guest: {report['ram_gib']:g} GiB, `{report['guest']}` "
             f"(every page random). PSP cost model: {report['psp_cost_model']}.", "",
             "| path | status | total ms | downtime ms | guest MB/s | private pages | shared pages "
             "| PSP commands | PSP commands/s | target self-check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['kind']} | {r['status']} | {r['total_ms']} | {r['downtime_ms']} | "
                     f"{r['guest_MBps']:.0f} | {r['private_pages']} | {r['shared_pages']} | "
                     f"{r['psp_commands']} | {r['psp_commands_per_s']:.0f} | `{r['selfcheck']}` |")
    lines += ["", f"PSP / plain throughput (same run): **{report['psp_over_plain_throughput']:.3f}**.",
              "", "PSP commands are counted on the source (SEND_*); the target issues as many RECEIVE_*.",
              "", f"![guest RAM throughput of each path](psp-{stamp}.svg)",
              "", "Reproduce: `make bench-psp` (or `confmig bench --suite psp --save benchmarks/`)."]
    (directory / f"psp-{stamp}.svg").write_text(bar_chart(
        f"guest RAM MB/s, {report['ram_gib']:g} GiB random guest",
        [Bar(label=r["kind"], value=r["guest_MBps"], text=f"{r['guest_MBps']:.0f} MB/s")
         for r in report["runs"]]))
    (directory / f"psp-{stamp}.md").write_text("\n".join(lines) + "\n")
    (directory / "psp-latest.md").write_text("\n".join(lines) + "\n")
