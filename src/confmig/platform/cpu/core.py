"""The emulated CPU core: executes guest programs and produces #VMEXITs.

One core per vCPU process. It implements :class:`~confmig.platform.cpu.abi.GuestCpu`
for the guest programs it runs, and the small in-kernel parts that real KVM
emulates without leaving the kernel (TSC, TSC-deadline timer, MSR storage,
CPUID table, interrupt acknowledgement); everything else becomes a
:class:`~confmig.common.svm.VmExit` for the host kernel.

SEV-ES. Once KVM has launched a vCPU's VMSA (LAUNCH_UPDATE_VMSA) or received
one (RECEIVE_UPDATE_VMSA), its register file belongs to the guest: KVM can
neither read nor set it. The core then does what the CPU does with the VMSA
page KVM named (the VMCB's VMSA pointer, host memory at a system-physical
address): VMRUN loads the registers from it, decrypted under the guest's key
with the page's address as tweak, after checking the page against the
checksum in the TMR (:meth:`CpuCore.enter`, :meth:`CpuCore.vmsa_load`); a
#VMEXIT that KVM needs stores them back encrypted and records the new
checksum in the TMR (:meth:`CpuCore.vmsa_save`). While the guest runs, the
registers stay inside the core, as in a real CPU. The page layout is
:func:`confmig.platform.psp.vmsa.vmsa_image`'s.

The guest code. A real CPU fetches the instructions the launch measured: the
firmware in flash, encrypted by LAUNCH_UPDATE_DATA. Here the guest programs are
Python code the vCPU process loads from disk, and the flash holds a firmware
image that stands for them: its header carries the SHA-256 of the guest code it
was built from (:mod:`confmig.guest.firmware.image`). So that the code that runs
is the code the launch measured, the first VMRUN of a core compares the digest
of the code its vCPU process loaded with the one in the image's header, read
through this guest's memory (for an SEV guest as a private access, under the
guest's key) and refuses to run on a mismatch (:meth:`CpuCore.enter`). A guest
with no flash at the image's address (no ``-bios``) runs unchecked: nothing in
it states which code should run, and for an SEV guest the launch measurement
then covers no code, which an owner who checks it against the firmware digest
refuses. For a plain guest the check is one of consistency only: the host can
write its flash. The image format's facts the check needs are copied here, not
imported, so that the check rests on no guest code.
"""

from __future__ import annotations

import bisect
import hmac
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from confmig.common.svm import SvmExitCode, VmExit
from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import (
    C_BIT,
    C_BIT_POSITION,
    CPUID_AMD_SEV,
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    KVM_SIGNATURE,
    LOCAL_TIMER_VECTOR,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ENABLED,
    MSR_AMD64_SEV_ES_ENABLED,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_MIGRATION_CONTROL,
    NMI_VECTOR,
    GuestFault,
    Pages,
    Registers,
    RomRegion,
)
from confmig.platform.mee import BLOCK_SIZE, MemoryEncryptionEngine
from confmig.platform.psp.vmsa import (
    VMSA_REGISTER_OFFSETS,
    TmrMemory,
    vmsa_crc,
    vmsa_crc_block,
    vmsa_image,
    vmsa_registers,
)

CpuidTable = dict[tuple[int, int], tuple[int, int, int, int]]

log = logging.getLogger(__name__)

FIRMWARE_IMAGE_GPA: Final = 0xFFFF_0000
"""Where the firmware image starts: 64 KiB of flash ending at 4 GiB, the reset vector's
(``confmig.guest.layout.FIRMWARE_BASE``; a test keeps the two equal)."""
FIRMWARE_IMAGE_MAGIC: Final = b"CMFWIMG1"
FIRMWARE_IMAGE_FORMAT_VERSION: Final = 1
FIRMWARE_IMAGE_HEAD: Final = struct.Struct("<8sHHI16s32s")
"""The fields of the image's header up to the code digest: magic, format version, header
size, image size, firmware version, SHA-256 of the guest code the image was built from."""


def default_cpuid() -> CpuidTable:
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
    return {
        (KVM_CPUID_SIGNATURE, 0): (KVM_CPUID_FEATURES, ebx, ecx, edx),
        (KVM_CPUID_FEATURES, 0): (0, 0, 0, 0),
    }




