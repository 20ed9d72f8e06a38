"""The CPU meter counts a side's whole process tree, and only it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from confmig.bench.cputime import CpuMeter, cell, migration_cpu, usage
from confmig.common.units import MiB

if TYPE_CHECKING:
    from confmig.bench.lab import VmProc

BURN = 0.3
"""CPU seconds the grandchild spends: it loops until its own CPU clock says so."""
BURNER = f"import time\nwhile time.process_time() < {BURN}:\n    pass\ninput()\n"
"""Burns, then waits for its stdin to close (it outlives the measurement)."""


def test_a_grandchilds_cpu_counts_for_its_side_and_not_for_the_other() -> None:
    idle = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True); input()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert idle.stdout is not None and idle.stdout.readline() == b"ready\n"  # started up
    meter = CpuMeter()
    meter.start()
    # Started inside the window, the busy side counts from zero. Its root only starts the burner
    # and waits: the CPU is its grandchild's.
    busy = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys\n"
                             f"subprocess.run([sys.executable, '-c', {BURNER!r}])"], stdin=subprocess.PIPE)
    try:
        groups = {"busy": [busy.pid], "idle": [idle.pid]}
        deadline = time.monotonic() + 60
        while (seconds := meter.stop(groups))["busy"] < BURN and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for p in (busy, idle):
            assert p.stdin is not None
            p.stdin.close()
            p.wait(30)
    assert seconds["busy"] >= BURN
    assert seconds["idle"] < 0.05


def test_usage_is_per_gib_of_each_side_and_cores_over_the_window() -> None:
    cpu = usage({"source": 1.0, "target": 0.5}, 2.0, 512 * MiB)
    assert cpu == {"source": 2.0, "target": 1.0, "cores": 0.75}
    assert cell({"cpu": cpu}) == "3.00 (2.00 + 1.00), 0.75 cores"
    assert cell({"kind": "plain"}) == "-"  # a report from before the column


def test_migration_cpu_fills_in_both_sides_when_the_block_ends() -> None:
    me = SimpleNamespace(pid=os.getpid())
    vm = cast("VmProc", SimpleNamespace(proc=me, host=SimpleNamespace(proc=me)))
    with migration_cpu(vm, vm, 256 * MiB) as cpu:
        assert cpu == {}  # nothing known before the migration ends
        end = time.process_time() + 0.1
        while time.process_time() < end:
            pass
    assert cpu["source"] >= 0.08 * 4 and cpu["target"] == cpu["source"] and cpu["cores"] > 0
