"""The key broker's rules: who gets a session, how long it lives, and that it releases once."""

from __future__ import annotations

import pickle
import threading
import uuid
from collections.abc import Mapping

import pytest
from owner_fakes import Platform, launch_to_measure

from confmig.common.clock import ManualClock
from confmig.common.units import Spa
from confmig.owner import (
    AmdRoot,
    BrokerBusy,
    KeyBroker,
    MeasurementRejected,
    OwnerError,
    PlatformRejected,
    PolicyRejected,
    SessionClosed,
    SessionError,
    SessionExpired,
    UnknownVm,
    VmProfile,
    firmware_digest,
)
from confmig.owner.broker import MAX_SESSIONS, SESSION_TTL
from confmig.owner.session import SessionState
from confmig.platform.psp import PlatformIdentity
from confmig.proto.keybroker import LaunchRequest, MeasurementRequest

FIRMWARE = b"\x90" * 4096
SPA = Spa(0x10000)
KEY = bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e75e")
GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")


class Records:
    def __init__(self) -> None:
        self.records: list[Mapping[str, object]] = []

    def __call__(self, record: Mapping[str, object]) -> None:
        self.records.append(dict(record))

    @property
    def events(self) -> list[object]:
        return [r["event"] for r in self.records]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def audit() -> Records:
    return Records()


def _broker(root: AmdRoot, clock: ManualClock, audit: Records, max_sessions: int = MAX_SESSIONS) -> KeyBroker:
    profile = VmProfile.build(digest=firmware_digest(FIRMWARE), policy=0, secrets=[(GUID, KEY)])
    return KeyBroker(root, {"vm1": profile}, clock=clock, audit=audit, max_sessions=max_sessions)


def _request(identity: PlatformIdentity, vm: str = "vm1", policy: int = 0) -> LaunchRequest:
    c = identity.certificates
    return LaunchRequest(vm=vm, pdh=c.pdh.to_bytes(), cert_chain=c.platform_chain(), policy=policy)


def _measured(p: Platform, broker: KeyBroker, asid: int = 17) -> tuple[str, MeasurementRequest]:
    _h, session_id, measured = launch_to_measure(
        p, broker, vm="vm1", policy=0, image=FIRMWARE, spa=SPA, asid=asid
    )
    return session_id, measured


def test_release_once_and_audit_without_keys(
    booted: Platform, root: AmdRoot, clock: ManualClock, audit: Records
) -> None:
    broker = _broker(root, clock, audit)
    session_id, measured = _measured(booted, broker)
    assert broker.session_state(session_id) is SessionState.AWAITING_MEASUREMENT
    broker.measurement(session_id, measured)
    with pytest.raises(SessionClosed, match="already released its secret") as exc:
        broker.measurement(session_id, measured)
    assert exc.value.http_status == 409
    assert audit.events == ["launch", "released"]
    assert all(r["session"] == session_id and r["vm"] == "vm1" for r in audit.records)
    assert KEY.hex() not in repr(audit.records)


def test_concurrent_measurements_release_once(booted: Platform, root: AmdRoot, clock: ManualClock,
                                              audit: Records) -> None:
    broker = _broker(root, clock, audit)
    session_id, measured = _measured(booted, broker)
    outcomes: list[str] = []

    def call() -> None:
        try:
            broker.measurement(session_id, measured)
            outcomes.append("released")
        except SessionClosed:
            outcomes.append("closed")

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["closed"] * 7 + ["released"]


def test_a_refusal_closes_the_session(booted: Platform, root: AmdRoot, clock: ManualClock,
                                      audit: Records) -> None:
    broker = _broker(root, clock, audit)
    session_id, measured = _measured(booted, broker)
    bad = MeasurementRequest(measurement=measured.measurement, api_major=measured.api_major,
                             api_minor=measured.api_minor, build=measured.build + 1)
    with pytest.raises(MeasurementRejected) as exc:
        broker.measurement(session_id, bad)
    assert exc.value.http_status == 403
    with pytest.raises(SessionClosed, match="was refused"):
        broker.measurement(session_id, measured)  # the right one, too late: no oracle
    assert audit.events == ["launch", "refused"]
    assert audit.records[-1]["reason"] == MeasurementRejected.MESSAGE


def test_sessions_expire(booted: Platform, root: AmdRoot, clock: ManualClock, audit: Records) -> None:
    broker = _broker(root, clock, audit)
    session_id, measured = _measured(booted, broker)
    clock.advance(SESSION_TTL)
    with pytest.raises(SessionExpired, match="expired") as exc:
        broker.measurement(session_id, measured)
    assert exc.value.http_status == 410
    clock.advance(SESSION_TTL)  # forgotten one TTL later
    assert broker.session_state(session_id) is None
    with pytest.raises(SessionError, match="no launch session") as missing:
        broker.measurement(session_id, measured)
    assert missing.value.http_status == 404


def test_the_number_of_sessions_is_bounded(root: AmdRoot, identity: PlatformIdentity, clock: ManualClock,
                                           audit: Records) -> None:
    broker = _broker(root, clock, audit, max_sessions=3)
    for _ in range(3):
        broker.launch(_request(identity))
    with pytest.raises(BrokerBusy, match="too many") as exc:
        broker.launch(_request(identity))
    assert exc.value.http_status == 503
    clock.advance(2 * SESSION_TTL)  # expired, then forgotten: room again
    broker.launch(_request(identity))


def test_who_gets_a_session(root: AmdRoot, identity: PlatformIdentity, foreign: PlatformIdentity,
                            clock: ManualClock, audit: Records) -> None:
    broker = _broker(root, clock, audit)
    with pytest.raises(UnknownVm, match="no VM 'vm2'") as unknown:
        broker.launch(_request(identity, vm="vm2"))
    assert unknown.value.http_status == 404
    with pytest.raises(PolicyRejected, match=r"policy 0x1 is not the configured policy 0x0"):
        broker.launch(_request(identity, policy=1))
    with pytest.raises(PlatformRejected, match="CEK is not certified"):
        broker.launch(_request(foreign))
    assert audit.events == ["launch-refused", "launch-refused"]
    any_vm = KeyBroker(root, {"*": broker.profile("vm1")}, clock=clock)
    assert any_vm.launch(_request(identity, vm="whatever")).session_id


@pytest.mark.parametrize("session_id", ["", "zz", "0" * 32, "../../etc/passwd", "A" * 32])
def test_unknown_sessions(root: AmdRoot, clock: ManualClock, audit: Records, session_id: str) -> None:
    measured = MeasurementRequest(measurement=bytes(48), api_major=1, api_minor=55, build=25)
    with pytest.raises(SessionError, match="no launch session"):
        _broker(root, clock, audit).measurement(session_id, measured)


def test_sessions_hold_keys_and_show_none(root: AmdRoot, identity: PlatformIdentity, clock: ManualClock,
                                          audit: Records) -> None:
    broker = _broker(root, clock, audit)
    offer = broker.launch(_request(identity))
    session = broker._sessions[offer.session_id]
    assert repr(session) == "<OwnerSession (redacted)>"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(session)
    assert issubclass(SessionError, OwnerError)
