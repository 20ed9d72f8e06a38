"""One launch as the owner follows it: from the session it gave the host to the secret it released.

::

    AWAITING_MEASUREMENT --release--> RELEASED   (the secret went out, once)
                         --refuse---> REFUSED    (wrong measurement or policy: no second try)
                         --expire---> EXPIRED    (no measurement within the time to live)

Every transition out of AWAITING_MEASUREMENT drops the transport keys: a
closed session can neither check another measurement nor seal another packet.
A refused session stays refused, so that a host cannot use the owner as an
oracle, trying measurement after measurement under one TIK.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from confmig.common.errors import StateError
from confmig.owner.profile import VmProfile
from confmig.platform.psp.secret import Secret
from confmig.platform.psp.session import LaunchSession, TransportKeys


class SessionState(Enum):
    AWAITING_MEASUREMENT = "awaiting-measurement"
    RELEASED = "released"
    REFUSED = "refused"
    EXPIRED = "expired"


class SessionEvent(Enum):
    RELEASE = "release"
    REFUSE = "refuse"
    EXPIRE = "expire"


TRANSITIONS: Final[dict[tuple[SessionState, SessionEvent], SessionState]] = {
    (SessionState.AWAITING_MEASUREMENT, SessionEvent.RELEASE): SessionState.RELEASED,
    (SessionState.AWAITING_MEASUREMENT, SessionEvent.REFUSE): SessionState.REFUSED,
    (SessionState.AWAITING_MEASUREMENT, SessionEvent.EXPIRE): SessionState.EXPIRED,
}


def next_state(state: SessionState, event: SessionEvent) -> SessionState:
    new = TRANSITIONS.get((state, event))
    if new is None:
        required = SessionState.AWAITING_MEASUREMENT.value
        raise StateError(f"launch session {event.value}", state.value, required)
    return new


class OwnerSession(Secret):
    """A launch session: its VM, profile, deadline, state and (while open) its transport keys."""

    __slots__ = ("_launch", "deadline", "migration_target", "platform", "profile", "session_id", "state",
                 "vm")

    def __init__(
        self,
        *,
        session_id: str,
        vm: str,
        platform: str,
        profile: VmProfile,
        launch: LaunchSession,
        deadline: float,
        migration_target: bool = False,
    ) -> None:
        self.session_id = session_id
        self.migration_target = migration_target
        """The VMM launches a migration target: it gets a ticket and its key, nothing else."""
        self.vm = vm
        self.platform = platform
        """A fingerprint of the platform's PDH, for logs."""
        self.profile = profile
        self.deadline = deadline
        self.state = SessionState.AWAITING_MEASUREMENT
        self._launch: LaunchSession | None = launch

    @property
    def keys(self) -> TransportKeys:
        if self._launch is None:
            raise StateError("launch session keys", self.state.value, SessionState.AWAITING_MEASUREMENT.value)
        return self._launch.keys

    def close(self, event: SessionEvent) -> None:
        self.state = next_state(self.state, event)
        self._launch = None
