"""The guest kernel: command line, timer tick, NMI, console, and one workload.

Boot (kernel phase ENTRY, entered from the firmware): read the boot info,
parse the command line (``workload=dirty rate=2000 wss=256M ...``; without
``workload=`` the guest idles), let the workload validate its options, save
them in the kernel data page, print what runs and jump to the workload. A bad
command line prints one error line and halts.

While a workload runs, every one of its steps enters through the kernel
(:func:`task_region`): acknowledge pending interrupts, the way a CPU vectors
them at an instruction boundary; an NMI saves ``rip`` and diverts the workload
to its self-check entry, which returns with :func:`nmi_return` (NMIs stay
blocked, i.e. unacknowledged, until then); other vectors (the TSC-deadline
timer, the kv device) only wake the vCPU. Then the tick: whenever the TSC has
passed the next tick, count it. Workloads sleep with :func:`sleep_until`,
which arms the TSC deadline no later than the next tick and halts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from functools import partial

from confmig.guest.firmware import bootinfo
from confmig.guest.layout import KERNEL_BASE, KERNEL_DATA_GPA, KERNEL_SIZE, WORKLOAD_CODE_SIZE
from confmig.platform.cpu.abi import (
    COM1_PORT,
    MSR_IA32_TSC_DEADLINE,
    GuestCpu,
    GuestFault,
    GuestProgram,
    RomRegion,
)

NMI_VECTOR = 2
CONSOLE_LINE_MAX = 512
"""Longest console message; longer ones are cut (one ``outs`` carries one line)."""
PARAMS_MAX = 256
"""Room for a workload's encoded options in the kernel data page."""
INTERRUPTS_PER_STEP = 8
"""Pending vectors acknowledged per step; bounds the work before the workload runs."""
DEFAULT_WORKLOAD = "idle"


class Phase(IntEnum):
    ENTRY = 0x00
    HALT = 0x10


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A workload as the kernel sees it: options, code, and entry points."""

    name: str
    code_base: int
    entry: int
    """Where the kernel starts it."""
    selfcheck: int
    """Where an NMI diverts it; it leaves through :func:`nmi_return`."""
    tick_ns: int
    parse: Callable[[Mapping[str, str]], bytes]
    """Validate ``key=value`` options (ValueError with a message) and encode them."""
    describe: Callable[[bytes], str]
    step: GuestProgram


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfCheck:
    """The verdict of a workload's self-check; :attr:`line` is what the console shows."""

    pages: int
    writes: int
    bad: int = 0
    first_bad: int = 0

    @property
    def passed(self) -> bool:
        return self.bad == 0

    @property
    def line(self) -> str:
        if self.passed:
            return f"confmig-selfcheck: PASS pages={self.pages} writes={self.writes}"
        return (
            f"confmig-selfcheck: FAIL bad={self.bad} first={self.first_bad:#x} pages={self.pages}"
        )


# --- the kernel data page ------------------------------------------------------------------

KERNEL_MAGIC = b"CMKERN01"
IN_NMI = 1 << 0
_KDATA = struct.Struct("<8s16sIIQQQQQ")
_PARAMS_OFFSET = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelData:
    workload: str
    flags: int
    params_len: int
    tick_ns: int
    next_tick: int
    jiffies: int
    nmi_rip: int
    """Where the workload resumes after the NMI handler."""
    nmis: int


def load_data(cpu: GuestCpu) -> KernelData:
    magic, name, flags, plen, tick, next_tick, jiffies, nmi_rip, nmis = _KDATA.unpack(
        cpu.read(KERNEL_DATA_GPA, _KDATA.size)
    )
    if magic != KERNEL_MAGIC:
        raise GuestFault("kernel: data page lost its magic")
    return KernelData(
        workload=name.rstrip(b"\0").decode(), flags=flags, params_len=plen, tick_ns=tick,
        next_tick=next_tick, jiffies=jiffies, nmi_rip=nmi_rip, nmis=nmis,
    )


def _store_data(cpu: GuestCpu, k: KernelData) -> None:
    cpu.write(
        KERNEL_DATA_GPA,
        _KDATA.pack(
            KERNEL_MAGIC, k.workload.encode(), k.flags, k.params_len, k.tick_ns,
            k.next_tick, k.jiffies, k.nmi_rip, k.nmis,
        ),
    )


def params(cpu: GuestCpu) -> bytes:
    """The running workload's encoded options."""
    return cpu.read(KERNEL_DATA_GPA + _PARAMS_OFFSET, load_data(cpu).params_len)


