"""Every state machine: each transition QEMU allows is allowed, every other refused."""

from __future__ import annotations

import itertools

import pytest

from confmig.common.errors import StateError
from confmig.vmm.migration import status as ms
from confmig.vmm.runstate import TRANSITIONS, RunState, check_transition


@pytest.mark.parametrize("a, b", list(itertools.product(RunState, RunState)))
def test_runstate_table(a: RunState, b: RunState) -> None:
    if a == b or b in TRANSITIONS[a]:
        check_transition(a, b)
    else:
        with pytest.raises(StateError, match=str(a)):
            check_transition(a, b)


def test_runstate_names_are_qemus() -> None:
    assert {s.value for s in RunState} >= {
        "prelaunch", "running", "paused", "inmigrate", "finish-migrate", "postmigrate", "shutdown"}


@pytest.mark.parametrize("a, b", list(itertools.product(ms.MigrationStatus, ms.MigrationStatus)))
def test_migration_status_table(a: ms.MigrationStatus, b: ms.MigrationStatus) -> None:
    if b in ms.TRANSITIONS[a]:
        ms.check_transition(a, b)
    else:
        with pytest.raises(StateError):
            ms.check_transition(a, b)


def test_a_migration_path_and_its_endings() -> None:
    s = ms.MigrationStatus
    path = [s.NONE, s.SETUP, s.ACTIVE, s.DEVICE, s.COMPLETED, s.SETUP, s.ACTIVE, s.CANCELLING,
            s.CANCELLED]
    for a, b in itertools.pairwise(path):
        ms.check_transition(a, b)
    assert s.COMPLETED.finished and not s.ACTIVE.finished and s.CANCELLING.in_progress
