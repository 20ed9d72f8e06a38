"""The firmware image (``-bios``), as the VMM handles it: mapped below 4 GiB like
QEMU maps OVMF's flash, and read for its OVMF GUIDed table, from which QEMU
learns where the SEV secret area is (``pc_system_ovmf_table_find``).

The table sits just below the reset vector, 0x20 bytes from the end of the
image, and is read backwards: a footer GUID, the table's total length (u16),
then entries each ending with ``u16 length`` and a GUID.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confmig.common.errors import ConfigError
from confmig.common.units import PAGE_SIZE, GiB, MiB

OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_SECRET_BLOCK_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
MIGRATION_HANDLER_BLOCK_GUID = uuid.UUID("6082373e-dfcc-471d-8e58-0008c522a071")
"""confmig's entry: the Migration Handler's entry point and mailbox (the 2021 RFC left its
discovery as a TODO and hard-coded 0x823000 and 0x820000)."""
_MH_BLOCK = struct.Struct("<IIQQII")
"""version, flags, entry rip, mailbox GPA, mailbox size, MH area size (from the mailbox GPA on:
the mailboxes, then the MH's own state)."""
MAX_IMAGE_SIZE = 16 * MiB
"""QEMU's flash region below 4 GiB is bounded; so is ours."""
_TAIL = 0x20
"""Bytes after the table: the reset vector and its padding."""


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    data: bytes
    table: dict[uuid.UUID, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> FirmwareImage:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"-bios: cannot read {path}: {exc.strerror}") from None
        if not data or len(data) > MAX_IMAGE_SIZE or len(data) % PAGE_SIZE:
            raise ConfigError(f"-bios: {path}: size {len(data)} is not a multiple of 4 KiB up to 16 MiB")
        return cls(data, parse_ovmf_table(data))

    @property
    def gpa(self) -> int:
        """Mapped so that it ends at 4 GiB, as pflash is."""
        return 4 * GiB - len(self.data)

    def secret_area(self) -> tuple[int, int] | None:
        """(GPA, size) of the SEV secret area, if the firmware declares one."""
        entry = self.table.get(SEV_SECRET_BLOCK_GUID)
        if entry is None or len(entry) < 8:
            return None
        base, size = struct.unpack_from("<II", entry)
        return base, size

    def migration_handler(self) -> MigrationHandlerBlock | None:
        """The Migration Handler the image declares, if any (version 0 or no entry: none)."""
        return _migration_handler(self.table)


@dataclass(frozen=True, slots=True)
class MigrationHandlerBlock:
    """Where the firmware's Migration Handler starts and where its mailbox is."""

    version: int
    entry: int
    mailbox_gpa: int
    mailbox_size: int
    area_size: int
    """The whole area the MH owns, from ``mailbox_gpa``: never migrated as guest memory."""


def _migration_handler(table: dict[uuid.UUID, bytes]) -> MigrationHandlerBlock | None:
    entry = table.get(MIGRATION_HANDLER_BLOCK_GUID)
    if entry is None or len(entry) < _MH_BLOCK.size:
        return None
    version, _flags, rip, gpa, size, area = _MH_BLOCK.unpack_from(entry)
    if version == 0 or size == 0:
        return None  # reserved: this image has no Migration Handler
    return MigrationHandlerBlock(version=version, entry=rip, mailbox_gpa=gpa, mailbox_size=size,
                                 area_size=max(area, size))


def parse_ovmf_table(image: bytes) -> dict[uuid.UUID, bytes]:
    """The GUIDed table of an OVMF-style image; empty if there is none. Malformed
    entries end the walk (QEMU does the same)."""
    # SECURITY: the image is a file the user gave us; every length is checked.
    end = len(image) - _TAIL
    if end < 18 or uuid.UUID(bytes_le=image[end - 16 : end]) != OVMF_TABLE_FOOTER_GUID:
        return {}
    pos = end - 16
    (total,) = struct.unpack_from("<H", image, pos - 2)
    size = total - 16 - 2
    if size <= 0 or size > pos - 2:
        return {}
    table = image[pos - 2 - size : pos - 2]
    entries: dict[uuid.UUID, bytes] = {}
    while len(table) >= 18:
        guid = uuid.UUID(bytes_le=table[-16:])
        (length,) = struct.unpack_from("<H", table, len(table) - 18)
        if length < 18 or length > len(table):
            break
        entries[guid] = table[len(table) - length : len(table) - 18]
        table = table[: len(table) - length]
    return entries
