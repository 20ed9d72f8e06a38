"""What the hostile-input tests (``tests/fuzz``) share: their budget, and what they count of
a serving process.

Budget. Each property test names a short budget (examples per test) that ``make test`` runs,
derandomized, so that a failure there is reproducible and the run is quick. ``make fuzz``
sets ``CONFMIG_FUZZ=1``: every budget grows :data:`LONG_FACTOR` times
(``CONFMIG_FUZZ_FACTOR`` to change it) and examples are random, remembered in hypothesis's
database when one fails.

Counting. A serving process keeps serving and leaks nothing: :func:`open_fds` and
:func:`rss` read ``/proc/<pid>``; :func:`settled` waits for a count to come back down
(a server closes a connection a moment after the client did).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Final

from hypothesis import HealthCheck, settings

FUZZ: Final = os.environ.get("CONFMIG_FUZZ", "") not in ("", "0")
LONG_FACTOR: Final = int(os.environ.get("CONFMIG_FUZZ_FACTOR", "50"))


def budget(examples: int) -> settings:
    """Hypothesis settings for a hostile-input property: ``examples`` in ``make test``,
    :data:`LONG_FACTOR` times as many in ``make fuzz``."""
    return settings(
        max_examples=examples * LONG_FACTOR if FUZZ else examples,
        deadline=None,
        derandomize=not FUZZ,
        database=None if not FUZZ else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


def rounds(short: int) -> int:
    """How many hostile sessions a live-process test sends."""
    return short * LONG_FACTOR // 5 if FUZZ else short


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    """Resident set size in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def settled(probe: Callable[[], int], at_most: int, timeout: float = 10.0) -> int:
    """``probe()`` once it is at most ``at_most`` (or its last value after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (value := probe()) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
