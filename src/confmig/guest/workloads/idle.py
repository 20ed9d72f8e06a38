"""``idle``: boot, then sleep. A slow tick keeps the guest running on no CPU."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

from confmig.guest import kernel
from confmig.guest.layout import workload_code
from confmig.platform.cpu.abi import TSC_HZ, GuestCpu, GuestFault

CODE_BASE = workload_code(0)
TICK_NS = TSC_HZ
"""One wake-up a second."""


class Phase(IntEnum):
    RUN = 0x00
    SELFCHECK = 0x10


def parse(options: Mapping[str, str]) -> bytes:
    if options:
        raise ValueError(f"unknown option(s) {', '.join(sorted(options))} for workload idle")
    return b""


def describe(_: bytes) -> str:
    return "no options"


def step(cpu: GuestCpu, mask: int) -> None:
    phase = cpu.regs.rip - CODE_BASE
    if phase == Phase.RUN:
        kernel.sleep_until(cpu, cpu.rdtsc() + TICK_NS, mask)
    elif phase == Phase.SELFCHECK:
        kernel.nmi_return(cpu, mask)
        kernel.console_write(cpu, kernel.SelfCheck(pages=0, writes=0).line)
    else:
        raise GuestFault(f"idle: no instruction at {cpu.regs.rip:#x}")


WORKLOAD = kernel.Workload(
    name="idle",
    code_base=CODE_BASE,
    entry=CODE_BASE + Phase.RUN,
    selfcheck=CODE_BASE + Phase.SELFCHECK,
    tick_ns=TICK_NS,
    parse=parse,
    describe=describe,
    step=step,
)
