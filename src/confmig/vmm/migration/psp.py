"""The PSP backend of the migration engine: SEV guests migrated the "slow" way.

The Secure Processor re-encrypts each private page from the guest's memory key
to a transport key it shares with the target's PSP (SEND_UPDATE_DATA on the
source, RECEIVE_UPDATE_DATA on the target); the VMM moves packets it cannot
read. Shared pages, which the guest reported with ``KVM_HC_MAP_GPA_RANGE``, go
as ordinary RAM records, and so do pages never written (zero on the host's
side of the source, so zero on the target's too).

On the wire everything confidential is a CONFIDENTIAL RAM record of subtype
PSP_PACKET (``docs/stream-format.md`` §4.5) whose payload starts with a kind
byte (integers big-endian, as the rest of the stream)::

    SESSION  u8 1 | u32 policy | u32 pdh_len | PDH (the source's) | u32 session_len | session
    PAGE     u8 2 | u64 GPA | u32 hdr_len | packet header | u32 trans_len | transport data
    VMSA     u8 3 | u32 vCPU id | u32 hdr_len | packet header | u32 trans_len | transport data

VMSA records (SEV-ES: a vCPU's register file, encrypted in its VMSA) follow the
last RAM round, while the vCPUs are stopped; the ``cpu`` device sections of an
SEV-ES guest carry zeros where a plain guest's registers are.

The SESSION record comes before any PAGE record (QEMU's order: the SEND_START
output precedes the first encrypted page). The shared-regions list follows the
last round as a SHARED_REGIONS record, so that the target knows which pages
are shared before its guest runs.
"""

from __future__ import annotations

import base64
import socket
import struct
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.errors import MigrationError, StreamError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream import encoder as enc
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink, RoundCounters
from confmig.vmm.migration.stats import ConfidentialCounters
from confmig.vmm.sev import SevGuest
from confmig.vmm.shared_regions import SharedRegions

_U32: Final = struct.Struct(">I")
_PAGE_HEAD: Final = struct.Struct(">BQI")
MAX_CERT: Final = 16 * 1024
MAX_SESSION: Final = 0x4000
"""SEV_FW_BLOB_MAX_SIZE: what KVM accepts for a session blob."""
MAX_PACKET_HEADER: Final = 0x100
SOCKET_BUFFER: Final = 256 * 1024
"""Socket buffers of a PSP migration, each way. The target's PSP is the bottleneck
(one RECEIVE_UPDATE_DATA per page): whatever sits in the buffers at switch-over is
downtime the source's estimate cannot see, so they are kept small (about 15 ms of
target PSP work at the 17 MB/s of benchmarks/psp-20261201-142251.md) instead of the
megabytes TCP autotuning grows them to (584 ms of downtime in psp-20261201-134949.md)."""


class PspRecord(IntEnum):
    SESSION = 1
    PAGE = 2
    VMSA = 3


def session_record(policy: int, pdh: bytes, session: bytes) -> bytes:
    payload = (bytes([PspRecord.SESSION]) + _U32.pack(policy) + _U32.pack(len(pdh)) + pdh
               + _U32.pack(len(session)) + session)
    return enc.confidential_record(ConfidentialSubtype.PSP_PACKET, payload)


def page_record(gpa: int, hdr: bytes, trans: bytes) -> bytes:
    payload = _PAGE_HEAD.pack(PspRecord.PAGE, gpa, len(hdr)) + hdr + _U32.pack(len(trans)) + trans
    return enc.confidential_record(ConfidentialSubtype.PSP_PACKET, payload)


def vmsa_record(vcpu_id: int, hdr: bytes, trans: bytes) -> bytes:
    payload = (bytes([PspRecord.VMSA]) + _U32.pack(vcpu_id) + _U32.pack(len(hdr)) + hdr
               + _U32.pack(len(trans)) + trans)
    return enc.confidential_record(ConfidentialSubtype.PSP_PACKET, payload)


def shared_regions_record(shared: SharedRegions) -> bytes:
    return enc.confidential_record(ConfidentialSubtype.SHARED_REGIONS, shared.encode())


