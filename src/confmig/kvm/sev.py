"""KVM's SEV support: ``KVM_MEMORY_ENCRYPT_OP`` and ``/dev/sev``'s ``SEV_ISSUE_CMD``.

What real KVM does in ``arch/x86/kvm/svm/sev.c``, for the launch and the
migration paths: give an SEV VM an ASID, turn the VMM's requests into PSP
commands (with guest addresses translated to system-physical ones), bind the
guest's handle to its ASID (ACTIVATE, after LAUNCH_START and RECEIVE_START),
and pass the firmware's status code back in ``error``.

One deviation, forced by processes: KVM reads user buffers through pointers
into the VMM's memory, which another process cannot follow. So in each
``struct kvm_sev_*`` the pointer fields that point into *guest RAM* carry a
guest-physical address, and the buffers the VMM passes by pointer (certificates,
session blob, packet header, transport data) follow the struct inline, in the
order of the struct's fields; outputs come back in the reply. Lengths keep
their meaning, including the zero-length queries QEMU relies on. The ``*_uaddr``
fields of inline buffers are not read (pass 0).

Migration, as a VMM drives it (QEMU's 2021 patches; every struct below):

* source: ``SEND_START`` with ``session_len`` 0 (query: fails ``EIO`` with
  ``error`` INVALID_LEN and the struct's ``session_len`` = 128), then with
  128 and the target's PDH ‖ PEK‖OCA‖CEK ‖ ASK‖ARK inline (all three
  required): reply = the struct (``policy``) + the 128-byte session. Per
  private page ``SEND_UPDATE_DATA`` (``hdr_len`` or ``trans_len`` 0 is the
  query: ``hdr_len`` = 52): ``guest_uaddr`` is the page's GPA, at most one
  page; reply = the struct + ``hdr_len`` bytes of header + ``trans_len``
  bytes of transport data. Then ``SEND_FINISH`` (or ``SEND_CANCEL``: the
  guest runs on).
* target: ``KVM_SEV_INIT``/``ES_INIT`` (the ASID), ``RECEIVE_START`` with the
  source's policy, PDH and session inline (reply: the struct with the new
  ``handle``; KVM has ACTIVATEd it), per page ``RECEIVE_UPDATE_DATA`` with
  header and transport data inline, then ``RECEIVE_FINISH`` before it runs.
* SEV-ES: ``SEND_UPDATE_VMSA``/``RECEIVE_UPDATE_VMSA`` name a vCPU instead of
  a GPA (not in upstream KVM; modelled on Hygon's CSV2 patches), and are
  issued with the vCPUs stopped (``EBUSY`` inside ``KVM_RUN``). Source: after
  the last RAM round; KVM has the vCPU store its registers into its VMSA page
  (encrypted by the core, checksum in the TMR), then SEND_UPDATE_VMSA on that
  page. Target: after RECEIVE_START, before RECEIVE_FINISH; the PSP writes the
  page under the new key, then the vCPU loads it (checked by the core), and
  from then on its registers are sealed.

SEV-ES VMSA pages (:class:`EsVcpus`, wired by :mod:`confmig.kvm.host`): every
vCPU of an SEV-ES VM has a 4 KiB page of host memory KVM owns, not guest RAM,
at a system-physical address the PSP reaches. ``LAUNCH_UPDATE_VMSA`` (no
data) does, for each vCPU in id order: the vCPU writes its register file
there in plaintext (``sev_es_sync_vmsa``), the PSP's LAUNCH_UPDATE_VMSA
measures it into the launch digest, seals it (TMR CRC) and encrypts it in
place, and the vCPU's state becomes protected (``KVM_GET/SET_REGS`` fail
``EINVAL``). KVM's code never gets plaintext registers after that (the core in the
vCPU process keeps them, as a CPU does).

Mirror VMs (``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``, :meth:`SevVm.copy_enc_context_from`):
a VM with no vCPUs and no SEV context of its own takes a copy of another SEV
VM's ``kvm_sev_info`` (ASID, ES flag, handle), so its vCPUs run under the same
ASID and reach the guest's private memory through the same key slot, with
their own registers and page tables (the Migration Handler's use). Only its
owner manages the context: a mirror issues nothing but
:data:`MIRROR_COMMANDS`. The owner's context outlives its VM while mirrors
use it (Linux's mirror holds a reference on the owner's VM): it is torn down,
and the ASID freed, when the last of the owner and its mirrors is destroyed.

Intra-host migration (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``,
:meth:`SevVm.move_enc_context_from`): a VM that is no SEV guest yet takes over
another VM's whole ``kvm_sev_info`` (ASID, ES flag, handle) and its place among
mirrors: an owner's mirrors are re-pointed to it, a mirror's owner lists it
instead. No PSP command is issued: the handle stays bound to the ASID, and the
guest's memory, at the same system-physical addresses, stays readable under it.
The source keeps nothing (its VM is dead, see :mod:`confmig.kvm.host`), so its
teardown frees nothing.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from confmig.common.errors import ProtocolError
from confmig.common.units import PAGE_SIZE
from confmig.kvm.ports import SecureProcessor

# enum sev_cmd_id (KVM)
KVM_SEV_INIT = 0
KVM_SEV_ES_INIT = 1
KVM_SEV_LAUNCH_START = 2
KVM_SEV_LAUNCH_UPDATE_DATA = 3
KVM_SEV_LAUNCH_UPDATE_VMSA = 4
KVM_SEV_LAUNCH_SECRET = 5
KVM_SEV_LAUNCH_MEASURE = 6
KVM_SEV_LAUNCH_FINISH = 7
KVM_SEV_SEND_START = 8
KVM_SEV_SEND_UPDATE_DATA = 9
KVM_SEV_SEND_UPDATE_VMSA = 10
KVM_SEV_SEND_FINISH = 11
KVM_SEV_RECEIVE_START = 12
KVM_SEV_RECEIVE_UPDATE_DATA = 13
KVM_SEV_RECEIVE_UPDATE_VMSA = 14
KVM_SEV_RECEIVE_FINISH = 15
KVM_SEV_GUEST_STATUS = 16
KVM_SEV_DBG_DECRYPT = 17
KVM_SEV_DBG_ENCRYPT = 18
KVM_SEV_SEND_CANCEL = 21


MIRROR_COMMANDS = frozenset({
    KVM_SEV_LAUNCH_UPDATE_VMSA, KVM_SEV_GUEST_STATUS, KVM_SEV_DBG_DECRYPT, KVM_SEV_DBG_ENCRYPT,
})
"""What a mirror VM may issue (``is_cmd_allowed_from_mirror``): its own vCPUs' VMSAs (SEV-ES),
the guest's status, debug access. Everything else, INIT included, is ``EINVAL``."""

