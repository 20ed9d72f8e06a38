"""Fixtures for functional tests: a lab of real ``confmig host`` and ``confmig vm``
processes per test, always torn down, its logs shown when the test fails."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

import confmig.owner.broker as broker_module
from confmig.bench.lab import HostProc, Lab
from confmig.platform.psp.session import LaunchSession

LOG_TAIL = 4000
"""Characters of each log shown for a failed test: the end is where the error is."""


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab; every process it started is stopped after the test, pass or fail."""
    with Lab() as the_lab:
        yield the_lab
        if request.node.stash.get(_FAILED, False):
            _dump_logs(the_lab)


@pytest.fixture
def hosts(lab: Lab) -> tuple[HostProc, HostProc]:
    """Two emulated hosts: the source's and the target's."""
    return lab.host("hostA"), lab.host("hostB")


def _dump_logs(lab: Lab) -> None:
    """Print what the processes said (pytest shows it under 'Captured stdout teardown')."""
    paths = [lab.root / "processes.log", *(v.console for v in lab.vms)]
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        print(f"----- {path.name} (last {LOG_TAIL} characters) -----")
        print(text[-LOG_TAIL:])


@pytest.fixture
def captured_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The TEK and TIK of every launch session the in-process owner creates."""
    keys: list[bytes] = []
    real = broker_module.create_launch_session

    def recording(*args: object, **kwargs: object) -> LaunchSession:
        session = real(*args, **kwargs)  # type: ignore[arg-type]
        keys.extend([session.keys.tek, session.keys.tik])
        return session

    monkeypatch.setattr(broker_module, "create_launch_session", recording)
    return keys
