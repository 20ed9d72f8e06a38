"""Intra-host migration (issue 12): a new VMM process takes over a running guest on the same
host (``mode=cpr-transfer``): its RAM by file descriptor, its SEV context moved inside KVM.

A gate between the two VMMs' main channel holds the stream or the verdict, so that the new
VMM can be killed just before or just after the move."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from kv_load import KvLoad

from confmig.bench.lab import WORKING_SET_WRITTEN, HostProc, Lab, VmProc, VmSpec
from confmig.bench.local import begin_hand_over, hand_over, new_vmm_spec, wait_hand_over
from confmig.bench.scenario import SEV_ES_POLICY, mh_guest_args, sev_args, wait_status
from confmig.vmm.qmp.client import QmpCommandError

DIRTY = "dirty,rate=300,wss=2M,prefill=on"


@pytest.fixture
def host(lab: Lab) -> HostProc:
    return lab.host("hostA")


def sev_es_guest(lab: Lab, host: HostProc, *, name: str = "old") -> tuple[VmProc, VmSpec]:
    spec = VmSpec(name=name, host=host, ram="64M", guest=DIRTY, extra=tuple(sev_args(SEV_ES_POLICY)))
    vm = lab.start_vms(spec)[0]
    vm.wait_console(WORKING_SET_WRITTEN)
    return vm, spec


def assert_handed_over(old: VmProc, result_info: dict[str, object]) -> None:
    """Nothing of RAM went over the main channel, and the old VMM cannot run the guest."""
    ram = result_info["ram"]
    assert isinstance(ram, dict)
    assert ram["normal"] == ram["duplicate"] == 0 and ram["transferred"] < 1 << 20
    assert old.qmp.execute("query-status")["status"] == "postmigrate"
    with pytest.raises(QmpCommandError, match="cpr-transfer"):
        old.qmp.execute("cont")


def test_a_running_sev_es_guest_with_kv_moves_to_a_new_vmm_and_keeps_every_write(lab: Lab,
                                                                                  host: HostProc) -> None:
    """SEV-ES with its Migration Handler: the new VMM maps the same memory, the context and the
    mirror move; the client follows and finds every acknowledged write."""
    source, _target = mh_guest_args(lab, policy=SEV_ES_POLICY)
    old_sock, new_sock = str(lab.root / "kv-old.sock"), str(lab.root / "kv-new.sock")
    spec = VmSpec(name="old", host=host, ram="64M", guest="kv",
                  extra=(*source, "-device", f"confmig-kv,path={old_sock}"))
    old = lab.start_vms(spec)[0]
    old.wait_console(re.compile(rb"confmig kernel: workload kv"))
    load = KvLoad(old_sock, new_sock)
    load.start()
    new_spec = replace(spec, name="new", extra=(*source, "-device", f"confmig-kv,path={new_sock}"))
    new, result = hand_over(lab, old, new_spec)
    load.finish()
    assert not load.errors, load.errors
    assert result.status == "completed", result.info.get("error-desc")
    assert new is not None
    c = result.info["x-confmig"]["confidential"]
    assert c["backend"] == "local" and c["psp-commands"] == 0
    assert c["fds-passed"] == 4  # RAM, BIOS, VM, mirror VM
    assert_handed_over(old, result.info)
    assert load.puts["after"] >= 200, "the client never got service from the new VMM"
    check = load.client.verify()
    assert check.ok and check.keys == 300, f"lost acknowledged writes: {check.mismatched[:5]}"
    load.client.close()
    assert new.qmp.execute("query-sev")["sev-type"] == "sev-es"
    new.qmp.execute("start-migration-handler")  # the mirror moved with its VMSAs: it runs here
    assert "PASS" in new.selfcheck()


class Gate:
    """A unix-socket relay for the main channel that can hold the stream (old -> new) or swallow
    the verdict (new -> old)."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.upstream = upstream
        self.hold_stream = threading.Event()
        self.swallow_verdict = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(str(path))
        self._sock.listen(1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self._sock.accept()
            server = socket.socket(socket.AF_UNIX)
            server.connect(str(self.upstream))
            threading.Thread(target=self._pump, args=(client, server, self.hold_stream), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.swallow_verdict),
                             daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, drop: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not drop.is_set():
                    dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


def gated(lab: Lab, spec: VmSpec) -> tuple[VmSpec, Gate]:
    """The new VMM's spec, and a gate the old VMM's main channel goes through to it."""
    _spec, main, _cpr = new_vmm_spec(lab, spec)
    return spec, Gate(lab.root / "gate.sock", main)


def test_a_new_vmm_killed_before_the_move_leaves_the_guest_running_under_the_old_one(
        lab: Lab, host: HostProc) -> None:
    old, spec = sev_es_guest(lab, host)
    new_spec, gate = gated(lab, replace(spec, name="new"))
    gate.hold_stream.set()  # the new VMM never gets the stream: no move
    new, t0 = begin_hand_over(lab, old, new_spec, main_via=lab.root / "gate.sock")
    assert new is not None
    new.proc.send_signal(signal.SIGKILL)
    result = wait_hand_over(old, t0)
    gate.close()
    assert result.status == "failed"
    wait_status(old, "running")
    assert "PASS" in old.selfcheck()


def test_a_new_vmm_killed_after_the_move_never_leaves_two_vms_running_the_guest(
        lab: Lab, host: HostProc) -> None:
    old, spec = sev_es_guest(lab, host)
    new_spec, gate = gated(lab, replace(spec, name="new"))
    gate.swallow_verdict.set()  # the old VMM never hears that the new one took the guest
    new, t0 = begin_hand_over(lab, old, new_spec, main_via=lab.root / "gate.sock")
    assert new is not None
    wait_status(new, "running")  # moved: the guest runs in the new VMM
    new.proc.send_signal(signal.SIGKILL)
    result = wait_hand_over(old, t0)
    gate.close()
    assert result.status == "failed"
    assert "VM is dead (EIO)" in str(result.info.get("error-desc"))
    assert old.qmp.execute("query-status")["running"] is False
    with pytest.raises(QmpCommandError, match="VM is dead"):
        old.qmp.execute("cont")


def test_the_same_guest_is_handed_over_again_and_again(lab: Lab, host: HostProc) -> None:
    """Upgrade, roll back, upgrade again...: each new VMM takes the guest from the last."""
    vm, spec = sev_es_guest(lab, host, name="v0")
    downtimes = []
    for i in range(1, 5):
        new, result = hand_over(lab, vm, replace(spec, name=f"v{i}"))
        assert result.status == "completed", result.info.get("error-desc")
        assert new is not None
        assert_handed_over(vm, result.info)
        downtimes.append(result.info["downtime"])
        vm.qmp.execute("quit")
        vm = new
    assert "PASS" in vm.selfcheck()
    assert max(downtimes) < 1000, downtimes
    assert not os.path.exists(lab.root / "v4.cpr.sock")  # the last new VMM hung up its cpr channel


@pytest.mark.parametrize("kind", ["plain", "sev-mh"])
def test_plain_and_sev_guests_are_handed_over_too(lab: Lab, host: HostProc, kind: str) -> None:
    """A plain guest (no context to move: its RAM is all it has) and an SEV guest whose mirror
    VM follows it into the new VMM."""
    extra = tuple(mh_guest_args(lab)[0]) if kind == "sev-mh" else ()
    spec = VmSpec(name="old", host=host, ram="64M", guest=DIRTY, extra=extra)
    old = lab.start_vms(spec)[0]
    old.wait_console(WORKING_SET_WRITTEN)
    new, result = hand_over(lab, old, replace(spec, name="new"))
    assert result.status == "completed", result.info.get("error-desc")
    assert new is not None
    assert_handed_over(old, result.info)
    assert result.info["x-confmig"]["confidential"]["fds-passed"] == (2 if kind == "plain" else 4)
    if kind == "sev-mh":
        new.qmp.execute("start-migration-handler")
        assert new.qmp.execute("x-query-migration-handler")["started"] is True
    assert "PASS" in new.selfcheck()


def test_the_demo_hands_an_sev_es_guest_to_a_new_vmm() -> None:
    """``confmig demo --mode local --sev-es``: the command a user runs first."""
    import json
    import subprocess

    from confmig.bench.lab import confmig_argv

    out = subprocess.run(confmig_argv("demo", "--mode", "local", "--sev-es", "--ram", "128M", "--wss", "8M",
                                      "--json"), capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert s["status"] == "completed" and s["selfcheck"].startswith("confmig-selfcheck: PASS")
    assert s["confidential"]["backend"] == "local" and s["pages"] == {"normal": 0, "zero": 0}
    assert 0 < s["bytes-sent"] < 1 << 20 and s["downtime-ms"] is not None


def test_a_new_vmm_that_does_not_match_the_old_one_is_refused_before_the_move(lab: Lab,
                                                                                host: HostProc) -> None:
    """An SEV-ES guest's VMSAs move vCPU by vCPU (the kernel refuses other vCPU counts with
    EINVAL): a new VMM with another vCPU count refuses the stream before it moves anything,
    and the old VMM runs the guest on."""
    old, spec = sev_es_guest(lab, host)
    new, result = hand_over(lab, old, replace(spec, name="new", extra=(*spec.extra, "-smp", "2")))
    assert result.status == "failed"
    assert new is not None
    assert new.qmp.execute("query-status")["status"] != "running"
    assert "this VM has 2" in str(new.qmp.execute("query-migrate").get("error-desc"))
    wait_status(old, "running")
    assert "PASS" in old.selfcheck()
