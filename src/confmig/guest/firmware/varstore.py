"""The firmware's UEFI variable store: one private page the kernel reads as EFI
runtime services would (``GetVariable``).

Layout (little-endian; GUIDs in EFI byte order)::

    +0   8s    magic "CMVARS01"
    +8   le32  variable count
    +12  le32  bytes of variables after the header
    +16  variables, each 8-byte aligned:
         16s GUID | le32 attributes | le32 name size | le32 data size | le32 0
         name (UTF-16LE with its NUL, as UEFI's CHAR16 names) | data

The firmware formats it at reset and sets variables before handing over; the
kernel only reads. The store is guest-private: a store that does not parse
(corrupted ciphertext in an SEV guest) reads as empty rather than crashing.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Final

from confmig.guest.mem_encrypt import private
from confmig.platform.cpu.abi import GuestCpu, GuestFault

VARSTORE_MAGIC: Final = b"CMVARS01"
EFI_VARIABLE_NON_VOLATILE: Final = 0x1
EFI_VARIABLE_BOOTSERVICE_ACCESS: Final = 0x2
EFI_VARIABLE_RUNTIME_ACCESS: Final = 0x4

AMD_SEV_MEM_ENCRYPT_GUID: Final = uuid.UUID("0cf29b71-9e51-433a-a3b7-81f3ab16b875")
"""OVMF's ``gAmdSevMemEncryptGuid`` (Linux: ``AMD_SEV_MEM_ENCRYPT_GUID``)."""
SEV_LIVE_MIGRATION_ENABLED: Final = "SevLiveMigrationEnabled"
"""Set (1-byte TRUE, NV|BS|RT) by OVMF's ``AmdSevDxe`` when the hypervisor offers
migration control; the guest kernel allows migration only if it is set."""

_HEADER: Final = struct.Struct("<8sII")
_VARIABLE: Final = struct.Struct("<16sIIII")


@dataclass(frozen=True, slots=True, kw_only=True)
class Variable:
    name: str
    guid: uuid.UUID
    attributes: int
    data: bytes


def encode(variables: list[Variable], size: int) -> bytes:
    body = b""
    for v in variables:
        name = (v.name + "\0").encode("utf-16-le")
        record = _VARIABLE.pack(v.guid.bytes_le, v.attributes, len(name), len(v.data), 0) + name + v.data
        body += record + bytes(-len(record) % 8)
    raw = _HEADER.pack(VARSTORE_MAGIC, len(variables), len(body)) + body
    if len(raw) > size:
        raise GuestFault(f"varstore: {len(raw)} bytes of variables do not fit in {size}")
    return raw


def decode(raw: bytes) -> list[Variable]:
    """The variables in a store image; an unformatted or damaged store holds none
    (a damaged tail is dropped)."""
    if len(raw) < _HEADER.size:
        return []
    magic, count, used = _HEADER.unpack_from(raw)
    if magic != VARSTORE_MAGIC:
        return []
    end = min(len(raw), _HEADER.size + used)
    out: list[Variable] = []
    pos = _HEADER.size
    while len(out) < count and pos + _VARIABLE.size <= end:
        raw_guid, attributes, name_size, data_size, _ = _VARIABLE.unpack_from(raw, pos)
        start = pos + _VARIABLE.size
        stop = start + name_size + data_size
        if stop > end or name_size < 2 or name_size % 2:
            break
        name = raw[start : start + name_size].decode("utf-16-le", errors="replace").rstrip("\0")
        out.append(Variable(name=name, guid=uuid.UUID(bytes_le=raw_guid), attributes=attributes,
                            data=raw[start + name_size : stop]))
        pos = stop + (-(stop - pos) % 8)
    return out


def format_store(cpu: GuestCpu, base: int, size: int) -> None:
    cpu.write(private(cpu, base), encode([], size).ljust(size, b"\0"))


def get_variable(cpu: GuestCpu, base: int, size: int, name: str, guid: uuid.UUID,
                 mask: int | None = None) -> Variable | None:
    """``GetVariable``: the variable, or None (EFI_NOT_FOUND). ``mask``: the step's
    encryption mask, if it knows it."""
    raw = cpu.read(private(cpu, base, mask), size)
    return next((v for v in decode(raw) if v.name == name and v.guid == guid), None)


def set_variable(cpu: GuestCpu, base: int, size: int, variable: Variable) -> None:
    """``SetVariable``: add or replace (by name and GUID)."""
    kept = [v for v in decode(cpu.read(private(cpu, base), size))
            if (v.name, v.guid) != (variable.name, variable.guid)]
    cpu.write(private(cpu, base), encode([*kept, variable], size))
