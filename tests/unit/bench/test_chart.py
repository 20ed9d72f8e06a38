"""The PNG beside each saved benchmark: a real PNG of the size its rows make, one bar per value
scaled to the largest or the target, intervals on one axis, the same bytes every time."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from PIL import Image

from confmig.bench import chart
from confmig.bench.chart import (
    BLUE,
    PANEL_PX,
    PNG_SIGNATURE,
    ROW_PX,
    TITLE_PX,
    WIDTH_PX,
    Bar,
    BarPanel,
    Chart,
    Span,
    SpanPanel,
)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a PNG has first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def chunk_types(data: bytes) -> list[bytes]:
    types, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        types.append(data[i + 4:i + 8])
        i += 12 + n
    return types


def runs_of(data: bytes, color: str) -> list[tuple[int, int]]:
    """Each horizontal run of exactly ``color`` that is a bar's row: (first x, last x), top to bottom."""
    rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    rows: list[tuple[int, int]] = []
    for y in range(height):
        xs = [x for x in range(width) if pixels[x, y] == rgb]
        if xs and (not rows or rows[-1] != (xs[0], xs[-1])):
            rows.append((xs[0], xs[-1]))
    return rows


def target_line_columns(data: bytes) -> list[int]:
    """Columns with a vertical run of reddish pixels: the target line (antialiased, dashed),
    not its legend's short horizontal sample."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = image.load()
    assert pixels is not None
    width, height = image.size
    return [x for x in range(width)
            if sum(1 for y in range(height) if (p := pixels[x, y])[0] > p[1] + 60 and p[0] > p[2] + 60) >= 20]


def two_bars(target: float | None = 4.0) -> Chart:
    return Chart(file="t.png", alt="a chart", title="t <&>",
                 panels=(BarPanel(title="GB/s",
                                  bars=(Bar(label="a", value=1.0), Bar(label="b & c", value=2.0)),
                                  unit=" GB/s", target=target, target_label="ceiling" if target else ""),))


def test_a_png_of_the_size_its_rows_make_without_a_time_or_software_stamp() -> None:
    data = chart.png(two_bars())
    assert png_size(data) == chart.size_px(two_bars()) == (WIDTH_PX, TITLE_PX + PANEL_PX + 2 * ROW_PX)
    assert png_size(data) == (900, 182)
    assert chunk_types(data)[0] == b"IHDR" and chunk_types(data)[-1] == b"IEND"
    assert not {b"tEXt", b"zTXt", b"iTXt", b"tIME"} & set(chunk_types(data))
    assert chart.png(two_bars()) == data  # reproducible: a redrawn report's images do not churn


def test_panels_stack_and_each_adds_its_rows() -> None:
    stacked = Chart(file="s.png", alt="", title="two panels",
                    panels=(*two_bars().panels,
                            SpanPanel(title="s", spans=(Span(label="x", start=0.0, end=1.0),))))
    assert png_size(chart.png(stacked)) == (900, TITLE_PX + 2 * PANEL_PX + 3 * ROW_PX)


def test_one_bar_per_value_scaled_to_the_target_line() -> None:
    data = chart.png(two_bars(target=4.0))
    bars = runs_of(data, BLUE)
    assert len(bars) == 2
    (a0, a1), (b0, b1) = bars
    assert a0 == b0  # both from zero
    assert (a1 - a0) / (b1 - b0) == pytest.approx(0.5, abs=0.02)
    line = target_line_columns(data)
    assert line and max(line) - min(line) <= 3, "no target line, or more than one"
    assert (b1 - b0) / (sum(line) / len(line) - b0) == pytest.approx(0.5, abs=0.02)  # 2 against 4


def test_without_a_target_the_largest_bar_sets_the_scale() -> None:
    one = Chart(file="o.png", alt="", title="t",
                panels=(BarPanel(title="x", bars=(Bar(label="x", value=3.0, text="three"),
                                                  Bar(label="y", value=1.5))),))
    (x0, x1), (y0, y1) = runs_of(chart.png(one), BLUE)
    assert (y1 - y0) / (x1 - x0) == pytest.approx(0.5, abs=0.02)
    assert not target_line_columns(chart.png(one))


def test_intervals_start_where_they_started_on_one_axis() -> None:
    spans = Chart(file="e.png", alt="", title="evacuation",
                  panels=(SpanPanel(title="s", spans=(Span(label="g1", start=0.0, end=4.0),
                                                      Span(label="g2", start=2.0, end=4.0))),))
    (a0, a1), (b0, b1) = runs_of(chart.png(spans), BLUE)
    assert b1 == pytest.approx(a1, abs=1)  # the same end
    assert (b0 - a0) / (a1 - a0) == pytest.approx(0.5, abs=0.02)


def test_save_writes_the_png_under_its_file_name_and_links_it(tmp_path: Path) -> None:
    path = chart.save(two_bars(), tmp_path)
    assert path == tmp_path / "t.png" and png_size(path.read_bytes()) == (900, 182)
    assert two_bars().link == "![a chart](t.png)"


def test_an_empty_or_unreadably_long_chart_is_refused() -> None:
    with pytest.raises(ValueError, match="no panels"):
        chart.png(Chart(file="n.png", alt="", title="", panels=()))
    many = tuple(Bar(label=str(i), value=1.0) for i in range(chart.MAX_ROWS + 1))
    with pytest.raises(ValueError, match="rows in one panel"):
        chart.png(Chart(file="m.png", alt="", title="", panels=(BarPanel(title="", bars=many),)))
