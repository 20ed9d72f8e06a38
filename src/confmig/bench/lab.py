"""A lab of emulated hosts and VMs on this machine: real processes, real sockets.

Everything the lab starts it also stops, whatever way the scenario ends:

* an error or exception unwinds through :meth:`Lab.close` (the lab is a context manager);
* SIGTERM and SIGINT do too, inside :func:`signals_unwind`;
* and if this process dies without unwinding (SIGKILL), each of its hosts and VMMs gets
  SIGKILL from the kernel (``confmig.common.pdeathsig``), and each host's vCPU processes
  in turn.

The hosts are those of this installation: their AMD root and platform identities live
in the state directory (``confmig.common.paths``), made by the first host that needs
them and kept, as a real machine keeps its chip's keys.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from confmig.bench.deadline import NO_DEADLINE, Deadline
from confmig.common.errors import ConfigError, ConfmigError
from confmig.common.paths import state_home
from confmig.common.pdeathsig import child_environment
from confmig.common.units import KiB, MiB, format_size
from confmig.vmm import cmdline
from confmig.vmm.memory import pc_regions
from confmig.vmm.qmp.client import QmpClient

if TYPE_CHECKING:
    from confmig.owner import OwnerServer

START_TIMEOUT = 30.0
"""Seconds for a host to listen or a VMM to serve QMP (a 1 GiB target preallocates its RAM)."""
STOP_TIMEOUT = 5.0
"""Seconds a stopped process gets to exit before SIGKILL."""
RUNSTATE_POLL = 0.5
"""Seconds between ``query-status`` calls while a wait watches a guest."""
CONSOLE_TAIL_LINES = 8
"""Console lines an error about a guest quotes: its last words say what happened."""
SELFCHECK_RE = re.compile(rb"confmig-selfcheck: (PASS|FAIL)[^\n]*")
WORKING_SET_WRITTEN = re.compile(rb"dirty: working set written")
"""The dirty workload's line once every page of its working set holds data."""
WORKLOAD_READY_RE = re.compile(rb"confmig kernel: workload \w+")
"""What the guest kernel prints once its workload runs."""
WORKLOAD_STARTED = {
    "idle": WORKLOAD_READY_RE,
    "dirty": re.compile(rb"dirty: \d+ pages"),
    "kv": re.compile(rb"kv: serving"),
}
"""Each workload's console line once it runs: its memory laid out, its device found."""
HALTED_RE = re.compile(rb"; halted\n")
"""How the guest kernel ends the line of a guest that stopped for good."""
FAILED_RUNSTATES = frozenset({"shutdown", "internal-error", "guest-panicked"})
"""QMP run states a guest of a scenario does not come back from (QEMU's names)."""


def confmig_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "confmig", *args]


class GuestFailed(ConfmigError):
    """A guest halted, faulted or lost its VMM; the message ends with its console's last lines."""