_CMD_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("KVM_SEV_") and isinstance(v, int)}


def sev_cmd_name(cmd: int) -> str:
    """``KVM_SEV_RECEIVE_UPDATE_DATA`` for 13: the name of a ``KVM_MEMORY_ENCRYPT_OP`` command."""
    return _CMD_NAMES.get(cmd, f"KVM_SEV command {cmd}")

# /dev/sev (include/uapi/linux/psp-sev.h)
SEV_PLATFORM_STATUS = 1
SEV_PDH_CERT_EXPORT = 5

SEV_RET_SUCCESS = 0
SEV_RET_INVALID_GUEST_STATE = 0x02
SEV_RET_INVALID_LEN = 0x04
SEV_RET_INVALID_CERTIFICATE = 0x06
SEV_RET_POLICY_FAILURE = 0x07
SEV_RET_BAD_SIGNATURE = 0x0A
SEV_RET_BAD_MEASUREMENT = 0x0B
"""Also every packet or session MAC mismatch."""
SEV_RET_NO_FW_CALL = 0xFFFF_FFFF
"""-1 as u32: the firmware was never called (KVM refused first)."""
SEV_RET_NAMES = (
    "SUCCESS", "INVALID_PLATFORM_STATE", "INVALID_GUEST_STATE", "INVALID_CONFIG", "INVALID_LEN",
    "ALREADY_OWNED", "INVALID_CERTIFICATE", "POLICY_FAILURE", "INACTIVE", "INVALID_ADDRESS",
    "BAD_SIGNATURE", "BAD_MEASUREMENT", "ASID_OWNED", "INVALID_ASID", "WBINVD_REQUIRED",
    "DFFLUSH_REQUIRED", "INVALID_GUEST", "INVALID_COMMAND", "ACTIVE", "HWSEV_RET_PLATFORM",
    "HWSEV_RET_UNSAFE", "UNSUPPORTED", "INVALID_PARAM", "RESOURCE_LIMIT", "SECURE_DATA_INVALID",
)
"""The firmware status codes by number (``include/uapi/linux/psp-sev.h``)."""


def fw_error_name(code: int) -> str:
    """``BAD_MEASUREMENT`` for 0xb; what QEMU's ``fw_error_to_str`` does for its messages."""
    if code == SEV_RET_NO_FW_CALL:
        return "NO_FW_CALL"
    return SEV_RET_NAMES[code] if 0 <= code < len(SEV_RET_NAMES) else f"unknown status {code:#x}"
SEV_FW_BLOB_MAX_SIZE = 0x4000
SEND_BUFFER_MAX = SEV_FW_BLOB_MAX_SIZE
"""Our bound on SEND_UPDATE_*'s header and transport buffers (Linux kzallocs whatever the VMM
asks for; a page needs 52 + 4096 bytes)."""
MAX_ASID = 509
MEASUREMENT_LEN = 48
"""LAUNCH_MEASURE output: 32-byte measurement and 16-byte mnonce."""
PACKET_HEADER_LEN = 52
"""What SEND_UPDATE_DATA's header-length query answers (flags, IV, MAC)."""
SESSION_LEN = 128
"""What SEND_START's session-length query answers."""

