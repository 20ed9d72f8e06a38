"""SEV-ES: the integrity check the firmware keeps for every imported VMSA.

At INIT with the ES flag the host hands the PSP a Trusted Memory Region (TMR,
1 MiB, 1 MiB aligned) that the cores cannot touch; DF_FLUSH makes it usable.
LAUNCH_UPDATE_VMSA (and RECEIVE_UPDATE_VMSA, after the packet's MAC) then, for
each VMSA page (AMD firmware ``sev_es_setup_vmsa``):

1. hashes the page *as supplied* into the launch digest;
2. allocates a CRC block in the TMR and writes zero at VMSA offset 0x380 and
   the block's system physical address at 0x388;
3. computes the firmware's 64-bit checksum (:func:`crc64_vmsa`, built from
   CRC-32C) over the first 0xFC0 bytes of the (modified) page and stores it in
   the block;
4. encrypts the modified page in place.

(RECEIVE_UPDATE_VMSA does not measure: the page is the sender's, already
measured at its launch.) SEND_UPDATE_VMSA re-checks the CRC: the block
address at 0x388 must name a block of the TMR whose checksum matches the page
as decrypted, else INVALID_PARAM. From the firmware source (``sev_es.c``,
``crc.c``): offsets 0x380/0x388, the 0xFC0 length, the checksum, the 1 MiB TMR
split into an index half and a CRC half, RESOURCE_LIMIT when the pool is
exhausted. Our assumption: 8-byte CRC blocks (the pool's block size is set up
by code we did not read).

The CRC is not only the PSP's: on hardware the CPU keeps it current too. At
#VMEXIT of an SEV-ES guest the core writes the guest's state into the VMSA
(encrypted under the guest's key) and stores the page's new checksum in the
TMR block named at 0x388; VMRUN recomputes it and refuses a VMSA whose
checksum does not match (VMEXIT_INVALID). The TMR is memory the host cannot
touch, so a host that rewrites the VMSA ciphertext, or puts back an older one,
is caught at the next VMRUN or SEND_UPDATE_VMSA. Here the TMR is
:class:`TmrMemory`: a shared mapping created by the platform (``confmig
host``) and handed to the PSP and, by file descriptor, to every core's
process -- never to KVM, as the UMC key slots.

The VMSA itself is the SEV-ES *state save area* (AMD APM vol. 2, table B-4;
Linux ``struct sev_es_save_area``): :func:`vmsa_image` lays out the
registers the emulated core has (:data:`VMSA_REGISTER_OFFSETS`); every other
field of the save area stays zero.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from typing import Final, NoReturn

from confmig.common.units import Spa

VMSA_SIZE: Final = 0x1000
VMSA_CRC_SIZE: Final = 0xFC0
VMSA_ZEROS_OFFSET: Final = 0x380
VMSA_CRC_PADDR_OFFSET: Final = 0x388
TMR_SIZE: Final = 0x100000  # SEV_ES_TMR_SIZE
TMR_ALIGN: Final = 0x100000
CRC_BLOCK_SIZE: Final = 8

# -- the SEV-ES state save area (APM vol. 2 table B-4, Linux ``struct sev_es_save_area``) --------
VMSA_REGISTER_OFFSETS: Final[Mapping[str, int]] = {
    "rflags": 0x170,
    "rip": 0x178,
    "rsp": 0x1D8,
    "rax": 0x1F8,
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    # 0x320 is reserved: rsp lives at 0x1D8
    "rbp": 0x328,
    "rsi": 0x330,
    "rdi": 0x338,
    "r8": 0x340,
    "r9": 0x348,
    "r10": 0x350,
    "r11": 0x358,
    "r12": 0x360,
    "r13": 0x368,
    "r14": 0x370,
    "r15": 0x378,
}
"""Where each general-purpose register, ``rip`` and ``rflags`` sit in the VMSA page (u64, LE).
The other architectural fields (segments, control and debug registers, EFER, the
MSRs of the save area, the x87/SSE area) are not modelled by the core and stay zero;
0x380..0x38F is the firmware's (zeros, then the CRC block's address)."""
VMSA_SEV_FEATURES_OFFSET: Final = 0x3B0
"""``sev_features``: 0 for SEV-ES (its bits are SNP's)."""
RESET_REGISTERS: Final[Mapping[str, int]] = {"rip": 0xFFFF_FFF0, "rflags": 0x2}
"""The registers of an x86 vCPU after reset (the rest are zero): what each of confmig's
vCPUs has when its VMM launches it, so ``vmsa_image(RESET_REGISTERS)`` is what
LAUNCH_UPDATE_VMSA measures for each vCPU of an SEV-ES guest."""

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


_TMR_HEADER: Final = struct.Struct("<QQ")
"""Ours, at the start of the TMR's index half: the TMR's system-physical base and a ready mark."""
_TMR_READY: Final = 0x524D_542D_5345_5653  # "SVES-TMR"
CRC_BLOCKS: Final = (TMR_SIZE // 2) // CRC_BLOCK_SIZE


class TmrMemory:
    """The SEV-ES Trusted Memory Region's contents: memory the PSP and the cores share
    and the host cannot reach.

    The CRC half holds one u64 checksum per block; the start of the index half
    records where the TMR lies (the address INIT was given), so that a core can
    turn the block address it finds in a VMSA into a slot. ``TmrMemory()`` is a
    private mapping (one process: tests, a PSP alone); :meth:`shared` creates
    one on a memfd whose descriptor the platform hands to the cores' processes.
    """

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        if fd is None:
            self._map = mmap.mmap(-1, TMR_SIZE, mmap.MAP_PRIVATE)
        else:
            self._map = mmap.mmap(fd, TMR_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def shared(cls) -> TmrMemory:
        fd = os.memfd_create("confmig:sev-es-tmr", os.MFD_CLOEXEC)
        os.ftruncate(fd, TMR_SIZE)
        return cls(fd)

    def reset(self, base: Spa | None) -> None:
        """The PSP readies the TMR at ``base`` (DF_FLUSH after an ES INIT), or retires it (None)."""
        self._map[: TMR_SIZE] = bytes(TMR_SIZE)
        if base is not None:
            self._map[: _TMR_HEADER.size] = _TMR_HEADER.pack(base, _TMR_READY)

    def _index(self, block: Spa) -> int | None:
        base, ready = _TMR_HEADER.unpack_from(self._map, 0)
        if ready != _TMR_READY:
            return None
        index, rem = divmod(block - (base + TMR_SIZE // 2), CRC_BLOCK_SIZE)
        return index if not rem and 0 <= index < CRC_BLOCKS else None

    def load(self, block: Spa) -> int | None:
        """The checksum stored in the CRC block at ``block``; None if that is no CRC block."""
        index = self._index(block)
        if index is None:
            return None
        value: int = struct.unpack_from("<Q", self._map, TMR_SIZE // 2 + index * CRC_BLOCK_SIZE)[0]
        return value

    def store(self, block: Spa, crc: int) -> bool:
        """Write the checksum of the CRC block at ``block``; False if that is no CRC block."""
        index = self._index(block)
        if index is None:
            return False
        struct.pack_into("<Q", self._map, TMR_SIZE // 2 + index * CRC_BLOCK_SIZE, crc)
        return True

    def close(self) -> None:
        self._map.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return "TmrMemory(<trusted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("the TMR cannot be pickled")


class TmrCrcPool:
    """The CRC half of the TMR: fixed-size blocks, allocated per VMSA, freed at DECOMMISSION.

    Which blocks are in use is the PSP's bookkeeping; the checksums themselves live
    in :class:`TmrMemory`, where the cores update them at #VMEXIT.
    """

    __slots__ = ("_base", "_capacity", "_free", "_memory", "_used")

    def __init__(self, tmr_base: Spa, memory: TmrMemory | None = None) -> None:
        self._base = Spa(tmr_base + TMR_SIZE // 2)
        self._capacity = CRC_BLOCKS
        self._free = list(range(self._capacity - 1, -1, -1))
        self._used: set[int] = set()
        self._memory = memory if memory is not None else TmrMemory()
        self._memory.reset(tmr_base)

    def allocate(self) -> Spa | None:
        """A free block's address, or None when the pool is exhausted."""
        if not self._free:
            return None
        index = self._free.pop()
        self._used.add(index)
        block = Spa(self._base + index * CRC_BLOCK_SIZE)
        self._memory.store(block, 0)
        return block

    def store(self, block: Spa, crc: int) -> None:
        self._memory.store(block, crc)

    def lookup(self, block: Spa) -> int | None:
        index, rem = divmod(block - self._base, CRC_BLOCK_SIZE)
        if rem or index not in self._used:
            return None
        return self._memory.load(block)

    def free(self, block: Spa) -> None:
        index = (block - self._base) // CRC_BLOCK_SIZE
        if index in self._used:
            self._memory.store(block, 0)
            self._used.discard(index)
            self._free.append(index)


def seal_vmsa(page: bytes, crc_block: Spa) -> bytes:
    """The VMSA with the CRC block address written in (zeros at 0x380, address at 0x388)."""
    return page[:VMSA_ZEROS_OFFSET] + struct.pack("<QQ", 0, crc_block) + page[VMSA_CRC_PADDR_OFFSET + 8 :]


def vmsa_crc(page: bytes) -> int:
    return crc64_vmsa(page[:VMSA_CRC_SIZE])


def vmsa_image(registers: Mapping[str, int]) -> bytes:
    """A 4 KiB VMSA page holding ``registers`` (names of :data:`VMSA_REGISTER_OFFSETS`;
    missing ones are zero) and zeros elsewhere: what KVM's ``sev_es_sync_vmsa`` writes
    before LAUNCH_UPDATE_VMSA, and what that command measures."""
    page = bytearray(VMSA_SIZE)
    for name, value in registers.items():
        offset = VMSA_REGISTER_OFFSETS.get(name)
        if offset is None:
            raise ValueError(f"the VMSA has no register {name!r}")
        struct.pack_into("<Q", page, offset, value & 0xFFFF_FFFF_FFFF_FFFF)
    return bytes(page)


def vmsa_registers(page: bytes | bytearray) -> dict[str, int]:
    """The registers of a (plaintext) VMSA page, by name."""
    if len(page) != VMSA_SIZE:
        raise ValueError("a VMSA is one 4 KiB page")
    return {name: struct.unpack_from("<Q", page, off)[0] for name, off in VMSA_REGISTER_OFFSETS.items()}


def vmsa_crc_block(page: bytes | bytearray) -> Spa:
    """The CRC block address the firmware wrote at 0x388."""
    return Spa(struct.unpack_from("<Q", page, VMSA_CRC_PADDR_OFFSET)[0])
