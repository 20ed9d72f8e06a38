"""The SEV launch secret: the table the guest owner injects into the secret area.

The layout is OVMF's, as Linux's ``efi_secret`` driver and GRUB's
``efisecret`` read it: little-endian, packed, GUIDs in EFI byte order::

    header  GUID 1e74f542-71dd-4d66-963e-ef4287ff173b (16) | le32 length: header + entries
    entry   GUID (16) | le32 length: this entry, 20 + len(data) | data
    ...     entries follow each other unaligned; zero padding after the table
            (LAUNCH_SECRET moves 16-byte blocks) is not counted in the length

Entries with the NULL GUID are deleted entries and are skipped, as
``efi_secret`` does. The owner builds this table
(``confmig.owner.secret_table``); guest code must not import the owner, so
the numbers are repeated here, as a driver repeats its device's specification.

Parsing is pure and never raises: whatever the area holds (an SEV guest that
was given no secret reads ciphertext garbage there), the result is a
:class:`SecretTable` whose :attr:`~SecretTable.status` says what was found.
The result names entries by GUID, offset and length only; the secret bytes
stay in the area until their user reads them (:func:`entry_data`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

SECRET_TABLE_HEADER_GUID: Final = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
MIGRATION_TRANSPORT_KEY_GUID: Final = uuid.UUID("6845d1fd-39d8-45ee-b008-6e296a740351")
"""confmig's entry: the transport key the Migration Handlers of a migrating guest share."""
MIGRATION_TICKET_GUID: Final = uuid.UUID("5940d2e7-9131-426a-9238-6c50e7597a32")
"""confmig's entry, only in a migration target's secret: the owner's ticket (16 bytes), drawn
by its key broker for this one launch. Present, the guest is a migration target."""
MIGRATION_TARGET_KEY_GUID: Final = uuid.UUID("b67640d0-3d72-4b73-b844-f508029ada6f")
"""confmig's entry, only in a migration target's secret: the ticket's key (32 bytes), derived
from the guest's transport key; it opens the one migration sealed for this ticket. A target
never gets the guest's own key from the owner: it arrives with the guest's memory."""
MIGRATION_V1_ALLOWED_GUID: Final = uuid.UUID("d5b06470-c9eb-4c99-9417-3fecd60130a0")
"""confmig's entry: present (one byte, 1), the owner lets the Migration Handler speak the 2021
RFC's version 1, which has no completion record and no run gate: a host that chooses it can
run a target with pages missing, or more than one. Absent, version-1 INIT is refused."""
DISK_PASSPHRASE_GUID: Final = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
"""The entry GRUB's ``efisecret`` reads as the disk passphrase (for reference)."""
NULL_GUID: Final = uuid.UUID(int=0)
SECRET_ENTRIES_MAX: Final = 16
"""Entries the firmware records; later ones are not looked at (``efi_secret`` stops at 64)."""

_HEADER: Final = struct.Struct("<16sI")
HEADER_SIZE: Final = _HEADER.size


class SecretStatus(IntEnum):
    """What the secret area held, as the firmware records it in the boot info."""

    ABSENT = 0
    """Not an SEV guest: the area was not read."""
    VALID = 1
    NO_TABLE = 2
    """The area does not start with the header GUID: no secret was injected."""
    TOO_SMALL = 3
    TOO_BIG = 4
    CORRUPTED = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretEntry:
    guid: uuid.UUID
    offset: int
    """Where the entry's data starts in the area."""
    length: int
    """Bytes of data (the entry's length less its 20-byte header)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretTable:
    status: SecretStatus
    entries: tuple[SecretEntry, ...] = ()
    detail: str = ""
    """For a table that is ignored: why."""

    @property
    def line(self) -> str:
        """What the firmware prints about it (never any secret byte)."""
        prefix = "confmig firmware: launch secret:"
        if self.status == SecretStatus.VALID:
            n = len(self.entries)
            return f"{prefix} {n} {'entry' if n == 1 else 'entries'}"
        if self.status == SecretStatus.NO_TABLE:
            return f"{prefix} none (the secret area holds no secret table)"
        if self.status == SecretStatus.ABSENT:
            return f"{prefix} none (not an SEV guest)"
        return f"{prefix} ignored ({self.detail})"


def parse_secret_table(area: bytes) -> SecretTable:
    """The table in ``area`` (the whole secret area), checked as ``efi_secret`` checks it."""
    # SECURITY: the host cannot write the private secret area in plaintext, but it can
    # corrupt its ciphertext or skip LAUNCH_SECRET: any bytes must parse to a verdict.
    if len(area) < HEADER_SIZE:
        return SecretTable(status=SecretStatus.TOO_SMALL, detail=f"area of {len(area)} bytes")
    raw_guid, total = _HEADER.unpack_from(area)
    if uuid.UUID(bytes_le=raw_guid) != SECRET_TABLE_HEADER_GUID:
        return SecretTable(status=SecretStatus.NO_TABLE)
    if total < HEADER_SIZE:
        return SecretTable(status=SecretStatus.TOO_SMALL, detail=f"table length {total} is too small")
    if total > len(area):
        return SecretTable(
            status=SecretStatus.TOO_BIG,
            detail=f"table length {total} exceeds the {len(area)}-byte secret area",
        )
    entries: list[SecretEntry] = []
    pos, left, index = HEADER_SIZE, total - HEADER_SIZE, 0
    while left >= HEADER_SIZE and len(entries) < SECRET_ENTRIES_MAX:
        raw_guid, length = _HEADER.unpack_from(area, pos)
        if length < HEADER_SIZE or length > left:
            # SECURITY: the detail is printed on the console. Once one length is damaged,
            # later "headers" may lie inside secret data: never print a value read there
            # (a length, an offset), only the entry's index and the header's total.
            return SecretTable(
                status=SecretStatus.CORRUPTED,
                detail=f"entry {index} has a length outside the table's {total} bytes",
            )
        guid = uuid.UUID(bytes_le=raw_guid)
        if guid != NULL_GUID:
            entries.append(SecretEntry(guid=guid, offset=pos + HEADER_SIZE, length=length - HEADER_SIZE))
        pos, left, index = pos + length, left - length, index + 1
    return SecretTable(status=SecretStatus.VALID, entries=tuple(entries))


def entry_data(area: bytes, entry: SecretEntry) -> bytes:
    """The data of ``entry`` (secret: keep it in guest memory)."""
    return area[entry.offset : entry.offset + entry.length]


def find_entry(table: SecretTable, guid: uuid.UUID) -> SecretEntry | None:
    return next((e for e in table.entries if e.guid == guid), None)
