"""Forwarding connections through the host, a thread per direction: the mechanics the bench's
men in the middle share (the fault link, the attack proxy, the tests' relay). Each chunk read
goes through its direction's :class:`Direction`, which may change it, hold it (by blocking),
drop it or end the connection; what the bytes mean is the owner's business.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Address = tuple[str, int] | Path
"""A TCP ``(host, port)``, or a UNIX socket's path."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Direction:
    """One direction of a connection; by default it passes the bytes as they come."""

    chunk: Callable[[bytes], tuple[bytes, bool]] = lambda data: (data, True)
    """Each chunk read: the bytes to send in its place (``b""``: none) and whether to read on
    (False: the connection ends both ways once they went). Blocking holds the direction."""
    sent: Callable[[bytes], None] = lambda data: None
    """Bytes that went on."""
    end: Callable[[], bytes] = lambda: b""
    """The sender closed its side: the last bytes to send."""
    done: Callable[[], None] = lambda: None
    """The direction ended and its end was passed on."""
    half_close: bool = True
    """The sender's clean end reaches the receiver as a half-close (the other direction goes
    on); False: the connection ends both ways."""
    error_resets: bool = True
    """An error on either socket ends the connection both ways, as a reset would; False: this
    direction ends as at a clean end."""


class Forwarder:
    """Listens on ``listen`` and forwards each connection it takes (only the first, if ``once``)
    to ``upstream``, trying to reach it for ``connect_timeout`` seconds (0: once; a client whose
    upstream is unreachable is closed, ``error`` says why). ``directions(n)``: connection
    ``n``'s (1: the first) client -> upstream and upstream -> client directions."""

    def __init__(self, listen: Address, upstream: Address,
                 directions: Callable[[int], tuple[Direction, Direction]], *, recv_size: int,
                 once: bool = False, connect_timeout: float = 0.0, name: str = "forwarder") -> None:
        self.upstream = upstream
        self.connections = 0
        """Connections that reached the upstream."""
        self.error: str | None = None
        self._directions = directions
        self._recv_size = recv_size
        self._once = once
        self._connect_timeout = connect_timeout
        self._name = name
        self._lock = threading.Lock()
        self._under_way: list[tuple[socket.socket, socket.socket]] = []
        self.path = listen if isinstance(listen, Path) else None
        if isinstance(listen, Path):
            self._listener = socket.create_server(str(listen), family=socket.AF_UNIX)
            self.address = f"unix:{listen}"
        else:
            self._listener = socket.create_server(listen)
            self.address = f"tcp:{listen[0]}:{self.port}"
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def under_way(self) -> list[tuple[socket.socket, socket.socket]]:
        """(client, upstream) of each connection not yet ended."""
        with self._lock:
            return list(self._under_way)

    def close(self) -> None:
        """Take no more connections (those under way go on)."""
        self._listener.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self._connect()
            except OSError as exc:
                self.error = f"{self._name}: the target is unreachable: {exc}"
                client.close()
            else:
                self.connections += 1
                ways = self._directions(self.connections)
                with self._lock:
                    self._under_way.append((client, upstream))
                threading.Thread(target=self._serve, args=(client, upstream, *ways), name=self._name,
                                 daemon=True).start()
            if self._once:
                return

    def _connect(self) -> socket.socket:
        end = time.monotonic() + self._connect_timeout
        while True:
            try:
                if not isinstance(self.upstream, Path):
                    return socket.create_connection(self.upstream)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.upstream))
                except OSError:
                    s.close()
                    raise
                return s
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)

    def _serve(self, client: socket.socket, upstream: socket.socket, forward: Direction,
               back: Direction) -> None:
        """One connection, the forward direction in a thread of its own; both sockets close
        once both directions ended."""
        there = threading.Thread(target=self._pump, args=(client, upstream, forward), daemon=True)
        there.start()
        try:
            self._pump(upstream, client, back)
            there.join()
        finally:
            with self._lock:
                self._under_way.remove((client, upstream))
            client.close()
            upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, way: Direction) -> None:
        half = False  # the end passes on as a half-close; else the connection ends both ways
        try:
            while data := src.recv(self._recv_size):
                out, more = way.chunk(data)
                self._send(dst, out, way)
                if not more:
                    break
            else:
                self._send(dst, way.end(), way)
                half = way.half_close
        except OSError:
            half = way.half_close and not way.error_resets
        finally:  # a hook that raised ends the connection both ways too
            for s in (dst,) if half else (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR if half else socket.SHUT_RDWR)
        way.done()

    @staticmethod
    def _send(dst: socket.socket, data: bytes, way: Direction) -> None:
        if data:
            dst.sendall(data)
            way.sent(data)
