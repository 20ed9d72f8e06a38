"""Sizes and address vocabulary.

Addresses that cross module boundaries are typed, after rust-vmm's
``GuestAddress``: a guest physical address (``Gpa``) is not a frame number
(``Gfn``) and neither is a system physical address (``Spa``), the emulated
host-physical address that memory encryption binds ciphertext to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

Gpa = NewType("Gpa", int)
"""Guest physical address."""
Gfn = NewType("Gfn", int)
"""Guest frame number (``Gpa >> PAGE_SHIFT``)."""
Spa = NewType("Spa", int)
"""System (emulated host) physical address."""


def gpa_to_gfn(gpa: Gpa) -> Gfn:
    return Gfn(gpa >> PAGE_SHIFT)


def gfn_to_gpa(gfn: Gfn) -> Gpa:
    return Gpa(gfn << PAGE_SHIFT)


def pages(size: int) -> int:
    """Number of pages needed to hold ``size`` bytes."""
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRange:
    """A half-open range of guest physical memory, ``[start, start + size)``."""

    start: Gpa
    size: int

    @property
    def end(self) -> Gpa:
        return Gpa(self.start + self.size)

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.start <= gpa and gpa + size <= self.end


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_SUFFIX = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str, *, default_suffix: str = "") -> int:
    """Parse a QEMU-style size: ``512M``, ``1G``, ``4096`` (bytes unless ``default_suffix``)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 512M, 1G)")
    suffix = m.group(2).lower() or default_suffix.lower()
    return int(m.group(1)) * _SUFFIX[suffix]


def format_size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"
