"""The first VMRUN runs only the guest code that the measured firmware image was built from.

The firmware image carries the SHA-256 of the guest code in its header; LAUNCH_UPDATE_DATA
measures the image, not the Python code a vCPU process loads. So the core compares the
digest its vCPU process computed over the code it loaded with the one in the image, read
through the guest's memory (privately, under the guest's key, for an SEV guest).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import confmig.guest
from confmig.common.digest import source_tree_digest
from confmig.common.units import PAGE_SIZE
from confmig.guest.firmware.image import IMAGE_MAGIC, build_firmware_image, code_digest
from confmig.guest.layout import FIRMWARE_BASE, FIRMWARE_IMAGE_SIZE
from confmig.hostd.vcpu_process import load_rom
from confmig.platform.cpu.abi import C_BIT, RomRegion
from confmig.platform.cpu.core import (
    FIRMWARE_IMAGE_FORMAT_VERSION,
    FIRMWARE_IMAGE_GPA,
    FIRMWARE_IMAGE_HEAD,
    FIRMWARE_IMAGE_MAGIC,
    CpuCore,
)
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine

ASID = 3
SPA = 0x7_0000_0000
ROM = [RomRegion(name="idle", base=0, size=1, step=lambda cpu: None)]


class Flash:
    """Guest-physical memory that is only the firmware's flash, as a vCPU maps the VMM's slot."""

    def __init__(self, data: bytes) -> None:
        self.bytes = np.frombuffer(bytearray(data), dtype=np.uint8).copy()

    def backed(self, gpa: int, size: int) -> bool:
        return gpa >= FIRMWARE_IMAGE_GPA and gpa + size <= FIRMWARE_IMAGE_GPA + len(self.bytes)

    def spa(self, gpa: int) -> int:
        return SPA + gpa - FIRMWARE_IMAGE_GPA

    def load(self, gpa: int, size: int) -> bytes:
        off = gpa - FIRMWARE_IMAGE_GPA
        return self.bytes[off : off + size].tobytes()

    def store(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = gpa - FIRMWARE_IMAGE_GPA
        self.bytes[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def view_pages(self, gpa: int, n: int) -> np.ndarray:
        off = gpa - FIRMWARE_IMAGE_GPA
        return self.bytes[off : off + n * PAGE_SIZE].reshape(n, PAGE_SIZE)

    def store_pages(self, gpa: int, data: np.ndarray) -> None:
        off = gpa - FIRMWARE_IMAGE_GPA
        self.bytes[off : off + data.size] = data.reshape(-1)

    def update_pages(self, gpa: int, n: int, fill: Callable[[np.ndarray], object]) -> None:
        fill(self.view_pages(gpa, n))


class NoFlash(Flash):
    def backed(self, gpa: int, size: int) -> bool:
        return False


@pytest.fixture(scope="module")
def image() -> bytes:
    return build_firmware_image()


@pytest.fixture
def slots() -> Iterator[KeySlots]:
    slots = KeySlots()
    slots.install(ASID, os.urandom(16))
    slots.set_runnable(ASID, True)
    yield slots
    os.close(slots.fd)


@pytest.fixture
def edited_guest(tmp_path: Path) -> Path:
    """A copy of the guest package with one module edited after the image was built."""
    root = tmp_path / "guest"
    shutil.copytree(Path(confmig.guest.__file__).parent, root,
                    ignore=shutil.ignore_patterns("__pycache__"))
    kernel = root / "kernel.py"
    kernel.write_text(kernel.read_text() + "\n# edited after the firmware image was built\n")
    return root


def plain_core(memory: Flash, digest: bytes | None) -> CpuCore:
    return CpuCore(0, memory, ROM, code_digest=digest)


def sev_core(memory: Flash, digest: bytes | None, slots: KeySlots, image: bytes) -> CpuCore:
    """An SEV guest whose flash LAUNCH_UPDATE_DATA encrypted in place (as the PSP does, under
    the guest's key with each block's address as tweak)."""
    mee = MemoryEncryptionEngine(KeySlots(os.dup(slots.fd)))
    pages = np.frombuffer(image, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    spas = np.arange(len(pages), dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(SPA)
    memory.store_pages(FIRMWARE_IMAGE_GPA, mee.encrypt_pages(ASID, spas, pages))
    core = CpuCore(0, memory, ROM, mee=mee, code_digest=digest)
    core.set_asid(ASID)
    return core


# --- the platform's copy of the image format is the builder's -----------------------------


def test_the_platform_reads_the_header_the_builder_writes(image: bytes) -> None:
    assert FIRMWARE_IMAGE_GPA == FIRMWARE_BASE and len(image) == FIRMWARE_IMAGE_SIZE
    magic, version, _, _, _, stated = FIRMWARE_IMAGE_HEAD.unpack_from(image)
    assert magic == FIRMWARE_IMAGE_MAGIC == IMAGE_MAGIC and version == FIRMWARE_IMAGE_FORMAT_VERSION
    assert stated == code_digest()


def test_the_vcpu_process_digests_the_guest_code_as_the_builder_does() -> None:
    assert source_tree_digest(Path(confmig.guest.__file__).parent) == code_digest()
    assert load_rom("confmig.guest.image:rom").code_digest == code_digest()


def test_a_rom_from_outside_the_guest_package_has_no_digest(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Such as the tests' own ROMs: no firmware image states their code."""
    (tmp_path / "other_rom.py").write_text("def rom():\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = load_rom("other_rom:rom")
    finally:
        sys.modules.pop("other_rom", None)
    assert loaded.code_digest is None and list(loaded.regions) == []


# --- the check at VMRUN ----------------------------------------------------------------------


def test_the_code_the_image_was_built_from_runs(image: bytes, slots: KeySlots) -> None:
    core = plain_core(Flash(image), code_digest())
    assert core.enter() and core.entry_error is None
    assert core.enter()  # checked once; later VMRUNs do not read the flash again
    sev = sev_core(Flash(image), code_digest(), slots, image)
    assert sev.enter() and sev.entry_error is None


def test_guest_code_edited_after_the_image_was_built_is_refused(
        image: bytes, edited_guest: Path, slots: KeySlots, caplog: pytest.LogCaptureFixture) -> None:
    loaded = source_tree_digest(edited_guest)  # what the vCPU process computes over the edited code
    assert loaded != code_digest()
    for core in (plain_core(Flash(image), loaded), sev_core(Flash(image), loaded, slots, image)):
        with caplog.at_level(logging.ERROR, logger="confmig.platform.cpu.core"):
            assert not core.enter()
            assert not core.enter()  # and stays refused
        assert core.entry_error is not None
        assert "is not the code the firmware image was built from" in core.entry_error
        assert core.entry_error in caplog.text


def test_code_no_image_states_is_refused_where_there_is_an_image(image: bytes) -> None:
    core = plain_core(Flash(image), None)
    assert not core.enter()
    assert core.entry_error == "the guest code this core loaded is not code any firmware image states"


@pytest.mark.parametrize("flash", ["random", "zeros"])
def test_a_flash_that_is_no_image_is_refused(flash: str) -> None:
    data = os.urandom(FIRMWARE_IMAGE_SIZE) if flash == "random" else bytes(FIRMWARE_IMAGE_SIZE)
    core = plain_core(Flash(data), code_digest())
    assert not core.enter()
    assert core.entry_error is not None and "holds no firmware image" in core.entry_error


def test_an_sev_guest_reads_its_image_privately(image: bytes, slots: KeySlots) -> None:
    """A host that put the image's plaintext in an SEV guest's flash (not what the launch
    measured and encrypted) gets garbage under the guest's key: refused."""
    memory = Flash(image)
    core = sev_core(memory, code_digest(), slots, image)
    memory.store(FIRMWARE_IMAGE_GPA, image)  # the host writes over the encrypted flash
    assert not core.enter()
    assert core.entry_error is not None and "holds no firmware image" in core.entry_error
    assert core.read(FIRMWARE_IMAGE_GPA | C_BIT, 8) != IMAGE_MAGIC


def test_a_guest_without_flash_runs_unchecked() -> None:
    """No -bios: nothing in the guest states which code should run (for an SEV guest, the
    launch measurement then covers no code; the owner's check is what refuses it)."""
    assert plain_core(NoFlash(b""), code_digest()).enter()
    assert plain_core(NoFlash(b""), None).enter()


def test_a_new_asid_is_checked_again(image: bytes, slots: KeySlots) -> None:
    """The flash reads differently under another key (a context moved to this VM's vCPUs)."""
    memory = Flash(image)
    core = plain_core(memory, code_digest())
    assert core.enter()
    core.mee = MemoryEncryptionEngine(KeySlots(os.dup(slots.fd)))
    core.set_asid(ASID)  # the plaintext image read privately is garbage
    assert not core.enter()
