"""A TCP relay between two processes of a test: it keeps every byte it carries and can
corrupt or cut the stream, as a hostile network (or host) would."""

from __future__ import annotations

import threading
from collections.abc import Callable

from confmig.bench.forward import Direction, Forwarder

Tamper = Callable[[bytearray, int], None]
"""Called with each chunk going client -> server and the stream offset of its first byte;
may change the chunk in place."""

RECV_SIZE = 65536


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
        # Either side closing ends the relay, as a proxy closing both.
        ways = (Direction(chunk=self._to_server, half_close=False),
                Direction(chunk=self._to_client, half_close=False))
        self._forwarder = Forwarder(("127.0.0.1", 0), target, lambda _n: ways, recv_size=RECV_SIZE,
                                    name="relay")

    @property
    def port(self) -> int:
        return self._forwarder.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return self._forwarder.address

    def _to_server(self, data: bytes) -> tuple[bytes, bool]:
        chunk = bytearray(data)
        with self._lock:
            if self.tamper is not None:
                self.tamper(chunk, self.forwarded)
            if self.cut_after is not None and self.forwarded + len(chunk) > self.cut_after:
                chunk = chunk[: max(0, self.cut_after - self.forwarded)]
            self.forwarded += len(chunk)
            self.sent += chunk
            self.seen += chunk
        return bytes(chunk), self.cut_after is None or self.forwarded < self.cut_after

    def _to_client(self, data: bytes) -> tuple[bytes, bool]:
        with self._lock:
            self.seen += data
        return data, True

    def close(self) -> None:
        self._forwarder.close()
