"""The memory-encryption engine binds ciphertext to a key and a physical address.

Checked against a reference written here from the model's definition (XEX per 16-byte
block, the tweak an XOR of per-key vectors over the address bits 4..51): block by block,
slow, and sharing no code with the engine's batch paths.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import C_BIT, GuestFault, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine

SPA = 0x1_2340_0000
PAGE = os.urandom(PAGE_SIZE)


VEK = bytes(range(16))


@pytest.fixture
def engine() -> MemoryEncryptionEngine:
    slots = KeySlots()
    slots.install(1, os.urandom(16))
    slots.install(2, os.urandom(16))
    slots.install(3, VEK)
    return MemoryEncryptionEngine(slots)


def _ecb(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    return (cipher.decryptor() if decrypt else cipher.encryptor()).update(data)


def reference_tweak(vek: bytes, spa: int) -> bytes:
    """T(spa): the XOR of t_i = AES_K2(i) over the set bits i >= 4 of the address."""
    k2 = hashlib.sha256(b"confmig-umc-tweak-key" + vek).digest()[:16]
    t = 0
    for i in range(4, 52):
        if spa >> i & 1:
            t ^= int.from_bytes(_ecb(k2, i.to_bytes(16, "little")), "little")
    return t.to_bytes(16, "little")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def reference(vek: bytes, spa: int, data: bytes, *, decrypt: bool = False) -> bytes:
    """c = E_K(p ^ T(pa)) ^ T(pa), one 16-byte block at a time."""
    out = b""
    for off in range(0, len(data), 16):
        t = reference_tweak(vek, spa + off)
        out += _xor(_ecb(vek, _xor(data[off : off + 16], t), decrypt=decrypt), t)
    return out


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

    def view_pages(self, gpa: int, n: int) -> np.ndarray:
        return self.ram[gpa : gpa + n * PAGE_SIZE].reshape(n, PAGE_SIZE)

    def store_pages(self, gpa: int, data: np.ndarray) -> None:
        self.ram[gpa : gpa + data.size] = data.reshape(-1)

    def update_pages(self, gpa: int, n: int, fill: Callable[[np.ndarray], object]) -> None:
        fill(self.view_pages(gpa, n))


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


# --- the model, against the reference ---------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [
    (0, 16), (0x7F0, 16), (0x10, 48), (0xFF0, 32),  # a block; a few; across a page boundary
    (0, PAGE_SIZE), (0x20, PAGE_SIZE), (0, 3 * PAGE_SIZE), (0xA30, 2 * PAGE_SIZE + 0x100),
])
def test_engine_matches_the_reference(engine: MemoryEncryptionEngine, offset: int, size: int) -> None:
    plain = os.urandom(size)
    ct = engine.encrypt(3, SPA + offset, plain)
    assert ct == reference(VEK, SPA + offset, plain)
    assert engine.decrypt(3, SPA + offset, ct) == plain
    assert reference(VEK, SPA + offset, ct, decrypt=True) == plain


def test_high_address_bits_count(engine: MemoryEncryptionEngine) -> None:
    top = (1 << 52) - PAGE_SIZE  # every frame bit set
    block = os.urandom(16)
    assert engine.encrypt(3, top + 0xFF0, block) == reference(VEK, top + 0xFF0, block)
    page = os.urandom(PAGE_SIZE)
    assert engine.encrypt_pages(3, [top], _pages(page))[0].tobytes() == engine.encrypt(3, top, page)
    with pytest.raises(ValueError, match="system-physical"):
        engine.encrypt(3, 1 << 52, block)


def test_tweak_is_linear_in_the_address_and_its_vectors_are_per_key(engine: MemoryEncryptionEngine) -> None:
    """What SEVurity exploits: with T(a) ^ T(b) known, a block moved from a to b decrypts to
    its plaintext XOR that difference; and the same plaintext so adjusted encrypts at b to
    the ciphertext at a moved the same way. Only with that key's T: another key's vectors differ."""
    a, b = SPA + 0x1230, SPA + 0x5_6780
    diff = _xor(reference_tweak(VEK, a), reference_tweak(VEK, b))
    assert reference_tweak(VEK, a ^ b ^ SPA) == _xor(diff, reference_tweak(VEK, SPA))  # linear
    p = os.urandom(16)
    ct_a = engine.encrypt(3, a, p)
    assert engine.decrypt(3, b, _xor(ct_a, diff)) == _xor(p, diff)
    assert engine.encrypt(3, b, _xor(p, diff)) == _xor(ct_a, diff)
    other = os.urandom(16)
    other_diff = _xor(reference_tweak(other, a), reference_tweak(other, b))
    assert other_diff != diff
    assert engine.decrypt(3, b, _xor(ct_a, other_diff)) != _xor(p, other_diff)


def test_same_key_same_address_same_plaintext_same_ciphertext_in_every_process() -> None:
    slots = KeySlots()
    slots.install(4, VEK)
    here, there = MemoryEncryptionEngine(slots), MemoryEncryptionEngine(KeySlots(os.dup(slots.fd)))
    assert here.encrypt(4, SPA, PAGE) == there.encrypt(4, SPA, PAGE) == here.encrypt(4, SPA, PAGE)


def test_a_new_key_in_the_slot_is_used_at_once() -> None:
    slots = KeySlots()
    slots.install(5, VEK)
    engine = MemoryEncryptionEngine(slots)
    ct = engine.encrypt(5, SPA, PAGE)
    slots.install(5, os.urandom(16))  # DECOMMISSION, then another guest ACTIVATEd on the ASID
    assert engine.decrypt(5, SPA, ct) != PAGE
    assert engine.encrypt(5, SPA, PAGE) != ct
    slots.install(5, VEK)
    assert engine.decrypt(5, SPA, ct) == PAGE


# --- batches ----------------------------------------------------------------------------


def _pages(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE).copy()


# one; Python and numpy page tweaks; a chunk of the page path and one page over; over a bulk call
@pytest.mark.parametrize("n", [1, 2, 17, 64, 65, 128, 130, 256])
def test_a_batch_equals_its_pages_one_by_one(engine: MemoryEncryptionEngine, n: int) -> None:
    pages = _pages(os.urandom(n * PAGE_SIZE))
    spas = [SPA + PAGE_SIZE * ((7 * i) % (3 * n)) + (i % 2) * (1 << 45) for i in range(n)]  # scattered
    ct = engine.encrypt_pages(1, spas, pages)
    assert ct.shape == (n, PAGE_SIZE) and ct.dtype == np.uint8
    for i in (0, n // 2, n - 1):
        assert ct[i].tobytes() == engine.encrypt(1, spas[i], pages[i].tobytes())
    assert np.array_equal(engine.decrypt_pages(1, np.array(spas, dtype=np.uint64), ct), pages)
    run = engine.encrypt(1, SPA, pages.tobytes())  # a contiguous run, one call
    assert run == b"".join(engine.encrypt(1, SPA + i * PAGE_SIZE, pages[i].tobytes()) for i in range(n))
    assert engine.decrypt(1, SPA, run) == pages.tobytes()


def test_a_batch_goes_into_the_array_given_even_its_own(engine: MemoryEncryptionEngine) -> None:
    pages = _pages(os.urandom(100 * PAGE_SIZE))
    spas = np.arange(100, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(SPA)
    expected = engine.encrypt_pages(1, spas, pages)
    out = np.empty_like(pages)
    assert engine.encrypt_pages(1, spas, pages, out) is out and np.array_equal(out, expected)
    in_place = pages.copy()  # a page batch encrypted where it lies, as the core stores it
    engine.encrypt_pages(1, spas, in_place, in_place)
    assert np.array_equal(in_place, expected)
    engine.decrypt_pages(1, spas, in_place, in_place)
    assert np.array_equal(in_place, pages)
    with pytest.raises(ValueError, match="output"):
        engine.decrypt_pages(1, spas, expected, np.empty((99, PAGE_SIZE), np.uint8))
    rows = np.zeros((102, PAGE_SIZE), np.uint8)  # rows of a larger array, its neighbours untouched
    engine.encrypt_pages(1, spas, pages, rows[1:101])
    assert np.array_equal(rows[1:101], expected) and not rows[0].any() and not rows[101].any()
    one = pages[:1].copy()  # one page, in place
    engine.encrypt_pages(1, spas[:1], one, one)
    assert np.array_equal(one, expected[:1])


def test_a_batch_at_other_addresses_or_under_another_key_is_garbage(engine: MemoryEncryptionEngine) -> None:
    pages = _pages(os.urandom(8 * PAGE_SIZE))
    spas = np.arange(8, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(SPA)
    ct = engine.encrypt_pages(1, spas, pages)
    for moved in (engine.decrypt_pages(1, spas + np.uint64(PAGE_SIZE), ct),  # each page one frame on
                  engine.decrypt_pages(1, spas[::-1].copy(), ct),  # pages swapped around
                  engine.decrypt_pages(2, spas, ct)):  # another guest's key
        blocks, expected = moved.reshape(-1, 16), pages.reshape(-1, 16)
        assert not np.any(np.all(blocks == expected, axis=1))  # not a single block survives
    assert not np.any(np.all(ct.reshape(-1, 16) == pages.reshape(-1, 16), axis=1))


def test_batches_refuse_what_is_not_whole_pages(engine: MemoryEncryptionEngine) -> None:
    pages = _pages(os.urandom(2 * PAGE_SIZE))
    with pytest.raises(ValueError, match="page-aligned"):
        engine.encrypt_pages(1, [SPA, SPA + 16], pages)
    with pytest.raises(ValueError, match="addresses"):
        engine.encrypt_pages(1, [SPA], pages)
    with pytest.raises(ValueError, match="uint8 pages"):
        engine.encrypt_pages(1, [SPA], pages.reshape(-1)[:PAGE_SIZE].view(np.uint16).reshape(1, -1))
    with pytest.raises(PermissionError):
        engine.decrypt_pages(9, [SPA, SPA + PAGE_SIZE], pages)
    assert engine.encrypt_pages(1, [], np.empty((0, PAGE_SIZE), dtype=np.uint8)).shape == (0, PAGE_SIZE)


# --- partial pages ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(first=st.integers(0, 3 * PAGE_SIZE // 16 - 1), blocks=st.integers(0, 3 * PAGE_SIZE // 16))
def test_any_run_of_blocks_is_the_same_slice_of_its_pages(first: int, blocks: int) -> None:
    """Small spans (Python), page-sized ones and longer ones (numpy) agree block for block."""
    slots = KeySlots()
    slots.install(1, VEK)
    engine = MemoryEncryptionEngine(slots)
    whole = PAGE * 3
    ct = engine.encrypt(1, SPA, whole)
    lo, hi = 16 * first, min(16 * (first + blocks), len(whole))
    assert engine.encrypt(1, SPA + lo, whole[lo:hi]) == ct[lo:hi]
    assert engine.decrypt(1, SPA + lo, ct[lo:hi]) == whole[lo:hi]
    os.close(slots.fd)


def test_any_buffer_will_do(engine: MemoryEncryptionEngine) -> None:
    for size in (32, PAGE_SIZE, 2 * PAGE_SIZE):
        data = PAGE[: size // 2] * 2
        ct = engine.encrypt(1, SPA, data)
        words = np.frombuffer(data, dtype=np.uint64).copy()
        assert engine.encrypt(1, SPA, bytearray(data)) == engine.encrypt(1, SPA, words.data) == ct
        assert engine.decrypt(1, SPA, memoryview(ct)) == data


def test_the_engine_works_on_whole_aligned_blocks(engine: MemoryEncryptionEngine) -> None:
    with pytest.raises(ValueError, match="16-byte"):
        engine.encrypt(1, SPA + 8, bytes(16))
    with pytest.raises(ValueError, match="16-byte"):
        engine.decrypt(1, SPA, bytes(24))
    assert engine.encrypt(1, SPA, b"") == b""


@pytest.mark.parametrize(("offset", "data"), [
    (0x1238, b"8 bytes!"),  # inside one block
    (0x1230, bytes(range(16))),  # exactly one block
    (0x1FFC, b"straddle"),  # across a page boundary
    (0x2003, os.urandom(200)),  # partial blocks at both ends
    (0x2000, os.urandom(PAGE_SIZE + 32)),  # whole blocks only, more than a page
])
def test_cpu_sub_page_writes_change_only_the_blocks_they_touch(
        engine: MemoryEncryptionEngine, offset: int, data: bytes) -> None:
    mem = FlatMemory()
    core = CpuCore(0, mem, [RomRegion(name="x", base=0, size=1, step=lambda c: None)], mee=engine)
    core.set_asid(1)
    before = _pages(os.urandom(4 * PAGE_SIZE))
    core.write_pages(C_BIT | 0x1000, before)
    raw = mem.ram.copy()
    core.write(C_BIT | offset, data)
    assert core.read(C_BIT | offset, len(data)) == data
    after = core.read_pages(C_BIT | 0x1000, 4).tobytes()
    expected = bytearray(before.tobytes())
    expected[offset - 0x1000 : offset - 0x1000 + len(data)] = data
    assert after == bytes(expected)  # the bytes around the write are intact
    changed = np.flatnonzero(np.any(mem.ram.reshape(-1, 16) != raw.reshape(-1, 16), axis=1))
    assert changed.min() >= offset // 16 and changed.max() <= (offset + len(data) - 1) // 16
    assert core.read(C_BIT | (offset + 1), 5) == bytes(expected[offset - 0x1000 + 1 : offset - 0x1000 + 6])


@pytest.mark.parametrize("fallback", ["vek-is-the-xts-half", "library-disagrees"])
def test_plain_ecb_fallback_gives_the_same_ciphertext(monkeypatch: pytest.MonkeyPatch, fallback: str) -> None:
    """Bulk work runs on XTS as a fast ECB; where it cannot, ECB itself, with the same result."""
    from confmig.platform import mee

    vek = os.urandom(16)
    if fallback == "vek-is-the-xts-half":
        vek = mee._XTS_SECOND_HALF
    else:
        monkeypatch.setattr(mee, "_bulk_masks", lambda: None)
    slots = KeySlots()
    slots.install(1, vek)
    engine = MemoryEncryptionEngine(slots)
    data = os.urandom(2 * PAGE_SIZE + 64)
    ct = engine.encrypt(1, SPA + 0x40, data)
    assert ct[:64] == reference(vek, SPA + 0x40, data[:64])
    assert ct[-32:] == reference(vek, SPA + 0x40 + len(data) - 32, data[-32:])
    assert engine.encrypt_pages(1, [SPA], _pages(PAGE))[0].tobytes() == reference(vek, SPA, PAGE)
    assert engine.decrypt(1, SPA + 0x40, ct) == data
