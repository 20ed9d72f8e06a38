"""Hostile input to every parser of the migration stream: the main channel's decoder, multifd
channels, the confidential records (PSP envelopes, Migration Handler records, the shared-regions
list), the return path and the cpr channel's state record.

Each parser either accepts its input or raises its own error (``StreamError``, ``MailboxError``,
``CprError``), never another exception and never a hang, whatever the bytes and however they
are chunked. ``tests/protocol/stream`` checks that corruption of valid streams is caught;
here the input is built from the formats' pieces with fields nobody would send.
"""

from __future__ import annotations

import itertools
import struct
import zlib

import numpy as np
import pytest
from hostile import budget
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto import cpr
from confmig.proto import mailbox as mb
from confmig.proto.stream import (
    NEED_DATA,
    ConfidentialSubtype,
    End,
    MultifdDecoder,
    MultifdPacketEncoder,
    RamFlag,
    StreamDecoder,
    confidential_record,
    device_section,
    eof,
    eos_and_footer,
    header,
    multifd_init,
    psp,
    ram_end_begin,
    ram_part_begin,
    ram_setup,
    shared_regions,
)
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.multifd import header_size

pytestmark = pytest.mark.fuzz

BLOCK = "pc.ram"
BLOCK_PAGES = 8
PREFIX = header("pc-q35-7.2") + ram_setup(0, [(BLOCK, BLOCK_PAGES * PAGE_SIZE)])
"""A valid start (header, the ram section with its MEM_SIZE): what follows is hostile."""

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 40)
flag_words = st.builds(lambda offset, flags: (offset & ~0xFFF) | flags,
                       st.one_of(st.integers(0, BLOCK_PAGES + 2).map(lambda p: p * PAGE_SIZE), u64),
                       st.one_of(st.sampled_from([int(f) for f in RamFlag]), st.integers(0, 0xFFF)))


def counted(draw: st.DrawFn) -> bytes:
    name = draw(st.one_of(st.just(BLOCK.encode()), st.binary(max_size=6)))
    return bytes([len(name)]) + name


@st.composite
def ram_records(draw: st.DrawFn) -> bytes:
    """A RAM record of any flags, with or without a block name, a page, a fill byte."""
    word = struct.pack(">Q", draw(flag_words))
    name = counted(draw) if draw(st.booleans()) else b""
    body = draw(st.one_of(st.just(b"\0"), st.just(bytes(PAGE_SIZE)), st.binary(max_size=16)))
    return word + name + body


@st.composite
def json_bombs(draw: st.DrawFn) -> bytes:
    """A VMDESCRIPTION record whose JSON nests deeper than a recursive parser can go."""
    depth = draw(st.integers(1, 200_000))
    text = draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                                 b"[" * depth]))
    return b"\x06" + struct.pack(">I", len(text)) + text


ENDED = ram_end_begin(0) + eos_and_footer(0)
"""The ram section's last part, empty: after it, EOF may come (and a vmdescription)."""

vmdescriptions = st.one_of(
    json_bombs(),
    st.builds(lambda text: b"\x06" + struct.pack(">I", len(text)) + text,
              st.one_of(st.binary(max_size=24), st.sampled_from([b"{}", b"[]", b'{"a": 1}', b"null", b"{"]))),
)

