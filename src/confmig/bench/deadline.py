"""The overall time budget of a lab scenario (the demo, a launch, a benchmark run).

Every wait of a scenario polls through :meth:`Deadline.wait`, bounded twice: by its
own step's bound (a host starts in seconds, a migration in minutes) and by what is
left of the whole budget. A step that outlives either is an error naming the step,
never a hang.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

from confmig.common.clock import Clock, MonotonicClock
from confmig.common.errors import ConfmigError

T = TypeVar("T")

POLL_INTERVAL = 0.05
"""How often a wait looks again: quick enough for a demo, idle enough for a 2-core machine."""
DEMO_TIMEOUT = 300.0
"""Seconds for ``confmig demo``: it takes seconds, a 1 GiB SEV guest through the PSP a minute."""
LAUNCH_TIMEOUT = 120.0
"""Seconds for ``confmig launch``: one host, one VM, one attestation."""
BENCH_TIMEOUT = 3600.0
"""Seconds for ``confmig bench``: a full run migrates 4 GiB guests and a 1 GiB SEV guest."""


class StepTimeout(ConfmigError):
    """One step of a scenario did not finish within its own bound."""


class DeadlineExceeded(ConfmigError):
    """The scenario as a whole ran out of time."""


class Deadline:
    """Ends ``seconds`` after it is made (never, with None); ``option`` is what the user
    changes to give a scenario more time, and is named in the error."""

    def __init__(self, seconds: float | None, *, option: str = "--timeout", clock: Clock | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock = clock or MonotonicClock()
        self._sleep = sleep
        self.seconds = seconds
        self.option = option
        self._end = math.inf if seconds is None else self._clock.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - self._clock.monotonic())

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineExceeded` if the budget is spent (``what``: the step at hand)."""
        if self._clock.monotonic() >= self._end:
            raise DeadlineExceeded(f"{what}: not done when the overall deadline of {self.seconds:g} s "
                                   f"passed (give more with {self.option})")

    def wait(self, what: str, ready: Callable[[], T | None], *, timeout: float,
             interval: float = POLL_INTERVAL) -> T:
        """Poll ``ready`` until it returns something other than None, and return that.
        ``ready`` raises to end the wait early (a process that exited, a guest that halted)."""
        step_end = self._clock.monotonic() + timeout
        while True:
            result = ready()
            if result is not None:
                return result
            self.check(f"waiting for {what}")
            if self._clock.monotonic() >= step_end:
                raise StepTimeout(f"waiting for {what}: nothing after {timeout:g} s")
            self._sleep(min(interval, self.remaining()))


NO_DEADLINE = Deadline(None)
"""For labs whose caller bounds them otherwise (tests run under pytest's timeout)."""
