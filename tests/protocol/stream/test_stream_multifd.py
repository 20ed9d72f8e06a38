"""Multifd channels: round trip under any chunking, QEMU's stale fields, and corruption."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confmig.common.errors import StateError, StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import (
    NEED_DATA,
    End,
    MultifdDecoder,
    MultifdInit,
    MultifdPacketEncoder,
    MultifdPages,
    MultifdSync,
    multifd_init,
)
from confmig.proto.stream.decoder import fill_views
from confmig.proto.stream.multifd import MultifdPayload, header_size

UUID = bytes(range(16))
NPAGES = 300
BLOCKS = {"pc.ram": NPAGES * PAGE_SIZE, "vga": 4 * PAGE_SIZE}
RAM = np.random.default_rng(11).integers(0, 256, (NPAGES, PAGE_SIZE), dtype=np.uint8)
HEADER = header_size(128)

Norm = tuple[object, ...]


def decode(data: bytes, chunks: list[int] | None = None, pages_per_packet: int = 128) -> list[Norm]:
    decoder = MultifdDecoder(BLOCKS, pages_per_packet=pages_per_packet, buffer_size=8192)
    sizes = list(chunks or [])
    out: list[Norm] = []
    pos = 0
    while not isinstance(event := decoder.next_event(), End):
        if event is NEED_DATA:
            if pos == len(data):
                decoder.feed_eof()
                continue
            n = sizes.pop(0) if sizes else len(data) - pos
            decoder.receive_data(data[pos : pos + n])
            pos += n
        elif isinstance(event, MultifdPages):
            out += [
                ("page", event.block, event.packet_num, int(i), d.tobytes())
                for i, d in zip(event.indices, event.data, strict=True)
            ]
        elif isinstance(event, MultifdSync):
            out.append(("sync", event.packet_num))
        elif isinstance(event, MultifdInit):
            out.append(("init", event.uuid, event.channel))
    return out


def channel(packets: list[tuple[list[int], bool]], pages_per_packet: int = 128) -> bytes:
    """Init, then one packet per ``(page indices, sync)``; no indices means a SYNC packet."""
    encoder = MultifdPacketEncoder(pages_per_packet)
    parts = [multifd_init(UUID, 5)]
    for num, (indices, sync) in enumerate(packets):
        if indices:
            parts.append(encoder.encode("pc.ram", RAM, np.array(indices, np.int64), num, sync=sync).wire)
        else:
            parts.append(encoder.sync(num))
    return b"".join(parts)


def expected(packets: list[tuple[list[int], bool]]) -> list[Norm]:
    out: list[Norm] = [("init", UUID, 5)]
    for num, (indices, sync) in enumerate(packets):
        out += [("page", "pc.ram", num, i, RAM[i].tobytes()) for i in indices]
        if sync or not indices:
            out.append(("sync", num))
    return out


runs = st.builds(lambda first, n: list(range(first, min(first + n, NPAGES))),
                 st.integers(0, NPAGES - 1), st.integers(1, 128))
packets_strategy = st.lists(
    st.tuples(st.lists(st.integers(0, NPAGES - 1), max_size=128, unique=True) | runs, st.booleans()),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(packets=packets_strategy, chunks=st.lists(st.integers(1, 70_000), max_size=30))
def test_any_chunking_decodes_the_same(packets: list[tuple[list[int], bool]], chunks: list[int]) -> None:
    assert decode(channel(packets), chunks) == expected(packets)


def decode_direct(data: bytes, chunks: list[int]) -> list[Norm]:
    """As a receiver that takes each packet's pages itself: no more than ``wanted()`` into the
    decoder, then the payload's rest (and the next header along) into the views the decoder
    gives, in chunks as they come."""
    decoder = MultifdDecoder(BLOCKS, buffer_size=8192, direct=True)
    sizes = list(chunks)
    out: list[Norm] = []
    pos = 0

    def take(limit: int) -> bytes:
        nonlocal pos
        n = min(limit, sizes.pop(0) if sizes else limit, len(data) - pos)
        piece = data[pos : pos + n]
        pos += n
        return piece

    while not isinstance(event := decoder.next_event(), End):
        if event is NEED_DATA:
            piece = take(decoder.wanted())
            if piece:
                decoder.receive_data(piece)
            else:
                decoder.feed_eof()
        elif isinstance(event, MultifdPayload):
            payload = bytearray(event.nbytes)
            views = decoder.payload_views([memoryview(payload)])
            while views:
                piece = take(sum(map(len, views)))
                assert piece, "input ended inside a payload"
                fill_views(views, piece)
                views = decoder.views_received(views, len(piece))
            idx = event.indices.tolist()
            assert event.run == (idx[0] if idx == list(range(idx[0], idx[0] + len(idx))) else None)
            pages = np.frombuffer(payload, np.uint8).reshape(-1, PAGE_SIZE)
            out += [("page", event.block, event.packet_num, int(i), d.tobytes())
                    for i, d in zip(event.indices, pages, strict=True)]
        elif isinstance(event, MultifdSync):
            out.append(("sync", event.packet_num))
        elif isinstance(event, MultifdInit):
            out.append(("init", event.uuid, event.channel))
    return out


@settings(max_examples=60, deadline=None)
@given(packets=packets_strategy, chunks=st.lists(st.integers(1, 70_000), max_size=30))
def test_a_direct_receiver_gets_the_same_pages_in_any_chunking(packets: list[tuple[list[int], bool]],
                                                               chunks: list[int]) -> None:
    assert decode_direct(channel(packets), chunks) == expected(packets)


def test_a_direct_decoder_must_be_given_its_payload_before_the_next_header() -> None:
    decoder = MultifdDecoder(BLOCKS, direct=True)
    decoder.receive_data(channel([([1, 2], False)])[: 64 + HEADER + 5])  # and 5 bytes of pages
    assert isinstance(decoder.next_event(), MultifdInit)
    assert isinstance(decoder.next_event(), MultifdPayload)
    with pytest.raises(StateError):
        decoder.next_event()
    pages = bytearray(2 * PAGE_SIZE)
    with pytest.raises(StateError):  # views for more or less than the pages
        decoder.payload_views([memoryview(pages)[:-1]])
    views = decoder.payload_views([memoryview(pages)])
    assert [len(v) for v in views] == [2 * PAGE_SIZE - 5, HEADER]  # the 5 held are in place
    with pytest.raises(StateError):
        decoder.views_received(views, 2 * PAGE_SIZE - 5 + HEADER + 1)
    views = decoder.views_received(views, PAGE_SIZE)
    assert [len(v) for v in views] == [PAGE_SIZE - 5, HEADER]
    assert decoder.views_received(views, PAGE_SIZE - 5) == []
    assert decoder.next_event() is NEED_DATA


def test_after_a_sync_flagged_packet_no_header_is_awaited_along_with_its_pages() -> None:
    decoder = MultifdDecoder(BLOCKS, direct=True)
    decoder.receive_data(channel([([1, 2], True)])[: 64 + HEADER])
    assert isinstance(decoder.next_event(), MultifdInit)
    assert isinstance(decoder.next_event(), MultifdPayload)
    pages = bytearray(2 * PAGE_SIZE)
    assert [len(v) for v in decoder.payload_views([memoryview(pages)])] == [2 * PAGE_SIZE]


def test_packet_layout() -> None:
    wire = MultifdPacketEncoder().encode("pc.ram", RAM, np.array([7, 3]), 42, sync=True).wire
    head, data = wire[:HEADER], wire[HEADER:]
    assert len(head) == 320 + 8 * 128 == HEADER
    fields = struct.unpack_from(">IIIIIIQ", head)
    assert fields == (0x11223344, 1, 0x1, 128, 2, 2 * PAGE_SIZE, 42)
    assert head[32:64] == bytes(32)
    assert head[64:320] == b"pc.ram" + bytes(250)
    assert head[320:336] == struct.pack(">QQ", 7 << 12, 3 << 12)
    assert head[336:] == bytes(8 * 126)
    assert data == RAM[7].tobytes() + RAM[3].tobytes()
    assert multifd_init(UUID, 5) == struct.pack(">II", 0x11223344, 1) + UUID + b"\x05" + bytes(39)


def test_stale_fields_that_qemu_leaves_are_ignored() -> None:
    """QEMU reuses its packet buffer: a SYNC packet keeps the last ramblock, next_packet_size
    and offsets, and unused offset slots keep old values."""
    stream = bytearray(channel([([1, 2], False), ([], True)]))
    first = 64
    stream[first + 320 + 16 : first + 320 + 24] = struct.pack(">Q", 0xDEAD000)  # slot 2, unused
    sync = first + HEADER + 2 * PAGE_SIZE
    stream[sync + 20 : sync + 24] = struct.pack(">I", 2 * PAGE_SIZE)
    stream[sync + 64 : sync + 70] = b"pc.ram"
    stream[sync + 320 : sync + 336] = struct.pack(">QQ", 1 << 12, 0xFFFFFFFF)
    assert decode(bytes(stream)) == expected([([1, 2], False), ([], True)])


def test_truncation_is_rejected_and_packet_boundaries_end_cleanly() -> None:
    packets = [([0, 1, 2], False), ([], True), ([299], True)]
    stream = channel(packets)
    boundaries = {64, 64 + HEADER + 3 * PAGE_SIZE, 64 + 2 * HEADER + 3 * PAGE_SIZE, len(stream)}
    points = [*range(0, 64 + 2 * HEADER + 200), *range(0, len(stream), 997), *boundaries]
    for length in sorted(set(points)):
        if length in boundaries:
            decode(stream[:length])
        else:
            with pytest.raises(StreamError, match="truncated"):
                decode(stream[:length])


def _flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


P = 64  # the first packet, after MultiFDInit_t


@pytest.mark.parametrize(
    ("at", "mask", "message"),
    [
        (0, 0x01, "bad multifd magic"),
        (7, 0x01, "multifd version 0"),
        (28, 0x01, "non-zero reserved bytes in MultiFDInit_t"),
        (63, 0x80, "non-zero reserved bytes in MultiFDInit_t"),
        (P + 3, 0x01, "bad multifd magic"),
        (P + 7, 0x01, "multifd version 0"),
        (P + 11, 0x02, r"multifd flags 0x3 \(only SYNC, without compression\)"),  # zlib
        (P + 10, 0x01, "multifd flags 0x101"),
        (P + 15, 0x01, "packet sized for 129 pages, channel uses 128"),
        (P + 19, 0xFF, "253 pages in a packet of 128"),
        (P + 22, 0x01, "next_packet_size 8448 for 2 uncompressed pages"),
        (P + 40, 0x01, "non-zero reserved bytes in MultiFDPacket_t"),
        (P + 64, 0x01, "unknown RAM block 'qc.ram'"),
        (P + 64, ord("p"), "ramblock name empty or not NUL-terminated"),
        (P + 71, 0x01, "bytes after the NUL of the ramblock name"),
        (P + 320 + 7, 0x01, "page offset 0x1 not a page of RAM block 'pc.ram'"),
        (P + 320 + 8 + 5, 0x80, "page offset 0x805000 not a page of RAM block 'pc.ram'"),
    ],
)
def test_corrupt_headers_are_rejected(at: int, mask: int, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        decode(_flip(channel([([0, 5], True)]), at, mask))


def _with_offsets(stream: bytes, offsets: list[int]) -> bytes:
    """The first packet's offsets replaced (its page count kept)."""
    at = P + 320
    return stream[:at] + struct.pack(f">{len(offsets)}Q", *offsets) + stream[at + 8 * len(offsets) :]


