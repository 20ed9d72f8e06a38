"""The core's side of SEV-ES: the register file in an encrypted VMSA page, checked against the TMR.

The PSP's part (LAUNCH_UPDATE_VMSA: seal with a CRC block, encrypt in place) is
done here with its own pieces (``TmrCrcPool``, ``seal_vmsa``, the engine); the
end-to-end flow through KVM and the PSP is ``tests/unit/kvm/test_kvm_sev_es_vmsa.py``.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from confmig.common.units import PAGE_SIZE, Spa
from confmig.platform.cpu.abi import RESET_VECTOR, Registers, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp.vmsa import (
    RESET_REGISTERS,
    VMSA_REGISTER_OFFSETS,
    TmrCrcPool,
    TmrMemory,
    seal_vmsa,
    vmsa_crc,
    vmsa_crc_block,
    vmsa_image,
    vmsa_registers,
)

ASID, OTHER_ASID = 3, 4
VMSA_SPA = 0x2_0000_3000
TMR_BASE = Spa(0xFFF0_0000)
REGS = (*(0x0DDC_0FFE_E000_0000 + i for i in range(16)), 0xFFFF_1000, 0x202)


@dataclass
class Page:
    """A VMSA page of host memory, as KVM gives it to the core."""

    spa: int = VMSA_SPA
    data: bytearray = field(default_factory=lambda: bytearray(PAGE_SIZE))

    def read(self) -> bytes:
        return bytes(self.data)

    def write(self, data: bytes) -> None:
        self.data[:] = data


class NoMemory:
    def backed(self, gpa: int, size: int) -> bool:
        return False


@dataclass
class Platform:
    slots: KeySlots
    engine: MemoryEncryptionEngine
    tmr: TmrMemory
    pool: TmrCrcPool

    def launch_update_vmsa(self, page: Page) -> Spa:
        """What the PSP's LAUNCH_UPDATE_VMSA does to the page: seal, checksum, encrypt in place."""
        block = self.pool.allocate()
        assert block is not None
        sealed = seal_vmsa(page.read(), block)
        self.pool.store(block, vmsa_crc(sealed))
        page.write(self.engine.encrypt(ASID, page.spa, sealed))
        return block

    def core(self, page: Page) -> CpuCore:
        rom = [RomRegion(name="idle", base=0, size=1, step=lambda cpu: None)]
        core = CpuCore(0, NoMemory(), rom, mee=self.engine, tmr=self.tmr)  # type: ignore[arg-type]
        core.set_asid(ASID, es=True)
        core.set_vmsa(page)
        return core


@pytest.fixture
def platform() -> Iterator[Platform]:
    slots = KeySlots()
    slots.install(ASID, os.urandom(16))
    slots.install(OTHER_ASID, os.urandom(16))
    slots.set_runnable(ASID, True)  # a running guest, as the PSP says after LAUNCH_FINISH
    tmr = TmrMemory.shared()
    yield Platform(slots, MemoryEncryptionEngine(slots), tmr, TmrCrcPool(TMR_BASE, tmr))
    tmr.close()
    os.close(slots.fd)


def launched(platform: Platform) -> tuple[CpuCore, Page, Spa]:
    page = Page()
    core = platform.core(page)
    core.set_regs_tuple(REGS)
    assert core.vmsa_sync()
    assert vmsa_registers(page.read()) == dict(zip(Registers.NAMES, REGS, strict=True))
    block = platform.launch_update_vmsa(page)
    core.vmsa_launched()
    return core, page, block


def test_the_launch_image_is_the_register_file_at_the_save_area_offsets(platform: Platform) -> None:
    page = Page()
    core = platform.core(page)
    core.set_regs_tuple(REGS)
    assert core.vmsa_sync()
    image = page.read()
    assert image == vmsa_image(dict(zip(Registers.NAMES, REGS, strict=True)))
    for name, value in zip(Registers.NAMES, REGS, strict=True):
        assert struct.unpack_from("<Q", image, VMSA_REGISTER_OFFSETS[name])[0] == value
    used = {off + i for off in VMSA_REGISTER_OFFSETS.values() for i in range(8)}
    assert not any(b for i, b in enumerate(image) if i not in used)  # everything else is zero
    core.vmsa_launched()
    assert not core.vmsa_sync()  # sealed: no plaintext image any more


