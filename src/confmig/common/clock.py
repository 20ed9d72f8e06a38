"""Injectable time, so that policies (convergence, rate limits) are testable."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""
        ...


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock for tests: advances only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
