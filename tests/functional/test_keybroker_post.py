"""The key-broker transport against a peer that misbehaves: both clients refuse what it sends.

A one-shot TCP server answers with canned bytes; the VMM's client
(``OwnerLink``) and the owner's (``OwnerClient``) must both turn every answer
into their own clear error, never a stray exception.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from confmig.common.errors import ConfigError, KeyBrokerMessageError
from confmig.owner import OwnerClient, RemoteOwnerError
from confmig.proto.keybroker import (
    LAUNCH_PATH,
    MAX_BODY,
    ErrorReply,
    LaunchResponse,
    decode_reply,
    encode,
    post_json,
)
from confmig.vmm.sev import OwnerLink


def _http(status: str, body: bytes, headers: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


@contextmanager
def _answering(answer: bytes) -> Iterator[str]:
    """A URL whose server reads one request (all of it: unread bytes would reset the connection
    before the client reads the answer), sends ``answer`` and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            with conn.makefile("rb") as request:
                length = 0
                while (line := request.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                request.read(length)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(10)


def _vmm_launch(url: str) -> object:
    return OwnerLink(url).launch("vm1", bytes(2084), bytes(6252), 1)


def _client_launch(url: str) -> object:
    return OwnerClient(url, timeout=10).launch(vm="vm1", pdh=bytes(2084), cert_chain=bytes(6252), policy=1)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_http("200 OK", b" " * (MAX_BODY + 1)), f"body of {MAX_BODY + 1} bytes exceeds {MAX_BODY}"),
        (_http("200 OK", b'{"session_id": "x"}'), "launch reply: missing field"),
        (_http("403 Forbidden", b'{"error": "\\u001b[31m"}'), "HTTP status 403 with a malformed error body"),
        (_http("302 Found", b"{}", "Location: http://127.0.0.1:9/\r\n"), "unexpected HTTP status 302"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP answer"),
    ],
)
def test_malformed_answers_are_refused(answer: bytes, error: str) -> None:
    with _answering(answer) as url, pytest.raises(KeyBrokerMessageError, match=error):
        status, data = post_json(url, LAUNCH_PATH, b"{}", timeout=10)
        decode_reply(LaunchResponse, status, data)
    malformed = f"malformed reply: .*{error}"
    with _answering(answer) as url, pytest.raises(ConfigError, match=malformed):
        _vmm_launch(url)
    with _answering(answer) as url, pytest.raises(RemoteOwnerError, match=malformed) as info:
        _client_launch(url)
    assert info.value.status == 0


def test_a_refusal_keeps_its_status_and_text() -> None:
    answer = _http("409 Conflict", encode(ErrorReply(error="session already released")))
    with _answering(answer) as url, pytest.raises(ConfigError, match="guest owner refused: session already"):
        _vmm_launch(url)
    with _answering(answer) as url, pytest.raises(RemoteOwnerError, match=r"\(409\): session") as info:
        _client_launch(url)
    assert info.value.status == 409


def test_a_peer_that_hangs_up_gave_no_answer() -> None:
    with _answering(b"") as url, pytest.raises(OSError):
        post_json(url, LAUNCH_PATH, b"{}", timeout=10)
    with _answering(b"") as url, pytest.raises(ConfigError, match="cannot reach the guest owner"):
        _vmm_launch(url)
    with _answering(b"") as url, pytest.raises(RemoteOwnerError, match="cannot reach") as info:
        _client_launch(url)
    assert info.value.status == 0