SEV_CMD = struct.Struct("<IIQII")
"""``struct kvm_sev_cmd``: id, pad, data (0 here: the data follows inline), error, sev_fd."""
LAUNCH_START = struct.Struct("<IIQIIQII")
"""``struct kvm_sev_launch_start``: handle, policy, dh_uaddr, dh_len, pad, session_uaddr, session_len, pad."""
LAUNCH_UPDATE_DATA = struct.Struct("<QII")
"""``struct kvm_sev_launch_update_region``: uaddr (here: GPA), len, pad."""
LAUNCH_MEASURE = struct.Struct("<QII")
LAUNCH_SECRET = struct.Struct("<QIIQIIQII")
"""hdr_uaddr, hdr_len, pad, guest_uaddr (here: GPA), guest_len, pad, trans_uaddr, trans_len, pad."""
GUEST_STATUS = struct.Struct("<III")
DBG = struct.Struct("<QQII")
"""``struct kvm_sev_dbg``: src_uaddr, dst_uaddr (GPAs), len, pad."""
SEND_START = struct.Struct("<IIQIIQIIQIIQII")
"""``struct kvm_sev_send_start`` (72 bytes): policy (out), pad, pdh_cert_uaddr, pdh_cert_len, pad,
plat_certs_uaddr, plat_certs_len, pad, amd_certs_uaddr, amd_certs_len, pad, session_uaddr,
session_len (in/out), pad. Inline after it: PDH, PEK‖OCA‖CEK, ASK‖ARK (the target's)."""
SEND_UPDATE_DATA = struct.Struct("<QIIQIIQII")
"""``struct kvm_sev_send_update_data`` (48 bytes): hdr_uaddr, hdr_len (in/out), pad, guest_uaddr
(here: GPA), guest_len, pad, trans_uaddr, trans_len (in/out), pad. Nothing inline."""
RECEIVE_START = struct.Struct("<IIQIIQII")
"""``struct kvm_sev_receive_start`` (40 bytes): handle (in/out; 0 = new), policy, pdh_uaddr,
pdh_len, pad, session_uaddr, session_len, pad. Inline after it: the source's PDH, the session."""
RECEIVE_UPDATE_DATA = struct.Struct("<QIIQIIQII")
"""``struct kvm_sev_receive_update_data`` (48 bytes), the fields of SEND_UPDATE_DATA.
Inline after it: the packet header, the transport data."""
SEND_UPDATE_VMSA = struct.Struct("<IIQIIQII")
"""Ours (not upstream; after Hygon CSV2's): vcpu_id, pad, hdr_uaddr, hdr_len (in/out), pad,
trans_uaddr, trans_len (in/out), pad. Reply as SEND_UPDATE_DATA's."""
RECEIVE_UPDATE_VMSA = struct.Struct("<IIQIIQII")
"""The fields of SEND_UPDATE_VMSA; inline after it: the packet header, the transport data."""

Translate = Callable[[int, int], list[tuple[int, int]]]
"""GPA range → list of (SPA, length) chunks, each physically contiguous."""


class EsVcpus(Protocol):
    """An SEV-ES VM's vCPUs as the SEV code reaches them (``svm->sev_es.vmsa`` and the
    vCPU's own state). Methods that name a page answer its SPA, or ``-errno``: ``EINVAL``
    for no such vCPU (or no VMSA state to store), ``EBUSY`` for a vCPU inside ``KVM_RUN``."""

    def vcpu_ids(self) -> list[int]: ...

    def sync_vmsa(self, vcpu_id: int) -> int:
        """The vCPU writes its register file into its VMSA page, in plaintext: the page's SPA."""
        ...

    def vmsa_launched(self, vcpu_id: int) -> int:
        """LAUNCH_UPDATE_VMSA encrypted the page: it is the register file now (0 or -errno)."""
        ...

    def save_vmsa(self, vcpu_id: int) -> int:
        """The vCPU stores its registers into the page, encrypted by the core: the page's SPA."""
        ...

    def vmsa_page(self, vcpu_id: int) -> int:
        """The SPA of the vCPU's VMSA page (allocated if it has none)."""
        ...

    def load_vmsa(self, vcpu_id: int) -> int:
        """The vCPU loads its registers from the page, checked by the core (0 or -errno)."""
        ...


@dataclass
class SevState:
    """``struct kvm_sev_info`` of one VM."""

    active: bool = False
    es: bool = False
    asid: int = 0
    handle: int = 0


MIN_SEV_ASID = 101
"""This model part's SEV-ES ASID space: 1..100 for SEV-ES guests, 101..509 for SEV
(CPUID 0x8000001F EDX, the BIOS's "SEV-ES ASID space limit")."""


class AsidAllocator:
    """SEV ASIDs of one host (``sev_asid_new``/``sev_asid_free``): SEV-ES guests below
    ``min_sev_asid``, SEV guests from it up."""

    def __init__(self, min_sev_asid: int = MIN_SEV_ASID, max_asid: int = MAX_ASID) -> None:
        self._free_es = list(range(min_sev_asid - 1, 0, -1))
        self._free_sev = list(range(max_asid, min_sev_asid - 1, -1))
        self.min_sev_asid = min_sev_asid

    def allocate(self, *, es: bool) -> int | None:
        pool = self._free_es if es else self._free_sev
        return pool.pop() if pool else None

    def release(self, asid: int) -> None:
        (self._free_es if asid < self.min_sev_asid else self._free_sev).append(asid)


