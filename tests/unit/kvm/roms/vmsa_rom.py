"""A guest program for the SEV-ES VMSA tests: it reports its own registers.

Each step bumps ``rax`` and ``rip`` (staying inside its region) and then writes
all its registers (``struct kvm_regs`` order) to :data:`REPORT_PORT`: the guest
discloses them on purpose, the only way the host ever learns an SEV-ES guest's
registers.
"""

from __future__ import annotations

import struct

from confmig.platform.cpu.abi import RESET_VECTOR, GuestCpu, RomRegion

REPORT_PORT = 0x5E5
BASE = RESET_VECTOR & ~0xFFFF


def reporter(cpu: GuestCpu) -> None:
    r = cpu.regs
    r.rax = r.rax + 1
    r.rip = BASE + (r.rip + 1 - BASE) % 0x10000
    cpu.outs(REPORT_PORT, struct.pack("<18Q", *r.as_tuple()))


def rom() -> list[RomRegion]:
    return [RomRegion(name="reporter", base=BASE, size=0x10000, step=reporter)]
