"""Scatter reads and gather writes: what is left of a list of buffers after part of it was
filled or sent."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from confmig.common.errors import RemoteMigrationError
from confmig.proto.stream.decoder import views_after
from confmig.vmm.migration.transport import Channel


def test_views_after_a_partial_fill() -> None:
    a, b, c = (memoryview(bytearray(n)) for n in (4, 2, 3))
    assert views_after([a, b, c], 0) == [a, b, c]
    assert [len(v) for v in views_after([a, b, c], 3)] == [1, 2, 3]
    assert views_after([a, b, c], 4) == [b, c]
    assert [len(v) for v in views_after([a, b, c], 5)] == [1, 3]
    assert views_after([a, b, c], 9) == []


def test_recv_exact_into_fills_every_buffer_in_order_across_short_reads() -> None:
    r, w = os.pipe()
    data = bytes(range(200))

    def trickle() -> None:  # a pipe hands out what was written so far: reads come short
        for start in range(0, len(data), 7):
            os.write(w, data[start : start + 7])
            time.sleep(0.001)
        os.close(w)

    writer = threading.Thread(target=trickle)
    writer.start()
    views = [memoryview(bytearray(n)) for n in (50, 1, 149)]
    ch = Channel(r, name="pipe")
    ch.recv_exact_into(list(views))
    writer.join()
    assert b"".join(bytes(v) for v in views) == data
    ch.close()


def test_send_parts_sends_every_part_in_order_across_short_writes() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # sendmsg takes a part of a part
    parts = [os.urandom(n) for n in (13, 0, 300_000, 1, 70_000)] + [memoryview(os.urandom(5000))[7:]] * 3
    expected = b"".join(bytes(p) for p in parts)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            got.extend(b.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    channel = Channel(a.fileno(), sock=a)
    assert channel.send_parts(parts) == len(expected) == channel.sent
    reader.join(10)
    assert bytes(got) == expected
    a.close()
    b.close()


def test_send_parts_to_a_file_and_a_closed_peer(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as f:
        parts = [b"x" * 10] * (2000)  # more parts than one writev takes
        assert Channel(f.fileno()).send_parts(parts) == 20_000
    assert (tmp_path / "out").read_bytes() == b"x" * 20_000
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(RemoteMigrationError, match="Unable to write to socket"):
        Channel(a.fileno(), sock=a).send_parts([b"y" * 1_000_000])
    a.close()


def _iovec(buffers: list[np.ndarray]) -> np.ndarray:
    return np.array([(b.ctypes.data, b.nbytes) for b in buffers], dtype=np.uint64)


def test_send_iovec_writes_every_buffer_in_order_across_partial_writes() -> None:
    """More rows than one writev takes, through a socket with a timeout (non-blocking below:
    writes come short and would block), as a page batch goes out."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(0, 9000, size=2500)
    sizes[[0, 1023, 1024, 1025, 2047, 2499]] = 0  # empty rows at either end and at chunk edges
    buffers = [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in sizes]
    expected = b"".join(b.tobytes() for b in buffers)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            got.extend(b.recv(65536))
            time.sleep(0.0005)

    reader = threading.Thread(target=drain)
    reader.start()
    channel = Channel(a.fileno(), sock=a)
    assert channel.send_iovec(_iovec(buffers), owner=buffers) == len(expected) == channel.sent
    reader.join(10)
    assert bytes(got) == expected
    a.close()
    b.close()


def test_send_iovec_to_a_file_and_to_a_closed_peer(tmp_path: Path) -> None:
    buffers = [np.full(n, n % 251, dtype=np.uint8) for n in (1, 4096, 0, 77)]
    with open(tmp_path / "out", "wb") as f:
        assert Channel(f.fileno()).send_iovec(_iovec(buffers), owner=buffers) == 4174
    assert (tmp_path / "out").read_bytes() == b"".join(x.tobytes() for x in buffers)
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(RemoteMigrationError, match="Unable to write to socket: Broken pipe"):
        Channel(a.fileno(), sock=a).send_iovec(_iovec([big := np.zeros(1 << 20, dtype=np.uint8)]), owner=big)
    a.close()


def test_send_iovec_refuses_an_array_that_is_not_iovec_rows() -> None:
    """Addresses and lengths must not trade places: only (n, 2) native u64, contiguous."""
    data = np.arange(64, dtype=np.uint8)
    iov = _iovec([data, data, data])
    a, b = socket.socketpair()
    channel = Channel(a.fileno(), sock=a)
    for bad in (iov.astype(">u8"), iov.T.copy(), np.asfortranarray(iov), iov[::2], iov.reshape(-1)):
        with pytest.raises(ValueError, match="iovec"):
            channel.send_iovec(bad, owner=data)
    assert channel.sent == 0
    a.close()
    b.close()


def test_send_iovec_times_out_when_the_peer_stops_reading() -> None:
    a, b = socket.socketpair()
    a.settimeout(0.2)
    big = np.zeros(16 << 20, dtype=np.uint8)
    with pytest.raises(RemoteMigrationError, match="timed out"):
        Channel(a.fileno(), sock=a).send_iovec(_iovec([big]), owner=big)
    a.close()
    b.close()


def test_recv_exact_into_a_socket_waits_for_every_byte_and_sees_a_close() -> None:
    a, b = socket.socketpair()
    data = os.urandom(300_000)

    def trickle() -> None:
        for start in range(0, len(data), 7000):
            b.sendall(data[start : start + 7000])
            time.sleep(0.0005)

    writer = threading.Thread(target=trickle)
    writer.start()
    views = [memoryview(bytearray(n)) for n in (1, 150_000, 149_999)]
    channel = Channel(a.fileno(), sock=a, name="main")
    channel.recv_exact_into(list(views))
    writer.join()
    assert b"".join(bytes(v) for v in views) == data
    b.sendall(b"abc")
    b.close()  # three bytes of the five asked for, then the end
    with pytest.raises(RemoteMigrationError, match="main: connection closed"):
        channel.recv_exact_into([memoryview(bytearray(5))])
    a.close()
