"""Charts for saved benchmark reports: PNG images beside each Markdown report and its JSON.

A :class:`Chart` is one image of a report: one or more panels stacked on one figure, each a
list of labelled values (one horizontal bar each, with an optional target line) or of
intervals on one time axis. Everything a chart shows comes from the report's JSON, so a
saved report's charts can be drawn again without running its benchmark
(:mod:`confmig.bench.report`).

matplotlib draws them (the ``bench`` extra), on its Agg canvas: no display, no pyplot and no
global backend. It is imported only when a chart is drawn, so an installation without the
extra still imports every benchmark module. The images are reproducible: matplotlib's
default style whatever the local ``matplotlibrc`` says, no software or time stamp in the
PNG, and a size that depends only on the number of rows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from confmig.common.errors import ConfmigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DPI = 100
WIDTH_PX = 900
"""Every chart's width: the column of a rendered Markdown page."""
TITLE_PX = 40
"""The figure's title line."""
PANEL_PX = 90
"""A panel's own title, its x axis and the margins around it."""
ROW_PX = 26
"""One bar or interval."""
MAX_ROWS = 100
"""Rows per panel: a longer chart cannot be read, and this bounds the image's height."""

BLUE = "#4a7ab5"
GREEN = "#2e8b57"
GREY = "#9a9a9a"
"""What did not happen: a migration that did not complete."""
TARGET_COLOR = "#c0392b"
HEADROOM = 1.35
"""The x axis runs to this times the largest value: room for the text after each bar."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bar:
    label: str
    value: float
    text: str = ""
    """What to print after the bar (default: the value and the panel's unit)."""
    color: str = BLUE


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """One interval of a timeline: ``start`` to ``end`` on the panel's axis."""

    label: str
    start: float
    end: float
    text: str = ""
    """What to print after the interval (default: its length)."""
    color: str = BLUE


@dataclass(frozen=True, slots=True, kw_only=True)
class BarPanel:
    """One bar per entry, in order from the top, scaled to the largest value or the target."""

    title: str
    bars: tuple[Bar, ...]
    unit: str = ""
    target: float | None = None
    target_label: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanPanel:
    """One row per interval, on one axis from 0 to the latest end: things that ran at the
    same time, and when the last of them ended."""

    title: str
    spans: tuple[Span, ...]
    unit: str = " s"


Panel = BarPanel | SpanPanel


@dataclass(frozen=True, slots=True, kw_only=True)
class Chart:
    """One image of a report: its file name beside the report, what the report's link to it
    says, and its panels from top to bottom."""

    file: str
    alt: str
    title: str
    panels: tuple[Panel, ...]

    @property
    def link(self) -> str:
        """The report's Markdown line that shows the image."""
        return f"![{self.alt}]({self.file})"


def _rows(panel: Panel) -> int:
    return len(panel.bars) if isinstance(panel, BarPanel) else len(panel.spans)


def size_px(chart: Chart) -> tuple[int, int]:
    """Width and height of the chart's PNG."""
    return WIDTH_PX, TITLE_PX + sum(PANEL_PX + ROW_PX * max(_rows(p), 1) for p in chart.panels)


def png(chart: Chart) -> bytes:
    """The chart drawn as a PNG file."""
    try:
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfmigError("benchmark charts need matplotlib: pip install -e '.[bench]' "
                           "(make bench does)") from exc
    if not chart.panels:
        raise ValueError(f"chart {chart.file} has no panels")
    for panel in chart.panels:
        if _rows(panel) > MAX_ROWS:
            raise ValueError(f"chart {chart.file}: {_rows(panel)} rows in one panel, at most {MAX_ROWS}")
    width, height = size_px(chart)
    with matplotlib.style.context("default"):
        # Agg truncates the figure's size in pixels: half a pixel more makes it exact.
        fig = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(chart.title, fontsize=12, fontweight="bold")
        axes = fig.subplots(len(chart.panels), 1, squeeze=False,
                            height_ratios=[PANEL_PX + ROW_PX * max(_rows(p), 1) for p in chart.panels])
        for ax, panel in zip(axes[:, 0], chart.panels, strict=True):
            if isinstance(panel, BarPanel):
                _draw_bars(ax, panel)
            else:
                _draw_spans(ax, panel)
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def save(chart: Chart, directory: Path) -> Path:
    """Write the chart's PNG into ``directory`` under its file name."""
    path = directory / chart.file
    path.write_bytes(png(chart))
    return path


def _rows_axis(ax: Axes, labels: Sequence[str]) -> None:
    ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=9)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # the first entry on top
    ax.tick_params(axis="x", labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_bars(ax: Axes, panel: BarPanel) -> None:
    bars = panel.bars
    _rows_axis(ax, [b.label for b in bars])
    ax.set_title(panel.title, loc="left", fontsize=10)
    values = [max(b.value, 0.0) for b in bars]
    scale_max = max([*values, *([panel.target] if panel.target is not None else []), 1e-9])
    ax.set_xlim(0, scale_max * HEADROOM)
    ax.barh(range(len(bars)), values, height=0.7, color=[b.color for b in bars])
    for i, b in enumerate(bars):
        ax.text(values[i], i, " " + (b.text or f"{b.value:.2f}{panel.unit}"), va="center", fontsize=9)
    if panel.target is not None:
        ax.axvline(panel.target, color=TARGET_COLOR, linestyle=(0, (4, 3)), linewidth=1.2,
                   label=panel.target_label or None)
        if panel.target_label:
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9,
                      handlelength=2.5, borderaxespad=0.2)


def _draw_spans(ax: Axes, panel: SpanPanel) -> None:
    spans = panel.spans
    _rows_axis(ax, [s.label for s in spans])
    ax.set_title(panel.title, loc="left", fontsize=10)
    scale_max = max([s.end for s in spans] + [1e-9])
    ax.set_xlim(0, scale_max * HEADROOM)
    starts = [max(s.start, 0.0) for s in spans]
    ends = [max(s.end, s.start, 0.0) for s in spans]
    ax.barh(range(len(spans)), [e - s for s, e in zip(starts, ends, strict=True)], left=starts, height=0.7,
            color=[s.color for s in spans])
    for i, s in enumerate(spans):
        ax.text(ends[i], i, " " + (s.text or f"{s.end - s.start:.2f}{panel.unit}"), va="center", fontsize=9)
    ax.set_xlabel(panel.unit.strip(), fontsize=9)