def _block_span(addr: int, size: int) -> tuple[int, int]:
    """The engine's 16-byte blocks that ``[addr, addr + size)`` touches: (first, length)."""
    first = addr & ~(BLOCK_SIZE - 1)
    last = (addr + size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
    return first, last - first


class PhysicalMemory(Protocol):
    """Guest-physical memory as the core reaches it (the host kernel's memory slots)."""

    def backed(self, gpa: int, size: int) -> bool: ...

    def spa(self, gpa: int) -> int:
        """The emulated system-physical address behind ``gpa`` (the engine's tweak)."""
        ...

    def load(self, gpa: int, size: int) -> bytes: ...

    def store(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def view_pages(self, gpa: int, npages: int) -> Pages:
        """The pages in place (no copy), to read at once: the memory may change behind them."""
        ...

    def store_pages(self, gpa: int, data: Pages) -> None: ...

    def update_pages(self, gpa: int, npages: int, fill: Callable[[Pages], object]) -> None:
        """Let ``fill`` write the pages in place, then count them written (a store through a
        pointer: the dirty log sees the pages once they hold what was written)."""
        ...


class VmsaBacking(Protocol):
    """The 4 KiB VMSA page KVM gave this vCPU: host memory (ciphertext once launched)."""

    @property
    def spa(self) -> int:
        """Its system-physical address (the engine's tweak)."""
        ...

    def read(self) -> bytes: ...

    def write(self, data: bytes) -> None: ...


class CpuCore:
    """A vCPU's execution engine. Not thread-safe: one vCPU process drives it."""

    def __init__(
        self,
        vcpu_id: int,
        memory: PhysicalMemory,
        rom: Sequence[RomRegion],
        *,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        mee: MemoryEncryptionEngine | None = None,
        tmr: TmrMemory | None = None,
        code_digest: bytes | None = None,
    ) -> None:
        self._vcpu_id = vcpu_id
        self.memory = memory
        self.mee = mee
        """The memory controller's engine; its key slots also say which ASIDs may run
        (None: no SEV guest runs on this core)."""
        self._tmr = tmr
        self.asid = 0
        self.es = False
        self._vmsa: VmsaBacking | None = None
        self._protected = False
        """SEV-ES: the register file is the guest's (KVM's ``guest_state_protected``)."""
        self._in_vmsa = False
        """The guest's registers are in the encrypted VMSA page, not in the core."""
        self._vmsa_plain = b""
        """The VMSA as last loaded or stored (its fields other than the registers)."""
        self._rom = sorted(rom, key=lambda r: r.base)
        self._rom_bases = [r.base for r in self._rom]
        self._code_digest = code_digest
        """SHA-256 of the guest code ``rom`` was loaded from, as the firmware image states it
        (None: code no image states, such as a test's ROM)."""
        self._code_checked = False
        """The code matched the firmware image at a VMRUN (checked once per core)."""
        self.entry_error: str | None = None
        """Why the last VMRUN refused the guest, if it did."""
        self._current: RomRegion | None = None
        self._clock_ns = clock_ns
        self._regs = Registers()
        self.tsc_offset = -clock_ns()
        self.tsc_deadline = 0
        self.msrs: dict[int, int] = {MSR_KVM_MIGRATION_CONTROL: 0, MSR_AMD64_SEV: 0}
        self.msr_exits: frozenset[int] = frozenset()
        """MSRs whose writes the MSR filter denies: they leave to the VMM when
        ``msr_user_exit`` (KVM_CAP_X86_USER_SPACE_MSR), else they #GP."""
        self.msr_user_exit = False
        self.cpuid_table = default_cpuid()
        self.halted = False
        self.nmi_pending = False
        self.irr: set[int] = set()
        self._exit: VmExit | None = None

    # --- what the host kernel calls --------------------------------------------

    def step(self) -> VmExit | None:
        """Run one guest step; return the exit it ended with, if any."""
        if self._in_vmsa and not self.vmsa_load():  # KVM enters first; this is the CPU's own check
            return VmExit(code=SvmExitCode.SHUTDOWN, reason="VMRUN: the VMSA failed its integrity check")
        try:
            self._region(self._regs.rip).step(self)
        except GuestFault as fault:
            self._exit = VmExit(code=SvmExitCode.SHUTDOWN, reason=str(fault))
        ex, self._exit = self._exit, None
        return ex

    def complete(self, value: int) -> None:
        """Deliver the result of the last exit (``in``, MMIO read, hypercall) in rax."""
        self._regs.rax = value

    @property
    def regs(self) -> Registers:
        return self._regs

    @regs.setter
    def regs(self, regs: Registers) -> None:
        self._regs = regs

    def get_regs_tuple(self) -> tuple[int, ...]:
        self._check_unprotected()
        return self._regs.as_tuple()

    def set_regs_tuple(self, values: tuple[int, ...]) -> None:
        self._check_unprotected()
        self._regs = Registers(values)

    def _check_unprotected(self) -> None:
        if self._protected:
            raise PermissionError("SEV-ES: the register file is in the guest's encrypted VMSA")

    # --- SEV-ES: the VMSA ----------------------------------------------------------

    @property
    def state_protected(self) -> bool:
        return self._protected

    def set_vmsa(self, page: VmsaBacking | None) -> None:
        """KVM names this vCPU's VMSA page (the VMCB's VMSA pointer)."""
        self._vmsa = page

    def vmsa_sync(self) -> bool:
        """Before LAUNCH_UPDATE_VMSA: the register file into the VMSA page, in plaintext
        (KVM's ``sev_es_sync_vmsa``: the host set these registers, they are no secret yet).
        False if there is no page or the state is already protected."""
        if self._vmsa is None or self._protected:
            return False
        self._vmsa.write(vmsa_image(dict(zip(Registers.NAMES, self._regs.as_tuple(), strict=True))))
        return True

    def vmsa_launched(self) -> None:
        """LAUNCH_UPDATE_VMSA measured, sealed and encrypted the page: from now on it is the
        register file. The core drops its copy; the first VMRUN loads the page."""
        self._protected = True
        self._in_vmsa = True
        self._regs = Registers()

    def vmsa_save(self) -> bool:
        """#VMEXIT of an SEV-ES guest as KVM needs it (before SEND_UPDATE_VMSA): the registers
        go into the VMSA page encrypted under the guest's key, and the page's checksum into
        its TMR block. True if the page now holds the current state (also when it already
        did: a page the host changed since is not overwritten, so VMRUN or the PSP catch it)."""
        if not self._protected:
            return False
        if self._in_vmsa:
            return True
        if (self._vmsa is None or self.mee is None or self._tmr is None or not self.asid
                or len(self._vmsa_plain) != PAGE_SIZE):
            return False
        patched = bytearray(self._vmsa_plain)
        for name, offset in VMSA_REGISTER_OFFSETS.items():
            struct.pack_into("<Q", patched, offset, getattr(self._regs, name))
        page = bytes(patched)
        try:
            cipher = self.mee.encrypt(self.asid, self._vmsa.spa, page)
        except PermissionError:
            return False  # the guest's key is gone (deactivated): its state cannot be stored
        if not self._tmr.store(vmsa_crc_block(page), vmsa_crc(page)):
            return False
        self._vmsa.write(cipher)
        self._vmsa_plain = page
        self._in_vmsa = True
        self._regs = Registers()
        return True

    def vmsa_load(self) -> bool:
        """VMRUN's load of an SEV-ES guest: the registers from the VMSA page, decrypted under
        the guest's key, if the page matches the checksum in the TMR block it names. On a
        mismatch (a page the host changed or replayed, or another guest's) nothing changes
        and the answer is False (VMEXIT_INVALID)."""
        if self._vmsa is None or self.mee is None or self._tmr is None or not self.asid:
            return False
        try:
            plain = self.mee.decrypt(self.asid, self._vmsa.spa, self._vmsa.read())
        except (PermissionError, ValueError):
            return False
        stored = self._tmr.load(vmsa_crc_block(plain))
        if stored is None or stored != vmsa_crc(plain):
            return False
        registers = vmsa_registers(plain)
        self._regs = Registers(tuple(registers[name] for name in Registers.NAMES))
        self._vmsa_plain = plain
        self._protected = True
        self._in_vmsa = False
        return True

    def enter(self) -> bool:
        """VMRUN: an SEV-ES guest whose state is in its VMSA is loaded from it first. False
        (VMEXIT_INVALID), with nothing changed, if the guest may not run: an SEV ASID the PSP
        has not marked runnable, guest code that is not the code the firmware image in guest
        memory was built from (checked at the first VMRUN that gets this far, see the module
        docstring), or a VMSA that fails its check. :attr:`entry_error` says which.

        The ASID check: the firmware marks an ASID valid on the cores once the guest activated
        on it has finished its launch or receive, so a guest never runs on memory still being
        written. That it withdraws the mark at SEND_FINISH is this emulation's choice: a SENT
        guest that ran on would fork from the copy the target resumes."""
        error = None
        if self.asid and (self.mee is None or not self.mee.slots.runnable(self.asid)):
            error = f"ASID {self.asid} is not runnable"
        elif not self._code_checked:
            error = self._check_code()
            self._code_checked = error is None
            if error is not None and error != self.entry_error:
                # The VMM learns only KVM_EXIT_FAIL_ENTRY: the reason goes to the host's log,
                # once per reason rather than once per KVM_RUN.
                log.error("vcpu%d: VMRUN refused: %s", self._vcpu_id, error)
        if error is None and self._in_vmsa and not self.vmsa_load():
            error = "the VMSA failed its integrity check"
        self.entry_error = error
        return error is None

    def _check_code(self) -> str | None:
        """Why the guest code this core runs is not the code the firmware image states, or None.

        The image is read as the guest reads it: an SEV guest's flash is private (encrypted
        by LAUNCH_UPDATE_DATA, or re-encrypted by RECEIVE_UPDATE_DATA), so a host that put
        other bytes there makes the header decrypt to garbage, which no digest matches."""
        size = FIRMWARE_IMAGE_HEAD.size
        if not self.memory.backed(FIRMWARE_IMAGE_GPA, size):
            return None  # no flash (no -bios): nothing states which code should run
        try:
            head = self.read(FIRMWARE_IMAGE_GPA | (C_BIT if self.asid else 0), size)
        except (GuestFault, PermissionError, ValueError) as exc:
            return f"the firmware image cannot be read ({exc})"
        # SECURITY: the header is guest memory (a plain guest's flash is the host's to write):
        # its fields are compared with what this core knows, never used otherwise.
        magic, version, _header_size, _image_size, _fw_version, stated = FIRMWARE_IMAGE_HEAD.unpack(head)
        if magic != FIRMWARE_IMAGE_MAGIC or version != FIRMWARE_IMAGE_FORMAT_VERSION:
            return f"the flash at {FIRMWARE_IMAGE_GPA:#x} holds no firmware image this core can check"
        if self._code_digest is None:
            return "the guest code this core loaded is not code any firmware image states"
        if not hmac.compare_digest(stated, self._code_digest):
            return (f"the guest code this core loaded (SHA-256 {self._code_digest.hex()[:16]}...) is not "
                    f"the code the firmware image was built from ({stated.hex()[:16]}...)")
        return None

    @property
    def vcpu_id(self) -> int:
        return self._vcpu_id

    def get_msr(self, index: int) -> int | None:
        if index == MSR_IA32_TSC:
            return self.rdtsc()
        if index == MSR_IA32_TSC_DEADLINE:
            return self.tsc_deadline
        return self.msrs.get(index)

    def set_msr(self, index: int, value: int) -> bool:
        if index == MSR_AMD64_SEV:
            return False  # read-only
        if index == MSR_IA32_TSC:
            self.tsc_offset = value - self._clock_ns()
        elif index == MSR_IA32_TSC_DEADLINE:
            self.tsc_deadline = value
        elif index in self.msrs:
            self.msrs[index] = value
        else:
            return False
        return True

    def timer_due_ns(self) -> int | None:
        """Host-monotonic time at which the armed TSC deadline fires, if armed."""
        return self.tsc_deadline - self.tsc_offset if self.tsc_deadline else None

    def fire_timer_if_due(self) -> bool:
        due = self.timer_due_ns()
        if due is None or self._clock_ns() < due:
            return False
        self.tsc_deadline = 0  # TSC-deadline mode is one-shot
        self.inject_irq(LOCAL_TIMER_VECTOR)
        return True

    def inject_nmi(self) -> None:
        self.nmi_pending = True
        self.halted = False

    def inject_irq(self, vector: int) -> None:
        self.irr.add(vector)
        self.halted = False

    # --- GuestCpu: memory ---------------------------------------------------------

    # An access whose address has the C-bit set is *private*: it goes through the
    # memory-encryption engine under this guest's ASID, each 16-byte block with its own
    # system-physical address as tweak; only the blocks an access touches are computed.
    # Without the C-bit it is shared: plaintext the host can read.

    def read(self, gpa: int, size: int) -> bytes:
        addr, private = self._decode(gpa)
        self._check_ram(addr, size)
        if not private:
            return self.memory.load(addr, size)
        first, n = _block_span(addr, size)
        plain = self._decrypt(first, n)
        return plain[addr - first : addr - first + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        addr, private = self._decode(gpa)
        size = len(data)
        self._check_ram(addr, size)
        if not private:
            self.memory.store(addr, data)
            return
        if not size:
            return
        first, n = _block_span(addr, size)
        plain = bytearray(n)
        # Read-modify-write of the partial blocks at either end only; whole ones are replaced.
        head, tail = addr != first, (addr + size) % BLOCK_SIZE != 0
        if head or (tail and n == BLOCK_SIZE):
            plain[:BLOCK_SIZE] = self._decrypt(first, BLOCK_SIZE)
        if tail and n > BLOCK_SIZE:
            plain[-BLOCK_SIZE:] = self._decrypt(first + n - BLOCK_SIZE, BLOCK_SIZE)
        plain[addr - first : addr - first + size] = data
        self.memory.store(first, self._encrypt(first, plain))

    def read_pages(self, gpa: int, npages: int, out: Pages | None = None) -> Pages:
        addr, private = self._decode(gpa)
        self._check_ram(addr, npages * PAGE_SIZE, aligned=True)
        stored = self.memory.view_pages(addr, npages)
        if out is not None and (out.shape != (npages, PAGE_SIZE) or out.dtype != np.uint8):
            raise GuestFault(f"read_pages: expected a ({npages}, {PAGE_SIZE}) uint8 output, got {out.shape}")
        if not private:
            if out is None:
                return stored.copy()
            out[:] = stored
            return out
        assert self.mee is not None
        return self.mee.decrypt_pages(self.asid, self._page_spas(addr, npages), stored, out=out)

    def write_pages(self, gpa: int, data: Pages) -> None:
        if data.ndim != 2 or data.shape[1] != PAGE_SIZE or data.dtype != np.uint8:
            raise GuestFault(f"write_pages: expected (n, {PAGE_SIZE}) uint8, got {data.shape}")
        addr, private = self._decode(gpa)
        self._check_ram(addr, data.shape[0] * PAGE_SIZE, aligned=True)
        if not private:
            self.memory.store_pages(addr, data)
            return
        assert self.mee is not None
        spas = self._page_spas(addr, data.shape[0])
        mee, asid = self.mee, self.asid
        self.memory.update_pages(addr, data.shape[0],
                                 lambda stored: mee.encrypt_pages(asid, spas, data, stored))

    def set_cpuid(self, entries: dict[tuple[int, int], tuple[int, int, int, int]]) -> None:
        """``KVM_SET_CPUID2``: the leaves the VMM exposes (KVM-owned leaves stay KVM's)."""
        sev_leaf = self.cpuid_table.get((CPUID_AMD_SEV, 0))
        self.cpuid_table.update(entries)
        if sev_leaf is not None:
            self.cpuid_table[(CPUID_AMD_SEV, 0)] = sev_leaf

    def set_asid(self, asid: int, *, es: bool = False) -> None:
        """KVM bound this vCPU's VM to an ASID (0: not an SEV guest). The guest finds
        out the architectural way: CPUID 0x8000001F and ``MSR_AMD64_SEV``."""
        if asid != self.asid:
            self._code_checked = False  # the flash reads differently under another key: look again
        self.asid = asid
        self.es = bool(asid) and es
        sev = bool(asid)
        self.cpuid_table[(CPUID_AMD_SEV, 0)] = (
            (sev << 1) | ((sev and es) << 3), C_BIT_POSITION | (1 << 6), 0, 0)
        self.msrs[MSR_AMD64_SEV] = (MSR_AMD64_SEV_ENABLED if sev else 0) | (
            MSR_AMD64_SEV_ES_ENABLED if sev and es else 0)

    def _decode(self, gpa: int) -> tuple[int, bool]:
        if not gpa & C_BIT:
            return gpa, False
        if not self.asid or self.mee is None:
            raise GuestFault(f"#GP: C-bit set at {gpa:#x} but SEV is not active")
        return gpa & ~C_BIT, True

    def _decrypt(self, addr: int, n: int) -> bytes:
        assert self.mee is not None
        return self.mee.decrypt(self.asid, self.memory.spa(addr), self.memory.load(addr, n))

    def _page_spas(self, addr: int, npages: int) -> npt.NDArray[np.uint64]:
        """The system-physical address of each page of a run (a run lies in one memory slot,
        whose addresses are contiguous)."""
        return np.arange(npages, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(self.memory.spa(addr))

    def _encrypt(self, addr: int, plain: bytes | bytearray | memoryview) -> bytes:
        assert self.mee is not None
        return self.mee.encrypt(self.asid, self.memory.spa(addr), plain)

    def _check_ram(self, gpa: int, size: int, *, aligned: bool = False) -> None:
        if aligned and gpa % PAGE_SIZE:
            raise GuestFault(f"unaligned page access at {gpa:#x}")
        if size < 0 or not self.memory.backed(gpa, size):
            raise GuestFault(f"#PF: no RAM at {gpa:#x}+{size:#x}")

    # --- GuestCpu: non-exiting instructions -------------------------------------

    def rdtsc(self) -> int:
        return self._clock_ns() + self.tsc_offset

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        return self.cpuid_table.get((leaf, subleaf), self.cpuid_table.get((leaf, 0), (0, 0, 0, 0)))

    def rdmsr(self, msr: int) -> int:
        value = self.get_msr(msr)
        if value is None:
            raise GuestFault(f"#GP: rdmsr {msr:#x}")
        return value

    def pending_interrupt(self) -> int | None:
        if self.nmi_pending:
            self.nmi_pending = False
            return NMI_VECTOR
        if self.irr:
            vector = max(self.irr)
            self.irr.discard(vector)
            return vector
        return None

    # --- GuestCpu: exiting instructions -------------------------------------------

    def _leave(self, ex: VmExit) -> None:
        if self._exit is not None:
            raise GuestFault("two exiting instructions in one step")
        self._exit = ex

    def wrmsr(self, msr: int, value: int) -> None:
        if msr in self.msr_exits:
            if not self.msr_user_exit:
                raise GuestFault(f"#GP: wrmsr {msr:#x} denied by the MSR filter")
            self._leave(VmExit(code=SvmExitCode.MSR, write=True, msr=msr, value=value))
        elif not self.set_msr(msr, value):
            raise GuestFault(f"#GP: wrmsr {msr:#x}")

    def out(self, port: int, value: int, size: int = 1) -> None:
        if size not in (1, 2, 4):
            raise GuestFault(f"out: bad operand size {size}")
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._leave(VmExit(code=SvmExitCode.IOIO, port=port, size=size, write=True, data=data))

    def outs(self, port: int, data: bytes) -> None:
        self._leave(VmExit(code=SvmExitCode.IOIO, port=port, size=1, write=True, data=bytes(data)))

    def inp(self, port: int, size: int = 1) -> None:
        if size not in (1, 2, 4):
            raise GuestFault(f"in: bad operand size {size}")
        self._leave(VmExit(code=SvmExitCode.IOIO, port=port, size=size, write=False))

    def mmio_write(self, gpa: int, data: bytes) -> None:
        self._leave(VmExit(code=SvmExitCode.NPF, gpa=gpa, size=len(data), write=True, data=data))

    def mmio_read(self, gpa: int, size: int) -> None:
        self._leave(VmExit(code=SvmExitCode.NPF, gpa=gpa, size=size, write=False))

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0) -> None:
        self._leave(VmExit(code=SvmExitCode.VMMCALL, nr=nr, args=(a0, a1, a2, a3)))

    def hlt(self) -> None:
        # A pending interrupt ends HLT at once: never sleep past a wake-up that came early.
        self.halted = not (self.irr or self.nmi_pending)
        self._leave(VmExit(code=SvmExitCode.HLT))

    def shutdown(self) -> None:
        self._leave(VmExit(code=SvmExitCode.SHUTDOWN, reason="guest requested shutdown"))

    # --- instruction fetch ------------------------------------------------------

    def _region(self, rip: int) -> RomRegion:
        cur = self._current
        if cur is not None and cur.contains(rip):
            return cur
        i = bisect.bisect_right(self._rom_bases, rip) - 1
        if i < 0 or not self._rom[i].contains(rip):
            raise GuestFault(f"#PF: instruction fetch from {rip:#x} (no code there)")
        self._current = self._rom[i]
        return self._current
