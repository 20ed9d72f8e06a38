"""Fakes for the migration engine's seams: a machine, a dirty log, a backend and a channel.

No processes, no sockets: the engine runs in the test's thread against these, with a
``ManualClock`` that the fakes advance as if pages took time to send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from confmig.common.clock import ManualClock
from confmig.common.errors import RemoteMigrationError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.encoder import gathered
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.backend import OutgoingBackend
from confmig.vmm.migration.convergence import RoundResult, downtime_limit_policy
from confmig.vmm.migration.outgoing import OutgoingMigration
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import Batch, MainChannelSink, PageSink, RoundCounters
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import Channel, MigrationUri
from confmig.vmm.migration.vmstate import DeviceSection

NPAGES = 64
SECONDS_PER_PAGE = 0.001
"""The fake link: 4 MB/s, so that the numbers of a round are easy to check."""

SOCKET_URI = MigrationUri(scheme="tcp", host="fake", port=1)
"""A socket URI: the engine waits for the target's verdict on the return path."""

Hook = Callable[[str], None]
"""Called by the fakes at each step they take (``"setup"``, ``"pages"``, ...)."""


class FakeChannel(Channel):
    """Records what is sent; answers the return path with ``reply`` (empty: the peer hangs up)."""

    def __init__(self, reply: bytes = rp.encode(rp.Shut(status=0)),
                 on_recv: Callable[[], None] = lambda: None) -> None:
        super().__init__(-1, name="fake")
        self.wire = bytearray()
        self.reply = reply
        self.on_recv = on_recv
        self.aborted = False
        self.timeout: float | None = None

    def send_all(self, data: bytes | bytearray | memoryview) -> int:
        if self.aborted:  # as a socket shut down by migrate_cancel
            raise RemoteMigrationError("Unable to write to socket: Broken pipe")
        view = memoryview(data).cast("B")
        self.wire += view
        self.sent += len(view)
        return len(view)

    def send_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        return sum(self.send_all(p) for p in parts)

    def send_iovec(self, iov: npt.NDArray[np.uint64], *, owner: object) -> int:
        return self.send_all(gathered(iov))

    def recv_into(self, buf: memoryview) -> int:
        self.on_recv()
        n = min(len(buf), len(self.reply))
        buf[:n] = self.reply[:n]
        self.reply = self.reply[n:]
        return n

    def set_timeout(self, seconds: float | None) -> None:
        self.timeout = seconds

    def abort(self) -> None:
        self.aborted = True
        self.reply = b""

    def close(self) -> None:
        pass


class ScriptedDirtyLog:
    """Round ``k`` hands out the pages of ``script[k]`` (round 0: every page)."""

    def __init__(self, block: RamBlock, script: list[list[int]]) -> None:
        self.block = block
        self.script = script
        self.dirty: set[int] = set(range(block.npages))
        self.syncs = 0

    def sync(self) -> int:
        if self.syncs > 0:
            later = self.script[min(self.syncs - 1, len(self.script) - 1)]
            self.dirty |= set(later)
        self.syncs += 1
        return len(self.dirty)

    def take_round(self, batch_pages: int) -> Iterator[Batch]:
        """Batches of 16 pages, fewer if the backend asks for fewer."""
        idx = np.array(sorted(self.dirty), dtype=np.int64)
        self.dirty.clear()
        size = min(16, batch_pages)
        for start in range(0, len(idx), size):
            yield self.block, idx[start : start + size], False


@dataclass
class FakeVm:
    block: RamBlock
    script: list[list[int]]
    hook: Hook
    machine_type: str = "pc-q35-7.2"
    events: list[str] = field(default_factory=list)
    log: ScriptedDirtyLog | None = None

    @property
    def blocks(self) -> list[tuple[str, int]]:
        return [(self.block.idstr, self.block.size)]

    @property
    def vcpu_ids(self) -> list[int]:
        return [0, 1]

    def dirty_log(self) -> ScriptedDirtyLog:
        self.log = ScriptedDirtyLog(self.block, self.script)
        return self.log

    def set_dirty_logging(self, on: bool) -> None:
        self.events.append(f"dirty-logging {'on' if on else 'off'}")

    def stop_for_switchover(self) -> None:
        self.events.append("stop")
        self.hook("stop")

    def recover(self, *, resume: bool = True) -> None:
        self.events.append("recover" if resume else "hold")

    def save_sections(self) -> list[DeviceSection]:
        self.hook("save")
        return [DeviceSection(idstr="cpu", instance_id=i, version_id=1, state=bytes([i]) * 8)
                for i in self.vcpu_ids] + [DeviceSection(idstr="serial", instance_id=0, version_id=1,
                                                         state=b"uart")]

    def migrated(self) -> None:
        self.events.append("migrated")


