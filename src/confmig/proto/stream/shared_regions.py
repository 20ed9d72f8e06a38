"""The SHARED_REGIONS record: which guest pages the guest made shared, sans-IO.

The payload of a CONFIDENTIAL record of subtype SHARED_REGIONS (``docs/stream-format.md``
§4.5): u32 count, then per range u64 GPA and u64 size, big-endian as the rest of the
stream (the 2021 QEMU series sent ``be64`` pairs too). Ranges are page-aligned, non-empty,
sorted and disjoint: a target must be able to trust the list's shape before it uses it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream.format import ConfidentialSubtype

MAX_REGIONS: Final = 1 << 16
"""Bound on the list (a guest flipping every other page would need one range per page)."""
SUBTYPE: Final = ConfidentialSubtype.SHARED_REGIONS

_COUNT: Final = struct.Struct(">I")
_RANGE: Final = struct.Struct(">QQ")

Ranges = tuple[tuple[int, int], ...]
"""``(first guest frame, number of pages)`` per shared range, in order."""


def encode(ranges: Sequence[tuple[int, int]]) -> bytes:
    if len(ranges) > MAX_REGIONS:
        raise ValueError(f"shared-regions list of {len(ranges)} ranges (limit {MAX_REGIONS})")
    return _COUNT.pack(len(ranges)) + b"".join(
        _RANGE.pack(gfn << PAGE_SHIFT, npages << PAGE_SHIFT) for gfn, npages in ranges)


def decode(payload: bytes) -> Ranges:
    """The ranges of one SHARED_REGIONS payload; :class:`StreamError` for anything else."""
    if len(payload) < _COUNT.size:
        raise StreamError("shared-regions list: truncated")
    (n,) = _COUNT.unpack_from(payload)
    # SECURITY: the count comes from the migration stream: bounded, and it must match the length.
    if n > MAX_REGIONS or len(payload) != _COUNT.size + n * _RANGE.size:
        raise StreamError(f"shared-regions list: {len(payload)} bytes for {n} ranges")
    out: list[tuple[int, int]] = []
    prev_end = 0
    for gpa, size in _RANGE.iter_unpack(payload[_COUNT.size :]):
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa < prev_end or gpa + size >= 1 << 64:
            raise StreamError("shared-regions list: ranges must be page-aligned, non-empty, sorted "
                              "and disjoint")
        out.append((gpa >> PAGE_SHIFT, size >> PAGE_SHIFT))
        prev_end = gpa + size
    return tuple(out)
