"""A saved benchmark report: its JSON, its Markdown beside it, and the charts they show.

A report's charts are drawn from its JSON alone, so they can be drawn again, in a new style
or format, without running the benchmark again::

    python -m confmig.bench.report benchmarks/mh-20261207-001343.json [more.json ...]

writes the report's PNGs beside its JSON and points every Markdown file in that folder that
shows one of its charts (the report and a ``*-latest.md`` of the same run) at them. Only the
images and their links change: every number stays the one the run saved. A chart that the
PNG replaces (an SVG of the same name) is removed once no Markdown file there links it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confmig.bench import chart, confidential, demo_time, local_suite, perf
from confmig.bench.chart import Chart
from confmig.common.errors import ConfmigError

MAX_REPORT_BYTES = 16 * 1024 * 1024
"""A saved report's JSON: the largest so far is tens of kilobytes."""
REPLACED_SUFFIXES = (".svg", ".png")
"""What a chart's link may point at before it is redrawn: the old SVG charts, or a PNG."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Redrawn:
    written: tuple[Path, ...]
    """The PNGs."""
    relinked: tuple[Path, ...]
    """The Markdown files whose links changed."""
    removed: tuple[Path, ...]
    """Replaced charts that nothing linked any more."""


def charts_of(name: str, report: dict[str, Any]) -> tuple[Chart, ...]:
    """The charts of the report saved as ``{name}.json``, told apart by what the JSON holds."""
    if "psp_cost_model" in report:  # --suite psp and --suite mh
        return tuple(confidential.charts_of(name, report).values())
    if "walls_s" in report:  # --suite demo
        return (demo_time.chart_of(name, report),)
    if "loopback_ceiling_GBps" in report:  # the plain benchmark
        return (perf.chart_of(name, report),)
    if "handovers_per_guest" in report:  # --suite local
        return (local_suite.chart_of(name, report),)
    raise ConfmigError(f"{name}.json: not a saved benchmark report that has charts")


def redraw(json_path: Path) -> Redrawn:
    """Draw the charts of the report saved at ``json_path`` beside it; relink its Markdown."""
    if json_path.stat().st_size > MAX_REPORT_BYTES:
        raise ConfmigError(f"{json_path}: larger than {MAX_REPORT_BYTES} bytes, not a saved report")
    directory = json_path.parent
    charts = charts_of(json_path.stem, json.loads(json_path.read_text()))
    written = tuple(chart.save(c, directory) for c in charts)
    relinked = []
    for md in sorted(directory.glob("*.md")):
        text = md.read_text()
        new = text
        for c in charts:
            new = _link_pattern(c).sub(c.link.replace("\\", "\\\\"), new)
        if new != text:
            md.write_text(new)
            relinked.append(md)
    links = "".join(md.read_text() for md in directory.glob("*.md"))
    removed = []
    for c in charts:
        for old in (directory / Path(c.file).with_suffix(s).name for s in REPLACED_SUFFIXES):
            if old.name != c.file and old.exists() and f"({old.name})" not in links:
                old.unlink()
                removed.append(old)
    return Redrawn(written=written, relinked=tuple(relinked), removed=tuple(removed))


def _link_pattern(c: Chart) -> re.Pattern[str]:
    """A Markdown image link to the chart's file under any name it may have had."""
    suffixes = "|".join(re.escape(s) for s in REPLACED_SUFFIXES)
    return re.compile(rf"!\[[^\]\n]*\]\({re.escape(Path(c.file).stem)}(?:{suffixes})\)")


def main(argv: list[str]) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m confmig.bench.report REPORT.json [REPORT.json ...]", file=sys.stderr)
        return 2
    for arg in argv:
        done = redraw(Path(arg))
        for what, paths in (("wrote", done.written), ("relinked", done.relinked), ("removed", done.removed)):
            for p in paths:
                print(f"{what} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
