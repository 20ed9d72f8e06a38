"""The ``cpr`` channel of QEMU's ``cpr-transfer`` mode: descriptors from the old VMM to the new.

QEMU 10's shape, kept: the new VMM is started with two ``-incoming`` options,
the main channel and a ``cpr`` channel (a UNIX socket,
``{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": ...}}``);
it reads the cpr channel *before* it builds its machine or opens its monitor,
because the machine is built on what arrives there: the guest's RAM (memfds),
its VM fd and its Migration Handler's mirror VM fd. The old VMM's ``migrate``
names both channels; it connects the cpr channel first, sends the CPR state
(:mod:`confmig.proto.cpr`) with the descriptors as SCM_RIGHTS, waits until the
new VMM hangs up (it has built its machine and listens on the main channel),
then connects the main channel and migrates as usual, sending no RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from confmig.common.errors import ConfigError, ProtocolError, RemoteMigrationError
from confmig.kvm import channel
from confmig.proto import cpr
from confmig.vmm.migration.transport import Channel, MigrationUri, connect, parse_uri

CPR_HANDOVER_TIMEOUT = 60.0
"""Seconds the old VMM waits for the new one to take the descriptors and build its machine
(it starts a vCPU process per vCPU: seconds on a loaded machine)."""
CPR_RECEIVE_TIMEOUT = 3600.0
"""Seconds a new VMM waits on its cpr channel for the old one's ``migrate``."""


def parse_channel(spec: Mapping[str, object]) -> tuple[str, str]:
    """QEMU's ``MigrationChannel`` (``channel-type`` and a socket ``addr``) as (type, URI)."""
    ctype = spec.get("channel-type")
    addr = spec.get("addr")
    if ctype not in ("main", "cpr"):
        raise ConfigError(f"migration channel: channel-type '{ctype}' is not main or cpr")
    if not isinstance(addr, Mapping) or addr.get("transport") != "socket":
        raise ConfigError("migration channel: only addr transport 'socket' is supported")
    kind = addr.get("type")
    if kind == "unix" and isinstance(addr.get("path"), str):
        uri = f"unix:{addr['path']}"
    elif kind == "inet" and ctype == "main" and "host" in addr and "port" in addr:
        uri = f"tcp:{addr['host']}:{addr['port']}"
    else:
        raise ConfigError(f"migration channel {ctype}: addr must be a unix socket with a path"
                          + (" or an inet socket with host and port" if ctype == "main" else ""))
    parse_uri(uri)  # refuse a bad port now
    return str(ctype), uri


def incoming_option(text: str) -> tuple[str, str]:
    """One ``-incoming`` option: a URI (the main channel) or a JSON ``MigrationChannel``."""
    if not text.startswith("{"):
        return "main", text
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"-incoming: not a valid JSON migration channel: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError("-incoming: a JSON migration channel is an object")
    return parse_channel(spec)


# --- the old VMM ------------------------------------------------------------------------


@dataclass
class CprSender:
    """The source's connect for ``cpr-transfer``: before the main channel, the CPR state and
    its descriptors on the cpr channel, then a wait for the new VMM to hang up."""

    cpr_uri: MigrationUri
    state: cpr.CprState
    fds: list[int]
    timeout: float = CPR_HANDOVER_TIMEOUT
    sent: int = 0
    """Bytes written on the cpr channel."""
    handed: bool = False
    """The new VMM took the descriptors and hung up."""
    _calls: int = field(default=0, repr=False)

    def connect(self, uri: MigrationUri, *, name: str = "main") -> Channel:
        if self._calls == 0:
            self._calls += 1
            self.hand_over()
        return connect(uri, name=name)

    def hand_over(self) -> None:
        data = cpr.encode(self.state)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            try:
                s.connect(self.cpr_uri.path)
                channel.send_with_fds(s, data, list(self.fds))
                self.sent = len(data)
                # The new VMM hangs up once its machine is built on our descriptors and it
                # listens on the main channel (QEMU 10 waits for the same HUP).
                if s.recv(1):
                    raise RemoteMigrationError("cpr channel: the new VMM sent data instead of hanging up")
            except TimeoutError:
                raise RemoteMigrationError(f"cpr channel {self.cpr_uri}: the new VMM did not take over "
                                           f"within {self.timeout:.0f} s") from None
            except OSError as exc:
                raise RemoteMigrationError(f"cpr channel {self.cpr_uri}: {exc.strerror or exc}") from exc
        finally:
            s.close()
        self.handed = True


# --- the new VMM ------------------------------------------------------------------------


@dataclass
class CprReceived:
    """What the new VMM got: the state and its descriptors (owned here until taken)."""

    state: cpr.CprState
    fds: list[int]

    def take(self, index: int) -> int:
        """The descriptor at ``index``: the caller owns it now."""
        fd = self.fds[index]
        if fd < 0:
            raise ValueError(f"CPR descriptor {index} was taken already")
        self.fds[index] = -1
        return fd

    def take_kind(self, kind: cpr.FdKind) -> int | None:
        i = self.state.index(kind)
        return None if i is None else self.take(i)

    def close(self) -> None:
        """Close whatever nobody took."""
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.fds[i] = -1


class CprListener:
    """The new VMM's cpr channel: listen, take one old VMM's state, hang up when ready."""

    def __init__(self, uri: str) -> None:
        parsed = parse_uri(uri)
        if parsed.scheme != "unix":
            raise ConfigError(f"cpr channel '{uri}': must be a unix socket "
                              "(descriptors pass with SCM_RIGHTS)")
        self.path = parsed.path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # The path appears only once the socket listens (bound elsewhere, then renamed): an old
        # VMM that connects as soon as it sees the path is never refused.
        staging = f"{self.path}.{os.getpid()}.tmp"
        try:
            self._sock.bind(staging)
            self._sock.listen(1)
            os.rename(staging, self.path)
        except OSError as exc:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise ConfigError(f"Failed to listen on cpr channel '{uri}': {exc.strerror or exc}") from exc
        self._conn: socket.socket | None = None

    def receive(self, timeout: float = CPR_RECEIVE_TIMEOUT) -> CprReceived:
        """Block until the old VMM's ``migrate`` sends its state (QEMU blocks the same way)."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            raise ConfigError(f"cpr channel {self.path}: no old VMM within {timeout:.0f} s")
        conn, _ = self._sock.accept()
        self._conn = conn
        conn.settimeout(10.0)
        fds: list[int] = []
        try:
            head = self._recv(conn, cpr.HEADER.size, fds)
            _n, want = cpr.decode_header(head)
            state = cpr.decode(head, self._recv(conn, want, fds))
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        if len(fds) != len(state.fds):
            for fd in fds:
                os.close(fd)
            raise cpr.CprError(f"CPR state names {len(state.fds)} descriptors, {len(fds)} came")
        return CprReceived(state=state, fds=fds)

    @staticmethod
    def _recv(conn: socket.socket, n: int, fds: list[int]) -> bytes:
        """``n`` bytes and their descriptors (the connection's timeout bounds each wait)."""
        try:
            return channel.recv_exact(conn, n, fds, max_fds=cpr.MAX_ENTRIES)
        except (channel.ChannelClosed, ProtocolError) as exc:
            raise cpr.CprError(f"cpr channel: closed inside {n} bytes ({exc or 'at once'})") from exc

    def release(self) -> None:
        """Hang up: the old VMM connects the main channel next."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
