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

SEV, as guest code can tell it (``sev=True``):

* CPUID 0x8000001F says SEV with the C-bit at 51 and ``MSR_AMD64_SEV`` reads 1;
  CPUID 0x40000000 has the KVM signature and 0x40000001 EAX ``kvm_features``
  (without SEV as well, as the real core);
* an access with the C-bit is private: RAM holds it XORed with a keystream
  bound to the page's GPA (not AES, but just as opaque to a test that reads
  RAM: plaintext never appears there, and a page read without the C-bit, or
  moved to another GPA, reads as garbage). Without SEV the C-bit is a #GP;
* every page the guest touches without the C-bit is recorded in
  ``shared_pages`` (GFNs), so a test can check that private data never went
  out in the clear;
* ``hypercall`` exits are recorded in ``hypercalls`` and return
  ``hypercall_result``; ``wrmsr`` exits in ``msr_writes``;
* ``sev_lookups`` keeps, per ROM region, the most CPUID 0x8000001F queries
  one step made (how often a step found out its encryption mask).

The keystream depends only on ``key`` and the GPA, so a snapshot's RAM copied
into a fresh machine with the same key decrypts the same (a migration between
two fake hosts that share their memory key).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import (
    C_BIT,
    C_BIT_POSITION,
    CPUID_AMD_SEV,
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    KVM_ENOSYS,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_SIGNATURE,
    LOCAL_TIMER_VECTOR,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ENABLED,
    MSR_AMD64_SEV_ES_ENABLED,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
    NMI_VECTOR,
    RESET_VECTOR,
    GuestFault,
    Pages,
    Registers,
    RomRegion,
)
from confmig.vmm.devices import PortIoDevice
from confmig.vmm.memory import GuestMemory

STEP_NS = 1_000
_ALL_ONES = (1 << 64) - 1
MIGRATION_FEATURES = 1 << KVM_FEATURE_HC_MAP_GPA_RANGE | 1 << KVM_FEATURE_MIGRATION_CONTROL
"""CPUID 0x40000001 EAX as confmig's VMM sets it for an SEV guest."""
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


