"""The key broker over HTTP: ``confmig owner serve``.

A :class:`~http.server.ThreadingHTTPServer` around :class:`~.broker.KeyBroker`,
serving the routes and bodies of :mod:`confmig.proto.keybroker`. Every failure
is an ``ErrorReply`` with the status of its :class:`~.errors.OwnerError`.
Bounded: request bodies (``keybroker.MAX_BODY``), the time a client may take
to send one (:data:`REQUEST_TIMEOUT`), and the requests served at once
(:data:`MAX_CONCURRENT_REQUESTS`). Plain HTTP, as the threat
model allows: nothing the broker sends is useful to the host (the session blob
is wrapped for the platform, the secret is sealed under the TEK), and nothing
the host sends is trusted without verification.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, TypeVar

from confmig.common.errors import KeyBrokerMessageError
from confmig.owner.broker import KeyBroker
from confmig.owner.errors import OwnerError, RequestError, RequestTooLarge
from confmig.proto.keybroker import (
    DECISION_PATH,
    HEALTH_PATH,
    LAUNCH_PATH,
    MAX_BODY,
    MEASUREMENT_PATH_RE,
    DecisionRequest,
    ErrorReply,
    HealthResponse,
    LaunchRequest,
    MeasurementRequest,
    Message,
    decode,
    encode,
)

log = logging.getLogger("confmig.owner")

_Request = TypeVar("_Request", LaunchRequest, MeasurementRequest, DecisionRequest)

REQUEST_TIMEOUT: Final = 10.0
"""Seconds a client may take to send a request: a stalled client must not hold a thread."""
MAX_CONCURRENT_REQUESTS: Final = 32
"""Requests served at once; more get 503 at once instead of a thread each."""
_BUSY_BODY: Final = encode(ErrorReply(error="too many concurrent requests; retry"))
_BUSY_REPLY: Final = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_BUSY_BODY) + _BUSY_BODY
)


class OwnerServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], broker: KeyBroker) -> None:
        self.broker = broker
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_REPLY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(broker: KeyBroker, host: str = "127.0.0.1", port: int = 0) -> OwnerServer:
    """A bound, not yet serving, key broker; ``port=0`` picks a free port (see ``server.url``)."""
    return OwnerServer((host, port), broker)


class _Handler(BaseHTTPRequestHandler):
    server: OwnerServer
    timeout = REQUEST_TIMEOUT
    server_version = "confmig-owner/1"

    def version_string(self) -> str:
        return self.server_version

    def do_POST(self) -> None:
        path = self.path
        try:
            if path == LAUNCH_PATH:
                launch = self._read(LaunchRequest)
                self._reply(200, self.server.broker.launch(launch))
                return
            match = MEASUREMENT_PATH_RE.fullmatch(path)
            if match is not None:
                measured = self._read(MeasurementRequest)
                self._reply(200, self.server.broker.measurement(match.group(1), measured))
                return
            if path == DECISION_PATH:
                self._reply(200, self.server.broker.decide(self._read(DecisionRequest)))
                return
            self._reply(404, ErrorReply(error=f"no such endpoint: POST {path[:100]}"))
        except OwnerError as exc:
            self._reply(exc.http_status, ErrorReply(error=str(exc)))
        except Exception:
            log.exception("key broker: internal error on POST %s", path[:100])
            self._reply(500, ErrorReply(error="internal error"))

    def do_GET(self) -> None:
        if self.path == HEALTH_PATH:
            self._reply(200, HealthResponse(status="ok"))
        else:
            self._not_allowed()

    def _not_allowed(self) -> None:
        if self.path in (LAUNCH_PATH, DECISION_PATH) or MEASUREMENT_PATH_RE.fullmatch(self.path):
            self._reply(405, ErrorReply(error=f"{self.command} not allowed on {self.path}: use POST"))
        else:
            self._reply(404, ErrorReply(error=f"no such endpoint: {self.command} {self.path[:100]}"))

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _read(self, kind: type[_Request]) -> _Request:
        # SECURITY: the body comes from the untrusted host; its size is bounded before it is read.
        length_header = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also takes '²' or '٣', which int() refuses.
        if length_header is None or not (length_header.isascii() and length_header.isdigit()):
            raise RequestError("a request body with a Content-Length is required")
        digits = length_header.lstrip("0") or "0"
        if len(digits) > len(str(MAX_BODY)) or int(digits) > MAX_BODY:
            # Converted only once short: int() of thousands of digits is slow, and refused past 4300.
            shown = digits if len(digits) <= 20 else digits[:20] + "..."
            raise RequestTooLarge(f"request body of {shown} bytes exceeds {MAX_BODY}")
        length = int(digits)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(f"request body not received within {REQUEST_TIMEOUT:g} s") from None
        if len(body) != length:
            raise RequestError("request body shorter than its Content-Length")
        try:
            return decode(kind, body)
        except KeyBrokerMessageError as exc:
            raise RequestError(str(exc)) from exc

    def _reply(self, status: int, message: Message) -> None:
        data = encode(message)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)
