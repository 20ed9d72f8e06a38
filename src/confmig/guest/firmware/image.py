"""The firmware image: the bytes a VMM loads with ``-bios``, as QEMU loads ``OVMF.fd``.

confmig's firmware *code* is the ROM (:mod:`confmig.guest.firmware.boot`); the
image is what the host maps as flash below 4 GiB and what an SEV launch
measures and encrypts (LAUNCH_UPDATE_DATA). So that the launch measurement
changes whenever the guest code does, the image carries a digest of the guest
code, and at its end the table through which the host finds the firmware's
SEV areas: OVMF's GUIDed table, just below the reset vector, in the format of
:mod:`confmig.proto.ovmf_table` (QEMU reads it with ``pc_system_parse_ovmf_flash``)::

    +0       header, 80 bytes:
             8s magic "CMFWIMG1" | le16 format version (1) | le16 header size (80)
             | le32 image size | 16s firmware version (ASCII, NUL-padded)
             | 32s SHA-256 of the guest code (code_digest())
             | le32 table offset | le32 table length (footer included) | 8 bytes 0
    ...      zeros
    end-0x20-N   the GUIDed table, N bytes: the SEV secret block (the secret area)
             and the Migration Handler block (entry MH_ENTRY, the mailboxes at
             MH_MAILBOX_GPA, the MH's area)
    end-0x20 0x20 bytes where OVMF has its AP entry and reset vector; here hlt
             (0xF4): the reset vector is the ROM's, these bytes are never fetched
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

import confmig.guest
from confmig.common.digest import source_tree_digest
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
from confmig.proto.ovmf_table import (
    MIGRATION_HANDLER_BLOCK_GUID,
    MIGRATION_HANDLER_VERSION,
    RESET_VECTOR_TAIL,
    SEV_SECRET_BLOCK,
    SEV_SECRET_BLOCK_GUID,
    MigrationHandlerBlock,
    encode_table,
)

IMAGE_MAGIC: Final = b"CMFWIMG1"
IMAGE_FORMAT_VERSION: Final = 1

_HEADER: Final = struct.Struct("<8sHHI16s32sII8x")
_HLT: Final = 0xF4


def code_digest() -> bytes:
    """SHA-256 over the guest code (every module of :mod:`confmig.guest`, by path)."""
    return source_tree_digest(Path(confmig.guest.__file__).parent)


def build_firmware_image() -> bytes:
    """The ``-bios`` image of this guest code: 64 KiB, mapped to end at 4 GiB."""
    mh = MigrationHandlerBlock(version=MIGRATION_HANDLER_VERSION, entry=MH_ENTRY,
                               mailbox_gpa=MH_MAILBOX_GPA, mailbox_size=MH_MAILBOX_SIZE,
                               area_size=MH_AREA_SIZE)
    table = encode_table([
        (SEV_SECRET_BLOCK_GUID, SEV_SECRET_BLOCK.pack(SECRET_AREA_GPA, SECRET_AREA_SIZE)),
        (MIGRATION_HANDLER_BLOCK_GUID, mh.encode()),
    ])
    table_offset = FIRMWARE_IMAGE_SIZE - RESET_VECTOR_TAIL - len(table)
    header = _HEADER.pack(
        IMAGE_MAGIC, IMAGE_FORMAT_VERSION, _HEADER.size, FIRMWARE_IMAGE_SIZE,
        FIRMWARE_VERSION.encode().ljust(16, b"\0"), code_digest(), table_offset, len(table),
    )
    image = header.ljust(table_offset, b"\0") + table + bytes([_HLT]) * RESET_VECTOR_TAIL
    assert len(image) == FIRMWARE_IMAGE_SIZE and FLASH_TOP - len(image) == FIRMWARE_BASE
    return image
