"""The shared-regions list: which guest pages an SEV guest made shared.

Kept by the VMM from the guest's ``KVM_HC_MAP_GPA_RANGE`` hypercalls (the
upstream page-encryption-status channel). Everything not listed is private:
guest RAM, which the VMM maps, holds only its ciphertext. Migration sends shared pages in the clear and
private pages through a confidential backend; the list itself travels in the
stream so that the target knows too.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ProtocolError
from confmig.proto.stream import shared_regions as shared_regions_record
from confmig.proto.stream.shared_regions import MAX_REGIONS


class SharedRegions:
    """Disjoint, sorted, coalesced ``[start, end)`` guest-frame ranges. Thread-safe."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._lock = threading.Lock()

    def update(self, gfn: int, npages: int, *, shared: bool) -> None:
        """Mark ``[gfn, gfn + npages)`` shared or private."""
        if npages <= 0:
            return
        lo, hi = gfn, gfn + npages
        with self._lock:
            i = bisect.bisect_left(self._ends, lo)  # first range that may touch [lo, hi)
            j = bisect.bisect_right(self._starts, hi)  # ranges from i to j overlap or touch
            starts, ends = self._starts[i:j], self._ends[i:j]
            new_s: list[int] = []
            new_e: list[int] = []
            if shared:
                s = min([lo, *starts])
                e = max([hi, *ends])
                new_s, new_e = [s], [e]
            else:
                for s, e in zip(starts, ends, strict=True):
                    if s < lo:
                        new_s.append(s)
                        new_e.append(min(e, lo))
                    if e > hi:
                        new_s.append(max(s, hi))
                        new_e.append(e)
            if len(self._starts) - (j - i) + len(new_s) > MAX_REGIONS:  # refused, and unchanged
                raise ProtocolError(f"shared-regions list exceeds {MAX_REGIONS} ranges")
            self._starts[i:j] = new_s
            self._ends[i:j] = new_e

    def is_shared(self, gfn: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, gfn) - 1
            return i >= 0 and gfn < self._ends[i]

    def shared_mask(self, gfns: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """For a batch of frames at once: which are shared (the migration's hot path)."""
        with self._lock:
            starts = np.asarray(self._starts, dtype=np.int64)
            ends = np.asarray(self._ends, dtype=np.int64)
        i = np.searchsorted(starts, gfns, side="right") - 1
        return (i >= 0) & (gfns < ends[np.maximum(i, 0)]) if len(starts) else np.zeros(len(gfns), bool)

    def ranges(self) -> list[tuple[int, int]]:
        """``(first gfn, npages)`` of every shared range, in order."""
        with self._lock:
            return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def shared_pages(self) -> int:
        with self._lock:
            return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def encode(self) -> bytes:
        """The list as the SHARED_REGIONS record carries it."""
        return shared_regions_record.encode(self.ranges())

    @classmethod
    def decode(cls, data: bytes) -> SharedRegions:
        """A list received in the stream; :class:`StreamError` if it is malformed."""
        out = cls()
        for gfn, npages in shared_regions_record.decode(data):
            out.update(gfn, npages, shared=True)
        return out
