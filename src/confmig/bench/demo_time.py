"""``confmig bench --suite demo``: how long the default demo takes, start to exit, as a new
user runs it (``confmig demo`` in a process of its own, on this installation's state).

The bar is the one the demo was given: 5 s or less, once the installation exists (its
first run makes the emulated AMD root and the platform identities, as installing does).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from confmig.bench import chart
from confmig.bench.chart import Bar, BarPanel, Chart
from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.bench.lab import confmig_argv
from confmig.bench.perf import machine_info
from confmig.common.errors import ConfmigError
from confmig.common.pdeathsig import child_environment

RUNS = 5
BAR_S = 5.0
"""Seconds the default demo may take (issue 10)."""
RUN_TIMEOUT = 120.0
"""Seconds one demo may take before the benchmark gives up on it."""


def run_demo_benchmark(*, save_dir: str | None, runs: int = RUNS, deadline: Deadline = NO_DEADLINE
                       ) -> dict[str, Any]:
    console = Console()
    t0 = time.time()
    walls = []
    for n in range(runs + 1):  # the first makes the installation if there is none: not counted
        deadline.check("the demo benchmark")
        start = time.monotonic()
        done = subprocess.run(confmig_argv("demo", "--json"), capture_output=True, env=child_environment(),
                              timeout=min(RUN_TIMEOUT, deadline.remaining()), check=False)
        wall = time.monotonic() - start
        if done.returncode != 0:
            raise ConfmigError(f"confmig demo failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
        migration_ms = json.loads(done.stdout)["total-time-ms"]
        console.print(f"  demo {n}: {wall:.2f} s (migration {migration_ms} ms)"
                      + (" — warm-up, not counted" if n == 0 else ""))
        if n:
            walls.append(wall)
    median = statistics.median(walls)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "machine": machine_info(),
        "walls_s": walls,
        "median_s": median,
        "bar": {"value": median, "bar": f"<= {BAR_S:g} s", "met": median <= BAR_S},
    }
    console.print(f"default demo, start to exit: median {median:.2f} s of {runs} "
                  f"(bar <= {BAR_S:g} s: {'met' if median <= BAR_S else 'NOT met'})")
    if save_dir:
        _save(Path(save_dir), report)
    return report


def _save(directory: Path, report: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (directory / f"demo-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    walls = chart_of(f"demo-{stamp}", report)
    chart.save(walls, directory)
    bar = report["bar"]
    lines = [f"# The default demo's wall time, {report['date']}", "",
             f"Machine: {report['machine']}. `confmig demo` with its defaults, each in a process of its "
             "own, on this installation's kept state; one warm-up run first, not counted.", "",
             "| run | seconds |", "|---|---|",
             *[f"| {n} | {w:.2f} |" for n, w in enumerate(report["walls_s"], 1)], "",
             f"Median **{report['median_s']:.2f} s** "
             f"(bar {bar['bar']}: {'met' if bar['met'] else 'NOT met'}).",
             "", walls.link, "",
             "Reproduce: `confmig bench --suite demo --save benchmarks/`."]
    (directory / f"demo-{stamp}.md").write_text("\n".join(lines) + "\n")


def chart_of(name: str, report: dict[str, Any]) -> Chart:
    """``{name}.png``, from the report's JSON alone: each run's wall time against the bar."""
    return Chart(file=f"{name}.png", alt="wall time of each run", title="confmig demo, start to exit",
                 panels=(BarPanel(title="wall time (s) of each run",
                                  bars=tuple(Bar(label=f"run {n}", value=w, text=f"{w:.2f} s")
                                             for n, w in enumerate(report["walls_s"], 1)),
                                  target=BAR_S, target_label=f"bar {BAR_S:g} s"),))
