"""The memory-encryption engine (the UMC's AES engine), emulated.

Every private page of an SEV guest is encrypted under its guest's key (the VEK the PSP
drew at LAUNCH_START or RECEIVE_START and installed in the key slot of the guest's ASID
at ACTIVATE), 16 bytes at a time, with a tweak derived from each block's *system-physical
address* (SPA). Deterministic per (key, address, plaintext), so that ciphertext copied to
another address, or read under another guest's key (another host's, above all), decrypts
to garbage. This is why SEV guests need special migration.

What is modelled: SEV's memory encryption as it is since Zen 2, AES-128 in XEX mode on
each 16-byte block at address ``pa``, with a tweak linear in the address bits::

    c = E_K(p ^ T(pa)) ^ T(pa)        T(pa) = XOR of t_i over the set bits i >= 4 of pa

(reverse-engineered by Wilke et al., "SEVurity: No Security Without Integrity", IEEE S&P
2020; the determinism is what Li et al.'s CipherLeaks, USENIX Security 2021, observe.)
Zen 1 used XE only (no outer XOR) with fixed tweak vectors t_i; Zen 2 added the outer XOR
and randomized them. Here K is the VEK, and the t_i (bits 4..51, AMD64's widest physical
address) are ``AES_K2(i)`` under a second key K2 derived from the VEK: secret, per key, and
the same in every process that reads the key slots (the host's PSP, each vCPU), so they
agree on ciphertext without sharing anything but the slots. How the hardware draws its
t_i is not published; deriving them from the VEK is this model's choice.

The honest caveat: T is linear, and a linear tweak is exactly the weakness SEVurity
exploits. Whoever learns ``d = T(a) ^ T(b)`` can copy a block from ``a`` to ``b`` XORed
with ``d``, and the guest reads its plaintext XORed with ``d``; on Zen 1 the t_i were
fixed, hence learnable. Plain SEV and SEV-ES have no memory integrity anyway (the host may
corrupt or replay any ciphertext); what confmig asks of the engine is what the hardware
gives: ciphertext bound to key and address, deterministic. SEV-SNP (the RMP, which keeps
the host from writing guest memory at all) is not modelled.

Because T is linear and a page's offset bits (4..11) are disjoint from its frame bits
(12..51), ``T(page + off) = T(page) ^ T(off)``: a batch of pages is one AES call over all
its blocks between two XORs with a mask made of a per-key 4 KiB offset mask and one
16-byte vector per page (:meth:`MemoryEncryptionEngine.encrypt_pages`, or a contiguous run
through :meth:`~MemoryEncryptionEngine.encrypt`), and a small access (a guest's 8-byte
load) costs only the blocks it touches.

The engine reads keys from :class:`KeySlots` by ASID; nobody outside the platform ever
sees a key.

Beside each key the slots keep the PSP's word to the cores whether a guest may
run on the ASID (:meth:`KeySlots.runnable`), which every core checks at VMRUN
(:meth:`confmig.platform.cpu.core.CpuCore.enter`, where the reasons are). It
lives with the key it goes with, in memory the PSP and the cores already share.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import threading
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from confmig.common.units import PAGE_SIZE
from confmig.platform.cpu.abi import Pages

VEK_SIZE = 16
MAX_ASID = 509
"""ASIDs of SEV guests on this model part: 1..MAX_ASID (Rome has 509)."""
_SLOT = 1 + VEK_SIZE
"""A key slot: a flags byte, then the VEK."""
_VALID = 1 << 0
"""The slot holds a key: the engine encrypts and decrypts under it."""
_RUNNABLE = 1 << 1
"""The cores may VMRUN with the slot's ASID."""

