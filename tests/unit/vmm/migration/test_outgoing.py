"""The engine's source side against fakes: rounds, convergence, switch-over, the stream it
writes, cancel and failure at every phase, and a backend the engine has never heard of."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from migration_fakes import NPAGES, Hook, run_engine

from confmig.common.clock import ManualClock
from confmig.common.errors import LocalMigrationError
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import multifd as mf
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.backend import OutgoingBackend
from confmig.vmm.migration.outgoing import OutgoingMigration
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink, PageSink, RoundCounters
from confmig.vmm.migration.status import MigrationStatus as S
from confmig.vmm.migration.transport import MigrationUri


def test_rounds_converge_then_the_guest_stops_for_the_rest() -> None:
    run = run_engine()
    assert run.statuses == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED]
    # 64 pages, then the 8 dirtied meanwhile; 2 pages (8 KiB) fit 5 ms at ~4 MB/s: switch over.
    assert run.rounds == [8 * 4096, 2 * 4096]
    stats = run.mig.stats
    assert stats.rounds == 2 and stats.normal == 64 + 8 + 3 and stats.duplicate == 0
    assert stats.dirty_sync_count == 4  # setup, two rounds, switch-over
    assert run.vm.events == ["dirty-logging on", "stop", "migrated", "dirty-logging off"]
    assert run.mig.error is None and run.channel.timeout is not None


def test_statistics_come_from_the_clock_and_the_channels() -> None:
    run = run_engine()
    stats = run.mig.stats
    assert stats.transferred == len(run.channel.wire)
    assert stats.precopy_bytes + stats.downtime_bytes == stats.transferred
    assert stats.downtime_bytes > 3 * 4096  # the final three pages and the device state
    # The fake link takes 1 ms per page: the last round sent 8 pages in 8 ms.
    assert stats.mbps == pytest.approx(8 * 4104 * 8 / 0.008 / 1e6, rel=0.01)
    assert stats.downtime_ms == 3  # three pages in the final part, nothing else costs time
    assert stats.total_time_ms == 64 + 8 + 3
    assert stats.pages_per_second == 1000  # the last round: 8 pages in 8 ms


def test_the_stream_is_in_qemus_order_and_carries_every_page() -> None:
    run = run_engine()
    kinds = [type(e).__name__ for e in run.events() if not isinstance(e, dec.RamPages | dec.SectionFooter)]
    assert kinds == ["Header", "SectionStart", "RamMemSize", "RamEos",
                     "SectionPart", "RamEos", "SectionPart", "RamEos",
                     "SectionEnd", "RamEos",
                     "SectionStart", "DeviceState", "SectionStart", "DeviceState",
                     "SectionStart", "DeviceState", "Eof", "VmDescription"]
    sent = [int(i) for e in run.events() if isinstance(e, dec.RamPages) for i in e.indices]
    assert sorted(set(sent)) == list(range(NPAGES))
    assert sent[-3:] == [9, 10, 11]  # the final part: what the last sync found


def test_the_backend_sees_its_hooks_in_order() -> None:
    run = run_engine()
    assert run.backend is not None
    calls = run.backend.calls
    compact = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert compact == ["setup", "pages", "switchover", "pages", "complete", "finish"]


@pytest.mark.parametrize("phase", ["setup", "pages", "round", "stop", "switchover", "complete", "save"])
def test_cancel_at_every_phase_leaves_the_source_running(phase: str) -> None:
    def hook(mig: OutgoingMigration, what: str) -> None:
        if what == phase:
            mig.request_cancel()

    run = run_engine(hook=hook)
    assert run.statuses[-2:] == [S.CANCELLING, S.CANCELLED]
    assert run.backend is not None and run.backend.calls[-1] == "cancel"
    assert "finish" not in run.backend.calls
    assert "recover" in run.vm.events and "migrated" not in run.vm.events
    assert run.vm.events[-1] == "dirty-logging off"


def test_a_target_that_hangs_up_without_a_verdict_leaves_the_source_paused() -> None:
    """The whole guest went out and no verdict came: the target may be running it, so the
    source does not resume (two copies would run); it waits paused for cont."""
    run = run_engine(reply=b"")  # the return path ends before any message
    assert run.statuses[-1] == S.FAILED
    assert "target did not confirm" in (run.mig.error or "")
    assert "the source stays paused" in (run.mig.error or "")
    assert "hold" in run.vm.events and "recover" not in run.vm.events


def test_a_target_that_says_it_failed_gives_the_guest_back_to_the_source() -> None:
    run = run_engine(reply=rp.encode(rp.Shut(status=1)))
    assert run.statuses[-1] == S.FAILED
    assert run.mig.error == "the target failed to load the migration stream"
    assert "recover" in run.vm.events and "hold" not in run.vm.events


def test_a_cancel_after_the_whole_stream_was_sent_waits_for_the_verdict() -> None:
    def hook(mig: OutgoingMigration, what: str) -> None:
        if what == "recv":  # the source waits on the return path: the target may run the guest
            mig.request_cancel()

    run = run_engine(hook=hook)
    assert run.statuses[-1] == S.COMPLETED and not run.channel.aborted
    assert "recover" not in run.vm.events and "migrated" in run.vm.events


def test_an_unexpected_exception_still_recovers_the_source() -> None:
    def hook(_mig: OutgoingMigration, what: str) -> None:
        if what == "complete":
            raise ValueError("a bug")

    run = run_engine(hook=hook)
    assert run.statuses[-1] == S.FAILED and run.mig.error == "internal error: ValueError: a bug"
    assert run.backend is not None and run.backend.calls[-1] == "cancel"
    assert "recover" in run.vm.events


@pytest.mark.parametrize("phase", ["setup", "pages", "stop", "complete", "save"])
def test_a_failure_at_any_phase_is_reported_and_the_source_keeps_the_guest(phase: str) -> None:
    def hook(_mig: OutgoingMigration, what: str) -> None:
        if what == phase:
            raise LocalMigrationError(f"broken at {phase}")

    run = run_engine(hook=hook)
    assert run.statuses[-1] == S.FAILED and run.mig.error == f"broken at {phase}"
    assert run.backend is not None and run.backend.calls[-1] == "cancel"
    assert "recover" in run.vm.events and "migrated" not in run.vm.events


def test_a_target_that_failed_to_load_fails_the_migration() -> None:
    run = run_engine(reply=rp.encode(rp.Shut(status=1)))
    assert run.statuses[-1] == S.FAILED and "failed to load" in (run.mig.error or "")
    assert "recover" in run.vm.events


def test_a_message_for_the_backend_reaches_it_before_the_verdict() -> None:
    """The target's backend speaks to ours (a Migration Handler's abort token) before SHUT;
    the engine hands it over without reading it, then cancels as for any failure."""
    run = run_engine(reply=rp.encode(rp.Confidential(payload=b"token")) + rp.encode(rp.Shut(status=1)))
    assert run.backend is not None
    assert run.backend.calls[-2:] == ["from_target:token", "cancel"]
    assert run.statuses[-1] == S.FAILED and "recover" in run.vm.events


def test_garbage_on_the_return_path_is_refused_without_waiting() -> None:
    run = run_engine(reply=b"\x00\x09\xff\xff")
    assert run.statuses[-1] == S.FAILED and "unknown return-path message" in (run.mig.error or "")


def test_a_pong_instead_of_the_verdict_is_not_a_verdict() -> None:
    run = run_engine(reply=rp.encode(rp.Pong(value=1)))
    assert run.statuses[-1] == S.FAILED and "unexpected return-path message PONG" in (run.mig.error or "")


def test_after_the_target_confirmed_the_guest_is_never_resumed_here() -> None:
    def hook(_mig: OutgoingMigration, what: str) -> None:
        if what == "finish":
            raise LocalMigrationError("SEND_FINISH failed")

    run = run_engine(hook=hook)  # the guest runs on the target: the migration stands
    assert run.statuses[-1] == S.COMPLETED
    assert "recover" not in run.vm.events and run.vm.events.count("migrated") == 1
    assert run.backend is not None and "cancel" not in run.backend.calls


def test_a_failure_after_the_target_confirmed_never_resumes_the_source() -> None:
    def hook(mig: OutgoingMigration, what: str) -> None:
        if what == "finish":
            raise ValueError("a bug after the verdict")

    run = run_engine(hook=hook)
    assert run.statuses[-1] == S.FAILED and "a bug after the verdict" in (run.mig.error or "")
    assert "recover" not in run.vm.events and run.vm.events.count("migrated") == 1
    assert run.backend is not None and "cancel" not in run.backend.calls


def test_a_file_uri_has_no_return_path() -> None:
    run = run_engine(reply=b"", uri=MigrationUri(scheme="file", path="/nonexistent"))
    assert run.statuses[-1] == S.COMPLETED and run.channel.timeout is None


def test_a_guest_that_dirties_faster_than_the_link_never_switches_over_on_its_own() -> None:
    rounds_seen: list[int] = []

    def hook(mig: OutgoingMigration, what: str) -> None:
        if what == "round":
            rounds_seen.append(1)
            if len(rounds_seen) == 5:
                mig.request_cancel()

    run = run_engine(script=[list(range(32))], hook=hook)
    assert run.rounds == [32 * 4096] * 5 and run.statuses[-1] == S.CANCELLED


class XorBackend(OutgoingBackend):
    """A third backend, unknown to the engine: each page XORed with 0x5a, as a confidential
    record of its own (subtype MH_RECORD: u64 block offset, then the page)."""

    name = "xor"
    batch_pages = 5

    def __init__(self, out: MainChannelSink, clock: ManualClock) -> None:
        self.out = out
        self.clock = clock
        self.batches: list[int] = []

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        self.batches.append(len(indices))
        self.clock.advance(len(indices) * 0.001)
        payloads = [int(i * 4096).to_bytes(8, "big") + (block.pages[i] ^ 0x5A).tobytes() for i in indices]
        sent = self.out.confidential(ConfidentialSubtype.MH_RECORD, payloads)
        return RoundCounters(normal=len(indices), bytes=sent)

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self.out.zeros(block, indices)


def test_a_backend_the_engine_never_named_needs_no_change_to_it() -> None:
    backends: list[XorBackend] = []

    def xor(out: MainChannelSink, _pages: PageSink, clock: ManualClock, hook: Hook) -> OutgoingBackend:
        backends.append(XorBackend(out, clock))
        return backends[-1]

    run = run_engine(backend_for=xor)
    assert run.statuses[-1] == S.COMPLETED
    assert max(backends[0].batches) == XorBackend.batch_pages  # its batches, not the engine's
    records = [e for e in run.events() if isinstance(e, dec.Confidential)]
    assert not [e for e in run.events() if isinstance(e, dec.RamPages)]
    got = {int.from_bytes(r.payload[:8], "big") // 4096: r.payload[8:] for r in records}
    block_pages = run.vm.block.pages
    assert sorted(got) == list(range(NPAGES))
    assert all(bytes(np.frombuffer(v, np.uint8) ^ 0x5A) == block_pages[k].tobytes() for k, v in got.items())


def test_parameters_changed_during_a_migration_apply_to_the_next_round() -> None:
    def hook(mig: OutgoingMigration, what: str) -> None:
        if what == "round" and mig.stats.rounds == 1:
            mig.update_parameters(MigrationParameters(downtime_limit=100, max_bandwidth=1 << 40))

    # 32 pages dirty every round never fit 5 ms; with 100 ms they fit after round 2.
    run = run_engine(script=[list(range(32))], hook=hook)
    assert run.statuses[-1] == S.COMPLETED and len(run.rounds) == 2


def test_multifd_pages_go_on_their_channels_with_a_sync_after_every_part() -> None:
    params = MigrationParameters(downtime_limit=5, max_bandwidth=1 << 40, multifd_channels=2,
                                 capabilities=frozenset({"multifd"}))
    run = run_engine(params=params)
    assert run.statuses[-1] == S.COMPLETED and len(run.multifd) == 2
    parts = 1 + len(run.rounds) + 1  # setup, the precopy rounds, the final part
    pages: list[int] = []
    numbers: list[int] = []
    for i, ch in enumerate(run.multifd):
        d = mf.MultifdDecoder({"pc.ram": NPAGES * 4096})
        d.receive_data(ch.wire)
        d.feed_eof()
        events = []
        while not isinstance(ev := d.next_event(), dec.End):
            events.append(ev)
        assert events[0] == mf.MultifdInit(uuid=bytes(16), channel=i)
        assert sum(isinstance(e, mf.MultifdSync) for e in events) == parts
        pages += [int(p) for e in events if isinstance(e, mf.MultifdPages) for p in e.indices]
        mine = [e.packet_num for e in events if isinstance(e, mf.MultifdPages | mf.MultifdSync)]
        assert mine == sorted(mine)
        numbers += mine
    assert sorted(set(pages)) == list(range(NPAGES))
    assert len(set(numbers)) == len(numbers)  # QEMU's packet_num: unique over all channels
    assert not [e for e in run.events() if isinstance(e, dec.RamPages)]  # none on the main channel
