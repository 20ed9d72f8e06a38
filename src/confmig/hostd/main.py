"""``confmig host``: one emulated host (kernel + silicon) serving a Unix socket."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from confmig.hostd.launcher import DEFAULT_ROM, SubprocessLauncher
from confmig.kvm.host import KvmHost

log = logging.getLogger("confmig.host")


def serve(socket_path: str, state_dir: str | None = None, *, rom: str = DEFAULT_ROM,
          ready: threading.Event | None = None) -> None:
    if state_dir:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    host = KvmHost(SubprocessLauncher(rom))
    host.listen(socket_path)
    log.info("host %d serving %s", os.getpid(), socket_path)

    def stop(_sig: int, _frame: object) -> None:
        host.close()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    if ready is not None:
        ready.set()
    try:
        host.serve_forever()
    finally:
        host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
