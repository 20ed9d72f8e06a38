"""The VM run state, with QEMU's names and its transition table (``RunState`` in
``qapi/run-state.json``, transitions after ``runstate_transitions_def``)."""

from __future__ import annotations

import enum

from confmig.common.errors import StateError


class RunState(enum.Enum):
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"

    def __str__(self) -> str:
        return self.value


_R = RunState
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _R.PRELAUNCH: frozenset({_R.RUNNING, _R.INMIGRATE, _R.FINISH_MIGRATE, _R.PAUSED}),
    _R.INMIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.PRELAUNCH, _R.SHUTDOWN, _R.INTERNAL_ERROR}),
    _R.RUNNING: frozenset({
        _R.PAUSED, _R.FINISH_MIGRATE, _R.SHUTDOWN, _R.INTERNAL_ERROR, _R.POSTMIGRATE, _R.INMIGRATE,
    }),
    _R.PAUSED: frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.POSTMIGRATE, _R.SHUTDOWN, _R.INMIGRATE}),
    _R.FINISH_MIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.POSTMIGRATE, _R.SHUTDOWN}),
    _R.POSTMIGRATE: frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.PAUSED}),
    _R.SHUTDOWN: frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.PRELAUNCH}),
    _R.INTERNAL_ERROR: frozenset({_R.PAUSED, _R.RUNNING, _R.FINISH_MIGRATE, _R.PRELAUNCH}),
}
"""``TRANSITIONS[a]`` holds every state QEMU allows after ``a``, and running/paused to
``inmigrate``: a Migration Handler target runs its firmware until it accepts the stream (the
2021 RFC stops a running target in ``inmigrate`` the same way)."""

RUNNING_STATES = frozenset({RunState.RUNNING})


def check_transition(current: RunState, new: RunState) -> None:
    if new != current and new not in TRANSITIONS[current]:
        raise StateError(f"run state change to {new}", current, sorted(str(s) for s in TRANSITIONS[current]))
