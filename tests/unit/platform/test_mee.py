"""The memory-encryption engine binds ciphertext to a key and a physical address."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import C_BIT, GuestFault, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine

SPA = 0x1_2340_0000
PAGE = os.urandom(PAGE_SIZE)


@pytest.fixture
def engine() -> MemoryEncryptionEngine:
    slots = KeySlots()
    slots.install(1, os.urandom(16))
    slots.install(2, os.urandom(16))
    return MemoryEncryptionEngine(slots)


def test_round_trip_and_ciphertext_differs(engine: MemoryEncryptionEngine) -> None:
    ct = engine.encrypt(1, SPA, PAGE)
    assert ct != PAGE and engine.decrypt(1, SPA, ct) == PAGE


def test_same_plaintext_at_two_addresses_differs(engine: MemoryEncryptionEngine) -> None:
    assert engine.encrypt(1, SPA, PAGE) != engine.encrypt(1, SPA + PAGE_SIZE, PAGE)


def test_ciphertext_moved_to_another_address_is_garbage(engine: MemoryEncryptionEngine) -> None:
    ct = engine.encrypt(1, SPA, PAGE)
    assert engine.decrypt(1, SPA + PAGE_SIZE, ct) != PAGE


def test_ciphertext_under_another_key_is_garbage(engine: MemoryEncryptionEngine) -> None:
    ct = engine.encrypt(1, SPA, PAGE)
    assert engine.decrypt(2, SPA, ct) != PAGE
    other_host = KeySlots()
    other_host.install(1, os.urandom(16))  # same ASID, another host's VEK
    assert MemoryEncryptionEngine(other_host).decrypt(1, SPA, ct) != PAGE


def test_key_slots_are_shared_by_fd_and_cleared() -> None:
    slots = KeySlots()
    reader = KeySlots(os.dup(slots.fd))  # what a vCPU process maps
    vek = os.urandom(16)
    slots.install(7, vek)
    assert reader.vek(7) == vek
    slots.clear(7)
    assert reader.vek(7) is None
    with pytest.raises(PermissionError):
        MemoryEncryptionEngine(reader).encrypt(7, SPA, PAGE)


def test_key_slots_never_show_keys() -> None:
    slots = KeySlots()
    slots.install(3, b"K" * 16)
    assert "K" * 4 not in repr(slots)
    with pytest.raises(TypeError):
        pickle.dumps(slots)


class FlatMemory:
    """A 64 KiB RAM at GPA 0, system-physical at SPA."""

    def __init__(self) -> None:
        self.ram = np.zeros(16 * PAGE_SIZE, dtype=np.uint8)

    def backed(self, gpa: int, size: int) -> bool:
        return gpa >= 0 and gpa + size <= len(self.ram)

    def spa(self, gpa: int) -> int:
        return SPA + gpa

    def load(self, gpa: int, size: int) -> bytes:
        return self.ram[gpa : gpa + size].tobytes()

    def store(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.ram[gpa : gpa + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def load_pages(self, gpa: int, n: int) -> np.ndarray:
        return self.ram[gpa : gpa + n * PAGE_SIZE].reshape(n, PAGE_SIZE).copy()

    def store_pages(self, gpa: int, data: np.ndarray) -> None:
        self.ram[gpa : gpa + data.size] = data.reshape(-1)


def test_cpu_private_accesses_leave_only_ciphertext_in_ram(engine: MemoryEncryptionEngine) -> None:
    mem = FlatMemory()
    core = CpuCore(0, mem, [RomRegion(name="x", base=0, size=1, step=lambda c: None)], mee=engine)
    with pytest.raises(GuestFault, match="C-bit"):
        core.write(C_BIT | 0x1000, b"secret")  # SEV not active yet
    core.set_asid(1)
    canary = b"CANARY-" + os.urandom(8).hex().encode()
    core.write(C_BIT | 0x1010, canary)
    core.write_pages(C_BIT | 0x2000, np.frombuffer(canary * 100 + bytes(PAGE_SIZE - 100 * len(canary)),
                                                    dtype=np.uint8).reshape(1, PAGE_SIZE))
    core.write(0x3000, b"shared hello")
    assert canary not in mem.ram.tobytes()  # the host sees ciphertext of private pages
    assert b"shared hello" in mem.ram.tobytes()  # and plaintext of shared ones
    assert core.read(C_BIT | 0x1010, len(canary)) == canary
    assert core.read_pages(C_BIT | 0x2000, 1).tobytes().startswith(canary)
    assert core.read(0x1010, len(canary)) != canary  # a shared read of a private page
