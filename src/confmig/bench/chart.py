"""Bar charts for saved benchmark results: a small SVG beside each Markdown report.

Hand-written SVG keeps the benchmarks free of a plotting dependency; a chart is a list
of labelled values, one horizontal bar each, with an optional target line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

ROW_HEIGHT = 22
LABEL_WIDTH = 330
BAR_WIDTH = 360
VALUE_WIDTH = 90


@dataclass(frozen=True, slots=True, kw_only=True)
class Bar:
    label: str
    value: float
    text: str = ""
    """What to print after the bar (default: the value)."""
    color: str = "#4a7ab5"


def bar_chart(title: str, bars: Sequence[Bar], *, unit: str = "", target: float | None = None,
              target_label: str = "") -> str:
    """An SVG document: one bar per entry, scaled to the largest value (or the target)."""
    top = 34
    height = top + ROW_HEIGHT * len(bars) + 24
    width = LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH
    scale_max = max([b.value for b in bars] + ([target] if target is not None else []) + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, b in enumerate(bars):
        y = top + i * ROW_HEIGHT
        w = max(b.value, 0) / scale_max * BAR_WIDTH
        text = b.text or f"{b.value:.2f}{unit}"
        out += [f'<text x="{LABEL_WIDTH - 6}" y="{y + 14}" text-anchor="end">{escape(b.label)}</text>',
                f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{w:.1f}" height="{ROW_HEIGHT - 6}" '
                f'fill="{escape(b.color)}"/>',
                f'<text x="{LABEL_WIDTH + w + 4:.1f}" y="{y + 14}">{escape(text)}</text>']
    if target is not None:
        x = LABEL_WIDTH + target / scale_max * BAR_WIDTH
        bottom = top + ROW_HEIGHT * len(bars)
        out += [f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#c0392b" '
                f'stroke-dasharray="4 3"/>',
                f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#c0392b">'
                f'{escape(target_label)}</text>']
    out.append("</svg>")
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """One interval of a timeline: ``start`` to ``end`` on the chart's axis."""

    label: str
    start: float
    end: float
    text: str = ""
    """What to print after the interval (default: its length)."""
    color: str = "#4a7ab5"


def span_chart(title: str, spans: Sequence[Span], *, unit: str = " s") -> str:
    """An SVG timeline: one row per interval, on one axis from 0 to the latest end (things
    that ran at the same time, and when the last of them ended)."""
    top = 34
    height = top + ROW_HEIGHT * len(spans) + 24
    width = LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH + 60
    scale_max = max([s.end for s in spans] + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, s in enumerate(spans):
        y = top + i * ROW_HEIGHT
        x0 = LABEL_WIDTH + max(s.start, 0) / scale_max * BAR_WIDTH
        x1 = LABEL_WIDTH + max(s.end, s.start, 0) / scale_max * BAR_WIDTH
        text = s.text or f"{s.end - s.start:.2f}{unit}"
        out += [f'<text x="{LABEL_WIDTH - 6}" y="{y + 14}" text-anchor="end">{escape(s.label)}</text>',
                f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1):.1f}" height="{ROW_HEIGHT - 6}" '
                f'fill="{escape(s.color)}"/>',
                f'<text x="{x1 + 4:.1f}" y="{y + 14}">{escape(text)}</text>']
    bottom = top + ROW_HEIGHT * len(spans)
    out += [f'<line x1="{LABEL_WIDTH}" y1="{bottom + 2}" x2="{LABEL_WIDTH + BAR_WIDTH}" y2="{bottom + 2}" '
            f'stroke="#555"/>',
            f'<text x="{LABEL_WIDTH}" y="{bottom + 16}" text-anchor="middle">0</text>',
            f'<text x="{LABEL_WIDTH + BAR_WIDTH}" y="{bottom + 16}" text-anchor="middle">'
            f'{scale_max:.1f}{escape(unit)}</text>']
    out.append("</svg>")
    return "\n".join(out) + "\n"
