"""``confmig bench``: migration measured against this machine's own limits, in one run.

Every bar is a ratio of two numbers measured in the same run (the machines are
shared and noisy): migration throughput against the raw loopback ceiling, a
busy VM's rate next to another against its rate alone.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import queue
import re
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench import chart, cputime
from confmig.bench.chart import Bar, BarPanel, Chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import WORKING_SET_WRITTEN, Lab, VmProc, check_host_memory
from confmig.bench.scenario import MigrationSettings, migrate
from confmig.common.errors import ConfmigError
from confmig.common.pdeathsig import die_with_parent
from confmig.common.units import GiB, MiB, parse_size

SELFCHECK_WRITES = re.compile(rb"confmig-selfcheck: PASS pages=\d+ writes=(\d+)")
LOOPBACK_BYTES = 2 * GiB
LOOPBACK_CHUNK = 1 * MiB
LOOPBACK_TIMEOUT = 60.0
"""Seconds for any step of a loopback measurement (2 GiB at well under 1 GB/s still fits)."""
GUEST_TIMEOUT = 600.0
"""Seconds to fill, or to self-check, a 4 GiB guest's RAM."""
BUSY_WINDOW_S = 3.0
"""How long a busy guest's write rate is measured."""
BUSY_REPS = 3
RANDOM_GUEST = "dirty,rate=0,wss=all,fill=random,seed=7"
"""Every page of guest RAM written once with random contents, then idle: the worst case
for a migration (nothing compresses, nothing is zero)."""


def machine_info() -> dict[str, object]:
    """What a saved result says about where it was measured, and of which code (the commit of
    the checkout it runs from, ``+`` when that has changes not committed; absent outside git)."""
    info: dict[str, object] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "kernel": platform.release()}
    commit = _source_commit()
    if commit:
        info["commit"] = commit
    return info


def _source_commit() -> str:
    tree = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+" if changed else "")


# --- the ceiling: raw loopback TCP, sender and receiver in two processes ------------------------

def _loopback_receiver(port_q: mp.Queue[int], total: int, parent: int) -> None:
    die_with_parent(parent)
    srv = socket.socket()
    srv.settimeout(LOOPBACK_TIMEOUT)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.settimeout(LOOPBACK_TIMEOUT)
    buf = memoryview(bytearray(LOOPBACK_CHUNK))
    got = 0
    while got < total:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    conn.sendall(b"k")
    conn.close()


@dataclass(frozen=True)
class Ceiling:
    gbps: float
    """GB/s of ``sendall`` 1 MiB chunks over 127.0.0.1 to another process (median)."""
    cpu_s_per_gib: float
    """CPU seconds per GiB both processes spent, sender and receiver (median)."""


def loopback_ceiling(total: int = LOOPBACK_BYTES, reps: int = 3, deadline: Deadline = NO_DEADLINE) -> Ceiling:
    """The raw loopback TCP a migration's bar is measured against, and its CPU cost."""
    data = memoryview(os.urandom(256 * MiB))  # as baselines.md: a 256 MiB random buffer, cycled
    rates, cpu = [], []
    ctx = mp.get_context("fork")
    for _ in range(reps):
        deadline.check("the loopback ceiling")
        q: mp.Queue[int] = ctx.Queue()
        p = ctx.Process(target=_loopback_receiver, args=(q, total, os.getpid()))
        before = _cpu_self_and_children()
        p.start()
        measured = False
        try:
            rates.append(_loopback_once(data, total, q.get(timeout=LOOPBACK_TIMEOUT)))
            measured = True
        except (queue.Empty, OSError) as exc:
            raise ConfmigError(
                f"the loopback ceiling: {exc!r} (each step has {LOOPBACK_TIMEOUT:g} s)") from None
        finally:  # a receiver that measured ends by itself; any other (a signal, an error) is killed
            p.join(LOOPBACK_TIMEOUT if measured else 0)
            if p.exitcode is None:
                p.kill()
                p.join()
        cpu.append((_cpu_self_and_children() - before) / (total / GiB))  # the receiver is reaped
    return Ceiling(gbps=statistics.median(rates), cpu_s_per_gib=statistics.median(cpu))


