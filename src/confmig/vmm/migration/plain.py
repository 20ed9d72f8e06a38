"""The plain backend: a guest whose RAM the host may read and copy (QEMU's ``ram`` section)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.ram import MAX_BATCH_PAGES, PageSink, RoundCounters


class PlainOutgoing(OutgoingBackend):
    """Every page as the host sees it, through the engine's page sink (main channel or multifd)."""

    name = "plain"
    batch_pages = MAX_BATCH_PAGES
    """32 MiB at a time: a batch's Python (the engine's accounting, encoding, setting up the
    gather write, a multifd channel's hand-over) an eighth as often as with 4 MiB. Ad hoc, not
    saved: one channel in-process, 4096 pages against 1024: 3.97 against 3.63 GB/s (medians of
    8 runs each, alternated); 8192 against 4096: 2.96 against 2.86 GB/s (6 each, a noisy
    hour); two channels' source, user time per GiB: 0.00-0.02 s against 0.05-0.08 s with
    1024-page batches."""

    def __init__(self, pages: PageSink) -> None:
        self._pages = pages

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self._pages.pages(block, indices)

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self._pages.zeros(block, indices)


class PlainIncoming(IncomingBackend):
    """Pages land through the engine; a confidential record is an error (the default)."""

    name = "plain"
