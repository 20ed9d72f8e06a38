"""The guest-state rule: all guest state is in RAM, registers and device state.

A guest stopped after any step, copied into a fresh machine (new RAM, new
devices, new vCPU) and continued must end exactly where an uninterrupted run
ends: same RAM, registers, timer, device state and console output. An SEV
guest too: its boot shares a page, reports it and negotiates migration in
phases of their own (the fresh machine has the same memory key).
"""

import pytest
from machine import Machine, MachineSnapshot

from confmig.common.units import MiB

CMDLINE = "workload=dirty rate=20000 wss=2M seed=3"
RAM = 24 * MiB
"""The dirty workload's 2 MiB and its table fit above the firmware's and MH's 16 MiB."""
TOTAL = 400
NMI_AT = 250
"""An NMI arrives here, so the later cuts land inside the self-check."""


def advance(m: Machine, until_step: int) -> None:
    """Run the vCPU to guest step ``until_step``, raising the NMI on the way."""
    if m.cpu.steps < NMI_AT <= until_step:
        m.run(lambda c: c.steps >= NMI_AT)
        m.cpu.inject(2)
    m.run(lambda c: c.steps >= until_step)


def uninterrupted(*, sev: bool = False) -> MachineSnapshot:
    with Machine(CMDLINE, ram_size=RAM, sev=sev) as m:
        advance(m, TOTAL)
        return m.snapshot()


@pytest.fixture(scope="module")
def reference() -> MachineSnapshot:
    snap = uninterrupted()
    assert b"confmig-selfcheck: PASS" in snap.console  # the run covers the self-check
    return snap


@pytest.mark.parametrize("cut", [3, 9, 12, 60, 251, 255])
def test_resuming_from_a_snapshot_ends_where_an_uninterrupted_run_ends(
    reference: MachineSnapshot, cut: int
) -> None:
    with Machine(CMDLINE, ram_size=RAM) as first:
        advance(first, cut)
        snap = first.snapshot()
    with Machine.restore(snap, CMDLINE) as second:
        second.cpu.steps = cut
        advance(second, TOTAL)
        assert second.snapshot() == reference


def test_a_fresh_machine_for_every_step_changes_nothing(reference: MachineSnapshot) -> None:
    m = Machine(CMDLINE, ram_size=RAM)
    for step in range(1, 80):
        advance(m, step)
        snap = m.snapshot()
        m.__exit__(None, None, None)
        m = Machine.restore(snap, CMDLINE)
        m.cpu.steps = step
    with m:
        advance(m, TOTAL)
        assert m.snapshot() == reference


def test_the_reference_run_is_deterministic(reference: MachineSnapshot) -> None:
    assert uninterrupted() == reference


def test_an_sev_guest_in_a_fresh_machine_for_every_step_changes_nothing() -> None:
    reference = uninterrupted(sev=True)
    assert b"live migration allowed" in reference.console
    assert b"confmig-selfcheck: PASS" in reference.console
    assert reference.cpu.migration_control == 1
    m = Machine(CMDLINE, ram_size=RAM, sev=True)
    for step in range(1, 80):  # the firmware, the kernel and the workload's start
        advance(m, step)
        snap = m.snapshot()
        m.__exit__(None, None, None)
        m = Machine.restore(snap, CMDLINE, sev=True)
        m.cpu.steps = step
    with m:
        advance(m, TOTAL)
        assert m.snapshot() == reference
