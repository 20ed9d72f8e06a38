"""The emulated AMD Secure Processor: the SEV firmware's commands, checks and state.

Each command performs its checks in the order of AMD's firmware
(``sev_mcmd.c``, Genoa 1.55.25) and fails with the same status code at the
first check that fails, as :class:`~confmig.platform.psp.status.SevError`.
The order matters to callers: KVM reports the *first* failing status, and
QEMU's length queries rely on a length check coming before others.

Commands are serialised, as on the single PSP mailbox: one lock around each.

Emulation choices (see ``docs/psp.md``):

* No WBINVD is emulated: DF_FLUSH always succeeds and cleans every dirty ASID.
  ASIDs are otherwise tracked as the firmware does (one CCX): INIT marks them
  all dirty, so the host must DF_FLUSH before the first ACTIVATE, as Linux
  does right after INIT; DEACTIVATE of a guest that ran makes its ASID dirty.
* DEACTIVATE evicts the VEK from the key slot (the firmware leaves it and only
  marks the ASID invalid; an evicted slot is the safer equivalent).
* DBG_DECRYPT returns the plaintext and DBG_ENCRYPT takes it, instead of
  reading or writing a host buffer by address; both are bounded to
  :data:`DBG_MAX_LENGTH` (the firmware loops over any length).
* Migration (SEND_*, RECEIVE_*) follows the firmware, weaknesses included:
  a packet's MAC binds its flags, IV, lengths and ciphertext but not the
  guest address it belongs to, and nothing checks sequence or duplicates, so
  within one migration the host can replay or reorder packets. Packets of
  another migration fail the MAC: each SEND_START draws a fresh TEK and TIK.
* SEND/RECEIVE_UPDATE_VMSA take exactly one 4 KiB VMSA page (the firmware's
  length limit is its scratch buffer; a VMSA is one page).
* The cores VMRUN an SEV ASID only while the guest on it is activated and
  RUNNING or SUPDATE (:data:`RUNNABLE_STATES`); the PSP tells them in the
  ASID's key slot. The firmware marks the ASID valid on the cores at the end of
  the launch or receive; that SEND_FINISH takes the mark back is ours.
* Time: :class:`~confmig.platform.psp.cost.PspCostModel` (off by default)
  adds a stated per-command latency and data bandwidth.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from confmig.common.units import Spa
from confmig.platform.psp.amd_cert import split_amd_chain
from confmig.platform.psp.cert import SEV_CERT_SIZE, CertAlgo, CertUsage, SevCertificate, sanity_check
from confmig.platform.psp.chain import PLATFORM_CHAIN_SIZE, verify_domain_chain, verify_sev_chain
from confmig.platform.psp.commands import (
    INIT_FLAG_ES,
    ActivateRequest,
    DbgDecryptRequest,
    DbgDecryptResponse,
    DbgEncryptRequest,
    DeactivateRequest,
    DecommissionRequest,
    DfFlushRequest,
    GuestStatus,
    GuestStatusRequest,
    InitRequest,
    LaunchFinishRequest,
    LaunchMeasureRequest,
    LaunchMeasureResponse,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchStartResponse,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExportRequest,
    PdhCertExportResponse,
    PlatformStatus,
    PlatformStatusRequest,
    ReceiveFinishRequest,
    ReceiveStartRequest,
    ReceiveStartResponse,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendCancelRequest,
    SendFinishRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateResponse,
    SendUpdateVmsaRequest,
    SevRequest,
    SevResponse,
    ShutdownRequest,
)
from confmig.platform.psp.cost import NO_COST, PspCostModel
from confmig.platform.psp.guest import GuestContext
from confmig.platform.psp.handles import GUEST_HANDLE_MAX, GUEST_HANDLE_MIN, Asid, GuestHandle
from confmig.platform.psp.identity import PlatformIdentity
from confmig.platform.psp.kdf import derive_master_secret
from confmig.platform.psp.keystore import VEK_SIZE, KeySlotWriter
from confmig.platform.psp.measure import MEASUREMENT_SIZE, MNONCE_SIZE, LaunchMeasurement, compute_measure
from confmig.platform.psp.memory import GuestMemoryPort, SpaOutOfRange
from confmig.platform.psp.packet import (
    IV_SIZE,
    PACKET_HEADER_SIZE,
    ChannelContext,
    PacketFlags,
    PacketHeader,
    open_packet,
    seal_packet,
)
from confmig.platform.psp.policy import GuestPolicy, PolicyFlag
from confmig.platform.psp.secret import Secret
from confmig.platform.psp.session import (
    NONCE_SIZE,
    SESSION_SIZE,
    TEK_SIZE,
    TIK_SIZE,
    WRAP_IV_SIZE,
    SessionBlob,
    TransportKeys,
    unwrap_session,
    verify_policy_mac,
    wrap_session,
)
from confmig.platform.psp.states import (
    GuestState,
    PlatformState,
    SevCommand,
    next_guest_state,
    next_platform_state,
    require_guest_state,
    require_platform_state,
)
from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import DEFAULT_FIRMWARE, FirmwareVersion
from confmig.platform.psp.vmsa import (
    TMR_ALIGN,
    TMR_SIZE,
    VMSA_CRC_PADDR_OFFSET,
    VMSA_SIZE,
    TmrCrcPool,
    TmrMemory,
    seal_vmsa,
    vmsa_crc,
)

SCRATCH_LEN: Final = 0x5000
"""The firmware's scratch buffer: the most one LAUNCH_SECRET (or SEND/RECEIVE) packet may carry."""
DBG_MAX_LENGTH: Final = 1 << 20
"""Our bound on one DBG_DECRYPT/DBG_ENCRYPT (the firmware has none; KVM issues one page at a time)."""

