"""The ``ram`` section's pieces: the migration bitmap, the main channel's page records,
the rate limiter and the target's landing, without processes or sockets."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import numpy.typing as npt
import pytest
from migration_fakes import FakeChannel, stream_events

from confmig.common.clock import ManualClock
from confmig.common.errors import StateError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import decoder as dec
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import StreamWriter
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration.ram import (
    BATCH_PAGES,
    ZERO_BATCH_PAGES,
    Cancelled,
    MainChannelSink,
    RamLanding,
    RamSender,
    RateLimiter,
)
from confmig.vmm.migration.transport import Channel

RAM = 8 << 20  # 2048 pages


class FakeVmFd:
    """KVM's dirty log: what the test marks, per slot, handed out once."""

    def __init__(self) -> None:
        self.dirty: dict[int, set[int]] = {}

    def get_dirty_log(self, slot: int, npages: int) -> npt.NDArray[np.bool_]:
        out = np.zeros(npages, dtype=bool)
        out[sorted(self.dirty.pop(slot, set()))] = True
        return out


def sender(written: tuple[int, ...] = ()) -> tuple[GuestMemory, FakeVmFd, RamSender]:
    memory = GuestMemory.pc(RAM)
    memory.blocks[0].pages[list(written)] = 7  # the guest ran before the migration began
    vm = FakeVmFd()
    return memory, vm, RamSender(memory, vm)  # type: ignore[arg-type]


def test_the_first_round_sends_every_page_and_never_written_ones_as_known_zero() -> None:
    memory, _vm, s = sender(written=(3, 700))
    block = memory.blocks[0]
    batches = list(s.take_round(BATCH_PAGES))
    zero = np.concatenate([i for _b, i, z in batches if z])
    data = np.concatenate([i for _b, i, z in batches if not z])
    assert sorted(data.tolist()) == [3, 700] and len(zero) == block.npages - 2
    assert all(len(i) <= (ZERO_BATCH_PAGES if z else BATCH_PAGES) for _b, i, z in batches)
    assert s.dirty_pages() == 0 and list(s.take_round(BATCH_PAGES)) == []


def test_a_round_comes_in_batches_of_the_size_asked_for() -> None:
    memory, vm, s = sender()
    list(s.take_round(BATCH_PAGES))
    vm.dirty[memory.blocks[0].regions[0].slot] = {5, 9, 20, 30, 31}
    s.sync()
    assert [i.tolist() for _b, i, _z in s.take_round(3)] == [[5, 9, 20], [30, 31]]


def test_sync_folds_kvms_log_and_the_vmms_own_writes_and_later_rounds_have_no_known_zeros() -> None:
    memory, vm, s = sender()
    list(s.take_round(BATCH_PAGES))
    vm.dirty[memory.blocks[0].regions[0].slot] = {5, 9}
    memory.write(20 * PAGE_SIZE, b"x")  # a device wrote guest RAM: KVM does not see it
    assert s.sync() == 3
    batches = list(s.take_round(BATCH_PAGES))
    assert [(i.tolist(), z) for _b, i, z in batches] == [([5, 9, 20], False)]
    assert s.sync() == 0


def test_main_channel_pages_skip_zero_pages_and_decode_back() -> None:
    memory = GuestMemory.pc(RAM)
    block = memory.blocks[0]
    block.pages[1] = 1
    block.pages[4] = 4
    ch = FakeChannel()
    w = StreamWriter("pc-q35-7.2", batch_pages=BATCH_PAGES)
    sink = MainChannelSink(ch, w)
    ch.send_all(w.setup([(block.idstr, block.size)]) + w.begin_round())
    sent = sink.pages(block, np.array([1, 2, 4, 6], dtype=np.int64))
    assert (sent.normal, sent.zero) == (2, 2) and sent.bytes == len(ch.wire) - ch.wire.index(b"\x02\x00") - 5
    ch.send_all(w.end_part() + w.begin_final() + w.end_part() + w.eof())
    events = stream_events(ch.wire)
    pages = {int(i): e.data[k].copy()
             for e in events if isinstance(e, dec.RamPages) for k, i in enumerate(e.indices)}
    zeros = [int(i) for e in events if isinstance(e, dec.RamZeroPages) for i in e.indices]
    assert sorted(pages) == [1, 4] and sorted(zeros) == [2, 6]
    assert (pages[4] == 4).all()


