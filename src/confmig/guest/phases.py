"""Guest programs as phase tables: ``rip - base`` selects the step function to run.

A program's phases are its instructions; moving to another phase is a jump
(``rip = base + phase``), so where a program is lives in a register, never in
Python state.

Workload programs run under the kernel (:func:`confmig.guest.kernel.task_region`),
which finds out the step's encryption mask on entry (the C-bit in an SEV guest,
0 otherwise) and hands it to the phase: a step finds it out once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from confmig.platform.cpu.abi import GuestCpu, GuestFault, GuestProgram

TaskProgram = Callable[[GuestCpu, int], None]
"""A workload's step: the vCPU and the step's encryption mask."""


def phase_program(name: str, base: int, phases: Mapping[int, Callable[[GuestCpu], None]]) -> GuestProgram:
    """One step function for a program whose phases sit at ``base + phase``."""

    def step(cpu: GuestCpu) -> None:
        phase = phases.get(cpu.regs.rip - base)
        if phase is None:
            raise GuestFault(f"{name}: no instruction at {cpu.regs.rip:#x}")
        phase(cpu)

    return step


def task_program(name: str, base: int, phases: Mapping[int, TaskProgram]) -> TaskProgram:
    """:func:`phase_program` for a workload: each phase also gets the step's mask."""

    def step(cpu: GuestCpu, mask: int) -> None:
        phase = phases.get(cpu.regs.rip - base)
        if phase is None:
            raise GuestFault(f"{name}: no instruction at {cpu.regs.rip:#x}")
        phase(cpu, mask)

    return step
