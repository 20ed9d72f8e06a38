"""KVM's SEV support: ``KVM_MEMORY_ENCRYPT_OP`` and ``/dev/sev``'s ``SEV_ISSUE_CMD``.

What real KVM does in ``arch/x86/kvm/svm/sev.c``, for the launch path: give an
SEV VM an ASID, turn the VMM's requests into PSP commands (with guest
addresses translated to system-physical ones), bind the guest's handle to its
ASID (ACTIVATE), and pass the firmware's status code back in ``error``.

One deviation, forced by processes: KVM reads user buffers through pointers
into the VMM's memory, which another process cannot follow. So in each
``struct kvm_sev_*`` the pointer fields that point into *guest RAM* carry a
guest-physical address, and the buffers the VMM passes by pointer (certificates,
session blob, packet header, transport data) follow the struct inline, in the
order of the struct's fields; outputs come back in the reply. Lengths keep
their meaning, including the zero-length queries QEMU relies on.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass

from confmig.common.errors import ProtocolError
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
KVM_SEV_GUEST_STATUS = 16
KVM_SEV_DBG_DECRYPT = 17
KVM_SEV_DBG_ENCRYPT = 18

# /dev/sev (include/uapi/linux/psp-sev.h)
SEV_PLATFORM_STATUS = 1
SEV_PDH_CERT_EXPORT = 5

SEV_RET_SUCCESS = 0
SEV_RET_INVALID_LEN = 0x04
SEV_RET_NO_FW_CALL = 0xFFFF_FFFF
"""-1 as u32: the firmware was never called (KVM refused first)."""
SEV_FW_BLOB_MAX_SIZE = 0x4000
MAX_ASID = 509
MEASUREMENT_LEN = 48
"""LAUNCH_MEASURE output: 32-byte measurement and 16-byte mnonce."""

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

Translate = Callable[[int, int], list[tuple[int, int]]]
"""GPA range → list of (SPA, length) chunks, each physically contiguous."""


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
                 bind_asid: Callable[[int, bool], None], protect_vcpus: Callable[[], int]) -> None:
        self.protect_vcpus = protect_vcpus
        self.psp = psp
        self.asids = asids
        self.translate = translate
        self.bind_asid = bind_asid
        self.state = SevState()

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
        if cmd_id in (KVM_SEV_INIT, KVM_SEV_ES_INIT):
            return self._init(es=cmd_id == KVM_SEV_ES_INIT)
        if not s.active:
            return -errno.ENOTTY, SEV_RET_NO_FW_CALL, b""
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
            if not s.es:
                return -errno.ENOTTY, SEV_RET_NO_FW_CALL, b""
            # The register file is sealed for every vCPU. (The VMSA page image itself is
            # not modelled yet: the registers stay in the emulated core, out of the host's reach.)
            return (0 if self.protect_vcpus() else -errno.EINVAL), SEV_RET_SUCCESS, b""
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
        return -errno.EINVAL, SEV_RET_NO_FW_CALL, b""

    @staticmethod
    def _status(status: int) -> tuple[int, int, bytes]:
        return (-errno.EIO if status else 0), status, b""

    def _init(self, *, es: bool) -> tuple[int, int, bytes]:
        s = self.state
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

    def _chunks(self, gpa: int, length: int) -> list[tuple[int, int]]:
        if length <= 0:
            raise ProtocolError("zero length")
        return self.translate(gpa, length)

    def destroy(self) -> None:
        """VM teardown: DEACTIVATE, DECOMMISSION, free the ASID (``sev_vm_destroy``)."""
        s = self.state
        if s.handle:
            self.psp.deactivate(s.handle)
            self.psp.decommission(s.handle)
        if s.asid:
            self.psp.df_flush()  # a freed ASID is dirty until flushed (Linux flushes before reuse)
            self.asids.release(s.asid)
        self.state = SevState()


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

