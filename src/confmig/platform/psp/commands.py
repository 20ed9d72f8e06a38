"""Typed command buffers: one request (and, where the firmware writes results, one response) per command.

Fields follow the firmware's command buffers (AMD firmware ``sev_mcmd.h``)
with two translations:

* a buffer the host passes by address and length (certificates, sessions,
  packet headers, transport data, measurement output) is carried as ``bytes``;
  where the firmware checks the length the host declared (``measure_len``,
  ``pdh_cert_len``, ``certs_len``) the field is kept, so length queries
  behave as on hardware;
* guest memory is named by system physical address (:class:`Spa`) and
  length, and reached through the :mod:`memory port <confmig.platform.psp.memory>`.

Requests that the firmware answers with nothing but a status return ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confmig.common.units import Spa
from confmig.platform.psp.handles import Asid, GuestHandle
from confmig.platform.psp.session import SESSION_SIZE
from confmig.platform.psp.states import GuestState, PlatformState

INIT_FLAG_ES = 0x1  # SEV_CONFIG_ES_FLAG
_NO_ADDRESS = Spa(0)
_NEW_GUEST = GuestHandle(0)


# -- platform commands ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InitRequest:
    flags: int = 0
    """Bit 0: enable SEV-ES (needs a TMR). Other bits must be zero."""
    tmr_paddr: Spa = _NO_ADDRESS
    tmr_length: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownRequest:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformStatusRequest:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformStatus:
    api_major: int
    api_minor: int
    build: int
    state: PlatformState
    owned: bool
    """Platform flag bit 0: the OCA was imported (PEK_CERT_IMPORT); always False here."""
    config_es: bool
    guest_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PdhCertExportRequest:
    pdh_cert_len: int
    certs_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PdhCertExportResponse:
    pdh_cert: bytes = field(repr=False)
    cert_chain: bytes = field(repr=False)
    """PEK || OCA || CEK."""
    pdh_cert_len: int
    certs_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DfFlushRequest:
    pass


# -- guest commands -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DecommissionRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivateRequest:
    handle: GuestHandle
    asid: Asid


@dataclass(frozen=True, slots=True, kw_only=True)
class DeactivateRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestStatusRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestStatus:
    handle: GuestHandle
    policy: int
    asid: Asid
    state: GuestState


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchStartRequest:
    policy: int
    handle: GuestHandle = _NEW_GUEST
    """0: draw a new VEK. Otherwise share that guest's VEK (refused under NOKS)."""
    dh_cert: bytes | None = field(default=None, repr=False)
    """The guest owner's PDH certificate; None launches without an owner channel."""
    session: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchStartResponse:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchUpdateDataRequest:
    handle: GuestHandle
    paddr: Spa
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchUpdateVmsaRequest:
    handle: GuestHandle
    paddr: Spa
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchMeasureRequest:
    handle: GuestHandle
    measure_len: int = 48


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchMeasureResponse:
    measurement: bytes
    """MEASURE (32) || MNONCE (16); empty on a length query."""
    measure_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchSecretRequest:
    handle: GuestHandle
    hdr: bytes
    guest_paddr: Spa
    guest_len: int
    trans: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchFinishRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class DbgDecryptRequest:
    handle: GuestHandle
    src_paddr: Spa
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DbgDecryptResponse:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class DbgEncryptRequest:
    handle: GuestHandle
    dst_paddr: Spa
    data: bytes = field(repr=False)


# -- migration ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendStartRequest:
    handle: GuestHandle
    pdh_cert: bytes = field(repr=False)
    """The *receiver's* PDH certificate (2084 bytes)."""
    plat_certs: bytes = field(default=b"", repr=False)
    """The receiver's PEK || OCA || CEK; checked only under the SEV or DOMAIN policy bit."""
    amd_certs: bytes = field(default=b"", repr=False)
    """ASK || ARK in AMD's format; checked only under the SEV policy bit."""
    session_len: int = SESSION_SIZE
    """The size of the host's session buffer: anything but 128 is answered with the length."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SendStartResponse:
    policy: int
    """The guest's policy, for the receiver's RECEIVE_START (its MAC is in the session)."""
    session: bytes = field(repr=False)
    """The 128-byte session blob for the receiver; empty on a length query."""
    session_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUpdateDataRequest:
    handle: GuestHandle
    hdr_len: int
    """The size of the host's header buffer: below 52 is answered with the length."""
    guest_paddr: Spa
    guest_len: int
    trans_len: int
    """The size of the host's transport buffer (at least ``guest_len``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUpdateVmsaRequest:
    handle: GuestHandle
    hdr_len: int
    guest_paddr: Spa
    """The system physical address of the vCPU's VMSA page."""
    guest_len: int
    trans_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUpdateResponse:
    """What SEND_UPDATE_DATA and SEND_UPDATE_VMSA write: the packet, and the header length."""

    hdr: bytes
    """The 52-byte packet header; empty on a length query."""
    trans: bytes = field(repr=False)
    """``guest_len`` bytes of ciphertext under the TEK."""
    hdr_len: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendFinishRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class SendCancelRequest:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveStartRequest:
    policy: int
    """The guest's policy as the sender reported it; the session's POLICY_MAC must cover it."""
    pdh_cert: bytes = field(repr=False)
    """The *sender's* PDH certificate (2084 bytes)."""
    session: bytes = field(repr=False)
    handle: GuestHandle = _NEW_GUEST
    """0: draw a new VEK. Otherwise share that guest's VEK (refused under NOKS)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveStartResponse:
    handle: GuestHandle


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveUpdateDataRequest:
    handle: GuestHandle
    hdr: bytes
    guest_paddr: Spa
    guest_len: int
    trans: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveUpdateVmsaRequest:
    handle: GuestHandle
    hdr: bytes
    guest_paddr: Spa
    """The system physical address of the vCPU's VMSA page on this host."""
    guest_len: int
    trans: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveFinishRequest:
    handle: GuestHandle


SevRequest = (
    InitRequest
    | ShutdownRequest
    | PlatformStatusRequest
    | PdhCertExportRequest
    | DfFlushRequest
    | DecommissionRequest
    | ActivateRequest
    | DeactivateRequest
    | GuestStatusRequest
    | LaunchStartRequest
    | LaunchUpdateDataRequest
    | LaunchUpdateVmsaRequest
    | LaunchMeasureRequest
    | LaunchSecretRequest
    | LaunchFinishRequest
    | DbgDecryptRequest
    | DbgEncryptRequest
    | SendStartRequest
    | SendUpdateDataRequest
    | SendUpdateVmsaRequest
    | SendFinishRequest
    | SendCancelRequest
    | ReceiveStartRequest
    | ReceiveUpdateDataRequest
    | ReceiveUpdateVmsaRequest
    | ReceiveFinishRequest
)

SevResponse = (
    PlatformStatus
    | PdhCertExportResponse
    | GuestStatus
    | LaunchStartResponse
    | LaunchMeasureResponse
    | DbgDecryptResponse
    | SendStartResponse
    | SendUpdateResponse
    | ReceiveStartResponse
    | None
)
