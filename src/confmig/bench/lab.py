"""A lab of emulated hosts and VMs on this machine: real processes, real sockets.

Everything the lab starts it also stops, even when a scenario fails half-way.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from confmig.common.errors import ConfmigError
from confmig.vmm.qmp.client import QmpClient

if TYPE_CHECKING:
    from confmig.owner import OwnerServer

START_TIMEOUT = 30.0
SELFCHECK_RE = re.compile(rb"confmig-selfcheck: (PASS|FAIL)[^\n]*")
WORKING_SET_WRITTEN = re.compile(rb"dirty: working set written")
"""The dirty workload's line once every page of its working set holds data."""
WORKLOAD_READY_RE = re.compile(rb"confmig kernel: workload \w+")
"""What the guest kernel prints once its workload runs."""


def confmig_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "confmig", *args]


@dataclass
class HostProc:
    name: str
    socket: str
    proc: subprocess.Popen[bytes]


@dataclass
class VmProc:
    name: str
    host: HostProc
    qmp_path: str
    console: Path
    proc: subprocess.Popen[bytes]
    qmp: QmpClient
    argv: list[str] = field(default_factory=list)

    def console_text(self) -> bytes:
        try:
            return self.console.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_console(self, pattern: re.Pattern[bytes], *, after: int = 0,
                     timeout: float = 60.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.console_text(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                raise ConfmigError(f"{self.name} exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise ConfmigError(f"{self.name}: console never showed {pattern.pattern!r}")

    def selfcheck(self, timeout: float = 120.0) -> str:
        """Ask the guest to verify all its pages (an NMI) and return its verdict line."""
        mark = len(self.console_text())
        self.qmp.execute("inject-nmi")
        return self.wait_console(SELFCHECK_RE, after=mark, timeout=timeout).group(0).decode()


class Lab:
    def __init__(self, root: str | None = None, *, keep: bool = False) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="confmig-lab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.hosts: list[HostProc] = []
        self.vms: list[VmProc] = []
        self.owners: list[OwnerServer] = []
        self.amd_root = self.root / "amd-root"
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

    def host(self, name: str) -> HostProc:
        sock = str(self.root / f"{name}.sock")
        proc = subprocess.Popen(confmig_argv("host", "--socket", sock, "--amd-root", str(self.amd_root),
                                             "--state-dir", str(self.root / f"{name}-state")),
                                stdout=self._log, stderr=self._log, start_new_session=True)
        h = HostProc(name=name, socket=sock, proc=proc)
        self.hosts.append(h)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise ConfmigError(f"host {name} exited with {proc.returncode}: see {self._log.name}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                return h
            except OSError:
                if time.monotonic() > deadline:
                    raise ConfmigError(f"host {name} did not start") from None
                time.sleep(0.02)

    def vm(self, name: str, host: HostProc, *, ram: str = "256M", guest: str = "idle",
           incoming: str | None = None, extra: list[str] | None = None) -> VmProc:
        qmp = str(self.root / f"{name}.qmp")
        console = self.root / f"{name}.console"
        argv = confmig_argv("vm", "--host", host.socket, "-name", name, "-m", ram,
                            "--guest", guest, "-qmp", f"unix:{qmp},server=on,wait=off",
                            "-serial", f"file:{console}")
        if incoming:
            argv += ["-incoming", incoming]
        argv += extra or []
        if "-bios" not in argv:
            argv += ["-bios", str(self.bios)]  # once per lab, not a child process per VM
        proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(qmp):
            if proc.poll() is not None:
                raise ConfmigError(f"vm {name} exited with {proc.returncode}: see {self._log.name}")
            if time.monotonic() > deadline:
                proc.kill()
                raise ConfmigError(f"vm {name} did not start")
            time.sleep(0.02)
        v = VmProc(name=name, host=host, qmp_path=qmp, console=console, proc=proc,
                   qmp=QmpClient(qmp), argv=argv)
        self.vms.append(v)
        return v

    def owner(self, *, firmware: Path, policy: int, secrets: list[tuple[uuid.UUID, bytes]] | None = None,
              audit: Callable[[Mapping[str, object]], None] | None = None, vcpus: int = 1) -> OwnerServer:
        """A guest owner's key broker, in this process, trusting this lab's AMD root (start a
        host first: the first host creates the root) and expecting ``firmware`` and ``policy``
        (and, for SEV-ES, the reset VMSAs of ``vcpus`` vCPUs)."""
        from confmig.owner import AmdRoot, KeyBroker, VmProfile, firmware_digest, make_server
        from confmig.platform.psp.policy import PolicyFlag

        es_vcpus = vcpus if policy & PolicyFlag.ES else 0
        digest = firmware_digest(firmware.read_bytes(), sev_es_vcpus=es_vcpus)
        profile = VmProfile.build(digest=digest, policy=policy, secrets=secrets or [])
        server = make_server(KeyBroker(AmdRoot.load(self.amd_root), {"*": profile}, audit=audit))
        threading.Thread(target=server.serve_forever, name="owner", daemon=True).start()
        self.owners.append(server)
        return server

    def close(self) -> None:
        for o in self.owners:
            o.shutdown()
            o.server_close()
        self.owners.clear()
        for v in self.vms:
            with contextlib.suppress(ConfmigError, OSError):
                v.qmp.execute("quit")
            v.qmp.close()
        for p in [v.proc for v in self.vms] + [h.proc for h in self.hosts]:
            _stop(p)
        self.vms.clear()
        self.hosts.clear()
        self._log.close()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # stray vCPU processes of a dead host
