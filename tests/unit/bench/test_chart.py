"""The SVG beside each saved benchmark: well-formed, one bar per value, scaled, escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from confmig.bench.chart import BAR_WIDTH, Bar, bar_chart

NS = "{http://www.w3.org/2000/svg}"


def test_one_bar_per_value_scaled_to_the_largest_and_a_target_line() -> None:
    svg = ET.fromstring(bar_chart("t <&>", [Bar(label="a", value=1.0), Bar(label="b & c", value=2.0)],
                                  unit=" GB/s", target=4.0, target_label="ceiling"))
    rects = [r for r in svg.iter(f"{NS}rect") if r.get("fill") != "white"]
    assert [float(r.get("width", 0)) for r in rects] == [BAR_WIDTH / 4, BAR_WIDTH / 2]
    texts = [t.text for t in svg.iter(f"{NS}text")]
    assert "t <&>" in texts and "b & c" in texts and "2.00 GB/s" in texts and "ceiling" in texts
    assert len(list(svg.iter(f"{NS}line"))) == 1


def test_without_a_target_the_largest_bar_fills_the_width() -> None:
    svg = ET.fromstring(bar_chart("t", [Bar(label="x", value=3.0, text="three")]))
    (rect,) = [r for r in svg.iter(f"{NS}rect") if r.get("fill") != "white"]
    assert float(rect.get("width", 0)) == BAR_WIDTH
    assert "three" in [t.text for t in svg.iter(f"{NS}text")]