@pytest.mark.parametrize(("offsets", "bad"), [
    ([(NPAGES - 1) * PAGE_SIZE, NPAGES * PAGE_SIZE], NPAGES * PAGE_SIZE),  # a run past the end
    ([2**64 - PAGE_SIZE, 0], 2**64 - PAGE_SIZE),  # one that wraps around
    ([PAGE_SIZE + 1, 2 * PAGE_SIZE + 1], PAGE_SIZE + 1),  # one page apart, but not pages
], ids=["past-the-end", "wrapping", "misaligned"])
def test_a_run_that_is_not_pages_of_the_block_is_rejected(offsets: list[int], bad: int) -> None:
    stream = _with_offsets(channel([([NPAGES - 2, NPAGES - 1], True)]), offsets)
    with pytest.raises(StreamError, match=f"page offset 0x{bad:x} not a page of RAM block"):
        decode(stream)
    with pytest.raises(StreamError, match=f"page offset 0x{bad:x} not a page of RAM block"):
        decode_direct(stream, [])


TOP = 2**64 - PAGE_SIZE  # the highest page-aligned offset
huge_offsets = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 64).map(lambda k: TOP - k * PAGE_SIZE),  # pages near the top
    st.integers(0, 64).map(lambda k: TOP - k * PAGE_SIZE + 1),  # just past one
    st.integers(0, 64).map(lambda k: k * PAGE_SIZE),
)


