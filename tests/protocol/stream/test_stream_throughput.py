"""1 GiB of random pages through the codec, and its throughput printed (``pytest -m slow -s``).

Encode: zero check, record headers and the iovec a channel writes, batch after batch (the
pages themselves are not copied: the kernel reads them from RAM). Decode: the decoder parses the
records in its buffer and the pages are scattered into guest RAM; filling the decoder's
buffer (the kernel's ``recv_into`` copy in real life) is timed apart. The speeds are printed,
not asserted: the machine is shared, and performance bars live in ``confmig bench``, measured
as ratios within one run.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from confmig.common.units import PAGE_SIZE, GiB
from confmig.proto.stream import (
    NEED_DATA,
    End,
    PageBatchEncoder,
    RamPages,
    StreamDecoder,
    eof,
    eos_and_footer,
    header,
    ram_end_begin,
    ram_part_begin,
    ram_setup,
)

NPAGES = GiB // PAGE_SIZE
RUNS = 3


def _encode(encoder: PageBatchEncoder, pages: np.ndarray, out: bytearray | None) -> float:
    indices = np.arange(NPAGES, dtype=np.int64)
    start = time.perf_counter()
    for first in range(0, NPAGES, encoder.max_pages):
        batch = encoder.encode("pc.ram", pages, indices[first : first + encoder.max_pages])
        batch.iovec()
        if out is not None:
            out += batch.wire
    return time.perf_counter() - start


def _decode(stream: memoryview, ram: np.ndarray) -> tuple[float, float]:
    decoder = StreamDecoder()
    feeding = 0.0
    start = time.perf_counter()
    pos = 0
    while not isinstance(event := decoder.next_event(), End):
        if event is NEED_DATA:
            t = time.perf_counter()
            buf = decoder.get_buffer()
            n = min(len(buf), len(stream) - pos)
            buf[:n] = stream[pos : pos + n]
            pos += n
            decoder.buffer_updated(n) if n else decoder.feed_eof()
            feeding += time.perf_counter() - t
        elif isinstance(event, RamPages):
            ram[event.indices] = event.data
    return time.perf_counter() - start, feeding


@pytest.mark.slow
def test_one_gib_of_pages_round_trips_through_the_codec() -> None:
    source = np.frombuffer(np.random.default_rng(0).bytes(GiB), np.uint8).reshape(NPAGES, PAGE_SIZE)
    target = np.empty_like(source)
    target.fill(1)  # fault it in: first touch runs at ~1.4 GB/s here and is not the codec
    encoder = PageBatchEncoder()

    encode_s = min(_encode(encoder, source, None) for _ in range(RUNS))

    stream = bytearray(header("pc-q35-7.2") + ram_setup(0, [("pc.ram", GiB)]) + ram_part_begin(0))
    _encode(encoder, source, stream)
    stream += eos_and_footer(0) + ram_end_begin(0) + eos_and_footer(0) + eof()
    decode_s, feed_s = min(_decode(memoryview(stream), target) for _ in range(RUNS))
    assert np.array_equal(target, source)

    encode_gbps = GiB / encode_s / 1e9
    decode_gbps = GiB / (decode_s - feed_s) / 1e9
    print(
        f"\nencode {encode_gbps:.2f} GB/s; decode {decode_gbps:.2f} GB/s "
        f"({GiB / decode_s / 1e9:.2f} GB/s counting the buffer fill that recv_into would do)"
    )
