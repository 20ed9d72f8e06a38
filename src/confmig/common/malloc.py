"""Keep large allocations in the heap (glibc's ``mallopt``).

A migration allocates and frees buffers of hundreds of KiB per batch (pages,
records, ciphertext). glibc serves those with ``mmap`` and returns them with
``munmap``, or trims them off the heap, so every batch faults its buffers in
again, page by page: measured here, six page faults per migrated page in a
Migration Handler's vCPU process, more CPU than the cryptography. A process
that moves pages keeps freed memory for the next batch instead, as a
long-running server sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
"""glibc's ``mallopt`` parameters (``malloc.h``)."""
MMAP_THRESHOLD: Final = 32 << 20
"""Allocations below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD: Final = 256 << 20
"""Free memory at the heap's top beyond this goes back to the system."""


def keep_large_allocations() -> bool:
    """Set the thresholds; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds; allocations keep glibc's defaults")
    return ok