@settings(max_examples=300, deadline=None)
@given(first=huge_offsets, n=st.integers(1, 128), bends=st.dictionaries(st.integers(0, 127), huge_offsets),
       block_pages=st.sampled_from([NPAGES, 2**52 - 1, 2**52]))
def test_a_packets_offsets_are_taken_exactly_when_each_is_a_page_of_its_block(
        first: int, n: int, bends: dict[int, int], block_pages: int) -> None:
    # Runs near the top of the u64 range, where the run check's integer would carry from one
    # offset into the next, against the plain rule: every offset a page inside the block.
    offsets = [(first + k * PAGE_SIZE) % 2**64 for k in range(n)]
    for k, value in bends.items():
        if k < n:
            offsets[k] = value
    stream = _with_offsets(channel([(list(range(n)), False)]), offsets)
    decoder = MultifdDecoder({"pc.ram": block_pages * PAGE_SIZE}, direct=True)
    decoder.receive_data(stream[: P + HEADER])
    assert isinstance(decoder.next_event(), MultifdInit)
    if all(o % PAGE_SIZE == 0 and o // PAGE_SIZE < block_pages for o in offsets):
        event = decoder.next_event()
        assert isinstance(event, MultifdPayload)
        assert event.indices.tolist() == [o // PAGE_SIZE for o in offsets]
        consecutive = all(b - a == PAGE_SIZE for a, b in itertools.pairwise(offsets))
        assert event.run == (offsets[0] // PAGE_SIZE if consecutive else None)
    else:
        with pytest.raises(StreamError, match="not a page of RAM block"):
            decoder.next_event()


def test_a_run_whose_integer_carries_is_refused() -> None:
    # Read as one integer these equal the run from their first offset (the last step carries
    # into the one before); only the block's bound stops them.
    offsets = [2**64 - 2 * PAGE_SIZE, 2**64 - PAGE_SIZE + 1, 0]
    stream = _with_offsets(channel([([0, 1, 2], False)]), offsets)
    for block_pages in (NPAGES, 2**52 - 1):  # a small block, and the largest the u64 allows
        decoder = MultifdDecoder({"pc.ram": block_pages * PAGE_SIZE}, direct=True)
        decoder.receive_data(stream[: P + HEADER])
        assert isinstance(decoder.next_event(), MultifdInit)
        with pytest.raises(StreamError, match="not a page of RAM block"):
            decoder.next_event()


@pytest.mark.parametrize("sync", [False, True], ids=["packet", "sync-flagged"])
def test_a_direct_decoder_whose_input_ended_inside_the_pages_says_truncated(sync: bool) -> None:
    decoder = MultifdDecoder(BLOCKS, direct=True)
    decoder.receive_data(channel([([1, 2], sync)])[: P + HEADER + 5])
    decoder.feed_eof()
    assert isinstance(decoder.next_event(), MultifdInit)
    with pytest.raises(StreamError, match="truncated: multifd pages"):
        decoder.next_event()


def test_an_empty_packet_must_be_a_sync() -> None:
    with pytest.raises(StreamError, match="packet with neither pages nor SYNC"):
        decode(_flip(channel([([], True)]), P + 11))


def test_corrupt_values_are_seen() -> None:
    packets = [([0, 5], False)]
    stream = channel(packets)
    values = [(8, 0x01), (23, 0x80), (24, 0x01), (P + 24, 0x01), (P + 31, 0x80)]
    values += [(P + 320 + 8 + 6, 0x10)]  # offset 0x5000 -> 0x4000
    values += [(at, 0x01) for at in range(P + HEADER, len(stream), 501)]  # page data
    for at, mask in values:
        assert decode(_flip(stream, at, mask)) != expected(packets), at


def test_decoder_checks_page_count_per_packet() -> None:
    stream = channel([([1, 2, 3], True)], pages_per_packet=4)
    assert decode(stream, pages_per_packet=4) == expected([([1, 2, 3], True)])
    with pytest.raises(StreamError, match="packet sized for 4 pages, channel uses 128"):
        decode(stream)


OUTSIDE = {"run-past-the-end": [NPAGES - 2, NPAGES - 1, NPAGES], "run-from-below": [-1, 0, 1],
           "scattered-past-the-end": [5, NPAGES], "scattered-below": [-3, 7]}


@pytest.mark.parametrize("indices", OUTSIDE.values(), ids=OUTSIDE.keys())
def test_a_batch_refuses_pages_outside_the_block_before_any_address_is_made(indices: list[int]) -> None:
    batch = MultifdPacketEncoder(128).encode("pc.ram", RAM, np.array(indices, dtype=np.int64), 0)
    with pytest.raises(IndexError):
        batch.iovec()


def test_a_batch_refuses_a_block_that_is_not_whole_pages_in_a_row() -> None:
    batch = MultifdPacketEncoder(128).encode("pc.ram", RAM[::2], np.arange(3, dtype=np.int64), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        batch.iovec()


@settings(max_examples=60, deadline=None)
@given(indices=st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=40),
       per=st.integers(1, 9), first=st.integers(0, 2**64 - 41), sync=st.booleans())
def test_a_batch_is_full_packets_numbered_in_a_row_then_a_short_one(
        indices: list[int], per: int, first: int, sync: bool) -> None:
    """Any pages (runs, gaps, any order, repeats) in one batch decode as the packets one at a
    time would: ``per`` pages each but the last, numbered from ``first``, SYNC on the last."""
    batch = MultifdPacketEncoder(per).encode("pc.ram", RAM, np.array(indices, np.int64), first, sync=sync)
    chunks = [indices[k : k + per] for k in range(0, len(indices), per)]
    assert batch.packets == len(chunks)
    want: list[Norm] = [("init", UUID, 5)]
    for j, chunk in enumerate(chunks):
        want += [("page", "pc.ram", first + j, i, RAM[i].tobytes()) for i in chunk]
    if sync:
        want.append(("sync", first + len(chunks) - 1))
    assert decode(multifd_init(UUID, 5) + batch.wire, pages_per_packet=per) == want


def test_a_batch_points_at_guest_ram_one_buffer_per_run() -> None:
    """The gather write's buffers: a header, then each run of consecutive pages of its packet
    as one buffer where it lies in RAM (a write after encoding is what goes out)."""
    ram = RAM.copy()
    batch = MultifdPacketEncoder(4).encode("pc.ram", ram, np.array([5, 6, 7, 8, 9, 2, 3, 40]), 0)
    iov = batch.iovec()
    base = ram.ctypes.data
    assert [(int(a) - base, int(n)) for a, n in iov if n != header_size(4)] == [
        (5 * PAGE_SIZE, 4 * PAGE_SIZE),  # packet 0: 5..8
        (9 * PAGE_SIZE, PAGE_SIZE), (2 * PAGE_SIZE, 2 * PAGE_SIZE), (40 * PAGE_SIZE, PAGE_SIZE),
    ]
    assert [int(n) == header_size(4) for _, n in iov] == [True, False, True, False, False, False]
    ram[40] = 0xAB
    assert batch.wire.endswith(bytes([0xAB]) * PAGE_SIZE)


def test_packet_numbers_must_fit_a_u64() -> None:
    encoder = MultifdPacketEncoder(2)
    last = encoder.encode("pc.ram", RAM, np.arange(4), 2**64 - 2)  # numbers 2**64-2 and -1
    assert decode(multifd_init(UUID, 5) + last.wire, pages_per_packet=2)[-1][2] == 2**64 - 1
    for first in (2**64 - 1, -1):
        with pytest.raises(ValueError, match="u64 packet_num"):
            encoder.encode("pc.ram", RAM, np.arange(4), first)


def test_headers_must_be_whole_rows_of_bytes() -> None:
    """The iovec points the kernel at each header: refused unless they are exactly a header
    wide and contiguous (numpy would let a reversed view through)."""
    batch = MultifdPacketEncoder(2).encode("pc.ram", RAM, np.arange(4), 0)
    for heads in (batch.heads[::-1], batch.heads[:, :-1], batch.heads.view(np.int8)):
        with pytest.raises(ValueError, match="headers must be"):
            dataclasses.replace(batch, heads=heads).iovec()


def test_packets_may_name_another_block_and_back() -> None:
    """The decoder remembers the block the last packet named; another name is looked up, and
    an unknown one after a known one is still refused."""
    encoder = MultifdPacketEncoder(128)
    vga = np.full((4, PAGE_SIZE), 0x5A, dtype=np.uint8)
    wire = (multifd_init(UUID, 5) + encoder.encode("pc.ram", RAM, np.array([3]), 0).wire
            + encoder.encode("vga", vga, np.array([1]), 1).wire
            + encoder.encode("pc.ram", RAM, np.array([4]), 2).wire)
    assert decode(wire) == [("init", UUID, 5), ("page", "pc.ram", 0, 3, RAM[3].tobytes()),
                            ("page", "vga", 1, 1, vga[1].tobytes()),
                            ("page", "pc.ram", 2, 4, RAM[4].tobytes())]
    unknown = wire + encoder.encode("rom", vga, np.array([0]), 3).wire
    with pytest.raises(StreamError, match="unknown RAM block 'rom'"):
        decode(unknown)
