"""``confmig bench --suite psp`` and ``--suite mh``: the confidential paths against the plain
one, on the same guest, in one run.

The same workload (1 GiB, every page random, same seed) runs as a plain guest
and as an SEV guest; each is live-migrated between the same two hosts. The MH
suite (not ``--quick``) repeats it with a 4 GiB guest. The PSP
path re-encrypts every private page with one SEND_UPDATE_DATA on the source and
one RECEIVE_UPDATE_DATA on the target, each a command through KVM to the PSP:
what it costs here is what its structure costs (no PSP cost model is
configured). The Migration Handler path (``--suite mh``, which also runs the
other two) has the guest's own firmware seal batches of pages on 1, 2 and 4 MH
vCPUs. Reported: total time, downtime, guest throughput, firmware commands per
second, and each path's throughput against plain and PSP.

``--suite mh`` then runs the scenarios of :mod:`confmig.bench.mh_suite` in the same run: a
guest dirtying 1, 5 and 10 % of its pages per second, and a host evacuated of four SEV guests
at once through each path; ``--quick`` makes those small.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench import chart, cputime, crypto_floor, mh_suite
from confmig.bench.chart import GREY, Bar, BarPanel, Chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, check_host_memory, check_vm
from confmig.bench.mh_suite import GUEST_TIMEOUT, MhScenarios, settings_for, start_sources, start_targets
from confmig.bench.perf import RANDOM_GUEST, machine_info
from confmig.bench.scenario import migrate, sev_args
from confmig.common.units import GiB, parse_size
from confmig.proto import mailbox as mb

GUEST = RANDOM_GUEST
MH_VCPUS = (1, 2, 4)
LARGE_RAM = "4G"
"""The MH suite's second random guest (issue 11: 1 GiB and 4 GiB)."""


def _one(kind: str, ram: str, log: Any, deadline: Deadline) -> dict[str, Any]:
    timeout = GUEST_TIMEOUT * max(1.0, parse_size(ram) / GiB)  # filling and checking scale with RAM
    with Lab(deadline=deadline) as lab:
        hosts = lab.start_hosts("hostA", "hostB")
        (src,), targets = start_sources(lab, kind, hosts, ram, GUEST, ["src"])
        log(f"{kind}: writing random contents into all {ram} of guest RAM ...")
        src.wait_console(WORKING_SET_WRITTEN, timeout=timeout)
        (dst,) = targets or start_targets(lab, kind, hosts[1], ram, GUEST, ["src"])
        with cputime.migration_cpu(src, dst, parse_size(ram)) as cpu:
            result = migrate(src, dst, settings=settings_for(kind, lab))
        verdict = dst.selfcheck(timeout=timeout) if result.status == "completed" else ""
    info = result.info
    total_ms = max(int(info.get("total-time", 0)), 1)
    conf = info.get("x-confmig", {}).get("confidential") or {}
    commands = conf.get("psp-commands", conf.get("mh-commands", 0))
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
        "commands": commands,
        "commands_per_s": commands / (total_ms / 1000),
        "mh": {k: conf[k] for k in ("mh-vcpus", "batches", "zero-pages-elided") if k in conf},
        "selfcheck": verdict,
        "cpu": cpu,
    }
    log(f"  {kind}: {result.status}, total {total_ms} ms, downtime {row['downtime_ms']} ms, "
        f"{row['guest_MBps']:.0f} MB/s of guest RAM, {row['commands_per_s']:.0f} firmware commands/s, "
        f"CPU s per GiB {cputime.cell(row)}")
    return row


