"""Our QMP server driven by QEMU's own client library and tools (qemu.qmp, qmp-shell).

The server runs on its own event loop in a background thread, as the VMM
runs it; the clients run in the test thread, so ``emit_event`` is also
exercised from a thread that is not the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from confmig.common.errors import ConfigError
from confmig.vmm.qmp import Arg, ErrorClass, QmpError, QmpRegistry, QmpServer

TIMEOUT = 10.0
NOW = 1700000000.25  # the server's wall clock, fixed so timestamps are checkable
RUNNING = {"status": "running", "singlestep": False, "running": True}

T = TypeVar("T")


@dataclass
class Harness:
    server: QmpServer
    loop: asyncio.AbstractEventLoop
    path: str

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)


def make_server() -> QmpServer:
    registry = QmpRegistry(package="confmig-test")
    server = QmpServer(registry, wall_clock=lambda: NOW)
    unblock = asyncio.Event()

    @registry.command("query-status")
    def query_status(args: dict[str, object]) -> dict[str, object]:
        return RUNNING

    @registry.command("x-emit", args={"event": Arg(str), "data": Arg(object, optional=True)})
    def emit(args: dict[str, object]) -> None:
        data = args.get("data")
        assert data is None or isinstance(data, dict)
        server.emit_event(str(args["event"]), data)

    @registry.command("x-fail")
    def fail(args: dict[str, object]) -> None:
        raise QmpError("Device 'nope' not found", ErrorClass.DEVICE_NOT_FOUND)

    @registry.command("x-crash")
    def crash(args: dict[str, object]) -> None:
        raise RuntimeError("bug")

    @registry.command("x-block")
    async def block(args: dict[str, object]) -> str:
        await unblock.wait()
        return "unblocked"

    @registry.command("x-unblock")
    def release(args: dict[str, object]) -> None:
        unblock.set()

    @registry.command("x-oob", allow_oob=True)
    def oob(args: dict[str, object]) -> str:
        return "oob"

    return server


@contextlib.contextmanager
def serving(path: str) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="qmp-server", daemon=True)
    thread.start()
    harness = Harness(make_server(), loop, path)
    try:
        harness.call(harness.server.start_unix(path))
        yield harness
    finally:
        harness.call(harness.server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="qmp") as directory:
        yield Path(directory)


@pytest.fixture
def qmp(socket_dir: Path) -> Iterator[Harness]:
    with serving(str(socket_dir / "qmp.sock")) as harness:
        yield harness


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def connected(address: str | tuple[str, int]) -> QMPClient:
    client = QMPClient("test")
    await client.connect(address)
    return client


def test_qmpclient_executes_and_maps_errors(qmp: Harness) -> None:
    async def session() -> None:
        client = await connected(qmp.path)
        assert client.greeting is not None
        assert client.greeting._asdict() == {
            "QMP": {
                "version": {
                    "qemu": {"major": 7, "minor": 2, "micro": 0},
                    "package": "confmig-test",
                },
                "capabilities": ["oob"],
            }
        }
        assert await client.execute("query-status") == RUNNING
        assert await client.execute("x-oob", oob=True) == "oob"
        cases: list[tuple[str, dict[str, object], bool, str, str]] = [
            ("x-fail", {}, False, "DeviceNotFound", "Device 'nope' not found"),
            ("nope", {}, False, "CommandNotFound", "The command nope has not been found"),
            ("x-crash", {}, False, "GenericError", "Internal error in command x-crash"),
            ("x-emit", {}, False, "GenericError", "Parameter 'event' is missing"),
            ("query-status", {}, True, "GenericError",
             "The command query-status does not support OOB"),
            ("qmp_capabilities", {}, False, "CommandNotFound",
             "Capabilities negotiation is already complete, command ignored"),
        ]  # fmt: skip
        for name, arguments, oob, cls, desc in cases:
            with pytest.raises(ExecuteError) as caught:
                await client.execute(name, arguments, oob=oob)
            assert (caught.value.error_class, str(caught.value)) == (cls, desc)
        names = [c["name"] for c in await client.execute("query-commands")]  # type: ignore[attr-defined]
        assert {"qmp_capabilities", "query-version", "query-status", "x-emit"} <= set(names)
        await client.disconnect()

    run(session())


def test_qmpclient_receives_events(qmp: Harness) -> None:
    async def session() -> None:
        client = await connected(qmp.path)
        with client.listen(listener := EventListener(("CONFMIG_TEST", "FROM_THREAD"))):
            await client.execute("x-emit", {"event": "CONFMIG_TEST", "data": {"n": 1}})
            # Emitted inside the command, the event arrives before its reply (as in QEMU).
            assert not listener.empty()
            event = await listener.get()
            assert (event["event"], event["data"]) == ("CONFMIG_TEST", {"n": 1})
            assert event["timestamp"] == {"seconds": 1700000000, "microseconds": 250000}

            emitter = threading.Thread(target=qmp.server.emit_event, args=("FROM_THREAD",))
            emitter.start()
            emitter.join()
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
            assert event["event"] == "FROM_THREAD" and "data" not in event
        await client.disconnect()

    run(session())


def test_qmpclient_over_tcp(socket_dir: Path) -> None:
    with serving(str(socket_dir / "qmp.sock")) as qmp:
        host, port = qmp.call(qmp.server.start_tcp("127.0.0.1", 0))

        async def session() -> None:
            client = await connected((host, port))
            assert await client.execute("query-status") == RUNNING
            await client.disconnect()

        run(session())


def test_clients_have_their_own_state_and_do_not_block_each_other(qmp: Harness) -> None:
    async def session() -> None:
        first, second = await connected(qmp.path), await connected(qmp.path)
        raw_reader, raw_writer = await asyncio.open_unix_connection(qmp.path)
        json.loads(await raw_reader.readline())  # greeting; never negotiates
        with first.listen(listener := EventListener()):
            blocked = asyncio.create_task(first.execute("x-block"))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            # The second client is served while the first one's command awaits.
            assert await second.execute("query-status") == RUNNING
            await second.execute("x-emit", {"event": "SEEN"})
            await second.execute("x-unblock")
            assert await blocked == "unblocked"
            assert (await listener.get())["event"] == "SEEN"
        raw_writer.write(b'{"execute": "query-status", "id": 1}\n')
        reply = json.loads(await raw_reader.readline())  # no event came before this reply
        assert reply == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": 1,
        }
        raw_writer.close()
        await first.disconnect()
        await second.disconnect()

    run(session())


def test_client_leaving_mid_command_is_harmless(qmp: Harness, caplog: pytest.LogCaptureFixture) -> None:
    async def session() -> None:
        reader, writer = await asyncio.open_unix_connection(qmp.path)
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}{"execute": "x-block", "id": "gone"}')
        await reader.readline()
        writer.close()
        await asyncio.sleep(0.05)
        client = await connected(qmp.path)
        await client.execute("x-unblock")  # the orphaned command completes, its reply goes nowhere
        assert await client.execute("query-status") == RUNNING
        await client.disconnect()
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.WARNING):
        run(session())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.fixture
def event_loop_for_sync_client() -> Iterator[None]:
    """The legacy client runs the thread's current loop; give it one we close."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.mark.usefixtures("event_loop_for_sync_client")
