"""Multifd: the sender over fake channels (batches of several packets, numbered once each), the
receiver over a socket pair (pages where their packets say, rounds ending at their SYNC)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from migration_fakes import SOCKET_URI, FakeChannel

from confmig.common.errors import RemoteMigrationError, StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import multifd as mf
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration import multifd
from confmig.vmm.migration.multifd import VM_UUID, MultifdReceiver, MultifdSender
from confmig.vmm.migration.ram import RamLanding
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.transport import Channel, MigrationUri

NPAGES = 700


C = TypeVar("C", bound=FakeChannel)


def _sender(nchannels: int, make: Callable[[int], C]) -> tuple[MultifdSender, list[C]]:
    """A sender whose channel ``i`` is ``make(i)``."""
    channels: list[C] = []

    def connect(uri: MigrationUri, *, name: str = "main") -> C:
        channels.append(make(len(channels)))
        return channels[-1]

    sender = MultifdSender(SOCKET_URI, nchannels, MigrationStats(), main=None,  # type: ignore[arg-type]
                           connect=connect)
    return sender, channels


def _packets(ch: FakeChannel, blocks: dict[str, RamBlock]) -> list[mf.MultifdEvent]:
    d = mf.MultifdDecoder({name: b.size for name, b in blocks.items()})
    d.receive_data(bytes(ch.wire))
    d.feed_eof()
    events = []
    while not isinstance(ev := d.next_event(), dec.End):
        events.append(ev)
    return events


def _random_block(name: str, seed: int) -> RamBlock:
    block = RamBlock(name, NPAGES * PAGE_SIZE)
    block.pages[:] = np.random.default_rng(seed).integers(0, 256, block.pages.shape, dtype=np.uint8)
    return block


def test_batches_of_several_packets_arrive_whole_and_numbered_once_over_all_channels() -> None:
    blocks = {"pc.ram": _random_block("pc.ram", 5), "vga.vram": _random_block("vga.vram", 6)}
    ram, vram = blocks["pc.ram"], blocks["vga.vram"]
    sender, channels = _sender(2, lambda _i: FakeChannel())
    batches = [(ram, np.arange(0, 300)), (vram, np.arange(699, 299, -1)),
               (ram, np.array([5, 6, 7, 500, 2]))]
    for block, batch in batches:  # 3, 4 and 1 packets, to whichever channel is free
        sender.pages(block, batch.astype(np.int64))
    sender.sync()
    sender.close()

    numbers: list[int] = []
    landed = {name: np.zeros(NPAGES, dtype=int) for name in blocks}
    for i, ch in enumerate(channels):
        events = _packets(ch, blocks)
        assert events[0] == mf.MultifdInit(uuid=VM_UUID, channel=i)
        assert isinstance(events[-1], mf.MultifdSync)  # the round's end, after its pages
        for ev in events:
            if isinstance(ev, mf.MultifdPages):
                assert np.array_equal(ev.data, blocks[ev.block].pages[ev.indices])
                landed[ev.block][ev.indices] += 1
        mine = [e.packet_num for e in events if isinstance(e, mf.MultifdPages | mf.MultifdSync)]
        assert mine == sorted(mine)
        numbers += mine
    assert sorted(numbers) == list(range(3 + 4 + 1 + 2))  # every packet and SYNC, once
    assert landed["pc.ram"].tolist() == [2 if i in (2, 5, 6, 7) else 1 if i < 300 or i == 500
                                         else 0 for i in range(NPAGES)]
    assert landed["vga.vram"].tolist() == [1 if i >= 300 else 0 for i in range(NPAGES)]


class _StalledChannel(FakeChannel):
    """A channel whose first batch waits for ``go`` (a thread the scheduler left behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.batches = 0

    def send_iovec(self, iov: npt.NDArray[np.uint64], *, owner: object) -> int:
        if not self.batches:
            self.go.wait(10)
        self.batches += 1
        return super().send_iovec(iov, owner=owner)


def test_a_stalled_channel_holds_back_no_batch_and_every_channel_ends_the_round_once() -> None:
    # QEMU hands pages to whichever channel is idle. Handed out in turn, every other batch
    # would queue behind the stalled one, and the round would last as long as its channel.
    block = _random_block("pc.ram", 12)
    sender, made = _sender(2, lambda _i: _StalledChannel())
    stalled, free = made
    free.go.set()
    for first in range(0, NPAGES, 140):  # five batches: the stalled channel can take one
        sender.pages(block, np.arange(first, first + 140, dtype=np.int64))
    ended = threading.Thread(target=sender.sync, daemon=True)
    ended.start()
    end = time.monotonic() + 5
    while free.batches < 4 and time.monotonic() < end:
        time.sleep(0.01)
    held_back = 5 - free.batches
    stalled.go.set()
    ended.join(10)
    sender.close()
    assert not ended.is_alive(), "the round never ended"
    assert held_back <= 1 and free.batches + stalled.batches == 5

    landed = np.zeros(NPAGES, dtype=int)
    for ch in made:
        events = _packets(ch, {"pc.ram": block})
        syncs = [e for e in events if isinstance(e, mf.MultifdSync)]
        assert len(syncs) == 1 and events[-1] is syncs[0]  # one round end each, after its pages
        for ev in events:
            if isinstance(ev, mf.MultifdPages):
                assert np.array_equal(ev.data, block.pages[ev.indices])
                landed[ev.indices] += 1
    assert landed.tolist() == [1] * NPAGES


def _receiver(memory: GuestMemory) -> MultifdReceiver:
    return MultifdReceiver(RamLanding(memory), MigrationStats(), 1)


@contextlib.contextmanager
def _receiving(wire: bytes, memory: GuestMemory) -> Iterator[MultifdReceiver]:
    """A one-channel receiver fed ``wire`` over a socket pair whose other end stays open (no
    end of input to lean on) until the receiver is closed."""
    rx = _receiver(memory)
    ours, theirs = socket.socketpair()
    with theirs:
        rx.add_channel(Channel(ours.fileno(), sock=ours, name="multifd0"), b"")
        theirs.sendall(wire)
        try:
            yield rx
        finally:
            rx.close()


def test_pages_land_where_their_packets_say_and_each_round_ends_at_its_sync() -> None:
    source = _random_block("pc.ram", 9)
    wire, sent = _two_rounds(source)
    memory = GuestMemory.pc(NPAGES * PAGE_SIZE)
    target = memory.blocks[0]
    with _receiving(wire, memory) as rx:
        rx.wait_sync(1)
        rx.wait_sync(2)
        assert np.array_equal(target.pages[sent], source.pages[sent])
        assert not target.pages[np.setdiff1d(np.arange(NPAGES), sent)].any()
        assert rx.stats.normal == len(sent)


def test_a_round_whose_last_pages_carry_the_sync_ends_without_waiting_for_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The peer sends nothing after such a packet until the target moves on: a receiver that
    # waited for the next header along with the pages would never see the round end.
    monkeypatch.setattr(multifd, "SYNC_TIMEOUT", 5.0)
    source = _random_block("pc.ram", 10)
    batch = mf.MultifdPacketEncoder().encode("pc.ram", source.pages, np.arange(200, dtype=np.int64),
                                             0, sync=True)
    memory = GuestMemory.pc(NPAGES * PAGE_SIZE)
    with _receiving(mf.multifd_init(VM_UUID, 0) + batch.wire, memory) as rx:
        rx.wait_sync(1)
    assert np.array_equal(memory.blocks[0].pages[:200], source.pages[:200])


class _BrokenChannel(FakeChannel):
    """A channel whose peer went away once it had opened."""

    def send_all(self, data: bytes | bytearray | memoryview) -> int:
        if self.wire:  # after MultiFDInit_t
            raise RemoteMigrationError("Unable to write to socket: Broken pipe")
        return super().send_all(data)

    def send_iovec(self, iov: npt.NDArray[np.uint64], *, owner: object) -> int:
        raise RemoteMigrationError("Unable to write to socket: Broken pipe")


def test_a_channel_that_failed_still_ends_the_round_with_its_error() -> None:
    # Whether it failed on a batch or on its SYNC, its thread must still take its share of
    # the round's end: sync() waiting for a channel that is gone would never return.
    block = _random_block("pc.ram", 11)
    sender, _made = _sender(2, lambda i: _BrokenChannel() if i else FakeChannel())
    outcome: list[BaseException | None] = []

    def one_round() -> None:
        try:
            for first in range(0, NPAGES, 350):
                sender.pages(block, np.arange(first, first + 350, dtype=np.int64))
            sender.sync()
            outcome.append(None)
        except RemoteMigrationError as exc:
            outcome.append(exc)

    for _ in range(2):  # the second round finds the channel failed from the start
        t = threading.Thread(target=one_round, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the round never ended"
    sender.close()
    assert len(outcome) == 2
    assert all(isinstance(e, RemoteMigrationError) and "Broken pipe" in str(e) for e in outcome)
    for thread in sender._threads:  # close() stops even the failed channel's thread
        thread.join(5)
        assert not thread.is_alive()


class _StuckChannel(FakeChannel):
    """A channel whose peer stopped reading: a batch's write blocks until migrate_cancel
    aborts the channel (a socket shut down), then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.shut = threading.Event()

    def send_iovec(self, iov: npt.NDArray[np.uint64], *, owner: object) -> int:
        self.writing.set()
        self.shut.wait(10)
        raise RemoteMigrationError("Unable to write to socket: Broken pipe")

    def abort(self) -> None:
        super().abort()
        self.shut.set()


def test_migrate_cancel_ends_a_round_that_waits_for_a_stuck_channel() -> None:
    block = _random_block("pc.ram", 13)
    sender, made = _sender(2, lambda _i: _StuckChannel())
    sender.pages(block, np.arange(0, 100, dtype=np.int64))
    outcome: list[BaseException | None] = []

    def end_round() -> None:
        try:
            sender.sync()
            outcome.append(None)
        except RemoteMigrationError as exc:
            outcome.append(exc)

    t = threading.Thread(target=end_round, daemon=True)
    t.start()
    end = time.monotonic() + 5
    while not any(ch.writing.is_set() for ch in made) and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.05)  # the other channel sent its SYNC and waits with sync() at the barrier
    for ch in made:  # what the engine's request_cancel does
        ch.abort()
    t.join(10)
    sender.close()
    assert not t.is_alive(), "the round never ended"
    assert isinstance(outcome[0], RemoteMigrationError) and "Broken pipe" in str(outcome[0])


class _TrickleChannel(Channel):
    """Gives what it holds at most ``chunk`` bytes per receive, then reports the end."""

    def __init__(self, data: bytes, chunk: int) -> None:
        super().__init__(-1, name="trickle")
        self.data = memoryview(data)
        self.chunk = chunk

    def recv_into(self, buf: memoryview) -> int:
        n = min(len(buf), self.chunk, len(self.data))
        buf[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def recv_views(self, views: list[memoryview]) -> int:
        done = 0
        for view in views:
            n = self.recv_into(view[: self.chunk - done])
            done += n
            if n < len(view) or done == self.chunk:
                break
        if done == 0:
            raise RemoteMigrationError("trickle: connection closed")
        return done


def _two_rounds(source: RamBlock) -> tuple[bytes, npt.NDArray[np.int64]]:
    enc = mf.MultifdPacketEncoder()
    rounds = [np.arange(0, 300), np.array([650, 3, 4, 5, 699, 20])]  # runs, then scattered pages
    wire = mf.multifd_init(VM_UUID, 0)
    for r, indices in enumerate(rounds):
        batch = enc.encode("pc.ram", source.pages, indices.astype(np.int64), 10 * r)
        wire += batch.wire + enc.sync(10 * r + batch.packets)
    return wire, np.concatenate(rounds)


@pytest.mark.parametrize("chunk", [1000, PAGE_SIZE + 7, 1 << 20])
def test_pages_land_whole_however_the_bytes_come(chunk: int) -> None:
    source = _random_block("pc.ram", 13)
    wire, sent = _two_rounds(source)
    memory = GuestMemory.pc(NPAGES * PAGE_SIZE)
    target = memory.blocks[0]
    rx = _receiver(memory)
    rx.add_channel(_TrickleChannel(wire, chunk), b"")
    rx.wait_sync(1)
    rx.wait_sync(2)
    assert np.array_equal(target.pages[sent], source.pages[sent])
    rx.close()


def test_input_that_ends_inside_a_payload_fails_the_round_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multifd, "SYNC_TIMEOUT", 5.0)
    source = _random_block("pc.ram", 14)
    wire, _sent = _two_rounds(source)
    cut = 64 + mf.header_size(128) + 10 * PAGE_SIZE + 5  # inside the first packet's pages
    rx = _receiver(GuestMemory.pc(NPAGES * PAGE_SIZE))
    rx.add_channel(_TrickleChannel(wire[:cut], 4096), b"")
    with pytest.raises(StreamError, match="multifd channel failed: trickle: connection closed"):
        rx.wait_sync(1)
    rx.close()
