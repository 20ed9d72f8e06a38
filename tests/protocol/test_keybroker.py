"""The key-broker protocol: every message round trips, and nothing a peer sends gets past it unchecked.

Corruption is judged per byte, as the stream's tests judge it: a changed byte
of the framing (braces, names, separators, quotes) is refused or changes
nothing; a changed byte inside a field's value is refused or changes that
field alone, to another value the protocol allows. JSON carries no checksum:
the blobs are authenticated end to end by the SEV formats (session blob,
packet MAC, measurement HMAC), not by this encoding.
"""

from __future__ import annotations

import base64
import json
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confmig.common.errors import ConfigError, KeyBrokerMessageError, ProtocolError
from confmig.platform.psp.cert import SEV_CERT_SIZE
from confmig.platform.psp.chain import PLATFORM_CHAIN_SIZE
from confmig.platform.psp.measure import MEASUREMENT_SIZE
from confmig.platform.psp.packet import PACKET_HEADER_SIZE
from confmig.platform.psp.session import SESSION_SIZE
from confmig.proto import keybroker
from confmig.proto.keybroker import (
    MAX_BODY,
    MAX_ERROR_SIZE,
    MAX_SECRET_SIZE,
    DecisionRequest,
    DecisionResponse,
    ErrorReply,
    HealthResponse,
    LaunchRequest,
    LaunchResponse,
    MeasurementRequest,
    Message,
    SecretResponse,
    decode,
    decode_reply,
    encode,
)

B64 = base64.b64encode


def test_sizes_are_the_psps() -> None:
    assert (keybroker.PDH_SIZE, keybroker.CERT_CHAIN_SIZE, keybroker.SESSION_BLOB_SIZE,
            keybroker.MEASUREMENT_SIZE, keybroker.PACKET_HEADER_SIZE) == (
        SEV_CERT_SIZE, PLATFORM_CHAIN_SIZE, SESSION_SIZE, MEASUREMENT_SIZE, PACKET_HEADER_SIZE)


def test_the_error_is_a_protocol_error() -> None:
    assert issubclass(KeyBrokerMessageError, ProtocolError)


# --- messages ------------------------------------------------------------------------------


def blobs(size: int) -> st.SearchStrategy[bytes]:
    """Bytes of a fixed size from a drawn seed: every byte value matters alike to base64, and a
    seed keeps hypothesis's examples small."""
    return st.integers(0, 2**64 - 1).map(lambda seed: random.Random(seed).randbytes(size))


launch_requests = st.builds(
    LaunchRequest,
    vm=st.from_regex(re.compile(r"[A-Za-z0-9_.:@+-]{1,128}"), fullmatch=True),
    pdh=blobs(SEV_CERT_SIZE),
    cert_chain=blobs(PLATFORM_CHAIN_SIZE),
    policy=st.integers(0, 2**32 - 1),
)
launch_responses = st.builds(
    LaunchResponse,
    session_id=st.from_regex(keybroker.SESSION_ID_RE, fullmatch=True),
    godh=blobs(SEV_CERT_SIZE),
    session=blobs(SESSION_SIZE),
)
measurement_requests = st.builds(
    MeasurementRequest,
    measurement=blobs(MEASUREMENT_SIZE),
    api_major=st.integers(0, 255),
    api_minor=st.integers(0, 255),
    build=st.integers(0, 255),
)
secret_responses = st.integers(1, MAX_SECRET_SIZE // 16).flatmap(
    lambda blocks: st.builds(
        SecretResponse,
        secret_header=blobs(PACKET_HEADER_SIZE),
        secret=blobs(16 * blocks),
        guest_len=st.just(16 * blocks),
    )
)
decision_requests = st.builds(
    DecisionRequest, ticket=blobs(16), migration_id=blobs(16), challenge=blobs(16),
    outcome=st.sampled_from(["commit", "abort"]))
decision_responses = st.builds(
    DecisionResponse, outcome=st.sampled_from(["commit", "abort"]),
    token=st.integers(1, 256).flatmap(blobs))
error_replies = st.builds(
    ErrorReply, error=st.text(min_size=1, max_size=MAX_ERROR_SIZE).filter(str.isprintable)
)
messages: st.SearchStrategy[Message] = st.one_of(
    launch_requests, launch_responses, measurement_requests, secret_responses, decision_requests,
    decision_responses, error_replies,
    st.just(HealthResponse(status="ok")),
)

EXAMPLES: list[Message] = [
    LaunchRequest(vm="guest-1.example", pdh=b"p" * 2084, cert_chain=b"c" * 6252, policy=0x1),
    LaunchResponse(session_id="ab" * 16, godh=b"g" * 2084, session=b"s" * 128),
    MeasurementRequest(measurement=b"m" * 48, api_major=1, api_minor=55, build=25),
    SecretResponse(secret_header=b"h" * 52, secret=b"x" * 64, guest_len=64),
    DecisionRequest(ticket=b"t" * 16, migration_id=b"m" * 16, challenge=b"c" * 16, outcome="abort"),
    DecisionResponse(outcome="commit", token=b"k" * 178),
    HealthResponse(status="ok"),
    ErrorReply(error="launch measurement does not match — refusé"),
]
SETTINGS = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert type(message).from_json(message.to_json()) == message
    body = encode(message)
    assert body.isascii() and decode(type(message), body) == message


