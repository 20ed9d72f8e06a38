"""Where a migration stream goes: QEMU's URIs and the byte channels behind them.

``tcp:HOST:PORT`` and ``unix:PATH`` are sockets (several connections when
multifd is on; a return path for the target's verdict); ``file:PATH`` writes or
reads a file; ``exec:CMD`` pipes into or out of ``sh -c CMD``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfigError, RemoteMigrationError
from confmig.proto.stream.decoder import views_after

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the target to accept the connection."""
SOCKET_BUFFER_CHUNK = 1 << 20
_IOV_MAX = 1024
"""Linux's UIO_MAXIOV: buffers per scatter read or gather write."""

if not ctypes.sizeof(ctypes.c_void_p) == ctypes.sizeof(ctypes.c_size_t) == 8:
    raise ImportError("send_iovec builds struct iovec as two u64 per row: a 64-bit platform only")
_libc = ctypes.CDLL(None, use_errno=True)
_writev = _libc.writev
_writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_writev.restype = ctypes.c_ssize_t
"""libc's ``writev``, called with an iovec array built by numpy (ctypes lets go of the GIL
for the call): Python's ``sendmsg`` would take a buffer object per iovec entry, thousands
for a batch of pages."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationUri:
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    command: str = ""

    @property
    def is_socket(self) -> bool:
        return self.scheme in ("tcp", "unix")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp:{self.host}:{self.port}"
        if self.scheme == "exec":
            return f"exec:{self.command}"
        return f"{self.scheme}:{self.path}"


def parse_uri(uri: str) -> MigrationUri:
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ConfigError(f"Invalid migration URI '{uri}' (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD)")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"Invalid migration URI '{uri}': port must be a number in 0..65535")
        return MigrationUri(scheme="tcp", host=host or "0.0.0.0", port=int(port))
    if scheme in ("unix", "file"):
        path, _, opts = rest.partition(",")
        if opts:
            raise ConfigError(f"Invalid migration URI '{uri}': options are not supported")
        return MigrationUri(scheme=scheme, path=path)
    if scheme == "exec":
        return MigrationUri(scheme="exec", command=rest)
    raise ConfigError(f"Invalid migration URI '{uri}': unknown transport '{scheme}'")


class Channel:
    """A byte channel over one file descriptor (socket, pipe or file)."""

    def __init__(self, fd: int, *, sock: socket.socket | None = None,
                 proc: subprocess.Popen[bytes] | None = None, name: str = "") -> None:
        self.fd = fd
        self.sock = sock
        self.proc = proc
        self.name = name
        self.sent = 0
        """Bytes written so far (the engine's ``transferred`` is the sum over its channels)."""

    @property
    def kind(self) -> str:
        """What the channel writes to, in QEMU's words (``qio_channel_*``)."""
        return "socket" if self.sock is not None else "command" if self.proc is not None else "file"

    def send_all(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            if self.sock is not None:
                self.sock.sendall(view)
            else:
                done = 0
                while done < len(view):
                    done += os.write(self.fd, view[done:])
            self.sent += len(view)
            return len(view)
        except OSError as exc:  # QEMU's wording: "Unable to write to socket: Broken pipe"
            raise RemoteMigrationError(f"Unable to write to {self.kind}: {exc.strerror or exc}") from exc

    def send_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """:meth:`send_all` of a few parts one after another, without joining them: a gather
        write per system call (``sendmsg``/``writev``: no copy on the way). A batch of pages,
        thousands of buffers, goes through :meth:`send_iovec` instead (no object per buffer)."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            while views:
                n = self.sock.sendmsg(views[:_IOV_MAX]) if self.sock is not None else (
                    os.writev(self.fd, views[:_IOV_MAX]))
                views = views_after(views, n)
        except OSError as exc:
            raise RemoteMigrationError(f"Unable to write to {self.kind}: {exc.strerror or exc}") from exc
        self.sent += total
        return total

    def send_iovec(self, iov: npt.NDArray[np.uint64], *, owner: object) -> int:
        """One gather write of ``iov``, ``struct iovec`` rows ``(base, length)`` that point
        into ``owner``'s memory (held for the call), as QEMU's ``qio_channel_writev_all``.
        The array is consumed: a partial write advances its rows in place. A socket's
        timeout bounds each wait for room (as it bounds each call of the socket's own
        methods), not the whole write."""
        # SECURITY: the rows go to the kernel as addresses: the array must be exactly rows of
        # two native u64, or an address would be read as a length (and the reverse).
        if (iov.dtype != np.dtype(np.uint64) or iov.ndim != 2 or iov.shape[1] != 2
                or not iov.flags.c_contiguous or not iov.flags.writeable):
            raise ValueError("an iovec is a writable C-contiguous (n, 2) array of native uint64")
        total = left = int(iov[:, 1].sum())
        at = 0
        while left:
            chunk = iov[at : at + _IOV_MAX]
            n = _writev(self.fd, chunk.ctypes.data, len(chunk))
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):  # a socket with a timeout
                    self._wait_writable()
                    continue
                raise RemoteMigrationError(f"Unable to write to {self.kind}: {os.strerror(err)}")
            left -= n
            if not left:  # all written: the usual end, one call for up to 1024 rows
                break
            ends = np.cumsum(chunk[:, 1])
            if n == 0 and ends[-1]:
                raise RemoteMigrationError(f"Unable to write to {self.kind}: it took no bytes")
            done = int(np.searchsorted(ends, n, side="right"))  # rows written whole
            at += done
            if done < len(chunk):
                part = n - (int(ends[done - 1]) if done else 0)
                chunk[done, 0] += np.uint64(part)
                chunk[done, 1] -= np.uint64(part)
        del owner  # held until here: the kernel has copied every row
        self.sent += total
        return total

    def _wait_writable(self) -> None:
        """Wait as long as the socket's timeout allows for room to write (``poll``: any fd)."""
        timeout = self.sock.gettimeout() if self.sock is not None else None
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        if not poller.poll(None if timeout is None else timeout * 1000):
            raise RemoteMigrationError(f"Unable to write to {self.kind}: timed out")

    def recv_into(self, buf: memoryview) -> int:
        if self.sock is not None:
            return self.sock.recv_into(buf)
        return os.readv(self.fd, [buf])

    def recv_views(self, views: list[memoryview]) -> int:
        """One receive into ``views``, in order (``recvmsg_into``/``readv``: no copy on the
        way); a socket waits until all are full, unless the input ends. Returns the bytes
        received; the connection closed is an error."""
        if self.sock is not None:
            n: int = self.sock.recvmsg_into(views[:_IOV_MAX], 0, socket.MSG_WAITALL)[0]
        else:
            n = os.readv(self.fd, views[:_IOV_MAX])
        if n == 0:
            raise RemoteMigrationError(f"{self.name}: connection closed")
        return n

    def recv_exact_into(self, views: list[memoryview]) -> None:
        """Fill every one of ``views``, in order."""
        while views:
            views = views_after(views, self.recv_views(views))

    def recv_exact(self, n: int) -> bytes:
        out = bytearray(n)
        self.recv_exact_into([memoryview(out)])
        return bytes(out)

    def set_buffer_size(self, *, send: int = 0, receive: int = 0) -> None:
        """Bound the socket's buffers (bytes; 0 leaves one to the kernel). Files and pipes
        have none to bound."""
        sock = self.sock
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return
        if send:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send)
        if receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive)

    def set_timeout(self, seconds: float | None) -> None:
        """Deadline for each later send or receive on a socket (files and pipes have none)."""
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def abort(self) -> None:
        """Unblock any thread in send/recv (cancel): shut the socket down."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _socket_for(uri: MigrationUri) -> tuple[socket.socket, object]:
    if uri.scheme == "tcp":
        infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
        family, _t, _p, _c, addr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s, addr
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), uri.path


class Connect(Protocol):
    """Opens one outgoing channel (:func:`connect`; a fake in unit tests)."""

    def __call__(self, uri: MigrationUri, *, name: str = "main") -> Channel: ...


def connect(uri: MigrationUri, *, name: str = "main") -> Channel:
    """Open the outgoing side (source)."""
    try:
        if uri.is_socket:
            s, addr = _socket_for(uri)
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(addr)  # type: ignore[arg-type]
            s.settimeout(None)
            return Channel(s.fileno(), sock=s, name=name)
        if uri.scheme == "file":
            fd = os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            return Channel(fd, name=uri.path)
        proc = subprocess.Popen(["/bin/sh", "-c", uri.command], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        return Channel(proc.stdin.fileno(), proc=proc, name=uri.command)
    except OSError as exc:
        raise RemoteMigrationError(f"Failed to connect to '{uri}': {exc.strerror or exc}") from exc


class Listener:
    """The incoming side (target): listens on a socket, or opens the file/command."""

    def __init__(self, uri: MigrationUri) -> None:
        self.uri = uri
        self.sock: socket.socket | None = None
        if uri.is_socket:
            s, addr = _socket_for(uri)
            if uri.scheme == "tcp":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif os.path.exists(uri.path):
                os.unlink(uri.path)
            try:
                s.bind(addr)  # type: ignore[arg-type]
            except OSError as exc:
                s.close()
                raise ConfigError(f"Failed to listen on '{uri}': {exc.strerror or exc}") from exc
            s.listen(16)
            self.sock = s
        self.address = str(uri)
        """The bound address, e.g. after ``tcp:127.0.0.1:0`` picked a port."""
        if self.sock is not None and uri.scheme == "tcp":
            host, port = self.sock.getsockname()[:2]
            self.address = f"tcp:{host}:{port}"

    def accept(self) -> Channel:
        if self.sock is not None:
            conn, _ = self.sock.accept()
            if self.uri.scheme == "tcp":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Channel(conn.fileno(), sock=conn, name=str(self.uri))
        if self.uri.scheme == "file":
            try:
                return Channel(os.open(self.uri.path, os.O_RDONLY | os.O_CLOEXEC), name=self.uri.path)
            except OSError as exc:
                raise ConfigError(f"Failed to open '{self.uri.path}': {exc.strerror}") from exc
        proc = subprocess.Popen(["/bin/sh", "-c", self.uri.command], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return Channel(proc.stdout.fileno(), proc=proc, name=self.uri.command)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            if self.uri.scheme == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.uri.path)
