"""The guest kernel: command line, timer tick, NMI, console, and one workload.

Boot (kernel phase ENTRY, entered from the firmware): read the boot info,
parse the command line (``workload=dirty rate=2000 wss=256M ...``; without
``workload=`` the guest idles), let the workload validate its options, save
them in the kernel data page, print what runs and jump to the workload. A bad
command line prints one error line and halts.

An SEV guest first takes the kernel's part in the three-way live-migration
negotiation (Linux: ``setup_efi_kvm_sev_migration``): if the hypervisor offers
``KVM_FEATURE_MIGRATION_CONTROL`` and the firmware set the UEFI variable
``SevLiveMigrationEnabled``, it writes ``KVM_MIGRATION_READY`` to
``MSR_KVM_MIGRATION_CONTROL`` (an exit to the VMM), then prints the decision
(phase MIGRATION); otherwise it prints which legs are missing. Then it prints
the workload line (phase START). ``sev_migration=off`` on the command line is
confmig's switch (Linux has none) that removes the kernel's leg, to test the
negotiation. Boot ends with these lines, in this order::

    confmig kernel: SEV: live migration allowed (MSR_KVM_MIGRATION_CONTROL)
    confmig kernel: SEV: live migration not allowed (<missing legs, "; "-separated>)
    confmig kernel: workload NAME (options)

In an SEV guest the kernel's data (boot info, kernel data page, variable store)
is private: every access carries the C-bit. A step finds the mask out once and
passes it on; workloads get it from :func:`task_region` with each step.

While a workload runs, every one of its steps enters through the kernel
(:func:`task_region`): acknowledge pending interrupts, the way a CPU vectors
them at an instruction boundary; an NMI saves ``rip`` and diverts the workload
to its self-check entry, which returns with :func:`nmi_return` (NMIs stay
blocked, i.e. unacknowledged, until then); other vectors (the TSC-deadline
timer, the kv device) only wake the vCPU. Then the tick: whenever the TSC has
passed the next tick, count it. Workloads sleep with :func:`sleep_until`,
which arms the TSC deadline no later than the next tick and halts.

The run gate (:mod:`confmig.guest.gate`). An SEV guest's kernel checks the gate
on every step before anything else: with the kernel data a workload step reads
anyway, and on its own in the kernel's phases. A closed gate parks the vCPU
(phase GATED, the interrupted ``rip`` kept in ``r12``): it prints why, once,
then halts each time it is entered, dropping pending interrupts so that a halt
never turns into a spin. When the gate opens again (RESUME or RESET on a source)
the vCPU continues at the kept ``rip``. An SEV-ES guest's Migration Handler closes
it with SAVING: the vCPU first saves its registers, as they are at that step, for
the target (:mod:`confmig.guest.saved_state`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from functools import partial

from confmig.guest import gate, mem_encrypt, saved_state
from confmig.guest.firmware import bootinfo, varstore
from confmig.guest.layout import KERNEL_BASE, KERNEL_DATA_GPA, KERNEL_SIZE, RUN_GATE_GPA, WORKLOAD_CODE_SIZE
from confmig.guest.phases import TaskProgram
from confmig.platform.cpu.abi import (
    COM1_PORT,
    KVM_MIGRATION_READY,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
    NMI_VECTOR,
    GuestCpu,
    GuestFault,
    RomRegion,
)

CONSOLE_LINE_MAX = 512
"""Longest console message; longer ones are cut (one ``outs`` carries one line)."""
PARAMS_MAX = 256
"""Room for a workload's encoded options in the kernel data page."""
INTERRUPTS_PER_STEP = 8
"""Pending vectors acknowledged per step; bounds the work before the workload runs."""
GATED_INTERRUPTS_MAX = 64
"""Pending vectors a parked vCPU drops per step (more than the vectors a guest uses)."""
DEFAULT_WORKLOAD = "idle"
SEV_MIGRATION_OPTION = "sev_migration"
"""``sev_migration=on|off`` (default on): confmig's switch for the kernel's leg of the
negotiation (testing only; Linux has none). The kernel consumes it: the workload never sees it."""
_ON_OFF = {"on": True, "off": False}
MIGRATION_ALLOWED_LINE = "confmig kernel: SEV: live migration allowed (MSR_KVM_MIGRATION_CONTROL)"
"""Printed in the step after the kernel's write of the MSR: the write was made."""
MIGRATION_NOT_ALLOWED = "confmig kernel: SEV: live migration not allowed"


class Phase(IntEnum):
    ENTRY = 0x00
    HALT = 0x10
    MIGRATION = 0x20
    """After the write of MSR_KVM_MIGRATION_CONTROL: say so."""
    START = 0x30
    """Print the workload line and jump to it."""
    GATED = 0x40
    """The run gate is closed: halt until it opens, then continue at ``r12``."""


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
    step: TaskProgram
    """One step, given the step's encryption mask (:func:`task_region` finds it out)."""


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
_GATE_OFFSET = RUN_GATE_GPA - KERNEL_DATA_GPA
_GATE_END = _GATE_OFFSET + gate.SIZE
"""One read of the kernel data page covers the run gate too (one page, one decryption)."""


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
    gate: int = gate.OPEN
    """The run gate, read with the rest; the kernel never writes it."""


