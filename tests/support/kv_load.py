"""A kv client writing all along a migration, following its guest to the target: what the
kv migration tests share. It keeps 300 keys rewritten in turn; the client records every
acknowledged write, so ``client.verify()`` afterwards says whether one was lost."""

from __future__ import annotations

import threading
import time

from confmig.bench.kv_client import KvClient

KEYS = 300


class KvLoad:
    """``start()`` before the migration, ``finish()`` after it."""

    def __init__(self, source_socket: str, target_socket: str) -> None:
        self.client = KvClient(source_socket)
        self.target_socket = target_socket
        self.puts = {"before": 0, "after": 0}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._moved = threading.Event()
        self._worker = threading.Thread(target=self._load)

    def _load(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                try:
                    self.client.put(f"key{i % KEYS}".encode(), f"value{i}".encode())
                    self.puts["after" if self._moved.is_set() else "before"] += 1
                    i += 1
                except (ConnectionError, TimeoutError, OSError):
                    self.client.reconnect(self.target_socket)  # the source stopped serving: follow the VM
                    self._moved.set()
        except BaseException as exc:  # surfaced by the caller's assertions
            self.errors.append(exc)

    def start(self, *, writes_before: int = 200) -> None:
        """Start writing; return once ``writes_before`` writes were acknowledged by the source."""
        self._worker.start()
        while self.puts["before"] < writes_before and not self.errors:
            time.sleep(0.01)

    def finish(self, *, writes_after: int = 200, timeout: float = 60.0) -> None:
        """Keep writing until the target acknowledged ``writes_after`` writes (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.puts["after"] < writes_after and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)
        self._stop.set()
        self._worker.join(30)
