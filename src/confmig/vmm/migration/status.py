"""Migration status, with QEMU's names (``MigrationStatus``) and its transitions."""

from __future__ import annotations

import enum

from confmig.common.errors import StateError


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)

    @property
    def in_progress(self) -> bool:
        return self in (MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE,
                        MigrationStatus.CANCELLING)


_S = MigrationStatus
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.NONE: frozenset({_S.SETUP}),
    _S.SETUP: frozenset({_S.ACTIVE, _S.FAILED, _S.CANCELLING}),
    _S.ACTIVE: frozenset({_S.DEVICE, _S.COMPLETED, _S.FAILED, _S.CANCELLING}),
    _S.DEVICE: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLING}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.FAILED}),
    _S.COMPLETED: frozenset({_S.SETUP}),
    _S.FAILED: frozenset({_S.SETUP}),
    _S.CANCELLED: frozenset({_S.SETUP}),
}
"""A finished migration may be followed by a new one (back to ``setup``)."""


def check_transition(current: MigrationStatus, new: MigrationStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise StateError(f"migration status change to {new}", current,
                         sorted(str(s) for s in TRANSITIONS[current]))