@dataclass
class HostProc:
    name: str
    socket: str
    proc: subprocess.Popen[bytes]

    def listening(self) -> bool | None:
        """True once the host accepts connections; raises if it exited."""
        if self.proc.poll() is not None:
            raise ConfmigError(f"host {self.name} exited with {self.proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return None
        return True


@dataclass
class VmProc:
    name: str
    host: HostProc
    qmp_path: str
    console: Path
    proc: subprocess.Popen[bytes]
    qmp: QmpClient
    deadline: Deadline = NO_DEADLINE
    argv: list[str] = field(default_factory=list)
    _runstate_checked: float = field(default=0.0, init=False, repr=False)

    def console_text(self) -> bytes:
        try:
            return self.console.read_bytes()
        except FileNotFoundError:
            return b""

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        text = self.console_text().decode(errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:]) if text else "(nothing on the console)"

    def fail(self, reason: str) -> GuestFailed:
        return GuestFailed(f"{self.name}: {reason}; last console lines:\n{self.console_tail()}")

    def quit(self) -> None:
        """QMP ``quit``, then wait until the VMM has exited (killed past ``STOP_TIMEOUT``): a
        VMM that is still unmapping its guest's RAM takes CPU from whatever is measured next."""
        with contextlib.suppress(ConfmigError, OSError):
            self.qmp.execute("quit")
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def check_alive(self) -> None:
        """Raise :class:`GuestFailed` if the VMM exited, the guest halted, or its run state
        is one a guest does not come back from (asked at most every ``RUNSTATE_POLL``)."""
        if self.proc.poll() is not None:
            raise self.fail(f"its VMM exited with {self.proc.returncode}")
        if HALTED_RE.search(self.console_text()):
            raise self.fail("the guest halted")
        now = time.monotonic()
        if now - self._runstate_checked >= RUNSTATE_POLL:
            self._runstate_checked = now
            status = self.qmp.execute("query-status")["status"]
            if status in FAILED_RUNSTATES:
                raise self.fail(f"run state {status}")

    def wait_console(self, pattern: re.Pattern[bytes], *, after: int = 0,
                     timeout: float = 60.0) -> re.Match[bytes]:
        """The first match of ``pattern`` on the console from byte ``after``; a guest that
        fails first ends the wait (:meth:`check_alive`)."""

        def seen() -> re.Match[bytes] | None:
            m = pattern.search(self.console_text(), after)
            if m is None:
                self.check_alive()
            return m

        shown = pattern.pattern.decode(errors="replace")
        return self.deadline.wait(f"{self.name}'s console to show {shown!r}", seen, timeout=timeout)

    def selfcheck(self, timeout: float = 120.0) -> str:
        """Ask the guest to verify all its pages (an NMI) and return its verdict line."""
        mark = len(self.console_text())
        self.qmp.execute("inject-nmi")
        return self.wait_console(SELFCHECK_RE, after=mark, timeout=timeout).group(0).decode()


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSpec:
    """One VM of a lab to start: ``confmig vm`` on ``host`` with ``-m ram --guest guest``."""

    name: str
    host: HostProc
    ram: str = "256M"
    guest: str = "idle"
    incoming: str | None = None
    extra: tuple[str, ...] = ()


def check_vm(ram: str, guest: str, extra: tuple[str, ...] = ()) -> cmdline.MachineConfig:
    """What a VM of these options would refuse or where its guest would halt, found before
    anything starts: the VMM's own command-line rules, then the workload's options and
    whether they fit the RAM map the VMM will give the guest (the guest's own rules)."""
    from confmig.guest.kernel import parse_cmdline
    from confmig.guest.workloads import WORKLOADS, dirty

    config = cmdline.parse(["--host", "-", "-m", ram, "--guest", guest, *extra])
    workload = WORKLOADS[config.guest.workload]
    try:  # as the guest kernel reads its command line: its own options, then the workload's
        encoded = workload.parse(parse_cmdline(config.guest.kernel_cmdline()).options)
    except ValueError as exc:
        raise ConfigError(f"workload {config.guest.workload}: {exc}") from None
    if workload is dirty.WORKLOAD:
        most = largest_working_set(config.ram_size)
        if dirty.working_set(encoded) > most:
            raise ConfigError(f"workload dirty: the working set does not fit {format_size(config.ram_size)} "
                              f"of guest RAM: wss={size_option(most)} at most (or wss=all), or more RAM")
    return config


def largest_working_set(ram_size: int) -> int:
    """Bytes of the largest working set the dirty workload fits in a guest with ``ram_size``
    bytes of RAM: the guest's own rule, on the RAM map the VMM gives it."""
    from confmig.guest.workloads import dirty

    return dirty.max_working_set([r.range for r in pc_regions(ram_size)])


def size_option(size: int) -> str:
    """``size`` rounded down to how a size option is written: whole MiB, or KiB below that."""
    return f"{size // MiB}M" if size >= MiB else f"{size // KiB}K"


