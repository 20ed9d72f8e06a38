"""Feeding a sans-IO proxy a stream in random chunks, as a socket would deliver it."""

from __future__ import annotations

import random

from confmig.bench.attacks.proxy import StreamProxy


def through(proxy: StreamProxy, stream: bytes, seed: int = 0, max_chunk: int = 30_000) -> bytes:
    """``stream`` through ``proxy`` in chunks of 1 to ``max_chunk`` bytes; what comes out."""
    rng = random.Random(seed)
    out, at = [], 0
    while at < len(stream):
        n = rng.randint(1, max_chunk)
        proxy.receive_data(stream[at : at + n])
        out.append(proxy.data_to_send())
        at += n
    proxy.feed_eof()
    out.append(proxy.data_to_send())
    return b"".join(out)
