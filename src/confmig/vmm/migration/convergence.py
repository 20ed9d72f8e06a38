"""When to stop the guest and send the rest: QEMU's switch-over rule.

Passed into the precopy loop as a function (Cloud Hypervisor's design), so tests
and researchers can swap the policy without touching the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundResult:
    remaining_bytes: int
    """Dirty bytes left after the last dirty-log sync."""
    bandwidth: float
    """Bytes per second measured over the last round."""
    downtime_limit_ms: int
    switchover_bandwidth: int = 0
    """``avail-switchover-bandwidth``; 0 = trust the measurement."""


ConvergencePolicy = Callable[[RoundResult], bool]


def downtime_limit_policy(r: RoundResult) -> bool:
    """Switch over when the rest fits in ``downtime-limit`` at the expected rate
    (``threshold_size = bandwidth × downtime_limit`` in QEMU's migration.c)."""
    bandwidth = r.switchover_bandwidth or r.bandwidth
    return r.remaining_bytes <= bandwidth * r.downtime_limit_ms / 1000


def expected_downtime_ms(remaining_bytes: int, bandwidth: float) -> int:
    return int(remaining_bytes / bandwidth * 1000) if bandwidth > 0 else 0
