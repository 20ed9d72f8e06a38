"""Multifd: RAM pages over several connections, as QEMU's ``multifd`` capability.

Each channel opens with a ``MultiFDInit_t`` and then carries ``MultiFDPacket_t``
packets (page offsets, then the pages), one sender thread per channel. Rounds
are ordered by SYNC packets: at the end of a round every channel sends one, and
on the target each channel stops at its SYNC until the main channel reaches the
round's EOS. A page re-sent in round k+1 can therefore never be overwritten by
its round-k copy travelling on another channel.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfmigError, RemoteMigrationError, StreamError
from confmig.common.units import KiB
from confmig.proto.stream import multifd as mf
from confmig.proto.stream.decoder import NEED_DATA, End
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.ram import MainChannelSink, RamLanding, RoundCounters
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.transport import Channel, Connect, MigrationUri, connect

QUEUE_DEPTH = 2
"""Batches waiting per channel, in the one queue all channels take from: each channel has the
next one at hand the moment it is done with its own, and a round's last batches are never
held behind a slower channel's."""
HEADER_BUFFER = 64 * KiB
"""The receiving decoder's buffer: it only ever holds packet headers (the pages go straight
into guest RAM), so a small one that stays in cache. Ad hoc, not saved: in-process (two sets
of 10 and 12 runs) the default 4 MiB made two channels 2-5% slower at 5% more CPU per GiB;
between lab VMs (9 migrations each) the medians were equal."""
SYNC_TIMEOUT = 60.0
"""Seconds the target waits for all channels to reach a round's end."""
VM_UUID = bytes(16)
"""QEMU sends the VM's UUID (all zero unless ``-uuid``); so do we."""


_Batch = tuple[RamBlock, npt.NDArray[np.int64]]
_Item = _Batch | threading.Barrier | None
"""A batch; a round's end (the barrier, one in the queue per channel); or stop."""


