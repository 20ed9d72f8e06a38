"""The Migration Handler backend, both sides, against a fake MH: which pages go where, in which
order, and what the target refuses before its MH sees a record.

The MH itself (sealing, checks) is tested with guest code in ``tests/unit/guest``; the whole
path between two hosts in ``tests/functional/test_mh_live_migration.py``."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from confmig.common.errors import ConfigError, MigrationError, StreamError
from confmig.common.units import MiB
from confmig.guest.layout import MH_AREA_GPA
from confmig.proto import mailbox as mb
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration import mh
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import RoundCounters
from confmig.vmm.sev import OwnerUnreachable
from confmig.vmm.shared_regions import SharedRegions

AREA = (MH_AREA_GPA, 4 * mb.MAILBOX_STRIDE)
MID = b"m" * 16
CHALLENGE = bytes(range(16))
TICKET = bytes(range(100, 116))
OFFER = CHALLENGE + TICKET
PARAMS = MigrationParameters(x_mh_target_challenge=OFFER.hex())


@dataclass
class FakeVcpu:
    """Answers EXPORT with a record naming the GPAs it was given (ciphertext: filler)."""

    index: int
    log: list[tuple[int, str, int]]
    fail: set[mb.MhCommand] = field(default_factory=set)
    refuse: bytes | None = None
    """RESUME refuses a token that starts with these bytes (a forged one)."""
    area: bytearray = field(default_factory=lambda: bytearray(mb.SLOTS * mb.SLOT_DATA))
    seq: int = 0
    imported: list[bytes] = field(default_factory=list)
    challenge: bytes = b""

    def data(self, slot: int) -> memoryview:
        return memoryview(self.area)[slot * mb.SLOT_DATA : (slot + 1) * mb.SLOT_DATA]

    def io_header(self, data: bytes) -> None:
        self.init = data
        init = mb.decode_init(data)
        assert init.role != mb.Role.SOURCE or init.migration_id == TICKET  # the target's ticket

    def read_io_header(self) -> bytes:
        """A source MH answers INIT with the migration id it drew (and its session's streams)."""
        return mb.encode_init(mb.Role.SOURCE, MID, mb.decode_init(self.init).nstreams)

    def command(self, cmd: mb.MhCommand, *, slot: int | None = None, npages: int = 0, length: int = 0,
                epoch: int = 0, gpa: int = 0) -> mb.Command:
        self.log.append((self.index, cmd.name, epoch))
        forged = (cmd == mb.MhCommand.RESUME and self.refuse is not None
                  and bytes(self.data(0)[:length]).startswith(self.refuse))
        if cmd in self.fail or forged:
            return mb.Command(cmd, 0, mb.MhReturn.AUTH_ERR, 0, 1)
        if cmd == mb.MhCommand.EXPORT:
            assert slot is not None
            gpas = struct.unpack_from(f"<{npages}Q", self.data(slot))
            record = sealed(self.index, self.seq, gpas, epoch)
            self.seq += 1
            self.data(slot)[: len(record)] = record
            return mb.Command(cmd, 0, 0, 0, 1, length=len(record))
        if cmd == mb.MhCommand.FINISH:
            assert length == mb.CHALLENGE_SIZE
            self.challenge = bytes(self.data(0)[:length])
            record = sealed(0, 0, (), epoch, kind=mb.RecordKind.COMPLETION)
            self.data(0)[: len(record)] = record
            return mb.Command(cmd, 0, 0, 0, 1, length=len(record))
        if cmd in (mb.MhCommand.IMPORT, mb.MhCommand.COMPLETE, mb.MhCommand.RESUME):
            self.imported.append(bytes(self.data(slot or 0)[:length]))
        if cmd == mb.MhCommand.ABORT:
            token = sealed(0, 0, (), epoch, kind=mb.RecordKind.ABORT)
            self.data(0)[: len(token)] = token
            return mb.Command(cmd, 0, 0, 0, 1, length=len(token))
        return mb.Command(cmd, 0, 0, 0, 1)


def sealed(stream: int, seq: int, gpas: tuple[int, ...], epoch: int,
           kind: mb.RecordKind = mb.RecordKind.PAGES, mid: bytes = MID) -> bytes:
    h = mb.RecordHeader(mb.RECORD_VERSION, mb.ALG_AES_256_GCM, kind, stream, seq, epoch, len(gpas), 0, 0,
                        1, mid)
    body = bytes(len(gpas) * 4096 + mb.TAG_SIZE)
    return h.pack() + struct.pack(f"<{len(gpas)}Q", *gpas) + body


@dataclass
class FakeMh:
    vcpus: list[FakeVcpu]
    area: tuple[int, int] = AREA
    started: bool = False
    sent_away: bool = False

    def start(self) -> None:
        self.started = True

    def target_challenge(self) -> bytes:
        return OFFER


@dataclass
class FakeSev:
    shared: SharedRegions = field(default_factory=SharedRegions)
    config: object = field(default_factory=lambda: type("C", (), {"es": False})())
    owner_grants: set[str] = field(default_factory=lambda: {"commit", "abort"})
    """The outcomes the guest owner grants (it refuses the others: decided the other way)."""
    decisions: list[tuple[str, bytes, bytes, bytes]] = field(default_factory=list)

    def migration_decision(self, outcome: str, *, ticket: bytes, migration_id: bytes,
                           challenge: bytes) -> bytes:
        self.decisions.append((outcome, ticket, migration_id, challenge))
        if outcome not in self.owner_grants:
            raise ConfigError(f"guest owner refused: decided already, not {outcome}")
        return b"owner's " + outcome.encode()


@dataclass
class Sink:
    """The main channel's records as a backend writes them."""

    records: list[tuple[str, object]] = field(default_factory=list)

    def pages(self, block: RamBlock, indices: np.ndarray) -> RoundCounters:
        self.records.append(("pages", block.gpas(indices).tolist()))
        return RoundCounters(normal=len(indices))

    def zeros(self, block: RamBlock, indices: np.ndarray) -> RoundCounters:
        self.records.append(("zeros", block.gpas(indices).tolist()))
        return RoundCounters(zero=len(indices))

    def confidential(self, subtype: ConfidentialSubtype, payloads: Sequence[bytes | memoryview]) -> int:
        for p in payloads:
            self.records.append((subtype.name, bytes(p)))  # a mailbox's view changes once sent
        return sum(map(len, payloads))


def source(nvcpus: int = 1) -> tuple[mh.MhOutgoing, FakeMh, Sink, GuestMemory, list[tuple[int, str, int]]]:
    log: list[tuple[int, str, int]] = []
    fake = FakeMh([FakeVcpu(i, log) for i in range(nvcpus)])
    sev = FakeSev()
    sev.shared.update(0x1000 >> 12, 1, shared=True)  # the fw_cfg bounce page
    sink = Sink()
    memory = GuestMemory.pc(32 * MiB)
    backend = mh.MhOutgoing(sev, fake, PARAMS, sink)  # type: ignore[arg-type]
    return backend, fake, sink, memory, log


def records_of(sink: Sink) -> list[mb.RecordHeader]:
    return [mb.decode_record_header(p) for kind, p in sink.records if kind == "MH_RECORD"
            and isinstance(p, bytes)]


def test_private_pages_go_through_the_mh_shared_ones_in_the_clear_and_its_area_nowhere() -> None:
    backend, fake, sink, memory, log = source()
    backend.setup()
    assert fake.started and mb.decode_init(fake.vcpus[0].init).role == mb.Role.SOURCE
    assert backend.migration_id == MID
    block = memory.blocks[0]
    total = backend.pages(block, np.arange(block.npages, dtype=np.int64))
    area_pages = AREA[1] // 4096
    private = block.npages - 1 - area_pages
    assert ("pages", [0x1000]) in sink.records
    heads = records_of(sink)
    gpas = [g for _, p in sink.records if isinstance(p, bytes)
            for g in mb.gpa_entries(p, mb.decode_record_header(p)).tolist()]
    assert len(gpas) == private == total.normal - 1
    assert not [g for g in gpas if AREA[0] <= g < AREA[0] + AREA[1]] and 0x1000 not in gpas
    assert [h.seq for h in heads] == list(range(len(heads)))  # in the order the MH sealed them
    assert all(h.npages <= mb.BATCH_PAGES for h in heads)
    assert backend.counters.extra["batches"] == len(heads)
    assert {e for _, name, e in log if name == "EXPORT"} == {mh.LIVE_EPOCH}


def test_several_mh_vcpus_seal_in_turn_each_page_on_its_own_stream_in_order() -> None:
    backend, fake, sink, memory, _log = source(nvcpus=3)
    backend.setup()
    assert all(mb.decode_init(v.init).nstreams == 3 for v in fake.vcpus)
    block = memory.blocks[0]
    backend.pages(block, np.arange(block.npages, dtype=np.int64))
    heads = records_of(sink)
    for stream in range(3):
        seqs = [h.seq for h in heads if h.stream == stream]
        assert seqs == list(range(len(seqs))) and len(seqs) > 3
    for _, p in sink.records:
        if isinstance(p, bytes):
            h = mb.decode_record_header(p)
            assert (mb.stream_of(mb.gpa_entries(p, h).astype(np.int64) >> 12, 3) == h.stream).all()
    assert [h.stream for h in heads[:3]] == [0, 1, 2]  # round-robin: every MH vCPU works


def test_the_firmware_block_is_not_migrated() -> None:
    backend, _fake, sink, memory, _log = source()
    bios = memory.add_block("pc.bios", bytes(65536), gpa=(4 << 30) - 65536, slot=2)
    assert backend.pages(bios, np.arange(16, dtype=np.int64)) == RoundCounters()
    assert sink.records == []


def test_the_final_epoch_ends_with_the_completion_record_then_the_shared_regions() -> None:
    backend, fake, sink, memory, log = source()
    backend.setup()
    backend.switchover()
    block = memory.blocks[0]
    backend.pages(block, np.arange(4096, 4200, dtype=np.int64))
    backend.complete([0])
    assert sink.records[-1][0] == "SHARED_REGIONS"
    last = sink.records[-2][1]
    assert isinstance(last, bytes) and mb.decode_record_header(last).kind == mb.RecordKind.COMPLETION
    assert fake.sent_away and backend.finished
    assert fake.vcpus[0].challenge == CHALLENGE  # the target's, handed to FINISH
    assert {e for _, name, e in log if name == "EXPORT"} == {mh.FINAL_EPOCH}


def test_a_refusal_by_the_mh_fails_the_migration() -> None:
    backend, fake, _sink, memory, _log = source()
    backend.setup()
    fake.vcpus[0].fail.add(mb.MhCommand.EXPORT)
    with pytest.raises(MigrationError, match=rf"refused to export {mb.BATCH_PAGES} pages.*AUTH_ERR"):
        backend.pages(memory.blocks[0], np.arange(4096, 4096 + mb.BATCH_PAGES + 50, dtype=np.int64))
    backend.cancel()  # RESET, nothing pending
    assert not fake.sent_away


def test_multifd_and_a_missing_target_challenge_are_refused_up_front() -> None:
    with pytest.raises(MigrationError, match="multifd"):
        mh.MhOutgoing.check(MigrationParameters(capabilities=frozenset({"multifd"})))
    with pytest.raises(MigrationError, match="x-mh-target-challenge"):
        mh.MhOutgoing.check(MigrationParameters())
    mh.MhOutgoing.check(PARAMS)


@pytest.mark.parametrize("value", ["00" * 16, "00" * 31, "zz" * 32, 5])
def test_the_target_challenge_parameter_is_32_bytes_of_hex(value: object) -> None:
    """The target's challenge and the owner's ticket, as ``x-query-migration-handler`` gives them."""
    from confmig.common.errors import ConfigError

    with pytest.raises(ConfigError, match="x-mh-target-challenge"):
        MigrationParameters().with_parameters({"x-mh-target-challenge": value})
    p = MigrationParameters().with_parameters({"x-mh-target-challenge": "AB" * 32})
    assert p.qmp_parameters()["x-mh-target-challenge"] == "ab" * 32


def target(nvcpus: int = 1) -> tuple[mh.MhIncoming, FakeMh]:
    log: list[tuple[int, str, int]] = []
    fake = FakeMh([FakeVcpu(i, log) for i in range(nvcpus)])
    return mh.MhIncoming(FakeSev(), fake), fake  # type: ignore[arg-type]


def test_the_target_gives_each_stream_to_its_mh_vcpu_and_completes_last() -> None:
    incoming, fake = target(nvcpus=2)
    r0, r1 = sealed(0, 0, (0x10000,), 0), sealed(1, 0, (0x20000,), 0)
    incoming.record(ConfidentialSubtype.MH_RECORD, r0)
    incoming.record(ConfidentialSubtype.MH_RECORD, r1)
    assert fake.vcpus[0].imported == [r0] and fake.vcpus[1].imported == [r1]
    assert mb.decode_init(fake.vcpus[1].init) == mb.Init(mb.Role.TARGET, MID)
    with pytest.raises(StreamError, match="completion record"):
        incoming.verify()
    done = sealed(0, 0, (), 1, kind=mb.RecordKind.COMPLETION)
    incoming.record(ConfidentialSubtype.MH_RECORD, done)
    incoming.verify()
    assert fake.vcpus[0].imported[-1] == done + b"owner's commit"  # COMPLETE: the owner's grant after it
    assert incoming.sev.decisions == [("commit", TICKET, MID, CHALLENGE)]  # type: ignore[attr-defined]
    assert [name for _, name, _ in fake.vcpus[0].log][-2:] == ["VERIFY", "COMPLETE"]


def test_the_owner_is_asked_to_commit_only_once_the_mh_verified() -> None:
    """A target whose MH refuses the completion record asks the owner nothing: the source's VMM
    can still get the abort (and the target's own abort token says the same)."""
    incoming, fake = target()
    fake.vcpus[0].fail.add(mb.MhCommand.VERIFY)
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (0x10000,), 0))
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (), 1, kind=mb.RecordKind.COMPLETION))
    with pytest.raises(StreamError, match="refused VERIFY of the completion record"):
        incoming.verify()
    assert incoming.sev.decisions == []  # type: ignore[attr-defined]
    assert "COMPLETE" not in [name for _, name, _ in fake.vcpus[0].log]


