"""SEV-ES: the vCPU state a guest saves for its Migration Handler to carry.

An SEV-ES guest's registers live in its encrypted VMSA: neither VMM can read
them on the source or set them on the target, so a Migration Handler
migration carries them as guest memory (the 2020 blueprint's approach). The
MH asks (PARK closes the run gate with :data:`~confmig.guest.gate.SAVING`);
each vCPU running the kernel saves its own register file here, in private
memory, at its next step, and parks; the page then leaves with the guest's
final pages, sealed like any other. On the target, the firmware keeps the
vCPU waiting until its MH accepted the completion record, then loads the
saved registers and clears the slot: the vCPU continues where it stopped on
the source. The VMM is never given a register.

One 256-byte slot per vCPU id at ``VCPU_SAVE_GPA + id * SLOT_SIZE``::

    8s magic "CMVCPUS1" | le32 vCPU id | le32 0 | 18 x le64 registers
    (``struct kvm_regs`` order: rax .. r15, rip, rflags)

A slot without the magic, or naming another vCPU, holds nothing. The guest's
APs never leave the firmware's park loop (the kernel runs on the BSP), so on
both sides they are in the same state and save nothing.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from confmig.common.units import PAGE_SIZE
from confmig.guest.layout import VCPU_SAVE_GPA, VCPU_SAVE_SIZE
from confmig.platform.cpu.abi import GuestCpu, Registers

MAGIC: Final = b"CMVCPUS1"
SLOT_SIZE: Final = 256
SLOTS: Final = VCPU_SAVE_SIZE // SLOT_SIZE
_SLOT: Final = struct.Struct(f"<8sII{len(Registers.NAMES)}Q")
assert _SLOT.size <= SLOT_SIZE
KERNEL_VCPUS: Final = (0,)
"""The vCPUs that run the kernel and so have state to save: the BSP."""
CARRIED_SIZE: Final = (max(KERNEL_VCPUS) + 1) * SLOT_SIZE
"""The part of the save area a migration carries: the slots up to the last kernel vCPU's."""


def _at(vcpu_id: int, mask: int) -> int:
    if not 0 <= vcpu_id < SLOTS:
        raise ValueError(f"vCPU {vcpu_id} has no save slot (at most {SLOTS})")
    return (VCPU_SAVE_GPA + vcpu_id * SLOT_SIZE) | mask


def save(cpu: GuestCpu, mask: int) -> None:
    """This vCPU's registers, as they are now, into its slot."""
    cpu.write(_at(cpu.vcpu_id, mask), _SLOT.pack(MAGIC, cpu.vcpu_id, 0, *cpu.regs.as_tuple()))


def load(cpu: GuestCpu, vcpu_id: int, mask: int) -> Registers | None:
    """The registers saved in ``vcpu_id``'s slot; None if it holds nothing."""
    magic, owner, _flags, *values = _SLOT.unpack(cpu.read(_at(vcpu_id, mask), _SLOT.size))
    if magic != MAGIC or owner != vcpu_id:
        return None
    return Registers(tuple(values))


def clear(cpu: GuestCpu, vcpu_id: int, mask: int) -> None:
    """Empty ``vcpu_id``'s slot (a vCPU without one has nothing to clear)."""
    if 0 <= vcpu_id < SLOTS:
        cpu.write(_at(vcpu_id, mask), bytes(_SLOT.size))


def clear_all(cpu: GuestCpu, mask: int) -> None:
    cpu.write_pages(VCPU_SAVE_GPA | mask, np.zeros((VCPU_SAVE_SIZE // PAGE_SIZE, PAGE_SIZE), np.uint8))


def all_saved(cpu: GuestCpu, mask: int) -> bool:
    """Every vCPU that runs the kernel saved its state."""
    return all(load(cpu, i, mask) is not None for i in KERNEL_VCPUS)


def carried(cpu: GuestCpu, mask: int) -> bytes:
    """The save area's slots a migration carries (:data:`CARRIED_SIZE` bytes)."""
    return cpu.read(VCPU_SAVE_GPA | mask, CARRIED_SIZE)


def put_carried(cpu: GuestCpu, data: bytes, mask: int) -> None:
    """Put what :func:`carried` read on the source into this guest's save area."""
    if len(data) != CARRIED_SIZE:
        raise ValueError(f"a carried save area is {CARRIED_SIZE} bytes, not {len(data)}")
    cpu.write(VCPU_SAVE_GPA | mask, data)


def install(cpu: GuestCpu, regs: Registers) -> None:
    """Load a saved register file into this vCPU (every register, ``rip`` last)."""
    for name in Registers.NAMES:
        setattr(cpu.regs, name, getattr(regs, name))
