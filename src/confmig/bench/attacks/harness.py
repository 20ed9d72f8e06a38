"""The attack harness: every case of :mod:`~confmig.bench.attacks.catalog` against live VMMs.

For each backend a lab of three hosts (A: the source's, B: the target's, C: one more the
host controls); for each case a fresh source guest (``dirty``, 64 MiB, its working set of
2 MiB rewritten at 300 pages/s: a page's records change between rounds) and its targets,
stopped once the case is recorded. What is recorded (:class:`Outcome`): what the proxy did,
the source's migration status, what the target said (``error-desc`` of its
``query-migrate``: what caught the attack), whether the target runs the guest and its
self-check's verdict (a corrupted guest fails it), and whether the source runs on and passes
its own. The verdict is read from those facts alone and set beside the design's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from confmig.bench.attacks.catalog import BACKENDS, CASES, NOT_APPLICABLE, Case, Expected, Scenario
from confmig.bench.attacks.proxy import GpaRanges, ProxyServer
from confmig.bench.attacks.records import Kind
from confmig.bench.attacks.rogue import RoguePlatform, read_pages
from confmig.bench.deadline import NO_DEADLINE, Deadline, DeadlineExceeded
from confmig.bench.lab import SELFCHECK_RE, WORKING_SET_WRITTEN, GuestFailed, HostProc, Lab, VmProc, VmSpec
from confmig.bench.scenario import (
    MH_TARGET_READY,
    MigrationSettings,
    aim_source,
    configure,
    incoming_uri,
    mh_guest_args,
    migrate,
    sev_args,
    sev_target_certificates,
    wait_status,
)
from confmig.common.errors import ConfmigError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import psp as psp_records
from confmig.proto.stream.decoder import NEED_DATA, Confidential, End, StreamDecoder
from confmig.proto.stream.format import ConfidentialSubtype

GUEST: Final = "dirty,rate=300,wss=2M,prefill=on"
RAM: Final = "64M"
TARGET_TIMEOUT: Final = 60.0
"""Seconds a target gets to load or refuse a stream once the source is done."""
SELFCHECK_TIMEOUT: Final = 60.0
"""Seconds for a guest's self-check of its 2 MiB working set (a few seconds at most)."""
ATTEMPTS: Final = 8
"""Migrations a proxy attack gets to find its window (see :func:`run_case`). The faster a path,
the likelier a stop-and-copy part without a page the guest checks: once the plain path's
source stopped copying pages, ``swap`` (two such pages) found no window in three migrations
in 2 runs of 11 here (counted by hand, not saved)."""
NOT_ACTED: Final = "the attack found no record to act on"
DRAIN_TIMEOUT: Final = 10.0
"""Seconds the proxy gets to pass what is left once the source's migration ended."""
WORKING_SET_RE: Final = re.compile(rb"dirty: \d+ pages \([^:]*: ([^)]*)\), version table at (0x[0-9a-f]+)")
"""The dirty workload's line naming its working set's pieces and its version table."""
PIECE_RE: Final = re.compile(r"(\d+) at (0x[0-9a-f]+)")

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One case on one backend, as it happened."""

    backend: str
    case: str
    what: str
    expected: str
    why: str
    verdict: str
    """An :class:`Expected` value read from what happened, or ``error: ...`` (the run failed)."""
    acted: str
    """What the proxy or the scenario did."""
    migration: str
    """The source's migration status."""
    caught_by: str
    """The target's ``error-desc`` (or, refused before any target saw it, the source's)."""
    target: str
    """The target's run state (the second target's, in a scenario)."""
    target_selfcheck: str
    source: str
    """The source's run state once the case was over."""
    source_selfcheck: str
    seconds: float

    @property
    def matches(self) -> bool:
        return self.verdict == self.expected


@dataclass(frozen=True, slots=True, kw_only=True)
class _Seen:
    migration: str
    caught_by: str
    target: str
    target_selfcheck: str
    source: str
    source_selfcheck: str
    read: bool = False
    """The host decrypted private pages of the guest."""


# --- the run ---------------------------------------------------------------------------------


