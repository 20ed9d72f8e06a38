"""Blocking I/O for the ioctl channel: frames from :mod:`confmig.proto.ioctl`
over a Unix stream socket, file descriptors as SCM_RIGHTS."""

from __future__ import annotations

import array
import contextlib
import socket
from typing import Final

from confmig.common.errors import ProtocolError
from confmig.proto import ioctl

DISCARD_CHUNK: Final = 64 << 10
"""Bytes read at a time while skipping the payload of a refused request: skipping a payload
costs no more memory than this, however long the peer said it was."""

class ChannelClosed(Exception):
    """The peer closed the channel (EOF between frames)."""


class RequestTooLarge(ProtocolError):
    """A request whose payload exceeds the receiver's bound. Its payload was read and dropped
    (and its descriptors closed): the framing is intact, and the receiver may answer it
    ``-E2BIG`` and go on serving."""

    def __init__(self, request: int, seq: int, length: int, limit: int) -> None:
        super().__init__(f"{ioctl.name(request)}: payload of {length} bytes exceeds the "
                         f"{limit}-byte limit of a request")
        self.request = request
        self.seq = seq


def recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None, *,
               max_fds: int = ioctl.MAX_FDS) -> bytes:
    """``n`` bytes, and into ``fds`` the descriptors that came with them (SCM_RIGHTS, at most
    ``max_fds`` per message). :class:`ChannelClosed` at EOF before a byte, else
    :class:`ProtocolError` for EOF inside."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if fds is not None:
            anc_space = socket.CMSG_SPACE(max_fds * 4)
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


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int] | None) -> None:
    """All of ``data``, the descriptors (SCM_RIGHTS) with its first part."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def send_request(sock: socket.socket, req: ioctl.Request, fds: list[int] | None = None) -> None:
    send_with_fds(sock, ioctl.encode_request(req), fds)


def recv_request(
    sock: socket.socket, *, max_payload: int = ioctl.MAX_PAYLOAD
) -> tuple[ioctl.Request, list[int]]:
    """One request and the descriptors that came with it (the caller's to close).

    A payload longer than ``max_payload`` is skipped and raises :class:`RequestTooLarge`;
    every other malformed frame raises :class:`ProtocolError` (the framing is lost then).
    Descriptors received with a frame that fails are closed, whatever the failure.
    """
    fds: list[int] = []
    try:
        head = recv_exact(sock, ioctl.HEADER_SIZE, fds)
        length, request, seq, nfds = ioctl.unpack_request_header(head)
        # SECURITY: the length is the peer's; a payload past the bound is never buffered.
        if length > max_payload and nfds <= ioctl.MAX_FDS:
            _discard(sock, length)
            raise RequestTooLarge(request, seq, length, max_payload)
        ioctl.decode_request_header(head)  # the protocol's own bounds
        try:
            payload = recv_exact(sock, length) if length else b""
        except ChannelClosed:
            raise ProtocolError(f"{ioctl.name(request)}: EOF before its {length}-byte payload") from None
        if len(fds) != nfds:
            raise ProtocolError(f"{ioctl.name(request)}: announced {nfds} fds, received {len(fds)}")
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return ioctl.Request(request, seq, payload, nfds), fds


def _discard(sock: socket.socket, n: int) -> None:
    buf = bytearray(min(n, DISCARD_CHUNK))
    view = memoryview(buf)
    while n:
        k = sock.recv_into(view[: min(n, len(buf))])
        if k == 0:
            raise ProtocolError(f"ioctl channel: EOF inside a refused request's payload ({n} bytes left)")
        n -= k


def send_reply(sock: socket.socket, rep: ioctl.Reply, fds: list[int] | None = None) -> None:
    send_with_fds(sock, ioctl.encode_reply(rep), fds)


def recv_reply(sock: socket.socket) -> tuple[ioctl.Reply, list[int]]:
    fds: list[int] = []
    try:
        head = recv_exact(sock, ioctl.HEADER_SIZE, fds)
        length, request, seq, result = ioctl.decode_reply_header(head)
        payload = recv_exact(sock, length) if length else b""
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return ioctl.Reply(request, seq, result, payload), fds


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
