"""A small synchronous QMP client, for driving VMMs from the demo, benchmarks
and tests (QEMU's own ``qemu.qmp`` drives the same servers in the interop tests)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from confmig.common.errors import ConfmigError

MAX_LINE = 16 << 20


class QmpCommandError(ConfmigError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise ConfmigError(f"no QMP server at {path}") from None
                time.sleep(0.02)
        s.settimeout(timeout)
        self._sock = s
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        self._id = 0
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConfmigError("QMP connection closed")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise ConfmigError("QMP message too long")
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpCommandError(command, err.get("class", "?"), err.get("desc", "?"))
            return reply.get("return")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
