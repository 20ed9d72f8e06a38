"""VMRUN of an SEV guest: the core runs an ASID only while the PSP says its guest may run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from confmig.platform.cpu.abi import RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine

ASID = 7
ROM = [RomRegion(name="idle", base=0, size=1, step=lambda cpu: None)]


class NoMemory:
    def backed(self, gpa: int, size: int) -> bool:
        return False


@pytest.fixture
def psp_slots() -> Iterator[KeySlots]:
    """The key slots as the PSP writes them (in the host daemon)."""
    slots = KeySlots()
    yield slots
    os.close(slots.fd)


def core_of(slots: KeySlots | None) -> CpuCore:
    """A core in a vCPU process: its engine on its own mapping of the slots, by descriptor."""
    mee = MemoryEncryptionEngine(KeySlots(os.dup(slots.fd))) if slots is not None else None
    return CpuCore(0, NoMemory(), ROM, mee=mee)  # type: ignore[arg-type]


def test_vmrun_of_an_sev_asid_needs_the_psps_word(psp_slots: KeySlots) -> None:
    core = core_of(psp_slots)
    assert core.enter()  # not an SEV guest: nothing to ask
    core.set_asid(ASID)
    assert not core.enter()  # no guest activated on the ASID
    psp_slots.install(ASID, os.urandom(16))
    assert not core.enter()  # ACTIVATE before LAUNCH_FINISH / RECEIVE_FINISH
    psp_slots.set_runnable(ASID, True)
    assert core.enter()  # RUNNING (or SUPDATE)
    psp_slots.set_runnable(ASID, False)
    assert not core.enter()  # SENT
    psp_slots.set_runnable(ASID, True)
    psp_slots.clear(ASID)
    assert not core.enter()  # DEACTIVATE


def test_a_core_without_the_engine_runs_no_sev_guest(psp_slots: KeySlots) -> None:
    psp_slots.install(ASID, os.urandom(16))
    psp_slots.set_runnable(ASID, True)
    core = core_of(None)
    core.set_asid(ASID)
    assert not core.enter()


def test_only_an_activated_asid_can_be_made_runnable(psp_slots: KeySlots) -> None:
    with pytest.raises(ValueError, match="no key"):
        psp_slots.set_runnable(ASID, True)
    psp_slots.install(ASID, os.urandom(16))
    psp_slots.set_runnable(ASID, True)
    psp_slots.install(ASID, os.urandom(16))  # a new guest on the ASID starts not runnable
    assert not psp_slots.runnable(ASID)
