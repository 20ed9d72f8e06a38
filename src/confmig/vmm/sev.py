"""SEV guests in the VMM: what QEMU's ``target/i386/sev.c`` does.

* ``sev_kvm_init``: ``KVM_SEV_INIT`` (or ``KVM_SEV_ES_INIT`` when the policy asks
  for SEV-ES), and the hooks a migratable SEV guest needs: hypercall exits for
  ``KVM_HC_MAP_GPA_RANGE`` (the shared-regions list) and an MSR filter so that
  the guest's write of ``MSR_KVM_MIGRATION_CONTROL`` reaches the VMM.
* The launch: LAUNCH_START with the guest owner's session, LAUNCH_UPDATE_DATA
  over the firmware image (measured and encrypted in place), LAUNCH_MEASURE,
  the owner's verdict and secret (LAUNCH_SECRET into the firmware's secret area,
  found in the image's OVMF table), LAUNCH_FINISH.
* ``query-sev`` and ``query-sev-capabilities``.

The VMM only ever holds handles, certificates, opaque blobs and ciphertext:
the owner's transport keys and the guest's memory key stay in the owner and
the PSP.
"""

from __future__ import annotations

import base64
import errno
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confmig.common.errors import ConfigError, KeyBrokerMessageError, KvmError, MigrationError, ProtocolError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.common.x86 import (
    KVM_CPUID_FEATURES,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
)
from confmig.kvm import sev as ksev
from confmig.kvm.client import Kvm, SevCommandError, VmFd
from confmig.proto import ioctl, keybroker
from confmig.vmm.cmdline import HOST_CBITPOS, SevGuestConfig
from confmig.vmm.shared_regions import SharedRegions

log = logging.getLogger(__name__)


SEV_STATES = ("uninit", "launch-update", "launch-secret", "running", "send-update", "receive-update",
              "sent")
"""QEMU's ``SevState`` names, in the firmware's numbering."""

