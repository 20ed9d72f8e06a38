"""Constants of QEMU's migration stream (QEMU 7.2 ``savevm.c``, ``ram.c``, ``multifd.c``) and
of our one extension, the confidential RAM record. ``docs/stream-format.md`` draws every layout.

All integers on the wire are big-endian.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SIZE, KiB, MiB

PageArray = npt.NDArray[np.uint8]
"""Guest pages as a ``(n, PAGE_SIZE)`` uint8 array (often a view, not a copy)."""
IndexArray = npt.NDArray[np.int64]
"""Page indices within one RAM block: the block offset ``>> PAGE_SHIFT`` (not GFNs)."""

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3


class SectionType(IntEnum):
    """The byte that opens every top-level record of the stream."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class RamFlag(IntFlag):
    """Flags in the low 12 bits of a RAM record's ``u64 offset | flags`` word.

    Every bit is named so that an error can say what a peer sent; we write and accept
    only ZERO, MEM_SIZE, PAGE, EOS, CONTINUE and CONFIDENTIAL.
    """

    FULL = 0x001  # obsolete upstream
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080  # RDMA
    COMPRESS_PAGE = 0x100  # removed in QEMU 9.1
    MULTIFD_FLUSH = 0x200  # also the never-merged SEV RFC's ENCRYPTED_DATA
    CGS_STATE = 0x400  # Intel's TDX fork
    CONFIDENTIAL = 0x800  # ours: the highest bit that fits below a 4 KiB page offset


RAM_FLAG_MASK: Final = PAGE_SIZE - 1
"""Flags live in the bits a page-aligned offset leaves free."""


class ConfidentialSubtype(IntEnum):
    """What a CONFIDENTIAL record carries (opaque to the stream layer)."""

    PSP_PACKET = 1
    SHARED_REGIONS = 2
    MH_RECORD = 3


RAM_SECTION_IDSTR: Final = "ram"
RAM_SECTION_INSTANCE: Final = 0
RAM_SECTION_VERSION: Final = 4

PAGE_RECORD_SIZE: Final = 8 + PAGE_SIZE
"""A PAGE|CONTINUE record: u64 header, then the page."""
ZERO_RECORD_SIZE: Final = 8 + 1
"""A ZERO|CONTINUE record: u64 header, then the fill byte (always 0)."""

MAX_IDSTR: Final = 255
"""Section and RAM block names are prefixed by a u8 length."""
MAX_MACHINE_TYPE: Final = 256
"""QEMU machine type names are short ("pc-q35-7.2"); bounds the CONFIGURATION record."""
MAX_RAM_BLOCKS: Final = 256
"""A q35 guest has a handful of RAM blocks; bounds the MEM_SIZE record."""
MAX_BLOB: Final = 16 * MiB
"""Largest length-prefixed blob: vmdescription, device state, confidential payload.
Bounds the decoder's buffer (a whole blob must fit in it)."""

MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_INIT_SIZE: Final = 64
"""MultiFDInit_t: magic, version, uuid[16], channel id, 7 + 32 reserved bytes."""
MULTIFD_PACKET_FIXED_SIZE: Final = 320
"""MultiFDPacket_t up to its ``offset[]`` array."""
MULTIFD_RAMBLOCK_SIZE: Final = 256
MULTIFD_PACKET_SIZE: Final = 512 * KiB
"""Page payload of a full packet, as QEMU's MULTIFD_PACKET_SIZE."""
MULTIFD_PAGES_PER_PACKET: Final = MULTIFD_PACKET_SIZE // PAGE_SIZE


class MultifdFlag(IntFlag):
    SYNC = 0x1
    COMPRESSION = 0x7 << 1  # method: 0 none, 1 zlib, 2 zstd; we speak only 0