def test_a_target_the_owner_does_not_commit_never_completes() -> None:
    """The source's VMM got the abort first: this target's MH never hears COMPLETE."""
    incoming, fake = target()
    incoming.sev.owner_grants = {"abort"}  # type: ignore[attr-defined]
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (0x10000,), 0))
    done = sealed(0, 0, (), 1, kind=mb.RecordKind.COMPLETION)
    incoming.record(ConfidentialSubtype.MH_RECORD, done)
    with pytest.raises(MigrationError, match="the guest owner did not commit the migration here"):
        incoming.verify()
    names = [name for _, name, _ in fake.vcpus[0].log]
    assert "VERIFY" in names and "COMPLETE" not in names


@pytest.mark.parametrize(("record", "error"), [
    (sealed(3, 0, (0x1000,), 0), "stream 3: this target has 2 MH vCPUs"),
    (sealed(0, 0, (0x1000,), 0, mid=b"x" * 16), "two different migrations"),
    (sealed(0, 0, (0x1000,), 0)[:-1], "record of"),
    (b"\x07" + sealed(0, 0, (0x1000,), 0)[1:], "record version 7"),
])
def test_the_target_refuses_what_no_mh_should_see(record: bytes, error: str) -> None:
    incoming, fake = target(nvcpus=2)
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (0x2000,), 0))
    with pytest.raises(StreamError, match=error):
        incoming.record(ConfidentialSubtype.MH_RECORD, record)
    assert len(fake.vcpus[0].imported) == 1