BLOCKER_NOT_ENABLED = ("SEV: the guest has not enabled live migration "
                       "(MSR_KVM_MIGRATION_CONTROL bit 0 not set)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretArea:
    """The firmware's secret area (OVMF table entry ``SEV_SECRET_BLOCK``)."""

    gpa: int
    size: int


_Reply = TypeVar("_Reply", keybroker.LaunchResponse, keybroker.SecretResponse, keybroker.DecisionResponse)


class OwnerUnreachable(ConfigError):
    """No answer from the guest owner (the network, or the owner down): worth asking again."""


class OwnerLink:
    """The VMM's side of the guest owner's key broker (:mod:`confmig.proto.keybroker`);
    the VMM may not import ``confmig.owner``'s client. Everything it carries is opaque to the VMM."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def launch(self, vm: str, pdh: bytes, chain: bytes, policy: int, *,
               migration_target: bool = False) -> keybroker.LaunchResponse:
        request = keybroker.LaunchRequest(vm=vm, pdh=pdh, cert_chain=chain, policy=policy,
                                          migration_target=migration_target)
        return self._call(keybroker.LAUNCH_PATH, request, keybroker.LaunchResponse)

    def measurement(self, session_id: str, measurement: bytes, api: tuple[int, int, int]
                    ) -> keybroker.SecretResponse:
        request = keybroker.MeasurementRequest(measurement=measurement, api_major=api[0], api_minor=api[1],
                                               build=api[2])
        return self._call(keybroker.measurement_path(session_id), request, keybroker.SecretResponse)

    def decide(self, outcome: str, *, ticket: bytes, migration_id: bytes, challenge: bytes) -> bytes:
        """The owner's proof for the Migration Handler that the migration to ``ticket``'s target
        is committed (a target's VMM asks) or aborted (its source's)."""
        request = keybroker.DecisionRequest(ticket=ticket, migration_id=migration_id,
                                            challenge=challenge, outcome=outcome)
        reply = self._call(keybroker.DECISION_PATH, request, keybroker.DecisionResponse)
        if reply.outcome != outcome:
            raise ConfigError(f"guest owner answered {reply.outcome} to {outcome}")
        return reply.token

    def _call(self, path: str, request: keybroker.Message, kind: type[_Reply]) -> _Reply:
        try:
            status, data = keybroker.post_json(self.url, path, keybroker.encode(request))
            reply = keybroker.decode_reply(kind, status, data)
        except KeyBrokerMessageError as exc:
            raise ConfigError(f"guest owner at {self.url}: malformed reply: {exc}") from exc
        except OSError as exc:
            raise OwnerUnreachable(f"cannot reach the guest owner at {self.url}: {exc}") from exc
        if isinstance(reply, keybroker.ErrorReply):
            raise ConfigError(f"guest owner refused: {reply.error}")
        return reply


def _packet(reply: bytes, *, hdr_len: int, trans_len: int) -> tuple[bytes, bytes]:
    """(packet header, transport data) from what a SEND_UPDATE_* reply carries after its struct."""
    return reply[:hdr_len], reply[hdr_len : hdr_len + trans_len]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class SevGuest:
    """One SEV (or SEV-ES) guest of this VMM."""

    def __init__(self, config: SevGuestConfig, name: str, kvm: Kvm, vm: VmFd, *,
                 kvm_features: int = 1 << KVM_FEATURE_HC_MAP_GPA_RANGE | 1 << KVM_FEATURE_MIGRATION_CONTROL,
                 ) -> None:
        self.config = config
        self.kvm_features = kvm_features
        """What CPUID 0x40000001 EAX advertises (``-cpu ...,-kvm-migration-control`` hides bit 17)."""
        self.name = name
        self.kvm = kvm
        self.vm = vm
        self.shared = SharedRegions()
        self.migration_enabled = threading.Event()
        self.measurement = b""
        self.handle = 0
        self.receiving = False
        """RECEIVE_START done, RECEIVE_FINISH not yet (an incoming guest)."""

    def migration_decision(self, outcome: str, *, ticket: bytes, migration_id: bytes,
                           challenge: bytes) -> bytes:
        """Ask this guest's owner to commit or abort its migration to ``ticket``'s target (the
        Migration Handler path): the proof for the MH, opaque here; ConfigError if refused."""
        if not self.config.owner:
            raise ConfigError("this guest has no owner to decide its migration "
                              "(-object sev-guest,...,owner=URL)")
        return OwnerLink(self.config.owner).decide(outcome, ticket=ticket, migration_id=migration_id,
                                                   challenge=challenge)

    # --- sev_kvm_init -------------------------------------------------------------

    def init(self, *, context: bool = True) -> None:
        """``KVM_SEV_INIT`` (SEV-ES: ``KVM_SEV_ES_INIT``), then the page-state hypercall's exit
        and the migration-control MSR's filter. ``context`` False: a VM that takes over another
        VMM's guest (cpr-transfer), whose context arrives with the move, not from an init."""
        if context:
            cmd = ksev.KVM_SEV_ES_INIT if self.config.es else ksev.KVM_SEV_INIT
            try:
                self.vm.memory_encrypt_op(cmd)
            except SevCommandError as exc:
                raise ConfigError(
                    f"sev-guest '{self.config.id}': SEV is not available on this host: {exc}") from None
        self.vm.enable_cap(ioctl.KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        self.vm.set_msr_filter([MSR_KVM_MIGRATION_CONTROL])
        self.vm.enable_cap(ioctl.KVM_CAP_X86_USER_SPACE_MSR, ioctl.KVM_MSR_EXIT_REASON_FILTER)

    def cpuid(self) -> ioctl.CpuidEntries:
        """What this VMM advertises: the page-state hypercall and migration control
        (the hypervisor's part of the three-way negotiation)."""
        return {(KVM_CPUID_FEATURES, 0): (self.kvm_features, 0, 0, 0)}

    # --- the launch ------------------------------------------------------------------

    def launch(self, measured: list[tuple[int, int]], secret_area: SecretArea | None, *,
               before_measure: Callable[[], None] | None = None, migration_target: bool = False) -> None:
        """LAUNCH_START .. LAUNCH_FINISH, with the owner's check and secret in between.
        ``before_measure`` runs once the guest's own pages and VMSAs are in: what else the
        launch must measure (a mirror VM's VMSAs, :meth:`launch_update_vmsa`). A
        ``migration_target`` asks the owner for a target's secret (a ticket and its key)."""
        owner = OwnerLink(self.config.owner) if self.config.owner else None
        session_id = ""
        godh = session = b""
        if owner is not None:
            pdh, chain = self.capabilities_raw()
            offer = owner.launch(self.name, pdh, chain, self.config.policy,
                                 migration_target=migration_target)
            session_id, godh, session = offer.session_id, offer.godh, offer.session
        body = ksev.LAUNCH_START.pack(0, self.config.policy, 0, len(godh), 0, 0, len(session), 0)
        _err, out = self._op(ksev.KVM_SEV_LAUNCH_START, body + godh + session)
        self.handle = ksev.LAUNCH_START.unpack_from(out)[0]
        for gpa, size in measured:
            self._op(ksev.KVM_SEV_LAUNCH_UPDATE_DATA, ksev.LAUNCH_UPDATE_DATA.pack(gpa, size, 0))
        if self.config.es:
            self._op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
        if before_measure is not None:
            before_measure()
        try:  # the length query first, as QEMU does
            self.vm.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_MEASURE, ksev.LAUNCH_MEASURE.pack(0, 0, 0))
            raise ConfigError("LAUNCH_MEASURE: expected a length query to fail with INVALID_LEN")
        except SevCommandError as exc:
            if exc.fw_error != ksev.SEV_RET_INVALID_LEN:
                raise
            need = ksev.LAUNCH_MEASURE.unpack_from(exc.output)[1]
        _err, out = self._op(ksev.KVM_SEV_LAUNCH_MEASURE, ksev.LAUNCH_MEASURE.pack(0, need, 0))
        self.measurement = out[ksev.LAUNCH_MEASURE.size :]
        if owner is not None:
            packet = owner.measurement(session_id, self.measurement, self.api_version())
            hdr, secret, guest_len = packet.secret_header, packet.secret, packet.guest_len
            if secret_area is None:
                raise ConfigError("the firmware image has no SEV secret area: cannot inject the secret")
            # The protocol already holds guest_len to len(secret); only the image knows its area's size.
            if guest_len > secret_area.size:
                raise ConfigError("the guest owner's secret does not fit the firmware's secret area")
            body = ksev.LAUNCH_SECRET.pack(0, len(hdr), 0, secret_area.gpa, guest_len, 0, 0, len(secret), 0)
            self._op(ksev.KVM_SEV_LAUNCH_SECRET, body + hdr + secret)
        self._op(ksev.KVM_SEV_LAUNCH_FINISH)
        log.info("SEV launch finished: handle %d", self.handle)

    def launch_update_vmsa(self, mirror: VmFd) -> None:
        """SEV-ES: LAUNCH_UPDATE_VMSA on a mirror VM of this guest (its vCPUs' registers as set
        now), during this guest's launch: the mirror's vCPUs start where the launch digest says."""
        try:
            mirror.memory_encrypt_op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA)
        except SevCommandError as exc:
            raise ConfigError(f"SEV: the mirror VM's {exc}") from None

    # --- PSP migration (QEMU: sev_save_setup, sev_save_outgoing_page, sev_load_incoming_page) ---

    def send_start(self, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> tuple[int, bytes]:
        """SEND_START for the target whose certificates these are: (policy, session blob).
        As QEMU, the session length is asked first (a query the firmware answers with
        INVALID_LEN and the length)."""
        try:
            self.vm.memory_encrypt_op(ksev.KVM_SEV_SEND_START, ksev.SEND_START.pack(*[0] * 14))
            raise MigrationError("SEND_START: expected the session-length query to fail with INVALID_LEN")
        except SevCommandError as exc:
            if exc.fw_error != ksev.SEV_RET_INVALID_LEN:
                raise MigrationError(f"SEV: {exc}") from None
            session_len = ksev.SEND_START.unpack_from(exc.output)[12]
        body = ksev.SEND_START.pack(0, 0, 0, len(pdh), 0, 0, len(plat_certs), 0, 0, len(amd_certs), 0,
                                    0, session_len, 0)
        _err, out = self._migration_op(ksev.KVM_SEV_SEND_START, body + pdh + plat_certs + amd_certs)
        fields = ksev.SEND_START.unpack_from(out)
        policy, session_len = fields[0], fields[12]
        return policy, out[ksev.SEND_START.size : ksev.SEND_START.size + session_len]

    def send_update_data(self, gpa: int) -> tuple[bytes, bytes]:
        """One private page out: (packet header, transport data), ciphertext under the TEK."""
        body = ksev.SEND_UPDATE_DATA.pack(0, ksev.PACKET_HEADER_LEN, 0, gpa, PAGE_SIZE, 0, 0, PAGE_SIZE, 0)
        _err, out = self._migration_op(ksev.KVM_SEV_SEND_UPDATE_DATA, body)
        fields = ksev.SEND_UPDATE_DATA.unpack_from(out)
        return _packet(out[ksev.SEND_UPDATE_DATA.size :], hdr_len=fields[1], trans_len=fields[7])

    def send_update_vmsa(self, vcpu_id: int) -> tuple[bytes, bytes]:
        """SEV-ES: one vCPU's VMSA out, re-encrypted by the PSP (the vCPU is stopped)."""
        body = ksev.SEND_UPDATE_VMSA.pack(vcpu_id, 0, 0, ksev.PACKET_HEADER_LEN, 0, 0, PAGE_SIZE, 0)
        _err, out = self._migration_op(ksev.KVM_SEV_SEND_UPDATE_VMSA, body)
        fields = ksev.SEND_UPDATE_VMSA.unpack_from(out)
        return _packet(out[ksev.SEND_UPDATE_VMSA.size :], hdr_len=fields[3], trans_len=fields[6])

    def receive_update_vmsa(self, vcpu_id: int, hdr: bytes, trans: bytes) -> None:
        body = ksev.RECEIVE_UPDATE_VMSA.pack(vcpu_id, 0, 0, len(hdr), 0, 0, len(trans), 0)
        self._migration_op(ksev.KVM_SEV_RECEIVE_UPDATE_VMSA, body + hdr + trans)

    def send_finish(self) -> None:
        self._migration_op(ksev.KVM_SEV_SEND_FINISH)

    def send_cancel(self) -> None:
        """The migration did not complete: the guest goes back to RUNNING on this host."""
        self._migration_op(ksev.KVM_SEV_SEND_CANCEL)

    def receive_start(self, policy: int, pdh: bytes, session: bytes) -> None:
        body = ksev.RECEIVE_START.pack(0, policy, 0, len(pdh), 0, 0, len(session), 0)
        _err, out = self._migration_op(ksev.KVM_SEV_RECEIVE_START, body + pdh + session)
        self.handle = ksev.RECEIVE_START.unpack_from(out)[0]
        self.receiving = True

    def receive_update_data(self, gpa: int, hdr: bytes, trans: bytes) -> None:
        body = ksev.RECEIVE_UPDATE_DATA.pack(0, len(hdr), 0, gpa, len(trans), 0, 0, len(trans), 0)
        self._migration_op(ksev.KVM_SEV_RECEIVE_UPDATE_DATA, body + hdr + trans)

    def receive_finish(self) -> None:
        """When the target starts running: the guest becomes RUNNING in the PSP."""
        if self.receiving:
            self._migration_op(ksev.KVM_SEV_RECEIVE_FINISH)
            self.receiving = False

    def _migration_op(self, cmd: int, data: bytes = b"") -> tuple[int, bytes]:
        return self._op(cmd, data, error=MigrationError)

    def _op(self, cmd: int, data: bytes = b"", *,
            error: type[ConfigError | MigrationError] = ConfigError) -> tuple[int, bytes]:
        """One SEV command; a failure is ``error`` (launch: the VMM cannot start)."""
        try:
            return self.vm.memory_encrypt_op(cmd, data)
        except SevCommandError as exc:
            raise error(f"SEV: {exc}") from None

    # --- exits ------------------------------------------------------------------------

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """``KVM_HC_MAP_GPA_RANGE`` exit: returns the hypercall's result for rax."""
        # SECURITY: guest-controlled arguments; bound them to something sane.
        if gpa % PAGE_SIZE or npages <= 0 or npages > 1 << 28 or attrs & ~0x1F:
            return -errno.EINVAL & 0xFFFF_FFFF_FFFF_FFFF  # KVM_EINVAL
        try:
            self.shared.update(gpa >> PAGE_SHIFT, npages, shared=not attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
        except ProtocolError:  # the list is at its bound and stays as it was
            return -errno.E2BIG & 0xFFFF_FFFF_FFFF_FFFF  # KVM_E2BIG
        return 0

    def wrmsr(self, index: int, value: int) -> bool:
        """A filtered MSR write; returns False to inject #GP."""
        if index != MSR_KVM_MIGRATION_CONTROL or value & ~KVM_MIGRATION_READY:
            return False
        if value & KVM_MIGRATION_READY:
            self.migration_enabled.set()
        else:
            self.migration_enabled.clear()
        return True

    @property
    def migration_control(self) -> int:
        """``MSR_KVM_MIGRATION_CONTROL`` as the guest last wrote it (it migrates with the vCPUs)."""
        return KVM_MIGRATION_READY if self.migration_enabled.is_set() else 0

    def blockers(self) -> list[str]:
        return [] if self.migration_enabled.is_set() else [BLOCKER_NOT_ENABLED]

    def check_migratable(self) -> None:
        if self.blockers():
            raise MigrationError("; ".join(self.blockers()))

    # --- QMP ----------------------------------------------------------------------------

    def capabilities_raw(self) -> tuple[bytes, bytes]:
        return pdh_cert_export(self.kvm)

    def api_version(self) -> tuple[int, int, int]:
        status, out = self.kvm.sev_issue_cmd(ksev.SEV_PLATFORM_STATUS)
        if status or len(out) < 12:
            return 0, 0, 0
        major, minor, _state, _flags, build, _count = struct.unpack_from("<BBBIBI", out)
        return major, minor, build

    def _status(self) -> tuple[int, str]:
        """GUEST_STATUS: the policy, and the guest's state by QEMU's name."""
        _err, out = self._op(ksev.KVM_SEV_GUEST_STATUS, ksev.GUEST_STATUS.pack(0, 0, 0))
        policy, state, _ = ksev.GUEST_STATUS.unpack_from(out)
        return policy, SEV_STATES[state] if state < len(SEV_STATES) else "uninit"

    def state(self) -> str:
        """The guest's state in the firmware (``sent`` after SEND_FINISH: it left)."""
        return self._status()[1]

    def query(self) -> dict[str, object]:
        policy, state = self._status()
        major, minor, build = self.api_version()
        return {"enabled": True, "api-major": major, "api-minor": minor, "build-id": build,
                "policy": policy, "state": state,
                "handle": self.handle, "sev-type": "sev-es" if self.config.es else "sev"}


def pdh_cert_export(kvm: Kvm) -> tuple[bytes, bytes]:
    """The host platform's PDH and its chain (PEK‖OCA‖CEK), through ``/dev/sev``."""
    try:
        status, out = kvm.sev_issue_cmd(ksev.SEV_PDH_CERT_EXPORT)
    except KvmError as exc:
        raise ConfigError(f"SEV is not available on this host: {exc}") from None
    if status:
        raise ConfigError(f"SEV_PDH_CERT_EXPORT failed with firmware status {status:#x}")
    pdh_len, chain_len = struct.unpack_from("<II", out)
    return out[8 : 8 + pdh_len], out[8 + pdh_len : 8 + pdh_len + chain_len]


def query_sev_capabilities(kvm: Kvm, cbitpos: int = HOST_CBITPOS) -> dict[str, object]:
    """``query-sev-capabilities``: what a guest owner needs to prepare a launch here."""
    pdh, chain = pdh_cert_export(kvm)
    return {"pdh": _b64(pdh), "cert-chain": _b64(chain), "cpu0-id": _b64(b"\0" * 64),
            "cbitpos": cbitpos, "reduced-phys-bits": 1}
