"""Bad input from the operator, the command line, the stream or a peer: the error is
clear, the VM keeps running and nothing is lost.

"Clear" here means QEMU's error classes and wording where QEMU has one, one line,
and no Python exception text (``[Errno 104]``, tracebacks) leaking out.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from confmig.bench.lab import HostProc, Lab, VmProc, confmig_argv
from confmig.bench.scenario import MigrationSettings, configure, incoming_uri
from confmig.vmm.qmp.client import QmpCommandError

MiB = 1 << 20
TIMEOUT = 60.0
FINISHED = ("completed", "failed", "cancelled")
GUEST = "dirty,rate=2000,wss=8M,fill=random,prefill=on"
WSS_PAGES = 2048
BIG_GUEST = "dirty,rate=2000,wss=64M,fill=random,prefill=on"
PREFILLED = re.compile(rb"dirty: working set written")
SELFCHECK = re.compile(r"confmig-selfcheck: (PASS|FAIL) pages=(\d+) writes=(\d+)")


# --- helpers -------------------------------------------------------------------------------


def start_guest(lab: Lab, name: str, host: HostProc, ram: str = "64M", guest: str = GUEST) -> VmProc:
    vm = lab.vm(name, host, ram=ram, guest=guest)
    vm.wait_console(PREFILLED, timeout=TIMEOUT)
    return vm


def wait_migration(vm: VmProc, states: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info: dict[str, Any] = vm.qmp.execute("query-migrate")
        if info.get("status") in states:
            return info
        assert time.monotonic() < deadline, f"{vm.name}: migration stuck at {info}"
        time.sleep(0.02)


def runstate(vm: VmProc) -> str:
    status: str = vm.qmp.execute("query-status")["status"]
    return status


def wait_runstate(vm: VmProc, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (now := runstate(vm)) != state:
        assert time.monotonic() < deadline, f"{vm.name} is {now}, never {state}"
        time.sleep(0.02)


def migration_statuses(vm: VmProc, last: str) -> list[str]:
    deadline = time.monotonic() + 10.0
    while True:
        statuses = [e["data"]["status"] for e in vm.qmp.events if e["event"] == "MIGRATION"]
        if last in statuses or time.monotonic() > deadline:
            return statuses
        vm.qmp.execute("query-status")  # reads whatever events arrived meanwhile
        time.sleep(0.02)


def selfcheck(vm: VmProc) -> int:
    """The guest's self-check must PASS; returns how many pages it has written so far."""
    line = vm.selfcheck(timeout=TIMEOUT)
    m = SELFCHECK.match(line)
    assert m is not None and m.group(1) == "PASS", f"{vm.name}: {line}"
    assert int(m.group(2)) == WSS_PAGES  # the whole working set was verified
    return int(m.group(3))


def assert_unharmed(vm: VmProc) -> None:
    """Still running, every page intact, and still making progress."""
    assert runstate(vm) == "running"
    before = selfcheck(vm)
    time.sleep(0.2)
    assert selfcheck(vm) > before


def assert_clear(message: str) -> None:
    assert message and "\n" not in message, repr(message)
    assert "Errno" not in message and "Traceback" not in message, message


