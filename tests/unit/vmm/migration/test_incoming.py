"""The target's engine after a failed load: whatever its backend's abort meets, the source
hears the failure on the return path and sees the channel close (it must not wait on it)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import DeviceSection, StreamWriter
from confmig.vmm.memory import GuestMemory
from confmig.vmm.migration.backend import IncomingBackend
from confmig.vmm.migration.incoming import IncomingMigration
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import MigrationUri

WAIT = 10.0
"""Seconds the source's side waits for the target's answer (it comes at once, or never)."""


class StubVm:
    """A target with no RAM blocks: the stream under test carries only a confidential record."""

    def __init__(self) -> None:
        self.memory = GuestMemory()

    @property
    def vcpu_ids(self) -> list[int]:
        return [0]

    def check_blocks(self, sent: Sequence[tuple[str, int]]) -> None:
        pass

    def load_section(self, section: DeviceSection) -> None:
        pass

    def finish_load(self) -> None:
        pass

    def resume(self) -> None:
        raise AssertionError("a target whose load failed must not run the guest")


class DeadHostBackend(IncomingBackend):
    """As the Migration Handler's backend once the target's host died: every step needs the
    host (KVM_RUN of an MH vCPU) and meets its closed socket, abort included."""

    name = "dead-host"

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def abort(self) -> bytes:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[IncomingMigration, list[MigrationStatus], str]]:
    statuses: list[MigrationStatus] = []
    path = str(tmp_path / "incoming.sock")
    incoming = IncomingMigration(StubVm(), MigrationUri(scheme="unix", path=path), MigrationParameters(),
                                 MigrationStats(), statuses.append, DeadHostBackend())
    incoming.start()
    yield incoming, statuses, path
    if incoming.is_alive():  # still in accept (a test that failed early): a connection ends it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
        incoming.join(WAIT)


def test_a_backend_whose_abort_meets_a_dead_host_still_fails_the_source_at_once(
        target: tuple[IncomingMigration, list[MigrationStatus], str]) -> None:
    incoming, statuses, path = target
    raised: list[BaseException | None] = []
    old_hook = threading.excepthook  # the migration thread must end, not die of what escaped
    threading.excepthook = lambda args: raised.append(args.exc_value)
    try:
        w = StreamWriter("pc-q35-7.2")
        stream = (w.setup([("pc.ram", PAGE_SIZE)]) + w.begin_round()
                  + w.confidential(ConfidentialSubtype.MH_RECORD, b"sealed batch"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as source:
            source.settimeout(WAIT)  # a target that neither answers nor closes: never
            source.connect(path)
            source.sendall(stream)
            reply = bytearray()
            while chunk := source.recv(4096):  # up to the close
                reply += chunk
        incoming.join(WAIT)
    finally:
        threading.excepthook = old_hook
    assert not incoming.is_alive()
    assert not raised, raised
    assert reply == rp.encode(rp.Shut(status=1))  # the failure, then the close
    assert statuses[-1] is MigrationStatus.FAILED
    assert incoming.error == "load of migration failed: [Errno 32] Broken pipe"