Rng = Callable[[int], bytes]
Sleep = Callable[[float], None]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _aligned16(value: int) -> bool:
    return value % 16 == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PspConfig:
    firmware: FirmwareVersion = DEFAULT_FIRMWARE
    max_asid: int = 509
    """Number of ASIDs (CPUID 0x8000001F ECX): 509 as on Rome/Milan, and the engine's key slots."""
    min_sev_asid: int = 1
    """ASIDs below this are for SEV-ES guests only (CPUID 0x8000001F EDX; the BIOS's
    "SEV-ES ASID space limit"). The default 1 leaves no ASID for SEV-ES, as the usual
    BIOS default does: raise it to run SEV-ES guests, and have KVM allocate SEV-ES
    ASIDs below it and SEV ASIDs from it up, as Linux's ``sev_asid_new`` does."""
    cost: PspCostModel = NO_COST
    """How long commands take (off by default; see :mod:`confmig.platform.psp.cost`)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_sev_asid <= self.max_asid:
            raise ValueError("need 1 <= min_sev_asid <= max_asid")


RUNNABLE_STATES: Final = frozenset({GuestState.RUNNING, GuestState.SUPDATE})
"""The states in which an activated guest may run: launched or received, and not yet sent.
Never while the firmware still builds its memory (LUPDATE, LSECRET, RUPDATE), nor once SENT:
its memory now belongs to the guest on the target, and running both would fork it."""


class AsidState(Enum):
    """The firmware's per-ASID bookkeeping (one CCX)."""

    DIRTY = "dirty"  # may hold stale cache lines: DF_FLUSH before reuse
    CLEAN = "clean"
    ALLOCATED = "allocated"  # bound to a guest pending activation
    IN_USE = "in-use"  # bound to a guest that is running