@SETTINGS
@given(messages)
def test_any_message_round_trips(message: Message) -> None:
    body = encode(message)
    assert len(body) <= MAX_BODY
    assert decode(type(message), body) == message


def test_the_largest_messages_fit_a_body() -> None:
    largest: list[Message] = [
        LaunchRequest(vm="v" * 128, pdh=bytes(2084), cert_chain=bytes(6252), policy=2**32 - 1),
        SecretResponse(secret_header=bytes(52), secret=bytes(MAX_SECRET_SIZE), guest_len=MAX_SECRET_SIZE),
        ErrorReply(error="\U0001f512" * MAX_ERROR_SIZE),  # 12 bytes each, as a JSON surrogate pair
    ]
    for message in largest:
        assert decode(type(message), encode(message)) == message


def test_paths() -> None:
    path = keybroker.measurement_path("ab" * 16)
    assert path == "/v1/launch/" + "ab" * 16 + "/measurement"
    match = keybroker.MEASUREMENT_PATH_RE.fullmatch(path)
    assert match is not None and match.group(1) == "ab" * 16
    assert not keybroker.MEASUREMENT_PATH_RE.fullmatch(keybroker.measurement_path("../x"))
    assert (keybroker.LAUNCH_PATH, keybroker.HEALTH_PATH) == ("/v1/launch", "/v1/health")


# --- what each field accepts ------------------------------------------------------------------

GOOD_LAUNCH: dict[str, Any] = LaunchRequest(vm="guest-1.example", pdh=b"p" * 2084, cert_chain=b"c" * 6252,
                                            policy=0x1).to_json()
GOOD_MEASUREMENT: dict[str, Any] = MeasurementRequest(measurement=b"m" * 48, api_major=1, api_minor=55,
                                                      build=25).to_json()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"policy": True}, "policy: expected an integer"),
        ({"policy": -1}, "policy: expected an integer"),
        ({"policy": 1 << 32}, "policy: expected an integer"),
        ({"policy": 1.0}, "policy: expected an integer"),
        ({"policy": "0x1"}, "policy: expected an integer"),
        ({"pdh": "not base64!"}, "pdh: not valid base64"),
        ({"pdh": B64(b"p" * 2083).decode()}, "pdh: expected 2084 bytes, got 2083"),
        ({"pdh": B64(b"p" * 2084).decode()[:-2] + "B="}, "pdh: not canonical base64"),  # ...cHA= is canonical
        ({"cert_chain": B64(b"c" * 2084).decode()}, "cert_chain: expected 6252 bytes"),
        ({"pdh": 5}, "pdh: expected a base64 string"),
        ({"vm": ""}, "vm: expected a string"),
        ({"vm": "a b"}, "vm: expected a string"),
        ({"vm": "x" * 129}, "vm: expected a string"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_launch_requests(change: dict[str, Any], error: str) -> None:
    with pytest.raises(KeyBrokerMessageError, match=error):
        LaunchRequest.from_json({**GOOD_LAUNCH, **change})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([], "expected a JSON object"),
        ("x", "expected a JSON object"),
        ({k: v for k, v in GOOD_MEASUREMENT.items() if k != "build"}, "missing field"),
        ({**GOOD_MEASUREMENT, "api_minor": 256}, "api_minor: expected an integer from 0 to 255"),
        ({**GOOD_MEASUREMENT, "measurement": B64(b"m" * 32).decode()}, "expected 48 bytes"),
    ],
)
def test_bad_measurement_requests(body: object, error: str) -> None:
    with pytest.raises(KeyBrokerMessageError, match=error):
        MeasurementRequest.from_json(body)


def test_a_client_refuses_inconsistent_replies() -> None:
    reply = SecretResponse(secret_header=b"h" * 52, secret=b"x" * 64, guest_len=48).to_json()
    with pytest.raises(KeyBrokerMessageError, match="guest_len"):
        SecretResponse.from_json(reply)
    reply = SecretResponse(secret_header=b"h" * 52, secret=b"x" * 20, guest_len=20).to_json()
    with pytest.raises(KeyBrokerMessageError, match="multiple of 16"):
        SecretResponse.from_json(reply)
    with pytest.raises(KeyBrokerMessageError, match="session_id"):
        LaunchResponse.from_json({"session_id": "../x", "godh": B64(b"g" * 2084).decode(),
                                  "session": B64(b"s" * 128).decode()})
    with pytest.raises(KeyBrokerMessageError, match="status"):
        HealthResponse.from_json({"status": "degraded"})


@pytest.mark.parametrize(
    "error", ["", "x" * (MAX_ERROR_SIZE + 1), "red \x1b[31m alert", "two\nlines", "\ud800", 5, None]
)
def test_error_texts_are_bounded_and_printable(error: object) -> None:
    with pytest.raises(KeyBrokerMessageError, match="printable characters"):
        ErrorReply.from_json({"error": error})


