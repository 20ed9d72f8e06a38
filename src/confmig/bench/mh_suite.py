"""The ``--suite mh`` scenarios past the random guest (issue 11), run with its table in one run.

* **Dirty rates.** A guest that keeps writing while it moves: the ``dirty`` workload over
  every page of its workload memory (``wss=all``), prefilled with random pages, then
  rewriting a set share of the guest's pages per second (1, 5 and 10 %). Each path migrates
  it with the default downtime limit (300 ms) and a time limit of its own: a migration still
  running when the limit passes is cancelled (``migrate_cancel``; its source keeps the guest)
  and reported as not converged, not as an error of the benchmark. The guest's own write
  rate comes from its self-check counter (``writes=``), read before and after the migration.
* **Evacuating a host.** Four SEV guests on hostA, each dirtying pages at a modest rate, all
  migrated to hostB at once: four PSP migrations sharing each host's one PSP, then four
  Migration Handler migrations (one MH vCPU each; each target launched and attested by its
  guest's owner in MH target mode). Measured: from the first ``migrate`` to the last
  completion, and each guest's self-check on its target.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from confmig.bench.chart import BLUE, GREEN, GREY, Bar, BarPanel, Chart, Span, SpanPanel
from confmig.bench.deadline import Deadline, DeadlineExceeded, StepTimeout
from confmig.bench.lab import WORKING_SET_WRITTEN, HostProc, Lab, VmProc, VmSpec
from confmig.bench.scenario import (
    MH_TARGET_READY,
    MigrationSettings,
    mh_guest_args,
    prepare,
    sev_args,
    wait_status,
)
from confmig.common.errors import ConfmigError
from confmig.common.units import PAGE_SIZE, MiB, parse_size

Log = Callable[[str], None]

GUEST_TIMEOUT = 900.0
"""Seconds to fill, or to self-check, a 1 GiB SEV guest's RAM (every page through the core's MEE)."""
MH_TARGET_TIMEOUT = 300.0
"""Seconds for MH targets to boot their firmware: four of them with their sources on two cores."""
CANCEL_TIMEOUT = 60.0
"""Seconds a cancelled migration gets to end: its source stops at the next batch of pages."""
DOWNTIME_LIMIT_MS = MigrationSettings().downtime_limit_ms
"""The default downtime limit (300 ms): what the dirty-rate runs migrate with."""
DOWNTIME_BAR_MS = 300
"""Issue 11's bar: MH downtime at most this for a 1 GiB guest dirtying 5 % of its pages per second."""
BAR_RATE_PCT = 5
SELFCHECK_WRITES = re.compile(r"confmig-selfcheck: PASS pages=\d+ writes=(\d+)")
WORKING_SET_PAGES = re.compile(rb"dirty: working set written \((\d+) pages\)")
FINISHED = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True, kw_only=True)
class MhScenarios:
    """The sizes of the dirty-rate and evacuation scenarios."""

    dirty_ram: str = "1G"
    rates_pct: tuple[int, ...] = (1, 5, 10)
    """Pages rewritten per second, in % of the guest's pages (RAM / 4 KiB)."""
    dirty_kinds: tuple[str, ...] = ("plain", "psp", "mh-1", "mh-2")
    dirty_limit_s: float = 180.0
    """Seconds one dirty-rate migration may run before it is cancelled as not converging: the
    PSP path's 1 GiB at 1 %/s converges in about two minutes here, at 5 %/s it never does."""
    before_window_s: float = 5.0
    """Seconds the guest writes alone after its prefill: its rate before the migration."""
    evac_guests: int = 4
    evac_ram: str = "256M"
    evac_rate: int = 500
    evac_wss: str = "64M"
    evac_kinds: tuple[str, ...] = ("psp", "mh-1")
    evac_limit_s: float = 600.0
    """Seconds each evacuation migration may run (four through one PSP take minutes)."""
    quick: bool = False

    def dirty_guest(self, rate: int | str) -> str:
        return f"dirty,rate={rate},wss=all,fill=random,prefill=on"

    def evac_guest(self) -> str:
        return f"dirty,rate={self.evac_rate},wss={self.evac_wss},fill=random,prefill=on"

    def rate_pages(self, pct: int) -> int:
        return round(parse_size(self.dirty_ram) // PAGE_SIZE * pct / 100)


FULL = MhScenarios()
QUICK = MhScenarios(dirty_ram="128M", rates_pct=(BAR_RATE_PCT,), dirty_kinds=("plain", "psp", "mh-1"),
                    dirty_limit_s=30.0, before_window_s=2.0, evac_ram="64M", evac_rate=200,
                    evac_wss="16M", evac_limit_s=120.0, quick=True)
"""A smoke run of the same code: small guests, one rate."""


# --- the paths -----------------------------------------------------------------------------------

def mh_vcpus_of(kind: str) -> int:
    """``mh-N``: N MH vCPUs; 0 for ``plain`` and ``psp``."""
    return int(kind.removeprefix("mh-")) if kind.startswith("mh-") else 0


def target_name(source: str) -> str:
    return "dst" + source.removeprefix("src")


def settings_for(kind: str, lab: Lab) -> MigrationSettings:
    if mh_vcpus_of(kind):
        return MigrationSettings(confidential_backend="mh")
    return MigrationSettings(sev_target_certs=kind == "psp", amd_root=lab.amd_root)


def start_sources(lab: Lab, kind: str, hosts: Sequence[HostProc], ram: str, guest: str,
                  names: Sequence[str]) -> tuple[list[VmProc], list[VmProc]]:
    """Guests ``names`` of path ``kind`` on ``hosts[0]``, started side by side. The MH path's
    targets start with them on ``hosts[1]``, each pair launched by an owner of its own who
    gives both the same transport key (a target's firmware then runs only its MH); the other
    paths' targets come later (:func:`start_targets`), once the sources filled their RAM."""
    a, b = hosts
    mh_vcpus = mh_vcpus_of(kind)
    if not mh_vcpus:
        extra = tuple(sev_args()) if kind == "psp" else ()
        return lab.start_vms(*(VmSpec(name=n, host=a, ram=ram, guest=guest, extra=extra) for n in names)), []
    specs = []
    for name in names:  # an owner of its own, with a key of its own, for every guest
        source, target = mh_guest_args(lab, mh_vcpus)
        specs += [VmSpec(name=name, host=a, ram=ram, guest=guest, extra=source),
                  VmSpec(name=target_name(name), host=b, ram=ram, guest=guest, extra=target)]
    vms = lab.start_vms(*specs)
    sources, targets = vms[0::2], vms[1::2]
    for t in targets:
        t.wait_console(MH_TARGET_READY, timeout=MH_TARGET_TIMEOUT)
    return sources, targets


def start_targets(lab: Lab, kind: str, host: HostProc, ram: str, guest: str,
                  names: Sequence[str]) -> list[VmProc]:
    """The plain or PSP targets of sources ``names``, waiting with ``-incoming defer``."""
    extra = tuple(sev_args()) if kind == "psp" else ()
    return lab.start_vms(*(VmSpec(name=target_name(n), host=host, ram=ram, guest=guest, incoming="defer",
                                  extra=extra) for n in names))


# --- migrations with a time limit, several at once -----------------------------------------------

@dataclass
class Flight:
    """One migration of a batch started together and watched until each ends."""

    name: str
    src: VmProc
    dst: VmProc
    settings: MigrationSettings
    uri: str = ""
    started: float = 0.0
    ended: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """The source's ``query-migrate`` once the migration ended."""
    last_active: dict[str, Any] = field(default_factory=dict)
    """Its last ``query-migrate`` while active: how far a cancelled one had come."""
    hit_limit: bool = False

    def prepare(self) -> None:
        """What :func:`confmig.bench.scenario.migrate` does before ``migrate``."""
        self.uri = prepare(self.src, self.dst, self.settings)

    def start(self) -> None:
        self.started = time.monotonic()
        self.src.qmp.execute("migrate", uri=self.uri)

    def poll(self) -> bool:
        if self.ended is not None:
            return True
        info: dict[str, Any] = self.src.qmp.execute("query-migrate")
        if info.get("status") in FINISHED:
            self.info, self.ended = info, time.monotonic()
            return True
        if info.get("status") == "active":
            self.last_active = info
        return False

    def cancel(self) -> None:
        with contextlib.suppress(ConfmigError, OSError):
            self.src.qmp.execute("migrate_cancel")  # the source keeps its guest

    @property
    def completed(self) -> bool:
        return self.info.get("status") == "completed"


def migrate_bounded(flights: Sequence[Flight], limit_s: float) -> None:
    """Start every migration, back to back, and wait for all; one still running ``limit_s``
    after its start is cancelled. The lab's deadline bounds the whole wait too."""
    if not flights:
        return
    deadline = flights[0].src.deadline
    for f in flights:
        f.prepare()
    for f in flights:
        f.start()

    def all_ended() -> bool | None:
        pending = [f for f in flights if not f.poll()]
        now = time.monotonic()
        for f in pending:
            if not f.hit_limit and now - f.started >= limit_s:
                f.hit_limit = True
                f.cancel()
        return None if pending else True

    try:
        deadline.wait("the migrations to end", all_ended, timeout=limit_s + CANCEL_TIMEOUT)
    except (StepTimeout, DeadlineExceeded):
        for f in flights:
            if f.ended is None:
                f.cancel()
        raise
    for f in flights:
        if f.completed:
            wait_status(f.dst, "running")


def flight_row(f: Flight, limit_s: float) -> dict[str, Any]:
    """What one migration reports: QMP's numbers once it completed; how far it had come (its
    last ``query-migrate`` while active) if it did not."""
    info, active = f.info, f.last_active
    assert f.ended is not None
    status = str(info.get("status"))
    if status == "cancelled" and f.hit_limit:
        status = f"did not converge within {limit_s:g} s"
    extra = info.get("x-confmig", {})
    last_ram = active.get("ram", {})
    syncs = int(last_ram.get("dirty-sync-count", 1))  # 1 at setup, then one per round done
    row: dict[str, Any] = {
        "status": status,
        "converged": f.completed,
        "limit_s": limit_s,
        "error": info.get("error-desc"),
        "wall_ms": int((f.ended - f.started) * 1000),
        "total_ms": int(info["total-time"]) if f.completed else None,
        "downtime_ms": info.get("downtime") if f.completed else None,
        "rounds": extra.get("rounds") if f.completed else None,
        "rounds_done": extra.get("rounds") if f.completed else max(syncs - 1, 0),
        "transferred": info.get("ram", last_ram).get("transferred", 0),
        "downtime_breakdown_ms": extra.get("downtime-breakdown-ms"),
        "confidential": extra.get("confidential"),
    }
    if not f.completed:
        row["last_round"] = {"remaining_bytes": last_ram.get("remaining"),
                             "expected_downtime_ms": active.get("expected-downtime"),
                             "dirty_pages_rate": last_ram.get("dirty-pages-rate"),
                             "mbps": last_ram.get("mbps")}
    return row


# --- the guest's write rate ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Writes:
    """A self-check's verdict with the guest's write counter and when it was asked and answered
    (the dirty workload does not write while it checks)."""

    line: str
    writes: int | None
    asked: float
    answered: float


def read_writes(vm: VmProc) -> Writes:
    asked = time.monotonic()
    line = vm.selfcheck(timeout=GUEST_TIMEOUT)
    m = SELFCHECK_WRITES.search(line)
    return Writes(line=line, writes=int(m.group(1)) if m else None, asked=asked, answered=time.monotonic())


def _rate(w0: int | None, t0: float, w1: int | None, t1: float) -> float | None:
    return (w1 - w0) / (t1 - t0) if w0 is not None and w1 is not None and t1 > t0 else None


# --- dirty rates ---------------------------------------------------------------------------------

def dirty_rates(sc: MhScenarios, log: Log, deadline: Deadline) -> dict[str, Any]:
    ram_size = parse_size(sc.dirty_ram)
    runs = [_dirty_one(kind, pct, sc, log, deadline) for pct in sc.rates_pct for kind in sc.dirty_kinds]
    return {
        "ram": sc.dirty_ram,
        "ram_bytes": ram_size,
        "guest_pages": ram_size // PAGE_SIZE,
        "rates_pct": list(sc.rates_pct),
        "rates_pages_per_s": [sc.rate_pages(p) for p in sc.rates_pct],
        "guest": sc.dirty_guest("R"),
        "downtime_limit_ms": DOWNTIME_LIMIT_MS,
        "limit_s": sc.dirty_limit_s,
        "before_window_s": sc.before_window_s,
        "runs": runs,
    }


def _dirty_one(kind: str, pct: int, sc: MhScenarios, log: Log, deadline: Deadline) -> dict[str, Any]:
    rate = sc.rate_pages(pct)
    guest = sc.dirty_guest(rate)
    with Lab(deadline=deadline) as lab:
        hosts = lab.start_hosts("hostA", "hostB")
        (src,), targets = start_sources(lab, kind, hosts, sc.dirty_ram, guest, ["src"])
        log(f"dirty {pct}%/s ({rate} pages/s), {kind}: prefilling {sc.dirty_ram} of random pages ...")
        ready = src.wait_console(WORKING_SET_PAGES, timeout=GUEST_TIMEOUT)
        t_ready, ws_pages = time.monotonic(), int(ready.group(1))
        (dst,) = targets or start_targets(lab, kind, hosts[1], sc.dirty_ram, guest, ["src"])
        time.sleep(max(0.0, t_ready + sc.before_window_s - time.monotonic()))
        before = read_writes(src)
        flight = Flight(name="src", src=src, dst=dst, settings=settings_for(kind, lab))
        migrate_bounded([flight], sc.dirty_limit_s)
        row = flight_row(flight, sc.dirty_limit_s)
        checked_on = "target" if flight.completed else "source"
        status_now = (dst if flight.completed else src).qmp.execute("query-status")["status"]
        after = read_writes(dst if flight.completed else src) if status_now == "running" else None
    row.update({
        "kind": kind, "rate_pct": pct, "rate_pages_per_s": rate, "working_set_pages": ws_pages,
        "guest_rate_before": _rate(ws_pages, t_ready, before.writes, before.asked),
        "guest_rate_during": (_rate(before.writes, before.answered, after.writes, after.asked)
                              if after else None),
        "selfcheck_before": before.line,
        "selfcheck": after.line if after else f"not checked: the {checked_on} is {status_now}",
        "selfcheck_on": checked_on,
    })
    log(f"  {kind} at {pct}%/s: {row['status']}, {_ms(row['total_ms'] or row['wall_ms'])} ms, "
        f"downtime {row['downtime_ms']} ms, rounds {row['rounds_done']}, guest "
        f"{_num(row['guest_rate_before'])} pages/s before, {_num(row['guest_rate_during'])} during; "
        f"{checked_on}: {row['selfcheck']}")
    return row


def downtime_bars(dirty: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's downtime bar, for each MH path at the bar's rate."""
    full_size = dirty["ram_bytes"] == 1 << 30
    out = []
    for r in dirty["runs"]:
        if r["rate_pct"] != BAR_RATE_PCT or not r["kind"].startswith("mh-"):
            continue
        met = r["converged"] and r["downtime_ms"] is not None and r["downtime_ms"] <= DOWNTIME_BAR_MS
        out.append({
            "bar": f"{r['kind']} downtime, {dirty['ram']} guest dirtying {BAR_RATE_PCT}% of its pages/s"
                   + ("" if full_size else " (smaller than the bar's 1 GiB guest)"),
            "value": r["downtime_ms"] if r["converged"] else r["status"],
            "target": f"<= {DOWNTIME_BAR_MS} ms",
            "met": bool(met),
        })
    return out


# --- evacuating a host ---------------------------------------------------------------------------

def evacuation(sc: MhScenarios, log: Log, deadline: Deadline) -> dict[str, Any]:
    return {
        "guests": sc.evac_guests,
        "ram": sc.evac_ram,
        "guest": sc.evac_guest(),
        "limit_s": sc.evac_limit_s,
        "paths": [_evacuate(kind, sc, log, deadline) for kind in sc.evac_kinds],
    }


def _evacuate(kind: str, sc: MhScenarios, log: Log, deadline: Deadline) -> dict[str, Any]:
    guest = sc.evac_guest()
    names = [f"src{i}" for i in range(1, sc.evac_guests + 1)]
    with Lab(deadline=deadline) as lab:
        hosts = lab.start_hosts("hostA", "hostB")
        sources, targets = start_sources(lab, kind, hosts, sc.evac_ram, guest, names)
        log(f"evacuation, {kind}: {len(names)} guests of {sc.evac_ram} ({guest}) on hostA ...")
        for s in sources:
            s.wait_console(WORKING_SET_WRITTEN, timeout=GUEST_TIMEOUT)
        targets = targets or start_targets(lab, kind, hosts[1], sc.evac_ram, guest, names)
        flights = [Flight(name=n, src=s, dst=d, settings=settings_for(kind, lab))
                   for n, s, d in zip(names, sources, targets, strict=True)]
        migrate_bounded(flights, sc.evac_limit_s)
        verdicts = [f.dst.selfcheck(timeout=GUEST_TIMEOUT) if f.completed else "" for f in flights]
    t0 = min(f.started for f in flights)
    rows = []
    for f, verdict in zip(flights, verdicts, strict=True):
        row = {"name": f.name, **flight_row(f, sc.evac_limit_s), "selfcheck": verdict,
               "start_s": f.started - t0}
        assert f.ended is not None
        # The source's own total-time from its migrate command: the end of its migration.
        row["end_s"] = row["start_s"] + (row["total_ms"] / 1000 if f.completed else f.ended - f.started)
        rows.append(row)
    all_done = all(f.completed for f in flights)
    result = {
        "kind": kind,
        "all_completed": all_done,
        "time_to_empty_s": max(r["end_s"] for r in rows) if all_done else None,
        "observed_s": max(f.ended or 0.0 for f in flights) - t0,
        "start_spread_s": max(r["start_s"] for r in rows),
        "guests": rows,
    }
    empty = f"{result['time_to_empty_s']:.1f} s" if all_done else "not emptied"
    log(f"  {kind}: hostA empty after {empty}; " + "; ".join(
        f"{r['name']} {r['status']} {_ms(r['total_ms'] or r['wall_ms'])} ms" for r in rows))
    return result


# --- reporting -----------------------------------------------------------------------------------

def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ms(v: int | None) -> str:
    return "-" if v is None else str(v)


def _rounds(r: dict[str, Any]) -> str:
    if r["converged"]:
        return str(r["rounds"])
    return f"{r['rounds_done']} done, cancelled in round {r['rounds_done'] + 1}"


def _breakdown(r: dict[str, Any]) -> str:
    parts = r.get("downtime_breakdown_ms") or {}
    if "final-ram" not in parts:
        return "-"
    return f"{parts['final-ram']:.0f} / {parts.get('target-resume', 0):.0f}"


def _last_round(r: dict[str, Any]) -> str:
    last = r.get("last_round")
    if not last or last["remaining_bytes"] is None or not r["rounds_done"]:
        return ""
    return (f"after round {r['rounds_done']}: {last['remaining_bytes'] / MiB:.0f} MiB dirty, expected "
            f"downtime {last['expected_downtime_ms']} ms")


def print_tables(console: Console, dirty: dict[str, Any] | None, evac: dict[str, Any] | None) -> None:
    if dirty:
        t = Table(title=f"dirty guest, {dirty['ram']}, downtime limit {dirty['downtime_limit_ms']} ms, "
                        f"time limit {dirty['limit_s']:g} s")
        for col in ("rate", "path", "status", "total ms", "downtime ms", "rounds", "guest pages/s before",
                    "during", "self-check"):
            t.add_column(col)
        for r in dirty["runs"]:
            t.add_row(f"{r['rate_pct']}% ({r['rate_pages_per_s']}/s)", r["kind"], r["status"],
                      _ms(r["total_ms"] or r["wall_ms"]), _ms(r["downtime_ms"]), _rounds(r),
                      _num(r["guest_rate_before"]), _num(r["guest_rate_during"]),
                      f"{r['selfcheck_on']}: {r['selfcheck'].removeprefix('confmig-selfcheck: ')}")
        console.print(t)
    if evac:
        t = Table(title=f"evacuating hostA: {evac['guests']} SEV guests of {evac['ram']} at once")
        for col in ("path", "guest", "status", "start s", "end s", "total ms", "downtime ms", "rounds",
                    "self-check on target"):
            t.add_column(col)
        for p in evac["paths"]:
            for r in p["guests"]:
                t.add_row(p["kind"], r["name"], r["status"], f"{r['start_s']:.2f}", f"{r['end_s']:.1f}",
                          _ms(r["total_ms"] or r["wall_ms"]), _ms(r["downtime_ms"]), _rounds(r),
                          r["selfcheck"].removeprefix("confmig-selfcheck: "))
        console.print(t)
        for p in evac["paths"]:
            empty = f"{p['time_to_empty_s']:.1f} s" if p["all_completed"] else "not emptied"
            console.print(f"{p['kind']}: hostA empty after {empty}")


def dirty_markdown(dirty: dict[str, Any], chart: Chart) -> list[str]:
    rates = ", ".join(f"{p}% = {n} pages/s" for p, n in zip(dirty["rates_pct"], dirty["rates_pages_per_s"],
                                                          strict=True))
    ws = {r["working_set_pages"] for r in dirty["runs"]}
    lines = [
        f"A {dirty['ram']} guest ({dirty['guest_pages']} pages) running `{dirty['guest']}`: every page of "
        f"its workload memory is its working set (wss=all: {' or '.join(map(str, sorted(ws)))} pages), "
        f"first written with random contents at full "
        f"speed (prefill), then rewritten at R pages/s, R a share of the guest's pages: {rates}. Each path "
        f"migrates it with the default downtime limit ({dirty['downtime_limit_ms']} ms) and a time limit of "
        f"{dirty['limit_s']:g} s: a migration still running then is cancelled (`migrate_cancel`; the source "
        f"keeps its guest) and reported as not converged.", "",
        f"Guest pages/s: the guest's own write counter (the `writes=` of its self-check): *before*, over "
        f"about {dirty['before_window_s']:g} s after its prefill on the source (a plain or PSP target VM "
        f"starts meanwhile); *during*, from the end of that self-check to its self-check after the "
        f"migration (on the target, or on the source after a cancel), so mostly the migration. After "
        f"each pause (a self-check, the switch-over) the workload catches up on at most 100 ms of writes, "
        f"which shows in short windows. Total ms is the source's total-time; for a cancelled migration, "
        f"the wall time from `migrate` to the end of the cancel. Downtime: from stopping the guest to the "
        f"target's word that it runs; *final RAM* is the part spent sending the last dirty pages, "
        f"*resume* the part waiting for the target (the source's downtime breakdown).", "",
        "| rate | path | status | total ms | downtime ms | final RAM / resume ms | rounds | MB sent "
        "| guest pages/s before | guest pages/s during | self-check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in dirty["runs"]:
        note = _last_round(r)
        lines.append(
            f"| {r['rate_pct']}% ({r['rate_pages_per_s']}/s) | {r['kind']} | {r['status']}"
            f"{f' ({note})' if note else ''} | {_ms(r['total_ms'] or r['wall_ms'])} "
            f"| {_ms(r['downtime_ms'])} | {_breakdown(r)} | {_rounds(r)} | {r['transferred'] / 1e6:.0f} "
            f"| {_num(r['guest_rate_before'])} | {_num(r['guest_rate_during'])} "
            f"| {r['selfcheck_on']}: `{r['selfcheck']}` |")
    over = [r for r in dirty["runs"] if r["converged"] and r["downtime_ms"] > dirty["downtime_limit_ms"]]
    if over:
        lines += ["", "Above the downtime limit although the migration converged: " + ", ".join(
            f"{r['kind']} at {r['rate_pct']}% ({r['downtime_ms']} ms, final RAM / resume {_breakdown(r)} ms)"
            for r in over) + ". The switch-over rule (QEMU's) stops the guest once the dirty bytes left "
            "would take at most the limit at the last round's bandwidth; the final round took longer "
            "than that estimate."]
    lines += ["", chart.link]
    return lines


def dirty_chart(dirty: dict[str, Any], name: str) -> Chart:
    """``{name}-dirty.png``: each path's downtime at each dirty rate, against the bar, and how
    long each migration took (a cancelled one, grey: until its cancel)."""
    downtime, total = [], []
    for r in dirty["runs"]:
        label = f"{r['rate_pct']}%/s, {r['kind']}"
        if r["converged"]:
            downtime.append(Bar(label=label, value=float(r["downtime_ms"]), text=f"{r['downtime_ms']} ms"))
            total.append(Bar(label=label, value=r["total_ms"] / 1000, text=f"{r['total_ms'] / 1000:.1f} s"))
        else:
            downtime.append(Bar(label=label, value=0.0, text=r["status"], color=GREY))
            total.append(Bar(label=label, value=(r["total_ms"] or r["wall_ms"] or 0) / 1000, text=r["status"],
                             color=GREY))
    return Chart(file=f"{name}-dirty.png", alt="downtime and total time of each path at each dirty rate",
                 title=f"{dirty['ram']} guest dirtying R% of its pages per second",
                 panels=(BarPanel(title="downtime (ms) of each path at each rate R", bars=tuple(downtime),
                                  target=float(DOWNTIME_BAR_MS), target_label=f"bar {DOWNTIME_BAR_MS} ms"),
                         BarPanel(title="total time (s) of each migration", bars=tuple(total))))


def evacuation_markdown(evac: dict[str, Any], chart: Chart) -> list[str]:
    lines = [
        f"{evac['guests']} SEV guests of {evac['ram']} each on hostA, each running `{evac['guest']}`, "
        f"migrated to hostB at once: the {evac['guests']} `migrate` commands go out back to back "
        f"(prepared first: certificates, target challenges) and the run waits for all. PSP path: every "
        f"migration's pages go through hostA's one PSP and hostB's one PSP. Migration Handler path: "
        f"one MH vCPU per guest; each guest and its target launched by an owner of its own (its own "
        f"transport key), the target in MH target mode. Time limit per migration: {evac['limit_s']:g} s. "
        f"Time to empty the host: from the first `migrate` to the end of the last migration (its "
        f"source's total-time after its own `migrate`).", "",
        "| path | time to empty hostA | guests completed | first to last `migrate` |",
        "|---|---|---|---|",
    ]
    for p in evac["paths"]:
        empty = f"**{p['time_to_empty_s']:.1f} s**" if p["all_completed"] else "not emptied"
        done = sum(1 for r in p["guests"] if r["converged"])
        lines.append(f"| {p['kind']} | {empty} | {done} of {len(p['guests'])} "
                     f"| {p['start_spread_s'] * 1000:.0f} ms |")
    lines += ["", "| path | guest | status | start s | end s | total ms | downtime ms | rounds | MB sent "
              "| self-check on its target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in evac["paths"]:
        for r in p["guests"]:
            lines.append(f"| {p['kind']} | {r['name']} | {r['status']} | {r['start_s']:.2f} "
                         f"| {r['end_s']:.1f} | {_ms(r['total_ms'] or r['wall_ms'])} "
                         f"| {_ms(r['downtime_ms'])} | {_rounds(r)} "
                         f"| {r['transferred'] / 1e6:.0f} | `{r['selfcheck']}` |")
    lines += ["", chart.link]
    return lines


def evacuation_chart(evac: dict[str, Any], name: str) -> Chart:
    """``{name}-evacuation.png``: each guest's migration on one time axis, path after path."""
    spans = []
    for p in evac["paths"]:
        for r in p["guests"]:
            spans.append(Span(label=f"{p['kind']}: {r['name']}", start=r["start_s"], end=r["end_s"],
                              text=f"{r['end_s']:.1f} s" + ("" if r["converged"] else f" ({r['status']})"),
                              color=BLUE if p["kind"] == "psp" else GREEN))
    return Chart(file=f"{name}-evacuation.png", alt="each guest's migration on one time axis per path",
                 title=f"evacuating hostA: {evac['guests']} guests of {evac['ram']}",
                 panels=(SpanPanel(title="each guest's migration, seconds from the first migrate",
                                   spans=tuple(spans)),))
