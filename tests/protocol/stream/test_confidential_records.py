"""The PSP records, the shared-regions record and the return path: round trips, every
truncation, every single-byte change.

None of these formats carries a checksum (the PSP's packets carry a MAC, checked by the
target PSP, not by the envelope), so a changed byte may well decode to a different valid
value. What must hold: decoding is exact, so any bytes that decode re-encode to exactly
those bytes, and anything else raises the format's own error, never another exception.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import psp, shared_regions
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.decoder import NEED_DATA, End

HDR = bytes(range(52))
TRANS = bytes(i % 251 for i in range(PAGE_SIZE))

psp_records = st.one_of(
    st.builds(psp.PspSession, policy=st.integers(0, 2**32 - 1), pdh=st.binary(max_size=64),
              session=st.binary(max_size=64)),
    st.builds(psp.PspPage, gpa=st.integers(0, 2**52 - 1).map(lambda g: g * PAGE_SIZE),
              header=st.binary(max_size=psp.MAX_PACKET_HEADER), transport=st.just(TRANS)),
    st.builds(psp.PspVmsa, vcpu_id=st.integers(0, 2**32 - 1), header=st.binary(max_size=52),
              transport=st.just(TRANS)),
)


def exact_or_refused(decode: Callable[[bytes], object], encode: Callable[[object], bytes],
                     data: bytes) -> None:
    try:
        value = decode(data)
    except StreamError:
        return
    assert encode(value) == data


@given(psp_records)
def test_psp_records_round_trip(record: psp.PspRecord) -> None:
    assert psp.decode(psp.encode(record)) == record


@settings(max_examples=30)
@given(psp_records, st.data())
def test_psp_records_truncated_or_changed_are_refused_or_exact(record: psp.PspRecord,
                                                               data: st.DataObject) -> None:
    wire = psp.encode(record)
    for cut in range(len(wire)):  # every truncation
        with pytest.raises(StreamError):
            psp.decode(wire[:cut])
    with pytest.raises(StreamError, match="trailing"):
        psp.decode(wire + b"\0")
    for _ in range(64):  # single-byte changes, anywhere
        pos = data.draw(st.integers(0, len(wire) - 1))
        byte = data.draw(st.integers(0, 255))
        exact_or_refused(psp.decode, psp.encode, wire[:pos] + bytes([byte]) + wire[pos + 1 :])  # type: ignore[arg-type]


def test_every_single_byte_change_of_a_session_record() -> None:
    wire = psp.encode(psp.PspSession(policy=1, pdh=b"pdh!", session=b"sess"))
    for pos in range(len(wire)):
        for byte in range(256):
            exact_or_refused(psp.decode, psp.encode, wire[:pos] + bytes([byte]) + wire[pos + 1 :])  # type: ignore[arg-type]


@pytest.mark.parametrize("record", [psp.PspPage(gpa=0x3000, header=HDR, transport=TRANS),
                                    psp.PspVmsa(vcpu_id=1, header=HDR, transport=TRANS)])
def test_every_single_byte_change_of_a_packet_envelope(record: psp.PspRecord) -> None:
    """Every byte of the envelope (kind, address, lengths, packet header) takes every value;
    the transport data, opaque to the codec, is sampled."""
    wire = psp.encode(record)
    envelope = len(wire) - PAGE_SIZE
    for pos in [*range(envelope), *range(envelope, len(wire), 97)]:
        for byte in range(256):
            exact_or_refused(psp.decode, psp.encode, wire[:pos] + bytes([byte]) + wire[pos + 1 :])  # type: ignore[arg-type]


def test_every_single_byte_change_of_a_shared_regions_list() -> None:
    wire = shared_regions.encode([(1, 2), (0x100, 1), (0xFFFF0, 0x10)])
    for pos in range(len(wire)):
        for byte in range(256):
            exact_or_refused(shared_regions.decode, shared_regions.encode,  # type: ignore[arg-type]
                             wire[:pos] + bytes([byte]) + wire[pos + 1 :])


@pytest.mark.parametrize("payload, message", [
    (b"", "empty PSP record"),
    (b"\x09", "unknown PSP record kind 9"),
    (b"\x01\x00\x00", "truncated"),
    (b"\x02" + struct.pack(">QI", 0x3001, 52) + HDR + struct.pack(">I", 4096) + TRANS,
     "not one whole page"),
    (b"\x02" + struct.pack(">QI", 0x3000, 52) + HDR + struct.pack(">I", 100) + TRANS[:100],
     "not one whole page"),
    (b"\x01" + struct.pack(">II", 1, 20_000) + b"p" * 20_000, "PDH of 20000 bytes"),
    (b"\x03" + struct.pack(">II", 0, 0x101), "packet header of 257 bytes"),
])
def test_malformed_psp_records_are_one_clear_error(payload: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        psp.decode(payload)


def test_the_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        psp.encode(psp.PspPage(gpa=0, header=HDR, transport=TRANS[:10]))
    with pytest.raises(ValueError):
        psp.encode(psp.PspSession(policy=0, pdh=b"p" * (psp.MAX_CERT + 1), session=b""))


# --- shared regions ---------------------------------------------------------------------

@st.composite
def region_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    gfn, out = 0, []
    for _ in range(draw(st.integers(0, 8))):
        gfn += draw(st.integers(0, 1000))
        n = draw(st.integers(1, 1000))
        out.append((gfn, n))
        gfn += n
    return out


@given(region_lists())
def test_shared_regions_round_trip(ranges: list[tuple[int, int]]) -> None:
    assert shared_regions.decode(shared_regions.encode(ranges)) == tuple(ranges)


@settings(max_examples=30)
@given(region_lists(), st.data())
def test_shared_regions_truncated_or_changed_are_refused_or_exact(ranges: list[tuple[int, int]],
                                                                  data: st.DataObject) -> None:
    wire = shared_regions.encode(ranges)
    for cut in range(len(wire)):
        with pytest.raises(StreamError):
            shared_regions.decode(wire[:cut])
    for pos in range(len(wire)):
        byte = data.draw(st.integers(0, 255))
        exact_or_refused(shared_regions.decode, shared_regions.encode,  # type: ignore[arg-type]
                         wire[:pos] + bytes([byte]) + wire[pos + 1 :])


@pytest.mark.parametrize("ranges, message", [
    ([(0x2000, 0x1000), (0x1000, 0x1000)], "sorted"),
    ([(0x10, 0x1000)], "page-aligned"),
    ([(0x1000, 0)], "non-empty"),
    ([(0x1000, 0x2000), (0x2000, 0x1000)], "disjoint"),
])
def test_shared_regions_must_be_aligned_sorted_and_disjoint(ranges: list[tuple[int, int]],
                                                            message: str) -> None:
    wire = struct.pack(">I", len(ranges)) + b"".join(struct.pack(">QQ", g, n) for g, n in ranges)
    with pytest.raises(StreamError, match=message):
        shared_regions.decode(wire)


def test_a_shared_regions_count_beyond_the_bound_is_refused_before_reading() -> None:
    with pytest.raises(StreamError, match="ranges"):
        shared_regions.decode(struct.pack(">I", shared_regions.MAX_REGIONS + 1))


# --- return path ------------------------------------------------------------------------

def rp_decode(data: bytes) -> rp.ReturnPathEvent:
    d = rp.ReturnPathDecoder()
    d.receive_data(data)
    d.feed_eof()
    ev = d.next_event()
    assert ev is not NEED_DATA
    return ev  # type: ignore[return-value]


@given(st.one_of(st.builds(rp.Shut, status=st.integers(0, 2**32 - 1)),
                 st.builds(rp.Pong, value=st.integers(0, 2**32 - 1)),
                 st.builds(rp.Confidential, payload=st.binary(min_size=1, max_size=300))))
def test_return_path_messages_round_trip_in_any_chunking(message: rp.ReturnPathEvent) -> None:
    wire = rp.encode(message)
    assert rp_decode(wire) == message
    d = rp.ReturnPathDecoder()
    for i in range(len(wire)):  # byte by byte: NEED_DATA until the message is whole
        assert d.next_event() is NEED_DATA
        d.receive_data(wire[i : i + 1])
    assert d.next_event() == message


def test_every_truncation_and_single_byte_change_of_a_shut() -> None:
    wire = rp.encode(rp.Shut(status=0))
    for cut in range(len(wire)):
        with pytest.raises(StreamError, match="truncated"):
            rp_decode(wire[:cut])
    for pos in range(len(wire)):
        for byte in range(256):
            exact_or_refused(rp_decode, rp.encode, wire[:pos] + bytes([byte]) + wire[pos + 1 :])  # type: ignore[arg-type]


def rp_decode_all(data: bytes) -> list[rp.ReturnPathEvent]:
    """Every message in ``data`` (a shorter length leaves bytes that frame the next one)."""
    d = rp.ReturnPathDecoder()
    d.receive_data(data)
    d.feed_eof()
    out = []
    while not isinstance(ev := d.next_event(), End):
        assert ev is not NEED_DATA
        out.append(ev)
    return out


def test_every_truncation_and_single_byte_change_of_a_confidential_message() -> None:
    wire = rp.encode(rp.Confidential(payload=b"token"))
    for cut in range(len(wire)):
        with pytest.raises(StreamError, match="truncated"):
            rp_decode(wire[:cut])
    for pos in range(len(wire)):
        for byte in range(256):
            exact_or_refused(rp_decode_all, lambda events: b"".join(map(rp.encode, events)),  # type: ignore
                             wire[:pos] + bytes([byte]) + wire[pos + 1 :])
    with pytest.raises(ValueError, match="X_CONFIDENTIAL body of 0 bytes"):
        rp.encode(rp.Confidential(payload=b""))


@pytest.mark.parametrize("wire, message", [
    (b"\x00\x09\x00\x04", "unknown return-path message 0x0009"),
    (b"\x00\x04\x00\x0c", "REQ_PAGES is not used by a precopy migration"),
    (b"\x00\x01\xff\xff", "SHUT of 65535 bytes"),
    (b"\x7f\x01\x10\x01", "X_CONFIDENTIAL of 4097 bytes"),
    (b"\x7f\x01\x00\x00", "X_CONFIDENTIAL of 0 bytes"),
])
def test_a_bad_header_is_refused_before_its_body_arrives(wire: bytes, message: str) -> None:
    d = rp.ReturnPathDecoder()
    d.receive_data(wire)  # no body, no EOF: a decoder that waited would return NEED_DATA
    with pytest.raises(StreamError, match=message):
        d.next_event()
