"""The SEV secret table: what the owner injects with LAUNCH_SECRET into the guest's secret area.

OVMF reserves the secret area and Linux's ``efi_secret`` (and GRUB's
``efisecret``) read it in this layout: little-endian, packed, GUIDs in EFI
byte order (:attr:`uuid.UUID.bytes_le`)::

    header  GUID 1e74f542-71dd-4d66-963e-ef4287ff173b (16) | length u32: header + all entries
    entry   GUID (16) | length u32: this entry, 20 + len(data) | data
    ...     (entries follow each other with no alignment)
    zeros   up to a multiple of 16 bytes; not counted in the header's length

The padding is there because LAUNCH_SECRET moves whole 16-byte blocks. The
guest side (``confmig.guest.firmware``, which the owner must not import)
parses the same layout; the constants are repeated there on purpose.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from typing import Final

SECRET_TABLE_HEADER_GUID: Final = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
_HEADER: Final = struct.Struct("<16sI")  # GUID, length: the table header and every entry header
HEADER_SIZE: Final = _HEADER.size  # 20
BLOCK: Final = 16
MAX_SECRET_TABLE: Final = 0x5000
"""LAUNCH_SECRET carries at most 0x5000 bytes (the PSP's scratch buffer); the
VMM also checks that the table fits the firmware's secret area."""


def build_secret_table(entries: Iterable[tuple[uuid.UUID, bytes]]) -> bytes:
    """The table for ``entries`` (in order), padded to 16 bytes. ``ValueError`` if it exceeds 0x5000."""
    body = b"".join(_HEADER.pack(guid.bytes_le, HEADER_SIZE + len(data)) + data for guid, data in entries)
    table = _HEADER.pack(SECRET_TABLE_HEADER_GUID.bytes_le, HEADER_SIZE + len(body)) + body
    padded = table + bytes(-len(table) % BLOCK)
    if len(padded) > MAX_SECRET_TABLE:
        raise ValueError(
            f"the secret table is {len(padded)} bytes; LAUNCH_SECRET carries at most {MAX_SECRET_TABLE}"
        )
    return padded