def _keystream_base(key: int) -> npt.NDArray[np.uint64]:
    words: npt.NDArray[np.uint64] = np.random.default_rng(key).integers(
        0, 1 << 64, PAGE_SIZE // 8, dtype=np.uint64, endpoint=False)
    return words


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
        sev: bool = False,
        kvm_features: int = 0,
        hypercall_result: int = -KVM_ENOSYS,
        key: int = 1,
        es: bool = False,
    ) -> None:
        self.memory = memory
        self.es = sev and es
        """SEV-ES: ``MSR_AMD64_SEV`` says so (the registers stay the test's to read)."""
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
        self.sev = sev
        signature = [int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8)]
        self.cpuid_table: dict[int, tuple[int, int, int, int]] = {
            KVM_CPUID_SIGNATURE: (KVM_CPUID_FEATURES, *signature),  # type: ignore[dict-item]
            KVM_CPUID_FEATURES: (kvm_features, 0, 0, 0),
        }
        if sev:
            self.cpuid_table[CPUID_AMD_SEV] = (1 << 1, C_BIT_POSITION | 1 << 6, 0, 0)
        self.hypercall_result = hypercall_result
        self.hypercalls: list[tuple[int, int, int, int, int]] = []
        self.msr_writes: list[tuple[int, int]] = []
        self.shared_pages: set[int] = set()
        """GFNs the guest read or wrote without the C-bit (SEV only)."""
        self.sev_lookups: dict[str, int] = {}
        self._step_sev_lookups = 0
        self._keystream = _keystream_base(key)

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
            self._step_sev_lookups = 0
            region.step(self)
            self.sev_lookups[region.name] = max(
                self.sev_lookups.get(region.name, 0), self._step_sev_lookups)
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

    def _locate(self, gpa: int, size: int) -> tuple[npt.NDArray[np.uint8], int, int, bool]:
        """``(RAM, offset, GPA without the C-bit, private?)`` for an access."""
        self._instruction()
        private = bool(gpa & C_BIT)
        if private and not self.sev:
            raise GuestFault(f"#GP: C-bit set at {gpa:#x} but SEV is not active")
        gpa &= ~C_BIT
        try:
            block, offset = self.memory.translate(gpa, size)
        except ValueError as exc:
            raise GuestFault(f"#PF: no RAM at {gpa:#x}+{size:#x}") from exc
        if self.sev and not private:
            self.shared_pages.update(range(gpa // PAGE_SIZE, (gpa + max(size, 1) - 1) // PAGE_SIZE + 1))
        return block.bytes, offset, gpa, private

    def keystream(self, gpa: int, size: int) -> npt.NDArray[np.uint8]:
        """What a private access at ``gpa`` XORs with its ``size`` bytes (GPA-bound)."""
        first = gpa // PAGE_SIZE
        npages = (gpa + size - 1) // PAGE_SIZE - first + 1
        tweak = np.arange(first, first + npages, dtype=np.uint64) * _GOLDEN
        words = self._keystream[None, :] ^ tweak[:, None]
        start = gpa - first * PAGE_SIZE
        stream: npt.NDArray[np.uint8] = words.view(np.uint8).reshape(-1)[start : start + size]
        return stream

    def read(self, gpa: int, size: int) -> bytes:
        ram, off, gpa, private = self._locate(gpa, size)
        raw = ram[off : off + size]
        return (raw ^ self.keystream(gpa, size)).tobytes() if private else raw.tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        ram, off, gpa, private = self._locate(gpa, len(data))
        plain = np.frombuffer(data, dtype=np.uint8)
        ram[off : off + len(data)] = plain ^ self.keystream(gpa, len(data)) if private else plain

    def read_pages(self, gpa: int, npages: int, out: Pages | None = None) -> Pages:
        if gpa % PAGE_SIZE:
            raise GuestFault(f"unaligned page access at {gpa:#x}")
        size = npages * PAGE_SIZE
        ram, off, gpa, private = self._locate(gpa, size)
        raw = ram[off : off + size]
        pages = (raw ^ self.keystream(gpa, size) if private else raw.copy()).reshape(npages, PAGE_SIZE)
        if out is None:
            return pages
        out[:] = pages
        return out

    def write_pages(self, gpa: int, data: Pages) -> None:
        if gpa % PAGE_SIZE or data.ndim != 2 or data.shape[1] != PAGE_SIZE:
            raise GuestFault(f"write_pages: bad page block {data.shape} at {gpa:#x}")
        ram, off, gpa, private = self._locate(gpa, data.size)
        plain = data.reshape(-1)
        ram[off : off + data.size] = plain ^ self.keystream(gpa, data.size) if private else plain

    # --- GuestCpu: non-exiting instructions --------------------------------------------

    def rdtsc(self) -> int:
        self._instruction()
        return self.tsc

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        self._instruction()
        self._step_sev_lookups += leaf == CPUID_AMD_SEV
        return self.cpuid_table.get(leaf, (0, 0, 0, 0))

    def rdmsr(self, msr: int) -> int:
        self._instruction()
        if msr == MSR_AMD64_SEV:
            return (MSR_AMD64_SEV_ENABLED if self.sev else 0) | (MSR_AMD64_SEV_ES_ENABLED if self.es else 0)
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
            nr, a0, a1, a2, a3 = (int(a) for a in args)
            self.hypercalls.append((nr, a0, a1, a2, a3))
            self.regs.rax = self.hypercall_result
        elif kind == "wrmsr":
            msr, value = args
            assert isinstance(msr, int) and isinstance(value, int)
            self.msr_writes.append((msr, value))
            self.migration_control = value
        elif kind == "hlt":
            self.halted = True
        elif kind == "shutdown":
            self.shutdown_reason = "guest requested shutdown"