def load_data(cpu: GuestCpu, mask: int | None = None) -> KernelData:
    """The kernel data page (``mask``: the step's encryption mask; None finds it out)."""
    raw = cpu.read(mem_encrypt.private(cpu, KERNEL_DATA_GPA, mask), _GATE_END)
    magic, name, flags, plen, tick, next_tick, jiffies, nmi_rip, nmis = _KDATA.unpack_from(raw)
    if magic != KERNEL_MAGIC:
        raise GuestFault("kernel: data page lost its magic")
    return KernelData(
        workload=name.rstrip(b"\0").decode(), flags=flags, params_len=plen, tick_ns=tick,
        next_tick=next_tick, jiffies=jiffies, nmi_rip=nmi_rip, nmis=nmis,
        gate=gate.decode(raw[_GATE_OFFSET:]),
    )


def _store_data(cpu: GuestCpu, k: KernelData, mask: int) -> None:
    cpu.write(
        KERNEL_DATA_GPA | mask,
        _KDATA.pack(
            KERNEL_MAGIC, k.workload.encode(), k.flags, k.params_len, k.tick_ns,
            k.next_tick, k.jiffies, k.nmi_rip, k.nmis,
        ),
    )


def params(cpu: GuestCpu, mask: int) -> bytes:
    """The running workload's encoded options."""
    return cpu.read((KERNEL_DATA_GPA + _PARAMS_OFFSET) | mask, load_data(cpu, mask).params_len)


# --- services for workloads ----------------------------------------------------------------


def console_write(cpu: GuestCpu, line: str) -> None:
    """Print one line on the serial console: one ``outs``, so it exits (last)."""
    cpu.outs(COM1_PORT, (line + "\n").encode()[:CONSOLE_LINE_MAX])


def halt(cpu: GuestCpu, message: str) -> None:
    """Print ``message`` and stop for good (the kernel's HALT phase). Exits."""
    cpu.regs.rip = KERNEL_BASE + Phase.HALT
    console_write(cpu, f"{message}; halted")


def sleep_until(cpu: GuestCpu, deadline: int, mask: int) -> None:
    """Halt until ``deadline`` (TSC), the next tick or an interrupt. Exits."""
    k = load_data(cpu, mask)
    cpu.wrmsr(MSR_IA32_TSC_DEADLINE, max(1, min(deadline, k.next_tick)))
    cpu.hlt()


def nmi_return(cpu: GuestCpu, mask: int) -> None:
    """Leave the NMI handler: resume the workload where the NMI stopped it."""
    k = load_data(cpu, mask)
    _store_data(cpu, replace(k, flags=k.flags & ~IN_NMI), mask)
    cpu.regs.rip = k.nmi_rip


# --- boot ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Cmdline:
    workload: str
    options: Mapping[str, str]
    """The workload's ``key=value`` options (the kernel's own are taken out)."""
    sev_migration: bool = True
    """False with ``sev_migration=off``: the kernel does not enable live migration."""


def parse_cmdline(cmdline: str) -> Cmdline:
    """Split ``workload=NAME key=value ...`` into the kernel's options and the workload's."""
    options: dict[str, str] = {}
    for token in cmdline.split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ValueError(f"malformed option {token!r} (expected key=value)")
        if key in options:
            raise ValueError(f"option {key!r} given twice")
        options[key] = value
    sev_migration = options.pop(SEV_MIGRATION_OPTION, "on")
    if sev_migration not in _ON_OFF:
        raise ValueError(f"{SEV_MIGRATION_OPTION}={sev_migration} (expected on or off)")
    return Cmdline(workload=options.pop("workload", DEFAULT_WORKLOAD), options=options,
                   sev_migration=_ON_OFF[sev_migration])


def missing_migration_legs(cpu: GuestCpu, info: bootinfo.BootInfo, cmdline: Cmdline,
                           mask: int) -> list[str]:
    """Which legs of the live-migration negotiation an SEV guest lacks (none: allowed).

    The hypervisor's: CPUID ``KVM_FEATURE_MIGRATION_CONTROL``; the firmware's: the UEFI
    variable ``SevLiveMigrationEnabled`` set in the store the boot info names; the
    kernel's: not switched off with ``sev_migration=off``."""
    missing = []
    if not mem_encrypt.has_migration_control(cpu):
        missing.append("hypervisor: no KVM_FEATURE_MIGRATION_CONTROL")
    store = info.platform.varstore
    variable = None if store is None else varstore.get_variable(
        cpu, store.start, store.size, varstore.SEV_LIVE_MIGRATION_ENABLED,
        varstore.AMD_SEV_MEM_ENCRYPT_GUID, mask)
    if variable is None or variable.data[:1] in (b"", b"\0"):  # a 1-byte BOOLEAN, TRUE if set
        missing.append(f"firmware: {varstore.SEV_LIVE_MIGRATION_ENABLED} not set")
    if not cmdline.sev_migration:
        missing.append(f"kernel: {SEV_MIGRATION_OPTION}=off")
    return missing