def run_attacks(*, backends: Iterable[str] = tuple(BACKENDS), cases: Iterable[str] | None = None,
                save_dir: str | None = None, deadline: Deadline = NO_DEADLINE, keep: bool = False,
                log: Log = print) -> list[Outcome]:
    """Every case (or those named) on every backend named; the table saved under ``save_dir``."""
    wanted = set(cases) if cases is not None else None
    t0 = time.time()
    outcomes: list[Outcome] = []
    for backend in backends:
        chosen = [c for c in CASES[backend] if wanted is None or c.name in wanted]
        if not chosen:
            continue
        with Lab(keep=keep, deadline=deadline) as lab:
            hosts = lab.start_hosts("hostA", "hostB", "hostC")
            for case in chosen:
                outcome = run_case(lab, hosts, backend, case)
                outcomes.append(outcome)
                mark = "as designed" if outcome.matches else f"EXPECTED {outcome.expected}"
                log(f"{backend:5} {case.name:13} {outcome.verdict:24} ({mark}) {outcome.caught_by[:90]}")
    if save_dir is not None:
        for path in save(Path(save_dir), outcomes, t0=t0):
            log(f"saved {path}")
    return outcomes


def run_case(lab: Lab, hosts: list[HostProc], backend: str, case: Case) -> Outcome:
    """One case in ``lab`` (whose hosts are A, B, C); its VMs are stopped before it returns. A
    proxy attack that found no record to act on (a stop-and-copy part without a page the guest
    checks: the guest wrote none in the last round) runs again, up to :data:`ATTEMPTS` times."""
    t0 = time.monotonic()
    for attempt in range(1, ATTEMPTS + 1):
        run = _Run(lab, hosts, backend, case, attempt=attempt)
        try:
            acted, seen, copies_elsewhere = run.go()
            verdict = _verdict(seen, scenario=copies_elsewhere)
        except DeadlineExceeded:
            raise
        except (ConfmigError, OSError, AssertionError) as exc:
            acted, verdict = "", f"error: {exc}"
            seen = _Seen(migration="", caught_by="", target="", target_selfcheck="", source="",
                         source_selfcheck="")
        finally:
            run.stop()
        if not acted.startswith(NOT_ACTED):
            break
    if acted.startswith(NOT_ACTED):
        verdict = f"not run: {NOT_ACTED} in {ATTEMPTS} migrations"
    elif attempt > 1:
        acted = f"(attempt {attempt}: the attack found no record in the earlier ones) {acted}"
    return Outcome(backend=backend, case=case.name, what=case.what, expected=case.expected.value,
                   why=case.why, verdict=verdict, acted=acted, migration=seen.migration,
                   caught_by=seen.caught_by, target=seen.target, target_selfcheck=seen.target_selfcheck,
                   source=seen.source, source_selfcheck=seen.source_selfcheck,
                   seconds=round(time.monotonic() - t0, 1))


def _verdict(seen: _Seen, *, scenario: bool) -> str:
    if seen.read:
        return Expected.READ.value
    if seen.target != "running":
        return Expected.CAUGHT.value
    if seen.target_selfcheck.startswith("confmig-selfcheck: PASS"):
        return Expected.COPY_RUNS.value if scenario else Expected.HARMLESS.value
    return Expected.CORRUPTED.value