def _cpu_self_and_children() -> float:
    """User and system seconds of this process and of its children that were waited for."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _loopback_once(data: memoryview, total: int, port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=LOOPBACK_TIMEOUT) as s:
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            off = sent % len(data)
            s.sendall(data[off : off + LOOPBACK_CHUNK])
            sent += LOOPBACK_CHUNK
        s.recv(1)
        return total / (time.perf_counter() - t0) / 1e9


# --- migrations ----------------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    ram_gib: float
    channels: int
    status: str
    total_ms: int
    downtime_ms: int
    setup_ms: int
    transferred: int
    guest_gbps: float
    wire_gbps: float
    rounds: int
    cpu: dict[str, float]
    """CPU seconds per GiB of each side and the cores kept busy (:func:`cputime.usage`)."""

    @classmethod
    def of(cls, scenario: str, ram: int, channels: int, info: dict[str, Any], cpu: dict[str, float]) -> Row:
        total = max(int(info.get("total-time", 0)), 1)
        xfer = int(info.get("ram", {}).get("transferred", 0))
        return cls(scenario=scenario, ram_gib=ram / GiB, channels=channels, status=info["status"],
                   total_ms=total, downtime_ms=int(info.get("downtime", -1)),
                   setup_ms=int(info.get("setup-time", 0)), transferred=xfer,
                   guest_gbps=ram / (total / 1000) / 1e9, wire_gbps=xfer / (total / 1000) / 1e9,
                   rounds=int(info.get("x-confmig", {}).get("rounds", 0)), cpu=cpu)


def _ping_pong(lab: Lab, first: VmProc, ram: str, guest: str, runs: list[tuple[str, int]],
               log: Callable[[str], None]) -> list[tuple[str, int, dict[str, Any], dict[str, float]]]:
    """Migrate the same running guest back and forth between the two hosts, a fresh
    target each time (its RAM preallocated at start, as QEMU's prealloc=on)."""
    out = []
    src = first
    hosts = {h.name: h for h in lab.hosts}
    for n, (label, channels) in enumerate(runs):
        other = hosts["hostB"] if src.host.name == "hostA" else hosts["hostA"]
        dst = lab.vm(f"{src.name.split('-')[0]}-{n}", other, ram=ram, guest=guest, incoming="defer")
        with cputime.migration_cpu(src, dst, parse_size(ram)) as cpu:
            result = migrate(src, dst, settings=MigrationSettings(channels=channels))
        log(f"  {label}: {result.status}, total {result.info.get('total-time')} ms, "
            f"downtime {result.info.get('downtime')} ms, CPU s per GiB {cputime.cell({'cpu': cpu})}")
        out.append((label, channels, result.info, cpu))
        src.quit()
        src = dst
    return out


def migration_rows(sizes: list[int], log: Callable[[str], None], deadline: Deadline
                   ) -> tuple[list[Row], str]:
    rows: list[Row] = []
    verdict = ""
    for gib in sizes:
        ram = f"{gib}G"
        guest = RANDOM_GUEST
        with Lab(deadline=deadline) as lab:
            a, _ = lab.start_hosts("hostA", "hostB")
            src = lab.vm("rnd", a, ram=ram, guest=guest)
            log(f"{gib} GiB guest: writing random contents into all of its RAM ...")
            src.wait_console(WORKING_SET_WRITTEN, timeout=GUEST_TIMEOUT)
            runs = [("random RAM, 1 channel", 1), ("random RAM, 2 channels (multifd)", 2),
                    ("random RAM, 1 channel (again)", 1), ("random RAM, 2 channels (again)", 2)]
            for label, ch, info, cpu in _ping_pong(lab, src, ram, guest, runs, log):
                rows.append(Row.of(label, gib * GiB, ch, info, cpu))
            verdict = lab.vms[-1].selfcheck(timeout=GUEST_TIMEOUT)
    with Lab(deadline=deadline) as lab:
        a, _ = lab.start_hosts("hostA", "hostB")
        src = lab.vm("idle", a, ram="1G", guest="idle")
        time.sleep(1.0)
        runs = [("idle guest", 1), ("idle guest (again)", 1), ("idle guest (third)", 1)]
        for label, ch, info, cpu in _ping_pong(lab, src, "1G", "idle", runs, log):
            rows.append(Row.of(label, GiB, ch, info, cpu))
    return rows, verdict


# --- two busy VMs on one host --------------------------------------------------------------------

def _writes(vm: VmProc) -> tuple[float, int]:
    line = vm.selfcheck(timeout=120)
    m = SELFCHECK_WRITES.search(line.encode())
    if m is None:
        raise vm.fail(f"self-check failed: {line}")
    return time.monotonic(), int(m.group(1))


def _rate(vm: VmProc, seconds: float) -> float:
    t0, w0 = _writes(vm)
    time.sleep(seconds)
    t1, w1 = _writes(vm)
    return (w1 - w0) / (t1 - t0)


def busy_rates(log: Callable[[str], None], deadline: Deadline, *, reps: int = BUSY_REPS) -> dict[str, float]:
    """Pages/s written by a guest alone, then beside a second busy guest on the same
    host; alternated (the second VM stopped, then running) so that load from
    elsewhere on a shared machine falls on both sides of the ratio alike."""
    guest = "dirty,rate=10000000,wss=16M,fill=random"
    alone: list[float] = []
    pair: list[float] = []
    with Lab(deadline=deadline) as lab:
        h = lab.host("host")
        one = lab.vm("busy1", h, ram="128M", guest=guest)
        two = lab.vm("busy2", h, ram="128M", guest=guest)
        time.sleep(1.0)
        for _ in range(reps):
            two.qmp.execute("stop")
            alone.append(_rate(one, BUSY_WINDOW_S))
            two.qmp.execute("cont")
            time.sleep(0.2)
            t0 = [_writes(v) for v in (one, two)]
            time.sleep(BUSY_WINDOW_S)
            t1 = [_writes(v) for v in (one, two)]
            pair.append(min((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(t0, t1, strict=True)))
    result = {"alone": statistics.median(alone), "beside": statistics.median(pair)}
    result["ratio"] = result["beside"] / result["alone"]
    log(f"  alone {result['alone']:.0f} pages/s; the slower of two side by side "
        f"{result['beside']:.0f} pages/s (medians of {reps})")
    return result


# --- the run -------------------------------------------------------------------------------------

def run_benchmarks(*, save_dir: str | None, quick: bool, deadline: Deadline = NO_DEADLINE) -> dict[str, Any]:
    sizes = [1] if quick else [1, 4]
    check_host_memory(2 * max(sizes) * GiB, f"the {max(sizes)} GiB guests")  # a target beside its source
    console = Console(width=max(Console().width, 150))
    log = console.print
    t0 = time.time()
    log("[bold]loopback ceiling[/] (1 MiB sendall, two processes) ...")
    measured = [loopback_ceiling(reps=2 if quick else 3, deadline=deadline)]
    log(f"  {measured[0].gbps:.2f} GB/s, {measured[0].cpu_s_per_gib:.2f} CPU s per GiB")
    rows, verdict = migration_rows(sizes, log, deadline)
    measured.append(loopback_ceiling(reps=2 if quick else 3, deadline=deadline))
    log(f"  loopback ceiling again: {measured[1].gbps:.2f} GB/s, "
        f"{measured[1].cpu_s_per_gib:.2f} CPU s per GiB")
    ceilings = [c.gbps for c in measured]
    ceiling = max(ceilings)  # the stricter bar on a machine whose speed varies
    log("[bold]two busy VMs on one host[/] ...")
    busy = busy_rates(log, deadline)
    random = [r for r in rows if r.scenario.startswith("random")]
    median_1ch = statistics.median(r.wire_gbps for r in random if r.channels == 1)
    median_2ch = statistics.median(r.wire_gbps for r in random if r.channels == 2)
    idle = [r.downtime_ms for r in rows if r.scenario.startswith("idle")]
    bars = {
        "one channel (median) / loopback ceiling (higher of two)": {
            "value": median_1ch / ceiling, "bar": ">= 0.5", "met": median_1ch / ceiling >= 0.5},
        "two channels (median) / loopback ceiling (higher of two)": {
            "value": median_2ch / ceiling, "bar": ">= 0.7", "met": median_2ch / ceiling >= 0.7},
        "idle guest downtime (ms, median)": {"value": statistics.median(idle), "bar": "< 50",
                                             "met": statistics.median(idle) < 50},
        "busy VM beside another / alone": {"value": busy["ratio"], "bar": ">= 0.8",
                                           "met": busy["ratio"] >= 0.8},
    }
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": machine_info(),
        "quick": quick,
        "loopback_ceiling_GBps": ceiling,
        "loopback_ceilings_GBps": ceilings,
        "loopback_cpu_s_per_gib": [c.cpu_s_per_gib for c in measured],
        "migrations": [r.__dict__ for r in rows],
        "selfcheck_after_ping_pong": verdict,
        "busy_vms": busy,
        "bars": bars,
        "duration_s": time.time() - t0,
    }
    _print(console, report)
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _print(console: Console, report: dict[str, Any]) -> None:
    t = Table(title=f"plain migration (loopback ceiling {report['loopback_ceiling_GBps']:.2f} GB/s)")
    for col in ("scenario", "RAM", "ch", "status", "total ms", "downtime ms", "setup ms",
                "guest GB/s", "wire GB/s", "rounds", "CPU s/GiB, cores"):
        t.add_column(col)
    for r in report["migrations"]:
        t.add_row(r["scenario"], f"{r['ram_gib']:g} GiB", str(r["channels"]), r["status"],
                  str(r["total_ms"]), str(r["downtime_ms"]), str(r["setup_ms"]),
                  f"{r['guest_gbps']:.2f}", f"{r['wire_gbps']:.2f}", str(r["rounds"]), cputime.cell(r))
    console.print(t)
    b = Table(title="bars (ratios measured in this run)")
    for col in ("measure", "value", "bar", "met"):
        b.add_column(col)
    for k, v in report["bars"].items():
        b.add_row(k, f"{v['value']:.2f}", v["bar"], "yes" if v["met"] else "NO")
    console.print(b)


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kind = "quick" if report["quick"] else "full"
    (directory / f"plain-{kind}-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Plain migration benchmark ({kind}), {report['date']}", "",
             f"Machine: {report['machine']}. Loopback ceiling (1 MiB sendall, 2 processes), "
             f"measured before and after the migrations: "
             f"{' and '.join(f'{c:.2f}' for c in report['loopback_ceilings_GBps'])} GB/s; "
             f"the bar uses the higher, **{report['loopback_ceiling_GBps']:.2f} GB/s**."
             + _loopback_cpu(report), "",
             "| scenario | RAM | channels | status | total ms | downtime ms | setup ms | guest GB/s "
             "| wire GB/s | rounds | CPU s per GiB (source + target), cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["migrations"]:
        lines.append(f"| {r['scenario']} | {r['ram_gib']:g} GiB | {r['channels']} | {r['status']} | "
                     f"{r['total_ms']} | {r['downtime_ms']} | {r['setup_ms']} | {r['guest_gbps']:.2f} | "
                     f"{r['wire_gbps']:.2f} | {r['rounds']} | {cputime.cell(r)} |")
    busy = report["busy_vms"]
    lines += ["", f"Guest self-check after the ping-pong: `{report['selfcheck_after_ping_pong']}`", "",
              f"Busy guest (dirty, unlimited rate, 16 MiB working set): alone {busy['alone']:.0f} "
              f"pages/s; the slower of two busy VMs side by side on the same host "
              f"{busy['beside']:.0f} pages/s (medians of alternated windows).", "",
              "| bar | value | target | met |", "|---|---|---|---|"]
    for k, v in report["bars"].items():
        lines.append(f"| {k} | {v['value']:.2f} | {v['bar']} | {'yes' if v['met'] else 'NO'} |")
    wire = chart_of(f"plain-{kind}-{stamp}", report)
    chart.save(wire, directory)
    lines += ["", wire.link, "", "Reproduce: `make bench` (or `confmig bench --save benchmarks/`)."]
    (directory / f"plain-{kind}-{stamp}.md").write_text("\n".join(lines) + "\n")
    (directory / f"plain-{kind}-latest.md").write_text("\n".join(lines) + "\n")


def _loopback_cpu(report: dict[str, Any]) -> str:
    cpu = report.get("loopback_cpu_s_per_gib")
    if not cpu:
        return ""
    return (f" The loopback itself cost {' and '.join(f'{c:.2f}' for c in cpu)} CPU s per GiB (sender "
            f"and receiver); the machine has {os.cpu_count()} cores.")


def chart_of(name: str, report: dict[str, Any]) -> Chart:
    """``{name}.png``, from the report's JSON alone: the wire throughput of each migration of a
    random guest against the loopback ceiling."""
    ceiling = report["loopback_ceiling_GBps"]
    bars = tuple(Bar(label=f"{r['scenario']}, {r['ram_gib']:g} GiB", value=r["wire_gbps"])
                 for r in report["migrations"] if r["scenario"].startswith("random"))
    return Chart(file=f"{name}.png", alt="wire throughput of each migration against the loopback ceiling",
                 title="plain migration of a random guest",
                 panels=(BarPanel(title="wire GB/s (transferred / total time)", bars=bars, unit=" GB/s",
                                  target=ceiling, target_label=f"loopback {ceiling:.2f} GB/s"),))