class RecordingBackend(OutgoingBackend):
    """The plain backend's behaviour, plus a log of every hook and the fake link's time."""

    name = "recording"

    def __init__(self, pages: PageSink, clock: ManualClock, hook: Hook) -> None:
        self._pages = pages
        self.clock = clock
        self.hook = hook
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        self.hook(what)

    def setup(self) -> None:
        self._call("setup")

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        self._call("pages")
        self.clock.advance(len(indices) * SECONDS_PER_PAGE)
        return self._pages.pages(block, indices)

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        self._call("zeros")
        return self._pages.zeros(block, indices)

    def switchover(self) -> None:
        self._call("switchover")

    def complete(self, vcpu_ids: list[int]) -> None:
        self._call("complete")

    def finish(self) -> None:
        self._call("finish")

    def cancel(self) -> None:
        self._call("cancel")

    def from_target(self, payload: bytes) -> None:
        self._call(f"from_target:{payload.decode()}")


@dataclass
class Run:
    """One engine run against the fakes, and what it left behind."""

    mig: OutgoingMigration
    vm: FakeVm
    channel: FakeChannel
    statuses: list[MigrationStatus]
    rounds: list[int]
    """``remaining_bytes`` of every round the policy judged."""
    backend: RecordingBackend | None = None
    multifd: list[FakeChannel] = field(default_factory=list)
    """The multifd channels the engine opened, in order."""

    def events(self) -> list[object]:
        """The stream the engine wrote, decoded (fails the test if it is malformed)."""
        return stream_events(self.channel.wire)


def stream_events(wire: bytes | bytearray) -> list[object]:
    """Every event of a whole stream, up to its end; raises ``StreamError`` if it is malformed."""
    d = dec.StreamDecoder()
    d.receive_data(wire)
    d.feed_eof()
    out: list[object] = []
    while not isinstance(ev := d.next_event(), dec.End):
        out.append(ev)
    return out


def make_block() -> RamBlock:
    block = RamBlock("pc.ram", NPAGES * PAGE_SIZE)
    block.pages[:, 0] = np.arange(1, NPAGES + 1) % 251 + 1  # every page non-zero
    return block


def run_engine(
    *,
    script: list[list[int]] | None = None,
    hook: Callable[[OutgoingMigration, str], None] = lambda _mig, _what: None,
    reply: bytes = rp.encode(rp.Shut(status=0)),
    params: MigrationParameters | None = None,
    backend_for: Callable[[MainChannelSink, PageSink, ManualClock, Hook], OutgoingBackend] | None = None,
    uri: MigrationUri = SOCKET_URI,
) -> Run:
    """Migrate a 64-page guest whose later rounds dirty ``script``'s pages; ``hook`` sees
    every step, so a test can cancel or fail at the step it chooses."""
    clock = ManualClock(100.0)
    block = make_block()
    box: dict[str, OutgoingMigration] = {}
    channel = FakeChannel(reply, on_recv=lambda: hook(box["mig"], "recv"))
    statuses: list[MigrationStatus] = []
    rounds: list[int] = []

    def step(what: str) -> None:
        hook(box["mig"], what)

    vm = FakeVm(block, script if script is not None else [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10], [11]], step)

    def policy(r: RoundResult) -> bool:
        rounds.append(r.remaining_bytes)
        step("round")
        return downtime_limit_policy(r)

    made: list[RecordingBackend] = []

    def factory(out: MainChannelSink, pages: PageSink) -> OutgoingBackend:
        if backend_for is not None:
            return backend_for(out, pages, clock, step)
        b = RecordingBackend(pages, clock, step)
        made.append(b)
        return b

    p = params or MigrationParameters(downtime_limit=5, max_bandwidth=1 << 40)
    extra: list[FakeChannel] = []

    def connect(_uri: MigrationUri, *, name: str = "main") -> Channel:
        if name == "main":
            return channel
        extra.append(FakeChannel())
        return extra[-1]

    mig = OutgoingMigration(vm, uri, p, MigrationStats(clock=clock), statuses.append,
                            factory, policy=policy, connect=connect)
    box["mig"] = mig
    mig.run()  # in this thread: the engine is the thread's run method
    return Run(mig=mig, vm=vm, channel=channel, statuses=statuses, rounds=rounds,
               backend=made[0] if made else None, multifd=extra)
