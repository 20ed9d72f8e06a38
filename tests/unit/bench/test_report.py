"""A saved report's charts redrawn from its JSON: PNGs beside it, the Markdown that showed the
old charts pointing at them, nothing else in it changed, the replaced SVGs gone."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from confmig.bench import chart, confidential, report
from confmig.bench.chart import PNG_SIGNATURE
from confmig.common.errors import ConfmigError


def _run(kind: str, mbps: float, downtime: int | None, status: str = "completed") -> dict[str, Any]:
    return {"kind": kind, "status": status, "guest_MBps": mbps, "downtime_ms": downtime}


def _dirty(pct: int, kind: str, downtime: int | None) -> dict[str, Any]:
    done = downtime is not None
    return {"rate_pct": pct, "kind": kind, "converged": done, "downtime_ms": downtime,
            "total_ms": 9000 if done else None, "wall_ms": 180500,
            "status": "completed" if done else "did not converge within 180 s"}


def _guest(name: str, end: float) -> dict[str, Any]:
    return {"name": name, "start_s": 0.01, "end_s": end, "converged": True, "status": "completed"}


MH_REPORT: dict[str, Any] = {
    "suite": "mh", "ram_gib": 1.0, "psp_cost_model": "none",
    "runs": [_run("plain", 1887.1, 3), _run("psp", 28.5, 6), _run("mh-1", 208.9, 5),
             _run("mh-2", 0.0, None, "failed")],
    "dirty": {"ram": "1G", "runs": [_dirty(5, "psp", None), _dirty(5, "mh-1", 155)]},
    "evacuation": {"guests": 2, "ram": "256M",
                   "paths": [{"kind": "psp", "guests": [_guest("src1", 33.0), _guest("src2", 33.6)]},
                             {"kind": "mh-1", "guests": [_guest("src1", 10.0), _guest("src2", 10.1)]}]},
}


def _saved(tmp_path: Path) -> Path:
    """An MH report as saved before the charts were PNGs: three SVGs and two Markdown files."""
    name = "mh-20261207-001343"
    (tmp_path / f"{name}.json").write_text(json.dumps(MH_REPORT))
    md = "\n".join(["# report", "| mh-1 | 208.9 | 5 |", f"![guest RAM throughput of each path]({name}.svg)",
                    "| 5% | mh-1 | 155 |", f"![downtime of each path at each dirty rate]({name}-dirty.svg)",
                    f"![each guest's migration on one time axis per path]({name}-evacuation.svg)",
                    "![an older run's chart](mh-20261206-234721.svg)", ""])
    for f in (f"{name}.md", "mh-latest.md"):
        (tmp_path / f).write_text(md)
    for f in (f"{name}.svg", f"{name}-dirty.svg", f"{name}-evacuation.svg", "mh-20261206-234721.svg"):
        (tmp_path / f).write_text("<svg/>")
    return tmp_path / f"{name}.json"


def test_the_charts_come_from_the_json_alone_and_chart_throughput_and_downtime_per_path() -> None:
    charts = confidential.charts_of("mh-x", MH_REPORT)
    assert [c.file for c in charts.values()] == ["mh-x.png", "mh-x-dirty.png", "mh-x-evacuation.png"]
    throughput, downtime = charts["paths"].panels
    assert [b.label for b in throughput.bars] == ["plain", "psp", "mh-1", "mh-2"]
    assert [b.label for b in downtime.bars] == ["plain", "psp", "mh-1", "mh-2"]
    assert [b.value for b in throughput.bars] == [1887.1, 28.5, 208.9, 0.0]
    assert [b.value for b in downtime.bars] == [3.0, 6.0, 5.0, 0.0] and downtime.bars[-1].text == "failed"
    (dirty_downtime, _total) = charts["dirty"].panels
    assert dirty_downtime.target == 300.0 and dirty_downtime.bars[0].text == "did not converge within 180 s"


def test_redraw_writes_pngs_and_relinks_only_the_images(tmp_path: Path) -> None:
    js = _saved(tmp_path)
    before = (tmp_path / "mh-latest.md").read_text()
    done = report.redraw(js)
    name = js.stem
    assert [p.name for p in done.written] == [f"{name}.png", f"{name}-dirty.png", f"{name}-evacuation.png"]
    for p in done.written:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert struct.unpack(">II", data[16:24]) == chart.size_px(
            next(c for c in report.charts_of(name, MH_REPORT) if c.file == p.name))
    assert {p.name for p in done.relinked} == {f"{name}.md", "mh-latest.md"}
    after = (tmp_path / "mh-latest.md").read_text()
    assert f"![guest RAM throughput and downtime of each path]({name}.png)" in after
    assert f"({name}-dirty.png)" in after and f"({name}-evacuation.png)" in after
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 3 and all(a.startswith("![") and b.startswith("![") for a, b in changed)
    assert sorted(p.name for p in done.removed) == [f"{name}-dirty.svg", f"{name}-evacuation.svg",
                                                    f"{name}.svg"]
    assert (tmp_path / "mh-20261206-234721.svg").exists()  # another report still links it


def test_redrawing_again_changes_nothing(tmp_path: Path) -> None:
    js = _saved(tmp_path)
    report.redraw(js)
    pngs = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    again = report.redraw(js)
    assert not again.relinked and not again.removed
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == pngs


def test_a_json_that_is_no_report_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfmigError, match="not a saved benchmark report"):
        report.redraw(tmp_path / "x.json")
    assert report.main([]) == 2


def test_a_report_with_the_4_gib_guest_gets_its_own_section_chart_and_bars(tmp_path: Path) -> None:
    large = {"ram_gib": 4.0, "runs": [_run("plain", 1900.0, 4), _run("psp", 29.0, 7), _run("mh-1", 220.0, 6)],
             "psp_over_plain_throughput": 29.0 / 1900.0,
             "ratios": {"mh-1": {"over_plain": 220.0 / 1900.0, "over_psp": 220.0 / 29.0}}}
    full = {**copy.deepcopy(MH_REPORT), "quick": False, "date": "d", "machine": {}, "duration_s": 60.0,
            "guest": "g", "psp_over_plain_throughput": 0.015, "large": large,
            "ratios": {"mh-1": {"over_plain": 0.11, "over_psp": 7.3}}}
    for r in full["runs"]:
        r.update(total_ms=1, private_pages=0, shared_pages=0, commands=0, commands_per_s=0.0, selfcheck="")
    for r in large["runs"]:
        r.update(total_ms=1, private_pages=0, shared_pages=0, commands=0, commands_per_s=0.0, selfcheck="")
    del full["dirty"], full["evacuation"]
    full["bars"] = confidential._bars(full)
    confidential._save(tmp_path, full)
    md = next(tmp_path.glob("mh-2*.md")).read_text()
    assert "## 1. Random guest: 1 GiB" in md and "## 1b. Random guest: 4 GiB" in md
    assert any(p.name.endswith("-large.png") for p in tmp_path.iterdir())
    assert [b["bar"] for b in full["bars"] if "4 GiB" in b["bar"]] == [
        "mh-1 / plain, guest MB/s (4 GiB random guest)", "mh-1 / PSP, guest MB/s (4 GiB random guest)"]


def test_the_local_suites_saved_report_is_redrawn_from_its_json() -> None:
    saved = Path(__file__).parents[3] / "benchmarks" / "local-20261207-004914.json"
    (only,) = report.charts_of(saved.stem, json.loads(saved.read_text()))
    assert only.file == f"{saved.stem}.png"
