"""SEV-ES: the integrity check the firmware keeps for every imported VMSA.

At INIT with the ES flag the host hands the PSP a Trusted Memory Region (TMR,
1 MiB, 1 MiB aligned) that the cores cannot touch; DF_FLUSH makes it usable.
LAUNCH_UPDATE_VMSA (and RECEIVE_UPDATE_VMSA, next issue) then, for each VMSA
page (AMD firmware ``sev_es_setup_vmsa``):

1. hashes the page *as supplied* into the launch digest;
2. allocates a CRC block in the TMR and writes zero at VMSA offset 0x380 and
   the block's system physical address at 0x388;
3. computes the firmware's 64-bit checksum (:func:`crc64_vmsa`, built from
   CRC-32C) over the first 0xFC0 bytes of the (modified) page and stores it in
   the block;
4. encrypts the modified page in place.

SEND_UPDATE_VMSA re-checks the CRC. From the firmware source (``sev_es.c``,
``crc.c``): offsets 0x380/0x388, the 0xFC0 length, the checksum, the 1 MiB TMR
split into an index half and a CRC half, RESOURCE_LIMIT when the pool is
exhausted. Our assumption: 8-byte CRC blocks (the pool's block size is set up
by code we did not read).
"""

from __future__ import annotations

import struct
from typing import Final

from confmig.common.units import Spa

VMSA_SIZE: Final = 0x1000
VMSA_CRC_SIZE: Final = 0xFC0
VMSA_ZEROS_OFFSET: Final = 0x380
VMSA_CRC_PADDR_OFFSET: Final = 0x388
TMR_SIZE: Final = 0x100000  # SEV_ES_TMR_SIZE
TMR_ALIGN: Final = 0x100000
CRC_BLOCK_SIZE: Final = 8

_CRC32C_POLY_REFLECTED: Final = 0x82F63B78  # Castagnoli 0x1EDC6F41, bit-reversed
_LANE: Final = 8
_STRIDE: Final = 3 * _LANE


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the x86 CRC32 instruction computes it: reflected, init and final ~0."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc64_vmsa(data: bytes) -> int:
    """The firmware's VMSA checksum (``crc64_vmsa``, Genoa): three interleaved CRC-32Cs combined.

    Lane k takes the 8-byte words at offsets 24*i + 8*k; bytes past the last
    whole 24-byte stride go to lane 2. The result is
    ``(crc0 ^ crc1 ^ crc2) << 32 | crc32c(crc0 || crc1 || crc2)`` (the three as LE32).
    """
    if len(data) % _LANE or len(data) < _STRIDE:
        raise ValueError("the VMSA checksum covers whole 8-byte words, at least 24 bytes")
    strides = len(data) // _STRIDE
    lanes = [
        b"".join(data[i * _STRIDE + k * _LANE : i * _STRIDE + (k + 1) * _LANE] for i in range(strides))
        for k in range(3)
    ]
    lanes[2] += data[strides * _STRIDE :]
    crc0, crc1, crc2 = (crc32c(lane) for lane in lanes)
    return (crc0 ^ crc1 ^ crc2) << 32 | crc32c(struct.pack("<III", crc0, crc1, crc2))


class TmrCrcPool:
    """The CRC half of the TMR: fixed-size blocks, allocated per VMSA, freed at DECOMMISSION."""

    __slots__ = ("_base", "_capacity", "_crcs", "_free")

    def __init__(self, tmr_base: Spa) -> None:
        self._base = Spa(tmr_base + TMR_SIZE // 2)
        self._capacity = (TMR_SIZE // 2) // CRC_BLOCK_SIZE
        self._free = list(range(self._capacity - 1, -1, -1))
        self._crcs: dict[int, int] = {}

    def allocate(self) -> Spa | None:
        """A free block's address, or None when the pool is exhausted."""
        if not self._free:
            return None
        index = self._free.pop()
        self._crcs[index] = 0
        return Spa(self._base + index * CRC_BLOCK_SIZE)

    def store(self, block: Spa, crc: int) -> None:
        self._crcs[(block - self._base) // CRC_BLOCK_SIZE] = crc

    def lookup(self, block: Spa) -> int | None:
        index, rem = divmod(block - self._base, CRC_BLOCK_SIZE)
        return None if rem else self._crcs.get(index)

    def free(self, block: Spa) -> None:
        index = (block - self._base) // CRC_BLOCK_SIZE
        if self._crcs.pop(index, None) is not None:
            self._free.append(index)


def seal_vmsa(page: bytes, crc_block: Spa) -> bytes:
    """The VMSA with the CRC block address written in (zeros at 0x380, address at 0x388)."""
    return page[:VMSA_ZEROS_OFFSET] + struct.pack("<QQ", 0, crc_block) + page[VMSA_CRC_PADDR_OFFSET + 8 :]


def vmsa_crc(page: bytes) -> int:
    return crc64_vmsa(page[:VMSA_CRC_SIZE])
