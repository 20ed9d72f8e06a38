"""The fault matrix (issue 13, section 1): every fault at every phase, for every backend.

For each migration backend, each fault is injected at each phase of a migration
of a guest whose ``kv`` workload serves a client that writes all along and
remembers every acknowledged write. After each: how many copies of the guest run
(exactly one, except where the VMM that ran the guest was killed), which one,
whether every acknowledged write is there, and whether the source, when it runs,
can migrate again.

How a fault meets its phase: the migration's main channel goes through a
:class:`~confmig.bench.link.Link` that decodes the stream and holds it where it
reaches the phase (in the target's terms: the opening, inside the first or a later
precopy round, the first device-state section), or holds the target's verdict
while the target already loaded (after the device state); the fault is injected
while the link holds. Precopy rounds last as long as a cell needs them to
(``downtime-limit`` 0: the guest always has dirty pages) and the migration is let
converge once the fault is in. A ``file:`` migration has no link: its phases are
read from the source's ``query-migrate``.

A new backend joins :data:`BACKENDS` with one line.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from confmig.bench.deadline import NO_DEADLINE, Deadline, DeadlineExceeded, StepTimeout
from confmig.bench.kv_client import KvClient, KvRequestError
from confmig.bench.lab import (
    WORKLOAD_STARTED,
    HostProc,
    Interrupted,
    Lab,
    VmProc,
    VmSpec,
    check_host_memory,
)
from confmig.bench.link import ROUND_DEPTH, Link, StreamPoint
from confmig.bench.local import begin_hand_over, hand_over
from confmig.bench.perf import machine_info
from confmig.bench.scenario import (
    MH_TARGET_READY,
    MigrationSettings,
    aim_source,
    configure,
    incoming_uri,
    mh_guest_args,
    sev_args,
)
from confmig.common.errors import ConfmigError
from confmig.common.units import MiB
from confmig.vmm.qmp.client import QmpCommandError

RAM = "64M"
"""Each guest's RAM: small, so that a cell takes seconds."""
LINK_RATE = 128 * MiB
"""Bytes/s the link carries each way (about a 1 Gbit/s network); the slow link: 1/100 of it."""
SLOW_FACTOR = 100
MAX_BANDWIDTH = 1 << 30
"""The VMMs' ``max-bandwidth``: above the link's, so that the link sets the pace."""
FILE_RATE = 32 * MiB
"""``max-bandwidth`` of a ``file:`` migration: its first round lasts long enough to be seen."""
DOWNTIME_MS = 300
"""``downtime-limit`` once a cell lets the migration converge (QEMU's default)."""
TMPFS_SIZE = 256 * MiB
"""The small file system a ``file:`` migration writes to, filled up at the phase."""
PHASE_TIMEOUT = 60.0
"""Seconds for a migration to reach the phase of its cell."""
SLOW_WINDOW = 5.0
"""Seconds a slow link is given before the management layer cancels, as libvirt's timeout would."""
STALL_WINDOW = 3.0
"""Seconds a stalled link stays stalled before the management layer cancels."""
CANCEL_GRACE = 10.0
"""Seconds ``migrate_cancel`` on a stalled link has to end the migration before the link heals."""
END_TIMEOUT = 90.0
"""Seconds for a migration to end after its fault (the source waits 60 s for a lost verdict)."""
SETTLE = 1.0
"""Seconds after the end before the copies are counted: a resumed guest is seen to run."""
AGAIN_TIMEOUT = 60.0
KV_WRITES_BEFORE = 50
"""Writes the source acknowledges before the migration starts."""
KV_KEYS = 300
REPLY_TIMEOUT = 2.0
"""Seconds the writer waits for a reply before it tries the other copy (a paused one never answers)."""
CONNECT_TIMEOUT = 0.3
"""Seconds the writer tries to reach one copy's kv socket (the source's exists from its start)."""
TERMINAL = frozenset({"completed", "failed", "cancelled"})
ATTEMPTS = 3
"""Runs of a cell whose source had left the phase when the fault went in."""


# --- the axes --------------------------------------------------------------------------------

class Phase(enum.Enum):
    SETUP = "setup"
    FIRST_ROUND = "first-round"
    LATER_ROUNDS = "later-rounds"
    SWITCHOVER = "switch-over"
    AFTER_DEVICE = "after-device"
    CONFIRMED = "confirmed"

    @property
    def title(self) -> str:
        return PHASE_TITLES[self]


PHASE_TITLES = {Phase.SETUP: "setup", Phase.FIRST_ROUND: "first round", Phase.LATER_ROUNDS: "later rounds",
                Phase.SWITCHOVER: "switch-over", Phase.AFTER_DEVICE: "after the device state",
                Phase.CONFIRMED: "after the target confirmed"}
HOLD_AT = {Phase.SETUP: StreamPoint.OPENING, Phase.FIRST_ROUND: StreamPoint.FIRST_ROUND,
           Phase.LATER_ROUNDS: StreamPoint.LATER_ROUND, Phase.SWITCHOVER: StreamPoint.DEVICE_STATE}
"""Where the link holds the stream for a phase (the other phases hold the verdict, or nothing)."""
ROUNDS = frozenset({Phase.SETUP, Phase.FIRST_ROUND, Phase.LATER_ROUNDS})
"""Phases whose cells keep the migration in precopy until the fault is in."""


