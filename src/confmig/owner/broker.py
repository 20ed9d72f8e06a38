"""The key broker, sans-IO: launch sessions in, secrets out, when and only when the launch is as expected.

:class:`KeyBroker` implements the two calls of the key-broker protocol
(:mod:`confmig.proto.keybroker`) as plain methods; :mod:`.service` puts HTTP
around it. For each ``launch`` it verifies the platform up to the trusted AMD
root, checks the policy against the VM's profile and keeps a new :class:`~.session.OwnerSession`
with fresh transport keys; for each ``measurement`` it checks LAUNCH_MEASURE's
output under that session's TIK and, if it matches, seals the VM's secret
table for LAUNCH_SECRET (a migration target's: a fresh ticket and its key,
:meth:`~.profile.VmProfile.target_secret_table`, so each ticket's key is released
once). Each session releases at most once, and dies after its time to live or
its first refusal.

Time and randomness are injected; every verdict goes to the ``audit`` callback
(VM, session, platform fingerprint, verdict; never a key).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from confmig.common.clock import Clock, MonotonicClock
from confmig.owner.arbiter import Arbiter
from confmig.owner.errors import (
    BrokerBusy,
    DecisionRefused,
    MeasurementRejected,
    PlatformRejected,
    PolicyRejected,
    SessionClosed,
    SessionError,
    SessionExpired,
    UnknownVm,
)
from confmig.owner.measurement import check_measurement
from confmig.owner.profile import ANY_VM, TICKET_SIZE, VmProfile
from confmig.owner.session import OwnerSession, SessionEvent, SessionState
from confmig.owner.trust import AmdRoot, verify_platform
from confmig.platform.psp.packet import IV_SIZE, seal_launch_secret
from confmig.platform.psp.session import create_launch_session
from confmig.platform.psp.version import FirmwareVersion
from confmig.proto.keybroker import (
    SESSION_ID_RE,
    DecisionRequest,
    DecisionResponse,
    LaunchRequest,
    LaunchResponse,
    MeasurementRequest,
    SecretResponse,
)

log = logging.getLogger("confmig.owner")

SESSION_TTL: Final = 300.0
"""Seconds from handing out a session to receiving its measurement. In between the
host only imports and measures the firmware (seconds); a stale session is refused."""
MAX_SESSIONS: Final = 1024
"""Sessions remembered at once, open or recently closed (each is a few hundred bytes):
bounds what an unauthenticated caller can make the broker keep."""
_SESSION_ID_SIZE: Final = 16

Rng = Callable[[int], bytes]
Audit = Callable[[Mapping[str, object]], None]


def _no_audit(_record: Mapping[str, object]) -> None:
    return None


def platform_fingerprint(pdh: bytes) -> str:
    """A short name for a platform in logs: the start of SHA-256 of its PDH certificate."""
    return hashlib.sha256(pdh).hexdigest()[:16]


class KeyBroker:
    """The guest owner's key broker for a set of VM profiles (``"*"``: any other VM)."""

    def __init__(
        self,
        root: AmdRoot,
        profiles: Mapping[str, VmProfile],
        *,
        clock: Clock | None = None,
        rng: Rng = os.urandom,
        ttl: float = SESSION_TTL,
        max_sessions: int = MAX_SESSIONS,
        audit: Audit | None = None,
    ) -> None:
        if ttl <= 0 or max_sessions <= 0:
            raise ValueError("the session time to live and the session limit must be positive")
        self.root = root
        self.profiles = MappingProxyType(dict(profiles))
        self._clock = clock or MonotonicClock()
        self._rng = rng
        self._ttl = ttl
        self._max_sessions = max_sessions
        self._audit = audit or _no_audit
        self._sessions: dict[str, OwnerSession] = {}
        self._lock = threading.Lock()
        self.arbiter = Arbiter()
        """Every ticket released, and the one decision each gets (:mod:`.arbiter`)."""

    def profile(self, vm: str) -> VmProfile:
        profile = self.profiles.get(vm) or self.profiles.get(ANY_VM)
        if profile is None:
            raise UnknownVm(f"no VM '{vm}' is configured with this guest owner")
        return profile

    # --- POST /v1/launch -------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> LaunchResponse:
        """Verify the platform, then a new session for LAUNCH_START on it."""
        profile = self.profile(request.vm)
        platform = platform_fingerprint(request.pdh)
        try:
            if request.policy != profile.policy:
                raise PolicyRejected(
                    f"VM '{request.vm}': policy {request.policy:#x} is not the configured policy "
                    f"{profile.policy:#x}"
                )
            if request.migration_target and not profile.migratable:
                raise PolicyRejected(f"VM '{request.vm}' has no migration transport key: it does not "
                                     "migrate, so no migration target is launched for it")
            certs = verify_platform(self.root, pdh=request.pdh, cert_chain=request.cert_chain)
        except (PolicyRejected, PlatformRejected) as exc:
            self._record("launch-refused", vm=request.vm, platform=platform, reason=str(exc))
            raise
        launch = create_launch_session(certs.pdh, policy=profile.policy, rng=self._rng)
        with self._lock:
            now = self._clock.monotonic()
            self._expire_locked(now)
            if len(self._sessions) >= self._max_sessions:
                raise BrokerBusy(f"too many launch sessions ({self._max_sessions}); retry later")
            session_id = self._rng(_SESSION_ID_SIZE).hex()
            while session_id in self._sessions:  # only with an injected, repeating rng
                session_id = os.urandom(_SESSION_ID_SIZE).hex()
            self._sessions[session_id] = OwnerSession(
                session_id=session_id,
                vm=request.vm,
                platform=platform,
                profile=profile,
                launch=launch,
                deadline=now + self._ttl,
                migration_target=request.migration_target,
            )
        self._record("launch", vm=request.vm, session=session_id, platform=platform,
                     role="migration-target" if request.migration_target else "guest")
        return LaunchResponse(session_id=session_id, godh=launch.dh_cert, session=launch.session)

    # --- POST /v1/launch/<id>/measurement ------------------------------------------------

    def measurement(self, session_id: str, request: MeasurementRequest) -> SecretResponse:
        """The secret packet if the measurement is the expected one; the session closes either way."""
        firmware = FirmwareVersion(
            api_major=request.api_major, api_minor=request.api_minor, build=request.build
        )
        # One session, one verdict: the check and the state change happen under the lock.
        with self._lock:
            session = self._open_session_locked(session_id)
            try:
                measurement = check_measurement(
                    session.keys, request.measurement, firmware=firmware, expected=session.profile.expected
                )
            except (MeasurementRejected, PolicyRejected) as exc:
                session.close(SessionEvent.REFUSE)
                refused: Exception | None = exc
            else:
                refused = None
                ticket = self._rng(TICKET_SIZE) if session.migration_target else b""
                table = (session.profile.target_secret_table(ticket) if ticket
                         else session.profile.secret_table())
                if ticket:
                    self.arbiter.issued(ticket, session.profile.ticket_key(ticket))
                header, trans = seal_launch_secret(
                    session.keys, table, measurement=measurement.measure, iv=self._rng(IV_SIZE)
                )
                session.close(SessionEvent.RELEASE)
        if refused is not None:
            self._record(
                "refused", vm=session.vm, session=session_id, platform=session.platform, reason=str(refused)
            )
            raise refused
        # A ticket is no secret (the target publishes it); its key is released here, once.
        self._record("released", vm=session.vm, session=session_id, platform=session.platform,
                     **({"ticket": ticket.hex()} if ticket else {}))
        return SecretResponse(secret_header=header.to_bytes(), secret=trans, guest_len=len(trans))

    # --- POST /v1/migration/decision -------------------------------------------------------

    def decide(self, request: DecisionRequest) -> DecisionResponse:
        """Commit or abort the migration to ``request.ticket``'s target: the first request decides."""
        try:
            decision, made = self.arbiter.decide(request)
        except DecisionRefused as exc:
            self._record("decision-refused", ticket=request.ticket.hex(), asked=request.outcome,
                         reason=str(exc))
            raise
        self._record("decision" if made else "decision-repeated", ticket=request.ticket.hex(),
                     outcome=decision.outcome, migration=request.migration_id.hex())
        return decision

    def _open_session_locked(self, session_id: str) -> OwnerSession:
        now = self._clock.monotonic()
        self._expire_locked(now)
        session = self._sessions.get(session_id) if SESSION_ID_RE.fullmatch(session_id) else None
        if session is None:
            raise SessionError(f"no launch session '{session_id}'")
        if session.state is SessionState.EXPIRED:
            raise SessionExpired(f"launch session '{session_id}' expired; start a new launch")
        if session.state is SessionState.RELEASED:
            raise SessionClosed(f"launch session '{session_id}' already released its secret")
        if session.state is SessionState.REFUSED:
            raise SessionClosed(f"launch session '{session_id}' was refused; start a new launch")
        return session

    def _expire_locked(self, now: float) -> None:
        """Open sessions past their deadline expire; closed ones are forgotten one TTL later."""
        for session_id, session in list(self._sessions.items()):
            if session.state is SessionState.AWAITING_MEASUREMENT and now >= session.deadline:
                session.close(SessionEvent.EXPIRE)
                log.info("launch session %s of VM %s expired", session_id, session.vm)
            if session.state is not SessionState.AWAITING_MEASUREMENT and now >= session.deadline + self._ttl:
                del self._sessions[session_id]

    def session_state(self, session_id: str) -> SessionState | None:
        """For tests and diagnostics."""
        with self._lock:
            self._expire_locked(self._clock.monotonic())
            session = self._sessions.get(session_id)
            return session.state if session is not None else None

    def _record(self, event: str, **fields: str) -> None:
        record = {"event": event, **fields}
        log.info("%s", " ".join(f"{k}={v}" for k, v in record.items()))
        self._audit(record)
