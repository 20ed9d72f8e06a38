"""A test double of the vCPU: runs guest programs over a GuestMemory, exits handled inline.

Faithful to ``confmig.platform.cpu.abi`` wherever guest code could tell:

* at most one exiting instruction per step, and nothing after it (stricter
  than a CPU can check: any later CPU access raises GuestFault);
* the exit is handled after the step returns, so ``inp``/``mmio_read``/
  ``hypercall`` results appear in ``rax`` only for the next step; ``out``
  delivers the value little-endian, ``outs`` all bytes in one access;
* ``pending_interrupt`` acknowledges an NMI first, then the highest vector;
* the TSC deadline is one-shot and raises LOCAL_TIMER_VECTOR when it passes;
  ``hlt`` sleeps until then or an interrupt, and with nothing armed and
  nothing pending the vCPU stays halted;
* a GuestFault shuts the vCPU down, as a triple fault would.

Time is virtual: every step costs ``step_ns`` and a sleeping ``hlt`` jumps to
the deadline, so a run is a pure function of its start state. ``idle_wait``
lets a sleeping vCPU wait that many real seconds for an interrupt from another
thread (a device) before time jumps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
    RESET_VECTOR,
    GuestFault,
    Pages,
    Registers,
    RomRegion,
)
from confmig.vmm.devices import PortIoDevice
from confmig.vmm.memory import GuestMemory

NMI_VECTOR = 2
LOCAL_TIMER_VECTOR = 0xEC
STEP_NS = 1_000
KVM_ENOSYS = 1000
_ALL_ONES = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """What a VMM saves of a vCPU besides RAM: registers, TSC, timer, interrupts."""

    regs: tuple[int, ...]
    tsc: int
    tsc_deadline: int
    migration_control: int
    nmi_pending: bool
    irr: frozenset[int]
    halted: bool


class FakeCpu:
    def __init__(
        self,
        memory: GuestMemory,
        devices: Sequence[PortIoDevice],
        *,
        vcpu_id: int = 0,
        step_ns: int = STEP_NS,
        idle_wait: float = 0.0,
    ) -> None:
        self.memory = memory
        self._ports = {port: dev for dev in devices for port in dev.ports}
        self._vcpu_id = vcpu_id
        self._step_ns = step_ns
        self._idle_wait = idle_wait
        self.regs = Registers()
        self.regs.rip = RESET_VECTOR
        self.tsc = 0
        self.tsc_deadline = 0
        self.migration_control = 0
        self.nmi_pending = False
        self.irr: set[int] = set()
        self.halted = False
        self.shutdown_reason: str | None = None
        self.steps = 0
        self._exit: tuple[str, tuple[int | bytes, ...]] | None = None
        self._interrupts = threading.Condition()

    @property
    def vcpu_id(self) -> int:
        return self._vcpu_id

    # --- what the host does ------------------------------------------------------------

    def inject(self, vector: int) -> None:
        """Raise an interrupt (vector 2: an NMI); safe from any thread."""
        with self._interrupts:
            if vector == NMI_VECTOR:
                self.nmi_pending = True
            else:
                self.irr.add(vector)
            self._interrupts.notify_all()

    def step(self, rom: Sequence[RomRegion]) -> None:
        """Run one guest step and handle the exit it ended with."""
        self._fire_timer_if_due()
        self.tsc += self._step_ns
        self.steps += 1
        region = next((r for r in rom if r.contains(self.regs.rip)), None)
        try:
            if region is None:
                raise GuestFault(f"#PF: instruction fetch from {self.regs.rip:#x}")
            region.step(self)
        except GuestFault as fault:
            self.shutdown_reason = str(fault)
            self._exit = None
            return
        self._complete_exit()

    def run(
        self,
        rom: Sequence[RomRegion],
        *,
        until: Callable[[FakeCpu], bool],
        max_steps: int = 1_000_000,
    ) -> None:
        """Step until ``until`` holds, the vCPU shuts down, or it halts for good."""
        for _ in range(max_steps):
            if until(self) or self.shutdown_reason is not None:
                return
            if self.halted:
                if not self._sleep():
                    return
                continue
            self.step(rom)
        raise TimeoutError(f"condition not met within {max_steps} steps")

    def snapshot(self) -> CpuSnapshot:
        with self._interrupts:
            return CpuSnapshot(
                regs=self.regs.as_tuple(),
                tsc=self.tsc,
                tsc_deadline=self.tsc_deadline,
                migration_control=self.migration_control,
                nmi_pending=self.nmi_pending,
                irr=frozenset(self.irr),
                halted=self.halted,
            )

    def restore(self, snap: CpuSnapshot) -> None:
        self.regs = Registers(snap.regs)
        self.tsc = snap.tsc
        self.tsc_deadline = snap.tsc_deadline
        self.migration_control = snap.migration_control
        self.nmi_pending = snap.nmi_pending
        self.irr = set(snap.irr)
        self.halted = snap.halted

    def _fire_timer_if_due(self) -> None:
        if self.tsc_deadline and self.tsc >= self.tsc_deadline:
            self.tsc_deadline = 0
            self.inject(LOCAL_TIMER_VECTOR)

    def _sleep(self) -> bool:
        """A halted vCPU waits; False if nothing can ever wake it (no timer, no device)."""
        with self._interrupts:
            if not (self.nmi_pending or self.irr) and self._idle_wait:
                self._interrupts.wait(self._idle_wait)
            woken = self.nmi_pending or bool(self.irr)
        if not woken and self.tsc_deadline:
            self.tsc = max(self.tsc, self.tsc_deadline)
            self._fire_timer_if_due()
            woken = True
        if woken:
            self.halted = False
        return woken or self._idle_wait > 0

    # --- GuestCpu: memory --------------------------------------------------------------

    def _instruction(self) -> None:
        if self._exit is not None:
            raise GuestFault(f"instruction after the exiting {self._exit[0]}")

    def _locate(self, gpa: int, size: int) -> tuple[npt.NDArray[np.uint8], int]:
        self._instruction()
        try:
            block, offset = self.memory.translate(gpa, size)
        except ValueError as exc:
            raise GuestFault(f"#PF: no RAM at {gpa:#x}+{size:#x}") from exc
        return block.bytes, offset

    def read(self, gpa: int, size: int) -> bytes:
        ram, off = self._locate(gpa, size)
        return ram[off : off + size].tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        ram, off = self._locate(gpa, len(data))
        ram[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def read_pages(self, gpa: int, npages: int) -> Pages:
        if gpa % PAGE_SIZE:
            raise GuestFault(f"unaligned page access at {gpa:#x}")
        ram, off = self._locate(gpa, npages * PAGE_SIZE)
        return ram[off : off + npages * PAGE_SIZE].reshape(npages, PAGE_SIZE).copy()

    def write_pages(self, gpa: int, data: Pages) -> None:
        if gpa % PAGE_SIZE or data.ndim != 2 or data.shape[1] != PAGE_SIZE:
            raise GuestFault(f"write_pages: bad page block {data.shape} at {gpa:#x}")
        ram, off = self._locate(gpa, data.size)
        ram[off : off + data.size] = data.reshape(-1)

    # --- GuestCpu: non-exiting instructions --------------------------------------------

    def rdtsc(self) -> int:
        self._instruction()
        return self.tsc

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        self._instruction()
        return (0, 0, 0, 0)

    def rdmsr(self, msr: int) -> int:
        self._instruction()
        if msr == MSR_IA32_TSC:
            return self.tsc
        if msr == MSR_IA32_TSC_DEADLINE:
            return self.tsc_deadline
        if msr == MSR_KVM_MIGRATION_CONTROL:
            return self.migration_control
        raise GuestFault(f"#GP: rdmsr {msr:#x}")

    def pending_interrupt(self) -> int | None:
        self._instruction()
        with self._interrupts:
            if self.nmi_pending:
                self.nmi_pending = False
                return NMI_VECTOR
            if self.irr:
                vector = max(self.irr)
                self.irr.discard(vector)
                return vector
        return None

    # --- GuestCpu: exiting instructions ------------------------------------------------

    def _leave(self, kind: str, *args: int | bytes) -> None:
        self._instruction()
        self._exit = (kind, args)

    def wrmsr(self, msr: int, value: int) -> None:
        if msr == MSR_IA32_TSC_DEADLINE:
            self._instruction()  # handled in-kernel: no exit
            self.tsc_deadline = value
        elif msr == MSR_KVM_MIGRATION_CONTROL:
            self._leave("wrmsr", msr, value)
        else:
            raise GuestFault(f"#GP: wrmsr {msr:#x}")

    def out(self, port: int, value: int, size: int = 1) -> None:
        if size not in (1, 2, 4):
            raise GuestFault(f"out: bad operand size {size}")
        self._leave("out", port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def outs(self, port: int, data: bytes) -> None:
        self._leave("out", port, bytes(data))

    def inp(self, port: int, size: int = 1) -> None:
        if size not in (1, 2, 4):
            raise GuestFault(f"in: bad operand size {size}")
        self._leave("in", port, size)

    def mmio_write(self, gpa: int, data: bytes) -> None:
        self._leave("mmio_write", gpa, data)

    def mmio_read(self, gpa: int, size: int) -> None:
        self._leave("mmio_read", gpa, size)

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0) -> None:
        self._leave("hypercall", nr, a0, a1, a2, a3)

    def hlt(self) -> None:
        self._leave("hlt")

    def shutdown(self) -> None:
        self._leave("shutdown")

    def _complete_exit(self) -> None:
        if self._exit is None:
            return
        (kind, args), self._exit = self._exit, None
        if kind == "out":
            port, data = args
            assert isinstance(port, int) and isinstance(data, bytes)
            if port in self._ports:
                self._ports[port].io_out(port, data)
        elif kind == "in":
            port, size = args
            assert isinstance(port, int) and isinstance(size, int)
            device = self._ports.get(port)
            data = device.io_in(port, size) if device else b"\xff" * size
            self.regs.rax = int.from_bytes(data, "little")
        elif kind == "mmio_read":
            self.regs.rax = _ALL_ONES  # no MMIO devices: reads float high
        elif kind == "hypercall":
            self.regs.rax = -KVM_ENOSYS
        elif kind == "wrmsr":
            value = args[1]
            assert isinstance(value, int)
            self.migration_control = value
        elif kind == "hlt":
            self.halted = True
        elif kind == "shutdown":
            self.shutdown_reason = "guest requested shutdown"
