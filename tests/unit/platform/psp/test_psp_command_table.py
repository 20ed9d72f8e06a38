"""Every guest command in every guest state, and every command in every platform state,
against explicit tables of the firmware's answers (AMD-ASPFW ``sev_mcmd.c``).
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
    SevCommand,
    SevError,
    SevRequest,
    SevStatus,
    ShutdownRequest,
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
}  # fmt: skip

# Where a successful command leaves the guest (others leave it where it was).
AFTER: dict[SevCommand, GuestState] = {
    SevCommand.LAUNCH_MEASURE: G.LSECRET,
    SevCommand.LAUNCH_FINISH: G.RUNNING,
    SevCommand.DECOMMISSION: G.INVALID,
}

POLICY = PolicyFlag.ES
ASID, OTHER_ASID = Asid(1), Asid(2)
DATA_SPA, VMSA_SPA, SECRET_SPA = Spa(0x10000), Spa(0x11000), Spa(0x12000)


@dataclass
class Guest:
    platform: Platform
    handle: GuestHandle
    owner: LaunchSession
    measurement: bytes = bytes(32)


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
    if state in (G.LUPDATE, G.RUPDATE):
        if state is G.RUPDATE:  # received, activation pending: as RECEIVE_START + ACTIVATE leave it
            p.psp._set_guest_state_for_tests(handle, state)
        return guest
    guest.measurement = LaunchMeasurement.from_bytes(p.measure(handle)).measure
    if state is G.LSECRET:
        return guest
    p.psp.launch_finish(LaunchFinishRequest(handle=handle))
    if state is not G.RUNNING:  # SEND_START / SEND_FINISH are the next issue
        p.psp._set_guest_state_for_tests(handle, state)
    return guest


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
        if command in (SevCommand.LAUNCH_START, SevCommand.GUEST_STATUS):
            continue
        allowed = {s for s, status in zip(STATES, row, strict=True) if status is OK}
        assert allowed == GUEST_STATES[command], command.name


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
    try:
        p.psp.execute(command, PLATFORM_REQUESTS[command])
        status = SevStatus.SUCCESS
    except SevError as exc:
        status = exc.status
    assert status is PLATFORM_EXPECTED[command][platform_state]
