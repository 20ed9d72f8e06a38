"""CPU time a migration costs each side: where the cores went.

The processes of one side are its host daemon with everything it started (the vCPU
processes, the Migration Handler's among them) and its VMM. Their user and system time is
read from ``/proc/<pid>/stat`` before and after a migration; the difference, in seconds, is
what the migration (and whatever else ran on that side meanwhile: an idle guest costs
little) took of the machine's cores. On a machine whose cores are all busy, throughput is
bounded by cores divided by CPU seconds per byte, whatever the pipeline.

Linux only (``/proc``); a process that ends inside the window counts up to its last reading
before it (none does in a migration: every process outlives it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from confmig.common.units import GiB

if TYPE_CHECKING:
    from confmig.bench.lab import VmProc

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """``(parent pid, user + system seconds)`` of ``pid``; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields follow its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _processes() -> dict[int, tuple[int, float]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    return table


def _trees(roots: Iterable[int], table: Mapping[int, tuple[int, float]]) -> set[int]:
    """``roots`` and every descendant of theirs in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


class CpuMeter:
    """CPU seconds of groups of process trees between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._before: dict[int, float] = {}
        self._started = 0.0
        self.elapsed = 0.0
        """Wall seconds from :meth:`start` to the last :meth:`stop`."""

    def start(self) -> None:
        self._before = {pid: cpu for pid, (_, cpu) in _processes().items()}
        self._started = time.monotonic()

    def stop(self, groups: Mapping[str, Iterable[int]]) -> dict[str, float]:
        """Seconds per group of trees, named by their roots as they are now (a process started
        inside the window counts from zero)."""
        table = _processes()
        self.elapsed = time.monotonic() - self._started
        return {name: round(sum(table[p][1] - self._before.get(p, 0.0) for p in _trees(roots, table)), 3)
                for name, roots in groups.items()}


def usage(seconds: Mapping[str, float], elapsed: float, ram: int) -> dict[str, float]:
    """What a report keeps of one measured migration of ``ram`` bytes that took ``elapsed``
    wall seconds: CPU seconds per GiB of each side, and the cores they kept busy on average
    (both sides' CPU time over wall time)."""
    per_gib = {side: round(s / (ram / GiB), 3) for side, s in seconds.items()}
    return {**per_gib, "cores": round(sum(seconds.values()) / elapsed, 2) if elapsed else 0.0}


@contextlib.contextmanager
def migration_cpu(src: VmProc, dst: VmProc, ram: int) -> Iterator[dict[str, float]]:
    """Meter a migration of ``ram`` bytes from ``src`` to ``dst``: the yielded dict is filled
    with :func:`usage` when the block ends (each side: its host's tree and its VMM's)."""
    meter = CpuMeter()
    meter.start()
    cpu: dict[str, float] = {}
    yield cpu
    seconds = meter.stop({"source": (src.host.proc.pid, src.proc.pid),
                          "target": (dst.host.proc.pid, dst.proc.pid)})
    cpu.update(usage(seconds, meter.elapsed, ram))


def cell(run: Mapping[str, object]) -> str:
    """A report's table cell: CPU seconds per GiB of both sides (each side's), and the cores
    kept busy; "-" for reports older than the column."""
    cpu = run.get("cpu")
    if not isinstance(cpu, Mapping):
        return "-"
    return (f"{cpu['source'] + cpu['target']:.2f} ({cpu['source']:.2f} + {cpu['target']:.2f}), "
            f"{cpu['cores']:.2f} cores")
