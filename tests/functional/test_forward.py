"""The forwarder the bench's men in the middle share (:mod:`confmig.bench.forward`), over
loopback sockets: what passes, what a direction changes, and how each end learns the other's."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from confmig.bench.forward import Direction, Forwarder

TIMEOUT = 5.0
"""Seconds any one step may take on loopback (each takes milliseconds)."""


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as s:
        s.settimeout(TIMEOUT)
        yield s


def connect(forwarder: Forwarder) -> socket.socket:
    return socket.create_connection(("127.0.0.1", forwarder.port), timeout=TIMEOUT)


def read_all(s: socket.socket) -> bytes:
    """What arrives until the other end's close (a reset after it counts as the close)."""
    out = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while data := s.recv(65536):
            out += data
    return bytes(out)


def test_bytes_pass_both_ways_and_a_half_close_passes_on(server: socket.socket) -> None:
    f = Forwarder(("127.0.0.1", 0), server.getsockname(), lambda n: (Direction(), Direction()), recv_size=7)
    try:
        with connect(f) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"x" * 1000)
                client.shutdown(socket.SHUT_WR)
                assert read_all(peer) == b"x" * 1000  # the source's end reached the target ...
                peer.sendall(b"verdict")  # ... and the return path still carries its answer
                peer.shutdown(socket.SHUT_WR)
                assert read_all(client) == b"verdict"
        assert f.connections == 1 and f.address == f"tcp:127.0.0.1:{f.port}"
    finally:
        f.close()


def test_a_direction_changes_holds_and_ends_the_stream(server: socket.socket) -> None:
    release = threading.Event()
    sent: list[bytes] = []

    def chunk(data: bytes) -> tuple[bytes, bool]:
        release.wait(TIMEOUT)  # held until released
        return data.upper(), b"!" not in data

    way = Direction(chunk=chunk, sent=sent.append, half_close=False)
    f = Forwarder(("127.0.0.1", 0), server.getsockname(), lambda n: (way, Direction()), recv_size=1)
    try:
        with connect(f) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ab!cd")
                peer.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    peer.recv(10)
                peer.settimeout(TIMEOUT)
                release.set()
                assert read_all(peer) == b"AB!"  # what came after the end never went
                assert read_all(client) == b""  # and the source learnt the end too
        assert b"".join(sent) == b"AB!"
    finally:
        f.close()


def test_a_full_close_ends_the_connection_both_ways(server: socket.socket) -> None:
    f = Forwarder(("127.0.0.1", 0), server.getsockname(),
                  lambda n: (Direction(), Direction(half_close=False)), recv_size=64)
    try:
        with connect(f) as client:
            peer, _ = server.accept()
            with peer:
                peer.sendall(b"refused")
                peer.shutdown(socket.SHUT_WR)
                assert read_all(client) == b"refused"
                assert read_all(peer) == b""  # the client's side was closed as well
    finally:
        f.close()


def test_a_unix_forwarder_waits_for_its_upstream_and_takes_one_connection(tmp_path: Path) -> None:
    listen, upstream = tmp_path / "in.sock", tmp_path / "up.sock"
    done = threading.Event()
    f = Forwarder(listen, upstream, lambda n: (Direction(done=done.set), Direction()), recv_size=64,
                  once=True, connect_timeout=TIMEOUT)
    assert f.address == f"unix:{listen}" and f.path == listen
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(listen))
            client.sendall(b"early")  # before the upstream listens
            with socket.create_server(str(upstream), family=socket.AF_UNIX) as server:
                server.settimeout(TIMEOUT)
                peer, _ = server.accept()
                with peer:
                    client.shutdown(socket.SHUT_WR)
                    assert read_all(peer) == b"early"
        assert done.wait(TIMEOUT)
        assert f.error is None
    finally:
        f.close()
    assert not listen.exists()


def test_an_unreachable_upstream_closes_the_client(tmp_path: Path) -> None:
    f = Forwarder(("127.0.0.1", 0), tmp_path / "nobody.sock", lambda n: (Direction(), Direction()),
                  recv_size=64, name="link")
    try:
        with connect(f) as client:
            assert read_all(client) == b""
        assert f.error is not None and f.error.startswith("link: the target is unreachable")
        assert f.connections == 0
    finally:
        f.close()
