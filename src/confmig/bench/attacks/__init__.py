"""A hostile host against a migration: the attack harness (``confmig attacks``).

``records``: the page records of each backend as a host sees them; ``edits``: what an attack
does to them; ``proxy``: the record-aware man in the middle (sans-IO core and socket loop);
``catalog``: which attacks run against which backend, and what the design says must come of
each; ``harness``: every case against live VMMs, and the saved table.
"""

from confmig.bench.attacks.edits import (
    FINAL,
    FIRST_ROUND,
    LAST,
    Attack,
    Cut,
    CutShort,
    Drop,
    Duplicate,
    Edit,
    Flip,
    Inject,
    Reorder,
    Replay,
    StaleReplay,
    Swap,
    Truncate,
)
from confmig.bench.attacks.proxy import ProxyServer, StreamProxy, Tally
from confmig.bench.attacks.records import Kind, PageRecord, Part, RecordId

__all__ = [
    "FINAL",
    "FIRST_ROUND",
    "LAST",
    "Attack",
    "Cut",
    "CutShort",
    "Drop",
    "Duplicate",
    "Edit",
    "Flip",
    "Inject",
    "Kind",
    "PageRecord",
    "Part",
    "ProxyServer",
    "RecordId",
    "Reorder",
    "Replay",
    "StaleReplay",
    "StreamProxy",
    "Swap",
    "Tally",
    "Truncate",
]
