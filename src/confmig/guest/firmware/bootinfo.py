"""The boot-info block: what the firmware hands the kernel (at ``BOOT_INFO_GPA``).

The firmware fills it piece by piece as its fw_cfg reads complete and writes
the magic last, so a kernel that finds the magic finds a whole block::

    +0     8s    magic "CMBOOT01"
    +8     le32  CPU count
    +12    le32  e820 entry count (<= E820_MAX)
    +16    le32  command-line length (<= CMDLINE_MAX, no NUL)
    +32    e820 entries: le64 address, le64 length, le32 type, le32 0
    +1024  command line
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from confmig.common.units import Gpa, MemoryRange
from confmig.guest.layout import BOOT_INFO_GPA
from confmig.platform.cpu.abi import GuestCpu, GuestFault

BOOT_INFO_MAGIC = b"CMBOOT01"
E820_MAX = 32
"""Entries kept; QEMU's pc machine reports two RAM ranges."""
CMDLINE_MAX = 2048
"""Longest command line, as Linux's COMMAND_LINE_SIZE on x86."""
E820_RAM = 1

_HEADER = struct.Struct("<8sIII")
_E820 = struct.Struct("<QQII")
_E820_OFFSET = 32
_CMDLINE_OFFSET = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class E820Entry:
    address: int
    length: int
    type: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BootInfo:
    nb_cpus: int
    e820: tuple[E820Entry, ...]
    cmdline: str

    @property
    def ram(self) -> list[MemoryRange]:
        ram = (e for e in self.e820 if e.type == E820_RAM)
        return [MemoryRange(start=Gpa(e.address), size=e.length) for e in ram]

    @property
    def ram_size(self) -> int:
        return sum(r.size for r in self.ram)


def store_e820(cpu: GuestCpu, entries: list[E820Entry]) -> None:
    kept = entries[:E820_MAX]
    cpu.write(BOOT_INFO_GPA + 12, len(kept).to_bytes(4, "little"))
    table = b"".join(_E820.pack(e.address, e.length, e.type, 0) for e in kept)
    cpu.write(BOOT_INFO_GPA + _E820_OFFSET, table)


def store_cmdline(cpu: GuestCpu, cmdline: bytes) -> None:
    text = cmdline[:CMDLINE_MAX]
    cpu.write(BOOT_INFO_GPA + 16, len(text).to_bytes(4, "little"))
    cpu.write(BOOT_INFO_GPA + _CMDLINE_OFFSET, text)


def seal(cpu: GuestCpu, nb_cpus: int) -> None:
    """Record the CPU count and publish the block (magic last)."""
    cpu.write(BOOT_INFO_GPA + 8, nb_cpus.to_bytes(4, "little"))
    cpu.write(BOOT_INFO_GPA, BOOT_INFO_MAGIC)


def load(cpu: GuestCpu) -> BootInfo:
    raw = cpu.read(BOOT_INFO_GPA, _CMDLINE_OFFSET + CMDLINE_MAX)
    magic, nb_cpus, n_e820, cmdline_len = _HEADER.unpack_from(raw)
    if magic != BOOT_INFO_MAGIC or n_e820 > E820_MAX or cmdline_len > CMDLINE_MAX:
        raise GuestFault("kernel: no valid boot info from the firmware")
    e820 = tuple(
        E820Entry(address=a, length=n, type=t)
        for a, n, t, _ in _E820.iter_unpack(raw[_E820_OFFSET : _E820_OFFSET + n_e820 * _E820.size])
    )
    cmdline = raw[_CMDLINE_OFFSET : _CMDLINE_OFFSET + cmdline_len].decode(errors="replace")
    return BootInfo(nb_cpus=nb_cpus, e820=e820, cmdline=cmdline)