def check_host_memory(need: int, what: str) -> None:
    """Refuse, before anything starts, a scenario whose guests would not fit this machine's
    available memory (the kernel would kill a process half-way instead)."""
    available = _mem_available()
    if available is not None and need > available:
        raise ConfigError(f"{what} needs about {need // MiB} MiB of this machine's memory and "
                          f"{available // MiB} MiB is available: ask for less")


def _mem_available() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class Lab:
    def __init__(self, root: str | None = None, *, keep: bool = False, deadline: Deadline = NO_DEADLINE,
                 installation: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="confmig-lab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.deadline = deadline
        self.hosts: list[HostProc] = []
        self.vms: list[VmProc] = []
        self._host_procs: list[subprocess.Popen[bytes]] = []
        self._vm_procs: list[subprocess.Popen[bytes]] = []
        """Every process started, from the moment it is: one that never came up is stopped too."""
        self.owners: list[OwnerServer] = []
        self.installation = installation or state_home()
        """Where the hosts keep what a real installation keeps: its AMD root, their identities."""
        self.amd_root = self.installation / "amd-root"
        """The emulated AMD root every host of this lab chains up to (and its owners trust)."""
        self._log = open(self.root / "processes.log", "ab")  # noqa: SIM115

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @functools.cached_property
    def bios(self) -> Path:
        """The built-in firmware image, installed once for every VM of this lab."""
        from confmig.bench.firmware import default_bios

        return default_bios()

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """A process of this lab: in a session of its own (the terminal's Ctrl-C reaches this
        process only, which then stops the lab in order), ending with this process."""
        return subprocess.Popen(argv, stdout=self._log, stderr=self._log, start_new_session=True,
                                env=child_environment())

    def host(self, name: str) -> HostProc:
        return self.start_hosts(name)[0]

    def start_hosts(self, *names: str) -> list[HostProc]:
        """Hosts started side by side, returned once all listen."""
        started = []
        for name in names:
            sock = str(self.root / f"{name}.sock")
            proc = self._spawn(confmig_argv("host", "--socket", sock, "--amd-root", str(self.amd_root),
                                            "--state-dir", str(self.installation / "hosts" / name)))
            self._host_procs.append(proc)
            started.append(HostProc(name=name, socket=sock, proc=proc))
            self.hosts.append(started[-1])
        for h in started:
            self.deadline.wait(f"host {h.name} to listen (see {self._log.name})", h.listening,
                               timeout=START_TIMEOUT)
        return started

    def vm(self, name: str, host: HostProc, *, ram: str = "256M", guest: str = "idle",
           incoming: str | None = None, extra: list[str] | None = None) -> VmProc:
        spec = VmSpec(name=name, host=host, ram=ram, guest=guest, incoming=incoming, extra=tuple(extra or ()))
        return self.start_vms(spec)[0]

    def start_vms(self, *specs: VmSpec) -> list[VmProc]:
        """VMs started side by side (a target preallocating its RAM while the source boots),
        returned once all serve QMP. Options a VM would refuse fail here, before any starts."""
        for spec in specs:
            check_vm(spec.ram, spec.guest, spec.extra)
        launched = [self._spawn_vm(spec) for spec in specs]
        return [self._connect(spec, proc, argv) for spec, (proc, argv) in zip(specs, launched, strict=True)]

    def _spawn_vm(self, spec: VmSpec) -> tuple[subprocess.Popen[bytes], list[str]]:
        argv = confmig_argv("vm", "--host", spec.host.socket, "-name", spec.name, "-m", spec.ram,
                            "--guest", spec.guest, "-qmp", f"unix:{self._qmp_path(spec)},server=on,wait=off",
                            "-serial", f"file:{self._console_path(spec)}")
        if spec.incoming:
            argv += ["-incoming", spec.incoming]
        argv += spec.extra
        if "-bios" not in argv:
            argv += ["-bios", str(self.bios)]  # once per lab, not a child process per VM
        proc = self._spawn(argv)
        self._vm_procs.append(proc)
        return proc, argv

    def _qmp_path(self, spec: VmSpec) -> str:
        return str(self.root / f"{spec.name}.qmp")

    def _console_path(self, spec: VmSpec) -> Path:
        return self.root / f"{spec.name}.console"

    def _connect(self, spec: VmSpec, proc: subprocess.Popen[bytes], argv: list[str]) -> VmProc:
        qmp = self._qmp_path(spec)

        def serving() -> bool | None:
            if proc.poll() is not None:
                raise ConfmigError(f"vm {spec.name} exited with {proc.returncode}: see {self._log.name}")
            return True if os.path.exists(qmp) else None

        self.deadline.wait(f"vm {spec.name} to serve QMP", serving, timeout=START_TIMEOUT)
        v = VmProc(name=spec.name, host=spec.host, qmp_path=qmp, console=self._console_path(spec), proc=proc,
                   qmp=QmpClient(qmp), deadline=self.deadline, argv=argv)
        self.vms.append(v)
        return v

    def kv_device(self, vm: str) -> list[str]:
        """The ``-device`` options of VM ``vm``'s kv device: it serves clients on a socket of
        the lab (the kv workload halts without one)."""
        return ["-device", f"confmig-kv,path={self.root / f'kv-{vm}.sock'}"]

    def owner(self, *, firmware: Path, policy: int, secrets: list[tuple[uuid.UUID, bytes]] | None = None,
              audit: Callable[[Mapping[str, object]], None] | None = None, vcpus: int = 1,
              mh_vcpus: int = 0) -> OwnerServer:
        """A guest owner's key broker, in this process, trusting this lab's AMD root (start a
        host first: the first host creates the root) and expecting ``firmware`` and ``policy``
        (and, for SEV-ES, the reset VMSAs of ``vcpus`` vCPUs and the entry VMSAs of ``mh_vcpus``
        Migration Handler vCPUs)."""
        from confmig.owner import AmdRoot, KeyBroker, VmProfile, firmware_digest, make_server
        from confmig.platform.psp.policy import PolicyFlag

        es_vcpus = vcpus if policy & PolicyFlag.ES else 0
        digest = firmware_digest(firmware.read_bytes(), sev_es_vcpus=es_vcpus, mh_vcpus=mh_vcpus)
        profile = VmProfile.build(digest=digest, policy=policy, secrets=secrets or [])
        server = make_server(KeyBroker(AmdRoot.load(self.amd_root), {"*": profile}, audit=audit))
        threading.Thread(target=server.serve_forever, name="owner", daemon=True).start()
        self.owners.append(server)
        return server

    def close(self) -> None:
        """Stop everything, VMs before their hosts, each side in parallel. A VMM takes SIGTERM
        as QMP ``quit``; one that hangs is killed, so this ends within twice ``STOP_TIMEOUT``,
        and a signal meanwhile takes effect once it has (:func:`_signals_deferred`)."""
        with _signals_deferred():
            for o in self.owners:
                o.shutdown()
                o.server_close()
            self.owners.clear()
            for v in self.vms:
                v.qmp.close()
            _stop(self._vm_procs)
            _stop(self._host_procs)
            self._vm_procs.clear()
            self._host_procs.clear()
            self.vms.clear()
            self.hosts.clear()
            self._log.close()
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each (a VM told to quit may be gone already), then wait for all together;
    what does not exit in ``STOP_TIMEOUT`` is killed with its process group (a host's vCPUs)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + STOP_TIMEOUT
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # stray vCPU processes of a host that died


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back (in the main thread, where Python runs handlers) until the
    block is done, then delivered to the handlers there were: a lab that is stopping finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, _frame: arrived.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:
            signal.raise_signal(arrived[0])


class Interrupted(ConfmigError):
    """A signal ended the scenario; the labs it ran were stopped on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in this (the main) thread, so that a
    scenario unwinds through its labs' ``close``. The first signal restores the default
    action: a second one ends this process at once, and its children with it."""
    signals = (signal.SIGTERM, signal.SIGINT)

    def unwind(signum: int, _frame: FrameType | None) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, unwind) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