def test_a_refused_import_fails_the_load_before_complete() -> None:
    """Imports run on their MH vCPUs in the background: a refusal surfaces at the latest when
    verify() waits for them, and COMPLETE is never asked for."""
    incoming, fake = target()
    fake.vcpus[0].fail.add(mb.MhCommand.IMPORT)
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (0x1000,), 0))
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (), 1, kind=mb.RecordKind.COMPLETION))
    refused = r"refused IMPORT of a record of stream 0 \(sequence \d+\) \(AUTH_ERR\)"
    with pytest.raises(StreamError, match=refused):
        incoming.verify()
    assert "COMPLETE" not in [name for _, name, _ in fake.vcpus[0].log]


def test_streams_import_side_by_side_each_in_order() -> None:
    incoming, fake = target(nvcpus=2)
    records = [sealed(i % 2, i // 2, (0x10000 + i * 0x1000,), 0) for i in range(8)]
    for r in records:
        incoming.record(ConfidentialSubtype.MH_RECORD, r)
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (), 1, kind=mb.RecordKind.COMPLETION))
    incoming.verify()
    for i in (0, 1):
        assert fake.vcpus[i].imported[: 4] == records[i::2]  # each stream in its order


def finished_source() -> tuple[mh.MhOutgoing, FakeMh, list[tuple[int, str, int]]]:
    backend, fake, _sink, memory, log = source()
    backend.setup()
    backend.switchover()
    backend.pages(memory.blocks[0], np.arange(4096, 4100, dtype=np.int64))
    backend.complete([0])
    return backend, fake, log


