"""The multifd sender over fake channels: batches of several packets, numbered once each."""

from __future__ import annotations

import numpy as np
from migration_fakes import SOCKET_URI, FakeChannel

from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import multifd as mf
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.multifd import VM_UUID, MultifdSender
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.transport import MigrationUri

NPAGES = 700


def test_batches_of_several_packets_arrive_whole_and_numbered_once_over_all_channels() -> None:
    block = RamBlock("pc.ram", NPAGES * PAGE_SIZE)
    block.pages[:] = np.random.default_rng(5).integers(0, 256, block.pages.shape, dtype=np.uint8)
    channels: list[FakeChannel] = []

    def connect(uri: MigrationUri, *, name: str = "main") -> FakeChannel:
        channels.append(FakeChannel())
        return channels[-1]

    sender = MultifdSender(SOCKET_URI, 2, MigrationStats(), main=None,  # type: ignore[arg-type]
                           connect=connect)
    batches = [np.arange(0, 300), np.arange(699, 299, -1), np.array([5, 6, 7, 500, 2])]
    for batch in batches:  # 3, 4 and 1 packets of up to 128 pages
        sender.pages(block, batch.astype(np.int64))
    sender.sync()
    sender.close()

    numbers: list[int] = []
    landed = np.zeros(NPAGES, dtype=int)
    for i, ch in enumerate(channels):
        d = mf.MultifdDecoder({"pc.ram": block.size})
        d.receive_data(bytes(ch.wire))
        d.feed_eof()
        events = []
        while not isinstance(ev := d.next_event(), dec.End):
            events.append(ev)
        assert events[0] == mf.MultifdInit(uuid=VM_UUID, channel=i)
        assert isinstance(events[-1], mf.MultifdSync)  # the round's end, after its pages
        for ev in events:
            if isinstance(ev, mf.MultifdPages):
                assert np.array_equal(ev.data, block.pages[ev.indices])
                landed[ev.indices] += 1
        mine = [e.packet_num for e in events if isinstance(e, mf.MultifdPages | mf.MultifdSync)]
        assert mine == sorted(mine)
        numbers += mine
    assert sorted(numbers) == list(range(3 + 4 + 1 + 2))  # every packet and SYNC, once
    assert landed.tolist() == [2 if i in (2, 5, 6, 7, 500) else 1 for i in range(NPAGES)]
