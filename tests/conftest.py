"""Shared fixtures: a path for test ROMs that vCPU processes can import."""

from __future__ import annotations

import os
from pathlib import Path

ROMS = Path(__file__).parent / "functional" / "roms"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROMS), os.environ.get("PYTHONPATH", "")) if p
)
