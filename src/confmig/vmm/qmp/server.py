"""The QMP server: asyncio sockets around ``QmpServerConnection``.

Listens like QEMU's ``-qmp unix:PATH,server=on,wait=off`` and
``-qmp tcp:HOST:PORT,server=on,wait=off``, on any number of endpoints, for
up to :data:`MAX_CLIENTS` clients at once. Each client has its own negotiation
state and its commands run one after the other; an async handler that awaits
lets every other client proceed.

What one client can make the VMM hold is bounded: a message being received
(``MAX_MESSAGE_SIZE`` of ``confmig.proto.qmp``), a read (:data:`READ_SIZE`)
and replies it does not read (:data:`MAX_BACKLOG`); :data:`MAX_CLIENTS` bounds
the number of such clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from confmig.common.errors import ConfigError
from confmig.common.units import KiB, MiB
from confmig.proto.qmp.connection import (
    NEED_DATA,
    CommandRequest,
    ConnectionClosed,
    ErrorClass,
    QmpServerConnection,
)
from confmig.vmm.qmp.schema import QmpError, QmpRegistry

_log = logging.getLogger(__name__)

READ_SIZE: Final = 64 * KiB
# Replies and events queued for a client that does not read. Past this the
# client is dropped, so one stuck client cannot hold the VMM's memory.
MAX_BACKLOG: Final = 16 * MiB
# How long a connection attempt to an existing socket may take before the
# socket is declared in use (a live but busy server accepts within this).
PROBE_TIMEOUT: Final = 1.0
MAX_CLIENTS: Final = 16
"""Clients served at once, over all endpoints. A management stack uses one or two (libvirt one,
a script another); past this a client gets one error line instead of a greeting and is
disconnected. So what all clients together make the VMM hold stays within MAX_CLIENTS times
the per-client bounds above, however many connect."""
_TOO_MANY_CLIENTS: Final = (
    json.dumps({"error": {"class": "GenericError",
                          "desc": f"Too many QMP clients (at most {MAX_CLIENTS} at once)"}}).encode()
    + b"\r\n"
)


@dataclass(eq=False, slots=True)
class _Client:
    conn: QmpServerConnection
    writer: asyncio.StreamWriter

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if not data or self.writer.is_closing():
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            _log.warning("QMP client does not read its replies; disconnecting it")
            self.writer.transport.abort()


class QmpServer:
    """Serves ``registry`` to every client of every endpoint started."""

    def __init__(self, registry: QmpRegistry, *, wall_clock: Callable[[], float] = time.time):
        self._registry = registry
        self._wall_clock = wall_clock
        self._greeting = {"QMP": {"version": registry.version_info, "capabilities": ["oob"]}}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._servers: list[asyncio.Server] = []
        self._unix_sockets: list[tuple[str, int]] = []  # (path, inode) we created
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a Unix socket; a stale socket file there is replaced."""
        path = os.fspath(path)
        await _reclaim_socket_path(path)
        try:
            server = await asyncio.start_unix_server(self._serve, path)
        except OSError as exc:
            raise ConfigError(f"cannot listen for QMP on unix:{path}: {exc.strerror}") from exc
        self._listening(server)
        self._unix_sockets.append((path, os.stat(path).st_ino))

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP; returns the address bound (useful with port 0)."""
        try:
            server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            address = f"tcp:{host}:{port}"
            raise ConfigError(f"cannot listen for QMP on {address}: {exc.strerror}") from exc
        self._listening(server)
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        return bound_host, bound_port

    def emit_event(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every negotiated client. Callable from any thread."""
        timestamp = self._wall_clock()
        # A deep copy taken now: the caller may change ``data`` once we return,
        # possibly from another thread. Also rejects what JSON cannot carry.
        snapshot = None if data is None else json.loads(json.dumps(data, allow_nan=False))
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not serving: nobody to tell
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            # Inside a command: the event goes out before the command's reply, as in QEMU.
            self._broadcast(name, snapshot, timestamp)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._broadcast, name, snapshot, timestamp)

    async def close(self) -> None:
        """Stop listening, disconnect every client, remove our socket files."""
        self._closing = True
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        for path, inode in self._unix_sockets:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self._servers.clear()
        self._unix_sockets.clear()

    def _listening(self, server: asyncio.Server) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._servers.append(server)

    def _broadcast(self, name: str, data: Mapping[str, object] | None, timestamp: float) -> None:
        for client in list(self._clients):
            client.conn.send_event(name, data, timestamp)
            client.flush()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:  # accepted just before close(), started after it
            writer.close()
            return
        if len(self._clients) >= MAX_CLIENTS:
            _log.warning("QMP: refusing a client: %d are connected already", len(self._clients))
            with contextlib.suppress(OSError):
                writer.write(_TOO_MANY_CLIENTS)
                await writer.drain()
            writer.close()
            return
        client = _Client(QmpServerConnection(self._greeting), writer)
        self._tasks.add(task)
        self._clients.add(client)
        try:
            while True:
                event = client.conn.next_event()
                client.flush()  # the greeting, or replies to requests the connection refused
                if event is NEED_DATA:
                    try:
                        data = await reader.read(READ_SIZE)
                    except OSError:
                        data = b""
                    client.conn.receive_data(data)
                elif isinstance(event, ConnectionClosed):
                    return
                else:
                    await self._execute(client, event)
        except asyncio.CancelledError:
            pass  # close() ends us; end quietly (3.11's stream callback logs cancelled tasks)
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()

    async def _execute(self, client: _Client, request: CommandRequest) -> None:
        try:
            value = await self._registry.dispatch(request)
            client.conn.send_return(request.id, value)
        except QmpError as exc:
            client.conn.send_error(request.id, exc.cls, exc.desc)
        except (TypeError, ValueError):
            _log.exception("QMP command %s returned a value JSON cannot carry", request.name)
            client.conn.send_error(
                request.id, ErrorClass.GENERIC_ERROR, f"Internal error in command {request.name}"
            )
        client.flush()
        with contextlib.suppress(OSError):  # the client left; the read loop will notice
            await client.writer.drain()


async def _reclaim_socket_path(path: str) -> None:
    """Make ``path`` free for a new socket, unless a live server owns it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"QMP socket path {path} exists and is not a socket")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), PROBE_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        return
    except TimeoutError:
        raise ConfigError(f"QMP socket {path} is in use (its server does not answer)") from None
    except OSError as exc:
        raise ConfigError(f"cannot probe QMP socket {path}: {exc.strerror}") from exc
    writer.close()
    raise ConfigError(f"QMP socket {path} is in use by a running server")
