"""The benchmark harness runs end to end (slow: `make test-slow`). It checks that every
scenario completes and the report is saved; the performance bars themselves are judged
in `benchmarks/`, never as timed assertions here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from confmig.bench.chart import PNG_SIGNATURE
from confmig.bench.perf import run_benchmarks
from confmig.proto import mailbox as mb


@pytest.mark.slow
def test_quick_benchmark_completes_and_saves(tmp_path: Path) -> None:
    report = run_benchmarks(save_dir=str(tmp_path), quick=True)
    assert report["loopback_ceiling_GBps"] > 0 and all(c > 0 for c in report["loopback_cpu_s_per_gib"])
    # An idle guest's migration may take less than one clock tick of CPU: only the random ones.
    assert all(m["cpu"]["source"] > 0 and m["cpu"]["cores"] > 0
               for m in report["migrations"] if m["scenario"].startswith("random"))
    assert all(m["status"] == "completed" for m in report["migrations"])
    assert "PASS" in report["selfcheck_after_ping_pong"]
    saved = list(tmp_path.glob("plain-quick-*.json"))
    assert saved and json.loads(saved[0].read_text())["bars"].keys() == report["bars"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("mh", [False, True], ids=["psp", "mh"])
def test_confidential_benchmark_completes_and_saves(tmp_path: Path, mh: bool) -> None:
    from confmig.bench.confidential import run_psp_benchmark

    report = run_psp_benchmark(save_dir=str(tmp_path), ram="64M", mh=mh, quick=True)
    _plain, psp, *mhs = report["runs"]
    assert [r["kind"] for r in mhs] == (["mh-1", "mh-2", "mh-4"] if mh else [])
    assert all(r["status"] == "completed" and "PASS" in r["selfcheck"] for r in report["runs"])
    assert psp["private_pages"] > 0 and psp["commands"] >= psp["private_pages"]
    assert all(r["cpu"]["source"] > 0 and r["cpu"]["target"] > 0 and r["cpu"]["cores"] > 0
               for r in report["runs"])
    for r in mhs:
        assert r["private_pages"] > 0 and r["commands"] >= r["private_pages"] // mb.BATCH_PAGES
        assert set(report["ratios"][r["kind"]]) == {"over_plain", "over_psp"}
    suite = report["suite"]
    latest = (tmp_path / f"{suite}-latest.md").read_text()
    (paths,) = [p for p in tmp_path.glob(f"{suite}-*.png") if p.stem.count("-") == 2]  # suite-date-time
    assert paths.read_bytes()[:8] == PNG_SIGNATURE and f"({paths.name})" in latest
    assert "CPU s per GiB (source + target), cores" in latest
    if mh:
        assert report["crypto_floor"]["total"] > 0 and "The MH's cryptography alone" in latest
        _check_mh_scenarios(report, tmp_path)


def _check_mh_scenarios(report: dict[str, Any], saved: Path) -> None:
    """The quick dirty-rate and evacuation scenarios ran, each guest checked itself, and the
    report has a section, a chart and bars for them (converging is not asserted: a path that
    does not is reported so, and that is a result)."""
    dirty = report["dirty"]
    assert [(r["rate_pct"], r["kind"]) for r in dirty["runs"]] == [(5, "plain"), (5, "psp"), (5, "mh-1")]
    for r in dirty["runs"]:
        assert r["status"] == "completed" or r["status"].startswith("did not converge within")
        assert "PASS" in r["selfcheck"] and r["guest_rate_before"] > 0
    evac = report["evacuation"]
    assert [p["kind"] for p in evac["paths"]] == ["psp", "mh-1"]
    for p in evac["paths"]:
        assert p["all_completed"] and p["time_to_empty_s"] > 0 and len(p["guests"]) == 4
        assert all("PASS" in g["selfcheck"] for g in p["guests"])
    assert [b["bar"].split()[0] for b in report["bars"]][-1] == "mh-1"  # the downtime bar
    text = (saved / "mh-latest.md").read_text()
    assert "## 2. Dirty guest" in text and "## 3. Evacuating a host" in text and "## Bars" in text
    for section in ("dirty", "evacuation"):
        (png,) = saved.glob(f"mh-*-{section}.png")
        assert png.read_bytes()[:8] == PNG_SIGNATURE and f"({png.name})" in text
    assert json.loads(next(saved.glob("mh-*.json")).read_text())["evacuation"] == evac
