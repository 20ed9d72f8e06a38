"""The crypto floor times the MH's four cryptographic steps and nothing else."""

from __future__ import annotations

import pytest

from confmig.bench import crypto_floor
from confmig.common.units import MiB


def test_each_step_is_timed_and_the_total_is_their_sum() -> None:
    floor = crypto_floor.measure(total=2 * MiB, reps=1)
    assert set(floor) == {*crypto_floor.STEPS, "total"}
    assert all(floor[step] > 0 for step in crypto_floor.STEPS)
    assert floor["total"] == pytest.approx(sum(floor[step] for step in crypto_floor.STEPS), abs=1e-3)