class SevVm:
    """The SEV side of one VM: dispatches ``KVM_MEMORY_ENCRYPT_OP``."""

    def __init__(self, psp: SecureProcessor, asids: AsidAllocator, translate: Translate,
                 bind_asid: Callable[[int, bool], None], vcpus: EsVcpus | None = None) -> None:
        self.vcpus = vcpus
        """The VM's vCPUs (``KVM_SEV_INIT`` refuses a VM that has any) and, SEV-ES, their
        VMSA pages (None: no vCPUs, the VMSA commands fail EINVAL)."""
        self.psp = psp
        self.asids = asids
        self.translate = translate
        self.bind_asid = bind_asid
        self.state = SevState()
        self.enc_context_owner: SevVm | None = None
        """A mirror: the VM whose encryption context this one uses (``sev->enc_context_owner``)."""
        self.mirror_vms: list[SevVm] = []
        """An owner: the mirrors using its context (``sev->mirror_vms``)."""
        self._released = False
        """An owner: its VM was destroyed; the context lives on for its mirrors."""
        self._refs = threading.Lock()
        """Guards ``mirror_vms``, its mirrors' ``enc_context_owner``, ``_released`` and the
        teardown they decide (the owner's ``kvm->lock`` in ``sev_vm_destroy``); mirrors join and
        leave from their own threads, and a move re-points them."""

    def encrypt_op(self, payload: bytes) -> tuple[int, bytes]:
        """Returns (result, reply payload = ``struct kvm_sev_cmd`` with ``error`` + outputs)."""
        if len(payload) < SEV_CMD.size:
            return -errno.EINVAL, b""
        cmd_id, _pad, _data, _error, sev_fd = SEV_CMD.unpack_from(payload)
        body = payload[SEV_CMD.size :]
        try:
            result, fw_error, out = self._dispatch(cmd_id, body)
        except (struct.error, ProtocolError):
            result, fw_error, out = -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        reply = SEV_CMD.pack(cmd_id, 0, 0, fw_error, sev_fd) + out
        return result, reply

    def _dispatch(self, cmd_id: int, body: bytes) -> tuple[int, int, bytes]:
        s = self.state
        if self.enc_context_owner is not None and cmd_id not in MIRROR_COMMANDS:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""  # only the owner manages the context
        if cmd_id in (KVM_SEV_INIT, KVM_SEV_ES_INIT):
            return self._init(es=cmd_id == KVM_SEV_ES_INIT)
        if not s.active:
            # sev_receive_update_data checks sev_guest() itself and answers EINVAL.
            result = -errno.EINVAL if cmd_id == KVM_SEV_RECEIVE_UPDATE_DATA else -errno.ENOTTY
            return result, SEV_RET_NO_FW_CALL, b""
        if cmd_id == KVM_SEV_LAUNCH_START:
            return self._launch_start(body)
        if cmd_id == KVM_SEV_LAUNCH_UPDATE_DATA:
            gpa, length, _ = LAUNCH_UPDATE_DATA.unpack_from(body)
            for spa, n in self._chunks(gpa, length):
                status = self.psp.launch_update_data(s.handle, spa, n)
                if status:
                    return -errno.EIO, status, b""
            return 0, SEV_RET_SUCCESS, b""
        if cmd_id == KVM_SEV_LAUNCH_UPDATE_VMSA:
            return self._launch_update_vmsa()
        if cmd_id == KVM_SEV_LAUNCH_MEASURE:
            _addr, length, _ = LAUNCH_MEASURE.unpack_from(body)
            if length < MEASUREMENT_LEN:  # a length query, as QEMU makes first
                return -errno.EIO, SEV_RET_INVALID_LEN, LAUNCH_MEASURE.pack(0, MEASUREMENT_LEN, 0)
            status, blob = self.psp.launch_measure(s.handle)
            if status:
                return -errno.EIO, status, b""
            return 0, SEV_RET_SUCCESS, LAUNCH_MEASURE.pack(0, len(blob), 0) + blob
        if cmd_id == KVM_SEV_LAUNCH_SECRET:
            return self._launch_secret(body)
        if cmd_id == KVM_SEV_LAUNCH_FINISH:
            return self._status(self.psp.launch_finish(s.handle))
        if cmd_id == KVM_SEV_GUEST_STATUS:
            status, policy, state = self.psp.guest_status(s.handle)
            if status:
                return -errno.EIO, status, b""
            return 0, SEV_RET_SUCCESS, GUEST_STATUS.pack(policy, state, 0)
        if cmd_id in (KVM_SEV_DBG_DECRYPT, KVM_SEV_DBG_ENCRYPT):
            return self._dbg(cmd_id, body)
        if cmd_id == KVM_SEV_SEND_START:
            return self._send_start(body)
        if cmd_id == KVM_SEV_SEND_UPDATE_DATA:
            return self._send_update_data(body)
        if cmd_id == KVM_SEV_SEND_UPDATE_VMSA:
            return self._send_update_vmsa(body)
        if cmd_id == KVM_SEV_SEND_FINISH:
            return self._status(self.psp.send_finish(s.handle))
        if cmd_id == KVM_SEV_SEND_CANCEL:
            return self._status(self.psp.send_cancel(s.handle))
        if cmd_id == KVM_SEV_RECEIVE_START:
            return self._receive_start(body)
        if cmd_id == KVM_SEV_RECEIVE_UPDATE_DATA:
            return self._receive_update_data(body)
        if cmd_id == KVM_SEV_RECEIVE_UPDATE_VMSA:
            return self._receive_update_vmsa(body)
        if cmd_id == KVM_SEV_RECEIVE_FINISH:
            return self._status(self.psp.receive_finish(s.handle))
        return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""

    @staticmethod
    def _status(status: int) -> tuple[int, int, bytes]:
        return (-errno.EIO if status else 0), status, b""

    def _init(self, *, es: bool) -> tuple[int, int, bytes]:
        s = self.state
        # sev_guest_init: a vCPU is set up for its VM's kind of guest when it is created (an
        # SEV-ES vCPU gets its VMSA then), so a VM with vCPUs can no longer become an SEV guest.
        if self.vcpus is not None and self.vcpus.vcpu_ids():
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        if s.active:
            return -errno.EBUSY, SEV_RET_NO_FW_CALL, b""
        asid = self.asids.allocate(es=es)
        if asid is None:
            return -errno.EBUSY, SEV_RET_NO_FW_CALL, b""
        status = self.psp.platform_init(es=es)
        if status:
            self.asids.release(asid)
            return -errno.EIO, status, b""
        s.active, s.es, s.asid = True, es, asid
        return 0, SEV_RET_SUCCESS, b""

    def _launch_start(self, body: bytes) -> tuple[int, int, bytes]:
        s = self.state
        handle, policy, _dh, dh_len, _p, _sess, sess_len, _p2 = LAUNCH_START.unpack_from(body)
        blobs = body[LAUNCH_START.size :]
        # SECURITY: lengths come from the VMM; bound them as psp_copy_user_blob does.
        too_big = dh_len > SEV_FW_BLOB_MAX_SIZE or sess_len > SEV_FW_BLOB_MAX_SIZE
        if too_big or len(blobs) != dh_len + sess_len:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        status, handle = self.psp.launch_start(handle, policy, blobs[:dh_len], blobs[dh_len:])
        if status:
            return -errno.EIO, status, b""
        status = self.psp.activate(handle, s.asid)  # sev_bind_asid
        if status:
            self.psp.decommission(handle)
            return -errno.EIO, status, b""
        s.handle = handle
        self.bind_asid(s.asid, s.es)
        return 0, SEV_RET_SUCCESS, LAUNCH_START.pack(handle, policy, 0, 0, 0, 0, 0, 0)

    def _launch_update_vmsa(self) -> tuple[int, int, bytes]:
        """``sev_launch_update_vmsa``: every vCPU's register file, in id order, into its VMSA
        page (plaintext), then the PSP measures, seals and encrypts it; the vCPU is sealed."""
        s = self.state
        if not s.es:
            return -errno.ENOTTY, SEV_RET_NO_FW_CALL, b""
        vcpus = self.vcpus
        vcpu_ids = vcpus.vcpu_ids() if vcpus is not None else []
        if vcpus is None or not vcpu_ids:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        for vcpu_id in vcpu_ids:
            spa = vcpus.sync_vmsa(vcpu_id)  # EINVAL for a vCPU already sealed
            if spa < 0:
                return spa, SEV_RET_NO_FW_CALL, b""
            status = self.psp.launch_update_vmsa(s.handle, spa)
            if status:
                return -errno.EIO, status, b""
            err = vcpus.vmsa_launched(vcpu_id)
            if err:
                return err, SEV_RET_SUCCESS, b""
        return 0, SEV_RET_SUCCESS, b""

    def _launch_secret(self, body: bytes) -> tuple[int, int, bytes]:
        _h, hdr_len, _p, gpa, guest_len, _p1, _t, trans_len, _p2 = LAUNCH_SECRET.unpack_from(body)
        blobs = body[LAUNCH_SECRET.size :]
        if hdr_len > SEV_FW_BLOB_MAX_SIZE or trans_len > SEV_FW_BLOB_MAX_SIZE or (
                len(blobs) != hdr_len + trans_len or guest_len != trans_len or guest_len == 0):
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        chunks = self._chunks(gpa, guest_len)
        if len(chunks) != 1:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""  # KVM: the secret must not cross a page
        spa, _n = chunks[0]
        status = self.psp.launch_secret(self.state.handle, blobs[:hdr_len], spa, guest_len, blobs[hdr_len:])
        return self._status(status)

    def _dbg(self, cmd_id: int, body: bytes) -> tuple[int, int, bytes]:
        src, dst, length, _ = DBG.unpack_from(body)
        if cmd_id == KVM_SEV_DBG_DECRYPT:
            (spa, _n), = self._chunks(src, length)
            status, data = self.psp.dbg_decrypt(self.state.handle, spa, length)
            return ((-errno.EIO, status, b"") if status else (0, SEV_RET_SUCCESS, data))
        (spa, _n), = self._chunks(dst, length)
        return self._status(self.psp.dbg_encrypt(self.state.handle, spa, body[DBG.size :]))

    # --- migration -----------------------------------------------------------

    def _send_start(self, body: bytes) -> tuple[int, int, bytes]:
        (_policy, _p0, _pdh, pdh_len, _p1, _plat, plat_len, _p2, _amd, amd_len, _p3, _sess, session_len,
         _p4) = SEND_START.unpack_from(body)
        handle = self.state.handle
        if session_len == 0:
            # The query (__sev_send_start_query_session_length): the handle only; the firmware
            # answers INVALID_LEN with the length it needs, which KVM copies back.
            status, _pol, _session, need = self.psp.send_start(handle, b"", b"", b"", 0)
            return -errno.EIO if status else 0, status, SEND_START.pack(*[0] * 12, need, 0)
        # SECURITY: lengths come from the VMM; psp_copy_user_blob refuses empty or oversized blobs.
        lengths = (pdh_len, plat_len, amd_len)
        blobs = body[SEND_START.size :]
        if (min(lengths) == 0 or max(*lengths, session_len) > SEV_FW_BLOB_MAX_SIZE
                or len(blobs) != sum(lengths)):
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        pdh, plat = blobs[:pdh_len], blobs[pdh_len : pdh_len + plat_len]
        amd = blobs[pdh_len + plat_len :]
        status, policy, session, out_len = self.psp.send_start(handle, pdh, plat, amd, session_len)
        # The struct goes back whatever happened (policy and session_len as the firmware left them).
        reply = SEND_START.pack(policy, 0, 0, pdh_len, 0, 0, plat_len, 0, 0, amd_len, 0, 0, out_len, 0)
        if status:
            return -errno.EIO, status, reply
        return 0, SEV_RET_SUCCESS, reply + session.ljust(session_len, b"\0")[:session_len]

    def _packet_page(self, gpa: int, length: int) -> int | None:
        """The SPA of ``[gpa, gpa + length)`` if it lies within one page (KVM pins one page)."""
        offset = gpa % PAGE_SIZE
        if length == 0 or length > PAGE_SIZE or offset + length > PAGE_SIZE:
            return None
        (spa, _n), = self._chunks(gpa, length)
        return spa

    def _send_update_data(self, body: bytes) -> tuple[int, int, bytes]:
        fields = SEND_UPDATE_DATA.unpack_from(body)
        hdr_uaddr, hdr_len, _p0, gpa, guest_len, _p1, trans_uaddr, trans_len, _p2 = fields
        handle = self.state.handle
        if hdr_len == 0 or trans_len == 0:
            # The query (__sev_send_update_data_query_lengths): the firmware sees hdr_len 0 and
            # writes back 52; trans_len comes back as the firmware left it, 0.
            status, _hdr, _trans, need = self.psp.send_update_data(handle, 0, 0, 0, 0)
            reply = SEND_UPDATE_DATA.pack(hdr_uaddr, need, 0, gpa, guest_len, 0, trans_uaddr, 0, 0)
            return -errno.EIO if status else 0, status, reply
        if hdr_len > SEND_BUFFER_MAX or trans_len > SEND_BUFFER_MAX:
            return -errno.ENOMEM, SEV_RET_NO_FW_CALL, b""
        # guest_uaddr is a GPA here: 0 is a real page, so only the length and the page bound are checked.
        spa = self._packet_page(gpa, guest_len)
        if spa is None:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""  # at most one page per call
        status, hdr, trans, _hdr_len = self.psp.send_update_data(handle, hdr_len, spa, guest_len, trans_len)
        return self._send_update_reply(status, SEND_UPDATE_DATA.pack(*fields), hdr, hdr_len, trans, trans_len)

    @staticmethod
    def _send_update_reply(status: int, head: bytes, hdr: bytes, hdr_len: int, trans: bytes,
                           trans_len: int) -> tuple[int, int, bytes]:
        if status:
            return -errno.EIO, status, b""
        # KVM's bounce buffers are zeroed and copied out whole: hdr_len and trans_len bytes.
        return 0, SEV_RET_SUCCESS, (head + hdr.ljust(hdr_len, b"\0")[:hdr_len]
                                    + trans.ljust(trans_len, b"\0")[:trans_len])

    def _send_update_vmsa(self, body: bytes) -> tuple[int, int, bytes]:
        fields = SEND_UPDATE_VMSA.unpack_from(body)
        vcpu_id, _p0, hdr_uaddr, hdr_len, _p1, trans_uaddr, trans_len, _p2 = fields
        s = self.state
        if not s.es:
            return -errno.ENOTTY, SEV_RET_NO_FW_CALL, b""
        if hdr_len == 0 or trans_len == 0:  # the query, as for SEND_UPDATE_DATA
            status, _hdr, _trans, need = self.psp.send_update_vmsa(s.handle, 0, 0, 0, 0)
            reply = SEND_UPDATE_VMSA.pack(vcpu_id, 0, hdr_uaddr, need, 0, trans_uaddr, 0, 0)
            return -errno.EIO if status else 0, status, reply
        if hdr_len > SEND_BUFFER_MAX or trans_len > SEND_BUFFER_MAX:
            return -errno.ENOMEM, SEV_RET_NO_FW_CALL, b""
        # #VMEXIT semantics: the vCPU (stopped) stores its registers into its page, encrypted.
        spa = self.vcpus.save_vmsa(vcpu_id) if self.vcpus is not None else -errno.EINVAL
        if spa < 0:
            return spa, SEV_RET_NO_FW_CALL, b""
        status, hdr, trans, _ = self.psp.send_update_vmsa(s.handle, hdr_len, spa, PAGE_SIZE, trans_len)
        return self._send_update_reply(status, SEND_UPDATE_VMSA.pack(*fields), hdr, hdr_len, trans, trans_len)

    def _receive_start(self, body: bytes) -> tuple[int, int, bytes]:
        s = self.state
        handle, policy, _pdh, pdh_len, _p0, _sess, session_len, _p1 = RECEIVE_START.unpack_from(body)
        blobs = body[RECEIVE_START.size :]
        # SECURITY: lengths come from the VMM (the blobs from the source, through the network).
        if (pdh_len == 0 or session_len == 0 or max(pdh_len, session_len) > SEV_FW_BLOB_MAX_SIZE
                or len(blobs) != pdh_len + session_len):
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        status, handle = self.psp.receive_start(handle, policy, blobs[:pdh_len], blobs[pdh_len:])
        if status:
            return -errno.EIO, status, b""
        status = self.psp.activate(handle, s.asid)  # sev_bind_asid, as after LAUNCH_START
        if status:
            self.psp.decommission(handle)
            return -errno.EIO, status, b""
        s.handle = handle
        self.bind_asid(s.asid, s.es)
        return 0, SEV_RET_SUCCESS, RECEIVE_START.pack(handle, policy, 0, pdh_len, 0, 0, session_len, 0)

    def _receive_packet(self, body: bytes, head: struct.Struct, hdr_len: int,
                        trans_len: int) -> tuple[bytes, bytes] | None:
        """The inline header and transport data, or None if the lengths do not add up."""
        blobs = body[head.size :]
        # SECURITY: lengths come from the VMM; psp_copy_user_blob refuses empty or oversized blobs.
        if (hdr_len == 0 or trans_len == 0 or max(hdr_len, trans_len) > SEV_FW_BLOB_MAX_SIZE
                or len(blobs) != hdr_len + trans_len):
            return None
        return blobs[:hdr_len], blobs[hdr_len:]

    def _receive_update_data(self, body: bytes) -> tuple[int, int, bytes]:
        fields = RECEIVE_UPDATE_DATA.unpack_from(body)
        _hdr, hdr_len, _p0, gpa, guest_len, _p1, _trans, trans_len, _p2 = fields
        packet = self._receive_packet(body, RECEIVE_UPDATE_DATA, hdr_len, trans_len)
        if packet is None:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        spa = self._packet_page(gpa, guest_len)
        if spa is None:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""  # at most one page per call
        hdr, trans = packet
        return self._status(self.psp.receive_update_data(self.state.handle, hdr, spa, guest_len, trans))

    def _receive_update_vmsa(self, body: bytes) -> tuple[int, int, bytes]:
        vcpu_id, _p0, _hdr, hdr_len, _p1, _trans, trans_len, _p2 = RECEIVE_UPDATE_VMSA.unpack_from(body)
        s = self.state
        if not s.es:
            return -errno.ENOTTY, SEV_RET_NO_FW_CALL, b""
        packet = self._receive_packet(body, RECEIVE_UPDATE_VMSA, hdr_len, trans_len)
        if packet is None:
            return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""
        spa = self.vcpus.vmsa_page(vcpu_id) if self.vcpus is not None else -errno.EINVAL
        if spa < 0:
            return spa, SEV_RET_NO_FW_CALL, b""
        hdr, trans = packet
        status = self.psp.receive_update_vmsa(s.handle, hdr, spa, PAGE_SIZE, trans)
        if status:
            return -errno.EIO, status, b""  # nothing was written: the vCPU keeps its state
        # The PSP wrote the page under this guest's key; the vCPU takes it as its register file.
        err = self.vcpus.load_vmsa(vcpu_id) if self.vcpus is not None else -errno.EINVAL
        return err, SEV_RET_SUCCESS, b""

    def _chunks(self, gpa: int, length: int) -> list[tuple[int, int]]:
        if length <= 0:
            raise ProtocolError("zero length")
        return self.translate(gpa, length)

    # --- mirror VMs -----------------------------------------------------------

    def copy_enc_context_from(self, source: SevVm) -> int:
        """``sev_vm_copy_enc_context_from``, with both VMs locked: this VM becomes a mirror of
        ``source``, with its ASID, ES flag and handle. ``EINVAL`` (nothing changed) if this VM
        is an SEV guest already (a mirror included) or has vCPUs (they were set up as plain
        vCPUs), or if ``source`` is no SEV guest (no ``KVM_SEV_INIT``) or is itself a mirror."""
        if self.state.active or (self.vcpus is not None and self.vcpus.vcpu_ids()):
            return -errno.EINVAL
        with source._refs:
            # Under the owner's lock: its teardown, which clears its state, cannot interleave.
            s = source.state
            if not s.active or source.enc_context_owner is not None:
                return -errno.EINVAL
            source.mirror_vms.append(self)
            self.state = SevState(active=True, es=s.es, asid=s.asid, handle=s.handle)
            self.enc_context_owner = source
        self.bind_asid(s.asid, s.es)  # for the vCPUs it creates from now on
        return 0

    # --- intra-host migration ---------------------------------------------------

    def check_move_from(self, source: SevVm) -> int:
        """``sev_vm_move_enc_context_from``'s check of the two contexts, with both VMs locked:
        ``EINVAL`` if this VM is an SEV guest already (a mirror included) or ``source`` is no
        SEV guest (never ``KVM_SEV_INIT``, or dead: its context moved away). A mirror may
        move: its destination becomes a mirror of the same owner."""
        if self.state.active or not source.state.active:
            return -errno.EINVAL
        return 0

    def move_enc_context_from(self, source: SevVm) -> None:
        """``sev_migrate_from``, after :meth:`check_move_from`, with both VMs and all their
        vCPUs locked: this VM takes ``source``'s ASID, ES flag and handle, its mirrors (now
        mirrors of this VM) and, if ``source`` is a mirror, its place in its owner's list;
        ``source`` keeps nothing. Issues no PSP command. The caller moves the SEV-ES VMSAs."""
        with source._refs, self._refs:
            # Under the source's lock: a mirror leaving (destroy) finds the owner it has now.
            self.state, source.state = source.state, SevState()
            self.mirror_vms, source.mirror_vms = source.mirror_vms, []
            for mirror in self.mirror_vms:
                mirror.enc_context_owner = self
        while (owner := source.enc_context_owner) is not None:
            with owner._refs:
                if source.enc_context_owner is not owner:
                    continue  # the owner moved meanwhile, and re-pointed source: ask the new one
                owner.mirror_vms[owner.mirror_vms.index(source)] = self
                self.enc_context_owner, source.enc_context_owner = owner, None
                break
        self.bind_asid(self.state.asid, self.state.es)

    def destroy(self) -> None:
        """VM teardown (``sev_vm_destroy``). A mirror leaves its owner's list and owns nothing
        to tear down. An owner's context goes (DEACTIVATE, DECOMMISSION, the ASID freed) once
        its VM and all its mirrors are destroyed, whichever goes last."""
        while (owner := self.enc_context_owner) is not None:
            if owner._put(mirror=self):
                return
        self._put()

    def _put(self, *, mirror: SevVm | None = None) -> bool:
        """The owner's VM is gone (``mirror`` None) or one of its mirrors is: the last one out
        tears the context down. False, with nothing done, if ``mirror`` is not this VM's any
        more (a move re-pointed it to another owner meanwhile)."""
        with self._refs:
            if mirror is None:
                self._released = True
            elif mirror.enc_context_owner is not self:
                return False
            else:
                self.mirror_vms.remove(mirror)
                mirror.enc_context_owner, mirror.state = None, SevState()
            if not self._released or self.mirror_vms:
                return True
            s, self.state = self.state, SevState()
        if s.handle:
            self.psp.deactivate(s.handle)
            self.psp.decommission(s.handle)
        if s.asid:
            self.psp.df_flush()  # a freed ASID is dirty until flushed (Linux flushes before reuse)
            self.asids.release(s.asid)
        return True


