"""The kv workload behind the kv device, driven by KvClient; and a migration of it."""

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from machine import Machine, running

from confmig.bench.kv_client import KvClient, KvRequestError
from confmig.guest.workloads import kv as guest_kv
from confmig.proto.kvdev import KvStatus
from confmig.vmm.devices import kv as device_kv

SELFCHECK = "confmig-selfcheck"
IDLE_WAIT = 0.002
"""Real seconds a sleeping vCPU waits for the device's interrupt before its clock jumps."""


@contextmanager
def kv_machine(path: Path, slots: int = 256, *, sev: bool = False) -> Iterator[Machine]:
    with Machine(f"workload=kv slots={slots}", kv_socket=path, idle_wait=IDLE_WAIT, sev=sev) as m:
        assert m.kv is not None
        m.kv.start()
        yield m


@pytest.mark.parametrize("sev", [False, True], ids=["plain", "sev"])
def test_put_get_delete(tmp_path: Path, sev: bool) -> None:
    with kv_machine(tmp_path / "kv.sock", sev=sev) as m:
        with running(m):
            client = KvClient(tmp_path / "kv.sock", client_id=1)
            assert client.get(b"missing") is None
            for i in range(100):
                client.put(b"key-%d" % i, b"value-%d" % i * 10)
            client.put(b"key-7", b"x" * guest_kv.KV_VALUE_MAX)  # overwrite, longest value
            assert client.delete(b"key-8") and not client.delete(b"key-8")
            assert client.get(b"key-7") == b"x" * guest_kv.KV_VALUE_MAX
            assert client.get(b"key-8") is None
            assert client.get(b"key-9") == b"value-9" * 10
            assert client.verify().ok and client.verify().keys == 100
        assert guest_kv.load_state(m.cpu).keys == 99


def test_a_full_table_refuses_new_keys_but_serves_old_ones(tmp_path: Path) -> None:
    with kv_machine(tmp_path / "kv.sock", slots=16) as m, running(m):
        client = KvClient(tmp_path / "kv.sock")
        for i in range(16):
            client.put(b"k%d" % i, b"v")
        with pytest.raises(KvRequestError) as info:
            client.put(b"one-too-many", b"v")
        assert info.value.status == KvStatus.FULL
        client.put(b"k3", b"new")  # replacing in place still works
        assert client.get(b"k3") == b"new"


def test_malformed_messages_get_errors_and_leave_the_guest_intact(tmp_path: Path) -> None:
    with kv_machine(tmp_path / "kv.sock") as m:
        with running(m):
            client = KvClient(tmp_path / "kv.sock")
            client.put(b"keep", b"me")
            raw = socket.socket(socket.AF_UNIX)
            raw.settimeout(5)
            raw.connect(str(tmp_path / "kv.sock"))
            garbage = struct.pack("<BBHIQ", 7, 0, 1, 0, 0xBAD) + b"k"
            raw.sendall(len(garbage).to_bytes(4, "little") + garbage)
            reply = device_kv.parse_reply(device_kv.FrameDecoder().feed(raw.recv(4096))[0])
            assert reply == device_kv.KvReply(status=KvStatus.MALFORMED, id=0xBAD)
            raw.sendall(b"\xff\xff\xff\xff")  # an impossible length: the connection ends
            raw.recv(4096)
            assert raw.recv(1) == b""
            assert client.verify().ok
        assert guest_kv.selfcheck(m.cpu).passed


def test_nmi_selfcheck_passes_then_catches_a_corrupted_slot(tmp_path: Path) -> None:
    with kv_machine(tmp_path / "kv.sock", slots=64) as m:
        with running(m):
            client = KvClient(tmp_path / "kv.sock")
            for i in range(10):
                client.put(b"k%d" % i, b"v%d" % i)
        st = guest_kv.load_state(m.cpu)
        m.cpu.inject(2)
        assert m.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=32 writes=10"
        used = [s for s in range(64) if m.memory.read(st.table + s * 2048, 1) == b"\x01"]
        victim = st.table + used[4] * 2048
        m.memory.write(victim + guest_kv.KV_SLOT_VALUE, b"X")
        m.cpu.inject(2)
        assert m.run_until_line(SELFCHECK) == f"{SELFCHECK}: FAIL bad=1 first={victim:#x} pages=32"


