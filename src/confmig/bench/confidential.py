"""``confmig bench --suite psp`` and ``--suite mh``: the confidential paths against the plain
one, on the same guest, in one run.

The same workload (1 GiB, every page random, same seed) runs as a plain guest
and as an SEV guest; each is live-migrated between the same two hosts. The PSP
path re-encrypts every private page with one SEND_UPDATE_DATA on the source and
one RECEIVE_UPDATE_DATA on the target, each a command through KVM to the PSP:
what it costs here is what its structure costs (no PSP cost model is
configured). The Migration Handler path (``--suite mh``, which also runs the
other two) has the guest's own firmware seal batches of pages on 1, 2 and 4 MH
vCPUs. Reported: total time, downtime, guest throughput, firmware commands per
second, and each path's throughput against plain and PSP.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench.chart import Bar, bar_chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, VmProc, VmSpec, check_host_memory, check_vm
from confmig.bench.perf import RANDOM_GUEST, machine_info
from confmig.bench.scenario import (
    MH_TARGET_ARGS,
    MH_TARGET_READY,
    SEV_POLICY,
    MigrationSettings,
    mh_args,
    migrate,
    sev_args,
)
from confmig.common.units import GiB, parse_size

GUEST = RANDOM_GUEST
GUEST_TIMEOUT = 900.0
"""Seconds to fill, or to self-check, a 1 GiB SEV guest's RAM (every page through the core's MEE)."""


MH_VCPUS = (1, 2, 4)


def _mh_pair(lab: Lab, ram: str, mh_vcpus: int) -> tuple[VmProc, VmProc]:
    """An SEV guest with MH vCPUs and its MH target, both launched by one owner who gives both
    the same transport key."""
    from confmig.owner import MIGRATION_TRANSPORT_KEY_GUID

    a, b = lab.start_hosts("hostA", "hostB")
    owner = lab.owner(firmware=lab.bios, policy=SEV_POLICY,
                      secrets=[(MIGRATION_TRANSPORT_KEY_GUID, os.urandom(32))])
    common = (*sev_args(SEV_POLICY, owner=owner.url), *mh_args(mh_vcpus))
    src, dst = lab.start_vms(VmSpec(name="src", host=a, ram=ram, guest=GUEST, extra=common),
                             VmSpec(name="dst", host=b, ram=ram, guest=GUEST,
                                    extra=(*common, *MH_TARGET_ARGS)))
    dst.wait_console(MH_TARGET_READY)
    return src, dst


def _one(kind: str, ram: str, log: Any, deadline: Deadline) -> dict[str, Any]:
    mh_vcpus = int(kind.removeprefix("mh-")) if kind.startswith("mh-") else 0
    with Lab(deadline=deadline) as lab:
        if mh_vcpus:
            src, dst = _mh_pair(lab, ram, mh_vcpus)
            settings = MigrationSettings(confidential_backend="mh")
        else:
            extra = sev_args() if kind == "psp" else []
            a, b = lab.start_hosts("hostA", "hostB")
            src = lab.vm("src", a, ram=ram, guest=GUEST, extra=extra)
            settings = MigrationSettings(sev_target_certs=kind == "psp", amd_root=lab.amd_root)
        log(f"{kind}: writing random contents into all {ram} of guest RAM ...")
        src.wait_console(WORKING_SET_WRITTEN, timeout=GUEST_TIMEOUT)
        if not mh_vcpus:
            dst = lab.vm("dst", b, ram=ram, guest=GUEST, incoming="defer", extra=extra)
        result = migrate(src, dst, settings=settings)
        verdict = dst.selfcheck(timeout=GUEST_TIMEOUT) if result.status == "completed" else ""
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
    }
    log(f"  {kind}: {result.status}, total {total_ms} ms, downtime {row['downtime_ms']} ms, "
        f"{row['guest_MBps']:.0f} MB/s of guest RAM, {row['commands_per_s']:.0f} firmware commands/s")
    return row


def run_psp_benchmark(*, save_dir: str | None, ram: str = "1G", mh: bool = False,
                      deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    """``mh``: also the Migration Handler with 1, 2 and 4 MH vCPUs (``--suite mh``)."""
    config = check_vm(ram, GUEST, tuple(sev_args()))
    check_host_memory(2 * config.ram_size, f"--ram {ram}")  # the target preallocates, the source fills
    console = Console(width=max(Console().width, 130))
    t0 = time.time()
    kinds = ["plain", "psp", *(f"mh-{n}" for n in (MH_VCPUS if mh else ()))]
    rows = [_one(kind, ram, console.print, deadline) for kind in kinds]
    by_kind = {r["kind"]: r for r in rows}

    def ratio(kind: str, base: str) -> float:
        return by_kind[kind]["guest_MBps"] / by_kind[base]["guest_MBps"] if by_kind[base]["guest_MBps"] else 0

    report: dict[str, Any] = {
        "suite": "mh" if mh else "psp",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": machine_info(),
        "ram_gib": parse_size(ram) / GiB,
        "guest": GUEST,
        "psp_cost_model": "none (the structural cost: one command per page through KVM to the PSP)",
        "runs": rows,
        "psp_over_plain_throughput": ratio("psp", "plain"),
        "ratios": {r["kind"]: {"over_plain": ratio(r["kind"], "plain"), "over_psp": ratio(r["kind"], "psp")}
                   for r in rows if r["kind"].startswith("mh-")},
        "duration_s": time.time() - t0,
    }
    _print(console, report)
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _print(console: Console, report: dict[str, Any]) -> None:
    t = Table(title=f"confidential migration paths, {report['ram_gib']:g} GiB random guest")
    for col in ("path", "status", "total ms", "downtime ms", "guest MB/s", "private pages",
                "shared pages", "fw cmds", "fw cmds/s", "self-check"):
        t.add_column(col)
    for r in report["runs"]:
        t.add_row(r["kind"], r["status"], str(r["total_ms"]), str(r["downtime_ms"]),
                  f"{r['guest_MBps']:.0f}", str(r["private_pages"]), str(r["shared_pages"]),
                  str(r["commands"]), f"{r['commands_per_s']:.0f}", r["selfcheck"][:40])
    console.print(t)
    console.print(f"PSP / plain throughput: {report['psp_over_plain_throughput']:.3f}")
    for kind, q in report["ratios"].items():
        console.print(f"{kind} / plain: {q['over_plain']:.3f}, {kind} / PSP: {q['over_psp']:.1f}")


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{report['suite']}-{stamp}"
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    title = "Plain vs PSP vs Migration Handler" if report["suite"] == "mh" else "Plain vs PSP"
    lines = [f"# {title} migration, {report['date']}", "",
             f"Machine: {report['machine']}. Guest: {report['ram_gib']:g} GiB, `{report['guest']}` "
             f"(every page random). PSP cost model: {report['psp_cost_model']}.", "",
             "| path | status | total ms | downtime ms | guest MB/s | private pages | shared pages "
             "| firmware commands | commands/s | target self-check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['kind']} | {r['status']} | {r['total_ms']} | {r['downtime_ms']} | "
                     f"{r['guest_MBps']:.0f} | {r['private_pages']} | {r['shared_pages']} | "
                     f"{r['commands']} | {r['commands_per_s']:.0f} | `{r['selfcheck']}` |")
    lines += ["", f"PSP / plain throughput (same run): **{report['psp_over_plain_throughput']:.3f}**."]
    if report["ratios"]:
        lines += ["", "| Migration Handler | / plain (bar >= 0.5) | met | / PSP (bar >= 5) | met |",
                  "|---|---|---|---|---|"]
        for kind, q in report["ratios"].items():
            lines.append(f"| {kind} | {q['over_plain']:.3f} | {'yes' if q['over_plain'] >= 0.5 else 'NO'} "
                         f"| {q['over_psp']:.1f} | {'yes' if q['over_psp'] >= 5 else 'NO'} |")
    lines += ["", "Firmware commands are counted on the source: PSP commands (SEND_*; the target issues "
              "as many RECEIVE_*), or Migration Handler mailbox commands (one per batch of up to 128 "
              "pages; the target issues as many).",
              "", f"![guest RAM throughput of each path]({name}.svg)",
              "", f"Reproduce: `make bench-{report['suite']}` (or `confmig bench --suite {report['suite']} "
              "--save benchmarks/`)."]
    (directory / f"{name}.svg").write_text(bar_chart(
        f"guest RAM MB/s, {report['ram_gib']:g} GiB random guest",
        [Bar(label=r["kind"], value=r["guest_MBps"], text=f"{r['guest_MBps']:.0f} MB/s")
         for r in report["runs"]]))
    (directory / f"{name}.md").write_text("\n".join(lines) + "\n")
    (directory / f"{report['suite']}-latest.md").write_text("\n".join(lines) + "\n")