def _boot(workloads: Mapping[str, Workload], cpu: GuestCpu, mask: int) -> None:
    info = bootinfo.load(cpu, mask)
    try:
        cmdline = parse_cmdline(info.cmdline)
        name = cmdline.workload
        if name not in workloads:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(sorted(workloads))})")
        workload = workloads[name]
        encoded = workload.parse(cmdline.options)
    except ValueError as exc:
        halt(cpu, f"confmig kernel: {exc}")
        return
    if len(encoded) > PARAMS_MAX:
        raise GuestFault(f"kernel: {name} options take {len(encoded)} bytes")
    cpu.write((KERNEL_DATA_GPA + _PARAMS_OFFSET) | mask, encoded)
    _store_data(cpu, KernelData(
        workload=name, flags=0, params_len=len(encoded), tick_ns=workload.tick_ns,
        next_tick=cpu.rdtsc() + workload.tick_ns, jiffies=0, nmi_rip=0, nmis=0,
    ), mask)
    if not mask:  # a plain guest: nothing to negotiate
        _start(workloads, cpu, mask)
        return
    missing = missing_migration_legs(cpu, info, cmdline, mask)
    if missing:
        cpu.regs.rip = KERNEL_BASE + Phase.START
        console_write(cpu, f"{MIGRATION_NOT_ALLOWED} ({'; '.join(missing)})")
        return
    cpu.regs.rip = KERNEL_BASE + Phase.MIGRATION
    cpu.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)  # exits to the VMM


def _migration_enabled(cpu: GuestCpu) -> None:
    cpu.regs.rip = KERNEL_BASE + Phase.START
    console_write(cpu, MIGRATION_ALLOWED_LINE)


def _start(workloads: Mapping[str, Workload], cpu: GuestCpu, mask: int) -> None:
    k = load_data(cpu, mask)
    workload = workloads.get(k.workload)
    if workload is None:
        raise GuestFault(f"kernel: no workload {k.workload!r}")
    encoded = cpu.read((KERNEL_DATA_GPA + _PARAMS_OFFSET) | mask, k.params_len)
    cpu.regs.rip = workload.entry
    console_write(cpu, f"confmig kernel: workload {k.workload} ({workload.describe(encoded)})")


def _kernel_step(workloads: Mapping[str, Workload], cpu: GuestCpu) -> None:
    phase = cpu.regs.rip - KERNEL_BASE
    if phase == Phase.HALT:
        cpu.hlt()
        return
    if phase not in (Phase.ENTRY, Phase.MIGRATION, Phase.START, Phase.GATED):
        raise GuestFault(f"kernel: no instruction at {cpu.regs.rip:#x}")
    mask = mem_encrypt.encryption_mask(cpu)
    if phase == Phase.GATED:
        _gated(cpu, mask)
    elif mask and gate.closed(value := gate.load(cpu, mask)):
        _close_gate(cpu, value, mask)
    elif phase == Phase.ENTRY:
        _boot(workloads, cpu, mask)
    elif phase == Phase.MIGRATION:
        _migration_enabled(cpu)
    else:
        _start(workloads, cpu, mask)


def _close_gate(cpu: GuestCpu, value: int, mask: int) -> None:
    """Park at GATED, keeping where this vCPU was; say why (once: this is the exit). Asked to
    save (SEV-ES, a Migration Handler migration), first save the registers as they are: a
    target continues from them, as if this vCPU never stopped."""
    if value == gate.SAVING:
        saved_state.save(cpu, mask)
    cpu.regs.r12 = cpu.regs.rip
    cpu.regs.rip = KERNEL_BASE + Phase.GATED
    console_write(cpu, gate.REASONS[value])


def _gated(cpu: GuestCpu, mask: int) -> None:
    if not gate.closed(gate.load(cpu, mask)):
        saved_state.clear(cpu, cpu.vcpu_id, mask)  # whatever was saved will not be used
        cpu.regs.rip = cpu.regs.r12  # opened again: continue where the gate stopped us
        return
    for _ in range(GATED_INTERRUPTS_MAX):  # a pending interrupt would end every hlt at once
        if cpu.pending_interrupt() is None:
            break
    cpu.hlt()


def kernel_region(workloads: Mapping[str, Workload]) -> RomRegion:
    return RomRegion(
        name="kernel", base=KERNEL_BASE, size=KERNEL_SIZE, step=partial(_kernel_step, workloads)
    )


# --- running a workload --------------------------------------------------------------------


def _task_step(workload: Workload, cpu: GuestCpu) -> None:
    mask = mem_encrypt.encryption_mask(cpu)  # once per step: the workload gets it too
    before = k = load_data(cpu, mask)
    if mask and gate.closed(k.gate):
        _close_gate(cpu, k.gate, mask)
        return
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
        _store_data(cpu, k, mask)
    workload.step(cpu, mask)


def task_region(workload: Workload) -> RomRegion:
    """The workload's code, entered through the kernel on every step."""
    return RomRegion(
        name=workload.name,
        base=workload.code_base,
        size=WORKLOAD_CODE_SIZE,
        step=partial(_task_step, workload),
    )
