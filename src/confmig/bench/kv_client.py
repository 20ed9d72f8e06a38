"""A client of the kv device that proves the guest kept every acknowledged write.

Requests go one at a time. Every acknowledged put and delete is remembered;
:meth:`KvClient.verify` reads each of those keys back. A request whose reply
never came (the VM migrated, the source VMM went away) stays *unacknowledged*
and the call raises ConnectionError; :meth:`KvClient.reconnect` connects to
the new device and sends those requests again with their original ids, which
the guest treats idempotently. The longest gap between two acknowledged
replies is the service interruption a client saw.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass

from confmig.common.clock import Clock, MonotonicClock
from confmig.common.errors import ConfmigError, ProtocolError
from confmig.proto.kvdev import KvOp, KvStatus
from confmig.vmm.devices.kv import (
    FrameDecoder,
    KvReply,
    KvRequest,
    encode_request,
    parse_reply,
)

KV_REPLY_TIMEOUT = 10.0
"""Seconds a reply may take before the connection counts as lost."""
KV_CONNECT_TIMEOUT = 30.0
"""Seconds to keep trying to connect: the target VMM may not be listening yet."""
_CONNECT_RETRY = 0.05


class KvRequestError(ConfmigError):
    """The device or the guest refused a request (full table, malformed, busy)."""

    def __init__(self, request: KvRequest, status: KvStatus) -> None:
        super().__init__(f"kv {request.op.name} {request.key!r}: {status.name}")
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class KvVerification:
    keys: int
    mismatched: tuple[bytes, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatched


class KvClient:
    """One connection to a kv device, with a memory of what it acknowledged."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        client_id: int | None = None,
        reply_timeout: float = KV_REPLY_TIMEOUT,
        connect_timeout: float = KV_CONNECT_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self._id_base = (client_id if client_id is not None else secrets.randbits(31)) << 32
        self._seq = 0
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout
        self._clock = clock or MonotonicClock()
        self._unacked: dict[int, KvRequest] = {}
        self.acknowledged: dict[bytes, bytes | None] = {}
        """Every key this client changed and got an acknowledgement for: its value, or None
        when the last acknowledged change deleted it."""
        self.longest_gap = 0.0
        """Longest time, in seconds, between two acknowledged replies."""
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._connect(path)
        self._last_ack = self._clock.monotonic()

    # --- requests ----------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self._call(KvOp.PUT, key, value)

    def get(self, key: bytes) -> bytes | None:
        reply = self._call(KvOp.GET, key)
        return reply.value if reply.status == KvStatus.OK else None

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return self._call(KvOp.DEL, key).status == KvStatus.OK

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    def reconnect(self, path: str | os.PathLike[str]) -> None:
        """Connect to ``path`` (retrying until it listens) and resend unacknowledged requests."""
        self.close()
        self._connect(path)
        for request in list(self._unacked.values()):
            self._exchange(request)

    def verify(self) -> KvVerification:
        """Read back every acknowledged key and compare."""
        mismatched = tuple(k for k, v in list(self.acknowledged.items()) if self.get(k) != v)
        return KvVerification(keys=len(self.acknowledged), mismatched=mismatched)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- the exchange ------------------------------------------------------------------

    def _call(self, op: KvOp, key: bytes, value: bytes = b"") -> KvReply:
        self._seq += 1
        request = KvRequest(op=op, id=self._id_base | self._seq, key=key, value=value)
        self._unacked[request.id] = request
        return self._exchange(request)

    def _exchange(self, request: KvRequest) -> KvReply:
        if self._sock is None:
            raise ConnectionError("kv: not connected; call reconnect()")
        try:
            self._sock.sendall(encode_request(request))
            reply = self._receive()
        except OSError as exc:
            self.close()
            raise ConnectionError(f"kv: connection lost during request {request.id:#x}") from exc
        if reply.id != request.id:
            raise ProtocolError(f"kv: reply for {reply.id:#x} while waiting for {request.id:#x}")
        del self._unacked[request.id]
        if reply.status not in (KvStatus.OK, KvStatus.NOT_FOUND):
            raise KvRequestError(request, reply.status)
        now = self._clock.monotonic()
        self.longest_gap = max(self.longest_gap, now - self._last_ack)
        self._last_ack = now
        if request.op == KvOp.PUT:
            self.acknowledged[request.key] = request.value
        elif request.op == KvOp.DEL:
            self.acknowledged[request.key] = None
        return reply

    def _receive(self) -> KvReply:
        assert self._sock is not None
        bodies: list[bytes] = []
        while not bodies:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionResetError("kv: device closed the connection")
            bodies = self._decoder.feed(data)
        if len(bodies) > 1:
            raise ProtocolError(f"kv: {len(bodies)} replies to one request")
        return parse_reply(bodies[0])

    def _connect(self, path: str | os.PathLike[str]) -> None:
        deadline = time.monotonic() + self._connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_CONNECT_RETRY)
        sock.settimeout(self._reply_timeout)
        self._sock = sock
        self._decoder = FrameDecoder()