class _Run:
    """The VMs of one case and the steps of its scenario."""

    def __init__(self, lab: Lab, hosts: list[HostProc], backend: str, case: Case, *,
                 attempt: int = 1) -> None:
        self.lab = lab
        self.attempt = attempt
        self.a, self.b, self.c = hosts
        self.backend = backend
        self.kind = BACKENDS[backend]
        self.case = case
        self.vms: list[VmProc] = []
        self.held = False
        """Whether the targets started paused (``-S``)."""
        self.settings = MigrationSettings(downtime_limit_ms=300, sev_target_certs=self.kind is Kind.PSP,
                                          amd_root=lab.amd_root,
                                          confidential_backend="mh" if self.kind is Kind.MH else "")

    # --- VMs ---

    def _name(self, role: str) -> str:
        again = f"-{self.attempt}" if self.attempt > 1 else ""
        return f"{self.backend}-{self.case.name}-{role}{again}"

    def start(self, *, targets: Iterable[tuple[str, HostProc]],
              rogue: tuple[str, HostProc] | None = None, paused: bool = False) -> list[VmProc]:
        """The source on host A and its targets (``(role, host)``), all launched by one owner;
        ``rogue``: one more target, launched for another guest (MH: another owner's launch);
        ``paused``: plain and PSP targets start with ``-S``, so that a guest that arrives is
        checked before it runs (an MH target boots into its Migration Handler instead)."""
        mh_vcpus = self.case.mh_vcpus
        specs = []
        if self.kind is Kind.MH:
            source, target = mh_guest_args(self.lab, mh_vcpus)
            specs.append(VmSpec(name=self._name("src"), host=self.a, ram=RAM, guest=GUEST, extra=source))
            specs += [VmSpec(name=self._name(role), host=h, ram=RAM, guest=GUEST, extra=target)
                      for role, h in targets]
            if rogue is not None:
                _, other = mh_guest_args(self.lab, mh_vcpus)
                specs.append(VmSpec(name=self._name(rogue[0]), host=rogue[1], ram=RAM, guest=GUEST,
                                    extra=other))
        else:
            extra = tuple(sev_args(self.case.policy)) if self.kind is Kind.PSP else ()
            specs.append(VmSpec(name=self._name("src"), host=self.a, ram=RAM, guest=GUEST, extra=extra))
            more = [*targets, *([rogue] if rogue is not None else [])]
            held = ("-S",) if paused else ()
            specs += [VmSpec(name=self._name(role), host=h, ram=RAM, guest=GUEST, incoming="defer",
                             extra=(*extra, *held)) for role, h in more]
            self.held = paused
        vms = self.lab.start_vms(*specs)
        self.vms += vms
        vms[0].wait_console(WORKING_SET_WRITTEN)
        if self.kind is Kind.MH:
            for t in vms[1:]:
                t.wait_console(MH_TARGET_READY)
        return vms

    def stop(self) -> None:
        """Every VM of the case quits (its host's memory is for the next case)."""
        for vm in self.vms:
            with contextlib.suppress(ConfmigError, OSError):
                vm.qmp.execute("quit")
        for vm in self.vms:
            try:
                vm.proc.wait(5)
            except subprocess.TimeoutExpired:  # a VMM that does not quit is killed
                vm.proc.kill()
                vm.proc.wait()
            vm.qmp.close()

    def aim(self, src: VmProc, dst: VmProc) -> tuple[str, int]:
        """The target listens and the source is told whom it sends to; the target's address."""
        configure(dst, self.settings)
        host, port = incoming_uri(dst).removeprefix("tcp:").rsplit(":", 1)
        configure(src, self.settings)
        self.tell_source(src, dst)
        return host, int(port)

    def tell_source(self, src: VmProc, dst: VmProc) -> None:
        aim_source(src, dst, self.settings)

    # --- scenarios ---

    def go(self) -> tuple[str, _Seen, bool]:
        """(what was done, what was seen, whether a copy elsewhere is the question)."""
        scenario = self.case.scenario
        if scenario is Scenario.ROGUE_PDH:
            return (*self.rogue_pdh(), True)
        if scenario is Scenario.PROXY:
            return (*self.proxied(), False)
        if scenario is Scenario.ROGUE_TARGET:
            return (*self.rogue_target(), True)
        if scenario is Scenario.REPLAY_STREAM:
            return (*self.replay_stream(), True)
        return (*self.restore_file(), True)

    def proxied(self) -> tuple[str, _Seen]:
        attack = self.case.attack
        assert attack is not None
        src, dst = self.start(targets=[("dst", self.b)], paused=True)
        pages = None if self.kind is Kind.MH else checked_pages(src)
        target = self.aim(src, dst)
        with ProxyServer(target, attack, kind=self.kind, pages=pages) as proxy:
            result = migrate(src, None, proxy.uri, settings=self.settings)
            proxy.finished.wait(DRAIN_TIMEOUT)
        tally = proxy.tally
        acted = "; ".join(tally.done) or NOT_ACTED
        if tally.error:
            acted += f" (the proxy could not decode the stream: {tally.error})"
        return acted, self.observe(src, dst, result.status)

    def rogue_target(self) -> tuple[str, _Seen]:
        src, rogue = self.start(targets=[], rogue=("rogue", self.c))
        result = migrate(src, rogue, settings=self.settings)
        acted = {Kind.PLAIN: "migrate to a VM on host C",
                 Kind.PSP: "sev-pdh and sev-plat-cert of host C's platform, then migrate there",
                 Kind.MH: "x-mh-target-challenge of the other guest's MH target on host C, then migrate "
                          "there",
                 }[self.kind]
        return acted, self.observe(src, rogue, result.status)

    def rogue_pdh(self) -> tuple[str, _Seen]:
        """The source seals for a PDH the host made; the host's listener takes the stream until a
        page the guest checks arrived, then hangs up; the host decrypts what it got."""
        src, decoy = self.start(targets=[("decoy", self.b)])
        watched = checked_pages(src)
        rogue = RoguePlatform.make()
        configure(src, self.settings)
        certs = sev_target_certificates(decoy, self.lab.amd_root)  # a genuine chain beside it
        certs["sev-pdh"] = base64.b64encode(rogue.pdh).decode()
        src.qmp.execute("migrate-set-parameters", **certs)
        with HostListener(watched) as listener:
            result = migrate(src, None, listener.uri, settings=self.settings)
            listener.finished.wait(DRAIN_TIMEOUT)
        pages = read_pages(rogue, bytes(listener.received))
        ours = {gpa: page for gpa, page in pages.items() if any(lo <= gpa < hi for lo, hi in watched)}
        own_gpa = [gpa for gpa, page in ours.items() if int.from_bytes(page[:8], "little") == gpa]
        if own_gpa:
            acted = (f"SEND_START sealed the session for the host's PDH; the host unwrapped TEK and TIK and "
                     f"decrypted {len(pages)} private pages of {len(listener.received)} bytes received; "
                     f"{len(own_gpa)} working-set pages read as the guest wrote them (page {own_gpa[0]:#x} "
                     f"starts with its own GPA)")
            target = "the host's listener: the guest's memory in clear"
        else:
            acted = f"the host's listener got {len(listener.received)} bytes; nothing it could decrypt"
            target = "the host's listener: nothing readable"
        source, source_check = self.source_outcome(src, result.status)
        caught_by = "source: " + str(result.info.get("error-desc", "")) if not own_gpa else ""
        return acted, _Seen(migration=result.status, caught_by=caught_by, target=target,
                            target_selfcheck="", source=source, source_selfcheck=source_check,
                            read=bool(own_gpa))

    def replay_stream(self) -> tuple[str, _Seen]:
        src, first, second = self.start(targets=[("first", self.b), ("second", self.b)])
        target = self.aim(src, first)
        with ProxyServer(target, kind=self.kind, record=True) as proxy:
            result = migrate(src, None, proxy.uri, settings=self.settings)
            proxy.finished.wait(DRAIN_TIMEOUT)
        if result.status != "completed":
            raise ConfmigError(f"the recorded migration did not complete: {result.info.get('error-desc')}")
        wait_status(first, "running")
        configure(second, self.settings)
        host, port = incoming_uri(second).removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as replay:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # refused mid-stream
                replay.sendall(bytes(proxy.sent))
                replay.shutdown(socket.SHUT_WR)  # all of it: as the source's VMM ends a stream
            seen = self.observe(src, second, result.status)
        first_check = self.selfcheck(first)
        return (f"recorded {len(proxy.sent)} bytes of a completed migration to 'first' (it runs: "
                f"{first_check}), played them to 'second'"), seen

    def restore_file(self) -> tuple[str, _Seen]:
        src, named, second = self.start(targets=[("named", self.b), ("second", self.b)])
        configure(src, self.settings)
        self.tell_source(src, named)
        saved = self.lab.root / f"{self._name('saved')}.mig"
        result = migrate(src, None, f"file:{saved}", settings=self.settings)
        if result.status != "completed":
            raise ConfmigError(f"migrate file: did not complete: {result.info.get('error-desc')}")
        configure(named, self.settings)
        named.qmp.execute("migrate-incoming", uri=f"file:{saved}")
        named_seen = self.target_outcome(named)
        configure(second, self.settings)
        second.qmp.execute("migrate-incoming", uri=f"file:{saved}")
        seen = self.observe(src, second, result.status)
        return (f"saved with migrate file: ({saved.stat().st_size} bytes) for 'named', which restored it "
                f"({named_seen[0]}, {named_seen[1]}); then restored on 'second'"), seen

    # --- what came of it ---

    def observe(self, src: VmProc, dst: VmProc, migration: str) -> _Seen:
        caught_by, target_check = "", ""
        status, state = self.target_outcome(dst)
        info = dst.qmp.execute("query-migrate")
        caught_by = str(info.get("error-desc", ""))
        if status == "failed" and not caught_by:
            caught_by = "(the target failed without saying why)"
        if status == "completed" and state == "paused" and self.held:
            # What arrived, checked before the guest runs: once it runs, its workload rewrites
            # pages (a whole pass of its working set takes about two seconds) and would mend
            # what an attack changed before a later check saw it. A refused inject-nmi or cont
            # is the harness's error (it raises), not a verdict on the stream.
            mark = len(dst.console_text())
            dst.qmp.execute("inject-nmi")  # pending: the guest's first step takes it
            dst.qmp.execute("cont")
            state = "running"  # the state it runs in, read before the check as below
            target_check = self.selfcheck(dst, after=mark)
        elif state == "running":
            target_check = self.selfcheck(dst)
        if migration == "failed" and not caught_by:
            caught_by = "source: " + str(src.qmp.execute("query-migrate").get("error-desc", ""))
        source, source_check = self.source_outcome(src, migration)
        return _Seen(migration=migration, caught_by=caught_by, target=state, target_selfcheck=target_check,
                     source=source, source_selfcheck=source_check)

    def target_outcome(self, dst: VmProc) -> tuple[str, str]:
        """(its migration status, its run state) once it loaded or refused the stream."""
        def done() -> str | None:
            status = str(dst.qmp.execute("query-migrate").get("status", ""))
            return status if status in ("completed", "failed", "cancelled") else None

        try:
            status = dst.deadline.wait(f"{dst.name} to load or refuse the stream", done,
                                       timeout=TARGET_TIMEOUT)
        except ConfmigError:
            status = str(dst.qmp.execute("query-migrate").get("status", "")) + " (still, after a minute)"
        if status == "completed":
            with contextlib.suppress(ConfmigError):
                wait_status(dst, "paused" if self.held else "running")
        return status, str(dst.qmp.execute("query-status")["status"])

    def source_outcome(self, src: VmProc, migration: str) -> tuple[str, str]:
        if migration != "completed":
            with contextlib.suppress(ConfmigError):
                wait_status(src, "running")  # after FINISH: once it opened the target's abort token
        state = str(src.qmp.execute("query-status")["status"])
        return state, self.selfcheck(src) if state == "running" else ""

    def selfcheck(self, vm: VmProc, *, after: int | None = None) -> str:
        """The guest's verdict: asked for now, or (``after``: a console mark) asked already."""
        try:
            if after is not None:
                return vm.wait_console(SELFCHECK_RE, after=after, timeout=SELFCHECK_TIMEOUT).group(0).decode()
            return vm.selfcheck(timeout=SELFCHECK_TIMEOUT)
        except GuestFailed as exc:
            return f"the guest failed: {str(exc).splitlines()[0]}"
        except ConfmigError as exc:
            return f"no verdict: {exc}"


