"""Dirty bitmaps in KVM's layout: bit ``i`` of the little-endian word array is page ``i``.

Kept as numpy ``uint8`` arrays with ``bitorder="little"`` so a bitmap produced by
``KVM_GET_DIRTY_LOG`` can be used without Python loops.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Bitmap = npt.NDArray[np.uint8]
"""Packed bitmap bytes, LSB first, padded to a multiple of 8 bytes (one u64 word)."""


def bitmap_bytes(npages: int) -> int:
    """Size of a KVM dirty bitmap for ``npages``: whole 64-bit words."""
    return ((npages + 63) // 64) * 8


def pack(flags: npt.NDArray[np.bool_]) -> Bitmap:
    out = np.zeros(bitmap_bytes(len(flags)), dtype=np.uint8)
    packed = np.packbits(flags, bitorder="little")
    out[: len(packed)] = packed
    return out


def unpack(bitmap: Bitmap | bytes, npages: int) -> npt.NDArray[np.bool_]:
    arr = np.frombuffer(bitmap, dtype=np.uint8) if isinstance(bitmap, bytes | bytearray) else bitmap
    return np.unpackbits(arr, count=npages, bitorder="little").astype(bool)


def set_pages(bitmap: Bitmap | bytes, npages: int) -> npt.NDArray[np.int64]:
    """Indices of the set bits."""
    return np.flatnonzero(unpack(bitmap, npages)).astype(np.int64)
