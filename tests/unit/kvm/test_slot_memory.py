"""A vCPU's view of its memory slots (``kvm/vcpu.py``'s SlotMemory): pages read where they
lie, pages written in place, and every write counted in the vCPU's row of the slot's dirty
counters once it holds what was written, the way the dirty log reads them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from confmig.common.units import PAGE_SIZE, MiB
from confmig.kvm.memslots import MappedSlot, SlotLayout, counters_size
from confmig.kvm.vcpu import SlotMemory
from confmig.platform.cpu.abi import C_BIT, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine

GPA = 16 * MiB
ROW = 3


@pytest.fixture
def memory() -> Iterator[SlotMemory]:
    ram, counters = os.memfd_create("ram"), os.memfd_create("counters")
    os.ftruncate(ram, MiB)
    layout = SlotLayout(slot=1, flags=0, gpa=GPA, size=MiB, offset=0, spa=0x4_0000_0000)
    os.ftruncate(counters, counters_size(layout.npages))
    mem = SlotMemory(ROW)
    mem.set_slot(MappedSlot(layout, ram, counters))
    yield mem
    mem.delete_slot(1)


def core(mem: SlotMemory) -> CpuCore:
    slots = KeySlots()
    slots.install(1, os.urandom(16))
    cpu = CpuCore(0, mem, [RomRegion(name="x", base=0, size=1, step=lambda c: None)],
                  mee=MemoryEncryptionEngine(slots))
    cpu.set_asid(1)
    return cpu


def written(mem: SlotMemory) -> list[int]:
    counts = mem.slots[0].counters
    assert not np.delete(counts, ROW, axis=0).any()  # only this vCPU's row
    return counts[ROW].tolist()


def test_private_pages_are_encrypted_in_place_and_counted_once(memory: SlotMemory) -> None:
    cpu = core(memory)
    pages = np.frombuffer(os.urandom(3 * PAGE_SIZE), np.uint8).reshape(3, PAGE_SIZE)
    cpu.write_pages((GPA + 5 * PAGE_SIZE) | C_BIT, pages)
    assert written(memory)[4:9] == [0, 1, 1, 1, 0]
    stored = memory.view_pages(GPA + 5 * PAGE_SIZE, 3)
    assert not np.any(np.all(stored.reshape(-1, 16) == pages.reshape(-1, 16), axis=1))  # ciphertext
    out = np.empty((3, PAGE_SIZE), np.uint8)
    assert cpu.read_pages((GPA + 5 * PAGE_SIZE) | C_BIT, 3, out=out) is out
    assert np.array_equal(out, pages)
    assert np.array_equal(cpu.read_pages((GPA + 6 * PAGE_SIZE) | C_BIT, 1), pages[1:2])
    assert written(memory)[4:9] == [0, 1, 1, 1, 0]  # reads count nothing


def test_a_fill_that_fails_half_way_is_counted_all_the_same(memory: SlotMemory) -> None:
    def half(view: np.ndarray) -> None:
        view[0] = 7
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError):
        memory.update_pages(GPA + 2 * PAGE_SIZE, 2, half)
    assert written(memory)[1:5] == [0, 1, 1, 0]
    assert memory.view_pages(GPA + 2 * PAGE_SIZE, 1)[0, 0] == 7
