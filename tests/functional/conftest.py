"""Fixtures for functional tests: a lab of real ``confmig host`` and ``confmig vm``
processes per test, always torn down, its logs shown when the test fails."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from confmig.bench.lab import HostProc, Lab

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