@pytest.mark.parametrize("sev", [False, True], ids=["plain", "sev"])
def test_migration_keeps_acknowledged_writes_and_retries_the_one_in_flight(
    tmp_path: Path, sev: bool
) -> None:
    source_path, target_path = tmp_path / "source.sock", tmp_path / "target.sock"
    with kv_machine(source_path, sev=sev) as source:
        with running(source):
            client = KvClient(source_path, client_id=7)
            for i in range(20):
                client.put(b"k%d" % i, b"v%d" % i)
        # The vCPU is paused; a put reaches the ring but the guest never serves it.
        lost: list[BaseException] = []

        def put_in_flight() -> None:
            try:
                client.put(b"in-flight", b"!")
            except ConnectionError as exc:
                lost.append(exc)

        putter = threading.Thread(target=put_in_flight)
        putter.start()
        queue = guest_kv.load_state(source.cpu).queue
        deadline = time.monotonic() + 5
        # The queue is shared in an SEV guest too: the host reads avail in the clear.
        while int.from_bytes(source.memory.read(queue, 4), "little") != 21:  # published
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert source.kv is not None
        source.kv.stop()  # switch-over: the source device lets go of its clients
        putter.join(5)
        assert lost and client.unacknowledged == 1
        snap = source.snapshot()
        writes_before = guest_kv.load_state(source.cpu).writes

    with Machine.restore(
        snap, source.cmdline, kv_socket=target_path, idle_wait=IDLE_WAIT, sev=sev
    ) as target:
        assert target.kv is not None
        target.kv.start()
        with running(target):
            client.reconnect(target_path)
            assert client.unacknowledged == 0
            assert client.verify().ok and client.acknowledged[b"in-flight"] == b"!"
        # The guest served the request twice (the orphan, then the retry) but applied it once.
        assert guest_kv.load_state(target.cpu).writes == writes_before + 1
        assert client.longest_gap > 0


def test_a_device_that_overruns_the_ring_stops_the_workload(tmp_path: Path) -> None:
    with Machine("workload=kv slots=16", kv_socket=tmp_path / "kv.sock") as m:
        m.run_until_line("kv: serving")
        queue = guest_kv.load_state(m.cpu).queue
        m.memory.write(queue + guest_kv.KV_QUEUE_AVAIL, (1000).to_bytes(4, "little"))
        m.run(lambda _: False)
        assert m.lines[-1] == "kv: device claims 1000 requests in a 64-slot ring; halted"


def test_the_guest_checks_requests_the_host_wrote(tmp_path: Path) -> None:
    with Machine("workload=kv slots=16", kv_socket=tmp_path / "kv.sock") as m:
        m.run_until_line("kv: serving")
        queue = guest_kv.load_state(m.cpu).queue
        slot = queue + guest_kv.KV_QUEUE_RING
        m.memory.write(slot, struct.pack("<BBHIQ", guest_kv.OP_PUT, 0, 200, 0, 5))  # key too long
        m.memory.write(queue + guest_kv.KV_QUEUE_AVAIL, (1).to_bytes(4, "little"))
        m.cpu.inject(device_kv.KV_IRQ_VECTOR)
        m.run(lambda c: int.from_bytes(c.read(queue + guest_kv.KV_QUEUE_USED, 4), "little") == 1)
        status, _, _, _, request_id = struct.unpack("<BBHIQ", m.memory.read(slot, 16))
        assert (status, request_id) == (KvStatus.MALFORMED, 5)
        assert guest_kv.load_state(m.cpu).keys == 0


def test_without_the_device_the_workload_says_so() -> None:
    with Machine("workload=kv slots=16") as m:
        m.run(lambda _: False)
        assert m.lines[-1] == "kv: no kv device at port 0x600; halted"
