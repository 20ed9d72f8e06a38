"""The overall deadline of a scenario: every wait ends, by its own bound or the budget's,
and the error says which and what to change."""

from __future__ import annotations

import pytest

from confmig.bench.deadline import Deadline, DeadlineExceeded, StepTimeout
from confmig.common.clock import ManualClock


def deadline(seconds: float | None, clock: ManualClock) -> Deadline:
    return Deadline(seconds, option="--timeout", clock=clock, sleep=clock.advance)


def test_a_wait_returns_what_became_ready() -> None:
    clock = ManualClock()
    answers = iter([None, None, "up"])
    assert deadline(10, clock).wait("the host", lambda: next(answers), timeout=5) == "up"
    assert clock.now == pytest.approx(0.1)


def test_a_step_past_its_own_bound_is_a_step_timeout() -> None:
    clock = ManualClock()
    with pytest.raises(StepTimeout, match=r"waiting for the host: nothing after 2 s"):
        deadline(None, clock).wait("the host", lambda: None, timeout=2)
    assert 2 <= clock.now < 2.1


def test_a_step_past_the_overall_deadline_names_the_option() -> None:
    clock = ManualClock()
    budget = deadline(3, clock)
    clock.advance(2.5)
    with pytest.raises(DeadlineExceeded, match=r"waiting for the migration.*deadline of 3 s.*--timeout"):
        budget.wait("the migration", lambda: None, timeout=600)
    assert clock.now == pytest.approx(3)  # the last sleep is cut to what was left


def test_an_error_raised_by_the_condition_ends_the_wait_at_once() -> None:
    clock = ManualClock()

    def exited() -> None:
        raise RuntimeError("vm exited")

    with pytest.raises(RuntimeError, match="vm exited"):
        deadline(10, clock).wait("the vm", exited, timeout=5)
    assert clock.now == 0