def qmp_error(vm: VmProc, command: str, **args: Any) -> tuple[str, str]:
    with pytest.raises(QmpCommandError) as caught:
        vm.qmp.execute(command, **args)
    return caught.value.error_class, caught.value.desc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_fake_target(serve: Callable[[socket.socket], None]) -> tuple[str, threading.Thread]:
    """A plain TCP server in the test that plays the target: ``serve`` gets the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                serve(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"tcp:127.0.0.1:{port}", thread


# --- QMP -----------------------------------------------------------------------------------


QMP_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no-such-command", {}, "CommandNotFound", "The command no-such-command has not been found"),
    ("migrate", {}, "GenericError", "Parameter 'uri' is missing"),
    ("migrate", {"uri": 5}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
    ("migrate", {"uri": "gopher:host:1"}, "GenericError",
     "Invalid migration URI 'gopher:host:1': unknown transport 'gopher'"),
    ("migrate", {"uri": "tcp:127.0.0.1"}, "GenericError",
     "Invalid migration URI 'tcp:127.0.0.1': port must be a number in 0..65535"),
    ("migrate", {"uri": "tcp:127.0.0.1:65536"}, "GenericError",
     "Invalid migration URI 'tcp:127.0.0.1:65536': port must be a number in 0..65535"),
    ("migrate", {"uri": "unix:"}, "GenericError",
     "Invalid migration URI 'unix:' (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD)"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}, "GenericError",
     "Postcopy recovery ('resume') is not supported"),
    ("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "GenericError",
     "migrate-incoming not allowed in state running "
     "(requires '-incoming' was specified on the command line)"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
     "GenericError", "Capability 'postcopy-ram' is not supported by confmig"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": "on"}]},
     "GenericError", "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ("migrate-set-parameters", {"max-bandwidth": 0}, "GenericError",
     "Parameter 'max-bandwidth' expects a positive integer"),
    ("migrate-set-parameters", {"multifd-channels": 256}, "GenericError",
     "Parameter 'multifd-channels' expects an integer in range [1, 255]"),
]  # fmt: skip


def test_qmp_errors_are_qemus_and_the_vm_keeps_running(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    vm = start_guest(lab, "vm", hosts[0])
    for command, args, error_class, desc in QMP_CASES:
        assert qmp_error(vm, command, **args) == (error_class, desc), (command, args)
    assert vm.qmp.execute("query-migrate") == {}  # no migration was ever started
    params = vm.qmp.execute("query-migrate-parameters")
    assert params["max-bandwidth"] > 0 and params["multifd-channels"] == 2  # nothing half-applied
    assert_unharmed(vm)


def test_a_second_migrate_while_one_is_active_is_refused(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src = start_guest(lab, "src", hosts[0], "256M", BIG_GUEST)
    dst = lab.vm("dst", hosts[1], ram="256M", guest=BIG_GUEST, incoming="defer")
    slow = MigrationSettings(max_bandwidth=20_000_000)  # 64 MiB: more than 3 s
    configure(src, slow)
    configure(dst, slow)
    uri = incoming_uri(dst)
    src.qmp.execute("migrate", uri=uri)
    wait_migration(src, ("active",))

    busy = ("GenericError", "There's a migration process in progress")
    assert qmp_error(src, "migrate", uri=uri) == busy
    assert qmp_error(src, "migrate", uri="tcp:127.0.0.1:1") == busy
    assert qmp_error(src, "migrate-set-capabilities",
                     capabilities=[{"capability": "multifd", "state": True}]) == busy
    assert qmp_error(dst, "migrate-incoming", uri="tcp:127.0.0.1:0") == (
        "GenericError", "The incoming migration has already been started")
    assert src.qmp.execute("query-migrate")["status"] == "active"  # the first one goes on

    src.qmp.execute("migrate_cancel")
    assert wait_migration(src)["status"] == "cancelled"
    assert wait_migration(dst)["status"] == "failed"
    assert runstate(dst) == "inmigrate"
    assert runstate(src) == "running"
    line = src.selfcheck(timeout=TIMEOUT)
    assert line.startswith("confmig-selfcheck: PASS"), line


def test_migrate_to_a_port_nobody_listens_on(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    vm = start_guest(lab, "vm", hosts[0])
    configure(vm, MigrationSettings())
    port = free_port()
    vm.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_migration(vm)
    assert info["status"] == "failed"
    assert info["error-desc"] == f"Failed to connect to 'tcp:127.0.0.1:{port}': Connection refused"
    assert migration_statuses(vm, "failed") == ["setup", "failed"]
    assert_unharmed(vm)


def test_migrate_to_a_command_that_exits_at_once(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    vm = start_guest(lab, "vm", hosts[0])
    vm.qmp.execute("migrate", uri="exec:exit 3")
    info = wait_migration(vm)
    assert info["status"] == "failed"
    assert info["error-desc"] == "Unable to write to command: Broken pipe"
    assert_unharmed(vm)


# --- peers that misbehave ------------------------------------------------------------------


def test_target_closes_the_connection_mid_stream(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    vm = start_guest(lab, "vm", hosts[0])
    received: list[bytes] = []

    def take_a_little_and_hang_up(conn: socket.socket) -> None:
        received.append(conn.recv(64))  # leaving unread data behind makes close() reset

    uri, fake = start_fake_target(take_a_little_and_hang_up)
    vm.qmp.execute("migrate", uri=uri)
    info = wait_migration(vm)
    fake.join(TIMEOUT)

    assert received and received[0].startswith(b"QEVM")
    assert info["status"] == "failed"
    assert_clear(info["error-desc"])
    assert re.fullmatch(r"(Unable to write to socket|target did not confirm the migration): "
                        r"(Connection reset by peer|Broken pipe|.*connection closed)",
                        info["error-desc"]), info["error-desc"]
    assert_unharmed(vm)


def test_garbage_on_the_return_path(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """The fake target swallows the whole stream and answers garbage instead of its verdict:
    the source was already stopped for the switch-over. The target may be running the guest, so
    the source stays paused (two copies would run) until the operator says cont."""
    src = start_guest(lab, "src", hosts[0])
    configure(src, MigrationSettings())
    stream = bytearray()

    def swallow_and_lie(conn: socket.socket) -> None:
        conn.sendall(b"garbage!" * 4)
        with contextlib.suppress(ConnectionResetError):  # the source left our garbage unread
            while chunk := conn.recv(1 << 20):
                stream.extend(chunk)

    uri, fake = start_fake_target(swallow_and_lie)
    src.qmp.execute("migrate", uri=uri)
    info = wait_migration(src)
    fake.join(TIMEOUT)

    assert not fake.is_alive()  # the source hung up rather than waiting for a body
    assert stream.startswith(b"QEVM")
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        "target did not confirm the migration: unknown return-path message 0x6761 (at stream offset 0); "
        "the target may be running the guest (its verdict was lost), so the source stays paused: "
        "cont runs it here if the target does not")
    assert migration_statuses(src, "failed") == ["setup", "active", "device", "failed"]
    names = [e["event"] for e in src.qmp.events]
    assert "STOP" in names and "RESUME" not in names[names.index("STOP"):], names  # stopped, held
    assert runstate(src) == "paused"
    src.qmp.execute("cont")  # the operator knows the fake target runs nothing
    assert_unharmed(src)

    # Nothing was lost: a real target gets the guest afterwards.
    dst = lab.vm("dst", hosts[1], ram="64M", guest=GUEST, incoming="defer")
    configure(dst, MigrationSettings())
    src.qmp.execute("migrate", uri=incoming_uri(dst))
    assert wait_migration(src)["status"] == "completed"
    wait_runstate(dst, "running")
    selfcheck(dst)


# --- broken streams ------------------------------------------------------------------------


def _ram_start(data: bytes) -> int:
    at = data.find(b"\x01\x00\x00\x00\x00\x03ram")  # SECTION_START, id 0, "ram"
    assert at > 0
    return at


def _cpu_section(data: bytes) -> int:
    at = data.find(b"\x04\x00\x00\x00\x01\x03cpu")  # SECTION_FULL, id 1, "cpu"
    assert at > 0
    return at


def _patch(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


TRUNCATED = r"truncated: {what} needs \d+ bytes, input ends after \d+ \(at stream offset \d+\)"
BROKEN: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated-in-half": (lambda d: d[: len(d) // 2], TRUNCATED.format(what=".+")),
    "truncated-in-device-state": (lambda d: d[: _cpu_section(d) + 40],
                                  TRUNCATED.format(what="device state")),
    "empty": (lambda d: b"", r"truncated: file header needs 8 bytes, input ends after 0 .*"),
    "bad-magic": (lambda d: _patch(d, 0, 0x00),
                  r"bad file magic 0x0045564d \(expected 0x5145564d\) \(at stream offset 0\)"),
    "section-type": (lambda d: _patch(d, _cpu_section(d), 0x09),
                     r"unknown section type 0x09 \(at stream offset \d+\)"),
    "ram-record-flags": (lambda d: _patch(d, _ram_start(d) + 24, d[_ram_start(d) + 24] | 0x40),
                         r"unsupported RAM record flags 0x044 \(MEM_SIZE\|XBZRLE\) \(at stream offset \d+\)"),
    "unknown-device": (lambda d: _patch(d, _cpu_section(d) + 6, ord("x")), r"unknown device section 'xpu'"),
}  # fmt: skip
"""How each case breaks a good stream, and the error it must give. ``_ram_start + 24`` is
the low byte of the section's first record (``MEM_SIZE``): 17 bytes of section header
(type, id, idstr, instance, version), then the big-endian u64 ``size | flags``."""


@pytest.fixture(scope="module")
def good_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A stream saved from a running guest, the template every broken case starts from."""
    path = tmp_path_factory.mktemp("stream") / "good.mig"
    with Lab() as lab:
        vm = start_guest(lab, "vm", lab.host("host"))
        vm.qmp.execute("migrate", uri=f"file:{path}")
        assert wait_migration(vm)["status"] == "completed"
    yield path.read_bytes()


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_stream_fails_the_restore_and_the_guest_never_runs(
    lab: Lab, good_stream: bytes, case: str
) -> None:
    breaker, expected = BROKEN[case]
    path = lab.root / f"{case}.mig"
    path.write_bytes(breaker(good_stream))
    vm = lab.vm("dst", lab.host("host"), ram="64M", guest=GUEST, incoming="defer")
    configure(vm, MigrationSettings())
    vm.qmp.execute("migrate-incoming", uri=f"file:{path}")

    info = wait_migration(vm)

    assert info["status"] == "failed"
    desc = info["error-desc"]
    assert_clear(desc)
    assert desc.startswith("load of migration failed: "), desc
    assert re.fullmatch(expected, desc.removeprefix("load of migration failed: ")), desc
    assert migration_statuses(vm, "failed") == ["setup", "active", "failed"]
    assert runstate(vm) == "inmigrate"
    assert qmp_error(vm, "cont") == ("GenericError", "Migration is not finalized yet")
    assert runstate(vm) == "inmigrate"
    assert "RESUME" not in [e["event"] for e in vm.qmp.events]

    if case != "unknown-device":  # the stream itself is valid there, only this VM lacks the device
        analyzed = subprocess.run(confmig_argv("analyze", str(path)), capture_output=True, text=True,
                                  timeout=60)
        assert analyzed.returncode != 0
        reason = desc.removeprefix("load of migration failed: ")
        assert analyzed.stderr.strip().splitlines() == [f"Error: {reason}"]