def test_legacy_sync_client(qmp: Harness) -> None:
    monitor = QEMUMonitorProtocol(qmp.path)
    greeting = monitor.connect()
    assert greeting is not None and greeting["QMP"]["capabilities"] == ["oob"]
    monitor.settimeout(TIMEOUT)
    assert monitor.cmd("query-status") == RUNNING
    # cmd_obj sends no id: the reply carries none either.
    assert monitor.cmd_obj({"execute": "x-fail"}) == {
        "error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}
    }
    assert monitor.cmd_obj({"execute": "query-status", "id": "mine"}) == {
        "return": RUNNING,
        "id": "mine",
    }
    monitor.cmd("x-emit", event="LEGACY", data={"k": "v"})
    event = monitor.pull_event(wait=TIMEOUT)
    assert event is not None and (event["event"], event["data"]) == ("LEGACY", {"k": "v"})
    monitor.close()


def test_qmp_shell(qmp: Harness) -> None:
    qmp_shell = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
    assert qmp_shell is not None
    # qmp-shell reads commands with input(), which also works from a pipe.
    done = subprocess.run(
        [qmp_shell, qmp.path],
        input='query-version\nx-fail\nx-emit event=SHELL data={"n":1}\n\n',
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = done.stdout
    assert "Connected to QEMU 7.2.0" in out
    assert '{"return": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "confmig-test"}}' in out
    assert '{"error": {"class": "DeviceNotFound", "desc": "Device \'nope\' not found"}}' in out
    # An empty line prints the pending events (as Python dicts).
    assert "'event': 'SHELL', 'data': {'n': 1}" in out


def test_socket_path_in_use_stale_or_foreign(socket_dir: Path) -> None:
    path = str(socket_dir / "qmp.sock")
    with serving(path) as live:
        other = make_server()
        with pytest.raises(ConfigError, match="in use by a running server"):
            live.call(other.start_unix(path))

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, never listening: what a crashed VMM leaves behind
    stale.close()
    with serving(path) as revived:

        async def session() -> None:
            client = await connected(revived.path)
            assert await client.execute("query-status") == RUNNING
            await client.disconnect()

        run(session())
    assert not os.path.exists(path)  # close() removed its socket

    Path(path).write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(make_server().start_unix(path))
