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
from confmig.vmm.migration.transport import Channel, views_after


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
    parts = [memoryview(os.urandom(n)) for n in (13, 0, 300_000, 1, 70_000)]
    parts += [memoryview(os.urandom(5000))[7:]] * 3
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
        parts = [memoryview(b"x" * 10)] * (2000)  # more parts than one writev takes
        assert Channel(f.fileno()).send_parts(parts) == 20_000
    assert (tmp_path / "out").read_bytes() == b"x" * 20_000
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(RemoteMigrationError, match="Unable to write to socket"):
        Channel(a.fileno(), sock=a).send_parts([memoryview(b"y" * 1_000_000)])
    a.close()


def _iovec(buffers: list[np.ndarray]) -> np.ndarray:
    return np.array([(b.__array_interface__["data"][0], b.nbytes) for b in buffers], dtype=np.uint64)


def test_send_iovec_writes_every_buffer_in_order_across_partial_writes() -> None:
    """More rows than one writev takes, through a socket with a timeout (non-blocking below:
    writes come short and would block), as a page batch goes out."""
    rng = np.random.default_rng(5)
    buffers = [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in rng.integers(0, 9000, size=2500)]
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
    assert channel.send_iovec(_iovec(buffers)) == len(expected) == channel.sent
    reader.join(10)
    assert bytes(got) == expected
    a.close()
    b.close()


def test_send_iovec_to_a_file_and_to_a_closed_peer(tmp_path: Path) -> None:
    buffers = [np.full(n, n % 251, dtype=np.uint8) for n in (1, 4096, 0, 77)]
    with open(tmp_path / "out", "wb") as f:
        assert Channel(f.fileno()).send_iovec(_iovec(buffers)) == 4174
    assert (tmp_path / "out").read_bytes() == b"".join(x.tobytes() for x in buffers)
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(RemoteMigrationError, match="Unable to write to socket: Broken pipe"):
        Channel(a.fileno(), sock=a).send_iovec(_iovec([np.zeros(1 << 20, dtype=np.uint8)]))
    a.close()