BLOCK_SIZE = 16
"""The engine's unit: one AES block, at a 16-byte aligned address."""
PHYS_ADDR_BITS = 52
"""System-physical addresses are below 2**52 (AMD64's widest); the tweak covers bits 4..51."""
_FIRST_TWEAK_BIT = 4
_FRAME_SHIFT = 12
_BLOCKS_PER_PAGE = PAGE_SIZE // BLOCK_SIZE
_FRAME_TABLES = (PHYS_ADDR_BITS - _FRAME_SHIFT + 7) // 8
"""The frame-number bits (12..51) in bytes: T(frame) is one lookup per byte."""
_BULK_BLOCKS = 128 * _BLOCKS_PER_PAGE
"""Blocks per AES call on the bulk path of a run (512 KiB). Bounds the position-mask table
(:func:`_bulk_masks`) and the temporaries of one call."""
_CHUNK_PAGES = 64
"""Pages per AES call on the path of whole pages (256 KiB): a call's mask, input and output
stay in the core's cache between the four passes over them (ad hoc: 512 pages read from
memory went about a third faster in 64-page calls than in one call)."""
_WORDS_PER_PAGE = PAGE_SIZE // 8
_SMALL_BLOCKS = 32
"""Spans up to 512 bytes take the scalar path (Python integers, no numpy): a guest's loads
and stores, a launch secret, the partial blocks of a longer store."""
_XTS_SECOND_HALF = bytes.fromhex("c0f3a1e7d26b584f9e0d1c3b7a695847")
"""Public, arbitrary: the second half of the XTS key used only as a fast ECB (see
:func:`_bulk_masks`). It carries no secret; the VEK is the AES key."""


class KeySlots:
    """The UMC's key slots, indexed by ASID, in memory shared by the host's platform
    processes (the PSP writes them, every vCPU's engine reads them). Created by the
    platform in the host daemon and handed to vCPU processes by file descriptor;
    the host kernel (KVM) only ever names slots by ASID."""

    def __init__(self, fd: int | None = None) -> None:
        size = (MAX_ASID + 1) * _SLOT
        if fd is None:
            fd = os.memfd_create("confmig:umc-key-slots", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def install(self, asid: int, vek: bytes) -> None:
        """The PSP's ``set_umc_key(asid, vek)`` at ACTIVATE. Not runnable yet: the PSP says when."""
        self._check(asid)
        if len(vek) != VEK_SIZE:
            raise ValueError("a VEK is 16 bytes")
        off = asid * _SLOT
        self._map[off + 1 : off + _SLOT] = vek
        self._map[off] = _VALID

    def clear(self, asid: int) -> None:
        """DEACTIVATE / DECOMMISSION: the slot no longer decrypts anything, nor runs."""
        self._check(asid)
        off = asid * _SLOT
        self._map[off : off + _SLOT] = bytes(_SLOT)

    def set_runnable(self, asid: int, runnable: bool) -> None:
        """The PSP's word on ``asid``, whose slot holds a key (see :meth:`runnable`)."""
        self._check(asid)
        off = asid * _SLOT
        if not self._map[off] & _VALID:
            raise ValueError(f"ASID {asid} has no key: nothing can run on it")
        self._map[off] = _VALID | (_RUNNABLE if runnable else 0)

    def runnable(self, asid: int) -> bool:
        """Whether a core may VMRUN a guest with ``asid``: the PSP has activated a guest on it
        that is running or being sent, not one still launched or received, nor one sent."""
        self._check(asid)
        return bool(self._map[asid * _SLOT] & _RUNNABLE)

    def vek(self, asid: int) -> bytes | None:
        self._check(asid)
        off = asid * _SLOT
        return bytes(self._map[off + 1 : off + _SLOT]) if self._map[off] & _VALID else None

    def close(self) -> None:
        """Unmap the slots and close their fd, made here or handed over (the slots own it)."""
        self._map.close()
        os.close(self.fd)

    @staticmethod
    def _check(asid: int) -> None:
        if not 1 <= asid <= MAX_ASID:
            raise ValueError(f"ASID {asid} outside 1..{MAX_ASID}")

    def __repr__(self) -> str:
        return "KeySlots(<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key slots cannot be pickled")


_Words = npt.NDArray[np.uint64]
"""16-byte blocks as their little-endian 64-bit halves, flat: block j is words 2j and 2j + 1."""
_U64 = np.dtype("<u8")
_BLOCK = np.dtype("V16")
_MASK128 = (1 << 128) - 1
_FEW_PAGES = 16
"""Up to this many pages, a batch's per-page tweaks are computed with Python integers; numpy's
per-call overhead only pays off beyond."""


def _tweak_key(vek: bytes) -> bytes:
    """K2, under which the tweak vectors are drawn: derived from the VEK (it was the second
    half of the XTS key this engine used before)."""
    return hashlib.sha256(b"confmig-umc-tweak-key" + vek).digest()[:VEK_SIZE]


