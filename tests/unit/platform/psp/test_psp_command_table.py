"""Every guest command in every guest state, and every command in every platform state,
against explicit tables of the firmware's answers (AMD-ASPFW ``sev_mcmd.c``).

Every state is reached by real commands: SUPDATE by SEND_START, SENT by
SEND_FINISH, RUPDATE by RECEIVE_START (of a guest this same platform sent to
itself: a platform may be its own migration target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from psp_fakes import Platform

from confmig.common.units import Spa
from confmig.platform.psp import (
    ActivateRequest,
    Asid,
    DbgDecryptRequest,
    DbgEncryptRequest,
    DeactivateRequest,
    DecommissionRequest,
    DfFlushRequest,
    GuestHandle,
    GuestState,
    GuestStatus,
    GuestStatusRequest,
    InitRequest,
    LaunchFinishRequest,
    LaunchMeasurement,
    LaunchMeasureRequest,
    LaunchSecretRequest,
    LaunchSession,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExportRequest,
    PlatformIdentity,
    PlatformStatusRequest,
    PolicyFlag,
    ReceiveFinishRequest,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendCancelRequest,
    SendFinishRequest,
    SendStartRequest,
    SendUpdateDataRequest,
    SendUpdateResponse,
    SendUpdateVmsaRequest,
    SevCommand,
    SevError,
    SevRequest,
    SevStatus,
    ShutdownRequest,
    create_launch_session,
    seal_launch_secret,
)
from confmig.platform.psp.states import GUEST_STATES

OK = SevStatus.SUCCESS
IG = SevStatus.INVALID_GUEST
IGS = SevStatus.INVALID_GUEST_STATE
IPS = SevStatus.INVALID_PLATFORM_STATE

G = GuestState
STATES = (G.INVALID, G.LUPDATE, G.LSECRET, G.RUNNING, G.SUPDATE, G.RUPDATE, G.SENT)

# An SEV-ES guest (so LAUNCH_UPDATE_VMSA applies), activated, debuggable, key sharing allowed.
# "LAUNCH_START" is LAUNCH_START sharing the key of the guest in that state.
EXPECTED: dict[SevCommand, tuple[SevStatus, ...]] = {
    #                              INVALID LUPDATE LSECRET RUNNING SUPDATE RUPDATE SENT
    SevCommand.LAUNCH_UPDATE_DATA: (IG,    OK,     IGS,    IGS,    IGS,    IGS,    IGS),
    SevCommand.LAUNCH_UPDATE_VMSA: (IG,    OK,     IGS,    IGS,    IGS,    IGS,    IGS),
    SevCommand.LAUNCH_MEASURE:     (IG,    OK,     IGS,    IGS,    IGS,    IGS,    IGS),
    SevCommand.LAUNCH_SECRET:      (IG,    IGS,    OK,     IGS,    IGS,    IGS,    IGS),
    SevCommand.LAUNCH_FINISH:      (IG,    IGS,    OK,     IGS,    IGS,    IGS,    IGS),
    SevCommand.ACTIVATE:           (IG,    OK,     OK,     OK,     OK,     OK,     IGS),
    SevCommand.DEACTIVATE:         (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.DECOMMISSION:       (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.GUEST_STATUS:       (OK,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.DBG_DECRYPT:        (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.DBG_ENCRYPT:        (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.LAUNCH_START:       (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.SEND_START:         (IG,    IGS,    IGS,    OK,     IGS,    IGS,    IGS),
    SevCommand.SEND_UPDATE_DATA:   (IG,    IGS,    IGS,    IGS,    OK,     IGS,    IGS),
    SevCommand.SEND_UPDATE_VMSA:   (IG,    IGS,    IGS,    IGS,    OK,     IGS,    IGS),
    SevCommand.SEND_FINISH:        (IG,    IGS,    IGS,    IGS,    OK,     IGS,    IGS),
    SevCommand.SEND_CANCEL:        (IG,    IGS,    IGS,    IGS,    OK,     IGS,    IGS),
    SevCommand.RECEIVE_START:      (IG,    OK,     OK,     OK,     OK,     OK,     OK),
    SevCommand.RECEIVE_UPDATE_DATA: (IG,   IGS,    IGS,    IGS,    IGS,    OK,     IGS),
    SevCommand.RECEIVE_UPDATE_VMSA: (IG,   IGS,    IGS,    IGS,    IGS,    OK,     IGS),
    SevCommand.RECEIVE_FINISH:     (IG,    IGS,    IGS,    IGS,    IGS,    OK,     IGS),
}  # fmt: skip

# Where a successful command leaves the guest (others leave it where it was).
AFTER: dict[SevCommand, GuestState] = {
    SevCommand.LAUNCH_MEASURE: G.LSECRET,
    SevCommand.LAUNCH_FINISH: G.RUNNING,
    SevCommand.DECOMMISSION: G.INVALID,
    SevCommand.SEND_START: G.SUPDATE,
    SevCommand.SEND_FINISH: G.SENT,
    SevCommand.SEND_CANCEL: G.RUNNING,
    SevCommand.RECEIVE_FINISH: G.RUNNING,
}

POLICY = PolicyFlag.ES
ASID, OTHER_ASID, RECEIVED_ASID = Asid(1), Asid(2), Asid(3)
DATA_SPA, VMSA_SPA, SECRET_SPA = Spa(0x10000), Spa(0x11000), Spa(0x12000)
RECEIVED_DATA_SPA, RECEIVED_VMSA_SPA = Spa(0x20000), Spa(0x21000)
NO_PACKET = SendUpdateResponse(hdr=bytes(52), trans=bytes(4096), hdr_len=52)


@dataclass
class Guest:
    platform: Platform
    handle: GuestHandle
    owner: LaunchSession
    measurement: bytes = bytes(32)
    data_packet: SendUpdateResponse = NO_PACKET
    vmsa_packet: SendUpdateResponse = NO_PACKET
    data_spa: Spa = DATA_SPA
    vmsa_spa: Spa = VMSA_SPA


def _send_start(p: Platform, handle: GuestHandle) -> SendStartRequest:
    """SEND_START to this platform itself."""
    return SendStartRequest(handle=handle, pdh_cert=p.identity.certificates.pdh.to_bytes())


def _send_update(handle: GuestHandle, spa: Spa) -> SendUpdateDataRequest:
    return SendUpdateDataRequest(handle=handle, hdr_len=52, guest_paddr=spa, guest_len=4096, trans_len=4096)


def _guest_in(identity: PlatformIdentity, state: GuestState) -> Guest:
    p = Platform.build(identity)
    p.boot(es=True)
    p.memory.write_plain(DATA_SPA, bytes(range(256)) * 16)
    p.memory.write_plain(VMSA_SPA, bytes(4096))
    handle, owner = p.launch(POLICY, asid=ASID)
    guest = Guest(platform=p, handle=handle, owner=owner)
    if state is G.INVALID:  # a handle whose guest is gone; another guest keeps the platform WORKING
        p.psp.launch_start(LaunchStartRequest(policy=0))
        p.psp.deactivate(DeactivateRequest(handle=handle))
        p.psp.decommission(DecommissionRequest(handle=handle))
        return guest
    if state is G.LUPDATE:
        return guest
    p.psp.launch_update_vmsa(LaunchUpdateVmsaRequest(handle=handle, paddr=VMSA_SPA, length=4096))
    guest.measurement = LaunchMeasurement.from_bytes(p.measure(handle)).measure
    if state is G.LSECRET:
        return guest
    p.psp.launch_finish(LaunchFinishRequest(handle=handle))
    if state is G.RUNNING:
        return guest
    started = p.psp.send_start(_send_start(p, handle))
    if state is G.SUPDATE:
        return guest
    if state is G.SENT:
        p.psp.send_finish(SendFinishRequest(handle=handle))
        return guest
    # RUPDATE: the guest under test is the one received from the guest sent above, its
    # activation pending (as KVM's RECEIVE_START leaves it), with one packet of each kind ready.
    data = p.psp.send_update_data(_send_update(handle, DATA_SPA))
    vmsa = p.psp.send_update_vmsa(
        SendUpdateVmsaRequest(handle=handle, hdr_len=52, guest_paddr=VMSA_SPA, guest_len=4096, trans_len=4096)
    )
    received = p.receive_start_from(started, identity, asid=RECEIVED_ASID)
    return Guest(
        platform=p,
        handle=received,
        owner=owner,
        data_packet=data,
        vmsa_packet=vmsa,
        data_spa=RECEIVED_DATA_SPA,
        vmsa_spa=RECEIVED_VMSA_SPA,
    )


def _request(command: SevCommand, g: Guest) -> tuple[Callable[[], None] | None, SevRequest]:
    """The request, and what the host must do first (as KVM would) for the command to make sense."""
    p, h = g.platform.psp, g.handle
    prepare: Callable[[], None] | None = None
    request: SevRequest
    if command is SevCommand.LAUNCH_UPDATE_DATA:
        request = LaunchUpdateDataRequest(handle=h, paddr=DATA_SPA, length=4096)
    elif command is SevCommand.LAUNCH_UPDATE_VMSA:
        request = LaunchUpdateVmsaRequest(handle=h, paddr=VMSA_SPA, length=4096)
    elif command is SevCommand.LAUNCH_MEASURE:
        request = LaunchMeasureRequest(handle=h)
    elif command is SevCommand.LAUNCH_SECRET:
        header, trans = seal_launch_secret(
            g.owner.keys, b"s" * 32, measurement=g.measurement, iv=b"\x05" * 16
        )
        request = LaunchSecretRequest(
            handle=h, hdr=header.to_bytes(), guest_paddr=SECRET_SPA, guest_len=32, trans=trans
        )
    elif command is SevCommand.LAUNCH_FINISH:
        request = LaunchFinishRequest(handle=h)
    elif command is SevCommand.ACTIVATE:

        def prepare() -> None:  # unbind first, then flush so that the new ASID is clean
            status = p.guest_status(GuestStatusRequest(handle=h))
            if status.asid:
                p.deactivate(DeactivateRequest(handle=h))
            p.df_flush(DfFlushRequest())

        request = ActivateRequest(handle=h, asid=OTHER_ASID)
    elif command is SevCommand.DEACTIVATE:
        request = DeactivateRequest(handle=h)
    elif command is SevCommand.DECOMMISSION:

        def prepare() -> None:
            if p.guest_status(GuestStatusRequest(handle=h)).asid:
                p.deactivate(DeactivateRequest(handle=h))

        request = DecommissionRequest(handle=h)
    elif command is SevCommand.GUEST_STATUS:
        request = GuestStatusRequest(handle=h)
    elif command is SevCommand.DBG_DECRYPT:
        request = DbgDecryptRequest(handle=h, src_paddr=DATA_SPA, length=64)
    elif command is SevCommand.DBG_ENCRYPT:
        request = DbgEncryptRequest(handle=h, dst_paddr=DATA_SPA, data=bytes(64))
    elif command is SevCommand.LAUNCH_START:
        request = LaunchStartRequest(policy=POLICY, handle=h)
    elif command is SevCommand.SEND_START:
        request = _send_start(g.platform, h)
    elif command is SevCommand.SEND_UPDATE_DATA:
        request = _send_update(h, g.data_spa)
    elif command is SevCommand.SEND_UPDATE_VMSA:
        request = SendUpdateVmsaRequest(
            handle=h, hdr_len=52, guest_paddr=g.vmsa_spa, guest_len=4096, trans_len=4096
        )
    elif command is SevCommand.SEND_FINISH:
        request = SendFinishRequest(handle=h)
    elif command is SevCommand.SEND_CANCEL:
        request = SendCancelRequest(handle=h)
    elif command is SevCommand.RECEIVE_START:  # sharing the key of the guest in that state
        session = create_launch_session(g.platform.pdh(), policy=POLICY)
        request = ReceiveStartRequest(
            policy=POLICY, pdh_cert=session.dh_cert, session=session.session, handle=h
        )
    elif command is SevCommand.RECEIVE_UPDATE_DATA:
        packet = g.data_packet
        request = ReceiveUpdateDataRequest(
            handle=h, hdr=packet.hdr, guest_paddr=g.data_spa, guest_len=4096, trans=packet.trans
        )
    elif command is SevCommand.RECEIVE_UPDATE_VMSA:
        packet = g.vmsa_packet
        request = ReceiveUpdateVmsaRequest(
            handle=h, hdr=packet.hdr, guest_paddr=g.vmsa_spa, guest_len=4096, trans=packet.trans
        )
    elif command is SevCommand.RECEIVE_FINISH:
        request = ReceiveFinishRequest(handle=h)
    else:
        raise AssertionError(command)
    return prepare, request


def _run(g: Guest, command: SevCommand) -> SevStatus:
    prepare, request = _request(command, g)
    if prepare is not None:
        prepare()
    try:
        g.platform.psp.execute(command, request)
    except SevError as exc:
        return exc.status
    return SevStatus.SUCCESS


@pytest.mark.parametrize("state", STATES, ids=[s.name for s in STATES])
@pytest.mark.parametrize("command", list(EXPECTED), ids=[c.name for c in EXPECTED])
def test_command_in_guest_state(identity: PlatformIdentity, command: SevCommand, state: GuestState) -> None:
    g = _guest_in(identity, state)
    expected = EXPECTED[command][STATES.index(state)]
    before = g.platform.psp.guest_status(GuestStatusRequest(handle=g.handle)).state
    assert _run(g, command) is expected, f"{command.name} in {state.name}"
    after = g.platform.psp.guest_status(GuestStatusRequest(handle=g.handle)).state
    if expected is OK:
        assert after is AFTER.get(command, before)
    else:
        assert after is before  # a refused command changes nothing


def test_the_table_agrees_with_the_state_module() -> None:
    for command, row in EXPECTED.items():
        if command in (SevCommand.LAUNCH_START, SevCommand.RECEIVE_START, SevCommand.GUEST_STATUS):
            continue
        allowed = {s for s, status in zip(STATES, row, strict=True) if status is OK}
        assert allowed == GUEST_STATES[command], command.name


def test_every_command_is_in_both_tables() -> None:
    guest_commands = set(GUEST_STATES) | {
        SevCommand.LAUNCH_START,
        SevCommand.RECEIVE_START,
        SevCommand.GUEST_STATUS,
    }
    assert set(EXPECTED) == guest_commands
    assert set(PLATFORM_EXPECTED) == set(SevCommand) - {SevCommand.ATTESTATION}  # not emulated


def test_guest_status_of_an_unknown_handle_is_not_an_error(identity: PlatformIdentity) -> None:
    p = Platform.build(identity)
    p.boot()
    status = p.psp.guest_status(GuestStatusRequest(handle=GuestHandle(77)))
    assert status == GuestStatus(handle=GuestHandle(77), policy=0, asid=Asid(0), state=G.INVALID)


# -- platform states ----------------------------------------------------------------

NO_GUEST = GuestHandle(3)
PLATFORM_REQUESTS: dict[SevCommand, SevRequest] = {
    SevCommand.INIT: InitRequest(),
    SevCommand.SHUTDOWN: ShutdownRequest(),
    SevCommand.PLATFORM_STATUS: PlatformStatusRequest(),
    SevCommand.PDH_CERT_EXPORT: PdhCertExportRequest(pdh_cert_len=2084, certs_len=6252),
    SevCommand.DF_FLUSH: DfFlushRequest(),
    SevCommand.LAUNCH_START: LaunchStartRequest(policy=0),
    SevCommand.GUEST_STATUS: GuestStatusRequest(handle=NO_GUEST),
    SevCommand.DECOMMISSION: DecommissionRequest(handle=NO_GUEST),
    SevCommand.ACTIVATE: ActivateRequest(handle=NO_GUEST, asid=Asid(20)),
    SevCommand.DEACTIVATE: DeactivateRequest(handle=NO_GUEST),
    SevCommand.LAUNCH_UPDATE_DATA: LaunchUpdateDataRequest(handle=NO_GUEST, paddr=DATA_SPA, length=16),
    SevCommand.LAUNCH_UPDATE_VMSA: LaunchUpdateVmsaRequest(handle=NO_GUEST, paddr=VMSA_SPA, length=4096),
    SevCommand.LAUNCH_MEASURE: LaunchMeasureRequest(handle=NO_GUEST),
    SevCommand.LAUNCH_SECRET: LaunchSecretRequest(
        handle=NO_GUEST, hdr=bytes(52), guest_paddr=SECRET_SPA, guest_len=16, trans=bytes(16)
    ),
    SevCommand.LAUNCH_FINISH: LaunchFinishRequest(handle=NO_GUEST),
    SevCommand.DBG_DECRYPT: DbgDecryptRequest(handle=NO_GUEST, src_paddr=DATA_SPA, length=16),
    SevCommand.DBG_ENCRYPT: DbgEncryptRequest(handle=NO_GUEST, dst_paddr=DATA_SPA, data=bytes(16)),
    SevCommand.SEND_START: SendStartRequest(handle=NO_GUEST, pdh_cert=bytes(2084)),
    SevCommand.SEND_UPDATE_DATA: _send_update(NO_GUEST, DATA_SPA),
    SevCommand.SEND_UPDATE_VMSA: SendUpdateVmsaRequest(
        handle=NO_GUEST, hdr_len=52, guest_paddr=VMSA_SPA, guest_len=4096, trans_len=4096
    ),
    SevCommand.SEND_FINISH: SendFinishRequest(handle=NO_GUEST),
    SevCommand.SEND_CANCEL: SendCancelRequest(handle=NO_GUEST),
    SevCommand.RECEIVE_UPDATE_DATA: ReceiveUpdateDataRequest(
        handle=NO_GUEST, hdr=bytes(52), guest_paddr=DATA_SPA, guest_len=16, trans=bytes(16)
    ),
    SevCommand.RECEIVE_UPDATE_VMSA: ReceiveUpdateVmsaRequest(
        handle=NO_GUEST, hdr=bytes(52), guest_paddr=VMSA_SPA, guest_len=4096, trans=bytes(4096)
    ),
    SevCommand.RECEIVE_FINISH: ReceiveFinishRequest(handle=NO_GUEST),
}

PLATFORM_EXPECTED: dict[SevCommand, tuple[SevStatus, SevStatus, SevStatus]] = {
    #                              UNINIT  INIT  WORKING (one other guest exists)
    SevCommand.INIT:               (OK,    IPS,  IPS),
    SevCommand.SHUTDOWN:           (OK,    OK,   OK),
    SevCommand.PLATFORM_STATUS:    (OK,    OK,   OK),
    SevCommand.PDH_CERT_EXPORT:    (IPS,   OK,   OK),
    SevCommand.DF_FLUSH:           (OK,    OK,   OK),
    SevCommand.LAUNCH_START:       (IPS,   OK,   OK),
    SevCommand.GUEST_STATUS:       (IPS,   OK,   OK),
    SevCommand.DECOMMISSION:       (IPS,   IPS,  IG),
    SevCommand.ACTIVATE:           (IPS,   IPS,  IG),
    SevCommand.DEACTIVATE:         (IPS,   IPS,  IG),
    SevCommand.LAUNCH_UPDATE_DATA: (IPS,   IPS,  IG),
    SevCommand.LAUNCH_UPDATE_VMSA: (IPS,   IPS,  IG),
    SevCommand.LAUNCH_MEASURE:     (IPS,   IPS,  IG),
    SevCommand.LAUNCH_SECRET:      (IPS,   IPS,  IG),
    SevCommand.LAUNCH_FINISH:      (IPS,   IPS,  IG),
    SevCommand.DBG_DECRYPT:        (IPS,   IPS,  IG),
    SevCommand.DBG_ENCRYPT:        (IPS,   IPS,  IG),
    SevCommand.SEND_START:         (IPS,   IPS,  IG),
    SevCommand.SEND_UPDATE_DATA:   (IPS,   IPS,  IG),
    SevCommand.SEND_UPDATE_VMSA:   (IPS,   IPS,  IG),
    SevCommand.SEND_FINISH:        (IPS,   IPS,  IG),
    SevCommand.SEND_CANCEL:        (IPS,   IPS,  IG),
    SevCommand.RECEIVE_START:      (IPS,   OK,   OK),
    SevCommand.RECEIVE_UPDATE_DATA: (IPS,  IPS,  IG),
    SevCommand.RECEIVE_UPDATE_VMSA: (IPS,  IPS,  IG),
    SevCommand.RECEIVE_FINISH:     (IPS,   IPS,  IG),
}  # fmt: skip


@pytest.mark.parametrize("platform_state", [0, 1, 2], ids=["UNINIT", "INIT", "WORKING"])
@pytest.mark.parametrize("command", list(PLATFORM_EXPECTED), ids=[c.name for c in PLATFORM_EXPECTED])
def test_command_in_platform_state(
    identity: PlatformIdentity, command: SevCommand, platform_state: int
) -> None:
    p = Platform.build(identity)
    if platform_state >= 1:
        p.boot()
    if platform_state == 2:
        p.psp.launch_start(LaunchStartRequest(policy=0))
    if command is SevCommand.RECEIVE_START:  # a valid session for this platform's PDH
        session = create_launch_session(identity.certificates.pdh, policy=0)
        request: SevRequest = ReceiveStartRequest(policy=0, pdh_cert=session.dh_cert, session=session.session)
    else:
        request = PLATFORM_REQUESTS[command]
    try:
        p.psp.execute(command, request)
        status = SevStatus.SUCCESS
    except SevError as exc:
        status = exc.status
    assert status is PLATFORM_EXPECTED[command][platform_state]
