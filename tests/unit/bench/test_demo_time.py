"""The demo benchmark's saved report: JSON, Markdown and chart, the bar judged from the runs."""

from __future__ import annotations

import json
from pathlib import Path

from confmig.bench import demo_time


def test_a_saved_report_has_its_runs_its_verdict_and_its_chart(tmp_path: Path) -> None:
    report = {"date": "d", "machine": {}, "walls_s": [3.0, 6.0, 4.0], "median_s": 4.0,
              "bar": {"value": 4.0, "bar": "<= 5 s", "met": True}}
    demo_time._save(tmp_path, report)
    (md,) = tmp_path.glob("demo-*.md")
    (svg,) = tmp_path.glob("demo-*.svg")
    (js,) = tmp_path.glob("demo-*.json")
    text = md.read_text()
    assert "| 2 | 6.00 |" in text and "Median **4.00 s** (bar <= 5 s: met)" in text and svg.name in text
    assert json.loads(js.read_text())["walls_s"] == [3.0, 6.0, 4.0]
    assert svg.read_text().count("<rect") == 4  # the background and one bar per run
