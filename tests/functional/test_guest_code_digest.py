"""Guest code edited after its firmware image was built does not run.

The lab's firmware image is built from this tree's guest code, and the launch measures that
image. The hosts here run a copy of the confmig package (first on ``PYTHONPATH``, so their
vCPU processes load the guest code from it): edited after the image was built, or not. On
the edited one the first VMRUN fails (``KVM_EXIT_FAIL_ENTRY``), the VMM stops the guest with
QEMU's ``internal-error`` and the host's log says why.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import confmig
from confmig.bench.lab import WORKLOAD_READY_RE, HostProc, Lab, VmProc
from confmig.bench.scenario import sev_args

REFUSAL_TIMEOUT = 60.0
"""Seconds for a VMM to report the failed entry (a VMM and its vCPU starting on a busy machine)."""


def package_copy(dest: Path, *, edit: bool) -> Path:
    """A directory holding a copy of the confmig package, its guest code edited if ``edit``."""
    shutil.copytree(Path(confmig.__file__).parent, dest / "confmig",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        kernel = dest / "confmig" / "guest" / "kernel.py"
        kernel.write_text(kernel.read_text() + "\n# edited after the firmware image was built\n")
    return dest


def host_running(lab: Lab, monkeypatch: pytest.MonkeyPatch, name: str, code: Path) -> HostProc:
    _ = lab.bios  # the image: built here, from this tree's guest code, before the copy is used
    with monkeypatch.context() as env:
        path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
        env.setenv("PYTHONPATH", path)
        return lab.host(name)


def refused(lab: Lab, vm: VmProc) -> str:
    """Once the VMM stopped ``vm`` after a failed entry: what the processes logged."""
    deadline = time.monotonic() + REFUSAL_TIMEOUT
    while (status := vm.qmp.execute("query-status")["status"]) != "internal-error":
        assert time.monotonic() < deadline, f"the guest is {status}, not stopped by a failed entry"
        time.sleep(0.1)
    assert not WORKLOAD_READY_RE.search(vm.console_text())
    log = (lab.root / "processes.log").read_text(errors="replace")
    assert "KVM: entry failed, hardware error 0xffffffffffffffff" in log  # the VMM's words, QEMU's
    return log


@pytest.mark.parametrize("sev", [False, True], ids=["plain", "sev"])
def test_guest_code_edited_after_the_image_was_built_does_not_run(
        lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sev: bool) -> None:
    host = host_running(lab, monkeypatch, "edited", package_copy(tmp_path, edit=True))
    vm = lab.vm("guest", host, ram="64M", guest="idle", extra=sev_args() if sev else [])
    log = refused(lab, vm)
    assert "VMRUN refused: the guest code this core loaded" in log
    assert "is not the code the firmware image was built from" in log


def test_a_flash_that_is_no_image_of_this_code_does_not_run(lab: Lab, tmp_path: Path) -> None:
    """Whatever an SEV launch measured, random bytes in the flash name no code."""
    bios = tmp_path / "random.fd"
    bios.write_bytes(os.urandom(64 * 1024))
    vm = lab.vm("guest", lab.host("hostA"), ram="64M", guest="idle", extra=[*sev_args(), "-bios", str(bios)])
    assert "holds no firmware image this core can check" in refused(lab, vm)


def test_an_unedited_copy_of_the_guest_code_runs(lab: Lab, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """The control: the same set-up with the code the image was built from boots the guest."""
    host = host_running(lab, monkeypatch, "copied", package_copy(tmp_path, edit=False))
    vm = lab.vm("guest", host, ram="64M", guest="idle", extra=sev_args())
    vm.wait_console(WORKLOAD_READY_RE)
    assert vm.qmp.execute("query-status")["status"] == "running"
