"""The decoder's checks, one by one, and its vectorised fast path."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from streamcases import decode

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE, MiB
from confmig.proto.stream import (
    NEED_DATA,
    ConfidentialSubtype,
    DeviceState,
    End,
    PageBatchEncoder,
    RamPages,
    RamZeroPages,
    StreamDecoder,
    StreamEvent,
    confidential_record,
    device_section,
    encode_zero_pages,
    eof,
    eos_and_footer,
    header,
    ram_end_begin,
    ram_part_begin,
    ram_setup,
)
from confmig.proto.stream.format import MAX_BLOB

HEAD = header("pc-q35-7.2")
SETUP = ram_setup(0, [("pc.ram", 4 * PAGE_SIZE)])
PART = HEAD + SETUP + ram_part_begin(0)
"""A stream up to the first RAM record of a precopy iteration."""


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def page_record(index: int, flags: int = 0x08, name: bytes = b"pc.ram") -> bytes:
    named = b"" if flags & 0x20 else bytes([len(name)]) + name
    body = bytes(PAGE_SIZE) if flags & 0x08 else b"\x00"
    return u64(index << 12 | flags) + named + body


def complete(ram_body: bytes = b"") -> bytes:
    return PART + ram_body + eos_and_footer(0) + ram_end_begin(0) + eos_and_footer(0) + eof()


def rejects(data: bytes, message: str, at: int | None = None) -> None:
    with pytest.raises(StreamError) as info:
        decode(data)
    assert message in str(info.value), str(info.value)
    if at is not None:
        assert str(info.value).endswith(f"(at stream offset {at})"), str(info.value)


def test_file_header_checks() -> None:
    rejects(b"QEVN" + HEAD[4:], "bad file magic 0x5145564e", at=0)
    rejects(HEAD[:4] + b"\x00\x00\x00\x02" + HEAD[8:], "stream version 2", at=4)
    rejects(HEAD[:8] + b"\x01", "expected CONFIGURATION", at=8)
    rejects(HEAD[:9] + b"\x00\x00\x00\x00", "machine type length 0", at=9)
    rejects(HEAD[:9] + b"\x00\x00\x01\x01", "machine type length 257", at=9)
    rejects(HEAD[:9] + b"\x00\x00\x00\x01\xff", "machine type is not UTF-8", at=13)


def test_section_checks() -> None:
    at = len(HEAD)
    rejects(HEAD + b"\x04\x00\x00\x00\x01\x00", "empty section idstr", at=at + 5)
    rejects(HEAD + b"\x42", "unknown section type 0x42", at=at)
    rejects(HEAD + b"\x05", "SUBSECTION (0x05) where a section header belongs", at=at)
    rejects(HEAD + b"\x7e\x00\x00\x00\x00", "SECTION_FOOTER (0x7e)", at=at)
    rejects(HEAD + SETUP + b"\x07", "CONFIGURATION (0x07)", at=at + len(SETUP))
    full_ram = b"\x04" + SETUP[1:]
    rejects(HEAD + full_ram, "'ram' sent as SECTION_FULL", at=at)
    start_cpu = b"\x01\x00\x00\x00\x01\x03cpu" + bytes(8)
    rejects(HEAD + start_cpu, "SECTION_START for 'cpu': only 'ram' is iterative", at=at)
    rejects(HEAD + SETUP + SETUP, "section id 0 opened twice", at=at + len(SETUP) + 1)
    ram_v3 = SETUP[:13] + b"\x00\x00\x00\x03" + SETUP[17:]
    rejects(HEAD + ram_v3, "'ram' instance 0 version 3", at=at + 9)
    part5 = HEAD + SETUP + b"\x02\x00\x00\x00\x05"
    rejects(part5, "SECTION_PART for section 5", at=at + len(SETUP) + 1)
    ended = complete()[: -len(eof())]
    rejects(ended + ram_part_begin(0), "not an open 'ram' section")
    rejects(PART + eos_and_footer(0) + eof(), "EOF while 'ram' section 0 has not ended")


def test_footer_must_close_the_open_section() -> None:
    body = PART + u64(0x10)
    rejects(body + b"\x7e\x00\x00\x00\x01", "footer names section 1, open is 0", at=len(body) + 1)
    rejects(body + b"\x7f\x00\x00\x00\x00", "expected the footer of section 0", at=len(body))
    cpu = device_section(3, "cpu", 0, 1, b"abc")
    rejects(complete()[:-1] + cpu[:-1] + b"\x04" + eof(), "footer names section 4, open is 3")


def test_ram_record_checks() -> None:
    at = len(PART)
    rejects(PART + u64(0x40), "unsupported RAM record flags 0x040 (XBZRLE)", at=at)
    rejects(PART + u64(0x200), "(MULTIFD_FLUSH)", at=at)
    rejects(PART + u64(0x400), "(CGS_STATE)", at=at)
    rejects(PART + u64(0x0A), "unsupported RAM record flags 0x00a", at=at)
    rejects(PART + u64(0x30), "unsupported RAM record flags 0x030", at=at)
    rejects(PART + u64(0x08) + b"\x00", "empty RAM block idstr", at=at + 8)
    rejects(PART + page_record(0, name=b"pc.rom"), "'pc.rom' was not announced", at=at + 9)
    rejects(PART + page_record(1, flags=0x28), "PAGE|CONTINUE before any record named", at=at)
    rejects(PART + page_record(1, flags=0x22), "ZERO|CONTINUE before any record named", at=at)
    rejects(PART + u64(0x1010), "EOS record with offset bits 0x1000", at=at)
    rejects(PART + u64(0x1000 | 0x800), "CONFIDENTIAL record with offset bits", at=at)
    rejects(PART + u64(0x800) + b"\x04" + bytes(4), "unknown confidential subtype 4", at=at + 8)
    too_big = u64(0x800) + b"\x01" + struct.pack(">I", MAX_BLOB + 1)
    rejects(PART + too_big, f"confidential payload of {MAX_BLOB + 1} bytes", at=at + 9)


def test_mem_size_checks() -> None:
    start = HEAD + SETUP[:17]  # START header of 'ram' section 0
    at = len(start)

    def mem_size(total: int, *blocks: tuple[bytes, int]) -> bytes:
        entries = b"".join(bytes([len(n)]) + n + u64(size) for n, size in blocks)
        footer = u64(0x10) + b"\x7e" + bytes(4)
        return start + u64(total | 0x04) + entries + footer + ram_end_begin(0) + footer + eof()

    assert decode(mem_size(8192, (b"a", 4096), (b"b", 4096)))[2] == (
        "memsize",
        (("a", 4096), ("b", 4096)),
    )
    rejects(mem_size(0), "MEM_SIZE announces no RAM", at=at)
    rejects(mem_size(8192, (b"a", 4096), (b"a", 4096)), "'a' listed twice", at=at + 8 + 10 + 1)
    rejects(mem_size(4096, (b"a", 8192)), "'a' of 8192 bytes", at=at + 8 + 2)
    rejects(mem_size(8192, (b"a", 4095), (b"b", 4097)), "'a' of 4095 bytes", at=at + 10)
    rejects(mem_size(8192, (b"a", 4096)), "empty RAM block idstr", at=at + 8 + 10)
    rejects(start + SETUP[17:-13] + SETUP[17:], "a second MEM_SIZE record", at=len(start) + 23)


def test_page_offsets_stay_inside_their_block() -> None:
    beyond = "page offset 0x4000 beyond RAM block 'pc.ram' of 16384 bytes"
    rejects(PART + page_record(4), beyond, at=len(PART))
    run = page_record(0) + page_record(1, 0x28) + page_record(9, 0x28) + page_record(2, 0x28)
    third = len(PART) + len(page_record(0)) + len(page_record(1, 0x28))
    rejects(complete(run), "page offset 0x9000 beyond", at=third)
    zeros = page_record(0, 0x02) + page_record(3, 0x22) + page_record(4, 0x22)
    fourth = len(PART) + len(page_record(0, 0x02)) + 9
    rejects(complete(zeros), "page offset 0x4000 beyond", at=fourth)


def test_zero_pages_must_fill_with_zero() -> None:
    named = page_record(1, 0x02)
    rejects(complete(named[:-1] + b"\x07"), "fill byte 0x07 (must be 0)", at=len(PART) + 15)
    run = named + u64(2 << 12 | 0x22) + b"\x00" + u64(3 << 12 | 0x22) + b"\x09"
    rejects(complete(run), "fill byte 0x09", at=len(PART) + len(named) + 9 + 8)


def test_device_state_and_trailer_checks() -> None:
    done = complete()
    too_big = b"\x04\x00\x00\x00\x03\x03cpu" + bytes(8) + struct.pack(">I", MAX_BLOB + 1)
    rejects(done[:-1] + too_big, f"device state of {MAX_BLOB + 1} bytes", at=len(done) - 1 + 17)
    rejects(done + b"\x06" + struct.pack(">I", 16 * MiB + 1), "vmdescription of 16777217 bytes")
    rejects(done + b"\x06\x00\x00\x00\x01{", "vmdescription is not valid JSON", at=len(done) + 5)
    rejects(done + b"\x06\x00\x00\x00\x02[]", "vmdescription is not a JSON object")
    rejects(done + b"\x06\x00\x00\x00\x02\xff}", "vmdescription is not valid JSON")
    rejects(done + b"\x05", "0x05 after EOF (only a VMDESCRIPTION may follow)", at=len(done))
    rejects(done + b"\x06\x00\x00\x00\x02{}\x00", "trailing bytes", at=len(done) + 7)
    assert decode(done + b"\x06\x00\x00\x00\x02{}")[-2:] == [("vmdesc", "{}"), ("end",)]


def test_truncation_names_what_was_cut() -> None:
    cut = "truncated: RAM record needs 4111 bytes, input ends after 100"
    rejects(PART + page_record(0)[:100], cut, at=len(PART))


def test_a_failed_decoder_stays_failed() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(b"XXXXXXXXXXXXX")
    with pytest.raises(StreamError, match="bad file magic"):
        decoder.next_event()
    with pytest.raises(StreamError, match=re.escape("stream already failed: bad file magic")):
        decoder.next_event()


def _events(data: bytes, buffer_size: int = 4 * MiB) -> list[StreamEvent]:
    decoder = StreamDecoder(buffer_size)
    decoder.receive_data(data)
    decoder.feed_eof()
    events: list[StreamEvent] = []
    while not isinstance(event := decoder.next_event(), End):
        assert event is not NEED_DATA
        events.append(event)
    return events


def test_runs_of_uniform_records_come_out_as_one_event() -> None:
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, (1000, PAGE_SIZE), dtype=np.uint8)
    order = rng.permutation(1000).astype(np.int64)
    wire = PageBatchEncoder(1000).encode("pc.ram", pages, order).wire
    zero = encode_zero_pages("pc.ram", np.arange(600, dtype=np.int64))
    conf = confidential_record(ConfidentialSubtype.PSP_PACKET, b"p" * 52)
    stream = HEAD + ram_setup(0, [("pc.ram", 1000 * PAGE_SIZE)]) + ram_part_begin(0)
    stream += bytes(wire) + zero + conf + bytes(wire) + eos_and_footer(0)
    stream += ram_end_begin(0) + eos_and_footer(0) + eof()

    ram = [e for e in _events(stream) if isinstance(e, RamPages | RamZeroPages)]
    assert [len(e.indices) for e in ram] == [1, 999, 1, 599, 1, 999]
    for event in ram:
        if isinstance(event, RamPages):
            assert not event.data.flags.owndata  # a view into the decoder's buffer
            assert np.array_equal(event.data, pages[event.indices])
    assert np.array_equal(np.concatenate([e.indices for e in ram[:2]]), order)


def test_a_small_buffer_still_decodes_large_records() -> None:
    state = bytes(range(256)) * (5 * MiB // 256)
    done = complete()
    stream = done[:-1] + device_section(3, "kv", 0, 1, state) + eof()
    states = [e.state for e in _events(stream, buffer_size=4104) if isinstance(e, DeviceState)]
    assert states == [state]


def test_get_buffer_grows_for_a_record_and_keeps_the_offset() -> None:
    decoder = StreamDecoder(64)
    data = complete(page_record(2))
    pos = 0
    seen_pages = []
    while not isinstance(event := decoder.next_event(), End):
        if event is NEED_DATA:
            buf = decoder.get_buffer()
            assert len(buf) >= 16  # never a useless sliver
            n = min(len(buf), 50, len(data) - pos)
            buf[:n] = data[pos : pos + n]
            pos += n
            decoder.buffer_updated(n) if n else decoder.feed_eof()
        elif isinstance(event, RamPages):
            seen_pages.append((int(event.indices[0]), decoder.offset))
    assert seen_pages == [(2, len(PART) + len(page_record(2)))]
    assert decoder.offset == len(data)
