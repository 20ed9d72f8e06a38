"""`confmig demo` (and `launch`, and a host for its vCPUs) stops every process it started
however it ends (a signal, a guest that halts, its deadline), and fails within seconds,
saying why, instead of hanging.

Processes are counted by a marker in their environment, which the demo's hosts, VMMs and
vCPU processes all inherit: nothing of the demo escapes the count, nothing else enters it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from confmig.bench.lab import WORKLOAD_READY_RE, Lab, confmig_argv

MARK = "CONFMIG_TEST_DEMO_RUN"
SLOW_MIGRATION = ["--ram", "64M", "--wss", "8M", "--dirty-rate", "100", "--max-bandwidth", "1000000"]
"""A demo whose migration takes seconds (8 MiB at 1 MB/s): every process is up meanwhile."""
ALL_UP = 7
"""The demo, two hosts, two VMMs and a vCPU process per VM."""
UP_TIMEOUT = 60.0
FAIL_FAST = 15.0
"""Seconds within which a demo that cannot succeed must have said so (it takes a few)."""
GONE_TIMEOUT = 5.0
"""Seconds for killed processes to vanish from /proc (the kernel's work, not the demo's)."""


def marked(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``tag``."""
    needle = f"{MARK}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie: it holds nothing
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def tag() -> Iterator[str]:
    """A marker for one demo run; whatever still carries it afterwards is killed (and failed)."""
    tag = uuid.uuid4().hex
    yield tag
    for pid in marked(tag):
        os.kill(pid, signal.SIGKILL)


def start(tag: str, tmp_path: Path, command: str, *args: str) -> subprocess.Popen[str]:
    """``confmig COMMAND ARGS`` with the marker ``tag``; its stderr is kept for the verdict."""
    env = {**os.environ, MARK: tag, "TMPDIR": str(tmp_path)}  # a lab left by SIGKILL stays in tmp_path
    return subprocess.Popen(confmig_argv(command, *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_to_the_demo_leaves_no_process_behind(tag: str, tmp_path: Path, sig: signal.Signals) -> None:
    demo = start(tag, tmp_path, "demo", *SLOW_MIGRATION)
    wait_for("hosts, VMMs and vCPUs all up", lambda: len(marked(tag)) >= ALL_UP, UP_TIMEOUT)
    assert demo.poll() is None
    demo.send_signal(sig)
    code = demo.wait(FAIL_FAST)
    # SIGKILL leaves no chance to unwind: the kernel's parent-death signal stops the rest
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), demo.stderr.read() if demo.stderr else ""
    wait_for("every process of the demo gone", lambda: not marked(tag), GONE_TIMEOUT)


def test_a_guest_that_halts_ends_the_demo_with_its_last_words(tag: str, tmp_path: Path) -> None:
    # kv's table does not fit 8 MiB: no up-front check knows that, the guest halts at start
    t0 = time.monotonic()
    demo = start(tag, tmp_path, "demo", "--guest", "kv", "--ram", "8M")
    _, err = demo.communicate(timeout=FAIL_FAST)
    assert demo.returncode == 1 and time.monotonic() - t0 < FAIL_FAST
    assert "src: the guest halted; last console lines:" in err
    assert "kv: 4096 slots need 8324 KiB of low RAM; halted" in err
    wait_for("every process of the demo gone", lambda: not marked(tag), GONE_TIMEOUT)


@pytest.mark.parametrize("ram, code", [("256M", 0), ("8M", 1)])
def test_launch_gives_a_kv_guest_its_device_and_fails_one_that_halts(tag: str, tmp_path: Path, ram: str,
                                                                    code: int) -> None:
    launch = start(tag, tmp_path, "launch", "--guest", "kv", "--ram", ram)
    _, err = launch.communicate(timeout=FAIL_FAST)
    assert launch.returncode == code, err
    if code:
        assert "sev: the guest halted" in err and "need 8324 KiB of low RAM; halted" in err
    wait_for("every process of the launch gone", lambda: not marked(tag), GONE_TIMEOUT)


def test_a_working_set_that_does_not_fit_is_refused_before_anything_starts(tag: str, tmp_path: Path) -> None:
    demo = start(tag, tmp_path, "demo", "--ram", "256M")  # the default working set is 256M
    _, err = demo.communicate(timeout=FAIL_FAST)
    assert demo.returncode == 1
    assert "--wss 256M does not fit a guest with --ram 256M: use --wss 239M or less" in err


def test_the_demo_past_its_deadline_stops_with_an_error(tag: str, tmp_path: Path) -> None:
    demo = start(tag, tmp_path, "demo", *SLOW_MIGRATION, "--timeout", "3")
    _, err = demo.communicate(timeout=3 + FAIL_FAST)
    assert demo.returncode == 1
    assert "overall deadline of 3 s passed (give more with --timeout)" in err
    wait_for("every process of the demo gone", lambda: not marked(tag), GONE_TIMEOUT)


def exited(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie too: it runs nothing and holds nothing)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command's ")"
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_host_that_ends_takes_its_vcpu_processes_along(lab: Lab, sig: signal.Signals) -> None:
    host = lab.host("hostA")
    lab.vm("vm", host, ram="64M", guest="idle").wait_console(WORKLOAD_READY_RE)
    vcpus = children(host.proc.pid)
    assert len(vcpus) == 1
    host.proc.send_signal(sig)
    host.proc.wait(GONE_TIMEOUT)
    wait_for("the vCPU process gone", lambda: exited(vcpus[0]), GONE_TIMEOUT)
