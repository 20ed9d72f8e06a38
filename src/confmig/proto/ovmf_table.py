"""OVMF's GUIDed table: how a firmware image tells its readers where its SEV areas are.

The table sits just below the reset vector, :data:`RESET_VECTOR_TAIL` bytes from
the end of the image (``OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm``), and is
read backwards, as QEMU's ``pc_system_parse_ovmf_flash`` does: a footer GUID and
the table's total length (u16, footer included), then entries, each ending with
its own ``u16 length`` (data, length and GUID) and GUID (EFI byte order)::

    SEV secret block:        le32 base | le32 size | le16 26 | GUID 4c2eb361-...
    Migration Handler block: le32 version | le32 flags | le64 entry rip
                             | le64 mailbox GPA | le32 mailbox size
                             | le32 area size | le16 50 | GUID 6082373e-...
    footer:                  le16 N | GUID 96b582de-1fb2-45f7-baea-a366c55a082d

Three parties read it: the firmware builder writes it, the VMM reads it (where
to inject the owner's secret, where the Migration Handler starts and where its
mailbox is), and the guest owner reads it (an SEV-ES launch measures each MH
vCPU's initial VMSA, whose ``rip`` is the block's entry). Sans-IO; every length
is checked (the image is a file the user gave).

The Migration Handler block (version 2; version 0, or a zero mailbox size, means
"no Migration Handler in this image"): an MH vCPU starts at ``entry rip`` with
``rflags`` 2 and every other register 0; MH vCPU ``i``'s mailbox is at
``mailbox GPA + i * MAILBOX_STRIDE``; ``[mailbox GPA, mailbox GPA + area size)``
is the MH's whole area (mailboxes, then its private state), which a VMM migrates
none of. Flags are 0.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

OVMF_TABLE_FOOTER_GUID: Final = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_SECRET_BLOCK_GUID: Final = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
MIGRATION_HANDLER_BLOCK_GUID: Final = uuid.UUID("6082373e-dfcc-471d-8e58-0008c522a071")
"""confmig's own entry. The 2021 RFC's entry (GUID 5c7db037-ab87-4282-b33c-7894f01471ec)
carried only a 32-bit entry address and QEMU hard-coded the mailbox (0x820000); this one
also says where the mailbox is, so it has a GUID of its own and no RFC reader misreads it."""
RESET_VECTOR_TAIL: Final = 0x20
"""Bytes after the table: OVMF's AP entry point and reset vector."""
MIGRATION_HANDLER_VERSION: Final = 2
MH_INITIAL_RFLAGS: Final = 0x2
"""An MH vCPU's ``rflags`` at its entry (bit 1 is reserved, always set)."""

_GUID_AND_LENGTH: Final = 18
SEV_SECRET_BLOCK: Final = struct.Struct("<II")
"""base, size."""
MIGRATION_HANDLER_BLOCK: Final = struct.Struct("<IIQQII")
"""version, flags, entry rip, mailbox GPA, mailbox size, area size."""


@dataclass(frozen=True, slots=True)
class MigrationHandlerBlock:
    """Where the firmware's Migration Handler starts and where its mailbox is."""

    version: int
    entry: int
    mailbox_gpa: int
    mailbox_size: int
    area_size: int
    """The whole area the MH owns, from ``mailbox_gpa``: never migrated as guest memory."""

    def encode(self) -> bytes:
        return MIGRATION_HANDLER_BLOCK.pack(self.version, 0, self.entry, self.mailbox_gpa,
                                            self.mailbox_size, self.area_size)


def table_entry(guid: uuid.UUID, data: bytes) -> bytes:
    """One entry: data, then its length and GUID."""
    return data + struct.pack("<H", len(data) + _GUID_AND_LENGTH) + guid.bytes_le


def encode_table(entries: Iterable[tuple[uuid.UUID, bytes]]) -> bytes:
    """The table with its footer, as it ends just below the reset vector."""
    body = b"".join(table_entry(guid, data) for guid, data in entries)
    return body + struct.pack("<H", len(body) + _GUID_AND_LENGTH) + OVMF_TABLE_FOOTER_GUID.bytes_le


def parse_table(image: bytes) -> dict[uuid.UUID, bytes]:
    """The entries of an image's table; empty if there is none. A malformed entry ends the
    walk (QEMU does the same)."""
    # SECURITY: the image is a file the user gave; every length is checked.
    end = len(image) - RESET_VECTOR_TAIL
    if end < _GUID_AND_LENGTH or uuid.UUID(bytes_le=image[end - 16 : end]) != OVMF_TABLE_FOOTER_GUID:
        return {}
    (total,) = struct.unpack_from("<H", image, end - _GUID_AND_LENGTH)
    size = total - _GUID_AND_LENGTH
    if size <= 0 or size > end - _GUID_AND_LENGTH:
        return {}
    table = image[end - _GUID_AND_LENGTH - size : end - _GUID_AND_LENGTH]
    entries: dict[uuid.UUID, bytes] = {}
    while len(table) >= _GUID_AND_LENGTH:
        guid = uuid.UUID(bytes_le=table[-16:])
        (length,) = struct.unpack_from("<H", table, len(table) - _GUID_AND_LENGTH)
        if length < _GUID_AND_LENGTH or length > len(table):
            break
        entries[guid] = table[len(table) - length : len(table) - _GUID_AND_LENGTH]
        table = table[: len(table) - length]
    return entries


def secret_area(table: dict[uuid.UUID, bytes]) -> tuple[int, int] | None:
    """(GPA, size) of the SEV secret area, if the table declares one."""
    entry = table.get(SEV_SECRET_BLOCK_GUID)
    if entry is None or len(entry) < SEV_SECRET_BLOCK.size:
        return None
    base, size = SEV_SECRET_BLOCK.unpack_from(entry)
    return int(base), int(size)


def migration_handler(table: dict[uuid.UUID, bytes]) -> MigrationHandlerBlock | None:
    """The Migration Handler the table declares, if any (version 0 or no mailbox: none)."""
    entry = table.get(MIGRATION_HANDLER_BLOCK_GUID)
    if entry is None or len(entry) < MIGRATION_HANDLER_BLOCK.size:
        return None
    version, _flags, rip, gpa, size, area = MIGRATION_HANDLER_BLOCK.unpack_from(entry)
    if version == 0 or size == 0:
        return None  # reserved: this image has no Migration Handler
    return MigrationHandlerBlock(version=version, entry=rip, mailbox_gpa=gpa, mailbox_size=size,
                                 area_size=max(area, size))
