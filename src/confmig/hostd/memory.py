"""The memory controller as the PSP reaches it: system-physical addresses of the
host's guest RAM, raw or through an ASID's key slot (the firmware's
``copy_from_x86`` / ``copy_to_x86_encrypted``)."""

from __future__ import annotations

from collections.abc import Callable

from confmig.common.units import PAGE_SIZE, Spa
from confmig.platform.mee import MemoryEncryptionEngine
from confmig.platform.psp.handles import Asid
from confmig.platform.psp.memory import SpaOutOfRange

SpaWindow = Callable[[int, int], "memoryview | None"]


class HostMemoryPort:
    """A :class:`confmig.platform.psp.memory.GuestMemoryPort` over the host's RAM.

    The engine works on whole pages; smaller accesses (a launch secret, a debug
    read) read, patch and rewrite the pages they touch.
    """

    def __init__(self, window: SpaWindow, engine: MemoryEncryptionEngine) -> None:
        self._window = window
        self._engine = engine

    def _pages(self, spa: int, size: int) -> tuple[int, memoryview]:
        first = spa - spa % PAGE_SIZE
        last = -(-(spa + size) // PAGE_SIZE) * PAGE_SIZE
        view = self._window(first, last - first)
        if view is None:
            raise SpaOutOfRange(f"[{spa:#x}, +{size:#x})")
        return first, view

    def read(self, spa: Spa, size: int) -> bytes:
        first, view = self._pages(spa, size)
        return bytes(view[spa - first : spa - first + size])

    def read_encrypted(self, asid: Asid, spa: Spa, size: int) -> bytes:
        first, view = self._pages(spa, size)
        plain = self._engine.decrypt(asid, first, bytes(view))
        return plain[spa - first : spa - first + size]

    def write_encrypted(self, asid: Asid, spa: Spa, data: bytes) -> None:
        first, view = self._pages(spa, len(data))
        plain = bytearray(self._engine.decrypt(asid, first, bytes(view)))
        plain[spa - first : spa - first + len(data)] = data
        view[:] = self._engine.encrypt(asid, first, plain)
