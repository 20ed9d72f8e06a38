"""The benchmark harness runs end to end (slow: `make test-slow`). It checks that every
scenario completes and the report is saved; the performance bars themselves are judged
in `benchmarks/`, never as timed assertions here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confmig.bench.perf import run_benchmarks


@pytest.mark.slow
def test_quick_benchmark_completes_and_saves(tmp_path: Path) -> None:
    report = run_benchmarks(save_dir=str(tmp_path), quick=True)
    assert report["loopback_ceiling_GBps"] > 0
    assert all(m["status"] == "completed" for m in report["migrations"])
    assert "PASS" in report["selfcheck_after_ping_pong"]
    saved = list(tmp_path.glob("plain-quick-*.json"))
    assert saved and json.loads(saved[0].read_text())["bars"].keys() == report["bars"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("mh", [False, True], ids=["psp", "mh"])
def test_confidential_benchmark_completes_and_saves(tmp_path: Path, mh: bool) -> None:
    from confmig.bench.confidential import run_psp_benchmark

    report = run_psp_benchmark(save_dir=str(tmp_path), ram="64M", mh=mh)
    _plain, psp, *mhs = report["runs"]
    assert [r["kind"] for r in mhs] == (["mh-1", "mh-2", "mh-4"] if mh else [])
    assert all(r["status"] == "completed" and "PASS" in r["selfcheck"] for r in report["runs"])
    assert psp["private_pages"] > 0 and psp["commands"] >= psp["private_pages"]
    for r in mhs:
        assert r["private_pages"] > 0 and r["commands"] >= r["private_pages"] // 128
        assert set(report["ratios"][r["kind"]]) == {"over_plain", "over_psp"}
    suite = report["suite"]
    assert (tmp_path / f"{suite}-latest.md").exists() and list(tmp_path.glob(f"{suite}-*.svg"))