def issue_sev_cmd(psp: SecureProcessor, payload: bytes) -> tuple[int, bytes]:
    """``/dev/sev`` ``SEV_ISSUE_CMD``: platform commands (what QEMU's
    ``query-sev-capabilities`` needs). Returns (result, u32 error + outputs)."""
    if len(payload) < 4:
        return -errno.EINVAL, b""
    (cmd,) = struct.unpack_from("<I", payload)
    if cmd == SEV_PDH_CERT_EXPORT:
        # The PDH exists only on an initialised platform; the sev-dev driver INITs it
        # first when needed (sev_ioctl_do_pdh_export).
        status = psp.platform_init(es=True)
        if status:
            return -errno.EIO, struct.pack("<III", status, 0, 0)
        status, pdh, chain = psp.pdh_cert_export()
        if status:
            return -errno.EIO, struct.pack("<III", status, 0, 0)
        return 0, struct.pack("<III", 0, len(pdh), len(chain)) + pdh + chain
    if cmd == SEV_PLATFORM_STATUS:
        status, info = psp.platform_status()
        return (-errno.EIO if status else 0), struct.pack("<I", status) + info
    return -errno.EINVAL, struct.pack("<I", SEV_RET_NO_FW_CALL)


SEV_ISSUE_CMD = (3 << 30) | (16 << 16) | (ord("S") << 8) | 0x0
"""``_IOWR('S', 0x0, struct sev_issue_cmd)`` on /dev/sev (accepted on the /dev/kvm channel)."""

