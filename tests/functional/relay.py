"""A TCP relay between two processes of a test: it keeps every byte it carries and can
corrupt or cut the stream, as a hostile network (or host) would."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

Tamper = Callable[[bytearray, int], None]
"""Called with each chunk going client -> server and the stream offset of its first byte;
may change the chunk in place."""


class Relay:
    def __init__(self, target: tuple[str, int], *, tamper: Tamper | None = None,
                 cut_after: int | None = None) -> None:
        self.target = target
        self.tamper = tamper
        self.cut_after = cut_after
        """Close both sides once this many client -> server bytes have passed."""
        self.seen = bytearray()
        """Every byte, both directions, in arrival order."""
        self.sent = bytearray()
        """The bytes forwarded client -> server (the migration stream, as the target got it)."""
        self.forwarded = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        with contextlib.suppress(OSError):  # either side closing ends the relay
            while data := src.recv(65536):
                chunk = bytearray(data)
                with self._lock:
                    if forward:
                        if self.tamper is not None:
                            self.tamper(chunk, self.forwarded)
                        if self.cut_after is not None and self.forwarded + len(chunk) > self.cut_after:
                            chunk = chunk[: max(0, self.cut_after - self.forwarded)]
                        self.forwarded += len(chunk)
                        self.sent += chunk
                    self.seen += chunk
                if chunk:
                    dst.sendall(chunk)
                if forward and self.cut_after is not None and self.forwarded >= self.cut_after:
                    break
        for s in (src, dst):  # one side is done: so is the relay, as a proxy closing both
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