pieces = st.one_of(
    st.just(ENDED + eof()),
    st.builds(lambda desc, rest: ENDED + eof() + desc + rest, vmdescriptions, st.binary(max_size=4)),
    st.builds(ram_part_begin, st.sampled_from([0, 0, 1, 2**32 - 1])),
    st.builds(ram_end_begin, st.sampled_from([0, 1])),
    st.builds(eos_and_footer, st.sampled_from([0, 1, 5])),
    st.builds(confidential_record, st.sampled_from(list(ConfidentialSubtype)), st.binary(max_size=64)),
    st.builds(lambda sub, n, data: struct.pack(">QBI", RamFlag.CONFIDENTIAL, sub, n) + data,
              u8, u32, st.binary(max_size=16)),
    st.builds(device_section, st.integers(0, 4), st.sampled_from(["cpu", "serial", "x" * 255, "é"]),
              u32, u32, st.binary(max_size=32)),
    st.builds(lambda kind, sid, name, rest: bytes([kind]) + struct.pack(">I", sid) + name + rest,
              u8, u32, st.binary(max_size=8), st.binary(max_size=12)),
    ram_records(),
    st.just(eof()),
    json_bombs(),
    st.builds(lambda n, data: b"\x06" + struct.pack(">I", n) + data, u32, st.binary(max_size=24)),
    st.binary(max_size=24),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def drain(decoder: StreamDecoder | MultifdDecoder | rp.ReturnPathDecoder, chunks: list[bytes]) -> str:
    """Feed ``chunks``, then the end of input: ``"end"`` or ``"error"``. Every call on the
    decoder makes progress (a bounded number of events per byte), so a hang fails the test."""
    budget_left = 10 * (sum(len(c) for c in chunks) + 10)
    try:
        for chunk in [*chunks, None]:
            if chunk is None:
                decoder.feed_eof()
            else:
                decoder.receive_data(chunk)
            while (event := decoder.next_event()) is not NEED_DATA:
                if isinstance(event, End):
                    return "end"
                budget_left -= 1
                assert budget_left > 0, "the decoder returns events without consuming input"
    except StreamError as exc:
        assert str(exc) and "\n" not in str(exc)
        with pytest.raises(StreamError, match="already failed"):
            decoder.next_event()  # a failed decoder stays failed
        return "error"
    raise AssertionError("the end of input gave neither End nor an error")


@budget(120)
@given(st.lists(pieces, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_the_stream_decoder_takes_any_records_in_any_chunking(tail: list[bytes], cuts: list[int]) -> None:
    data = PREFIX + b"".join(tail)
    whole = drain(StreamDecoder(buffer_size=64 * 1024), [data])
    assert drain(StreamDecoder(buffer_size=4096), chunked(data, cuts)) == whole


@budget(60)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=4))
def test_the_stream_decoder_takes_any_bytes(data: bytes, cuts: list[int]) -> None:
    drain(StreamDecoder(buffer_size=4096), chunked(data, cuts))
    drain(StreamDecoder(buffer_size=4096), chunked(PREFIX + data, cuts))


def test_a_vmdescription_nested_too_deep_is_a_stream_error() -> None:
    """Found by the property above: ``json.loads`` raised RecursionError, not a StreamError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    data = PREFIX + ENDED + eof() + b"\x06" + struct.pack(">I", len(deep)) + deep
    decoder = StreamDecoder()
    decoder.receive_data(data)
    decoder.feed_eof()
    with pytest.raises(StreamError, match="vmdescription is not valid JSON"):
        while decoder.next_event() is not NEED_DATA:
            pass


MULTIFD_PAGES = 4
MULTIFD_BLOCKS = {BLOCK: BLOCK_PAGES * PAGE_SIZE}


@st.composite
def multifd_packets(draw: st.DrawFn) -> bytes:
    """A packet the encoder made, with one field then overwritten by anything."""
    n = draw(st.integers(0, MULTIFD_PAGES))
    encoder = MultifdPacketEncoder(MULTIFD_PAGES)
    if n == 0:
        packet = bytearray(encoder.sync(draw(u64)))
    else:
        indices = np.array(draw(st.lists(st.integers(0, BLOCK_PAGES - 1), min_size=n, max_size=n,
                                         unique=True)), np.int64)
        pages = np.zeros((BLOCK_PAGES, PAGE_SIZE), np.uint8)
        packet = bytearray(encoder.encode(BLOCK, pages, indices, draw(u64), sync=draw(st.booleans())).wire)
    if draw(st.booleans()):
        at = draw(st.integers(0, header_size(MULTIFD_PAGES) - 1))
        width = draw(st.sampled_from([1, 4, 8]))
        packet[at : at + width] = draw(st.binary(min_size=width, max_size=width))[: len(packet) - at]
    return bytes(packet)


@budget(80)
@given(st.lists(st.one_of(multifd_packets(), st.binary(max_size=40)), max_size=5),
       st.lists(st.integers(0, 10**6), max_size=6), st.booleans())
def test_a_multifd_channel_takes_any_packets(packets: list[bytes], cuts: list[int], good_init: bool) -> None:
    init = multifd_init(bytes(16), 1) if good_init else bytes(64)
    data = init + b"".join(packets)
    decoder = MultifdDecoder(MULTIFD_BLOCKS, pages_per_packet=MULTIFD_PAGES, buffer_size=8192)
    drain(decoder, chunked(data, cuts))


@budget(80)
@given(st.lists(st.one_of(
    st.builds(lambda kind, n, body: struct.pack(">HH", kind, n) + body,
              st.one_of(st.sampled_from([int(m) for m in rp.RpMessage]), st.integers(0, 0xFFFF)),
              st.one_of(st.sampled_from([0, 4, 8, rp.CONFIDENTIAL_MAX, rp.CONFIDENTIAL_MAX + 1]),
                        st.integers(0, 0xFFFF)),
              st.binary(max_size=12)),
    st.binary(max_size=12)), max_size=6), st.lists(st.integers(0, 10**5), max_size=6))
def test_the_return_path_takes_any_messages(messages: list[bytes], cuts: list[int]) -> None:
    drain(rp.ReturnPathDecoder(), chunked(b"".join(messages), cuts))


def blobs(limit: int) -> st.SearchStrategy[bytes]:
    """A u32 length (often at or past ``limit``, or a lie) and some bytes."""
    return st.builds(lambda n, data: struct.pack(">I", n) + data,
                     st.one_of(st.sampled_from([0, 1, limit, limit + 1, 2**32 - 1]), st.integers(0, 64)),
                     st.binary(max_size=48))


psp_payloads = st.one_of(
    st.builds(lambda kind, head, *rest: bytes([kind]) + head + b"".join(rest),
              st.sampled_from([1, 2, 3, 0, 4, 255]), st.binary(min_size=0, max_size=8),
              blobs(psp.MAX_PACKET_HEADER), blobs(PAGE_SIZE)),
    st.builds(lambda gpa, head: bytes([2]) + struct.pack(">Q", gpa) + struct.pack(">I", len(head)) + head
              + struct.pack(">I", PAGE_SIZE) + bytes(PAGE_SIZE),
              u64, st.binary(max_size=psp.MAX_PACKET_HEADER + 1)),
    st.binary(max_size=64),
)


@budget(100)
@given(psp_payloads)
def test_psp_records_are_one_record_or_a_stream_error(payload: bytes) -> None:
    try:
        record = psp.decode(payload)
    except StreamError:
        return
    assert psp.encode(record) == payload  # what is accepted is exactly one record


@budget(100)
@given(st.one_of(
    st.builds(lambda n, ranges: struct.pack(">I", n) + b"".join(struct.pack(">QQ", *r) for r in ranges),
              st.one_of(st.integers(0, 4), st.sampled_from([shared_regions.MAX_REGIONS + 1, 2**32 - 1])),
              st.lists(st.tuples(st.one_of(u64, st.integers(0, 16).map(lambda p: p * PAGE_SIZE)),
                                 st.one_of(u64, st.integers(0, 4).map(lambda p: p * PAGE_SIZE))),
                       max_size=4)),
    st.binary(max_size=40)))
def test_shared_regions_are_a_valid_list_or_a_stream_error(payload: bytes) -> None:
    try:
        ranges = shared_regions.decode(payload)
    except StreamError:
        return
    assert shared_regions.encode(ranges) == payload
    ends = [0] + [gfn + n for gfn, n in ranges]
    assert all(n > 0 and gfn >= end for (gfn, n), end in zip(ranges, ends, strict=False))


@budget(100)
@given(st.one_of(
    st.builds(lambda head, rest: mb.RECORD_HEADER.pack(*head) + rest,
              st.tuples(st.sampled_from([2, 1, 255]), st.sampled_from([1, 0, 2]), st.integers(0, 4),
                        u32, u64, u64,
                        st.one_of(st.integers(0, mb.BATCH_PAGES + 1), u32), st.one_of(st.integers(0, 3), u32),
                        st.one_of(st.integers(0, mb.BODY_MAX + 1), u32), u32,
                        st.binary(min_size=16, max_size=16)),
              st.binary(max_size=64)),
    st.binary(max_size=80)))
def test_mh_record_headers_are_checked_against_their_length(record: bytes) -> None:
    """The Migration Handler's records ride in the stream opaque; the VMM checks their shape
    with the mailbox's decoder before it hands them on."""
    try:
        h = mb.decode_record_header(record)
    except mb.MailboxError:
        return
    assert h.size == len(record) <= mb.SLOT_DATA and h.nzero <= h.npages <= mb.BATCH_PAGES
    assert len(mb.gpa_entries(record, h)) == h.npages


cpr_entries = st.lists(st.builds(lambda kind, size, name: struct.pack(">BQB", kind, size, len(name)) + name,
                                 st.integers(0, 4), u64, st.binary(max_size=cpr.MAX_NAME + 2)), max_size=4)


@budget(100)
@given(st.one_of(
    st.builds(lambda n, handle, entries, lie, fix_crc: _cpr_message(n, handle, entries, lie, fix_crc),
              st.integers(0, cpr.MAX_ENTRIES + 1), u32, cpr_entries, st.integers(-6, 6), st.booleans()),
    st.binary(max_size=64)))
def test_the_cpr_state_is_a_state_or_a_cpr_error(message: bytes) -> None:
    head, rest = message[: cpr.HEADER.size], message[cpr.HEADER.size :]
    try:
        state = cpr.decode(head, rest)
    except cpr.CprError:
        return
    assert cpr.encode(state) == message


def _cpr_message(n: int, handle: int, entries: list[bytes], lie: int, fix_crc: bool) -> bytes:
    body = struct.pack(">I", handle) + b"".join(entries)
    length = max(len(body) + lie, 0)
    crc = zlib.crc32(body) if fix_crc else 0
    return cpr.HEADER.pack(cpr.MAGIC, cpr.VERSION, n, length) + body + cpr.TRAILER.pack(crc)


@pytest.mark.parametrize("head", [b"", b"CPR1", cpr.HEADER.pack(cpr.MAGIC, cpr.VERSION, 0, 0)])
def test_a_short_cpr_header_or_body_is_a_cpr_error(head: bytes) -> None:
    """Found by the property above: a header of the wrong size, or a body too short for the
    handle, raised struct.error."""
    with pytest.raises(cpr.CprError):
        cpr.decode(head, cpr.TRAILER.pack(0))
