"""Blocking I/O for the ioctl channel: frames from :mod:`confmig.proto.ioctl`
over a Unix stream socket, file descriptors as SCM_RIGHTS."""

from __future__ import annotations

import array
import contextlib
import socket

from confmig.common.errors import ProtocolError
from confmig.proto import ioctl


class ChannelClosed(Exception):
    """The peer closed the channel (EOF between frames)."""


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if fds is not None:
            anc_space = socket.CMSG_SPACE(ioctl.MAX_FDS * 4)
            k, anc, _flags, _addr = sock.recvmsg_into([view[got:]], anc_space)
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fa = array.array("i")
                    fa.frombytes(data[: len(data) - len(data) % 4])
                    fds.extend(fa)
        else:
            k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                raise ChannelClosed
            raise ProtocolError(f"ioctl channel: EOF inside a frame ({got}/{n} bytes)")
        got += k
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, fds: list[int] | None) -> None:
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def send_request(sock: socket.socket, req: ioctl.Request, fds: list[int] | None = None) -> None:
    _send(sock, ioctl.encode_request(req), fds)


def recv_request(sock: socket.socket) -> tuple[ioctl.Request, list[int]]:
    fds: list[int] = []
    head = _recv_exact(sock, ioctl.HEADER_SIZE, fds)
    length, request, seq, nfds = ioctl.decode_request_header(head)
    payload = _recv_exact(sock, length) if length else b""
    if len(fds) != nfds:
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"{ioctl.name(request)}: announced {nfds} fds, received {len(fds)}")
    return ioctl.Request(request, seq, payload, nfds), fds


def send_reply(sock: socket.socket, rep: ioctl.Reply, fds: list[int] | None = None) -> None:
    _send(sock, ioctl.encode_reply(rep), fds)


def recv_reply(sock: socket.socket) -> tuple[ioctl.Reply, list[int]]:
    fds: list[int] = []
    head = _recv_exact(sock, ioctl.HEADER_SIZE, fds)
    length, request, seq, result = ioctl.decode_reply_header(head)
    payload = _recv_exact(sock, length) if length else b""
    return ioctl.Reply(request, seq, result, payload), fds


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
