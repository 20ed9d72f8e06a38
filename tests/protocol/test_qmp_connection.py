"""The sans-IO QMP server connection: framing, envelope, negotiation, events, limits."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confmig.common.errors import StateError
from confmig.proto.qmp import (
    MAX_MESSAGE_SIZE,
    MAX_NESTING,
    NEED_DATA,
    NO_ID,
    CommandRequest,
    ConnectionClosed,
    ErrorClass,
    NegotiationState,
    QmpServerConnection,
)

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}
GREETING = {"QMP": {"version": VERSION, "capabilities": ["oob"]}}

GENERIC = "GenericError"
NOT_FOUND = "CommandNotFound"


def lines(conn: QmpServerConnection) -> list[dict[str, object]]:
    """Decode what the connection sent; every message is one CRLF-terminated ASCII line."""
    data = conn.data_to_send()
    assert data == b"" or data.endswith(b"\r\n")
    data.decode("ascii")
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def requests(
    conn: QmpServerConnection,
    data: bytes,
    answer: Callable[[QmpServerConnection, CommandRequest], None] | None = None,
) -> list[CommandRequest]:
    """Feed ``data``; answer each request (default: return its name)."""
    conn.receive_data(data)
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, CommandRequest)
        seen.append(event)
        if answer is None:
            conn.send_return(event.id, event.name)
        else:
            answer(conn, event)
    return seen


def fresh(greeting: Mapping[str, object] = GREETING) -> QmpServerConnection:
    conn = QmpServerConnection(greeting)
    conn.data_to_send()
    return conn


def negotiated(enable: tuple[str, ...] = ("oob",)) -> QmpServerConnection:
    conn = fresh()
    msg = {"execute": "qmp_capabilities", "arguments": {"enable": list(enable)}}
    requests(conn, json.dumps(msg).encode())
    assert lines(conn) == [{"return": {}}]
    return conn


def error(cls: str, desc: str, **extra: object) -> dict[str, object]:
    return {"error": {"class": cls, "desc": desc}, **extra}


def test_greeting_is_the_first_line_in_qemu_format() -> None:
    conn = QmpServerConnection(GREETING)
    assert conn.data_to_send() == (
        b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, '
        b'"package": "test"}, "capabilities": ["oob"]}}\r\n'
    )
    assert conn.data_to_send() == b""


def test_session_lifecycle() -> None:
    expected = (NegotiationState.NEGOTIATING, NegotiationState.COMMAND, NegotiationState.CLOSED)
    conn = fresh()
    seen = [conn.state]
    requests(conn, b'{"execute": "qmp_capabilities"}')
    seen.append(conn.state)
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    seen.append(conn.state)
    assert tuple(seen) == expected
    assert isinstance(conn.next_event(), ConnectionClosed)


def test_commands_before_negotiation_are_not_found() -> None:
    conn = fresh()
    assert requests(conn, b'{"execute": "query-status", "id": 1}') == []
    assert lines(conn) == [
        error(NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'", id=1)
    ]
    assert conn.state is NegotiationState.NEGOTIATING


def test_negotiation_twice_is_refused() -> None:
    conn = negotiated()
    [request] = requests(conn, b'{"execute": "qmp_capabilities", "id": "again"}')
    assert request.name == "qmp_capabilities"
    assert lines(conn) == [
        error(NOT_FOUND, "Capabilities negotiation is already complete, command ignored", id="again")
    ]
    assert conn.state is NegotiationState.COMMAND


def test_failed_negotiation_leaves_the_session_negotiating() -> None:
    conn = fresh()
    requests(
        conn,
        b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
        lambda c, r: c.send_error(r.id, ErrorClass.GENERIC_ERROR, "Parameter 'x' is unexpected"),
    )
    assert lines(conn) == [error(GENERIC, "Parameter 'x' is unexpected")]
    states = [conn.state]
    requests(conn, b'{"execute": "qmp_capabilities"}')
    states.append(conn.state)
    assert tuple(states) == (NegotiationState.NEGOTIATING, NegotiationState.COMMAND)


def test_capability_not_offered_is_refused() -> None:
    conn = fresh({"QMP": {"version": VERSION, "capabilities": []}})
    requests(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert lines(conn) == [error(GENERIC, "Capability oob not available")]
    assert conn.state is NegotiationState.NEGOTIATING


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b'{"execute": }', error(GENERIC, "JSON parse error, expecting value")),
        (b"@", error(GENERIC, "JSON parse error, stray '@'")),
        (b'{"execute": foo}', error(GENERIC, "JSON parse error, invalid keyword 'foo'")),
        (b'{"a": 1, "a": 2}', error(GENERIC, "JSON parse error, duplicate key")),
        (b'{"a" 1}', error(GENERIC, "JSON parse error, missing : in object pair")),
        (b'{"a": 1 "b": 2}', error(GENERIC, "JSON parse error, expected separator in dict")),
        (b'{"a": [1: 2]}', error(GENERIC, "JSON parse error, expected separator in list")),
        (b"{1: 2}", error(GENERIC, "JSON parse error, key is not a string in object")),
        (b'{"a": "\\x"}', error(GENERIC, "JSON parse error, invalid escape sequence in string")),
        (
            b'{"a": "\\ud800"}',
            error(GENERIC, "JSON parse error, \\ud800 is not a valid Unicode character"),
        ),
        (b'"\xff"', error(GENERIC, "JSON parse error, stray '\"\ufffd'")),
        (b'{"a": "\xc3("}', error(GENERIC, "JSON parse error, invalid UTF-8 sequence in string")),
        (b'{"a": 1e999}', error(GENERIC, "JSON parse error, number out of range")),
        (b"[1] ", error(GENERIC, "QMP input must be a JSON object")),
        (b'"execute" ', error(GENERIC, "QMP input must be a JSON object")),
        (b"null ", error(GENERIC, "QMP input must be a JSON object")),
        (b"{}", error(GENERIC, "QMP input lacks member 'execute'")),
        (
            b'{"execute": 1, "id": 7}',
            error(GENERIC, "QMP input member 'execute' must be a string", id=7),
        ),
        (
            b'{"execute": "x", "arguments": [], "id": 7}',
            error(GENERIC, "QMP input member 'arguments' must be an object", id=7),
        ),
        (
            b'{"execute": "x", "foo": 1, "id": 7}',
            error(GENERIC, "QMP input member 'foo' is unexpected", id=7),
        ),
        (
            b'{"exec-oob": "x", "id": 7}',
            error(GENERIC, "QMP input member 'exec-oob' is unexpected", id=7),
        ),
    ],
)
def test_invalid_input_gets_qemus_error_and_the_session_goes_on(
    data: bytes, reply: dict[str, object]
) -> None:
    conn = negotiated(enable=())
    assert requests(conn, data + b'\n{"execute": "query-status", "id": "next"}') == [
        CommandRequest(name="query-status", arguments={}, id="next", oob=False)
    ]
    assert lines(conn) == [reply, {"return": "query-status", "id": "next"}]


def test_exec_oob_needs_the_oob_capability() -> None:
    conn = negotiated(enable=("oob",))
    [request] = requests(conn, b'{"exec-oob": "migrate-pause", "id": 42}')
    assert request == CommandRequest(name="migrate-pause", arguments={}, id=42, oob=True)
    lines(conn)
    requests(conn, b'{"execute": "a", "exec-oob": "b", "id": 1}')
    assert lines(conn) == [error(GENERIC, "QMP input member 'exec-oob' clashes with 'execute'", id=1)]


@pytest.mark.parametrize(
    "request_id",
    [0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 1.5, -0.25, "", "__qmp#00001", "é😀\n\"'", True,
     False, None, [], {}, [1, {"a": [None, "x"]}], {"nested": {"id": [1, 2, 3]}}],
)  # fmt: skip
def test_id_is_echoed_verbatim(request_id: object) -> None:
    conn = negotiated()
    msg = json.dumps({"execute": "x", "id": request_id}).encode()
    [request] = requests(conn, msg)
    assert request.id == request_id
    assert lines(conn) == [{"return": "x", "id": request_id}]


def test_absent_id_is_not_null_id() -> None:
    conn = negotiated()
    [no_id, null_id] = requests(conn, b'{"execute": "x"}{"execute": "x", "id": null}')
    assert no_id.id is NO_ID
    assert null_id.id is None
    assert conn.data_to_send() == b'{"return": "x"}\r\n{"return": "x", "id": null}\r\n'


def test_deeply_nested_id_is_echoed() -> None:
    conn = negotiated()
    depth = MAX_NESTING - 1  # the request object itself is the first level
    msg = b'{"execute": "x", "id": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(requests(conn, msg)) == 1
    assert conn.data_to_send().endswith(b'"id": ' + b"[" * depth + b"]" * depth + b"}\r\n")


def test_qemu_json_extensions_and_framing() -> None:
    conn = negotiated()
    data = (
        b"{'execute': 'a\\'b', 'arguments': {'s': \"x\\u00e9\\ud83d\\ude00\"}}"  # single quotes
        b'{"execute":\n "b"\r\n,"arguments":{"n":[1,-2,3.5,1e3,0.5E-1,true,false,null]}}'
        b'  \t{"execute": "c", "arguments": {"u": 18446744073709551615, "f": 18446744073709551616}}'
    )
    got = requests(conn, data)
    assert [(r.name, r.arguments) for r in got] == [
        ("a'b", {"s": "xé😀"}),
        ("b", {"n": [1, -2, 3.5, 1000.0, 0.05, True, False, None]}),
        ("c", {"u": 2**64 - 1, "f": float(2**64)}),
    ]
    assert isinstance(got[2].arguments["f"], float)


def test_output_is_ascii() -> None:
    conn = negotiated()
    requests(conn, '{"execute": "x", "id": "é😀"}'.encode(), lambda c, r: c.send_return(r.id, "ü"))
    assert conn.data_to_send() == b'{"return": "\\u00fc", "id": "\\u00e9\\ud83d\\ude00"}\r\n'


def test_events_are_only_delivered_after_negotiation() -> None:
    conn = fresh()
    conn.send_event("STOP", None, 1.0)
    assert conn.data_to_send() == b""
    requests(conn, b'{"execute": "qmp_capabilities"}')
    lines(conn)
    conn.send_event("STOP", None, 1258551470.802384)
    conn.send_event("MIGRATION", {"status": "active"}, 2.000001)
    assert lines(conn) == [
        {"timestamp": {"seconds": 1258551470, "microseconds": 802384}, "event": "STOP"},
        {
            "timestamp": {"seconds": 2, "microseconds": 1},
            "event": "MIGRATION",
            "data": {"status": "active"},
        },
    ]


def test_one_request_at_a_time() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute": "a"}{"execute": "b"}')
    first = conn.next_event()
    assert isinstance(first, CommandRequest)
    with pytest.raises(StateError, match="a reply to 'a'"):
        conn.next_event()
    conn.send_event("E", None, 0.0)  # events may interleave with a pending request
    conn.send_error(first.id, ErrorClass.DEVICE_NOT_FOUND, "no")
    with pytest.raises(StateError):
        conn.send_return(first.id, {})
    assert isinstance(second := conn.next_event(), CommandRequest)
    assert second.name == "b"


def test_unencodable_return_leaves_the_request_pending() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute": "x", "id": 1}')
    request = conn.next_event()
    assert isinstance(request, CommandRequest)
    with pytest.raises(ValueError):
        conn.send_return(request.id, float("nan"))
    with pytest.raises(TypeError):
        conn.send_return(request.id, {1: object()})
    conn.send_error(request.id, ErrorClass.GENERIC_ERROR, "bad result")
    assert lines(conn) == [error(GENERIC, "bad result", id=1)]


def test_requests_before_eof_are_delivered() -> None:
    conn = negotiated()
    assert [r.name for r in requests(conn, b'{"execute": "a"}{"execute": "b"}{"exec')] == ["a", "b"]
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(StateError):
        conn.receive_data(b"x")


def test_oversized_message_is_refused_and_skipped() -> None:
    conn = negotiated()
    huge = b'{"execute": "x", "arguments": {"s": "' + b"a" * MAX_MESSAGE_SIZE + b'"}}'
    chunk = 1 << 20
    seen = []
    for start in range(0, len(huge), chunk):
        seen += requests(conn, huge[start : start + chunk])
        assert len(conn._decoder._lexer._buf) <= MAX_MESSAGE_SIZE + chunk  # bounded buffering
    seen += requests(conn, b'{"execute": "next"}')
    assert [r.name for r in seen] == ["next"]
    assert lines(conn) == [error(GENERIC, "JSON token size limit exceeded"), {"return": "next"}]


def test_nesting_limit_is_qemus_and_a_too_deep_message_costs_one_error() -> None:
    conn = negotiated()
    ok = MAX_NESTING - 2  # request object + arguments object
    deep = b"[" * ok + b"]" * ok
    [request] = requests(conn, b'{"execute": "x", "arguments": {"a": ' + deep + b"}}")
    assert request.arguments["a"] != []
    lines(conn)
    too_deep = b"[" * (ok + 1) + b"]" * (ok + 1)
    seen = requests(conn, b'{"execute": "x", "arguments": {"a": ' + too_deep + b'}}{"execute": "y"}')
    assert [r.name for r in seen] == ["y"]
    assert lines(conn) == [error(GENERIC, "JSON nesting depth limit exceeded"), {"return": "y"}]


def test_control_character_resynchronises_the_parser() -> None:
    conn = negotiated()
    seen = requests(conn, b'{"execute": "lost", "arguments": {"a": [1, \x01\n{"execute": "y"}')
    assert [r.name for r in seen] == ["y"]
    assert lines(conn) == [error(GENERIC, "JSON parse error, stray '\x01'"), {"return": "y"}]


# --- properties ------------------------------------------------------------------------

def _qmp_char(c: str) -> bool:
    """QEMU's JSON parser refuses noncharacters (U+FDD0..U+FDEF, U+xxFFFE/F) as it refuses
    surrogates: strings made of anything else must come through unchanged."""
    cp = ord(c)
    return (cp & 0xFFFE) != 0xFFFE and not 0xFDD0 <= cp <= 0xFDEF


qmp_chars = st.characters(exclude_categories=("Cs",)).filter(_qmp_char)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(qmp_chars, max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(qmp_chars, max_size=4), inner,
                                                               max_size=3),
    max_leaves=8,
)
command_names = st.sampled_from(["qmp_capabilities", "query-status", "migrate", "x-y_z"])


@st.composite
def request_messages(draw: st.DrawFn) -> dict[str, object]:
    msg: dict[str, object] = {"execute": draw(command_names)}
    if draw(st.booleans()):
        msg["arguments"] = draw(st.dictionaries(st.text(qmp_chars, max_size=4), json_values, max_size=3))
    if draw(st.booleans()):
        msg["id"] = draw(json_values)
    return msg


def encode(msg: dict[str, object], style: int) -> bytes:
    if style == 0:
        return json.dumps(msg).encode()
    if style == 1:
        return json.dumps(msg, indent=1, ensure_ascii=False).encode() + b"\r\n"
    return b"  " + json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run(chunks: list[bytes]) -> tuple[list[CommandRequest], bytes]:
    conn = QmpServerConnection(GREETING)
    out = bytearray(conn.data_to_send())
    seen = []
    for chunk in [*(c for c in chunks if c), b""]:
        conn.receive_data(chunk)
        while not isinstance(event := conn.next_event(), ConnectionClosed) and event is not NEED_DATA:
            seen.append(event)
            if event.name == "qmp_capabilities" and event.arguments:
                conn.send_error(event.id, ErrorClass.GENERIC_ERROR, "stands in for schema errors")
            else:
                conn.send_return(event.id, event.name)
        out += conn.data_to_send()
    return seen, bytes(out)


NEGOTIATE = b'{"execute": "qmp_capabilities"}'


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(request_messages(), st.integers(0, 2)), max_size=6),
    st.lists(st.integers(0, 10**6), max_size=12),
)
def test_any_chunking_yields_the_same_requests(
    messages: list[tuple[dict[str, object], int]], cuts: list[int]
) -> None:
    stream = NEGOTIATE + b"".join(encode(msg, style) for msg, style in messages)
    seen, out = run(chunked(stream, cuts))
    assert [(r.name, r.arguments, r.id) for r in seen[1:]] == [
        (m["execute"], m.get("arguments", {}), m.get("id", NO_ID)) for m, _ in messages
    ]
    assert (seen, out) == run([stream])


garbage = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b",", b":", b"\x00", b"\n", b"\xff", b"-", b"0",
     b"1e", b"tru", b"@", b'{"execute":', b'"\\u', b"\xc3"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(request_messages(), st.integers(0, 2)).map(lambda t: encode(*t))
        | garbage
        | st.binary(max_size=6),
        max_size=12,
    ),
    st.lists(st.integers(0, 10**6), max_size=12),
)
def test_any_input_any_chunking_same_outcome_never_breaks(pieces: list[bytes], cuts: list[int]) -> None:
    stream = NEGOTIATE + b"".join(pieces)
    seen, out = run(chunked(stream, cuts))
    assert (seen, out) == run([stream])
    for line in out.split(b"\r\n")[:-1]:
        assert isinstance(json.loads(line.decode("ascii")), dict)
