"""The firmware image: the bytes a VMM loads with ``-bios``, as QEMU loads ``OVMF.fd``.

confmig's firmware *code* is the ROM (:mod:`confmig.guest.firmware.boot`); the
image is what the host maps as flash below 4 GiB and what an SEV launch
measures and encrypts (LAUNCH_UPDATE_DATA). So that the launch measurement
changes whenever the guest code does, the image carries a digest of the guest
code, and at its end the table through which the host finds the firmware's
SEV areas: OVMF's GUIDed table, just below the reset vector
(``OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm``; QEMU reads it with
``pc_system_parse_ovmf_flash``)::

    +0       header, 80 bytes:
             8s magic "CMFWIMG1" | le16 format version (1) | le16 header size (80)
             | le32 image size | 16s firmware version (ASCII, NUL-padded)
             | 32s SHA-256 of the guest code (code_digest())
             | le32 table offset | le32 table length (footer included) | 8 bytes 0
    ...      zeros
    end-0x20-N   the GUIDed table, N bytes, read backwards from its footer:
             SEV secret block:       le32 base | le32 size | le16 26 | GUID 4c2eb361-...
             migration handler block: le32 version | le32 flags | le64 entry rip
                                     | le64 mailbox GPA | le32 mailbox size
                                     | le32 area size | le16 50 | GUID 6082373e-...
             footer:                 le16 N | GUID 96b582de-1fb2-45f7-baea-a366c55a082d
    end-0x20 0x20 bytes where OVMF has its AP entry and reset vector; here hlt
             (0xF4): the reset vector is the ROM's, these bytes are never fetched

Every entry ends with its length (u16, covering data, length and GUID) and its
GUID (EFI byte order); the footer's length covers the whole table including the
footer.

The migration handler block (version 2; version 0 and zeros would mean "no
Migration Handler in this image"): an MH vCPU starts at ``entry rip``
(:data:`~confmig.guest.layout.MH_ENTRY`, a phase of the firmware's code);
MH vCPU ``i``'s mailbox is at ``mailbox GPA + i * MAILBOX_STRIDE``, for
``i < mailbox size / MAILBOX_STRIDE``; ``[mailbox GPA, mailbox GPA + area
size)`` is the MH's whole area (mailboxes, then its private state), which a
VMM migrates none of: each side's MH owns its own. Flags are 0.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import confmig.guest
from confmig.guest.firmware.boot import FIRMWARE_VERSION
from confmig.guest.layout import (
    FIRMWARE_BASE,
    FIRMWARE_IMAGE_SIZE,
    FLASH_TOP,
    MH_AREA_SIZE,
    MH_ENTRY,
    MH_MAILBOX_GPA,
    MH_MAILBOX_SIZE,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
)

IMAGE_MAGIC: Final = b"CMFWIMG1"
IMAGE_FORMAT_VERSION: Final = 1
OVMF_TABLE_FOOTER_GUID: Final = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_SECRET_BLOCK_GUID: Final = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
MIGRATION_HANDLER_BLOCK_GUID: Final = uuid.UUID("6082373e-dfcc-471d-8e58-0008c522a071")
"""confmig's own entry. The 2021 RFC's entry (GUID 5c7db037-ab87-4282-b33c-7894f01471ec)
carried only a 32-bit entry address; this one also says where the mailbox is, so it
has a GUID of its own and no RFC reader misreads it."""
RESET_VECTOR_TAIL: Final = 0x20
"""Bytes after the table: OVMF's AP entry point and reset vector."""

_HEADER: Final = struct.Struct("<8sHHI16s32sII8x")
_GUID_AND_LENGTH: Final = 18
_SEV_SECRET_BLOCK: Final = struct.Struct("<II")
MIGRATION_HANDLER_BLOCK: Final = struct.Struct("<IIQQII")
"""version, flags, entry rip, mailbox GPA, mailbox size, area size."""
MIGRATION_HANDLER_VERSION: Final = 2
_HLT: Final = 0xF4


def code_digest() -> bytes:
    """SHA-256 over the guest code (every module of :mod:`confmig.guest`, by path)."""
    root = Path(confmig.guest.__file__).parent
    sources = sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
    if not sources:
        raise RuntimeError(f"no guest sources under {root}: cannot digest the firmware")
    h = hashlib.sha256()
    for path in sources:
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(struct.pack("<II", len(name), len(data)) + name + data)
    return h.digest()


def table_entry(guid: uuid.UUID, data: bytes) -> bytes:
    """One GUIDed-table entry: data, then its length and GUID."""
    return data + struct.pack("<H", len(data) + _GUID_AND_LENGTH) + guid.bytes_le


def guided_table(entries: Iterable[tuple[uuid.UUID, bytes]]) -> bytes:
    """The table with its footer, as it ends just below the reset vector."""
    body = b"".join(table_entry(guid, data) for guid, data in entries)
    return body + struct.pack("<H", len(body) + _GUID_AND_LENGTH) + OVMF_TABLE_FOOTER_GUID.bytes_le


def parse_guided_table(image: bytes) -> dict[uuid.UUID, bytes]:
    """The entries of an image's table (empty without one), read as QEMU reads them."""
    end = len(image) - RESET_VECTOR_TAIL
    if end < _GUID_AND_LENGTH or uuid.UUID(bytes_le=image[end - 16 : end]) != OVMF_TABLE_FOOTER_GUID:
        return {}
    (total,) = struct.unpack_from("<H", image, end - _GUID_AND_LENGTH)
    size = total - _GUID_AND_LENGTH
    if size < 0 or size > end - _GUID_AND_LENGTH:
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


def build_firmware_image() -> bytes:
    """The ``-bios`` image of this guest code: 64 KiB, mapped to end at 4 GiB."""
    table = guided_table([
        (SEV_SECRET_BLOCK_GUID, _SEV_SECRET_BLOCK.pack(SECRET_AREA_GPA, SECRET_AREA_SIZE)),
        (MIGRATION_HANDLER_BLOCK_GUID, MIGRATION_HANDLER_BLOCK.pack(
            MIGRATION_HANDLER_VERSION, 0, MH_ENTRY, MH_MAILBOX_GPA, MH_MAILBOX_SIZE, MH_AREA_SIZE)),
    ])
    table_offset = FIRMWARE_IMAGE_SIZE - RESET_VECTOR_TAIL - len(table)
    header = _HEADER.pack(
        IMAGE_MAGIC, IMAGE_FORMAT_VERSION, _HEADER.size, FIRMWARE_IMAGE_SIZE,
        FIRMWARE_VERSION.encode().ljust(16, b"\0"), code_digest(), table_offset, len(table),
    )
    image = header.ljust(table_offset, b"\0") + table + bytes([_HLT]) * RESET_VECTOR_TAIL
    assert len(image) == FIRMWARE_IMAGE_SIZE and FLASH_TOP - len(image) == FIRMWARE_BASE
    return image