def test_an_abort_token_after_finish_lets_the_source_guest_run_again() -> None:
    backend, fake, log = finished_source()
    token = sealed(0, 0, (), 1, kind=mb.RecordKind.ABORT)
    backend.from_target(token)
    backend.cancel()
    assert log[-1][1] == "RESUME" and fake.vcpus[0].imported[-1] == token
    assert not fake.sent_away and not backend.finished


def test_without_an_abort_token_the_owner_decides_and_a_refusal_keeps_the_guest_stopped() -> None:
    backend, fake, log = finished_source()
    backend.sev.owner_grants = {"commit"}  # type: ignore[attr-defined]  # the target committed first
    with pytest.raises(MigrationError, match=r"no abort token .* and the guest owner gave none .*"
                                             r"the guest stays stopped here"):
        backend.cancel()
    assert fake.sent_away and "RESUME" not in [name for _, name, _ in log]
    assert not backend.resumable_without_verdict()
    assert backend.sev.decisions == [  # type: ignore[attr-defined]
        ("abort", TICKET, backend.migration_id, CHALLENGE)]


def test_without_an_abort_token_the_owners_resumes_the_guest() -> None:
    """The target (or the link to it) died after FINISH: its owner, asked first, aborts."""
    backend, fake, log = finished_source()
    assert not backend.resumable_without_verdict()
    backend.cancel()
    assert not fake.sent_away and [name for _, name, _ in log][-1] == "RESUME"
    assert backend.resumable_without_verdict()  # the target can never have it: run it here
    assert bytes(fake.vcpus[0].data(0)[:13]) == b"owner's abort"