def _as_words(blocks: Sequence[int]) -> _Words:
    raw = b"".join(b.to_bytes(BLOCK_SIZE, "little") for b in blocks)
    return np.frombuffer(raw, dtype=_U64).copy()


def _octets(words: _Words) -> memoryview:
    """The bytes of ``words`` as the AES contexts take them."""
    return words.view(np.uint8).data


def _span(vectors: Sequence[int]) -> list[int]:
    """XOR of every subset of ``vectors``, indexed by the subset's bits (T over those bits)."""
    table = [0]
    for v in vectors:
        table += [t ^ v for t in table]
    return table


@functools.cache
def _bulk_masks() -> _Words | None:
    """Masks that make XTS an ECB. The library's ECB ran at ~1 GB/s on 512 KiB calls here,
    its XTS at ~14 GB/s (ad-hoc measurements, cryptography 50 with OpenSSL 4).

    XTS under (K, C) with tweak 0 computes ``E_K(x_j ^ D_j) ^ D_j`` for block j of a call,
    where ``D_j = E_C(0) * alpha^j`` in GF(2^128) depends on C only; C is a public constant,
    so ``E_K(x) = XTS(x ^ D) ^ D`` block by block, and the same for decryption. Computed once
    per process for one bulk call's length; None (plain ECB) if the library disagrees."""
    ecb = Cipher(algorithms.AES(_XTS_SECOND_HALF), modes.ECB()).encryptor()
    d = int.from_bytes(ecb.update(bytes(BLOCK_SIZE)), "little")
    deltas = []
    for _ in range(_BULK_BLOCKS):
        deltas.append(d)
        d = ((d << 1) & _MASK128) ^ (0x87 if d >> 127 else 0)
    masks = _as_words(deltas)
    probe_key = hashlib.sha256(b"confmig-umc-probe").digest()[:VEK_SIZE]
    probe = np.frombuffer(hashlib.shake_128(b"probe").digest(_BULK_BLOCKS * BLOCK_SIZE), dtype=_U64)
    xts = Cipher(algorithms.AES(probe_key + _XTS_SECOND_HALF), modes.XTS(bytes(BLOCK_SIZE)))
    via_xts = np.frombuffer(xts.encryptor().update(_octets(probe ^ masks)), dtype=_U64) ^ masks
    plain = Cipher(algorithms.AES(probe_key), modes.ECB()).encryptor().update(_octets(probe))
    masks.flags.writeable = False  # shared by every key of the process
    return masks if via_xts.tobytes() == plain else None