def test_the_intact_stream_restores(lab: Lab, good_stream: bytes) -> None:
    """The control for the cases above: the unbroken template loads and runs."""
    path = lab.root / "good.mig"
    path.write_bytes(good_stream)
    vm = lab.vm("dst", lab.host("host"), ram="64M", guest=GUEST, incoming=f"file:{path}")
    assert wait_migration(vm)["status"] == "completed"
    wait_runstate(vm, "running")
    selfcheck(vm)


# --- the command line ----------------------------------------------------------------------


def run_vm(*args: str) -> subprocess.CompletedProcess[str]:
    """``confmig vm`` that must fail at start-up (a timeout means it did not)."""
    return subprocess.run(confmig_argv("vm", *args), capture_output=True, text=True, timeout=30)


def assert_one_line_error(done: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert lines, "no error message"
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert_clear(lines[0])
    assert len(lines) == 1 or lines[1].startswith("usage:"), done.stderr


def test_command_line_errors(lab: Lab, tmp_path: Path) -> None:
    host = lab.host("host")
    base = ["-m", "64M", "-serial", "none"]

    assert_one_line_error(
        run_vm("--host", str(tmp_path / "nobody.sock"), *base),
        rf"confmig vm: cannot reach the host at {re.escape(str(tmp_path))}/nobody\.sock: "
        r"No such file or directory",
    )
    assert_one_line_error(run_vm(*base), r"confmig vm: --host SOCKET is required .*")
    assert_one_line_error(run_vm("--host", host.socket, "-bogus", *base),
                          r"confmig vm: '-bogus' is not a valid option")
    assert_one_line_error(run_vm("--host", host.socket, "-m", "lots"), r"confmig vm: -m: .*")
    assert_one_line_error(
        run_vm("--host", host.socket, *base, "-incoming", "gopher:x"),
        r"confmig vm: Invalid migration URI 'gopher:x': unknown transport 'gopher'",
    )
    assert_one_line_error(
        run_vm("--host", host.socket, *base, "-incoming", "tcp:127.0.0.1"),
        r"confmig vm: Invalid migration URI 'tcp:127.0.0.1': port must be a number in 0\.\.65535",
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert_one_line_error(
            run_vm("--host", host.socket, *base, "-incoming", f"tcp:127.0.0.1:{port}"),
            rf"confmig vm: Failed to listen on 'tcp:127\.0\.0\.1:{port}': Address already in use",
        )

    # The host is unharmed by the VMs that gave up half-way: a good one runs on it.
    vm = lab.vm("vm", host, ram="64M", guest=GUEST)
    vm.wait_console(PREFILLED, timeout=TIMEOUT)
    assert runstate(vm) == "running"
    selfcheck(vm)
