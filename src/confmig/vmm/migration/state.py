"""``MigrationState``: the VMM's one migration object (QEMU's ``current_migration``).

Holds the capabilities and parameters, the status, the counters and the
running outgoing or incoming migration; the QMP commands call into it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from confmig.common.errors import MigrationError, StateError
from confmig.vmm.machine import Machine
from confmig.vmm.migration import backends
from confmig.vmm.migration.convergence import ConvergencePolicy, downtime_limit_policy
from confmig.vmm.migration.incoming import IncomingMigration
from confmig.vmm.migration.outgoing import OutgoingMigration
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.status import MigrationStatus, check_transition
from confmig.vmm.migration.transport import parse_uri
from confmig.vmm.migration.vmstate import MachineVm
from confmig.vmm.runstate import RunState

EventSink = Callable[[str, "dict[str, object] | None"], None]


class MigrationState:
    def __init__(self, machine: Machine, events: EventSink,
                 policy: ConvergencePolicy = downtime_limit_policy) -> None:
        """``machine.migration_blockers()`` says what forbids migration right now
        (QEMU's migration blockers, reported as ``blocked-reasons``)."""
        self.machine = machine
        self._events = events
        self.policy = policy
        self.params = MigrationParameters()
        self.status = MigrationStatus.NONE
        self.stats = MigrationStats()
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self._lock = threading.Lock()


    # --- status ----------------------------------------------------------------

    def set_status(self, new: MigrationStatus) -> None:
        with self._lock:
            check_transition(self.status, new)
            self.status = new
        if "events" in self.params.capabilities:
            self._events("MIGRATION", {"status": new.value})

    def _pass_event(self, n: int) -> None:
        if "events" in self.params.capabilities:
            self._events("MIGRATION_PASS", {"pass": n})

    def _busy(self) -> bool:
        return self.status.in_progress

    # --- commands ----------------------------------------------------------------

    def set_parameters(self, args: dict[str, object]) -> None:
        self.params = self.params.with_parameters(args)
        if self.outgoing is not None and self.status.in_progress:
            self.outgoing.update_parameters(self.params)

    def set_capabilities(self, caps: list[tuple[str, bool]]) -> None:
        if self._busy():
            raise MigrationError("There's a migration process in progress")
        self.params = self.params.with_capabilities(caps)

    def migrate(self, uri: str, *, cpr_uri: str | None = None) -> None:
        """``migrate``: ``uri`` is the main channel; ``cpr_uri`` the ``cpr`` channel of
        ``mode=cpr-transfer`` (a unix socket)."""
        with self._lock:
            if self._busy():
                raise MigrationError("There's a migration process in progress")
            # As QEMU's blockers per mode: a guest that never enabled live migration can still
            # be handed to a new VMM on this host (nothing of it is read or re-encrypted).
            blockers = self.machine.migration_blockers() if self.params.mode == "normal" else []
            if blockers:
                raise MigrationError("; ".join(blockers))
            state = self.machine.runstate
            if state in (RunState.INMIGRATE, RunState.PRELAUNCH):
                raise StateError("migrate", state, "a VM that has started")
            if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR, RunState.POSTMIGRATE):
                raise StateError("migrate", state, "a VM that can still run")
            parsed = parse_uri(uri)
            params, machine = self.params, self.machine
            backends.check(machine, params)
            connect, backend_for = backends.outgoing(machine, params,
                                                     parse_uri(cpr_uri) if cpr_uri is not None else None)
            self.stats = MigrationStats()
        mig = OutgoingMigration(
            MachineVm(machine), parsed, params, self.stats, self.set_status, backend_for,
            policy=self.policy, pass_event=self._pass_event, connect=connect,
        )
        self.outgoing, self.incoming = mig, None
        mig.start()

    def start_migration_handler(self) -> None:
        """``start-migration-handler`` (the 2021 RFC's): the MH vCPUs at the MH's entry point."""
        if self.machine.mh is None:
            raise MigrationError("This guest has no Migration Handler vCPUs (-smp N,mirrorvcpus=M)")
        self.machine.mh.start()

    def migrate_incoming(self, uri: str) -> str:
        """Start listening; return the bound address (for ``tcp:...:0``). A Migration Handler
        target (``-fw_cfg name=opt/ovmf/PcdSevIsMigrationTarget,string=1``) runs its firmware
        until now: its MH is started and its vCPUs stopped in ``inmigrate`` first (the RFC's
        ``start-migration-handler`` and ``start-migrate-incoming``, done by either command)."""
        m = self.machine
        if (m.config.mh_target and m.mh is not None and not self._busy()
                and m.runstate in (RunState.RUNNING, RunState.PAUSED)):
            m.mh.start()
            m.stop(RunState.INMIGRATE)
        with self._lock:
            if self.machine.runstate != RunState.INMIGRATE:
                raise StateError("migrate-incoming", self.machine.runstate,
                                 "'-incoming' was specified on the command line")
            if self._busy() or (self.incoming is not None and not self.status.finished):
                raise MigrationError("The incoming migration has already been started")
            backend = backends.incoming_backend(self.machine, self.params)
            self.stats = MigrationStats()
            mig = IncomingMigration(MachineVm(self.machine), parse_uri(uri), self.params, self.stats,
                                    self.set_status, backend)
        self.incoming, self.outgoing = mig, None
        mig.start()
        return mig.address

    def cancel(self) -> None:
        """``migrate_cancel``: the source keeps running; the target discards."""
        mig = self.outgoing
        if mig is not None and self.status.in_progress:
            mig.request_cancel()

    @property
    def error(self) -> str | None:
        mig = self.outgoing or self.incoming
        return mig.error if mig is not None else None

    def query(self) -> dict[str, object]:
        """``query-migrate``, field for field as QEMU fills ``MigrationInfo``."""
        st = self.status
        info: dict[str, object] = {}
        if st != MigrationStatus.NONE:
            info["status"] = st.value
        blockers = self.machine.migration_blockers()
        if blockers:
            info["blocked-reasons"] = blockers
        s = self.stats
        if self.outgoing is not None and st in (MigrationStatus.ACTIVE, MigrationStatus.DEVICE,
                                                 MigrationStatus.CANCELLING):
            info.update({"total-time": s.elapsed_ms(), "expected-downtime": s.expected_downtime_ms,
                         "setup-time": s.setup_time_ms, "ram": s.ram()})
        elif self.outgoing is not None and st == MigrationStatus.COMPLETED:
            info.update({"total-time": s.total_time_ms, "downtime": s.downtime_ms,
                         "setup-time": s.setup_time_ms, "ram": s.ram()})
            info["x-confmig"] = {"rounds": s.rounds, "downtime-breakdown-ms": {
                k: round(v, 3) for k, v in s.downtime_breakdown.items()}}
            if s.confidential is not None:
                info["x-confmig"]["confidential"] = s.confidential.qmp()  # type: ignore[index]
        elif self.incoming is not None and st != MigrationStatus.NONE:
            info["ram"] = s.ram()
        if st == MigrationStatus.FAILED and self.error:
            info["error-desc"] = self.error
        return info