class _Key:
    """A VEK expanded for the engine: its AES contexts and its tweak tables. Secret."""

    __slots__ = (
        "_positions",
        "_scratch",
        "bulk_decrypt",
        "bulk_encrypt",
        "bulk_masks",
        "decryptor",
        "encryptor",
        "frame_table",
        "frame_tweaks",
        "offset_mask",
        "offset_tweaks",
        "vek",
    )

    def __init__(self, vek: bytes) -> None:
        self.vek = vek
        ecb = Cipher(algorithms.AES(vek), modes.ECB())
        # ECB contexts keep no state between whole blocks: one of each serves every call.
        self.encryptor: CipherContext = ecb.encryptor()
        self.decryptor: CipherContext = ecb.decryptor()
        bits = range(_FIRST_TWEAK_BIT, PHYS_ADDR_BITS)
        draw = Cipher(algorithms.AES(_tweak_key(vek)), modes.ECB()).encryptor()
        drawn = draw.update(b"".join(i.to_bytes(BLOCK_SIZE, "little") for i in bits))
        t = [int.from_bytes(drawn[k : k + BLOCK_SIZE], "little") for k in range(0, len(drawn), BLOCK_SIZE)]
        in_page = _FRAME_SHIFT - _FIRST_TWEAK_BIT
        self.offset_tweaks = _span(t[:in_page])
        """T of a block's offset in its page (address bits 4..11), by the block's index."""
        self.frame_tweaks = [_span(t[in_page + 8 * k : in_page + 8 * k + 8]) for k in range(_FRAME_TABLES)]
        """T of a frame number's byte k (address bits 12+8k..19+8k), by the byte's value."""
        self.frame_table = np.stack([_as_words(table).view(_BLOCK) for table in self.frame_tweaks])
        self.offset_mask = _as_words(self.offset_tweaks)
        masks = _bulk_masks()
        if masks is None or vek == _XTS_SECOND_HALF:  # XTS refuses two equal halves
            self.bulk_encrypt, self.bulk_decrypt, self.bulk_masks = self.encryptor, self.decryptor, None
        else:
            xts = Cipher(algorithms.AES(vek + _XTS_SECOND_HALF), modes.XTS(bytes(BLOCK_SIZE)))
            # Every update of an XTS context is one data unit under the same tweak: reusable.
            self.bulk_encrypt, self.bulk_decrypt, self.bulk_masks = xts.encryptor(), xts.decryptor(), masks
        self._positions: _Words = np.empty(0, dtype=_U64)
        words = PAGE_SIZE // 8
        inner, result = np.empty(words, _U64), np.empty(words + 2, _U64)  # update_into wants a block more
        self._scratch = (np.empty(words, _U64), inner, _octets(inner), result[:words], _octets(result),
                         self.positions(words))

    def frame_tweak(self, frame: int) -> int:
        """T of the page ``frame`` (its address's bits 12..51), as an integer."""
        t = 0
        for table in self.frame_tweaks:
            t ^= table[frame & 0xFF]
            frame >>= 8
        return t

    def page_tweaks(self, frames: npt.NDArray[np.uint64]) -> npt.NDArray[np.void]:
        """T(frame) of each page ``frames`` (frame numbers), one 16-byte element per page
        (whole blocks as single elements: numpy copies them fast, not so pairs of words)."""
        if len(frames) <= _FEW_PAGES:
            return _as_words([self.frame_tweak(int(f)) for f in frames]).view(_BLOCK)
        octets = frames.astype(_U64).view(np.uint8).reshape(-1, 8)
        per_page = self.frame_table[0].take(octets[:, 0]).view(_U64)
        for k in range(1, _FRAME_TABLES):
            per_page ^= self.frame_table[k].take(octets[:, k]).view(_U64)
        tweaks: npt.NDArray[np.void] = per_page.view(_BLOCK)
        return tweaks

    def frame_masks(self, frames: npt.NDArray[np.uint64]) -> _Words:
        """T(frame) of each page ``frames`` (frame numbers), repeated over its blocks."""
        return np.repeat(self.page_tweaks(frames), _BLOCKS_PER_PAGE).view(_U64)

    def positions(self, words: int) -> _Words:
        """What a bulk call that starts at a page's first block adds to each block's frame
        tweak, for its first ``words``: T of the block's offset in its page and, where the
        bulk work runs on XTS, its mask (see :func:`_bulk_masks`). Made once, as far as asked."""
        if len(self._positions) < words:
            grown = np.tile(self.offset_mask, -(-words // len(self.offset_mask)))
            if self.bulk_masks is not None:
                np.bitwise_xor(grown, self.bulk_masks[: len(grown)], out=grown)
            grown.flags.writeable = False
            self._positions = grown
        return self._positions[:words]

    def small(self, spa: int, data: bytes | bytearray | memoryview, *, encrypt: bool) -> bytes:
        """A few blocks from ``spa`` on, with Python integers: the whole span is one XOR."""
        mask, shift, end = 0, 0, spa + len(data)
        while spa < end:  # page by page: T(frame) once, then T(offset) per block
            page_end = min(end, ((spa >> _FRAME_SHIFT) + 1) << _FRAME_SHIFT)
            frame = self.frame_tweak(spa >> _FRAME_SHIFT)
            first, last = (spa % PAGE_SIZE) // BLOCK_SIZE, ((page_end - 1) % PAGE_SIZE) // BLOCK_SIZE
            for offset in self.offset_tweaks[first : last + 1]:
                mask |= (frame ^ offset) << shift
                shift += 128
            spa = page_end
        context = self.encryptor if encrypt else self.decryptor
        inner = context.update((int.from_bytes(data, "little") ^ mask).to_bytes(len(data), "little"))
        return (int.from_bytes(inner, "little") ^ mask).to_bytes(len(data), "little")

    def page(self, frame: int, data: _Words, *, encrypt: bool) -> _Words:
        """One page: :meth:`bulk`'s work in as few numpy calls as it takes, in scratch space
        (the commonest call: the PSP moves one page per command, the core a VMSA)."""
        mask, inner, inner_octets, result, result_octets, positions = self._scratch
        tweak = self.frame_tweak(frame).to_bytes(BLOCK_SIZE, "little") * _BLOCKS_PER_PAGE
        np.bitwise_xor(np.frombuffer(tweak, dtype=_U64), positions, out=mask)
        np.bitwise_xor(data, mask, out=inner)
        (self.bulk_encrypt if encrypt else self.bulk_decrypt).update_into(inner_octets, result_octets)
        return np.bitwise_xor(result, mask)

    def pages(self, frames: npt.NDArray[np.uint64], data: _Words, out: _Words, *, encrypt: bool) -> None:
        """Whole pages, page ``i`` at frame ``frames[i]``, from ``data`` into ``out`` (words;
        they may be the same): :data:`_CHUNK_PAGES` at a time, in scratch space of that size."""
        n = len(frames)
        if n == 1:
            out[:] = self.page(int(frames[0]), data, encrypt=encrypt)
            return
        tweaks = self.page_tweaks(frames)
        chunk = min(n, _CHUNK_PAGES)
        words = chunk * _WORDS_PER_PAGE
        positions = self.positions(words)
        mask, inner, result = np.empty(words, _U64), np.empty(words, _U64), np.empty(words + 2, _U64)
        page_masks = mask.view(_BLOCK).reshape(chunk, _BLOCKS_PER_PAGE)
        context = self.bulk_encrypt if encrypt else self.bulk_decrypt
        for first in range(0, n, chunk):
            k = min(chunk, n - first)
            w, at = k * _WORDS_PER_PAGE, first * _WORDS_PER_PAGE
            page_masks[:k] = tweaks[first : first + k, None]
            np.bitwise_xor(mask[:w], positions[:w], out=mask[:w])
            np.bitwise_xor(data[at : at + w], mask[:w], out=inner[:w])
            context.update_into(_octets(inner[:w]), _octets(result[: w + 2]))  # a block more
            np.bitwise_xor(result[:w], mask[:w], out=out[at : at + w])

    def bulk(self, masks: _Words, data: _Words, positions: _Words | None, *, encrypt: bool) -> _Words:
        """The blocks ``data`` under the tweaks ``masks`` (which this overwrites), completed
        at the start of each AES call by ``positions`` (None: nothing to add)."""
        context = self.bulk_encrypt if encrypt else self.bulk_decrypt
        out = np.empty_like(data)
        step = 2 * _BULK_BLOCKS
        for start in range(0, len(data), step):
            end = min(start + step, len(data))
            mask = masks[start:end]
            if positions is not None:
                np.bitwise_xor(mask, positions[: end - start], out=mask)
            inner = context.update(_octets(data[start:end] ^ mask))
            np.bitwise_xor(np.frombuffer(inner, dtype=_U64), mask, out=out[start:end])
        return out


class MemoryEncryptionEngine:
    """Encrypts and decrypts 16-byte blocks for an ASID at system-physical addresses: a run
    of them (:meth:`encrypt`, :meth:`decrypt`), or whole pages each at its own address
    (:meth:`encrypt_pages`, :meth:`decrypt_pages`). One engine may serve several threads."""

    def __init__(self, slots: KeySlots) -> None:
        self.slots = slots
        """Where the keys come from (and the PSP's word on which ASIDs may run)."""
        self._cache: dict[int, _Key] = {}
        self._lock = threading.Lock()
        """The expanded keys' AES contexts are reused from call to call: one caller at a time."""

    def _key(self, asid: int) -> _Key:
        vek = self.slots.vek(asid)
        if vek is None:
            # An inactive slot: real hardware would produce garbage; failing loudly is kinder.
            raise PermissionError(f"no key installed for ASID {asid}")
        cached = self._cache.get(asid)
        if cached is None or cached.vek != vek:  # another guest's key in the slot since
            cached = _Key(vek)
            self._cache[asid] = cached
        return cached

    def encrypt(self, asid: int, spa: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The blocks of ``plaintext`` as stored from ``spa`` (16-byte aligned) on: a few
        blocks, a page, or a run of pages at contiguous addresses."""
        return self._run(asid, spa, plaintext, encrypt=True)

    def decrypt(self, asid: int, spa: int, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """The plaintext of the blocks ``ciphertext`` read from ``spa`` on (see :meth:`encrypt`)."""
        return self._run(asid, spa, ciphertext, encrypt=False)

    def encrypt_pages(self, asid: int, spas: Sequence[int] | npt.NDArray[np.uint64], pages: Pages,
                      out: Pages | None = None) -> Pages:
        """Whole pages, page ``i`` stored at ``spas[i]``, into ``out`` (a new array if None; it
        may be ``pages``, or the memory they are stored in)."""
        return self._pages(asid, spas, pages, encrypt=True, out=out)

    def decrypt_pages(self, asid: int, spas: Sequence[int] | npt.NDArray[np.uint64], pages: Pages,
                      out: Pages | None = None) -> Pages:
        """Whole pages, page ``i`` read from ``spas[i]`` (see :meth:`encrypt_pages`)."""
        return self._pages(asid, spas, pages, encrypt=False, out=out)

    def _run(self, asid: int, spa: int, data: bytes | bytearray | memoryview, *, encrypt: bool) -> bytes:
        view = data if isinstance(data, bytes | bytearray) else memoryview(data).cast("B")
        size = len(view)
        if spa % BLOCK_SIZE or size % BLOCK_SIZE:
            raise ValueError("the engine works on whole 16-byte blocks at 16-byte aligned addresses")
        if spa < 0 or spa + size > 1 << PHYS_ADDR_BITS:
            raise ValueError(f"[{spa:#x}, +{size:#x}) is not a system-physical range")
        with self._lock:
            key = self._key(asid)
            if size <= _SMALL_BLOCKS * BLOCK_SIZE:
                return key.small(spa, view, encrypt=encrypt) if size else b""
            words = np.frombuffer(view, dtype=_U64)
            first = spa >> _FRAME_SHIFT
            if size == PAGE_SIZE and not spa % PAGE_SIZE:
                return key.page(first, words, encrypt=encrypt).tobytes()
            frames = np.arange(first, (spa + size + PAGE_SIZE - 1) >> _FRAME_SHIFT, dtype=np.uint64)
            if not (spa | size) % PAGE_SIZE:
                out = np.empty_like(words)
                key.pages(frames, words, out, encrypt=encrypt)
                return out.tobytes()
            # The tweaks of the pages the run touches, cut to the blocks it covers.
            masks = key.frame_masks(frames).reshape(len(frames), -1)
            np.bitwise_xor(masks, key.offset_mask, out=masks)
            lead = (spa % PAGE_SIZE) // 8
            return key.bulk(masks.reshape(-1)[lead : lead + size // 8], words, key.bulk_masks,
                            encrypt=encrypt).tobytes()

    def _pages(self, asid: int, spas: Sequence[int] | npt.NDArray[np.uint64], pages: Pages,
               *, encrypt: bool, out: Pages | None = None) -> Pages:
        if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE or pages.dtype != np.uint8:
            raise ValueError(f"expected (n, {PAGE_SIZE}) uint8 pages, got {pages.shape} {pages.dtype}")
        if out is None:
            out = np.empty(pages.shape, np.uint8)
        elif out.shape != pages.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"expected a contiguous {pages.shape} uint8 output, got {out.shape} {out.dtype}")
        addresses = np.asarray(spas, dtype=np.uint64)
        if addresses.shape != (pages.shape[0],):
            raise ValueError(f"{pages.shape[0]} pages but addresses of shape {addresses.shape}")
        if addresses.size and (np.any(addresses % np.uint64(PAGE_SIZE))
                               or np.any(addresses > np.uint64((1 << PHYS_ADDR_BITS) - PAGE_SIZE))):
            raise ValueError("pages are at page-aligned system-physical addresses")
        with self._lock:
            key = self._key(asid)
            words = np.ascontiguousarray(pages).view(_U64).reshape(-1)
            frames = addresses >> np.uint64(_FRAME_SHIFT)
            if len(frames):
                key.pages(frames, words, out.view(_U64).reshape(-1), encrypt=encrypt)
            return out
