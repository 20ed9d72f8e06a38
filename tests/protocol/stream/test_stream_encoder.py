"""The encoder's bytes, checked against the layouts of docs/stream-format.md."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import (
    ConfidentialSubtype,
    DeviceDescription,
    PageBatchEncoder,
    confidential_record,
    device_section,
    encode_zero_pages,
    eof,
    eos_and_footer,
    find_zero_pages,
    header,
    ram_end_begin,
    ram_part_begin,
    ram_setup,
    vmdescription,
)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def test_framing_bytes() -> None:
    assert header("pc-q35-7.2") == b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2"
    assert ram_setup(5, [("pc.ram", 0x8000), ("vga", 0x1000)]) == (
        b"\x01\x00\x00\x00\x05\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
        + u64(0x9000 | 0x04)
        + b"\x06pc.ram"
        + u64(0x8000)
        + b"\x03vga"
        + u64(0x1000)
        + u64(0x10)
        + b"\x7e\x00\x00\x00\x05"
    )
    assert ram_part_begin(5) == b"\x02\x00\x00\x00\x05"
    assert ram_end_begin(5) == b"\x03\x00\x00\x00\x05"
    assert eos_and_footer(5) == u64(0x10) + b"\x7e\x00\x00\x00\x05"
    assert eof() == b"\x00"
    assert device_section(9, "cpu", 1, 2, b"xyz") == (
        b"\x04\x00\x00\x00\x09\x03cpu\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x03xyz\x7e\x00\x00\x00\x09"
    )
    assert confidential_record(ConfidentialSubtype.MH_RECORD, b"ab") == (
        u64(0x800) + b"\x03\x00\x00\x00\x02ab"
    )


def test_page_batch_layout() -> None:
    pages = np.arange(8 * PAGE_SIZE, dtype=np.uint32).astype(np.uint8).reshape(8, PAGE_SIZE)
    pages[:, 0] = np.arange(1, 9)
    batch = PageBatchEncoder(4).encode("pc.ram", pages, np.array([5, 2, 7], dtype=np.int64))
    assert bytes(batch.wire) == (
        u64(5 << 12 | 0x08)
        + b"\x06pc.ram"
        + pages[5].tobytes()
        + u64(2 << 12 | 0x28)
        + pages[2].tobytes()
        + u64(7 << 12 | 0x28)
        + pages[7].tobytes()
    )
    assert len(batch.zero) == 0


def test_page_batch_sends_pages_from_ram_without_copying() -> None:
    """A batch is an iovec: the records' headers, and each page where it lies in the block
    (QEMU's iovec of guest pages): a page is read from RAM only when the socket takes it."""
    pages = np.full((16, PAGE_SIZE), 7, dtype=np.uint8)
    batch = PageBatchEncoder(16).encode("pc.ram", pages, np.array([9, 3, 4], dtype=np.int64))
    iov = batch.iovec()
    assert iov[:, 1].tolist() == [15, PAGE_SIZE, 8, PAGE_SIZE, 8, PAGE_SIZE]
    assert iov[1::2, 0].tolist() == [pages.ctypes.data + i * PAGE_SIZE for i in (9, 3, 4)]
    assert len(batch.wire) == 15 + 2 * 8 + 3 * PAGE_SIZE
    pages[3, 0] = 1  # written after encoding: the batch carries what RAM holds when sent
    assert batch.wire[15 + PAGE_SIZE + 8] == 1


def test_page_batch_leaves_out_zero_pages() -> None:
    pages = np.zeros((6, PAGE_SIZE), dtype=np.uint8)
    pages[1, 2000] = 1  # zero at every sampled word: must still be sent
    pages[4] = 0xFF
    encoder = PageBatchEncoder(8)
    batch = encoder.encode("m", pages, np.array([0, 1, 2, 3, 4], dtype=np.int64))
    assert list(batch.zero) == [0, 2, 3]
    assert bytes(batch.wire) == (
        u64(1 << 12 | 0x08) + b"\x01m" + pages[1].tobytes() + u64(4 << 12 | 0x28) + pages[4].tobytes()
    )
    all_zero = encoder.encode("m", pages, np.array([3, 0], dtype=np.int64))
    assert bytes(all_zero.wire) == b"" and list(all_zero.zero) == [3, 0]


def test_zero_page_records() -> None:
    assert encode_zero_pages("pc.ram", np.array([3, 9, 4], dtype=np.int64)) == (
        u64(3 << 12 | 0x02)
        + b"\x06pc.ram\x00"
        + u64(9 << 12 | 0x22)
        + b"\x00"
        + u64(4 << 12 | 0x22)
        + b"\x00"
    )
    assert encode_zero_pages("pc.ram", np.array([], dtype=np.int64)) == b""


def test_find_zero_pages() -> None:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (600, PAGE_SIZE), dtype=np.uint8)
    zero = rng.random(600) < 0.5
    pages[zero] = 0
    sparse = np.flatnonzero(zero)[:40]
    pages[sparse, rng.integers(0, PAGE_SIZE, 40)] = 1
    zero[sparse] = False
    assert np.array_equal(find_zero_pages(pages), zero)
    order = rng.permutation(600).astype(np.int64)
    assert np.array_equal(find_zero_pages(pages, order), zero[order])


