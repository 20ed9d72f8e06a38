"""The demo benchmark's saved report: JSON, Markdown and chart, the bar judged from the runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from confmig.bench import chart, demo_time
from confmig.bench.chart import PNG_SIGNATURE


def test_a_saved_report_has_its_runs_its_verdict_and_its_chart(tmp_path: Path) -> None:
    report = {"date": "d", "machine": {}, "walls_s": [3.0, 6.0, 4.0], "median_s": 4.0,
              "bar": {"value": 4.0, "bar": "<= 5 s", "met": True}}
    demo_time._save(tmp_path, report)
    (md,) = tmp_path.glob("demo-*.md")
    (png,) = tmp_path.glob("demo-*.png")
    (js,) = tmp_path.glob("demo-*.json")
    text = md.read_text()
    assert "| 2 | 6.00 |" in text and "Median **4.00 s** (bar <= 5 s: met)" in text
    assert f"![wall time of each run]({png.name})" in text
    assert json.loads(js.read_text())["walls_s"] == [3.0, 6.0, 4.0]
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    expected = chart.size_px(demo_time.chart_of(png.stem, report))
    assert struct.unpack(">II", data[16:24]) == expected == (900, 40 + 90 + 3 * 26)  # three rows
