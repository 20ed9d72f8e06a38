"""A virtio-like key-value device: clients on a Unix socket, the store in the guest.

The data lives in guest RAM and the guest serves every request; the device
only carries requests in and replies out, like a virtio queue. The guest
driver is ``confmig.guest.workloads.kv``; the two share nothing but the formats
below (documented in ``docs/guest.md``), as QEMU and Linux share only the
virtio specification.

Port registers (32-bit, at ``KV_PORT_BASE``)::

    +0x0  read: device ID "CMKV"        write: queue GPA, low half
    +0x4                                write: queue GPA, high half
    +0x8  read: 1 when the queue is live write: control (1: go live at the GPA, else reset)
    +0xC                                write: notify (completions published)

The queue (``KV_QUEUE_SIZE`` bytes of guest RAM, page aligned)::

    +0x000   le32 avail   requests the device has published (free-running)
    +0x040   le32 used    requests the guest has completed (free-running)
    +0x1000  KV_RING_SIZE slots of KV_SLOT_SIZE bytes; request i is in slot
             i % KV_RING_SIZE and the guest overwrites it with completion i

A slot holds ``u8 op|status, u8 0, le16 key_len, le32 value_len, le64 id``,
the key at +16 and the value at +80. The device publishes a slot before
``avail`` and reuses it only after it has read completion i; the guest raises
``used`` after writing the completions, then notifies.

Client frames are ``le32 length`` + body; a request body is the slot header
(op, key length, value length, request id) followed by key and value, a reply
body is ``u8 status, u8 0, le16 0, le32 value_len, le64 id`` and the value.
Request ids make retries idempotent: the guest remembers which id last wrote a
key, so a retried put or delete that already took effect is not applied twice.

Lifecycle: :meth:`start` listens; :meth:`stop` closes the listener and every
client and joins the I/O thread, after which the device writes no guest RAM
(so call it before the final RAM pass of a migration). Requests still in the
ring travel with guest RAM; the target device, which has no client for them,
drops their completions, and the clients retry on the target by id.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from confmig.common.errors import ConfigError, ProtocolError, StateError
from confmig.common.units import PAGE_SIZE
from confmig.proto.kvdev import (  # the device's public specification
    KV_CONTROL_ENABLE,
    KV_DEVICE_ID,
    KV_HEADER,
    KV_IRQ_VECTOR,
    KV_KEY_MAX,
    KV_PORT_BASE,
    KV_PORT_COUNT,
    KV_QUEUE_AVAIL,
    KV_QUEUE_RING,
    KV_QUEUE_SIZE,
    KV_QUEUE_USED,
    KV_REG_GPA_HI,
    KV_REG_ID_GPA_LO,
    KV_REG_NOTIFY,
    KV_REG_STATUS_CONTROL,
    KV_RING_SIZE,
    KV_SLOT_SIZE,
    KV_SLOT_VALUE,
    KV_VALUE_MAX,
    KvOp,
    KvStatus,
)
from confmig.vmm.memory import GuestMemory

KV_FRAME_MAX = KV_HEADER.size + KV_KEY_MAX + KV_VALUE_MAX
"""The largest frame body; a longer length prefix ends the connection."""
KV_BACKLOG_MAX = 1024
"""Requests waiting for a ring slot (all clients together); more are refused with BUSY."""
KV_MAX_CLIENTS = 64
KV_SEND_TIMEOUT = 2.0
"""Seconds a reply may block on a client that does not read; then it is dropped."""
KV_RECV_CHUNK = 64 * 1024

_U32 = 0xFFFF_FFFF
"""Ring indices are free-running 32-bit counters."""
_STATE = struct.Struct("<Q?QII")
"""Migration state: programmed GPA, live flag, live queue GPA, avail, last used."""


_OPS = frozenset(int(op) for op in KvOp)


_STATUSES = frozenset(int(status) for status in KvStatus)


@dataclass(frozen=True, slots=True, kw_only=True)
class KvRequest:
    op: KvOp
    id: int
    key: bytes
    value: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class KvReply:
    status: KvStatus
    id: int
    value: bytes = b""


class MalformedRequest(ProtocolError):
    """A client frame that is not a valid request; ``request_id`` is echoed if it parsed."""

    def __init__(self, request_id: int, reason: str) -> None:
        super().__init__(f"kv request {request_id:#x}: {reason}")
        self.request_id = request_id


# --- wire format (sans-IO) --------------------------------------------------------------


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "little") + body


def encode_request(req: KvRequest) -> bytes:
    header = KV_HEADER.pack(req.op, 0, len(req.key), len(req.value), req.id)
    return _frame(header + req.key + req.value)


def encode_reply(rep: KvReply) -> bytes:
    return _frame(KV_HEADER.pack(rep.status, 0, 0, len(rep.value), rep.id) + rep.value)


def parse_request(body: bytes) -> KvRequest:
    if len(body) < KV_HEADER.size:
        raise MalformedRequest(0, f"{len(body)}-byte body is shorter than the header")
    op, _, key_len, value_len, request_id = KV_HEADER.unpack_from(body)
    if op not in _OPS:
        raise MalformedRequest(request_id, f"unknown op {op}")
    if not 1 <= key_len <= KV_KEY_MAX:
        raise MalformedRequest(request_id, f"key length {key_len} not in 1..{KV_KEY_MAX}")
    if value_len > (KV_VALUE_MAX if op == KvOp.PUT else 0):
        raise MalformedRequest(request_id, f"value length {value_len} too long for {KvOp(op).name}")
    if len(body) != KV_HEADER.size + key_len + value_len:
        raise MalformedRequest(request_id, "body length disagrees with the header")
    key = body[KV_HEADER.size : KV_HEADER.size + key_len]
    return KvRequest(op=KvOp(op), id=request_id, key=key, value=body[KV_HEADER.size + key_len :])


def parse_reply(body: bytes) -> KvReply:
    if len(body) < KV_HEADER.size:
        raise ProtocolError(f"kv reply: {len(body)}-byte body is shorter than the header")
    status, _, _, value_len, request_id = KV_HEADER.unpack_from(body)
    if status not in _STATUSES or len(body) != KV_HEADER.size + value_len:
        raise ProtocolError(f"kv reply {request_id:#x}: bad status {status} or length")
    return KvReply(status=KvStatus(status), id=request_id, value=body[KV_HEADER.size :])


class FrameDecoder:
    """Splits a byte stream into frame bodies; buffers at most one partial frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Return the bodies completed by ``data``; raise ProtocolError on an oversized frame."""
        self._buf += data
        bodies = []
        while len(self._buf) >= 4:
            length = int.from_bytes(self._buf[:4], "little")
            if length > KV_FRAME_MAX:
                raise ProtocolError(f"kv frame of {length} bytes exceeds {KV_FRAME_MAX}")
            if len(self._buf) < 4 + length:
                break
            bodies.append(bytes(self._buf[4 : 4 + length]))
            del self._buf[: 4 + length]
        return bodies


# --- the device -------------------------------------------------------------------------


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.open = True


class KvDevice:
    """The kv device: port registers for the guest, a Unix socket for clients."""

    vmsd_name = "confmig-kv"
    ports = range(KV_PORT_BASE, KV_PORT_BASE + KV_PORT_COUNT)

    def __init__(
        self,
        memory: GuestMemory,
        raise_irq: Callable[[int], None],
        socket_path: str | os.PathLike[str],
    ) -> None:
        self._memory = memory
        self._raise_irq = raise_irq
        self._path = os.fspath(socket_path)
        self._lock = threading.Lock()
        """Guards the queue state below: the vCPU thread (ports), the I/O thread and
        the migration thread (save/load) all reach it."""
        self._programmed_gpa = 0
        self._live = False
        self._queue_gpa = 0
        self._avail = 0
        self._last_used = 0
        self._in_ring: dict[int, tuple[_Client, KvRequest]] = {}
        self._backlog: deque[tuple[_Client, KvRequest]] = deque()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._clients: list[_Client] = []
        self._wake_r = self._wake_w = -1
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Listen on the socket path and serve clients from an I/O thread."""
        if self._thread is not None:
            raise StateError("kv start", "listening", "stopped")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self._path)
            listener.listen(KV_MAX_CLIENTS)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"kv: cannot listen on {self._path}: {exc}") from exc
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="kv-device", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening, drop every client; no guest-RAM writes after this returns."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join()
        self._thread = None
        for client in self._clients:
            client.open = False
            client.sock.close()
        self._clients.clear()
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        with self._lock:
            self._backlog.clear()

    # --- port I/O (vCPU thread) --------------------------------------------------------

    def io_out(self, port: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        reg = port - KV_PORT_BASE
        if reg == KV_REG_NOTIFY:
            self._wake()
            return
        with self._lock:
            if reg == KV_REG_ID_GPA_LO:
                self._programmed_gpa = (self._programmed_gpa & ~_U32) | (value & _U32)
            elif reg == KV_REG_GPA_HI:
                self._programmed_gpa = (self._programmed_gpa & _U32) | (value << 32)
            elif reg == KV_REG_STATUS_CONTROL:
                self._reset_queue(enable=value == KV_CONTROL_ENABLE)
        self._wake()

    def io_in(self, port: int, size: int) -> bytes:
        reg = port - KV_PORT_BASE
        if reg == KV_REG_ID_GPA_LO:
            value = KV_DEVICE_ID
        elif reg == KV_REG_STATUS_CONTROL:
            value = int(self._live)
        else:
            value = 0
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _reset_queue(self, *, enable: bool) -> None:
        # Requests the guest never completed go back to the head of the backlog.
        unfinished = [self._in_ring[i] for i in sorted(self._in_ring)]
        self._backlog.extendleft(reversed(unfinished))
        self._in_ring.clear()
        self._avail = self._last_used = 0
        self._live = False
        gpa = self._programmed_gpa
        # SECURITY: the queue GPA is guest-controlled; it must be whole pages of RAM.
        if enable and gpa % PAGE_SIZE == 0 and self._is_ram(gpa, KV_QUEUE_SIZE):
            self._queue_gpa = gpa
            self._live = True

    def _is_ram(self, gpa: int, size: int) -> bool:
        try:
            self._memory.translate(gpa, size)
        except ValueError:
            return False
        return True

    # --- migration ---------------------------------------------------------------------

    def save_state(self) -> bytes:
        with self._lock:
            return _STATE.pack(
                self._programmed_gpa, self._live, self._queue_gpa, self._avail, self._last_used
            )

    def load_state(self, data: bytes) -> None:
        if len(data) != _STATE.size:
            raise ProtocolError(f"kv: device state is {len(data)} bytes, expected {_STATE.size}")
        programmed, live, queue, avail, last_used = _STATE.unpack(data)
        if live and (queue % PAGE_SIZE or not self._is_ram(queue, KV_QUEUE_SIZE)):
            raise ProtocolError(f"kv: device state names a queue at {queue:#x} outside RAM")
        if (avail - last_used) & _U32 > KV_RING_SIZE:
            raise ProtocolError(f"kv: device state has {avail - last_used} requests in flight")
        with self._lock:
            self._programmed_gpa, self._live, self._queue_gpa = programmed, live, queue
            self._avail, self._last_used = avail, last_used
            self._in_ring.clear()

    # --- I/O thread --------------------------------------------------------------------

    def _wake(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _serve(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._receive(sel, key.data)
                self._service()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if len(self._clients) >= KV_MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(True)
        sock.settimeout(KV_SEND_TIMEOUT)
        client = _Client(sock)
        self._clients.append(client)
        sel.register(sock, selectors.EVENT_READ, client)

    def _drop(self, sel: selectors.BaseSelector, client: _Client) -> None:
        if client.open:
            client.open = False
            sel.unregister(client.sock)
            client.sock.close()
            self._clients.remove(client)

    def _receive(self, sel: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.sock.recv(KV_RECV_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._drop(sel, client)
            return
        try:
            bodies = client.decoder.feed(data)
        except ProtocolError:
            self._send(client, KvReply(status=KvStatus.MALFORMED, id=0))
            self._drop(sel, client)
            return
        for body in bodies:
            try:
                request = parse_request(body)
            except MalformedRequest as exc:
                self._send(client, KvReply(status=KvStatus.MALFORMED, id=exc.request_id))
                continue
            with self._lock:
                full = len(self._backlog) >= KV_BACKLOG_MAX
                if not full:
                    self._backlog.append((client, request))
            if full:
                self._send(client, KvReply(status=KvStatus.BUSY, id=request.id))

    def _send(self, client: _Client, reply: KvReply) -> None:
        if not client.open:
            return
        try:
            client.sock.sendall(encode_reply(reply))
        except OSError:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)  # the selector sees EOF and drops it

    def _service(self) -> None:
        """Hand completions back to their clients, then fill free slots from the backlog."""
        with self._lock:
            replies = self._collect() if self._live else []
            published = self._publish() if self._live else 0
        for client, reply in replies:
            self._send(client, reply)
        if published:
            self._raise_irq(KV_IRQ_VECTOR)

    def _collect(self) -> list[tuple[_Client, KvReply]]:
        queue = self._queue_gpa
        used = int.from_bytes(self._memory.read(queue + KV_QUEUE_USED, 4), "little")
        done = (used - self._last_used) & _U32
        # SECURITY: `used` is guest-written; it may not pass requests never published.
        if done > (self._avail - self._last_used) & _U32:
            return []
        replies = []
        for _ in range(done):
            index = self._last_used
            self._last_used = (index + 1) & _U32
            owner = self._in_ring.pop(index, None)
            if owner is None:
                continue  # published by the device we were migrated from
            client, request = owner
            slot = queue + KV_QUEUE_RING + (index % KV_RING_SIZE) * KV_SLOT_SIZE
            replies.append((client, _completion(self._memory.read(slot, KV_SLOT_SIZE), request)))
        return replies

    def _publish(self) -> int:
        queue, count = self._queue_gpa, 0
        while self._backlog and (self._avail - self._last_used) & _U32 < KV_RING_SIZE:
            client, request = self._backlog.popleft()
            if not client.open:
                continue
            slot = queue + KV_QUEUE_RING + (self._avail % KV_RING_SIZE) * KV_SLOT_SIZE
            header = KV_HEADER.pack(request.op, 0, len(request.key), len(request.value), request.id)
            self._memory.write(slot, header + request.key.ljust(KV_KEY_MAX, b"\0") + request.value)
            self._in_ring[self._avail] = (client, request)
            self._avail = (self._avail + 1) & _U32
            count += 1
        if count:
            self._memory.write(queue + KV_QUEUE_AVAIL, self._avail.to_bytes(4, "little"))
        return count


def _completion(slot: bytes, request: KvRequest) -> KvReply:
    # SECURITY: the completion is guest-written; anything odd becomes IO_ERROR.
    status, _, _, value_len, completion_id = KV_HEADER.unpack_from(slot)
    valid = (
        status in _STATUSES
        and completion_id == request.id
        and value_len <= (KV_VALUE_MAX if request.op == KvOp.GET else 0)
    )
    if not valid:
        return KvReply(status=KvStatus.IO_ERROR, id=request.id)
    return KvReply(
        status=KvStatus(status),
        id=request.id,
        value=slot[KV_SLOT_VALUE : KV_SLOT_VALUE + value_len],
    )