def test_encoder_refuses_bad_input() -> None:
    pages = np.zeros((4, PAGE_SIZE), dtype=np.uint8)
    encoder = PageBatchEncoder(2)
    with pytest.raises(IndexError):
        encoder.encode("m", pages, np.array([4], dtype=np.int64))
    with pytest.raises(IndexError):
        encoder.encode("m", pages, np.array([-1], dtype=np.int64))
    with pytest.raises(ValueError, match="batch of 3 pages"):
        encoder.encode("m", pages, np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        encoder.encode("m", pages[::2], np.array([0], dtype=np.int64))
    with pytest.raises(ValueError, match=r"1\.\.255 bytes"):
        encoder.encode("m" * 256, pages, np.array([0], dtype=np.int64))
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        ram_setup(0, [("pc.ram", 100)])
    with pytest.raises(ValueError, match="iterative"):
        device_section(1, "ram", 0, 4, b"")


def _qemu_locate_json(data: bytes) -> bytes:
    """How QEMU's analyze-migration.py finds the vmdescription: the first '{' after the last
    NUL byte of the file's last 10 MB, with 0x06 five bytes before it."""
    tail = data[-10_000_000:]
    brace = tail.find(b"{", tail.rfind(b"\0"))
    at = len(data) - len(tail) + brace
    assert data[at - 5] == 0x06, "analyze-migration.py would not find the vmdescription"
    (length,) = struct.unpack(">I", data[at - 4 : at])
    return data[at : at + length]


def test_vmdescription_is_found_like_qemu_does_for_every_length() -> None:
    padded = 0
    # The name appears twice in the JSON, so its length steps by 2; a state size of 1 or 10
    # shifts it by one: together they run the low length byte through every value.
    for n, size in ((n, size) for n in range(1, 256) for size in (1, 10)):
        devices = [DeviceDescription(idstr="d" * n, instance_id=0, version_id=1, state_size=size)]
        blob = vmdescription(devices)
        padded += blob.endswith(b" ")
        desc = json.loads(_qemu_locate_json(b"QEVM" + eof() + blob))
        assert desc["devices"][0]["fields"] == [
            {"name": "length", "type": "uint32", "size": 4},
            {"name": "state", "type": "buffer", "size": size},
        ]
        assert desc["page_size"] == PAGE_SIZE
    assert padded, "no length needed padding: the test does not cover the '{' case"


@pytest.mark.parametrize("at", [0, 7, 8, PAGE_SIZE // 2, PAGE_SIZE // 2 + 5, PAGE_SIZE - 1, 1000])
def test_a_page_with_one_byte_set_is_never_zero(at: int) -> None:
    """Wherever the one non-zero byte is (in a sampled word, the first, a later one, or none of
    them), the page is not zero, and its zero neighbours still are: through the sampled check
    of a page list and of a batch's encoder, and through the whole-block check."""
    pages = np.zeros((5, PAGE_SIZE), dtype=np.uint8)
    pages[2, at] = 0x40
    everything = np.arange(5, dtype=np.int64)
    assert find_zero_pages(pages, everything).tolist() == [True, True, False, True, True]
    assert find_zero_pages(pages).tolist() == [True, True, False, True, True]
    batch = PageBatchEncoder(8).encode("pc.ram", pages, everything)
    assert batch.sent.tolist() == [2] and batch.zero.tolist() == [0, 1, 3, 4]