def test_vmrun_loads_the_launched_vmsa_and_the_host_cannot_read_or_set_it(platform: Platform) -> None:
    core, page, _block = launched(platform)
    with pytest.raises(PermissionError):
        core.get_regs_tuple()
    with pytest.raises(PermissionError):
        core.set_regs_tuple(REGS)
    assert all(struct.pack("<Q", v) not in page.read() for v in REGS[:16])
    assert core.enter()
    assert core.regs.as_tuple() == REGS


def test_vmexit_stores_encrypted_registers_and_the_psps_checksum_agrees(platform: Platform) -> None:
    core, page, block = launched(platform)
    assert core.enter()
    core.regs.rax = 0x1234_5678_9ABC_DEF0
    core.regs.rip += 0x10
    before = page.read()
    assert core.vmsa_save()
    after = page.read()
    assert after != before and struct.pack("<Q", 0x1234_5678_9ABC_DEF0) not in after
    plain = platform.engine.decrypt(ASID, VMSA_SPA, after)
    assert vmsa_crc_block(plain) == block
    assert platform.pool.lookup(block) == vmsa_crc(plain)  # what SEND_UPDATE_VMSA checks
    assert vmsa_registers(plain)["rax"] == 0x1234_5678_9ABC_DEF0
    assert core.vmsa_save() and page.read() == after  # already stored: not rewritten
    assert core.enter()
    assert (core.regs.rax, core.regs.rip) == (0x1234_5678_9ABC_DEF0, REGS[16] + 0x10)


@pytest.mark.parametrize("attack", ["flip", "replay", "move", "other-key", "zero-crc"])
def test_a_vmsa_the_host_changed_fails_vmrun_and_nothing_is_loaded(platform: Platform, attack: str) -> None:
    core, page, block = launched(platform)
    assert core.enter()
    old = page.read()  # as launched
    core.regs.rbx = 42
    assert core.vmsa_save()
    current = bytearray(page.read())
    if attack == "flip":
        current[0x1F8] ^= 0x01
        page.write(bytes(current))
    elif attack == "replay":
        page.write(old)  # decrypts fine, but it is not the state the TMR checksum describes
    elif attack == "move":
        page.spa = VMSA_SPA + PAGE_SIZE  # the same ciphertext at another address
    elif attack == "other-key":
        core.set_asid(OTHER_ASID, es=True)
    else:
        platform.tmr.store(block, 0)
    assert not core.enter()
    assert not core.vmsa_load()
    assert core.regs.as_tuple() == Registers().as_tuple()  # nothing of the page got in
    assert core.step() is not None  # and the CPU itself refuses to run it


def test_without_the_guests_key_nothing_is_stored_or_loaded(platform: Platform) -> None:
    core, _page, _block = launched(platform)
    assert core.enter()
    platform.slots.clear(ASID)  # DEACTIVATE
    assert not core.vmsa_save()
    assert not core.vmsa_load()


def test_an_unlaunched_vcpu_has_nothing_to_store(platform: Platform) -> None:
    core = platform.core(Page())
    assert not core.vmsa_save()
    assert core.enter()  # a plain vCPU enters without a VMSA
    assert not core.vmsa_load()  # an empty page has no checksum in the TMR


def test_the_tmr_is_shared_by_descriptor_and_never_pickled(platform: Platform) -> None:
    assert platform.tmr.fd is not None
    other = TmrMemory(os.dup(platform.tmr.fd))  # what a vCPU process maps
    block = platform.pool.allocate()
    assert block is not None
    platform.pool.store(block, 0xC0FFEE)
    assert other.load(block) == 0xC0FFEE
    assert other.store(block, 7) and platform.pool.lookup(block) == 7
    assert other.load(Spa(TMR_BASE)) is None  # the index half holds no CRC blocks
    assert other.load(Spa(block + 1)) is None
    with pytest.raises(TypeError):
        pickle.dumps(other)
    assert repr(other) == "TmrMemory(<trusted>)"
    other.close()


def test_the_reset_image_the_owner_hashes_is_what_a_fresh_vcpu_writes(platform: Platform) -> None:
    page = Page()
    core = platform.core(page)
    core.regs.rip = RESET_VECTOR  # what hostd's vCPU process does at start
    assert core.vmsa_sync()
    assert page.read() == vmsa_image(RESET_REGISTERS)
