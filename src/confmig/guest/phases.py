"""Guest programs as phase tables: ``rip - base`` selects the step function to run.

A program's phases are its instructions; moving to another phase is a jump
(``rip = base + phase``), so where a program is lives in a register, never in
Python state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from confmig.platform.cpu.abi import GuestCpu, GuestFault, GuestProgram


def phase_program(name: str, base: int, phases: Mapping[int, Callable[[GuestCpu], None]]) -> GuestProgram:
    """One step function for a program whose phases sit at ``base + phase``."""

    def step(cpu: GuestCpu) -> None:
        phase = phases.get(cpu.regs.rip - base)
        if phase is None:
            raise GuestFault(f"{name}: no instruction at {cpu.regs.rip:#x}")
        phase(cpu)

    return step