def block_gpas(block: RamBlock, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The guest-physical address of each page index of ``block``."""
    gpas = np.full(len(indices), -1, dtype=np.int64)
    offsets = indices << PAGE_SHIFT
    for r in block.regions:
        inside = (offsets >= r.offset) & (offsets < r.offset + r.size)
        gpas[inside] = offsets[inside] - r.offset + r.gpa
    return gpas


def bound_socket_buffer(sock: socket.socket | None, option: int) -> None:
    """Keep a PSP migration's in-flight bytes small (:data:`SOCKET_BUFFER`)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class PspPageSink:
    """Private pages through the PSP, one SEND_UPDATE_DATA each; shared ones as plain RAM."""

    def __init__(self, plain: MainChannelSink, sev: SevGuest, counters: ConfidentialCounters) -> None:
        self.plain = plain
        self.sev = sev
        self.counters = counters

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        gpas = block_gpas(block, indices)
        shared = self.sev.shared.shared_mask(gpas >> PAGE_SHIFT)
        total = self.plain.pages(block, indices[shared]) if shared.any() else RoundCounters()
        self.counters.shared_pages += int(np.count_nonzero(shared))
        private, gpas = indices[~shared], gpas[~shared]
        # A private page that is all zero on the host's side was never written through the
        # memory encryption (ciphertext is never all zero): it goes as a zero page, which
        # leaves the target's host-side bytes the same, as for never-written pages.
        untouched = ~block.pages[private].any(axis=1)
        if untouched.any():
            z = self.plain.zeros(block, private[untouched])
            total.zero += z.zero
            total.bytes += z.bytes
        records = [page_record(int(gpa), *self.sev.send_update_data(int(gpa))) for gpa in gpas[~untouched]]
        if records:
            total.bytes += self.plain.channel.send_all(b"".join(records))
            total.normal += len(records)
            self.counters.private_pages += len(records)
            self.counters.psp_commands += len(records)
        return total

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self.plain.zeros(block, indices)


class PspOutgoing:
    """The source's side: SEND_START, the page sink, the VMSAs and the shared-regions list
    at switch-over, SEND_FINISH, or SEND_CANCEL when the migration does not complete."""

    def __init__(self, sev: SevGuest, params: MigrationParameters, plain: MainChannelSink,
                 counters: ConfidentialCounters) -> None:
        if "multifd" in params.capabilities:
            raise MigrationError("multifd is not supported for SEV guests: the PSP path sends every "
                                 "page through the main channel")
        if not params.sev_pdh or not params.sev_plat_cert or not params.sev_amd_cert:
            raise MigrationError("SEV: set the migration parameters sev-pdh and sev-plat-cert to the "
                                 "target's 'pdh' and 'cert-chain' from its query-sev-capabilities, and "
                                 "sev-amd-cert to the AMD chain ASK || ARK ('confmig amd-certs')")
        self.sev = sev
        self.params = params
        self.counters = counters
        self.sink = PspPageSink(plain, sev, counters)
        self.sending = False
        """SEND_START done and neither SEND_FINISH nor SEND_CANCEL yet."""
        bound_socket_buffer(plain.channel.sock, socket.SO_SNDBUF)

    def session_record(self) -> bytes:
        """SEND_START for the target's certificates: the record that opens the stream."""
        p = self.params
        policy, session = self.sev.send_start(base64.b64decode(p.sev_pdh), base64.b64decode(p.sev_plat_cert),
                                              base64.b64decode(p.sev_amd_cert))
        self.sending = True
        self.counters.psp_commands += 2  # the length query, then the command
        own_pdh, _chain = self.sev.capabilities_raw()
        return session_record(policy, own_pdh, session)

    def final_records(self, vcpu_ids: list[int]) -> bytes:
        """At switch-over (vCPUs stopped): each vCPU's VMSA (SEV-ES), then the shared-regions list."""
        records = []
        if self.sev.config.es:
            for vcpu_id in vcpu_ids:
                records.append(vmsa_record(vcpu_id, *self.sev.send_update_vmsa(vcpu_id)))
                self.counters.psp_commands += 1
        return b"".join(records) + shared_regions_record(self.sev.shared)

    def finish(self) -> None:
        self.sev.send_finish()
        self.sending = False
        self.counters.psp_commands += 1

    def cancel(self) -> None:
        """The migration did not complete: the PSP's guest goes back to RUNNING."""
        if self.sending:
            self.sending = False
            self.sev.send_cancel()
            self.counters.psp_commands += 1


class PspLanding:
    """The target's side: RECEIVE_START on the session, RECEIVE_UPDATE_DATA per page."""

    def __init__(self, sev: SevGuest, memory: GuestMemory, counters: ConfidentialCounters,
                 vcpu_ids: set[int]) -> None:
        self.sev = sev
        self.memory = memory
        self.vcpu_ids = vcpu_ids
        self.vmsas: set[int] = set()
        """vCPUs whose VMSA arrived (SEV-ES)."""
        self.counters = counters
        self.started = False

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        # SECURITY: the payload comes from the source host (untrusted); every length and
        # address is checked here, and the PSP checks the packet's MAC before writing.
        if subtype == ConfidentialSubtype.SHARED_REGIONS:
            self.sev.shared = SharedRegions.decode(payload)
            return
        if subtype != ConfidentialSubtype.PSP_PACKET:
            raise StreamError(f"confidential record {subtype.name} is not for the PSP path")
        if not payload:
            raise StreamError("empty PSP record")
        kind, r = payload[0], _Reader(payload, 1)
        if kind == PspRecord.SESSION:
            if self.started:
                raise StreamError("a second PSP session in one stream")
            policy = r.u32()
            pdh = r.blob(MAX_CERT, "PDH")
            session = r.blob(MAX_SESSION, "session")
            r.end()
            self.sev.receive_start(policy, pdh, session)
            self.started = True
            self.counters.psp_commands += 1
        elif kind == PspRecord.PAGE:
            if not self.started:
                raise StreamError("a PSP page before the PSP session")
            gpa = r.u64()
            hdr = r.blob(MAX_PACKET_HEADER, "packet header")
            trans = r.blob(PAGE_SIZE, "transport data")
            r.end()
            if gpa % PAGE_SIZE or len(trans) != PAGE_SIZE:
                raise StreamError(f"PSP page at {gpa:#x} of {len(trans)} bytes: not one whole page")
            try:
                self.memory.translate(gpa, PAGE_SIZE)
            except ValueError:
                raise StreamError(f"PSP page at {gpa:#x} is outside guest RAM") from None
            self.sev.receive_update_data(gpa, hdr, trans)
            self.counters.private_pages += 1
            self.counters.psp_commands += 1
        elif kind == PspRecord.VMSA:
            if not self.started or not self.sev.config.es:
                raise StreamError("a VMSA record for a guest that is not SEV-ES (or before the session)")
            vcpu_id = r.u32()
            hdr = r.blob(MAX_PACKET_HEADER, "packet header")
            trans = r.blob(PAGE_SIZE, "transport data")
            r.end()
            if vcpu_id not in self.vcpu_ids or vcpu_id in self.vmsas:
                raise StreamError(f"VMSA record for vCPU {vcpu_id}: no such vCPU, or a second one")
            self.sev.receive_update_vmsa(vcpu_id, hdr, trans)
            self.vmsas.add(vcpu_id)
            self.counters.psp_commands += 1
        else:
            raise StreamError(f"unknown PSP record kind {kind}")


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamError(f"PSP record truncated in its {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4, "header"))[0])

    def u64(self) -> int:
        return int.from_bytes(self._take(8, "header"), "big")

    def blob(self, limit: int, what: str) -> bytes:
        n = self.u32()
        if n > limit:
            raise StreamError(f"PSP record: {what} of {n} bytes (limit {limit})")
        return self._take(n, what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StreamError(f"PSP record has {len(self.data) - self.pos} trailing bytes")
