"""`confmig demo`, the command behind `make demo`, end to end (small guests)."""

from __future__ import annotations

import json
import subprocess

import pytest

from confmig.bench.lab import confmig_argv


@pytest.mark.parametrize("mode", ["plain", "psp"])
def test_demo_migrates_and_reports(mode: str) -> None:
    out = subprocess.run(confmig_argv("demo", "--mode", mode, "--ram", "128M", "--wss", "8M", "--json"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["status"] == "completed" and summary["selfcheck"].startswith("confmig-selfcheck: PASS")
    assert summary["downtime-ms"] is not None and summary["total-time-ms"] > 0
    if mode == "psp":
        assert summary["confidential"]["backend"] == "psp"
        assert summary["confidential"]["private-pages"] >= 2048  # the 8 MiB working set at least
        assert "attested the source's launch: launch, released" in out.stderr
    else:
        assert summary["confidential"] is None