# --- services for workloads ----------------------------------------------------------------


def console_write(cpu: GuestCpu, line: str) -> None:
    """Print one line on the serial console: one ``outs``, so it exits (last)."""
    cpu.outs(COM1_PORT, (line + "\n").encode()[:CONSOLE_LINE_MAX])


def halt(cpu: GuestCpu, message: str) -> None:
    """Print ``message`` and stop for good (the kernel's HALT phase). Exits."""
    cpu.regs.rip = KERNEL_BASE + Phase.HALT
    console_write(cpu, f"{message}; halted")


def sleep_until(cpu: GuestCpu, deadline: int) -> None:
    """Halt until ``deadline`` (TSC), the next tick or an interrupt. Exits."""
    k = load_data(cpu)
    cpu.wrmsr(MSR_IA32_TSC_DEADLINE, max(1, min(deadline, k.next_tick)))
    cpu.hlt()


def nmi_return(cpu: GuestCpu) -> None:
    """Leave the NMI handler: resume the workload where the NMI stopped it."""
    k = load_data(cpu)
    _store_data(cpu, replace(k, flags=k.flags & ~IN_NMI))
    cpu.regs.rip = k.nmi_rip


# --- boot ----------------------------------------------------------------------------------


def parse_cmdline(cmdline: str) -> tuple[str, dict[str, str]]:
    """Split ``workload=NAME key=value ...`` into the workload and its options."""
    options: dict[str, str] = {}
    for token in cmdline.split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ValueError(f"malformed option {token!r} (expected key=value)")
        if key in options:
            raise ValueError(f"option {key!r} given twice")
        options[key] = value
    return options.pop("workload", DEFAULT_WORKLOAD), options


def _boot(workloads: Mapping[str, Workload], cpu: GuestCpu) -> None:
    info = bootinfo.load(cpu)
    try:
        name, options = parse_cmdline(info.cmdline)
        if name not in workloads:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(sorted(workloads))})")
        workload = workloads[name]
        encoded = workload.parse(options)
    except ValueError as exc:
        halt(cpu, f"confmig kernel: {exc}")
        return
    if len(encoded) > PARAMS_MAX:
        raise GuestFault(f"kernel: {name} options take {len(encoded)} bytes")
    cpu.write(KERNEL_DATA_GPA + _PARAMS_OFFSET, encoded)
    _store_data(cpu, KernelData(
        workload=name, flags=0, params_len=len(encoded), tick_ns=workload.tick_ns,
        next_tick=cpu.rdtsc() + workload.tick_ns, jiffies=0, nmi_rip=0, nmis=0,
    ))
    cpu.regs.rip = workload.entry
    console_write(cpu, f"confmig kernel: workload {name} ({workload.describe(encoded)})")


def _kernel_step(workloads: Mapping[str, Workload], cpu: GuestCpu) -> None:
    phase = cpu.regs.rip - KERNEL_BASE
    if phase == Phase.ENTRY:
        _boot(workloads, cpu)
    elif phase == Phase.HALT:
        cpu.hlt()
    else:
        raise GuestFault(f"kernel: no instruction at {cpu.regs.rip:#x}")


def kernel_region(workloads: Mapping[str, Workload]) -> RomRegion:
    return RomRegion(
        name="kernel", base=KERNEL_BASE, size=KERNEL_SIZE, step=partial(_kernel_step, workloads)
    )


# --- running a workload --------------------------------------------------------------------


def _task_step(workload: Workload, cpu: GuestCpu) -> None:
    before = k = load_data(cpu)
    if not k.flags & IN_NMI:
        for _ in range(INTERRUPTS_PER_STEP):
            vector = cpu.pending_interrupt()
            if vector is None:
                break
            if vector == NMI_VECTOR and not k.flags & IN_NMI:
                k = replace(k, flags=k.flags | IN_NMI, nmi_rip=cpu.regs.rip, nmis=k.nmis + 1)
                cpu.regs.rip = workload.selfcheck
    now = cpu.rdtsc()
    if now >= k.next_tick:
        ticks = (now - k.next_tick) // k.tick_ns + 1
        k = replace(k, jiffies=k.jiffies + ticks, next_tick=k.next_tick + ticks * k.tick_ns)
    if k != before:
        _store_data(cpu, k)
    workload.step(cpu)


def task_region(workload: Workload) -> RomRegion:
    """The workload's code, entered through the kernel on every step."""
    return RomRegion(
        name=workload.name,
        base=workload.code_base,
        size=WORKLOAD_CODE_SIZE,
        step=partial(_task_step, workload),
    )