class HostListener:
    """The host's own end of a migration: takes one connection, keeps what arrives until a PSP
    page of ``watched`` did (or the source stopped sending), then hangs up."""

    IDLE: Final = 5.0
    """Seconds without a byte after which the listener stops reading."""
    ACCEPT: Final = 60.0

    def __init__(self, watched: GpaRanges) -> None:
        self.watched = watched
        self.received = bytearray()
        self.finished = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(self.ACCEPT)
        threading.Thread(target=self._serve, daemon=True, name="host-listener").start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> HostListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            self.finished.set()
            return
        decoder = StreamDecoder()
        with conn, contextlib.suppress(OSError, ConfmigError):
            conn.settimeout(self.IDLE)
            while data := conn.recv(256 * 1024):
                self.received += data
                decoder.receive_data(data)
                if self._watched_page(decoder):
                    break
            conn.shutdown(socket.SHUT_RDWR)
        self.finished.set()

    def _watched_page(self, decoder: StreamDecoder) -> bool:
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, End):
                return False
            if isinstance(event, Confidential) and event.subtype == ConfidentialSubtype.PSP_PACKET:
                record = psp_records.decode(event.payload)
                if isinstance(record, psp_records.PspPage) and any(
                        lo <= record.gpa < hi for lo, hi in self.watched):
                    return True
        return False


