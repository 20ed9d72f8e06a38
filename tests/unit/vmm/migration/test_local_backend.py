"""The intra-host backend (``mode=cpr-transfer``) in the engine, against fakes: no dirty log, no
page, the stream's vCPU and device state only; who may run the guest after each failure."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from migration_fakes import Hook, run_engine

from confmig.common.clock import ManualClock
from confmig.common.errors import ConfigError, KvmError, MigrationError, StreamError
from confmig.proto import cpr
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.migration import backends
from confmig.vmm.migration.backend import OutgoingBackend
from confmig.vmm.migration.cpr import CprSender, incoming_option, parse_channel
from confmig.vmm.migration.local import (
    HANDED_OVER,
    NOT_TAKEN,
    VERDICT_LOST,
    VM_DEAD,
    LocalIncoming,
    LocalOutgoing,
)
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink, PageSink
from confmig.vmm.migration.status import MigrationStatus as S
from confmig.vmm.migration.transport import MigrationUri
from confmig.vmm.shared_regions import SharedRegions

CPR_URI = MigrationUri(scheme="unix", path="/nonexistent/cpr.sock")


class FakeVmFd:
    def __init__(self, dead: bool) -> None:
        self.dead = dead

    def check_extension(self, _cap: int) -> int:
        if self.dead:
            raise KvmError("KVM_CHECK_EXTENSION", errno.EIO)
        return 1


class FakeMachine(SimpleNamespace):
    def retire(self) -> None:
        self.retired = True


def fake_machine(*, sev: bool, dead: bool = False) -> FakeMachine:
    shared = SharedRegions()
    shared.update(0x100, 2, shared=True)
    return FakeMachine(sev=SimpleNamespace(shared=shared) if sev else None, mh=None, vm=FakeVmFd(dead),
                       handed_over=None, retired=False, cpr=None)


def sender(*, handed: bool = True) -> CprSender:
    s = CprSender(CPR_URI, cpr.CprState(fds=(cpr.CprFd(kind=cpr.FdKind.RAM, name="pc.ram", size=4096),)), [7])
    s.sent, s.handed = 42, handed
    return s


def local_run(machine: FakeMachine, *, reply: bytes = rp.encode(rp.Shut(status=0)),
              handed: bool = True) -> tuple[object, list[LocalOutgoing]]:
    made: list[LocalOutgoing] = []

    def factory(out: MainChannelSink, _pages: PageSink, _clock: ManualClock, _hook: Hook) -> OutgoingBackend:
        made.append(LocalOutgoing(machine, sender(handed=handed), out))  # type: ignore[arg-type]
        return made[-1]

    return run_engine(backend_for=factory, reply=reply), made


def test_a_local_migration_sends_no_page_and_keeps_no_dirty_log() -> None:
    m = fake_machine(sev=False)
    run, _ = local_run(m)
    assert run.statuses == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED]
    assert run.rounds == [0]  # the first round finds nothing: switch over at once
    assert "dirty-logging on" not in run.vm.events and run.vm.log is None
    stats = run.mig.stats
    assert stats.normal == stats.duplicate == 0
    events = run.events()
    assert not any(isinstance(e, dec.RamPages | dec.RamZeroPages | dec.Confidential) for e in events)
    assert sum(isinstance(e, dec.DeviceState) for e in events) == 3  # two vCPUs and a device
    assert stats.transferred < 1024
    assert stats.confidential is not None
    assert stats.confidential.qmp() == {"backend": "local", "private-pages": 0, "shared-pages": 0,
                                        "psp-commands": 0, "fds-passed": 1, "cpr-bytes": 42}
    assert m.handed_over == HANDED_OVER and m.retired


def test_an_sev_guest_takes_its_shared_regions_list_along() -> None:
    m = fake_machine(sev=True)
    run, _ = local_run(m)
    records = [e for e in run.events() if isinstance(e, dec.Confidential)]
    assert [r.subtype for r in records] == [ConfidentialSubtype.SHARED_REGIONS]
    target = fake_machine(sev=True)
    target.sev.shared = SharedRegions()
    incoming = LocalIncoming(target)  # type: ignore[arg-type]
    incoming.record(records[0].subtype, records[0].payload)
    assert target.sev.shared.ranges() == m.sev.shared.ranges()
    with pytest.raises(StreamError, match="unexpected confidential record"):
        incoming.record(records[0].subtype, records[0].payload)  # a second list
    with pytest.raises(StreamError, match="PSP_PACKET"):
        LocalIncoming(target).record(ConfidentialSubtype.PSP_PACKET, b"")  # type: ignore[arg-type]


def test_a_failure_before_the_hand_over_resumes_the_source() -> None:
    m = fake_machine(sev=True)
    run, _ = local_run(m, reply=b"", handed=False)
    assert run.statuses[-1] == S.FAILED and "recover" in run.vm.events
    assert m.handed_over is None and not m.retired


def test_an_sev_source_whose_vm_lives_resumes_when_the_verdict_never_comes() -> None:
    """The new VMM died before the move: KVM still runs our VM, so we may run the guest."""
    m = fake_machine(sev=True, dead=False)
    run, _ = local_run(m, reply=b"")
    assert run.statuses[-1] == S.FAILED and m.handed_over is None


def test_an_sev_source_whose_vm_is_dead_never_runs_the_guest_again() -> None:
    """The new VMM died after the move: KVM says our VM is dead (EIO), whatever the stream said."""
    m = fake_machine(sev=True, dead=True)
    run, _ = local_run(m, reply=b"")
    assert run.statuses[-1] == S.FAILED
    assert m.handed_over == VM_DEAD and m.retired


def test_a_plain_source_stays_stopped_without_a_verdict_unless_the_target_said_it_never_took_it() -> None:
    m = fake_machine(sev=False)
    local_run(m, reply=b"")
    assert m.handed_over == VERDICT_LOST
    m = fake_machine(sev=False)
    refusal = rp.encode(rp.Confidential(payload=NOT_TAKEN)) + rp.encode(rp.Shut(status=1))
    run, _ = local_run(m, reply=refusal)
    assert run.statuses[-1] == S.FAILED and m.handed_over is None


def test_the_new_vmm_tells_the_old_one_whether_it_took_the_guest() -> None:
    m = fake_machine(sev=False)
    m.take_over = lambda: None
    incoming = LocalIncoming(m)  # type: ignore[arg-type]
    assert incoming.abort() == NOT_TAKEN
    incoming.take_over()
    assert incoming.abort() == b""


def test_a_failed_move_is_a_failed_load() -> None:
    m = fake_machine(sev=True)

    def refuse() -> None:
        raise KvmError("KVM_ENABLE_CAP(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)", errno.EINVAL)

    m.take_over = refuse
    incoming = LocalIncoming(m)  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match=r"did not move here: .*EINVAL"):
        incoming.take_over()
    assert incoming.abort() == NOT_TAKEN


def test_mode_is_qemus_migmode_and_cpr_transfer_chooses_the_local_backend() -> None:
    p = MigrationParameters().with_parameters({"mode": "cpr-transfer"})
    assert p.mode == "cpr-transfer" and p.qmp_parameters()["mode"] == "cpr-transfer"
    with pytest.raises(ConfigError, match="does not accept value 'cpr-exec'"):
        MigrationParameters().with_parameters({"mode": "cpr-exec"})
    with pytest.raises(ConfigError, match="cpr-reboot is not supported"):
        MigrationParameters().with_parameters({"mode": "cpr-reboot"})
    m = fake_machine(sev=True)
    m.cpr = object()
    assert isinstance(backends.incoming_backend(m, MigrationParameters()), LocalIncoming)  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="x-confidential-backend 'psp'"):
        backends.check(m, MigrationParameters(mode="cpr-transfer", x_confidential_backend="psp"))  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="needs a channel of channel-type 'cpr'"):
        backends.outgoing(m, p, None)  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="must be a unix socket"):
        backends.outgoing(m, p, MigrationUri(scheme="tcp", host="h", port=1))  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="needs migrate-set-parameters mode=cpr-transfer"):
        backends.outgoing(m, MigrationParameters(), CPR_URI)  # type: ignore[arg-type]


def test_migration_channels_are_qemus() -> None:
    unix = {"transport": "socket", "type": "unix", "path": "/run/cpr.sock"}
    assert parse_channel({"channel-type": "cpr", "addr": unix}) == ("cpr", "unix:/run/cpr.sock")
    inet = {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}
    assert parse_channel({"channel-type": "main", "addr": inet}) == ("main", "tcp:127.0.0.1:4444")
    with pytest.raises(ConfigError, match="must be a unix socket"):
        parse_channel({"channel-type": "cpr", "addr": inet})
    with pytest.raises(ConfigError, match="channel-type 'x'"):
        parse_channel({"channel-type": "x", "addr": unix})
    assert incoming_option("unix:/run/main.sock") == ("main", "unix:/run/main.sock")
    assert incoming_option('{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", '
                           '"path": "/c"}}') == ("cpr", "unix:/c")
    with pytest.raises(ConfigError, match="not a valid JSON"):
        incoming_option("{nope")