def test_errors_quote_few_and_short_field_names() -> None:
    names = {f"\x1b{i}{'n' * 100}": 0 for i in range(10)}
    with pytest.raises(KeyBrokerMessageError) as info:
        MeasurementRequest.from_json({**GOOD_MEASUREMENT, **names})
    message = str(info.value)
    assert message.isprintable() and len(message) < 300 and message.endswith(", ...")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "not valid JSON"),
        (b'{"status": "ok"', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"status": NaN}', 'expected "ok"'),
        (b'{"status": "ok", "status": "ok"}', "repeated field"),
        (b"[" * 100_000, "exceeds"),
        (b"[" * 60_000, "not valid JSON"),  # nesting deeper than the parser's stack
        (b'{"status": ' + b"1" * 5000 + b"}", "not valid JSON"),  # more digits than int() converts
    ],
)
def test_bodies_that_do_not_parse(body: bytes, error: str) -> None:
    with pytest.raises(KeyBrokerMessageError, match=error):
        decode(HealthResponse, body)


def test_oversize_bodies_are_refused_before_parsing() -> None:
    body = encode(HealthResponse(status="ok"))
    padded = body + b" " * (MAX_BODY - len(body))
    assert decode(HealthResponse, padded) == HealthResponse(status="ok")
    with pytest.raises(KeyBrokerMessageError, match=f"body of {MAX_BODY + 1} bytes exceeds {MAX_BODY}"):
        decode(HealthResponse, padded + b" ")


# --- replies ----------------------------------------------------------------------------------

def test_what_an_http_answer_means() -> None:
    offer = EXAMPLES[1]
    assert decode_reply(LaunchResponse, 200, encode(offer)) == offer
    refusal = ErrorReply(error="no VM 'vm9'")
    assert decode_reply(LaunchResponse, 404, encode(refusal)) == refusal
    with pytest.raises(KeyBrokerMessageError, match="HTTP status 502 with a malformed error body"):
        decode_reply(LaunchResponse, 502, b"<html>Bad Gateway</html>")
    with pytest.raises(KeyBrokerMessageError, match="launch reply: missing field"):
        decode_reply(LaunchResponse, 200, encode(refusal))
    for status in (100, 204, 302, 600):
        with pytest.raises(KeyBrokerMessageError, match=f"unexpected HTTP status {status}"):
            decode_reply(LaunchResponse, status, encode(offer))


# --- truncation and corruption -----------------------------------------------------------------

def _value_spans(body: bytes, message: Message) -> dict[str, range]:
    """Each field's value bytes in ``body``: inside the quotes for a string; for a number, its
    digits and the space before them, which a changed byte turns into another digit."""
    spans = {}
    for name, value in message.to_json().items():
        text = json.dumps(value).encode()
        start = body.index(f'"{name}": '.encode()) + len(name) + 4
        assert body[start : start + len(text)] == text
        if isinstance(value, str):
            spans[name] = range(start + 1, start + len(text) - 1)
        else:
            spans[name] = range(start - 1, start + len(text))
    return spans


def _assert_refused_or_confined(message: Message, body: bytes, at: int, byte: int) -> None:
    """A changed byte is refused, changes nothing, or changes the one field it belongs to."""
    corrupt = bytearray(body)
    corrupt[at] = byte
    try:
        got = decode(type(message), bytes(corrupt))
    except KeyBrokerMessageError:
        return
    assert decode(type(got), encode(got)) == got  # something the protocol allows
    field = next((name for name, span in _value_spans(body, message).items() if at in span), None)
    before, after = message.to_json(), got.to_json()
    changed = {name for name in before if before[name] != after[name]}
    assert changed <= ({field} if field else set()), (at, chr(byte), changed)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused(message: Message) -> None:
    body = encode(message)
    for length in range(len(body)):
        with pytest.raises(KeyBrokerMessageError):
            decode(type(message), body[:length])


@SETTINGS
@given(messages, st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_refused(message: Message, where: float) -> None:
    body = encode(message)
    with pytest.raises(KeyBrokerMessageError):
        decode(type(message), body[: int(where * len(body))])


SMALL = [m for m in EXAMPLES if len(encode(m)) < 200]
"""The messages whose every byte can be changed to every other value in a second."""


@pytest.mark.parametrize("message", SMALL, ids=lambda m: type(m).__name__)
def test_every_single_byte_change_of_a_small_body(message: Message) -> None:
    body = encode(message)
    for at in range(len(body)):
        for byte in range(256):
            if byte != body[at]:
                _assert_refused_or_confined(message, body, at, byte)


@SETTINGS
@given(messages, st.floats(0, 1, exclude_max=True), st.integers(1, 255))
def test_any_single_byte_change(message: Message, where: float, mask: int) -> None:
    body = encode(message)
    at = int(where * len(body))
    _assert_refused_or_confined(message, body, at, body[at] ^ mask)


@pytest.mark.parametrize("url", ["file:///etc/hostname", "data:,x", "ftp://owner/", "owner:8000"])
def test_only_http_brokers_are_posted_to(url: str) -> None:
    with pytest.raises(ConfigError, match="not http:// or https://"):
        keybroker.post_json(url, "/v1/launch", b"{}")
