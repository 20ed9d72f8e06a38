"""The PSP's two state machines and the command table, in one place.

Numbering is the firmware's (AMD-ASPFW ``sev_plat.c``, ``sev_guest.h``), not
the KVM documentation's, which lists a different order.

* :data:`PLATFORM_STATES` — which platform states a command accepts
  (anything else is ``INVALID_PLATFORM_STATE``).
* :data:`GUEST_STATES` — which guest states a guest command accepts
  (anything else is ``INVALID_GUEST_STATE``). It records what the firmware
  *enforces*, which differs from the comment table in ``sev_guest.h`` in two
  places: DEACTIVATE and the DBG commands carry no state check at all, so they
  also work on a SENT guest.
* :data:`PLATFORM_TRANSITIONS` and :data:`GUEST_TRANSITIONS` — the moves.

Where a command sits in each command's check order is the command's business
(``psp.py``); these tables only say what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Final

from confmig.platform.psp.status import SevError, SevStatus


class SevCommand(IntEnum):
    """PSP mailbox command ids (not KVM's ``sev_cmd_id``, which is another numbering)."""

    INIT = 0x001
    SHUTDOWN = 0x002
    PLATFORM_STATUS = 0x004
    PDH_CERT_EXPORT = 0x008
    DF_FLUSH = 0x00A
    DECOMMISSION = 0x020
    ACTIVATE = 0x021
    DEACTIVATE = 0x022
    GUEST_STATUS = 0x023
    LAUNCH_START = 0x030
    LAUNCH_UPDATE_DATA = 0x031
    LAUNCH_UPDATE_VMSA = 0x032
    LAUNCH_MEASURE = 0x033
    LAUNCH_SECRET = 0x034  # LAUNCH_UPDATE_SECRET in Linux
    LAUNCH_FINISH = 0x035
    ATTESTATION = 0x036
    SEND_START = 0x040
    SEND_UPDATE_DATA = 0x041
    SEND_UPDATE_VMSA = 0x042
    SEND_FINISH = 0x043
    SEND_CANCEL = 0x044
    RECEIVE_START = 0x050
    RECEIVE_UPDATE_DATA = 0x051
    RECEIVE_UPDATE_VMSA = 0x052
    RECEIVE_FINISH = 0x053
    DBG_DECRYPT = 0x060
    DBG_ENCRYPT = 0x061


class PlatformState(IntEnum):
    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(IntEnum):
    """Firmware numbering; the SEV spec calls INVALID "UNINIT"."""

    INVALID = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


_ANY_PLATFORM: Final = frozenset(PlatformState)
_INIT_OR_WORKING: Final = frozenset({PlatformState.INIT, PlatformState.WORKING})
_WORKING: Final = frozenset({PlatformState.WORKING})

PLATFORM_STATES: Final[Mapping[SevCommand, frozenset[PlatformState]]] = {
    SevCommand.INIT: frozenset({PlatformState.UNINIT}),
    SevCommand.SHUTDOWN: _ANY_PLATFORM,
    SevCommand.PLATFORM_STATUS: _ANY_PLATFORM,
    SevCommand.PDH_CERT_EXPORT: _INIT_OR_WORKING,
    SevCommand.DF_FLUSH: _ANY_PLATFORM,  # the firmware checks WBINVD, not the state
    SevCommand.DECOMMISSION: _WORKING,
    SevCommand.ACTIVATE: _WORKING,
    SevCommand.DEACTIVATE: _WORKING,
    SevCommand.GUEST_STATUS: _INIT_OR_WORKING,
    SevCommand.LAUNCH_START: _INIT_OR_WORKING,
    SevCommand.LAUNCH_UPDATE_DATA: _WORKING,
    SevCommand.LAUNCH_UPDATE_VMSA: _WORKING,
    SevCommand.LAUNCH_MEASURE: _WORKING,
    SevCommand.LAUNCH_SECRET: _WORKING,
    SevCommand.LAUNCH_FINISH: _WORKING,
    SevCommand.SEND_START: _WORKING,
    SevCommand.SEND_UPDATE_DATA: _WORKING,
    SevCommand.SEND_UPDATE_VMSA: _WORKING,
    SevCommand.SEND_FINISH: _WORKING,
    SevCommand.SEND_CANCEL: _WORKING,
    SevCommand.RECEIVE_START: _INIT_OR_WORKING,
    SevCommand.RECEIVE_UPDATE_DATA: _WORKING,
    SevCommand.RECEIVE_UPDATE_VMSA: _WORKING,
    SevCommand.RECEIVE_FINISH: _WORKING,
    SevCommand.DBG_DECRYPT: _WORKING,
    SevCommand.DBG_ENCRYPT: _WORKING,
}

_VALID_GUEST: Final = frozenset(GuestState) - {GuestState.INVALID}

GUEST_STATES: Final[Mapping[SevCommand, frozenset[GuestState]]] = {
    SevCommand.LAUNCH_UPDATE_DATA: frozenset({GuestState.LUPDATE}),
    SevCommand.LAUNCH_UPDATE_VMSA: frozenset({GuestState.LUPDATE}),
    SevCommand.LAUNCH_MEASURE: frozenset({GuestState.LUPDATE}),
    SevCommand.LAUNCH_SECRET: frozenset({GuestState.LSECRET}),
    SevCommand.LAUNCH_FINISH: frozenset({GuestState.LSECRET}),
    SevCommand.ACTIVATE: _VALID_GUEST - {GuestState.SENT},
    SevCommand.DEACTIVATE: _VALID_GUEST,
    SevCommand.DECOMMISSION: _VALID_GUEST,
    SevCommand.GUEST_STATUS: _VALID_GUEST,
    SevCommand.DBG_DECRYPT: _VALID_GUEST,
    SevCommand.DBG_ENCRYPT: _VALID_GUEST,
    SevCommand.SEND_START: frozenset({GuestState.RUNNING}),
    SevCommand.SEND_UPDATE_DATA: frozenset({GuestState.SUPDATE}),
    SevCommand.SEND_UPDATE_VMSA: frozenset({GuestState.SUPDATE}),
    SevCommand.SEND_FINISH: frozenset({GuestState.SUPDATE}),
    SevCommand.SEND_CANCEL: frozenset({GuestState.SUPDATE}),
    SevCommand.RECEIVE_UPDATE_DATA: frozenset({GuestState.RUPDATE}),
    SevCommand.RECEIVE_UPDATE_VMSA: frozenset({GuestState.RUPDATE}),
    SevCommand.RECEIVE_FINISH: frozenset({GuestState.RUPDATE}),
}

GUEST_TRANSITIONS: Final[Mapping[tuple[GuestState, SevCommand], GuestState]] = {
    (GuestState.INVALID, SevCommand.LAUNCH_START): GuestState.LUPDATE,
    (GuestState.LUPDATE, SevCommand.LAUNCH_MEASURE): GuestState.LSECRET,
    (GuestState.LSECRET, SevCommand.LAUNCH_FINISH): GuestState.RUNNING,
    (GuestState.RUNNING, SevCommand.SEND_START): GuestState.SUPDATE,
    (GuestState.SUPDATE, SevCommand.SEND_FINISH): GuestState.SENT,
    (GuestState.SUPDATE, SevCommand.SEND_CANCEL): GuestState.RUNNING,
    (GuestState.INVALID, SevCommand.RECEIVE_START): GuestState.RUPDATE,
    (GuestState.RUPDATE, SevCommand.RECEIVE_FINISH): GuestState.RUNNING,
    **{(state, SevCommand.DECOMMISSION): GuestState.INVALID for state in _VALID_GUEST},
}

PLATFORM_TRANSITIONS: Final[Mapping[tuple[PlatformState, SevCommand], PlatformState]] = {
    (PlatformState.UNINIT, SevCommand.INIT): PlatformState.INIT,
    **{(state, SevCommand.SHUTDOWN): PlatformState.UNINIT for state in PlatformState},
    # DECOMMISSION moves the platform back only when the last guest goes.
    (PlatformState.WORKING, SevCommand.DECOMMISSION): PlatformState.INIT,
    (PlatformState.INIT, SevCommand.LAUNCH_START): PlatformState.WORKING,
    (PlatformState.WORKING, SevCommand.LAUNCH_START): PlatformState.WORKING,
    (PlatformState.INIT, SevCommand.RECEIVE_START): PlatformState.WORKING,
    (PlatformState.WORKING, SevCommand.RECEIVE_START): PlatformState.WORKING,
}


def require_platform_state(command: SevCommand, state: PlatformState) -> None:
    if state not in PLATFORM_STATES[command]:
        raise SevError(SevStatus.INVALID_PLATFORM_STATE)


def require_guest_state(command: SevCommand, state: GuestState) -> None:
    if state not in GUEST_STATES[command]:
        raise SevError(SevStatus.INVALID_GUEST_STATE)


def next_guest_state(state: GuestState, command: SevCommand) -> GuestState:
    try:
        return GUEST_TRANSITIONS[(state, command)]
    except KeyError:
        raise SevError(SevStatus.INVALID_GUEST_STATE) from None


def next_platform_state(state: PlatformState, command: SevCommand) -> PlatformState:
    try:
        return PLATFORM_TRANSITIONS[(state, command)]
    except KeyError:
        raise SevError(SevStatus.INVALID_PLATFORM_STATE) from None