class MultifdSender:
    """Source side: a thread per channel, each taking the next batch as soon as it is free
    (QEMU hands pages to whichever channel is idle; a fixed turn would let a channel that
    the scheduler slows keep a round going after the others are done)."""

    def __init__(self, uri: MigrationUri, nchannels: int, stats: MigrationStats,
                 main: MainChannelSink, *, connect: Connect = connect) -> None:
        self.stats = stats
        self.main = main
        self.channels: list[Channel] = []
        for i in range(nchannels):
            ch = connect(uri, name=f"multifd{i}")
            self.channels.append(ch)
            ch.send_all(mf.multifd_init(VM_UUID, i))
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_DEPTH * nchannels)
        self._round_end = threading.Barrier(nchannels + 1)  # the channels and sync()
        self._next_packet = 0
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send_loop, args=(ch,), name=f"multifd-send{i}", daemon=True)
            for i, ch in enumerate(self.channels)
        ]
        for t in self._threads:
            t.start()

    def _send_loop(self, ch: Channel) -> None:
        encoder = mf.MultifdPacketEncoder()
        failed = False
        while (item := self._queue.get()) is not None:
            if not failed:
                try:
                    n = self._write(ch, encoder, item)
                except BaseException as exc:  # reported to the migration thread at its next call
                    # From now on this channel drops what it takes but still ends each round,
                    # so that neither a producer nor sync() waits for a channel that is gone.
                    self._error, failed = exc, True
                else:
                    with self._lock:
                        self.stats.multifd_bytes += n
            if isinstance(item, threading.Barrier):
                with contextlib.suppress(threading.BrokenBarrierError):  # close() broke it
                    item.wait()

    def _write(self, ch: Channel, encoder: mf.MultifdPacketEncoder,
               item: _Batch | threading.Barrier) -> int:
        """One item on a channel: a round's SYNC packet, or a batch as packets in one gather
        write (headers built at once, each run of pages where it lies in guest RAM)."""
        if isinstance(item, threading.Barrier):
            return ch.send_all(encoder.sync(self._packet_numbers(1)))
        block, indices = item
        first = self._packet_numbers(encoder.packets(len(indices)))
        batch = encoder.encode(block.idstr, block.pages, indices, first)
        return ch.send_iovec(batch.iovec(), owner=batch)

    def _packet_numbers(self, count: int) -> int:
        """The first of ``count`` packet numbers, unique over all channels (QEMU's
        ``packet_num``)."""
        with self._lock:
            first = self._next_packet
            self._next_packet += count
        return first

    def _check(self) -> None:
        if self._error is not None:
            raise RemoteMigrationError(f"multifd channel failed: {self._error}")

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """Zero pages are 9-byte records: they ride on the main channel."""
        return self.main.zeros(block, indices)

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """The batch to whichever channel is free first (its size is the backend's
        ``batch_pages``: a hand-over's queue, wake-up and encoding come once per batch)."""
        self._check()
        self._queue.put((block, indices))
        nbytes = len(indices) * (4096 + 8)
        return RoundCounters(normal=len(indices), zero=0, bytes=nbytes)

    def sync(self) -> None:
        """End of a round: a SYNC packet on every channel, all of them sent. The round's end
        goes in the queue once per channel, taken by whichever channel is free; a channel
        sends its SYNC after its last batch and waits at the barrier, so that none takes two
        and this returns once all have sent theirs."""
        for _ in self.channels:
            self._queue.put(self._round_end)
        self._round_end.wait()
        self._check()

    def close(self) -> None:
        """Stop every channel's thread once it is done with its batch (called by the thread that
        hands out pages, never inside ``sync()``): what is still queued is dropped."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        for _ in self.channels:
            self._queue.put_nowait(None)  # room: nobody else puts
        self._round_end.abort()  # no channel's thread ever waits for a round again


class MultifdReceiver:
    """Target side: a thread per channel landing pages; the SYNC barrier."""

    def __init__(self, landing: RamLanding, stats: MigrationStats, nchannels: int) -> None:
        self.landing = landing
        self.blocks = landing.blocks
        self.stats = stats
        self.nchannels = nchannels
        self.closed = False
        self._cond = threading.Condition()
        self._synced: dict[int, int] = {}
        self._released = 0
        self._error: str | None = None
        self._channels: list[Channel] = []

    def add_channel(self, ch: Channel, prefix: bytes) -> None:
        with self._cond:
            if len(self._channels) >= self.nchannels:
                ch.close()
                raise StreamError(f"more than the {self.nchannels} multifd channels configured")
            self._channels.append(ch)
        threading.Thread(target=self._recv_loop, args=(ch, prefix), daemon=True).start()

    def _recv_loop(self, ch: Channel, prefix: bytes) -> None:
        """One channel: headers through the decoder, each packet's pages received straight into
        guest RAM where the header (checked first) says they belong."""
        d = mf.MultifdDecoder({name: b.size for name, b in self.blocks.items()}, direct=True,
                              buffer_size=HEADER_BUFFER)
        d.receive_data(prefix)
        landing = self.landing
        channel_id = -1
        received = 0  # pages of this round, counted in the statistics at its end
        try:
            while True:
                ev = d.next_event()
                if isinstance(ev, mf.MultifdPayload):
                    # SECURITY: the decoder bounded every offset to its block before this.
                    dest = ([landing.run_destination(ev.block, ev.run, ev.npages)] if ev.run is not None
                            else landing.page_destinations(ev.block, ev.indices))
                    views = d.payload_views(dest)  # and the next header: one receive for both
                    while views:
                        views = d.views_received(views, ch.recv_views(views))
                    received += ev.npages
                elif ev is NEED_DATA:
                    n = ch.recv_into(d.get_buffer()[: d.wanted()])  # no further than the header
                    if n == 0:
                        d.feed_eof()
                        return
                    d.buffer_updated(n)
                elif isinstance(ev, mf.MultifdSync):
                    with self._cond:
                        self.stats.normal += received
                        received = 0
                        self._synced[channel_id] += 1
                        mine = self._synced[channel_id]
                        self._cond.notify_all()
                        self._cond.wait_for(lambda m=mine: self._released >= m or self.closed)  # type: ignore[misc]
                elif isinstance(ev, mf.MultifdInit):
                    channel_id = ev.channel
                    with self._cond:
                        self._synced.setdefault(channel_id, 0)
                elif isinstance(ev, End):
                    return
        except (ConfmigError, OSError) as exc:  # StreamError, RemoteMigrationError, StateError
            with self._cond:
                self._error = str(exc)
                self._cond.notify_all()
        finally:
            with self._cond:
                self.stats.normal += received

    def wait_sync(self, round_no: int) -> None:
        """Main channel reached EOS of ``round_no``: wait for every channel's SYNC, release them."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._error is not None or (
                    len(self._synced) == self.nchannels
                    and all(v >= round_no for v in self._synced.values())),
                SYNC_TIMEOUT,
            )
            if self._error is not None:
                raise StreamError(f"multifd channel failed: {self._error}")
            if not ok:
                raise StreamError(f"multifd channels did not reach the end of round {round_no}")
            self._released = round_no
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for ch in self._channels:
            ch.close()
