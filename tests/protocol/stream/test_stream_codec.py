"""Round trip, chunking, truncation and corruption of whole migration streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from streamcases import (
    Built,
    ConfidentialOp,
    Device,
    Kind,
    PagesOp,
    Script,
    ZeroOp,
    build,
    decode,
    sample_script,
)

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import ConfidentialSubtype

BLOCK_NAMES = ["pc.ram", "vga.vram", "/rom@etc/acpi/tables"]


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nblocks = draw(st.integers(1, 3))
    ram: dict[str, np.ndarray] = {}
    for name in BLOCK_NAMES[:nblocks]:
        npages = draw(st.integers(1, 24))
        pages = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
        for i in range(npages):
            style = draw(st.sampled_from(["random", "random", "zero", "sparse"]))
            if style != "random":
                pages[i] = 0
            if style == "sparse":  # defeats the sampled-word zero check
                pages[i, draw(st.integers(0, PAGE_SIZE - 1))] = draw(st.integers(1, 255))
        ram[name] = pages

    def op() -> PagesOp | ZeroOp | ConfidentialOp:
        kind = draw(st.sampled_from(["pages", "pages", "zero", "conf"]))
        if kind == "conf":
            return ConfidentialOp(
                draw(st.sampled_from(list(ConfidentialSubtype))), draw(st.binary(max_size=80))
            )
        block = draw(st.sampled_from(list(ram)))
        indices = draw(st.lists(st.integers(0, len(ram[block]) - 1), min_size=1, max_size=12, unique=True))
        return PagesOp(block, indices) if kind == "pages" else ZeroOp(block, indices)

    rounds = [[op() for _ in range(draw(st.integers(0, 4)))] for _ in range(draw(st.integers(1, 3)))]
    mutations = [
        {
            block: [(int(i), rng.bytes(PAGE_SIZE)) for i in rng.choice(len(pages), 1)]
            for block, pages in ram.items()
        }
        for _ in rounds
    ]
    devices = [
        Device(
            10 + i,
            draw(st.sampled_from(["cpu", "serial", "fw_cfg", "kv", "0000:00:02.0/vga"])),
            i,
            draw(st.integers(0, 2**32 - 1)),
            draw(st.binary(max_size=200)),
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    return Script(
        machine_type=draw(st.sampled_from(["pc-q35-7.2", "pc-i440fx-8.2", "microvm"])),
        ram=ram,
        rounds=rounds,
        devices=devices,
        mutations=mutations,
    )


_SETTINGS = settings(max_examples=60, deadline=None)


@_SETTINGS
@given(
    script=scripts(),
    chunks=st.lists(st.integers(1, 20_000), max_size=40),
    modes=st.lists(st.booleans(), max_size=40),
    buffer_size=st.sampled_from([None, 4200, 20_000]),
)
def test_any_chunking_decodes_to_the_script(
    script: Script, chunks: list[int], modes: list[bool], buffer_size: int | None
) -> None:
    built = build(script)
    assert decode(built.data, chunks, buffer_size=buffer_size, use_get_buffer=modes) == (built.expected)


@pytest.fixture(scope="module")
def sample() -> Built:
    return build(sample_script())


def test_sample_round_trip_byte_by_byte(sample: Built) -> None:
    assert decode(sample.data) == sample.expected
    assert decode(sample.data, [1] * len(sample.data)) == sample.expected


def test_stream_without_vmdescription_is_complete() -> None:
    built = build(sample_script(), with_vmdescription=False)
    assert decode(built.data) == built.expected


def _truncation_points(built: Built) -> list[int]:
    """Every length that does not end inside page data, plus a few that do."""
    points = [n for n in range(len(built.data)) if built.kinds[n] is not Kind.PAGE]
    pages = [n for n in range(len(built.data)) if built.kinds[n] is Kind.PAGE]
    return points + pages[:: PAGE_SIZE // 3]


def test_every_truncation_is_rejected(sample: Built) -> None:
    for length in _truncation_points(sample):
        prefix = sample.data[:length]
        if length == sample.eof_end:
            assert decode(prefix)[-2:] == [("eof",), ("end",)]  # vmdescription is optional
            continue
        with pytest.raises(StreamError, match=r"^truncated: .* \(at stream offset \d+\)$"):
            decode(prefix)


def _corrupt(data: bytes, at: int, mask: int) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_corrupt_structure_is_rejected(sample: Built, mask: int) -> None:
    for at, kind in enumerate(sample.kinds):
        if kind is Kind.STRUCTURAL:
            with pytest.raises(StreamError):
                decode(_corrupt(sample.data, at, mask))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_corrupt_values_are_rejected_or_seen(sample: Built, mask: int) -> None:
    for at, kind in enumerate(sample.kinds):
        if kind in (Kind.VALUE, Kind.BLOB):
            _assert_rejected_or_seen(sample, at, mask)


@_SETTINGS
@given(script=scripts(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_corruption_is_rejected_or_seen(script: Script, where: float, mask: int) -> None:
    built = build(script)
    at = int(where * len(built.data))
    assume(built.kinds[at] is not Kind.PADDING)
    _assert_rejected_or_seen(built, at, mask)


@_SETTINGS
@given(script=scripts(), where=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_rejected(script: Script, where: float) -> None:
    built = build(script)
    length = int(where * len(built.data))
    assume(length != built.eof_end)
    with pytest.raises(StreamError):
        decode(built.data[:length])


def _assert_rejected_or_seen(built: Built, at: int, mask: int) -> None:
    try:
        events = decode(_corrupt(built.data, at, mask))
    except StreamError:
        return
    assert events != built.expected, f"flip 0x{mask:02x} at {at} ({built.kinds[at]}) unnoticed"
