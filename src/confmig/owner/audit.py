"""The owner's audit trail: one JSON line per verdict, never a key.

``STATE/audit.jsonl`` (mode 0600, appended): wall-clock time, event
(``launch``, ``launch-refused``, ``released``, ``refused``), VM, session id,
platform fingerprint and, for refusals, the reason. What an owner needs to
answer "which platform got this VM's disk key, and when".
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

FILE_MODE: Final = 0o600


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, record: Mapping[str, object]) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
