"""A PSP memory port over the real memory-encryption engine and a bytearray of "system memory"."""

from __future__ import annotations

from confmig.common.units import PAGE_SIZE
from confmig.platform.mee import MemoryEncryptionEngine
from confmig.platform.psp import SpaOutOfRange


class MeePort:
    """A GuestMemoryPort over the real engine that, like ``confmig.hostd.memory.HostMemoryPort``,
    reads, patches and rewrites the whole pages a sub-page access touches."""

    def __init__(self, engine: MemoryEncryptionEngine, size: int) -> None:
        self.raw = bytearray(size)
        self._engine = engine

    def _pages(self, spa: int, size: int) -> tuple[int, int]:
        if spa < 0 or spa + size > len(self.raw):
            raise SpaOutOfRange(f"[{spa:#x}, +{size:#x})")
        return spa - spa % PAGE_SIZE, -(-(spa + size) // PAGE_SIZE) * PAGE_SIZE

    def read(self, spa: int, size: int) -> bytes:
        self._pages(spa, size)
        return bytes(self.raw[spa : spa + size])

    def read_encrypted(self, asid: int, spa: int, size: int) -> bytes:
        first, last = self._pages(spa, size)
        plain = self._engine.decrypt(asid, first, bytes(self.raw[first:last]))
        return plain[spa - first : spa - first + size]

    def write_encrypted(self, asid: int, spa: int, data: bytes) -> None:
        first, last = self._pages(spa, len(data))
        plain = bytearray(self._engine.decrypt(asid, first, bytes(self.raw[first:last])))
        plain[spa - first : spa - first + len(data)] = data
        self.raw[first:last] = self._engine.encrypt(asid, first, plain)