def test_a_forged_abort_token_from_the_target_falls_back_to_the_owners() -> None:
    backend, fake, _log = finished_source()
    fake.vcpus[0].refuse = b"forged"
    backend.from_target(b"forged token on the return path")
    backend.cancel()
    assert not fake.sent_away and fake.vcpus[0].imported[-1] == b"owner's abort"


def test_an_owner_out_of_reach_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, fake, _log = finished_source()
    monkeypatch.setattr(mh, "OWNER_RETRY_DELAY", 0.0)
    answers: list[object] = [OwnerUnreachable("cannot reach the guest owner"), b"owner's abort"]

    def decide(outcome: str, **_kw: bytes) -> bytes:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, bytes)
        return answer

    backend.sev.migration_decision = decide  # type: ignore[method-assign]
    backend.cancel()
    assert not fake.sent_away and not answers


def test_a_refused_abort_token_keeps_the_guest_stopped() -> None:
    backend, fake, _log = finished_source()
    fake.vcpus[0].fail.add(mb.MhCommand.RESUME)
    backend.from_target(b"forged")
    with pytest.raises(MigrationError, match="refused RESUME"):
        backend.cancel()
    assert fake.sent_away


def test_a_setup_that_failed_before_the_mh_started_resets_nothing() -> None:
    backend, fake, _sink, _memory, log = source()
    backend.cancel()  # e.g. the stream's opening met a full disk
    assert not fake.started and log == []


def test_an_abort_token_before_finish_is_refused() -> None:
    backend, _fake, _sink, _memory, _log = source()
    backend.setup()
    with pytest.raises(StreamError, match="abort token"):
        backend.from_target(b"token")


def test_the_target_seals_an_abort_token_only_for_a_migration_it_saw() -> None:
    incoming, _fake = target()
    assert incoming.abort() == b""  # no record named a migration: nothing to abort
    incoming.record(ConfidentialSubtype.MH_RECORD, sealed(0, 0, (0x2000,), 0))
    token = incoming.abort()
    assert mb.decode_record_header(token).kind == mb.RecordKind.ABORT
