"""``confmig bench --suite local``: intra-host hand-over (``cpr-transfer``) against guest size.

For 1, 4 and 8 GiB SEV and SEV-ES guests (``--quick``: 256 and 512 MiB): one guest each,
running the dirty workload, handed to a new VMM process :data:`HANDOVERS` times in a row
(each new VMM takes the guest from the last); then the guest's self-check under the last
VMM. Per hand-over: the downtime (the old VMM's ``query-migrate``, from the stop of its
vCPUs to the new VMM's verdict) and the bytes sent (every byte of the main channel and of the
cpr channel). Bars (issue 12): downtime under 50 ms and not growing with size; bytes sent
under 1 MiB whatever the size.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench import chart
from confmig.bench.chart import Bar, BarPanel, Chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, VmSpec, check_host_memory
from confmig.bench.local import hand_over
from confmig.bench.perf import machine_info
from confmig.bench.scenario import SEV_ES_POLICY, SEV_POLICY, sev_args
from confmig.common.errors import ConfmigError
from confmig.common.units import MiB, parse_size

SIZES = ("1G", "4G", "8G")
QUICK_SIZES = ("256M", "512M")
KINDS = {"sev": SEV_POLICY, "sev-es": SEV_ES_POLICY}
HANDOVERS = 3
"""Hand-overs per guest, in a row."""
GUEST = "dirty,rate=2000,wss=64M,fill=random,prefill=on"
"""A guest writing all along: 2000 pages/s over 64 MiB (what it touches, not its size)."""
DOWNTIME_BAR_MS = 50
BYTES_BAR = 1 << 20
GROWTH_SLACK_MS = 10
"""'Does not grow with size': the largest guest's median downtime is within this of the
smallest's (scheduling noise on a shared 2-core machine is of this order)."""


def run_local_benchmark(*, save_dir: str | None, quick: bool = False, deadline: Deadline = NO_DEADLINE
                        ) -> dict[str, Any]:
    console = Console()
    sizes = QUICK_SIZES if quick else SIZES
    check_host_memory(64 * MiB * 2, "--suite local")  # RAM is sparse: the working set is what is touched
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for kind, policy in KINDS.items():
        for size in sizes:
            deadline.check(f"the {kind} {size} guest")
            rows.append(_one(kind, policy, size, deadline))
            r = rows[-1]
            console.print(f"{kind:6} {size:>4}: downtime {r['downtime_ms']} ms, "
                          f"bytes sent {r['bytes_sent']}, self-check {r['selfcheck']}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), "machine": machine_info(),
              "guest": GUEST, "handovers_per_guest": HANDOVERS, "quick": quick, "rows": rows,
              "bars": bars(rows)}
    _print(console, report)
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _one(kind: str, policy: int, size: str, deadline: Deadline) -> dict[str, Any]:
    with Lab(deadline=deadline) as lab:
        host = lab.host("hostA")
        spec = VmSpec(name="v0", host=host, ram=size, guest=GUEST, extra=tuple(sev_args(policy)))
        vm = lab.start_vms(spec)[0]
        vm.wait_console(WORKING_SET_WRITTEN, timeout=300)
        downtimes: list[int] = []
        sent: list[int] = []
        breakdowns: list[dict[str, float]] = []
        for i in range(1, HANDOVERS + 1):
            new, result = hand_over(lab, vm, replace(spec, name=f"v{i}"), events=False)
            if result.status != "completed" or new is None:
                why = result.info.get("error-desc")
                raise ConfmigError(f"{kind} {size}: hand-over {i} {result.status}: {why}")
            info = result.info
            cpr_bytes = info["x-confmig"]["confidential"]["cpr-bytes"]
            downtimes.append(int(info["downtime"]))
            sent.append(int(info["ram"]["transferred"]) + int(cpr_bytes))
            breakdowns.append(info["x-confmig"]["downtime-breakdown-ms"])
            if info["ram"]["normal"] or info["ram"]["duplicate"]:
                raise ConfmigError(f"{kind} {size}: hand-over {i} sent pages")
            vm.quit()
            vm = new
        verdict = vm.selfcheck()
    return {"kind": kind, "size": size, "size_bytes": parse_size(size), "downtimes_ms": downtimes,
            "downtime_ms": statistics.median(downtimes), "bytes_sent_each": sent, "bytes_sent": max(sent),
            "breakdowns_ms": breakdowns, "selfcheck": verdict.split()[1] if verdict else "none"}