def test_confidential_records_go_out_in_gather_writes_as_they_decode_back() -> None:
    memory = GuestMemory.pc(RAM)
    block = memory.blocks[0]
    a, b = socket.socketpair()
    ch = Channel(a.fileno(), sock=a)
    got = bytearray()

    def drain() -> None:
        while chunk := b.recv(1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    w = StreamWriter("pc-q35-7.2")
    sink = MainChannelSink(ch, w)
    sink.open_stream([(block.idstr, block.size)])
    sink.begin_round()
    mailbox = bytearray(os.urandom(300_000))  # a payload sent from where it lies, as the MH's
    payloads = [b"first", memoryview(mailbox)[1000:250_000], b"", b"last"]
    sent = sink.confidential(ConfidentialSubtype.MH_RECORD, payloads)
    assert sent == sum(13 + len(p) for p in payloads)
    sink.end_part()
    ch.send_all(w.begin_final() + w.end_part() + w.eof())
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    records = [e for e in stream_events(got) if isinstance(e, dec.Confidential)]
    assert [(e.subtype, e.payload) for e in records] == [
        (ConfidentialSubtype.MH_RECORD, bytes(p)) for p in payloads]
    a.close()
    b.close()


def test_records_outside_a_ram_part_are_refused_before_anything_is_sent() -> None:
    memory = GuestMemory.pc(RAM)
    ch = FakeChannel()
    sink = MainChannelSink(ch, StreamWriter("pc-q35-7.2"))
    with pytest.raises(StateError, match="requires round or final"):
        sink.pages(memory.blocks[0], np.array([0], dtype=np.int64))
    assert ch.wire == b""


def test_the_rate_limiter_waits_out_its_window_and_a_cancel_cuts_the_wait() -> None:
    clock = ManualClock()
    cancel = threading.Event()
    limiter = RateLimiter(1000, cancel, clock)
    limiter.account(50)  # within the 100 ms window's budget of 100 bytes: no wait
    cancel.set()
    with pytest.raises(Cancelled):
        limiter.account(150)  # 200 bytes at 1000 B/s: 0.2 s to wait, cut by the cancel


def test_landing_writes_runs_and_scattered_pages_and_zeroes_only_what_it_wrote() -> None:
    memory = GuestMemory.pc(RAM)
    block = memory.blocks[0]
    land = RamLanding(memory)
    land.pages("pc.ram", np.array([10, 11, 12], dtype=np.int64), np.full((3, PAGE_SIZE), 3, np.uint8))
    land.pages("pc.ram", np.array([40, 2], dtype=np.int64), np.full((2, PAGE_SIZE), 9, np.uint8))
    assert (block.pages[10:13] == 3).all() and (block.pages[[40, 2]] == 9).all()
    land.zeros("pc.ram", np.array([11, 500], dtype=np.int64))
    assert (block.pages[11] == 0).all() and (block.pages[10] == 3).all()
    assert block.holes()[500]  # never written, so left alone: no page allocated for it


def test_landing_puts_a_page_sent_twice_in_one_batch_where_it_belongs() -> None:
    # [3, 3, 5] spans three pages like a run, but is not one: page 4 is not in it.
    memory = GuestMemory.pc(RAM)
    block = memory.blocks[0]
    data = np.stack([np.full(PAGE_SIZE, v, np.uint8) for v in (1, 2, 3)])
    RamLanding(memory).pages("pc.ram", np.array([3, 3, 5], dtype=np.int64), data)
    assert block.pages[3, 0] == 2 and block.pages[4, 0] == 0 and block.pages[5, 0] == 3


@pytest.mark.parametrize("run", [True, False], ids=["run", "scattered"])
def test_pages_received_in_place_are_zeroed_by_a_later_zero_page(run: bool) -> None:
    memory = GuestMemory.pc(RAM)
    block = memory.blocks[0]
    land = RamLanding(memory)
    indices = np.array([20, 21, 22] if run else [22, 20, 21], dtype=np.int64)
    views = [land.run_destination("pc.ram", 20, 3)] if run else land.page_destinations("pc.ram", indices)
    for view in views:
        view[:] = b"\x07" * len(view)
    assert (block.pages[20:23] == 7).all()
    land.zeros("pc.ram", np.array([21], dtype=np.int64))
    assert (block.pages[21] == 0).all() and (block.pages[[20, 22]] == 7).all()


@pytest.mark.parametrize("written", [[], [0], [3, 4, 9], list(range(16))],
                         ids=["none", "first", "some", "all"])
def test_holes_are_the_pages_never_written(written: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the memfd is full or has holes, the answer is the same; a full one is known full
    without walking its pages (no SEEK_DATA/SEEK_HOLE)."""
    block = RamBlock("pc.ram", 16 * PAGE_SIZE)
    for i in written:
        block.pages[i, 7] = 1
    if len(written) == 16:
        monkeypatch.setattr(os, "lseek", None)  # any walk would fail
    assert np.flatnonzero(~block.holes()).tolist() == written