def _serialised(
    method: Callable[Concatenate[SecureProcessor, _P], _R],
) -> Callable[Concatenate[SecureProcessor, _P], _R]:
    def run(self: SecureProcessor, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            outermost = self._data_bytes is None
            if outermost:
                self._data_bytes = 0
            try:
                return method(self, *args, **kwargs)
            finally:
                if outermost:
                    data_bytes, self._data_bytes = self._data_bytes or 0, None
                    self._charge(data_bytes)  # busy while it "works": other callers wait

    run.__name__ = method.__name__
    run.__qualname__ = method.__qualname__
    run.__doc__ = method.__doc__
    return run


class SecureProcessor(Secret):
    """One host's PSP running the SEV firmware.

    ``memory`` reaches guest memory by system physical address; ``keys`` are
    the memory controller's key slots, which the engine behind ``memory`` reads;
    ``tmr`` is the SEV-ES TMR's memory, shared with the cores that keep the VMSA
    checksums current (a private one if not given).
    """

    def __init__(
        self,
        identity: PlatformIdentity,
        *,
        memory: GuestMemoryPort,
        keys: KeySlotWriter,
        config: PspConfig = PspConfig(),
        rng: Rng = os.urandom,
        sleep: Sleep = time.sleep,
        tmr: TmrMemory | None = None,
    ) -> None:
        self._identity = identity
        self._tmr_memory = tmr
        self._memory = memory
        self._keys = keys
        self._config = config
        self._rng = rng
        self._sleep = sleep
        self._lock = threading.RLock()
        self._data_bytes: int | None = None  # guest data the running command processed (cost model)
        self._state = PlatformState.UNINIT
        self._config_es = False
        self._tmr_base = Spa(0)
        self._tmr: TmrCrcPool | None = None
        self._guests: dict[GuestHandle, GuestContext] = {}
        self._asids: dict[Asid, AsidState] = {}
        self._handlers: dict[SevCommand, tuple[type, Callable[[Any], SevResponse]]] = {
            SevCommand.INIT: (InitRequest, self.init),
            SevCommand.SHUTDOWN: (ShutdownRequest, self.shutdown),
            SevCommand.PLATFORM_STATUS: (PlatformStatusRequest, self.platform_status),
            SevCommand.PDH_CERT_EXPORT: (PdhCertExportRequest, self.pdh_cert_export),
            SevCommand.DF_FLUSH: (DfFlushRequest, self.df_flush),
            SevCommand.DECOMMISSION: (DecommissionRequest, self.decommission),
            SevCommand.ACTIVATE: (ActivateRequest, self.activate),
            SevCommand.DEACTIVATE: (DeactivateRequest, self.deactivate),
            SevCommand.GUEST_STATUS: (GuestStatusRequest, self.guest_status),
            SevCommand.LAUNCH_START: (LaunchStartRequest, self.launch_start),
            SevCommand.LAUNCH_UPDATE_DATA: (LaunchUpdateDataRequest, self.launch_update_data),
            SevCommand.LAUNCH_UPDATE_VMSA: (LaunchUpdateVmsaRequest, self.launch_update_vmsa),
            SevCommand.LAUNCH_MEASURE: (LaunchMeasureRequest, self.launch_measure),
            SevCommand.LAUNCH_SECRET: (LaunchSecretRequest, self.launch_secret),
            SevCommand.LAUNCH_FINISH: (LaunchFinishRequest, self.launch_finish),
            SevCommand.DBG_DECRYPT: (DbgDecryptRequest, self.dbg_decrypt),
            SevCommand.DBG_ENCRYPT: (DbgEncryptRequest, self.dbg_encrypt),
            SevCommand.SEND_START: (SendStartRequest, self.send_start),
            SevCommand.SEND_UPDATE_DATA: (SendUpdateDataRequest, self.send_update_data),
            SevCommand.SEND_UPDATE_VMSA: (SendUpdateVmsaRequest, self.send_update_vmsa),
            SevCommand.SEND_FINISH: (SendFinishRequest, self.send_finish),
            SevCommand.SEND_CANCEL: (SendCancelRequest, self.send_cancel),
            SevCommand.RECEIVE_START: (ReceiveStartRequest, self.receive_start),
            SevCommand.RECEIVE_UPDATE_DATA: (ReceiveUpdateDataRequest, self.receive_update_data),
            SevCommand.RECEIVE_UPDATE_VMSA: (ReceiveUpdateVmsaRequest, self.receive_update_vmsa),
            SevCommand.RECEIVE_FINISH: (ReceiveFinishRequest, self.receive_finish),
        }

    # -- dispatch -----------------------------------------------------------

    def execute(self, command: int, request: SevRequest) -> SevResponse:
        """Run the command with mailbox id ``command`` (a :class:`SevCommand` value).

        Unknown and not (yet) emulated ids fail with ``INVALID_COMMAND``.
        """
        try:
            request_type, handler = self._handlers[SevCommand(command)]
        except (ValueError, KeyError):
            raise SevError(SevStatus.INVALID_COMMAND) from None
        if not isinstance(request, request_type):
            raise TypeError(f"{SevCommand(command).name} takes {request_type.__name__}")
        return handler(request)

    @property
    def firmware(self) -> FirmwareVersion:
        return self._config.firmware

    # -- helpers --------------------------------------------------------------

    def _require_platform(self, command: SevCommand) -> None:
        require_platform_state(command, self._state)

    def _guest(self, handle: int) -> GuestContext:
        """The guest with this handle; ``INVALID_GUEST`` if there is none (``handle_is_valid``)."""
        guest = self._guests.get(GuestHandle(handle))
        if guest is None:
            raise SevError(SevStatus.INVALID_GUEST)
        return guest

    def _asid_state(self, asid: Asid) -> AsidState | None:
        return self._asids.get(asid)

    def _charge(self, data_bytes: int) -> None:
        cost = self._config.cost
        if cost.enabled:
            self._sleep(cost.cost(data_bytes))

    def _processed(self, data_bytes: int) -> None:
        """Account guest data the running command en/decrypted or measured (for the cost model)."""
        if self._data_bytes is not None:
            self._data_bytes += data_bytes

    def _read(self, spa: Spa, size: int) -> bytes:
        try:
            return self._memory.read(spa, size)
        except SpaOutOfRange:
            raise SevError(SevStatus.INVALID_ADDRESS) from None

    def _read_encrypted(self, asid: Asid, spa: Spa, size: int) -> bytes:
        try:
            return self._memory.read_encrypted(asid, spa, size)
        except SpaOutOfRange:
            raise SevError(SevStatus.INVALID_ADDRESS) from None

    def _write_encrypted(self, asid: Asid, spa: Spa, data: bytes) -> None:
        try:
            self._memory.write_encrypted(asid, spa, data)
        except SpaOutOfRange:
            raise SevError(SevStatus.INVALID_ADDRESS) from None

    # -- platform commands ------------------------------------------------------

    @_serialised
    def init(self, request: InitRequest) -> None:
        self._require_platform(SevCommand.INIT)
        if request.flags & ~INIT_FLAG_ES:
            raise SevError(SevStatus.INVALID_CONFIG)
        es = bool(request.flags & INIT_FLAG_ES)
        if es:
            if request.tmr_paddr % TMR_ALIGN:
                raise SevError(SevStatus.INVALID_ADDRESS)
            if request.tmr_length != TMR_SIZE:
                raise SevError(SevStatus.INVALID_LEN)
        # Every ASID starts dirty: the host must DF_FLUSH before the first ACTIVATE.
        self._asids = {Asid(a): AsidState.DIRTY for a in range(1, self._config.max_asid + 1)}
        self._config_es = es
        self._tmr_base = request.tmr_paddr if es else Spa(0)
        self._state = next_platform_state(self._state, SevCommand.INIT)

    @_serialised
    def shutdown(self, request: ShutdownRequest) -> None:
        self._state = next_platform_state(self._state, SevCommand.SHUTDOWN)
        for guest in self._guests.values():
            if not guest.inactive:
                self._keys.clear(guest.asid)
        self._guests.clear()  # every SEV guest is decommissioned
        self._asids.clear()
        self._config_es = False
        self._tmr = None
        if self._tmr_memory is not None:
            self._tmr_memory.reset(None)  # every CRC block is gone with its guest
        self._tmr_base = Spa(0)

    @_serialised
    def platform_status(self, request: PlatformStatusRequest) -> PlatformStatus:
        initialised = self._state is not PlatformState.UNINIT
        return PlatformStatus(
            api_major=self.firmware.api_major,
            api_minor=self.firmware.api_minor,
            build=self.firmware.build,
            state=self._state,
            owned=False,
            config_es=self._config_es and initialised,
            guest_count=len(self._guests) if initialised else 0,
        )

    @_serialised
    def pdh_cert_export(self, request: PdhCertExportRequest) -> PdhCertExportResponse:
        self._require_platform(SevCommand.PDH_CERT_EXPORT)
        if request.pdh_cert_len < SEV_CERT_SIZE or request.certs_len < PLATFORM_CHAIN_SIZE:
            raise SevError(
                SevStatus.INVALID_LEN,
                output=PdhCertExportResponse(
                    pdh_cert=b"", cert_chain=b"", pdh_cert_len=SEV_CERT_SIZE, certs_len=PLATFORM_CHAIN_SIZE
                ),
            )
        certs = self._identity.certificates
        return PdhCertExportResponse(
            pdh_cert=certs.pdh.to_bytes(),
            cert_chain=certs.platform_chain(),
            pdh_cert_len=SEV_CERT_SIZE,
            certs_len=PLATFORM_CHAIN_SIZE,
        )

    @_serialised
    def df_flush(self, request: DfFlushRequest) -> None:
        # WBINVD is not emulated: every core counts as flushed, so every dirty ASID becomes clean.
        for asid, state in self._asids.items():
            if state is AsidState.DIRTY:
                self._asids[asid] = AsidState.CLEAN
        if self._state is not PlatformState.UNINIT and self._config_es and self._tmr is None:
            if self._tmr_memory is None:
                self._tmr_memory = TmrMemory()
            self._tmr = TmrCrcPool(self._tmr_base, self._tmr_memory)

    # -- guest management -------------------------------------------------------

    @_serialised
    def decommission(self, request: DecommissionRequest) -> None:
        self._require_platform(SevCommand.DECOMMISSION)
        guest = self._guest(request.handle)
        if guest.asid and self._asid_state(guest.asid) in (
            AsidState.IN_USE,
            AsidState.DIRTY,
            AsidState.ALLOCATED,
        ):
            raise SevError(SevStatus.ACTIVE)
        if self._tmr is not None:
            for block in guest.vmsa_crc_blocks:
                self._tmr.free(block)
        guest.state = next_guest_state(guest.state, SevCommand.DECOMMISSION)
        del self._guests[guest.handle]
        if not self._guests:
            self._state = next_platform_state(self._state, SevCommand.DECOMMISSION)

    @_serialised
    def activate(self, request: ActivateRequest) -> None:
        self._require_platform(SevCommand.ACTIVATE)
        guest = self._guest(request.handle)
        asid = request.asid
        if not 1 <= asid <= self._config.max_asid:
            raise SevError(SevStatus.INVALID_ASID)
        if self._asid_state(asid) in (AsidState.IN_USE, AsidState.ALLOCATED):
            raise SevError(SevStatus.ASID_OWNED)
        if not guest.inactive:
            raise SevError(SevStatus.ACTIVE)
        require_guest_state(SevCommand.ACTIVATE, guest.state)  # SENT is refused
        if self._asid_state(asid) is AsidState.DIRTY:
            raise SevError(SevStatus.DFFLUSH_REQUIRED)
        if self._asid_state(asid) is not AsidState.CLEAN:
            raise SevError(SevStatus.ASID_OWNED)
        if guest.es:
            if not 1 <= asid < self._config.min_sev_asid:
                raise SevError(SevStatus.INVALID_ASID)
        elif not self._config.min_sev_asid <= asid <= self._config.max_asid:
            raise SevError(SevStatus.INVALID_ASID)
        self._keys.install(asid, guest.vek)
        guest.asid = asid
        if guest.state in RUNNABLE_STATES:
            guest.active = True
            self._asids[asid] = AsidState.IN_USE
        else:
            # Bound, but the cores may not run it before LAUNCH/RECEIVE_FINISH.
            guest.pending = True
            self._asids[asid] = AsidState.ALLOCATED
        self._tell_cores(guest)

    @_serialised
    def deactivate(self, request: DeactivateRequest) -> None:
        self._require_platform(SevCommand.DEACTIVATE)
        guest = self._guest(request.handle)
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        asid = guest.asid
        if self._asid_state(asid) is AsidState.IN_USE:
            self._asids[asid] = AsidState.DIRTY  # it ran: caches may hold its lines
        elif self._asid_state(asid) is AsidState.ALLOCATED:
            self._asids[asid] = AsidState.CLEAN
        self._keys.clear(asid)
        guest.asid = Asid(0)
        guest.active = guest.pending = False

    @_serialised
    def guest_status(self, request: GuestStatusRequest) -> GuestStatus:
        self._require_platform(SevCommand.GUEST_STATUS)
        guest = self._guests.get(request.handle)
        if guest is None:
            # Not an error: the firmware reports the handle as INVALID.
            return GuestStatus(handle=request.handle, policy=0, asid=Asid(0), state=GuestState.INVALID)
        return GuestStatus(
            handle=guest.handle,
            policy=guest.policy,
            asid=guest.asid if not guest.inactive else Asid(0),
            state=guest.state,
        )

    # -- launch -----------------------------------------------------------------

    def _check_local_pdh(self) -> None:
        if self._identity.pdh_usage != CertUsage.PDH or self._identity.pdh_algo not in (
            CertAlgo.ECDH_SHA256,
            CertAlgo.ECDH_SHA384,
        ):
            raise SevError(SevStatus.INVALID_CERTIFICATE)

    @staticmethod
    def _peer_pdh(pdh_cert: bytes) -> ec.EllipticCurvePublicKey:
        """The public key of a peer's PDH, after the firmware's sanity check (INVALID_CERTIFICATE)."""
        cert = SevCertificate.from_bytes(pdh_cert)
        sanity_check(cert, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256)
        peer = cert.public_key().key
        assert isinstance(peer, ec.EllipticCurvePublicKey)  # sanity_check guarantees an ECDH key
        return peer

    def _open_server_channel(self, *, policy: int, dh_cert: bytes, session: bytes) -> TransportKeys:
        """The firmware's ``sev_channel_open_server`` plus ``sev_guest_verify_policy``
        (LAUNCH_START with an owner, RECEIVE_START)."""
        # SECURITY: dh_cert, session and policy come from the host, unauthenticated until the MACs check.
        if len(session) != SESSION_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        if len(dh_cert) != SEV_CERT_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        self._check_local_pdh()
        peer = self._peer_pdh(dh_cert)
        blob = SessionBlob.from_bytes(session)
        master = derive_master_secret(self._identity.pdh_shared_secret(peer), blob.nonce)
        keys = unwrap_session(master_secret=master, blob=blob)
        verify_policy_mac(keys, policy, blob)
        GuestPolicy.from_u32(policy).check(self.firmware)
        return keys

    def _open_client_channel(self, *, policy: int, pdh_cert: bytes) -> tuple[TransportKeys, SessionBlob]:
        """The firmware's ``sev_channel_open_client`` (SEND_START): fresh TEK and TIK, wrapped
        for the receiver's PDH."""
        self._check_local_pdh()
        # SECURITY: the receiver's PDH comes from the host; under neither the SEV nor the DOMAIN
        # bit only this sanity check stands between the guest's keys and whoever holds it.
        peer = self._peer_pdh(pdh_cert)
        keys = TransportKeys(tek=self._rng(TEK_SIZE), tik=self._rng(TIK_SIZE))
        nonce = self._rng(NONCE_SIZE)
        master = derive_master_secret(self._identity.pdh_shared_secret(peer), nonce)
        blob = wrap_session(
            master_secret=master, keys=keys, policy=policy, nonce=nonce, wrap_iv=self._rng(WRAP_IV_SIZE)
        )
        return keys, blob

    def _guest_key(self, handle: GuestHandle, policy: int) -> bytes:
        """A new VEK (handle 0), or the VEK of the guest ``handle`` to share (LAUNCH/RECEIVE_START)."""
        if handle == 0:
            return self._rng(VEK_SIZE)
        shared = self._guest(handle)
        if policy != shared.policy or PolicyFlag.NOKS in GuestPolicy.from_u32(shared.policy):
            raise SevError(SevStatus.POLICY_FAILURE)
        return shared.vek

    def _free_handle(self) -> GuestHandle:
        for handle in range(GUEST_HANDLE_MIN, GUEST_HANDLE_MAX + 1):
            if handle not in self._guests:
                return GuestHandle(handle)
        raise SevError(SevStatus.RESOURCE_LIMIT)

    @_serialised
    def launch_start(self, request: LaunchStartRequest) -> LaunchStartResponse:
        self._require_platform(SevCommand.LAUNCH_START)
        # Without an owner certificate the firmware keeps a zeroed channel.
        if request.dh_cert is None:
            channel = TransportKeys.zero()
        else:
            channel = self._open_server_channel(
                policy=request.policy, dh_cert=request.dh_cert, session=request.session or b""
            )
        return LaunchStartResponse(
            handle=self._new_guest(SevCommand.LAUNCH_START, request.handle, request.policy, channel))

    def _new_guest(self, command: SevCommand, handle: GuestHandle, policy: int,
                   channel: TransportKeys) -> GuestHandle:
        """LAUNCH_START's and RECEIVE_START's common tail: the guest's key (new, or shared with
        ``handle``'s), a new handle, the guest and platform state changes."""
        vek = self._guest_key(handle, policy)
        new = self._free_handle()
        guest = GuestContext(handle=new, policy=policy, vek=vek, channel=channel)
        if guest.es and not self._config_es:
            raise SevError(SevStatus.UNSUPPORTED)
        guest.state = next_guest_state(guest.state, command)
        self._state = next_platform_state(self._state, command)
        self._guests[new] = guest
        return new

    def _launch_update_checks(
        self, command: SevCommand, handle: GuestHandle, paddr: Spa, length: int
    ) -> GuestContext:
        self._require_platform(command)
        guest = self._guest(handle)
        require_guest_state(command, guest.state)
        if command is SevCommand.LAUNCH_UPDATE_VMSA and not guest.es:
            raise SevError(SevStatus.UNSUPPORTED)
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        if not _aligned16(paddr):
            raise SevError(SevStatus.INVALID_ADDRESS)
        if not _aligned16(length) or length == 0:
            raise SevError(SevStatus.INVALID_LEN)
        return guest

    @_serialised
    def launch_update_data(self, request: LaunchUpdateDataRequest) -> None:
        guest = self._launch_update_checks(
            SevCommand.LAUNCH_UPDATE_DATA, request.handle, request.paddr, request.length
        )
        # In scratch-buffer chunks, as the firmware: read plaintext, measure it, write it back encrypted.
        offset = 0
        while offset < request.length:
            size = min(SCRATCH_LEN, request.length - offset)
            spa = Spa(request.paddr + offset)
            chunk = self._read(spa, size)
            guest.measure(chunk)
            self._write_encrypted(guest.asid, spa, chunk)
            self._processed(size)
            offset += size

    @_serialised
    def launch_update_vmsa(self, request: LaunchUpdateVmsaRequest) -> None:
        if request.length != VMSA_SIZE:
            raise SevError(SevStatus.INVALID_LEN)  # checked before anything else
        guest = self._launch_update_checks(
            SevCommand.LAUNCH_UPDATE_VMSA, request.handle, request.paddr, request.length
        )
        page = self._read(request.paddr, VMSA_SIZE)
        guest.measure(page)  # the VMSA as supplied, before the CRC address goes in
        self._write_encrypted(guest.asid, request.paddr, self._seal_vmsa(guest, page))
        self._processed(VMSA_SIZE)

    def _seal_vmsa(self, guest: GuestContext, page: bytes) -> bytes:
        """``page`` with a new CRC block of this platform's TMR in it, the block holding its
        checksum (RESOURCE_LIMIT when the TMR is full or there is none)."""
        block = self._tmr.allocate() if self._tmr is not None else None
        if block is None or self._tmr is None:
            raise SevError(SevStatus.RESOURCE_LIMIT)
        sealed = seal_vmsa(page, block)
        self._tmr.store(block, vmsa_crc(sealed))
        guest.vmsa_crc_blocks.append(block)
        return sealed

    @_serialised
    def launch_measure(self, request: LaunchMeasureRequest) -> LaunchMeasureResponse:
        self._require_platform(SevCommand.LAUNCH_MEASURE)
        guest = self._guest(request.handle)
        require_guest_state(SevCommand.LAUNCH_MEASURE, guest.state)
        if request.measure_len < MEASUREMENT_SIZE:
            raise SevError(
                SevStatus.INVALID_LEN,
                output=LaunchMeasureResponse(measurement=b"", measure_len=MEASUREMENT_SIZE),
            )
        assert guest.channel is not None
        digest = guest.finish_digest()
        mnonce = self._rng(MNONCE_SIZE)
        measure = compute_measure(
            guest.channel.tik, firmware=self.firmware, policy=guest.policy, digest=digest, mnonce=mnonce
        )
        guest.measurement = measure
        guest.state = next_guest_state(guest.state, SevCommand.LAUNCH_MEASURE)
        blob = LaunchMeasurement(measure=measure, mnonce=mnonce).to_bytes()
        return LaunchMeasureResponse(measurement=blob, measure_len=MEASUREMENT_SIZE)

    @_serialised
    def launch_secret(self, request: LaunchSecretRequest) -> None:
        self._require_platform(SevCommand.LAUNCH_SECRET)
        guest = self._guest(request.handle)
        if not _aligned16(request.guest_paddr):
            raise SevError(SevStatus.INVALID_ADDRESS)
        if (
            len(request.hdr) != PACKET_HEADER_SIZE
            or not _aligned16(request.guest_len)
            or request.guest_len == 0
            or request.guest_len > SCRATCH_LEN
            or request.guest_len != len(request.trans)
        ):
            raise SevError(SevStatus.INVALID_LEN)
        require_guest_state(SevCommand.LAUNCH_SECRET, guest.state)
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        assert guest.channel is not None
        # SECURITY: header and data come from the host; nothing reaches guest memory unless the MAC checks.
        header = PacketHeader.from_bytes(request.hdr)
        secret = open_packet(
            guest.channel,
            header,
            request.trans,
            context=ChannelContext.SECRET,
            uncompressed_len=request.guest_len,
            measurement=guest.measurement,
        )
        if header.flags & PacketFlags.COMPRESSED:
            raise SevError(SevStatus.UNSUPPORTED)
        self._write_encrypted(guest.asid, request.guest_paddr, secret)
        self._processed(len(secret))

    def _tell_cores(self, guest: GuestContext) -> None:
        """After a command that may change whether ``guest`` may run: its key slot says so."""
        if not guest.inactive:
            self._keys.set_runnable(guest.asid, guest.active and guest.state in RUNNABLE_STATES)

    def _complete_activation(self, guest: GuestContext) -> None:
        """LAUNCH_FINISH, RECEIVE_FINISH: an ASID bound while the guest was being built becomes runnable."""
        if guest.pending:
            guest.pending = False
            guest.active = True
            self._asids[guest.asid] = AsidState.IN_USE

    @_serialised
    def launch_finish(self, request: LaunchFinishRequest) -> None:
        self._require_platform(SevCommand.LAUNCH_FINISH)
        guest = self._guest(request.handle)
        require_guest_state(SevCommand.LAUNCH_FINISH, guest.state)
        self._complete_activation(guest)
        guest.channel = None  # the launch channel is closed for good
        guest.measurement = b""
        guest.state = next_guest_state(guest.state, SevCommand.LAUNCH_FINISH)
        self._tell_cores(guest)

    # -- sending ----------------------------------------------------------------

    def _verify_receiver(self, policy: GuestPolicy, request: SendStartRequest) -> None:
        """SEND_START's chain checks: what the guest's policy demands of the receiver."""
        sev, domain = PolicyFlag.SEV in policy, PolicyFlag.DOMAIN in policy
        if not (sev or domain):
            return  # no chain: only the PDH's sanity check, in the channel
        # SECURITY: every certificate here comes from the host, claimed to be the receiver's;
        # only signatures up to our own AMD root (SEV) or our own OCA (DOMAIN) give it weight.
        if len(request.plat_certs) != PLATFORM_CHAIN_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        pdh = SevCertificate.from_bytes(request.pdh_cert)
        pek, oca, cek = (
            SevCertificate.from_bytes(request.plat_certs[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE])
            for i in range(3)
        )
        if sev:
            ask, ark = split_amd_chain(request.amd_certs)
            ours = self._identity.certificates.ark
            verify_sev_chain(
                pdh=pdh, pek=pek, cek=cek, ask=ask, ark=ark, trusted_ark_hash=ours.public_key_hash()
            )
            receiver = FirmwareVersion(api_major=pek.api_major, api_minor=pek.api_minor, build=0)
            if not receiver.supports(policy.api_major, policy.api_minor):
                raise SevError(SevStatus.POLICY_FAILURE)
        if domain:
            verify_domain_chain(pdh=pdh, pek=pek, oca=oca)
            if oca.to_bytes() != self._identity.certificates.oca.to_bytes():
                raise SevError(SevStatus.POLICY_FAILURE)  # another owner's domain

    @_serialised
    def send_start(self, request: SendStartRequest) -> SendStartResponse:
        self._require_platform(SevCommand.SEND_START)
        guest = self._guest(request.handle)
        if request.session_len != SESSION_SIZE:
            # The length query: the firmware writes the size it needs.
            raise SevError(
                SevStatus.INVALID_LEN,
                output=SendStartResponse(policy=0, session=b"", session_len=SESSION_SIZE),
            )
        require_guest_state(SevCommand.SEND_START, guest.state)
        policy = GuestPolicy.from_u32(guest.policy)
        if PolicyFlag.NOSEND in policy:
            raise SevError(SevStatus.POLICY_FAILURE)
        self._verify_receiver(policy, request)
        if len(request.pdh_cert) != SEV_CERT_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        keys, blob = self._open_client_channel(policy=guest.policy, pdh_cert=request.pdh_cert)
        guest.channel = keys
        guest.state = next_guest_state(guest.state, SevCommand.SEND_START)
        return SendStartResponse(policy=guest.policy, session=blob.to_bytes(), session_len=SESSION_SIZE)

    def _send_update(
        self,
        command: SevCommand,
        request: SendUpdateDataRequest | SendUpdateVmsaRequest,
    ) -> SendUpdateResponse:
        """SEND_UPDATE_DATA and SEND_UPDATE_VMSA (the firmware's ``sev_mcmd_send_update``)."""
        vmsa = command is SevCommand.SEND_UPDATE_VMSA
        self._require_platform(command)
        if request.hdr_len < PACKET_HEADER_SIZE:
            # Before the handle: the length query. Only this failure writes hdr_len back.
            raise SevError(
                SevStatus.INVALID_LEN,
                output=SendUpdateResponse(hdr=b"", trans=b"", hdr_len=PACKET_HEADER_SIZE),
            )
        guest = self._guest(request.handle)
        require_guest_state(command, guest.state)
        if vmsa and not guest.es:
            raise SevError(SevStatus.UNSUPPORTED)
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        length = request.guest_len
        if (
            length == 0
            or length > SCRATCH_LEN
            or not _aligned16(length)
            or request.trans_len == 0
            or request.trans_len < length
            or (vmsa and length != VMSA_SIZE)
        ):
            raise SevError(SevStatus.INVALID_LEN)
        if not _aligned16(request.guest_paddr):
            raise SevError(SevStatus.INVALID_ADDRESS)
        # Through the memory controller with the guest's ASID: the engine decrypts under the
        # VEK with the address tweak, exactly as for the guest's own accesses.
        plaintext = self._read_encrypted(guest.asid, request.guest_paddr, length)
        if vmsa:
            self._check_vmsa_crc(plaintext)
        assert guest.channel is not None  # SEND_START opened it; SUPDATE guarantees it is open
        iv = self._rng(IV_SIZE)  # fresh for every packet: the only per-packet freshness there is
        header, trans = seal_packet(guest.channel, plaintext, context=ChannelContext.DATA, iv=iv)
        self._processed(length)
        return SendUpdateResponse(hdr=header.to_bytes(), trans=trans, hdr_len=PACKET_HEADER_SIZE)

    def _check_vmsa_crc(self, page: bytes) -> None:
        """SEV-ES: the VMSA must be the one the firmware sealed (INVALID_PARAM otherwise)."""
        block = Spa(int.from_bytes(page[VMSA_CRC_PADDR_OFFSET : VMSA_CRC_PADDR_OFFSET + 8], "little"))
        stored = self._tmr.lookup(block) if self._tmr is not None else None
        if stored is None or stored != vmsa_crc(page):
            raise SevError(SevStatus.INVALID_PARAM)

    @_serialised
    def send_update_data(self, request: SendUpdateDataRequest) -> SendUpdateResponse:
        return self._send_update(SevCommand.SEND_UPDATE_DATA, request)

    @_serialised
    def send_update_vmsa(self, request: SendUpdateVmsaRequest) -> SendUpdateResponse:
        return self._send_update(SevCommand.SEND_UPDATE_VMSA, request)

    def _close_send(self, command: SevCommand, handle: GuestHandle) -> None:
        self._require_platform(command)
        guest = self._guest(handle)
        require_guest_state(command, guest.state)
        guest.channel = None  # TEK and TIK are gone: no later packet of this session can be made
        guest.state = next_guest_state(guest.state, command)
        self._tell_cores(guest)  # SENT: the cores refuse it from now on; cancelled: it runs on

    @_serialised
    def send_finish(self, request: SendFinishRequest) -> None:
        """SUPDATE -> SENT. The context stays (DECOMMISSION ends it); it can no longer be activated."""
        self._close_send(SevCommand.SEND_FINISH, request.handle)

    @_serialised
    def send_cancel(self, request: SendCancelRequest) -> None:
        """SUPDATE -> RUNNING: the migration is abandoned and may be restarted with a new SEND_START."""
        self._close_send(SevCommand.SEND_CANCEL, request.handle)

    # -- receiving --------------------------------------------------------------

    @_serialised
    def receive_start(self, request: ReceiveStartRequest) -> ReceiveStartResponse:
        """A new guest context from the sender's session blob, under a new (or shared) VEK.

        The sender's chain is not checked (the firmware does not): only its PDH's
        sanity, then the session's WRAP_MAC and POLICY_MAC.
        """
        self._require_platform(SevCommand.RECEIVE_START)
        channel = self._open_server_channel(
            policy=request.policy, dh_cert=request.pdh_cert, session=request.session
        )
        return ReceiveStartResponse(
            handle=self._new_guest(SevCommand.RECEIVE_START, request.handle, request.policy, channel))

    def _receive_update(
        self, command: SevCommand, request: ReceiveUpdateDataRequest | ReceiveUpdateVmsaRequest
    ) -> None:
        """RECEIVE_UPDATE_DATA and RECEIVE_UPDATE_VMSA: nothing is written unless every check passes."""
        vmsa = command is SevCommand.RECEIVE_UPDATE_VMSA
        self._require_platform(command)
        guest = self._guest(request.handle)
        require_guest_state(command, guest.state)
        if vmsa and not guest.es:
            raise SevError(SevStatus.UNSUPPORTED)
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        # SECURITY: header, data and lengths come from the host (and, before it, the network).
        trans_len, length = len(request.trans), request.guest_len
        if (
            trans_len == 0
            or trans_len > SCRATCH_LEN
            or length == 0
            or length != trans_len
            or not _aligned16(length)
            or len(request.hdr) < PACKET_HEADER_SIZE
            or (vmsa and length != VMSA_SIZE)
        ):
            raise SevError(SevStatus.INVALID_LEN)
        if not _aligned16(request.guest_paddr):
            raise SevError(SevStatus.INVALID_ADDRESS)
        header = PacketHeader.from_bytes(request.hdr[:PACKET_HEADER_SIZE])
        if header.flags & PacketFlags.COMPRESSED:
            raise SevError(SevStatus.UNSUPPORTED)
        assert guest.channel is not None  # RECEIVE_START opened it; RUPDATE guarantees it is open
        # The MAC first: BAD_MEASUREMENT, and nothing is written.
        plaintext = open_packet(
            guest.channel, header, request.trans, context=ChannelContext.DATA, uncompressed_len=length
        )
        if vmsa:
            # A new CRC block in *this* platform's TMR; the sender's block address is meaningless here.
            plaintext = self._seal_vmsa(guest, plaintext)
        # Re-encrypted by the engine under the new VEK, tweaked by the new address.
        self._write_encrypted(guest.asid, request.guest_paddr, plaintext)
        self._processed(length)

    @_serialised
    def receive_update_data(self, request: ReceiveUpdateDataRequest) -> None:
        self._receive_update(SevCommand.RECEIVE_UPDATE_DATA, request)

    @_serialised
    def receive_update_vmsa(self, request: ReceiveUpdateVmsaRequest) -> None:
        self._receive_update(SevCommand.RECEIVE_UPDATE_VMSA, request)

    @_serialised
    def receive_finish(self, request: ReceiveFinishRequest) -> None:
        """RUPDATE -> RUNNING; completes a pending activation, so the cores may now run the guest."""
        self._require_platform(SevCommand.RECEIVE_FINISH)
        guest = self._guest(request.handle)
        require_guest_state(SevCommand.RECEIVE_FINISH, guest.state)
        self._complete_activation(guest)
        guest.channel = None
        guest.state = next_guest_state(guest.state, SevCommand.RECEIVE_FINISH)
        self._tell_cores(guest)

    # -- debugging --------------------------------------------------------------

    def _dbg_checks(self, command: SevCommand, handle: GuestHandle, paddr: Spa, length: int) -> GuestContext:
        self._require_platform(command)
        if not _aligned16(paddr):
            raise SevError(SevStatus.INVALID_ADDRESS)
        if not _aligned16(length) or length > DBG_MAX_LENGTH:
            raise SevError(SevStatus.INVALID_LEN)
        guest = self._guest(handle)
        if PolicyFlag.NODBG in GuestPolicy.from_u32(guest.policy):
            raise SevError(SevStatus.POLICY_FAILURE)
        require_guest_state(command, guest.state)  # any valid state: the firmware has no state check
        if guest.inactive:
            raise SevError(SevStatus.INACTIVE)
        return guest

    @_serialised
    def dbg_decrypt(self, request: DbgDecryptRequest) -> DbgDecryptResponse:
        guest = self._dbg_checks(SevCommand.DBG_DECRYPT, request.handle, request.src_paddr, request.length)
        if request.length == 0:
            return DbgDecryptResponse(data=b"")
        self._processed(request.length)
        return DbgDecryptResponse(data=self._read_encrypted(guest.asid, request.src_paddr, request.length))

    @_serialised
    def dbg_encrypt(self, request: DbgEncryptRequest) -> None:
        guest = self._dbg_checks(SevCommand.DBG_ENCRYPT, request.handle, request.dst_paddr, len(request.data))
        if request.data:
            self._write_encrypted(guest.asid, request.dst_paddr, request.data)
            self._processed(len(request.data))

    # -- tests ------------------------------------------------------------------

    def asid_runnable(self, asid: Asid) -> bool:
        """True if the cores may VMRUN with ``asid`` (what :meth:`_tell_cores` told them)."""
        with self._lock:
            return any(g.asid == asid and g.active and g.state in RUNNABLE_STATES
                       for g in self._guests.values())