def bars(rows: list[dict[str, Any]]) -> dict[str, Any]:
    worst_ms = max(max(r["downtimes_ms"]) for r in rows)
    worst_bytes = max(r["bytes_sent"] for r in rows)
    growth = {}
    for kind in KINDS:
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["size_bytes"])
        growth[kind] = mine[-1]["downtime_ms"] - mine[0]["downtime_ms"]
    return {
        "downtime": {"bar": f"every hand-over < {DOWNTIME_BAR_MS} ms", "worst_ms": worst_ms,
                     "met": worst_ms < DOWNTIME_BAR_MS},
        "growth": {"bar": f"median downtime of the largest guest within {GROWTH_SLACK_MS} ms of the "
                          "smallest's",
                   "growth_ms": growth, "met": all(g <= GROWTH_SLACK_MS for g in growth.values())},
        "bytes": {"bar": f"every hand-over < {BYTES_BAR} bytes sent", "worst_bytes": worst_bytes,
                  "met": worst_bytes < BYTES_BAR},
        "selfcheck": {"met": all(r["selfcheck"] == "PASS" for r in rows)},
    }


def _print(console: Console, report: dict[str, Any]) -> None:
    t = Table(title="intra-host hand-over (cpr-transfer)")
    for c in ("guest", "size", "downtime ms (each)", "median", "bytes sent (max)", "self-check"):
        t.add_column(c)
    for r in report["rows"]:
        t.add_row(r["kind"], r["size"], ", ".join(map(str, r["downtimes_ms"])), f"{r['downtime_ms']:g}",
                  str(r["bytes_sent"]), r["selfcheck"])
    console.print(t)
    for name, b in report["bars"].items():
        console.print(f"{name}: {b.get('bar', 'every guest passes')}: {'met' if b['met'] else 'NOT met'}")


def chart_of(name: str, report: dict[str, Any]) -> Chart:
    """``{name}.png`` from the report's JSON: downtime and bytes sent per guest."""
    rows = report["rows"]
    down = tuple(Bar(label=f"{r['kind']} {r['size']}", value=r["downtime_ms"],
                     text=f"{r['downtime_ms']:g} ms (max {max(r['downtimes_ms'])})") for r in rows)
    sent = tuple(Bar(label=f"{r['kind']} {r['size']}", value=r["bytes_sent"], text=f"{r['bytes_sent']} B")
                 for r in rows)
    return Chart(file=f"{name}.png", alt="downtime and bytes sent of each guest size",
                 title="intra-host hand-over (cpr-transfer) against guest size",
                 panels=(BarPanel(title="median downtime (ms) of 3 hand-overs", bars=down, unit=" ms",
                                  target=DOWNTIME_BAR_MS, target_label=f"bar {DOWNTIME_BAR_MS} ms"),
                         BarPanel(title="bytes sent per hand-over (stream + cpr channel), max of 3",
                                  bars=sent, unit=" B")))


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"local-{stamp}"
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    c = chart_of(name, report)
    chart.save(c, directory)
    b = report["bars"]
    lines = [f"# Intra-host hand-over (cpr-transfer), {report['date']}", "",
             f"Machine: {report['machine']}. One emulated host; each guest (workload `{report['guest']}`) "
             f"is handed to a new VMM process {report['handovers_per_guest']} times in a row, then "
             "self-checks under the last one. Downtime: the old VMM's `query-migrate` (its vCPUs' stop "
             "to the new VMM's verdict). Bytes sent: the main channel's `transferred` plus the cpr "
             "channel's bytes (the descriptors themselves travel as SCM_RIGHTS).", "",
             "| guest | size | downtime ms (each) | median | bytes sent (max) | self-check |",
             "|---|---|---|---|---|---|",
             *[f"| {r['kind']} | {r['size']} | {', '.join(map(str, r['downtimes_ms']))} | "
               f"{r['downtime_ms']:g} | {r['bytes_sent']} | {r['selfcheck']} |" for r in report["rows"]],
             "",
             f"* Downtime bar ({b['downtime']['bar']}): worst {b['downtime']['worst_ms']} ms, "
             f"{'met' if b['downtime']['met'] else 'NOT met'}.",
             f"* Growth bar ({b['growth']['bar']}): "
             + ", ".join(f"{k} {v:+g} ms" for k, v in b["growth"]["growth_ms"].items())
             + f", {'met' if b['growth']['met'] else 'NOT met'}.",
             f"* Bytes bar ({b['bytes']['bar']}): worst {b['bytes']['worst_bytes']} bytes, "
             f"{'met' if b['bytes']['met'] else 'NOT met'}.",
             f"* Every guest passed its self-check: {'yes' if b['selfcheck']['met'] else 'NO'}.",
             "", c.link, "",
             "Reproduce: `make bench-local` (`confmig bench --suite local --save benchmarks/`)."]
    (directory / f"{name}.md").write_text("\n".join(lines) + "\n")
