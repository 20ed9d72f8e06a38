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
def test_psp_benchmark_completes_and_saves(tmp_path: Path) -> None:
    from confmig.bench.confidential import run_psp_benchmark

    report = run_psp_benchmark(save_dir=str(tmp_path), ram="64M")
    plain, psp = report["runs"]
    assert plain["status"] == psp["status"] == "completed"
    assert psp["private_pages"] > 0 and psp["psp_commands"] >= psp["private_pages"]
    assert "PASS" in plain["selfcheck"] and "PASS" in psp["selfcheck"]
    assert (tmp_path / "psp-latest.md").exists() and list(tmp_path.glob("psp-*.json"))
