"""Shared set-up: a path for test ROMs that vCPU processes can import, and an installation of
the test run's own.

The hosts keep what a real installation keeps (its AMD root, the platforms' identities) in
``$XDG_STATE_HOME/confmig``: the tests get a fresh one per run, made by the first host that
needs it, so that nothing a developer's own runs left there changes a result, and nothing the
tests make stays behind in it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_STATE = tempfile.mkdtemp(prefix="confmig-test-state-")
os.environ["XDG_STATE_HOME"] = _STATE
atexit.register(shutil.rmtree, _STATE, True)

ROMS = Path(__file__).parent / "functional" / "roms"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROMS), os.environ.get("PYTHONPATH", "")) if p
)
