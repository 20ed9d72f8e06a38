"""Scatter reads: what is left of a list of buffers after part of it was filled."""

from __future__ import annotations

import os
import threading
import time

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