def run_psp_benchmark(*, save_dir: str | None, ram: str = "1G", mh: bool = False, quick: bool = False,
                      deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    """``mh``: also the Migration Handler with 1, 2 and 4 MH vCPUs (``--suite mh``), then the
    dirty-rate and evacuation scenarios (small ones with ``quick``). ``ram``: the random guest's."""
    scenarios = mh_suite.QUICK if quick else mh_suite.FULL
    large = mh and not quick
    config = check_vm(ram, GUEST, tuple(sev_args()))
    need = 2 * config.ram_size  # the target preallocates, the source fills
    if large:
        need = max(need, 2 * check_vm(LARGE_RAM, GUEST, tuple(sev_args())).ram_size)
    if mh:  # refuse options a later scenario could not run with before the first starts
        dirty = check_vm(scenarios.dirty_ram, scenarios.dirty_guest(1), tuple(sev_args()))
        evac = check_vm(scenarios.evac_ram, scenarios.evac_guest(), tuple(sev_args()))
        need = max(need, 2 * dirty.ram_size, 2 * scenarios.evac_guests * evac.ram_size)
    check_host_memory(need, f"--ram {ram}" + (" and the mh suite's guests" if mh else ""))
    console = Console(width=max(Console().width, 130))
    t0 = time.time()
    kinds = ["plain", "psp", *(f"mh-{n}" for n in (MH_VCPUS if mh else ()))]
    report: dict[str, Any] = {
        "suite": "mh" if mh else "psp",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": machine_info(),
        "quick": quick,
        "guest": GUEST,
        "psp_cost_model": "none (the structural cost: one command per page through KVM to the PSP)",
        **_random_guest(kinds, ram, console.print, deadline),
    }
    if large:
        report["large"] = _random_guest(kinds, LARGE_RAM, console.print, deadline)
    if mh:
        console.print("the MH's cryptography alone, on one core ...")
        report["crypto_floor"] = crypto_floor.measure()
        report["scenarios"] = _scenario_sizes(scenarios)
        report["dirty"] = mh_suite.dirty_rates(scenarios, console.print, deadline)
        report["evacuation"] = mh_suite.evacuation(scenarios, console.print, deadline)
    report["bars"] = _bars(report)
    report["duration_s"] = time.time() - t0
    _print(console, report)
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _random_guest(kinds: list[str], ram: str, log: Any, deadline: Deadline) -> dict[str, Any]:
    """Section 1 for one guest size: each path migrating the random guest once, and the ratios."""
    rows = [_one(kind, ram, log, deadline) for kind in kinds]
    by_kind = {r["kind"]: r for r in rows}

    def ratio(kind: str, base: str) -> float:
        return by_kind[kind]["guest_MBps"] / by_kind[base]["guest_MBps"] if by_kind[base]["guest_MBps"] else 0

    return {
        "ram_gib": parse_size(ram) / GiB,
        "runs": rows,
        "psp_over_plain_throughput": ratio("psp", "plain"),
        "ratios": {r["kind"]: {"over_plain": ratio(r["kind"], "plain"), "over_psp": ratio(r["kind"], "psp")}
                   for r in rows if r["kind"].startswith("mh-")},
    }


def _random_sections(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The random-guest sections of a report: its own (1 GiB), then the large one if it ran."""
    return [report, *([report["large"]] if "large" in report else [])]


def _scenario_sizes(sc: MhScenarios) -> dict[str, Any]:
    return {"quick": sc.quick, "dirty_ram": sc.dirty_ram, "rates_pct": list(sc.rates_pct),
            "dirty_kinds": list(sc.dirty_kinds), "dirty_limit_s": sc.dirty_limit_s,
            "evac_guests": sc.evac_guests, "evac_ram": sc.evac_ram, "evac_guest": sc.evac_guest(),
            "evac_kinds": list(sc.evac_kinds), "evac_limit_s": sc.evac_limit_s}


def _bars(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bar of the run, each judged on numbers of this run."""
    bars: list[dict[str, Any]] = []
    for section in _random_sections(report):
        for kind, q in section["ratios"].items():
            gib = f"{section['ram_gib']:g} GiB random guest"
            bars.append({"bar": f"{kind} / plain, guest MB/s ({gib})", "value": round(q["over_plain"], 3),
                         "target": ">= 0.5", "met": q["over_plain"] >= 0.5})
            bars.append({"bar": f"{kind} / PSP, guest MB/s ({gib})", "value": round(q["over_psp"], 1),
                         "target": ">= 5", "met": q["over_psp"] >= 5})
    if "dirty" in report:
        bars += mh_suite.downtime_bars(report["dirty"])
    return bars


def _print(console: Console, report: dict[str, Any]) -> None:
    for section in _random_sections(report):
        t = Table(title=f"confidential migration paths, {section['ram_gib']:g} GiB random guest")
        for col in ("path", "status", "total ms", "downtime ms", "guest MB/s", "CPU s/GiB, cores",
                    "private pages", "shared pages", "fw cmds", "fw cmds/s", "self-check"):
            t.add_column(col)
        for r in section["runs"]:
            t.add_row(r["kind"], r["status"], str(r["total_ms"]), str(r["downtime_ms"]),
                      f"{r['guest_MBps']:.0f}", cputime.cell(r), str(r["private_pages"]),
                      str(r["shared_pages"]),
                      str(r["commands"]), f"{r['commands_per_s']:.0f}", r["selfcheck"][:40])
        console.print(t)
        console.print(f"PSP / plain throughput: {section['psp_over_plain_throughput']:.3f}")
    mh_suite.print_tables(console, report.get("dirty"), report.get("evacuation"))
    if report["bars"]:
        b = Table(title="bars (measured in this run)")
        for col in ("bar", "value", "target", "met"):
            b.add_column(col)
        for bar in report["bars"]:
            b.add_row(bar["bar"], str(bar["value"]), bar["target"], "yes" if bar["met"] else "NO")
        console.print(b)


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{report['suite']}-{stamp}"
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    mh = report["suite"] == "mh"
    title = "Plain vs PSP vs Migration Handler" if mh else "Plain vs PSP"
    lines = [f"# {title} migration, {report['date']}", "",
             f"Machine: {report['machine']}. PSP cost model: {report['psp_cost_model']}. "
             f"Whole run: {report['duration_s'] / 60:.1f} min, every number below from it."
             + (" **Quick run**: small guests (`--quick`), not the sizes the bars are about."
                if report["quick"] and mh else ""), ""]
    charts = charts_of(name, report)
    for number, section in zip(("1", "1b"), _random_sections(report), strict=False):
        if mh:
            lines += [*([""] if number != "1" else []),
                      f"## {number}. Random guest: {section['ram_gib']:g} GiB, every page random", ""]
        lines += _random_markdown(report["guest"], section)
        lines.append(charts["paths" if number == "1" else "large"].link)
        if "crypto_floor" in report:
            lines += ["", *_floor_markdown(report["crypto_floor"], section)]
    if "dirty" in report:
        rates = " and ".join(", ".join(f"{p}%" for p in report["dirty"]["rates_pct"]).rsplit(", ", 1))
        lines += ["", f"## 2. Dirty guest: {rates} of its pages rewritten per second", "",
                  *mh_suite.dirty_markdown(report["dirty"], charts["dirty"])]
    if "evacuation" in report:
        lines += ["", "## 3. Evacuating a host", "",
                  *mh_suite.evacuation_markdown(report["evacuation"], charts["evacuation"])]
    for c in charts.values():
        chart.save(c, directory)
    if report["bars"]:
        lines += ["", "## Bars", "", "| bar | value | target | met |", "|---|---|---|---|"]
        for bar in report["bars"]:
            met = "yes" if bar["met"] else "NO"
            lines.append(f"| {bar['bar']} | {bar['value']} | {bar['target']} | {met} |")
    lines += ["", f"Reproduce: `make bench-{report['suite']}` (or `confmig bench --suite {report['suite']} "
              "--save benchmarks/`)."]
    (directory / f"{name}.md").write_text("\n".join(lines) + "\n")
    (directory / f"{report['suite']}-latest.md").write_text("\n".join(lines) + "\n")


def _random_markdown(guest: str, section: dict[str, Any]) -> list[str]:
    lines = [f"Guest: {section['ram_gib']:g} GiB, `{guest}` (every page written once with random "
             "contents, then idle), migrated once by each path with the default settings.", "",
             "| path | status | total ms | downtime ms | guest MB/s | CPU s per GiB (source + target), cores "
             "| private pages | shared pages | firmware commands | commands/s | target self-check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in section["runs"]:
        lines.append(f"| {r['kind']} | {r['status']} | {r['total_ms']} | {r['downtime_ms']} | "
                     f"{r['guest_MBps']:.0f} | {cputime.cell(r)} | {r['private_pages']} | "
                     f"{r['shared_pages']} | "
                     f"{r['commands']} | {r['commands_per_s']:.0f} | `{r['selfcheck']}` |")
    lines += ["", f"PSP / plain throughput (same run): **{section['psp_over_plain_throughput']:.3f}**."]
    if section["ratios"]:
        lines += ["", "| Migration Handler | / plain (bar >= 0.5) | met | / PSP (bar >= 5) | met |",
                  "|---|---|---|---|---|"]
        for kind, q in section["ratios"].items():
            lines.append(f"| {kind} | {q['over_plain']:.3f} | {'yes' if q['over_plain'] >= 0.5 else 'NO'} "
                         f"| {q['over_psp']:.1f} | {'yes' if q['over_psp'] >= 5 else 'NO'} |")
    lines += ["", "CPU seconds are the user and system time of each side's processes (its host daemon, "
              "the vCPU and Migration Handler processes it started, its VMM) during the migration, "
              f"per GiB of guest RAM, and the cores both sides kept busy on average; the machine has "
              f"{os.cpu_count()} cores, so no path moves faster than {os.cpu_count()} / (CPU s per GiB) "
              "GiB/s."]
    return [*lines, "", "Firmware commands are counted on the source: PSP commands (SEND_*; the target "
            "issues as many RECEIVE_*), or Migration Handler mailbox commands (one per batch of up to "
            f"{mb.BATCH_PAGES} pages; the target issues as many).", ""]


def _floor_markdown(floor: dict[str, float], section: dict[str, Any]) -> list[str]:
    """The MH's cryptography alone (:mod:`confmig.bench.crypto_floor`) against this section's
    plain run: how close to the bar the MH path could come here at best."""
    steps = ", ".join(f"{step} {floor[step]:.2f}" for step in crypto_floor.STEPS)
    lines = [f"The MH's cryptography alone, one core, in this run: **{floor['total']:.2f} CPU s per GiB** "
             f"({steps}; `confmig.bench.crypto_floor`)."]
    plain = next((r for r in section["runs"] if r["kind"] == "plain" and "cpu" in r), None)
    if plain is not None:
        p = plain["cpu"]["source"] + plain["cpu"]["target"]
        lines[0] += (f" With the plain path's {p:.2f} s per GiB, an MH path doing nothing else would need "
                     f"{p + floor['total']:.2f}: MH / plain at most about {p / (p + floor['total']):.2f} "
                     "at equal core use (the cores column).")
    return lines


def _paths_chart(file: str, section: dict[str, Any], alt: str) -> Chart:
    runs = section["runs"]
    throughput = tuple(Bar(label=r["kind"], value=r["guest_MBps"], text=f"{r['guest_MBps']:.0f} MB/s")
                       for r in runs)
    downtime = tuple(Bar(label=r["kind"], value=float(r["downtime_ms"]), text=f"{r['downtime_ms']} ms")
                     if r["status"] == "completed" and r["downtime_ms"] is not None
                     else Bar(label=r["kind"], value=0.0, text=r["status"], color=GREY) for r in runs)
    return Chart(file=file, alt=alt,
                 title=f"{section['ram_gib']:g} GiB random guest, each path migrating it once",
                 panels=(BarPanel(title="guest RAM throughput (MB/s)", bars=throughput),
                         BarPanel(title="downtime (ms)", bars=downtime)))


def charts_of(name: str, report: dict[str, Any]) -> dict[str, Chart]:
    """The report's charts by section, from its JSON alone: ``paths`` (``{name}.png``), each
    path's guest RAM throughput and downtime; with the MH suite's scenarios, ``dirty`` and
    ``evacuation`` (``{name}-dirty.png``, ``{name}-evacuation.png``); with the large random
    guest, ``large`` (``{name}-large.png``)."""
    alt = "guest RAM throughput and downtime of each path"
    charts = {"paths": _paths_chart(f"{name}.png", report, alt)}
    if "large" in report:
        large = report["large"]
        charts["large"] = _paths_chart(f"{name}-large.png", large, f"{alt}, {large['ram_gib']:g} GiB guest")
    if "dirty" in report:
        charts["dirty"] = mh_suite.dirty_chart(report["dirty"], name)
    if "evacuation" in report:
        charts["evacuation"] = mh_suite.evacuation_chart(report["evacuation"], name)
    return charts
