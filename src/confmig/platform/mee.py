"""The memory-encryption engine (the UMC's AES engine), emulated.

Every private page of an SEV guest is encrypted under its guest's key (the
VEK the PSP drew at LAUNCH_START or RECEIVE_START and installed in the key slot
of the guest's ASID at ACTIVATE) with a tweak derived from the page's *system
physical address*. Modelled as AES-128-XTS (a 32-byte key: the VEK and a
second half derived from it) with the 16-byte little-endian SPA as the tweak:
an XEX construction like Zen 2's, deterministic per (key, address, plaintext),
so that ciphertext copied to another address, or read under another guest's
key (another host's, above all), decrypts to garbage. This is why SEV guests
need special migration.

The engine reads keys from :class:`KeySlots` by ASID; nobody outside the
platform ever sees a key.

Beside each key the slots keep the PSP's word to the cores whether a guest may
run on the ASID (:meth:`KeySlots.runnable`), which every core checks at VMRUN
(:meth:`confmig.platform.cpu.core.CpuCore.enter`, where the reasons are). It
lives with the key it goes with, in memory the PSP and the cores already share.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from typing import NoReturn

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from confmig.common.units import PAGE_SIZE

VEK_SIZE = 16
MAX_ASID = 509
"""ASIDs of SEV guests on this model part: 1..MAX_ASID (Rome has 509)."""
_SLOT = 1 + VEK_SIZE
"""A key slot: a flags byte, then the VEK."""
_VALID = 1 << 0
"""The slot holds a key: the engine encrypts and decrypts under it."""
_RUNNABLE = 1 << 1
"""The cores may VMRUN with the slot's ASID."""


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

    @staticmethod
    def _check(asid: int) -> None:
        if not 1 <= asid <= MAX_ASID:
            raise ValueError(f"ASID {asid} outside 1..{MAX_ASID}")

    def __repr__(self) -> str:
        return "KeySlots(<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key slots cannot be pickled")


def _xts_key(vek: bytes) -> bytes:
    """AES-128-XTS needs two 16-byte keys; the second is derived from the VEK."""
    return vek + hashlib.sha256(b"confmig-umc-tweak-key" + vek).digest()[:VEK_SIZE]


def _tweak(spa: int) -> bytes:
    return spa.to_bytes(16, "little")


XtsContext = Callable[[algorithms.AES, modes.XTS], CipherContext]


def _context_factories() -> tuple[XtsContext, XtsContext]:
    """How a per-page XTS context is made. ``Cipher(...).encryptor()`` checks its arguments in
    Python on every call, about as long as the AES work for one page; the library's own
    constructor behind it skips those checks (the engine's key and tweaks are always valid).
    Used when this version of ``cryptography`` has it and agrees with the public way."""
    def public_enc(a: algorithms.AES, m: modes.XTS) -> CipherContext:
        return Cipher(a, m).encryptor()

    def public_dec(a: algorithms.AES, m: modes.XTS) -> CipherContext:
        return Cipher(a, m).decryptor()

    try:
        from cryptography.hazmat.bindings._rust import openssl as rust

        enc: XtsContext = rust.ciphers.create_encryption_ctx
        dec: XtsContext = rust.ciphers.create_decryption_ctx
        probe = algorithms.AES(bytes(range(32))), modes.XTS(bytes(range(16)))
        page = bytes(range(256)) * (PAGE_SIZE // 256)
        if (enc(*probe).update(page) != public_enc(*probe).update(page)
                or dec(*probe).update(page) != public_dec(*probe).update(page)):
            raise ImportError("the library's XTS contexts disagree with the public ones")
        return enc, dec
    except (ImportError, AttributeError, TypeError):
        return public_enc, public_dec


_ENCRYPTOR, _DECRYPTOR = _context_factories()


class MemoryEncryptionEngine:
    """Encrypts and decrypts whole pages for an ASID at system-physical addresses."""

    def __init__(self, slots: KeySlots) -> None:
        self.slots = slots
        """Where the keys come from (and the PSP's word on which ASIDs may run)."""
        self._cache: dict[int, tuple[bytes, algorithms.AES]] = {}

    def _key(self, asid: int) -> algorithms.AES:
        vek = self.slots.vek(asid)
        if vek is None:
            # An inactive slot: real hardware would produce garbage; failing loudly is kinder.
            raise PermissionError(f"no key installed for ASID {asid}")
        cached = self._cache.get(asid)
        if cached is None or cached[0] != vek:
            cached = (vek, algorithms.AES(_xts_key(vek)))
            self._cache[asid] = cached
        return cached[1]

    def encrypt(self, asid: int, spa: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        return self._run(asid, spa, plaintext, encrypt=True)

    def decrypt(self, asid: int, spa: int, ciphertext: bytes | memoryview) -> bytes:
        return self._run(asid, spa, ciphertext, encrypt=False)

    def _run(self, asid: int, spa: int, data: bytes | bytearray | memoryview, *, encrypt: bool) -> bytes:
        view = memoryview(data).cast("B")
        if spa % PAGE_SIZE or len(view) % PAGE_SIZE:
            raise ValueError("the engine works on whole, aligned pages")
        key = self._key(asid)
        context = _ENCRYPTOR if encrypt else _DECRYPTOR
        if len(view) == PAGE_SIZE:
            return context(key, modes.XTS(_tweak(spa))).update(view)
        # One tweak per page, as the UMC's per-address tweak. XTS has no state to finalize: a
        # data unit is done when its one update returns.
        return b"".join(context(key, modes.XTS(_tweak(spa + off))).update(view[off : off + PAGE_SIZE])
                        for off in range(0, len(view), PAGE_SIZE))
