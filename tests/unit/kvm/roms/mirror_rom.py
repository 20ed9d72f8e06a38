"""A guest program for the mirror-VM tests: one vCPU writes a private page, another reads it.

``writer`` (at :data:`WRITER`) fills the page at GPA ``rcx`` with ``r8``..``r15``
repeated, through the C-bit (private: encrypted by the engine under the vCPU's
ASID), then reports on :data:`REPORT_PORT`. ``reader`` (at :data:`READER`)
reads the first 64 bytes of the page at GPA ``rcx`` twice, through the C-bit
and without it (what the host sees), and reports both. Neither moves ``rip``:
each run repeats its step.
"""

from __future__ import annotations

import struct

from confmig.platform.cpu.abi import C_BIT, RESET_VECTOR, GuestCpu, RomRegion

REPORT_PORT = 0x5E6
WRITER = RESET_VECTOR & ~0xFFFF
READER = WRITER + 0x1000
PAGE_SIZE = 4096
PATTERN = 64
"""Bytes of r8..r15; the page is this pattern repeated."""


def writer(cpu: GuestCpu) -> None:
    r = cpu.regs
    pattern = struct.pack("<8Q", r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15)
    cpu.write(r.rcx | C_BIT, pattern * (PAGE_SIZE // PATTERN))
    cpu.out(REPORT_PORT, 1)


def reader(cpu: GuestCpu) -> None:
    gpa = cpu.regs.rcx
    cpu.outs(REPORT_PORT, cpu.read(gpa | C_BIT, PATTERN) + cpu.read(gpa, PATTERN))


def rom() -> list[RomRegion]:
    return [
        RomRegion(name="writer", base=WRITER, size=0x1000, step=writer),
        RomRegion(name="reader", base=READER, size=0x1000, step=reader),
    ]
