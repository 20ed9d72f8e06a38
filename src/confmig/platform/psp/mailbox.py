"""The PSP as the host kernel reaches it: KVM's ``SecureProcessor`` port, in primitive types.

``confmig.kvm.ports.SecureProcessor`` is what the host kernel (the ``sev-dev``
driver and ``svm/sev.c``) may call: handles, ASIDs, system-physical addresses,
opaque blobs, and firmware status codes (0 = SUCCESS). :class:`PspMailbox`
implements it over :class:`~confmig.platform.psp.psp.SecureProcessor`,
structurally (the platform does not import ``kvm``). Keys never cross it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from confmig.common.units import Spa
from confmig.platform.psp.cert import SEV_CERT_SIZE
from confmig.platform.psp.chain import PLATFORM_CHAIN_SIZE
from confmig.platform.psp.commands import (
    INIT_FLAG_ES,
    ActivateRequest,
    DbgDecryptRequest,
    DbgEncryptRequest,
    DeactivateRequest,
    DecommissionRequest,
    DfFlushRequest,
    GuestStatusRequest,
    InitRequest,
    LaunchFinishRequest,
    LaunchMeasureRequest,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExportRequest,
    PlatformStatusRequest,
    ReceiveFinishRequest,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendCancelRequest,
    SendFinishRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateResponse,
    SendUpdateVmsaRequest,
)
from confmig.platform.psp.handles import Asid, GuestHandle
from confmig.platform.psp.measure import MEASUREMENT_SIZE
from confmig.platform.psp.psp import SecureProcessor
from confmig.platform.psp.states import PlatformState
from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.vmsa import TMR_SIZE, VMSA_SIZE

EMULATED_TMR_SPA: Final = Spa(0xFFF0_0000)
"""Where INIT is told the SEV-ES TMR lies. The emulated TMR is PSP-private state, so
any 1 MiB-aligned address will do; this one is above every emulated RAM slot."""

STATUS: Final = struct.Struct("<BBBIBI")
"""``struct sev_user_data_status`` (Linux uapi): api_major, api_minor, state,
flags (bit 0 owner, bit 8 SEV-ES), build, guest_count."""
STATUS_FLAG_CONFIG_ES: Final = 0x0100


class PspMailbox:
    """The mailbox side of the PSP, for the host kernel (never handed any key)."""

    def __init__(self, psp: SecureProcessor) -> None:
        self._psp = psp

    def platform_init(self, *, es: bool) -> int:
        """INIT (if the platform is not initialised) and DF_FLUSH, as Linux's ``sev_platform_init``.

        Like Linux on a part that has SEV-ES, the platform is always initialised
        with SEV-ES; ``es`` only says what the caller needs.
        """
        try:
            if self._psp.platform_status(PlatformStatusRequest()).state is PlatformState.UNINIT:
                self._psp.init(
                    InitRequest(flags=INIT_FLAG_ES, tmr_paddr=EMULATED_TMR_SPA, tmr_length=TMR_SIZE)
                )
                self._psp.df_flush(DfFlushRequest())
        except SevError as exc:
            return exc.status
        return SevStatus.SUCCESS

    def df_flush(self) -> int:
        """DF_FLUSH: makes the ASIDs of deactivated guests usable again.

        An ASID whose guest ran is dirty after DEACTIVATE; ACTIVATE on it fails
        with DFFLUSH_REQUIRED until this runs. Linux never reuses a freed ASID
        before a flush: it parks freed ASIDs and flushes when it runs out
        (``__sev_recycle_asids``).
        """
        return _status(lambda: self._psp.df_flush(DfFlushRequest()))

    def platform_status(self) -> tuple[int, bytes]:
        s = self._psp.platform_status(PlatformStatusRequest())
        flags = (1 if s.owned else 0) | (STATUS_FLAG_CONFIG_ES if s.config_es else 0)
        return SevStatus.SUCCESS, STATUS.pack(
            s.api_major, s.api_minor, s.state, flags, s.build, s.guest_count
        )

    def pdh_cert_export(self) -> tuple[int, bytes, bytes]:
        try:
            out = self._psp.pdh_cert_export(
                PdhCertExportRequest(pdh_cert_len=SEV_CERT_SIZE, certs_len=PLATFORM_CHAIN_SIZE)
            )
        except SevError as exc:
            return exc.status, b"", b""
        return SevStatus.SUCCESS, out.pdh_cert, out.cert_chain

    def launch_start(self, handle: int, policy: int, pdh: bytes, session: bytes) -> tuple[int, int]:
        """(status, new guest handle). An empty ``pdh`` means no owner channel (``dh_cert_paddr`` 0)."""
        request = LaunchStartRequest(
            policy=policy, handle=GuestHandle(handle), dh_cert=pdh or None, session=session or None
        )
        try:
            return SevStatus.SUCCESS, self._psp.launch_start(request).handle
        except SevError as exc:
            return exc.status, 0

    def activate(self, handle: int, asid: int) -> int:
        return _status(
            lambda: self._psp.activate(ActivateRequest(handle=GuestHandle(handle), asid=Asid(asid)))
        )

    def deactivate(self, handle: int) -> int:
        return _status(lambda: self._psp.deactivate(DeactivateRequest(handle=GuestHandle(handle))))

    def decommission(self, handle: int) -> int:
        return _status(lambda: self._psp.decommission(DecommissionRequest(handle=GuestHandle(handle))))

    def launch_update_data(self, handle: int, spa: int, length: int) -> int:
        request = LaunchUpdateDataRequest(handle=GuestHandle(handle), paddr=Spa(spa), length=length)
        return _status(lambda: self._psp.launch_update_data(request))

    def launch_measure(self, handle: int) -> tuple[int, bytes]:
        request = LaunchMeasureRequest(handle=GuestHandle(handle), measure_len=MEASUREMENT_SIZE)
        try:
            return SevStatus.SUCCESS, self._psp.launch_measure(request).measurement
        except SevError as exc:
            return exc.status, b""

    def launch_secret(self, handle: int, header: bytes, spa: int, length: int, transport: bytes) -> int:
        request = LaunchSecretRequest(
            handle=GuestHandle(handle), hdr=header, guest_paddr=Spa(spa), guest_len=length, trans=transport
        )
        return _status(lambda: self._psp.launch_secret(request))

    def launch_finish(self, handle: int) -> int:
        return _status(lambda: self._psp.launch_finish(LaunchFinishRequest(handle=GuestHandle(handle))))

    def guest_status(self, handle: int) -> tuple[int, int, int]:
        """(status, policy, guest state)."""
        try:
            s = self._psp.guest_status(GuestStatusRequest(handle=GuestHandle(handle)))
        except SevError as exc:
            return exc.status, 0, 0
        return SevStatus.SUCCESS, s.policy, s.state

    def dbg_decrypt(self, handle: int, spa: int, length: int) -> tuple[int, bytes]:
        request = DbgDecryptRequest(handle=GuestHandle(handle), src_paddr=Spa(spa), length=length)
        try:
            return SevStatus.SUCCESS, self._psp.dbg_decrypt(request).data
        except SevError as exc:
            return exc.status, b""

    def dbg_encrypt(self, handle: int, spa: int, data: bytes) -> int:
        request = DbgEncryptRequest(handle=GuestHandle(handle), dst_paddr=Spa(spa), data=data)
        return _status(lambda: self._psp.dbg_encrypt(request))

    def launch_update_vmsa(self, handle: int, spa: int) -> int:
        """LAUNCH_UPDATE_VMSA of the 4 KiB VMSA page at ``spa`` (SEV-ES)."""
        request = LaunchUpdateVmsaRequest(handle=GuestHandle(handle), paddr=Spa(spa), length=VMSA_SIZE)
        return _status(lambda: self._psp.launch_update_vmsa(request))

    # -- migration ------------------------------------------------------------

    def send_start(
        self, handle: int, pdh: bytes, plat_certs: bytes, amd_certs: bytes, session_len: int
    ) -> tuple[int, int, bytes, int]:
        """(status, policy, session, session_len). ``pdh``, ``plat_certs``, ``amd_certs`` are the
        receiver's. A ``session_len`` other than 128 fails INVALID_LEN with 128: the length query."""
        request = SendStartRequest(
            handle=GuestHandle(handle),
            pdh_cert=pdh,
            plat_certs=plat_certs,
            amd_certs=amd_certs,
            session_len=session_len,
        )
        try:
            out = self._psp.send_start(request)
        except SevError as exc:
            written = exc.output if isinstance(exc.output, SendStartResponse) else None
            return exc.status, 0, b"", written.session_len if written else session_len
        return SevStatus.SUCCESS, out.policy, out.session, out.session_len

    def send_update_data(
        self, handle: int, hdr_len: int, spa: int, length: int, trans_len: int
    ) -> tuple[int, bytes, bytes, int]:
        """(status, packet header, transport data, hdr_len). ``hdr_len`` < 52 fails INVALID_LEN
        with 52 (the header-size query); the transport data is ``length`` bytes."""
        request = SendUpdateDataRequest(
            handle=GuestHandle(handle),
            hdr_len=hdr_len,
            guest_paddr=Spa(spa),
            guest_len=length,
            trans_len=trans_len,
        )
        return _send_update(lambda: self._psp.send_update_data(request), hdr_len)

    def send_update_vmsa(
        self, handle: int, hdr_len: int, spa: int, length: int, trans_len: int
    ) -> tuple[int, bytes, bytes, int]:
        """As :meth:`send_update_data`, for the SEV-ES VMSA page at ``spa``."""
        request = SendUpdateVmsaRequest(
            handle=GuestHandle(handle),
            hdr_len=hdr_len,
            guest_paddr=Spa(spa),
            guest_len=length,
            trans_len=trans_len,
        )
        return _send_update(lambda: self._psp.send_update_vmsa(request), hdr_len)

    def send_finish(self, handle: int) -> int:
        return _status(lambda: self._psp.send_finish(SendFinishRequest(handle=GuestHandle(handle))))

    def send_cancel(self, handle: int) -> int:
        return _status(lambda: self._psp.send_cancel(SendCancelRequest(handle=GuestHandle(handle))))

    def receive_start(self, handle: int, policy: int, pdh: bytes, session: bytes) -> tuple[int, int]:
        """(status, new guest handle). ``pdh`` is the *sender's* PDH certificate."""
        request = ReceiveStartRequest(
            policy=policy, handle=GuestHandle(handle), pdh_cert=pdh, session=session
        )
        try:
            return SevStatus.SUCCESS, self._psp.receive_start(request).handle
        except SevError as exc:
            return exc.status, 0

    def receive_update_data(self, handle: int, header: bytes, spa: int, length: int, transport: bytes) -> int:
        request = ReceiveUpdateDataRequest(
            handle=GuestHandle(handle), hdr=header, guest_paddr=Spa(spa), guest_len=length, trans=transport
        )
        return _status(lambda: self._psp.receive_update_data(request))

    def receive_update_vmsa(self, handle: int, header: bytes, spa: int, length: int, transport: bytes) -> int:
        request = ReceiveUpdateVmsaRequest(
            handle=GuestHandle(handle), hdr=header, guest_paddr=Spa(spa), guest_len=length, trans=transport
        )
        return _status(lambda: self._psp.receive_update_vmsa(request))

    def receive_finish(self, handle: int) -> int:
        return _status(lambda: self._psp.receive_finish(ReceiveFinishRequest(handle=GuestHandle(handle))))


def _send_update(command: Callable[[], SendUpdateResponse], hdr_len: int) -> tuple[int, bytes, bytes, int]:
    try:
        out = command()
    except SevError as exc:
        written = exc.output if isinstance(exc.output, SendUpdateResponse) else None
        return exc.status, b"", b"", written.hdr_len if written else hdr_len
    return SevStatus.SUCCESS, out.hdr, out.trans, out.hdr_len


def _status(command: Callable[[], None]) -> int:
    try:
        command()
    except SevError as exc:
        return exc.status
    return SevStatus.SUCCESS