def checked_pages(vm: VmProc) -> GpaRanges:
    """The guest addresses the dirty workload's self-check covers (its version table and its
    working set), from its console line."""
    m = WORKING_SET_RE.search(vm.console_text())
    if m is None:
        raise ConfmigError(f"{vm.name}: its console does not say where its working set is")
    table = int(m.group(2), 16)
    pieces = [(int(gpa, 16), int(pages)) for pages, gpa in PIECE_RE.findall(m.group(1).decode())]
    npages = sum(n for _, n in pieces)
    table_pages = -(-npages * 8 // PAGE_SIZE)
    return [(table, table + table_pages * PAGE_SIZE), *((gpa, gpa + n * PAGE_SIZE) for gpa, n in pieces)]


# --- the saved table ---------------------------------------------------------------------------


def save(directory: Path, outcomes: list[Outcome], *, t0: float) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t0))
    report = report_of(outcomes, t0=t0)
    name = f"attacks-{stamp}"
    paths = [directory / f"{name}.json", directory / f"{name}.md", directory / "attacks-latest.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    text = "\n".join(markdown(report)) + "\n"
    paths[1].write_text(text)
    paths[2].write_text(text)
    return paths


def report_of(outcomes: list[Outcome], *, t0: float) -> dict[str, Any]:
    from confmig.bench.perf import machine_info

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), "machine": machine_info(),
            "duration_s": round(time.time() - t0, 1), "guest": {"ram": RAM, "workload": GUEST},
            "not_applicable": dict(NOT_APPLICABLE),
            "all_as_designed": all(o.matches for o in outcomes),
            "outcomes": [{**asdict(o), "matches": o.matches} for o in outcomes]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def markdown(report: dict[str, Any]) -> list[str]:
    outcomes: list[dict[str, Any]] = report["outcomes"]
    backends = list(dict.fromkeys(o["backend"] for o in outcomes))
    names = list(dict.fromkeys(o["case"] for o in outcomes))
    by = {(o["backend"], o["case"]): o for o in outcomes}
    lines = [f"# Attacks on the migration stream, {report['date']}", "",
             f"Machine: {report['machine']}. Guest: {report['guest']['ram']}, "
             f"`{report['guest']['workload']}` "
             f"(its self-check verifies every page of its working set and version table). Whole run: "
             f"{report['duration_s'] / 60:.1f} min. Every result below is from this run; "
             + ("every one is what the design says." if report["all_as_designed"]
                else "rows marked NO differ from what the design says."),
             "", "A hostile host sits between the two VMMs (`confmig.bench.attacks`: a proxy that parses the "
             "stream and rewrites whole page records) or replays what it recorded. **caught**: the target "
             "refused the stream and does not run the guest. **not caught: corrupted**: the target runs the "
             "guest and its self-check fails. **not caught: harmless**: the target runs it intact. **not "
             "caught: a copy runs**: the guest runs on a target the owner did not send it to. **not caught: "
             "memory read**: the host decrypted the guest's private pages. **—**: does not apply.", "",
             "| attack | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for n in names:
        cells = []
        for b in backends:
            o = by.get((b, n))
            cells.append("—" if o is None else o["verdict"] + ("" if o["matches"] else " (**NO**)"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for backend, why in report["not_applicable"].items():
        lines += ["", f"**{backend}**: not in the table. {why}"]
    for b in backends:
        lines += ["", f"## {b}", "",
                  "| attack | what the host does | result | as designed | why (the design) | caught by (the "
                  "target's error) | target | source afterwards | what was done |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            o = by.get((b, n))
            if o is None:
                continue
            target = o["target"] + (f": {o['target_selfcheck']}" if o["target_selfcheck"] else "")
            source = o["source"] + (f": {o['source_selfcheck']}" if o["source_selfcheck"] else "")
            lines.append("| " + " | ".join(_cell(x) for x in (
                n, o["what"], o["verdict"], "yes" if o["matches"] else "**NO**", o["why"], o["caught_by"],
                target, source, o["acted"])) + " |")
    lines += ["", "Reproduce: `make attacks` (or `confmig attacks --save benchmarks/`). The design, and "
              "what each backend protects: `docs/security.md`."]
    return lines
