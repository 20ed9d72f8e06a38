"""The PSP path's records: payloads of CONFIDENTIAL records of subtype PSP_PACKET, sans-IO.

The VMM carries the Secure Processor's packets without reading them; these are the
envelopes (``docs/stream-format.md`` §4.5). A payload starts with a kind byte; integers
are big-endian, as in the rest of the stream::

    SESSION  u8 1 | u32 policy | u32 pdh_len | PDH (the source's) | u32 session_len | session
    PAGE     u8 2 | u64 GPA | u32 hdr_len | packet header | u32 trans_len | transport data
    VMSA     u8 3 | u32 vCPU id | u32 hdr_len | packet header | u32 trans_len | transport data

Decoding checks the envelope only (kind, lengths, bounds, alignment): the packets'
integrity is the target PSP's to check, with its MAC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream.format import ConfidentialSubtype

MAX_CERT: Final = 16 * 1024
"""A PDH certificate is 2084 bytes; room for other formats, not for a flood."""
MAX_SESSION: Final = 0x4000
"""SEV_FW_BLOB_MAX_SIZE: what KVM accepts for a session blob."""
MAX_PACKET_HEADER: Final = 0x100
"""The SEV API's packet header is 52 bytes (flags, IV, MAC)."""

SUBTYPE: Final = ConfidentialSubtype.PSP_PACKET

_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")


class PspRecordKind(IntEnum):
    SESSION = 1
    PAGE = 2
    VMSA = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PspSession:
    """SEND_START's output: opens the PSP stream (the target runs RECEIVE_START on it)."""

    policy: int
    pdh: bytes
    """The source platform's PDH certificate."""
    session: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PspPage:
    """One private page re-encrypted by SEND_UPDATE_DATA."""

    gpa: int
    header: bytes
    transport: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PspVmsa:
    """One SEV-ES vCPU's register file, from SEND_UPDATE_VMSA."""

    vcpu_id: int
    header: bytes
    transport: bytes


PspRecord = PspSession | PspPage | PspVmsa


def encode(record: PspRecord) -> bytes:
    """The payload of the record's CONFIDENTIAL record."""
    match record:
        case PspSession():
            _check_blob(record.pdh, MAX_CERT, "PDH")
            _check_blob(record.session, MAX_SESSION, "session")
            return (bytes([PspRecordKind.SESSION]) + _U32.pack(record.policy) + _blob(record.pdh)
                    + _blob(record.session))
        case PspPage():
            _check_packet(record.header, record.transport)
            return (bytes([PspRecordKind.PAGE]) + _U64.pack(record.gpa) + _blob(record.header)
                    + _blob(record.transport))
        case PspVmsa():
            _check_packet(record.header, record.transport)
            return (bytes([PspRecordKind.VMSA]) + _U32.pack(record.vcpu_id) + _blob(record.header)
                    + _blob(record.transport))


def decode(payload: bytes) -> PspRecord:
    """Parse one payload; :class:`StreamError` for anything that is not exactly one record."""
    # SECURITY: the payload comes from the source host (untrusted): every length is bounded
    # before use, and a page must be one whole, aligned page.
    if not payload:
        raise StreamError("empty PSP record")
    r = _Reader(payload)
    kind = r.u8()
    if kind == PspRecordKind.SESSION:
        policy = r.u32()
        pdh = r.blob(MAX_CERT, "PDH")
        session = r.blob(MAX_SESSION, "session")
        r.end()
        return PspSession(policy=policy, pdh=pdh, session=session)
    if kind == PspRecordKind.PAGE:
        gpa = r.u64()
        header, transport = r.packet()
        if gpa % PAGE_SIZE or len(transport) != PAGE_SIZE:
            raise StreamError(f"PSP page at {gpa:#x} of {len(transport)} bytes: not one whole page")
        return PspPage(gpa=gpa, header=header, transport=transport)
    if kind == PspRecordKind.VMSA:
        vcpu_id = r.u32()
        header, transport = r.packet()
        if len(transport) != PAGE_SIZE:
            raise StreamError(f"VMSA of vCPU {vcpu_id}: {len(transport)} bytes, not one page")
        return PspVmsa(vcpu_id=vcpu_id, header=header, transport=transport)
    raise StreamError(f"unknown PSP record kind {kind}")


def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _check_blob(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise ValueError(f"PSP record: {what} of {len(data)} bytes (limit {limit})")


def _check_packet(header: bytes, transport: bytes) -> None:
    _check_blob(header, MAX_PACKET_HEADER, "packet header")
    if len(transport) != PAGE_SIZE:
        raise ValueError(f"PSP record: transport data of {len(transport)} bytes, not one page")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamError(f"PSP record truncated in its {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1, "kind")[0]

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4, "header"))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8, "header"))[0])

    def blob(self, limit: int, what: str) -> bytes:
        n = self.u32()
        if n > limit:
            raise StreamError(f"PSP record: {what} of {n} bytes (limit {limit})")
        return self._take(n, what)

    def packet(self) -> tuple[bytes, bytes]:
        """The rest of a PAGE or VMSA record: packet header and transport data."""
        header = self.blob(MAX_PACKET_HEADER, "packet header")
        transport = self.blob(PAGE_SIZE, "transport data")
        self.end()
        return header, transport

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StreamError(f"PSP record has {len(self.data) - self.pos} trailing bytes")