class Fault(enum.Enum):
    CUT_BOTH = "cut-both"
    CUT_ONE = "cut-one"
    TARGET_VMM = "target-vmm"
    TARGET_HOST = "target-host"
    SOURCE_VMM = "source-vmm"
    CANCEL = "cancel"
    SLOW = "slow"
    STALL = "stall"
    DISK_FULL = "disk-full"

    @property
    def title(self) -> str:
        return FAULT_TITLES[self]


FAULT_TITLES = {
    Fault.CUT_BOTH: "connection cut, both ways",
    Fault.CUT_ONE: "connection cut, source to target only",
    Fault.TARGET_VMM: "target VMM killed",
    Fault.TARGET_HOST: "target host killed",
    Fault.SOURCE_VMM: "source VMM killed",
    Fault.CANCEL: "migrate_cancel",
    Fault.SLOW: f"slow link (1/{SLOW_FACTOR})",
    Fault.STALL: "stalled link",
    Fault.DISK_FULL: "full disk (file: URI)",
}
LINK_FAULTS = frozenset({Fault.CUT_BOTH, Fault.CUT_ONE, Fault.SLOW, Fault.STALL})


@dataclass(frozen=True, slots=True, kw_only=True)
class Guests:
    """The extra command lines of a backend's source and target."""

    source: tuple[str, ...] = ()
    target: tuple[str, ...] = ()
    target_incoming: str | None = "defer"
    target_ready: re.Pattern[bytes] | None = None
    """What the target's console shows once it can take the migration (an MH target's firmware)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    name: str
    guests: Callable[[Lab], Guests]
    settings: MigrationSettings = field(default_factory=MigrationSettings)
    intra_host: bool = False
    """cpr-transfer to a new VMM on the same host: no rounds, no second host, no file."""


def _sev(_lab: Lab) -> Guests:
    return Guests(source=tuple(sev_args()), target=tuple(sev_args()))


def _mh(lab: Lab) -> Guests:
    source, target = mh_guest_args(lab)
    return Guests(source=source, target=target, target_incoming=None, target_ready=MH_TARGET_READY)


BACKENDS: tuple[Backend, ...] = (
    Backend(name="plain", guests=lambda _lab: Guests()),
    Backend(name="psp", guests=_sev, settings=MigrationSettings(sev_target_certs=True)),
    Backend(name="mh", guests=_mh, settings=MigrationSettings(confidential_backend="mh")),
    Backend(name="local", guests=_sev, intra_host=True),
)


def backend_named(name: str) -> Backend:
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ConfmigError(f"no backend {name!r}: one of {', '.join(b.name for b in BACKENDS)}")


def not_applicable(backend: Backend, fault: Fault, phase: Phase) -> str | None:
    """Why a cell does not exist (None: it does)."""
    if backend.intra_host:
        if phase in (Phase.FIRST_ROUND, Phase.LATER_ROUNDS):
            return "no precopy rounds: guest RAM is handed over, not copied"
        if fault is Fault.TARGET_HOST:
            return "one host: the target's host is the source's"
        if fault is Fault.DISK_FULL:
            return "cpr-transfer writes no file"
    if fault is Fault.DISK_FULL and phase not in ROUNDS:
        return "a file: migration has no target to wait for"
    if fault is Fault.DISK_FULL and os.geteuid() != 0:
        return "needs root here (it mounts a small tmpfs to fill)"
    if fault in LINK_FAULTS and phase is Phase.CONFIRMED:
        return "the connection is closed once the target confirmed"
    return None


# --- the result of a cell ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    backend: str
    fault: str
    phase: str
    verdict: str
    """``ok``; ``held`` (the target's verdict was lost: the source kept the guest paused, since
    the target might run it; no copy ran until the operator's ``cont``, which the harness gives
    once it saw the target does not run it); ``lost`` (the VMM that ran the guest was killed:
    no copy may run, none does); ``FAIL`` (a must did not hold: ``reasons`` say which); ``n/a``;
    ``error`` (the harness)."""
    reasons: tuple[str, ...] = ()
    injected: dict[str, Any] = field(default_factory=dict)
    """Where the migration was when the fault went in: the source's status and dirty-sync
    count, the bytes the target had (the link's), the target's status."""
    source_end: str = ""
    target_end: str = ""
    """Each side's migration status at the end, and its run state (or how it died)."""
    copies: int = 0
    running: tuple[str, ...] = ()
    acked: int = 0
    lost: int | None = None
    """Acknowledged writes not found where the guest runs (None: no copy to ask)."""
    again: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    phase_missed: str = ""
    """Set when the source was no longer in the phase when the fault went in (the cell is
    then run again, up to ``ATTEMPTS`` times; the last one counts)."""

    @property
    def short(self) -> str:
        """The table's cell."""
        if self.verdict == "ok":
            return f"ok: {'+'.join(self.running)}"
        if self.verdict == "held":
            return "held: source, after cont"
        if self.verdict == "lost":
            return "lost (expected)"
        if self.verdict == "FAIL":
            return f"**FAIL**: {self.reasons[0] if self.reasons else '?'}"
        if self.verdict == "missed":
            return "phase missed"
        return self.verdict


# --- the writing client ----------------------------------------------------------------------------

class KvWriter:
    """Writes all along and follows the guest to whichever copy serves it; every acknowledged
    write is in ``client.acknowledged``. Values are ``value<n>`` with n increasing, so a copy
    that holds a newer value of a key than the acknowledged one holds a write whose reply was
    lost (that is not a lost write)."""

    def __init__(self, sockets: list[str]) -> None:
        self.sockets = sockets
        self.client = KvClient(sockets[0], reply_timeout=REPLY_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
        self.attempted = 0
        self.acks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-writer", daemon=True)

    def start(self, writes_before: int = KV_WRITES_BEFORE) -> None:
        self._thread.start()
        end = time.monotonic() + 30
        while self.acks < writes_before and time.monotonic() < end and not self.errors:
            time.sleep(0.01)
        if self.acks < writes_before:
            raise ConfmigError(f"the kv guest acknowledged {self.acks} writes in 30 s: {self.errors[-1:]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def _run(self) -> None:
        which = 0
        while not self._stop.is_set():
            i = self.attempted
            try:
                self.attempted += 1
                self.client.put(f"key{i % KV_KEYS}".encode(), f"value{i}".encode())
                self.acks += 1
            except KvRequestError:
                time.sleep(0.05)
            except (ConfmigError, OSError):  # that copy stopped answering: find the one that does
                while not self._stop.is_set():
                    which = (which + 1) % len(self.sockets)
                    try:
                        self.client.reconnect(self.sockets[which])
                        break
                    except (ConfmigError, OSError) as exc:
                        self.errors.append(str(exc))
                        del self.errors[:-5]
                        time.sleep(0.05)

    def lost_on(self, socket_path: str) -> int | None:
        """Acknowledged writes that the copy serving ``socket_path`` does not hold (None: it
        does not answer)."""
        try:
            reader = KvClient(socket_path, reply_timeout=5.0, connect_timeout=2.0)
        except OSError:
            return None
        lost = 0
        try:
            for key, value in list(self.client.acknowledged.items()):
                held = reader.get(key)
                if held != value and not _newer(held, value):
                    lost += 1
        except (ConfmigError, OSError):
            return None
        finally:
            reader.close()
        return lost


def _newer(held: bytes | None, acked: bytes | None) -> bool:
    if held is None or acked is None:
        return False
    return int(held.removeprefix(b"value")) > int(acked.removeprefix(b"value"))


# --- observing the VMs ------------------------------------------------------------------------------

def _alive(vm: VmProc) -> bool:
    return vm.proc.poll() is None


def _query(vm: VmProc, command: str) -> dict[str, Any]:
    if not _alive(vm):
        return {}
    try:
        reply: dict[str, Any] = vm.qmp.execute(command)
        return reply
    except (ConfmigError, OSError):
        return {}


def _migration_status(vm: VmProc) -> str:
    if not _alive(vm):
        return "killed"
    return str(_query(vm, "query-migrate").get("status", "no answer"))


def _runstate(vm: VmProc) -> str:
    if not _alive(vm):
        return "killed"
    return str(_query(vm, "query-status").get("status", "no answer"))


def _where(info: dict[str, Any]) -> str:
    """The source's phase as its ``query-migrate`` says it."""
    status = info.get("status", "?")
    if status != "active":
        return str(status)
    return f"round {info.get('ram', {}).get('dirty-sync-count', '?')}"


def _set(vm: VmProc, **params: Any) -> None:
    if _alive(vm):
        with contextlib.suppress(ConfmigError, OSError):
            vm.qmp.execute("migrate-set-parameters", **params)


def _cancel(vm: VmProc) -> str:
    if not _alive(vm):
        return "migrate_cancel: the source is gone"
    try:
        vm.qmp.execute("migrate_cancel")
        return ""
    except (ConfmigError, OSError) as exc:
        return f"migrate_cancel: {exc}"


def _wait(vm: VmProc, what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Whether ``ready`` came true within ``timeout``; the run's deadline (``vm``'s lab's) holds."""
    try:
        vm.deadline.wait(what, lambda: True if ready() else None, timeout=timeout, interval=interval)
    except StepTimeout:
        return False
    return True


def _stop_vms(vms: Iterable[VmProc]) -> None:
    vms = list(vms)
    for vm in vms:
        vm.qmp.close()
        if _alive(vm):
            vm.proc.terminate()
    for vm in vms:
        try:
            vm.proc.wait(5)
        except subprocess.TimeoutExpired:
            vm.proc.kill()
            vm.proc.wait()


class Disk:
    """A small tmpfs that a ``file:`` migration writes to; :meth:`fill` leaves it no space."""

    def __init__(self, path: Path, size: int = TMPFS_SIZE) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "confmig-faults", str(path)],
                       check=True, capture_output=True)

    def fill(self) -> None:
        st = os.statvfs(self.path)
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
            with contextlib.suppress(OSError):  # whatever fallocate left
                while os.write(fd, bytes(65536)):
                    pass
        finally:
            os.close(fd)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


# --- one cell ------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """A cell as it runs: its lab's processes and what it saw."""

    backend: Backend
    fault: Fault
    phase: Phase
    lab: Lab
    n: int
    src: VmProc | None = None
    dst: VmProc | None = None
    target_host: HostProc | None = None
    link: Link | None = None
    disk: Disk | None = None
    writer: KvWriter | None = None
    vms: list[VmProc] = field(default_factory=list)
    spec: VmSpec | None = None
    injected: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target_had_all: bool = False
    """The target had loaded the whole guest when the fault went in."""


class Matrix:
    """Runs cells in labs of its own (one per backend; a host that a cell killed is replaced)."""

    def __init__(self, *, deadline: Deadline = NO_DEADLINE,
                 progress: Callable[[CellResult], None] = lambda _r: None) -> None:
        self.deadline = deadline
        self.progress = progress
        self.results: list[CellResult] = []
        self._n = 0

    def run(self, backends: Iterable[Backend], faults: Iterable[Fault],
            phases: Iterable[Phase]) -> list[CellResult]:
        faults, phases = list(faults), list(phases)
        for backend in backends:
            with Lab(deadline=self.deadline) as lab:
                hosts = {"a": lab.host("hostA")}
                for fault in faults:
                    for phase in phases:
                        self.deadline.check(f"fault matrix cell {backend.name}/{fault.value}/{phase.value}")
                        why = not_applicable(backend, fault, phase)
                        if why is not None:
                            result = CellResult(backend=backend.name, fault=fault.value, phase=phase.value,
                                                verdict="n/a", notes=(why,))
                        else:
                            result = self._cell(lab, hosts, backend, fault, phase)
                        self.results.append(result)
                        self.progress(result)
        return self.results

    def _cell(self, lab: Lab, hosts: dict[str, HostProc], backend: Backend, fault: Fault,
              phase: Phase) -> CellResult:
        """The cell, again (new VMs) if the source had left the phase when the fault went in."""
        missed: list[str] = []
        for _ in range(ATTEMPTS):
            result = self._attempt(lab, hosts, backend, fault, phase)
            if not result.phase_missed:
                break
            missed.append(result.phase_missed)
        if missed:
            note = f"the source had left the phase {len(missed)} time(s): " + "; ".join(missed)
            result = replace(result, notes=(*result.notes, note))
            if result.phase_missed and fault is Fault.DISK_FULL:
                result = replace(result, verdict="missed", reasons=())  # it never bit: nothing to judge
        return result

    def _attempt(self, lab: Lab, hosts: dict[str, HostProc], backend: Backend, fault: Fault,
                 phase: Phase) -> CellResult:
        self._n += 1
        t0 = time.monotonic()
        cell = Cell(backend=backend, fault=fault, phase=phase, lab=lab, n=self._n)
        if not backend.intra_host and (hosts.get("b") is None or hosts["b"].proc.poll() is not None):
            # the first, or a new one for one a cell killed (a socket and identity of its own)
            restarts = sum(h.name.startswith("hostB") for h in lab.hosts)
            hosts["b"] = lab.host(f"hostB{restarts or ''}")
        try:
            if backend.intra_host:
                result = _run_local(cell, hosts["a"])
            else:
                result = _run_remote(cell, hosts["a"], hosts["b"])
            missed = phase_missed(backend, fault, phase, cell.injected)
            if fault is Fault.DISK_FULL and result.source_end.startswith("completed"):
                missed = "the file migration completed before the disk filled up"
            if missed is not None:
                result = replace(result, phase_missed=missed)
        except (Interrupted, DeadlineExceeded):
            raise
        except Exception as exc:  # one cell's harness error must not end the matrix
            result = _result(cell, verdict="error", reasons=(f"harness: {type(exc).__name__}: {exc}",))
        finally:
            if cell.writer is not None:
                cell.writer.stop()
            if cell.link is not None:
                cell.link.close()
            _stop_vms(cell.vms)
            if cell.disk is not None:
                cell.disk.close()
        return replace(result, seconds=round(time.monotonic() - t0, 1))


def phase_missed(backend: Backend, fault: Fault, phase: Phase, injected: dict[str, Any]) -> str | None:
    """Why the source's own state at the fault does not match ``phase`` (None: it does). The
    link holds the stream where the *target's* view reaches the phase; a source may run ahead
    (into its socket queue, or through precopy rounds that found nothing dirty and converged)."""
    source = str(injected.get("source", ""))
    if not source or backend.intra_host or fault is Fault.DISK_FULL:  # a disk: whether it bit
        return None  # local: the whole stream is ~1 KB, the source stops its guest at once
    wanted = {Phase.SETUP: ("setup", "round 1"), Phase.FIRST_ROUND: ("round 1",),
              Phase.SWITCHOVER: ("device",), Phase.AFTER_DEVICE: ("device",), Phase.CONFIRMED: ("completed",)}
    if phase is Phase.LATER_ROUNDS:
        ok = source.startswith("round ") and source != "round 1"
    else:
        ok = source in wanted[phase] or source == "refused migrate"
    return None if ok else f"source {source}"


def _result(cell: Cell, **fields: Any) -> CellResult:
    return CellResult(backend=cell.backend.name, fault=cell.fault.value, phase=cell.phase.value,
                      injected=cell.injected, notes=tuple(cell.notes), **fields)


def _kv_socket(lab: Lab, vm: str) -> str:
    return str(lab.root / f"kv-{vm}.sock")


def _run_remote(cell: Cell, host_a: HostProc, host_b: HostProc) -> CellResult:
    lab, backend, fault, phase, n = cell.lab, cell.backend, cell.fault, cell.phase, cell.n
    cell.target_host = host_b
    guests = backend.guests(lab)
    src, dst = lab.start_vms(
        VmSpec(name=f"src{n}", host=host_a, ram=RAM, guest="kv",
               extra=(*guests.source, *lab.kv_device(f"src{n}"))),
        VmSpec(name=f"dst{n}", host=host_b, ram=RAM, guest="kv", incoming=guests.target_incoming,
               extra=(*guests.target, *lab.kv_device(f"dst{n}"))))
    cell.src, cell.dst = src, dst
    cell.vms += [src, dst]
    src.wait_console(WORKLOAD_STARTED["kv"])
    if guests.target_ready is not None:
        dst.wait_console(guests.target_ready)
    cell.writer = KvWriter([_kv_socket(lab, src.name), _kv_socket(lab, dst.name)])
    cell.writer.start()

    disk_full = fault is Fault.DISK_FULL
    settings = replace(backend.settings, amd_root=lab.amd_root,
                       max_bandwidth=FILE_RATE if disk_full else MAX_BANDWIDTH,
                       downtime_limit_ms=0 if phase in ROUNDS else DOWNTIME_MS)
    configure(src, settings)
    aim_source(src, dst, settings)
    if disk_full:
        # the first round: a disk that fills ROUND_DEPTH into the stream (deterministic); the
        # setup: full before ``migrate``; later rounds: filled once the source says round 2
        cell.disk = Disk(lab.root / f"disk{n}", ROUND_DEPTH if phase is Phase.FIRST_ROUND else TMPFS_SIZE)
        if phase is Phase.SETUP:
            cell.disk.fill()
        try:
            src.qmp.execute("migrate", uri=f"file:{cell.disk.path / 'guest.mig'}")
        except QmpCommandError as exc:  # refused up front: as good as failed, if the source runs on
            cell.notes.append(str(exc))
            cell.injected = {"source": "refused migrate", "target": "-"}
            return _conclude(cell)
    else:
        configure(dst, settings)
        host, port = incoming_uri(dst).removeprefix("tcp:").rsplit(":", 1)
        # The source reaches the link over a UNIX socket: its queue is bounded (~200 KiB), so a
        # held link stops the source within that of where it holds, not megabytes later.
        cell.link = Link(lab.root / f"link{n}.sock", (host, int(port)), rate=LINK_RATE,
                         hold_at=HOLD_AT.get(phase), hold_return=phase is Phase.AFTER_DEVICE)
        src.qmp.execute("migrate", uri=cell.link.address)
    if not _reach(cell):
        return _result(cell, verdict="error", reasons=(f"the migration never reached {phase.title}",),
                       source_end=_migration_status(src), target_end=_migration_status(dst))
    _inject(cell)
    return _conclude(cell)


def _run_local(cell: Cell, host: HostProc) -> CellResult:
    lab, backend, phase, n = cell.lab, cell.backend, cell.phase, cell.n
    args = backend.guests(lab).source
    spec = VmSpec(name=f"old{n}", host=host, ram=RAM, guest="kv", extra=(*args, *lab.kv_device(f"old{n}")))
    cell.spec = spec
    src = lab.start_vms(spec)[0]
    cell.src = src
    cell.vms.append(src)
    cell.target_host = host
    src.wait_console(WORKLOAD_STARTED["kv"])
    new = replace(spec, name=f"new{n}", extra=(*args, *lab.kv_device(f"new{n}")))
    cell.writer = KvWriter([_kv_socket(lab, src.name), _kv_socket(lab, new.name)])
    cell.writer.start()
    link = Link(lab.root / f"link{n}.sock", lab.root / f"{new.name}.main.sock", hold_at=HOLD_AT.get(phase),
                hold_return=phase is Phase.AFTER_DEVICE)
    cell.link = link
    assert link.path is not None
    dst, _t0 = begin_hand_over(lab, src, new, main_via=link.path)
    if dst is None:
        return _result(cell, verdict="error", reasons=("the new VMM never served QMP",))
    cell.dst = dst
    cell.vms.append(dst)
    if not _reach(cell):
        return _result(cell, verdict="error", reasons=(f"the hand-over never reached {phase.title}",),
                       source_end=_migration_status(src), target_end=_migration_status(dst))
    _inject(cell)
    return _conclude(cell)


def _reach(cell: Cell) -> bool:
    """Wait for the cell's phase; note where the migration was."""
    src, dst, link, phase = cell.src, cell.dst, cell.link, cell.phase
    assert src is not None and dst is not None
    info: dict[str, Any] = {}

    def source_ended() -> bool:
        nonlocal info
        info = _query(src, "query-migrate")
        return info.get("status") in TERMINAL

    if cell.fault is Fault.DISK_FULL:
        def in_phase() -> bool:
            info_ = _query(src, "query-migrate")
            status = info_.get("status")
            syncs = int(info_.get("ram", {}).get("dirty-sync-count", 0))
            if phase is Phase.SETUP or status in TERMINAL:
                return True
            if phase is Phase.FIRST_ROUND:
                return True  # the disk fills by itself, ROUND_DEPTH into the stream
            return status == "active" and syncs >= 2

        reached = _wait(src, "the phase", in_phase, PHASE_TIMEOUT, interval=0.005)
    elif phase in HOLD_AT:
        assert link is not None
        checked = [0.0]

        def held() -> bool:
            if link.reached.wait(0.01):
                return True
            if time.monotonic() - checked[0] > 0.5:
                checked[0] = time.monotonic()
                if source_ended():
                    return True
            return False

        reached = _wait(src, "the link to hold", held, PHASE_TIMEOUT, 0.0) and link.reached.is_set()
    elif phase is Phase.AFTER_DEVICE:
        assert link is not None
        reached = (_wait(src, "the whole stream", lambda: link.stream_end.is_set() or source_ended(),
                         PHASE_TIMEOUT)
                   and link.stream_end.is_set()
                   and _wait(src, "the target to load", lambda: _migration_status(dst) in TERMINAL,
                             PHASE_TIMEOUT, 0.05))
    else:
        reached = (_wait(src, "the source to complete", source_ended, PHASE_TIMEOUT, 0.05)
                   and info.get("status") == "completed")
    info = _query(src, "query-migrate")
    target_status = _migration_status(dst) if cell.fault is not Fault.DISK_FULL else "-"
    cell.target_had_all = target_status == "completed"
    cell.injected = {"source": _where(info), "target": target_status,
                     "target-bytes": link.forwarded if link is not None else None,
                     "dirty-sync-count": info.get("ram", {}).get("dirty-sync-count")}
    return reached


def _inject(cell: Cell) -> None:
    src, dst, link, fault = cell.src, cell.dst, cell.link, cell.fault
    assert src is not None and dst is not None

    def converge() -> None:
        if cell.phase in ROUNDS:
            _set(src, **{"downtime-limit": DOWNTIME_MS})

    def release() -> None:
        if link is not None:
            link.release()

    if fault is Fault.CUT_BOTH:
        assert link is not None
        link.cut()
        converge()
    elif fault is Fault.CUT_ONE:
        assert link is not None
        link.cut(back=False)
        release()
        converge()
    elif fault is Fault.TARGET_VMM:
        dst.proc.kill()
        dst.proc.wait()
        release()
        converge()
    elif fault is Fault.TARGET_HOST:
        assert cell.target_host is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cell.target_host.proc.pid, signal.SIGKILL)
        cell.target_host.proc.wait()
        release()
        converge()
    elif fault is Fault.SOURCE_VMM:
        src.proc.kill()
        src.proc.wait()
        release()
    elif fault is Fault.CANCEL:
        if err := _cancel(src):
            cell.notes.append(err)
        release()
        converge()
    elif fault is Fault.SLOW:
        assert link is not None
        link.throttle(LINK_RATE // SLOW_FACTOR)
        release()
        converge()
        if not _wait(src, "the end", lambda: _migration_status(src) in TERMINAL, SLOW_WINDOW, 0.1):
            cell.notes.append(f"still {_where(_query(src, 'query-migrate'))} after {SLOW_WINDOW:g} s on the "
                              "slow link: migrate_cancel")
            if err := _cancel(src):
                cell.notes.append(err)
        link.throttle(LINK_RATE)
    elif fault is Fault.STALL:
        assert link is not None
        link.stall()
        time.sleep(STALL_WINDOW)
        if err := _cancel(src):
            cell.notes.append(err)
        if _wait(src, "the end", lambda: _migration_status(src) in TERMINAL, CANCEL_GRACE, 0.1):
            cell.notes.append(f"migrate_cancel ended it on the stalled link: {_migration_status(src)}")
        else:
            cell.notes.append(f"still {_where(_query(src, 'query-migrate'))} {CANCEL_GRACE:g} s after "
                              "migrate_cancel on the stalled link; then the link healed")
        converge()
        link.release()
    elif fault is Fault.DISK_FULL:
        assert cell.disk is not None
        if cell.phase is Phase.LATER_ROUNDS:
            cell.disk.fill()
        converge()


def _conclude(cell: Cell) -> CellResult:
    """Wait for the end, count the copies, check the writes, try migrating again."""
    src, dst, fault, lab = cell.src, cell.dst, cell.fault, cell.lab
    assert src is not None and dst is not None and cell.writer is not None
    reasons: list[str] = []

    def ended() -> bool:
        s = _migration_status(src)
        if fault is Fault.DISK_FULL:
            return s in TERMINAL or s in ("killed", "none")  # "none": migrate was refused
        if s not in TERMINAL and s != "killed":
            return False
        t = _migration_status(dst)
        return t in TERMINAL or t in ("killed", "none", "no answer")

    if not _wait(src, "the end", ended, END_TIMEOUT, 0.1):
        reasons.append(f"hang: still {_migration_status(src)} (target {_migration_status(dst)}) "
                       f"{END_TIMEOUT:g} s after the fault")
        cell.notes.append(_cancel(src) or "migrate_cancel after the hang")
        if cell.link is not None:
            cell.link.release()
        _wait(src, "the end", ended, 15.0, 0.1)
    time.sleep(SETTLE)
    host_alive = cell.target_host is None or cell.target_host.proc.poll() is None
    src_state, dst_state = _runstate(src), _runstate(dst)
    src_mig, dst_mig = _migration_status(src), _migration_status(dst)
    running = []
    if src_state == "running":
        running.append("source")
    if dst_state == "running" and dst_mig == "completed" and host_alive:
        running.append("target")
    lost_expected = ((fault is Fault.SOURCE_VMM and not cell.target_had_all)
                     or (fault in (Fault.TARGET_VMM, Fault.TARGET_HOST) and cell.target_had_all))
    # The source ran before the migration: paused after a failed one, it held the guest.
    held = not running and not lost_expected and src_state == "paused" and src_mig == "failed"
    if held:  # the operator's call, made knowing the target does not run the guest
        cell.notes.append("the verdict was lost: the source held the guest paused (the target might "
                          "have run it); no copy ran until cont, given once the target was seen not to")
        src.qmp.execute("cont")
        src_state = _runstate(src)
        running.append("source")
    writer = cell.writer
    writer.stop()
    lost: int | None = None
    for who, vm in (("source", src), ("target", dst)):
        if who in running:
            n = writer.lost_on(_kv_socket(lab, vm.name))
            if n is None:
                reasons.append(f"the {who} runs but its kv device does not answer")
            elif n:
                reasons.append(f"{n} acknowledged writes missing on the {who}")
            lost = (lost or 0) + (n or 0)
    copies = len(running)
    verdict = "held" if held else "ok"
    if copies >= 2:
        reasons.insert(0, "two copies run")
    elif copies == 0 and not lost_expected:
        reasons.insert(0, "no copy runs")
    for who, vm, mig in (("source", src, src_mig), ("target", dst, dst_mig)):
        if mig == "failed" and (who == "source" or reasons or fault is Fault.SOURCE_VMM):
            cell.notes.append(f"{who}: {_query(vm, 'query-migrate').get('error-desc', '')}")
    again = "n/a"
    if "source" in running:
        again = _again(cell)
        if again != "yes":
            reasons.append(f"the source cannot migrate again: {again}")
    if reasons:
        verdict = "FAIL"
    elif copies == 0 and not held:
        verdict = "lost"
        cell.notes.append("the guest was lost: its VMM (or host) was killed while it ran the guest")
    if fault is Fault.CANCEL and src_mig == "completed" and cell.phase is not Phase.CONFIRMED:
        cell.notes.append("migrate_cancel came once the whole stream was out: the source waited for the "
                          "target's verdict instead, and the migration completed")
    return _result(cell, verdict=verdict, reasons=tuple(reasons),
                   source_end=f"{src_mig}, {src_state}", target_end=f"{dst_mig}, {dst_state}"
                   + ("" if host_alive else " (host killed)"),
                   copies=copies, running=tuple(running), acked=len(writer.client.acknowledged),
                   lost=lost, again=again)


def _again(cell: Cell) -> str:
    """Whether the source, which runs, migrates again: to a file (a second target would take
    the same backend's setup; a file is cheaper), or for cpr-transfer to another new VMM."""
    src, lab = cell.src, cell.lab
    assert src is not None
    try:
        if cell.backend.intra_host:
            assert cell.spec is not None
            args = cell.backend.guests(lab).source
            again = replace(cell.spec, name=f"again{cell.n}", extra=(*args, *lab.kv_device(f"again{cell.n}")))
            new, result = hand_over(lab, src, again, wait_running=False)
            if new is not None:
                cell.vms.append(new)
            if result.status == "completed":
                return "yes"
            return f"no: {result.info.get('error-desc', result.status)}"
        _set(src, **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": MAX_BANDWIDTH})
        path = lab.root / f"again{cell.n}.mig"
        src.qmp.execute("migrate", uri=f"file:{path}")
        if not _wait(src, "the second migration", lambda: _migration_status(src) in TERMINAL,
                     AGAIN_TIMEOUT, 0.1):
            _cancel(src)
            return "no: the second migration did not end"
        info = _query(src, "query-migrate")
        with contextlib.suppress(OSError):
            path.unlink()
        if info.get("status") == "completed":
            return "yes"
        return f"no: {info.get('error-desc', info.get('status'))}"
    except (ConfmigError, OSError) as exc:
        return f"no: {exc}"


# --- the whole matrix, its report -----------------------------------------------------------------

FAST_CELLS: tuple[tuple[str, Fault, Phase], ...] = (
    ("plain", Fault.CUT_BOTH, Phase.FIRST_ROUND),
    ("psp", Fault.CANCEL, Phase.LATER_ROUNDS),
    ("mh", Fault.CUT_BOTH, Phase.AFTER_DEVICE),
    ("local", Fault.TARGET_VMM, Phase.SWITCHOVER),
)
"""The subset that ``make test`` runs (tests/functional/test_faults.py)."""


def run_matrix(*, backends: Iterable[Backend] = BACKENDS, faults: Iterable[Fault] = Fault,
               phases: Iterable[Phase] = Phase, save_dir: str | None = None, deadline: Deadline = NO_DEADLINE,
               progress: Callable[[CellResult], None] = lambda _r: None) -> dict[str, Any]:
    backends, faults, phases = list(backends), list(faults), list(phases)
    check_host_memory(2 * 64 * MiB * 2, "the fault matrix")
    t0 = time.time()
    load = os.getloadavg()
    results = Matrix(deadline=deadline, progress=progress).run(backends, faults, phases)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), "machine": machine_info(),
              "load-at-start": [round(x, 2) for x in load],
              "load-at-end": [round(x, 2) for x in os.getloadavg()],
              "minutes": round((time.time() - t0) / 60, 1), "ram": RAM,
              "backends": [b.name for b in backends], "faults": [f.value for f in faults],
              "phases": [p.value for p in phases], "cells": [asdict(r) for r in results],
              "summary": summary(results)}
    if save_dir:
        save(Path(save_dir), report)
    return report


def summary(results: list[CellResult]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in results:
        counts = out.setdefault(r.backend, {"ok": 0, "held": 0, "lost": 0, "FAIL": 0, "error": 0, "missed": 0,
                                            "n/a": 0})
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return out


def cells_of(report: dict[str, Any]) -> Iterator[CellResult]:
    for c in report["cells"]:
        yield CellResult(**{**c, "reasons": tuple(c["reasons"]), "running": tuple(c["running"]),
                            "notes": tuple(c["notes"])})


LEGEND = (
    "`ok: source` / `ok: target`: exactly one copy runs, there, with every acknowledged write (and a "
    "running source migrated again). `held: source, after cont`: the whole stream went out and the "
    "target's verdict was lost; the source kept the guest paused (the target might have been running it: "
    "resuming would risk two copies), no copy ran, and the harness, as an operator who sees the target "
    "does not run it, said cont; then the musts held on the source. "
    "`lost (expected)`: the VMM (or host) running the guest was killed, "
    "and no copy runs twice. `**FAIL**`: a must did not hold (first reason shown; all below). `phase "
    "missed`: in three tries the fault never bit at that phase (a file migration that completed before its "
    "disk filled up). `n/a`: the cell does not exist for the backend (why: in the list of every cell).")


def markdown(report: dict[str, Any]) -> str:
    cells = list(cells_of(report))
    phases = [Phase(p) for p in report["phases"]]
    lines = [f"# Fault matrix, {report['date']}", "",
             f"Machine: {_machine(report['machine'])}. Load average at start {report['load-at-start']}, "
             f"at end {report['load-at-end']}; {report['minutes']} minutes.", "",
             *[f"Re-run into this table: {r}.\n" for r in report.get("re-runs", [])],
             f"Each cell: a {report['ram']} guest running the `kv` workload, served to a client that "
             "writes all along and remembers every acknowledged write; one migration (plain, psp, mh: "
             "between two emulated hosts through a link of 128 MiB/s; local: cpr-transfer to a new VMM "
             "on the same host); the fault injected at the phase; then the copies of the guest that run "
             "are counted, the acknowledged writes read back there, and a source that runs migrates "
             "again (to a file; local: to another new VMM).", "", LEGEND, ""]
    for backend in report["backends"]:
        mine = {(c.fault, c.phase): c for c in cells if c.backend == backend}
        lines += [f"## {backend}", "", "| fault | " + " | ".join(p.title for p in phases) + " |",
                  "|---|" + "---|" * len(phases)]
        for f in report["faults"]:
            row = [mine[(f, p.value)].short if (f, p.value) in mine else "" for p in phases]
            lines.append(f"| {Fault(f).title} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Summary", "", "| backend | ok | held (paused, then cont) | lost (expected) | FAIL "
              "| harness error | phase missed | n/a |", "|---" * 8 + "|"]
    lines += [f"| {b} | {c['ok']} | {c.get('held', 0)} | {c['lost']} | {c['FAIL']} | {c['error']} | "
              f"{c.get('missed', 0)} | {c['n/a']} |" for b, c in report["summary"].items()]
    lines.append("")
    bad = [c for c in cells if c.verdict in ("FAIL", "error")]
    if bad:
        lines += ["## Failures", ""]
        for c in bad:
            lines.append(
                f"* **{c.backend} / {Fault(c.fault).title} / {Phase(c.phase).title}** ({c.verdict}): "
                f"{'; '.join(c.reasons)}. At the fault: {_fmt(c.injected)}. End: source {c.source_end}; "
                f"target {c.target_end}. {'; '.join(c.notes)}. Reproduce: `confmig faults --backend "
                f"{c.backend} --fault {c.fault} --phase {c.phase}`.")
        lines.append("")
    lines += ["## Every cell", "",
              "| backend | fault | phase | verdict | at the fault | source end | target end | copies | acked "
              "| lost | again | s | notes |", "|---" * 13 + "|"]
    for c in cells:
        notes = "; ".join((*c.reasons, *c.notes)).replace("|", "/").replace("\n", " ")
        lost = "" if c.lost is None else c.lost
        lines.append(f"| {c.backend} | {c.fault} | {c.phase} | {c.verdict} | {_fmt(c.injected)} | "
                     f"{c.source_end} | {c.target_end} | {c.copies} {'+'.join(c.running)} | {c.acked} | "
                     f"{lost} | {c.again} | {c.seconds} | {notes} |")
    lines += ["", "Reproduce: `make faults` (`confmig faults --save benchmarks/`); one cell: "
              "`confmig faults --backend B --fault F --phase P`. See docs/faults.md."]
    return "\n".join(lines) + "\n"


def _machine(m: dict[str, Any]) -> str:
    return f"{m.get('cpus')} CPUs, Linux {m.get('kernel')}, Python {m.get('python')}"


def _fmt(injected: dict[str, Any]) -> str:
    if not injected:
        return ""
    out = f"source {injected.get('source')}, target {injected.get('target')}"
    if injected.get("target-bytes") is not None:
        out += f", {injected['target-bytes']} B to the target"
    return out


def merge_into(saved: Path, report: dict[str, Any]) -> Path:
    """Put ``report``'s cells (a re-run of some) into the saved report ``saved`` (its JSON),
    in place of the same cells, note it, and write its Markdown again (and faults-latest.md)."""
    old: dict[str, Any] = json.loads(saved.read_text())
    new = {(c["backend"], c["fault"], c["phase"]): c for c in report["cells"]}
    old["cells"] = [new.pop((c["backend"], c["fault"], c["phase"]), c) for c in old["cells"]]
    old["cells"] += list(new.values())
    for axis, values in (("backends", [b.name for b in BACKENDS]), ("faults", [f.value for f in Fault]),
                         ("phases", [p.value for p in Phase])):
        had = {*old[axis], *report[axis]}
        old[axis] = [v for v in values if v in had]
    old["summary"] = summary(list(cells_of(old)))
    cells = ", ".join(sorted({f"{c['backend']}/{c['fault']}" for c in report["cells"]}))
    old.setdefault("re-runs", []).append(f"{report['date']}: {cells} ({len(report['cells'])} cells, "
                                        f"load at start {report['load-at-start']})")
    saved.write_text(json.dumps(old, indent=2) + "\n")
    text = markdown(old)
    saved.with_suffix(".md").write_text(text)
    (saved.parent / "faults-latest.md").write_text(text)
    return saved.with_suffix(".md")


def save(directory: Path, report: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = "faults-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (directory / f"{name}.md").write_text(text)
    (directory / "faults-latest.md").write_text(text)
    return directory / f"{name}.md"

