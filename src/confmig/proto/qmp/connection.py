"""The server side of QMP as QEMU speaks it, sans-IO.

Bytes in, events out; replies in, bytes out (h11's shape)::

    conn = QmpServerConnection(greeting)
    sock.sendall(conn.data_to_send())            # the greeting line
    conn.receive_data(sock.recv(65536))          # b"" means the peer hung up
    event = conn.next_event()                    # CommandRequest | NEED_DATA | ConnectionClosed
    conn.send_return(event.id, result)           # or send_error(event.id, cls, desc)
    sock.sendall(conn.data_to_send())

Input is QEMU's JSON dialect, split into messages the way QEMU's JSON streamer
splits it: objects may span lines and chunks, several may share one chunk,
strings may be single-quoted, and a lexical or syntax error costs one error
reply while the connection keeps working. Output is one ASCII JSON object per
line, terminated by CRLF, as QEMU's monitor writes it.

The connection validates the request envelope (``qmp_dispatch_check_obj`` in
QEMU) and the capabilities negotiation; the command set, argument checking
and execution belong to the application (``confmig.vmm.qmp``). In-band and
out-of-band requests are answered in the order they arrive, one at a time:
the QMP spec lets out-of-band replies overtake, it does not require it.

Error texts are QEMU's, word for word (``qapi/qmp-dispatch.c``,
``monitor/qmp.c``, ``monitor/qmp-cmds-control.c``, ``qobject/json-*.c``),
because management tools match on them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Final

from confmig.common.errors import StateError
from confmig.common.units import MiB

# QEMU allows 64 MiB per message; our largest legitimate request is a few KiB,
# so a smaller cap bounds what one client can make us buffer.
MAX_MESSAGE_SIZE: Final = 16 * MiB
# QEMU's limits (qobject/json-streamer.c): they bound the work one message can
# cause, and nesting also bounds our explicit parser and encoder stacks.
MAX_TOKEN_COUNT: Final = 2 << 20
MAX_NESTING: Final = 1 << 10

_INT_MIN: Final = -(1 << 63)
_UINT_END: Final = 1 << 64


class ErrorClass(StrEnum):
    """QEMU's ``QapiErrorClass``: every value an error's ``class`` may take."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class NegotiationState(Enum):
    """Where a session stands (qmp-spec, "Capabilities Negotiation")."""

    NEGOTIATING = "negotiating"  # greeting sent; only qmp_capabilities runs; no events
    COMMAND = "command"  # every command runs; events are delivered
    CLOSED = "closed"  # the peer hung up


class _Trigger(Enum):
    CAPABILITIES_ACCEPTED = "capabilities accepted"
    PEER_CLOSED = "peer closed"


_TRANSITIONS: Final[Mapping[tuple[NegotiationState, _Trigger], NegotiationState]] = {
    (NegotiationState.NEGOTIATING, _Trigger.CAPABILITIES_ACCEPTED): NegotiationState.COMMAND,
    (NegotiationState.NEGOTIATING, _Trigger.PEER_CLOSED): NegotiationState.CLOSED,
    (NegotiationState.COMMAND, _Trigger.PEER_CLOSED): NegotiationState.CLOSED,
}


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


class _NoId(Enum):
    NO_ID = "NO_ID"


NEED_DATA: Final = _NeedData.NEED_DATA
"""``next_event`` result: feed more bytes with ``receive_data`` first."""

NO_ID: Final = _NoId.NO_ID
"""The ``id`` of a request that carried none (distinct from ``"id": null``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRequest:
    """An ``execute`` or ``exec-oob`` request whose envelope is valid."""

    name: str
    arguments: dict[str, object]
    id: object  # any JSON value, or NO_ID; echoed verbatim in the reply
    oob: bool  # sent as exec-oob (only accepted once "oob" was negotiated)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer hung up; every complete request before that was delivered."""


class QmpServerConnection:
    """One client's QMP session. Replies go out in request order, one request at a time."""

    def __init__(self, greeting: Mapping[str, object]) -> None:
        self._offered = _offered_capabilities(greeting)
        self._out = bytearray(_encode_line(greeting))
        self._state = NegotiationState.NEGOTIATING
        self._enabled: frozenset[str] = frozenset()
        self._decoder = _Decoder()
        self._pending: CommandRequest | None = None
        self._eof = False

    @property
    def state(self) -> NegotiationState:
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Queue bytes from the peer; ``b""`` marks the end of its input."""
        if self._eof:
            raise StateError("receive_data", "end of input", "open input")
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> CommandRequest | _NeedData | ConnectionClosed:
        """The next request; envelope errors are answered here and skipped."""
        if self._pending is not None:
            raise StateError("next_event", self._state, f"a reply to {self._pending.name!r}")
        while self._state is not NegotiationState.CLOSED:
            message = self._decoder.next_message()
            if message is _INCOMPLETE:
                if not self._eof:
                    return NEED_DATA
                self._transition(_Trigger.PEER_CLOSED)
            else:
                request = self._accept(message)
                if request is not None:
                    self._pending = request
                    return request
        return ConnectionClosed()

    def send_return(self, id: object, value: object) -> None:
        """Answer the pending request with success.

        Success for ``qmp_capabilities`` (its arguments already checked by the
        application) is where negotiation happens: the requested capabilities
        are enabled, or the reply becomes QEMU's error when one was not offered
        or negotiation had already completed.
        """
        pending = self._expect_pending("send_return")
        if pending.name == "qmp_capabilities" and not pending.oob:
            line = self._negotiate(id, pending.arguments)
        else:
            line = _encode_line(_reply("return", value, id))  # may raise: still pending then
        self._answered(line)

    def send_error(self, id: object, cls: ErrorClass, desc: str) -> None:
        """Answer the pending request with an error."""
        self._expect_pending("send_error")
        self._answered(_error_line(id, cls, desc))

    def send_event(self, name: str, data: Mapping[str, object] | None, timestamp: float) -> None:
        """Queue an event (``timestamp`` in seconds since the Unix epoch).

        Dropped before negotiation completes, as QEMU does.
        """
        if self._state is not NegotiationState.COMMAND:
            return
        seconds, microseconds = divmod(round(timestamp * 1_000_000), 1_000_000)
        event: dict[str, object] = {
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        self._out += _encode_line(event)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _transition(self, trigger: _Trigger) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            allowed = sorted(s.value for s, t in _TRANSITIONS if t is trigger)
            raise StateError(trigger.value, self._state, allowed) from None

    def _expect_pending(self, operation: str) -> CommandRequest:
        if self._pending is None:
            raise StateError(operation, self._state, "a request from next_event()")
        return self._pending

    def _answered(self, reply: bytes) -> None:
        self._pending = None
        self._out += reply

    def _accept(self, message: object) -> CommandRequest | None:
        """QEMU's envelope check plus the negotiation filter; answers what it rejects."""
        if isinstance(message, _Invalid):
            self._out += _error_line(NO_ID, ErrorClass.GENERIC_ERROR, message.desc)
            return None
        if not isinstance(message, dict):
            self._out += _error_line(NO_ID, ErrorClass.GENERIC_ERROR, "QMP input must be a JSON object")
            return None
        request_id = message.get("id", NO_ID)
        try:
            return self._request(message, request_id)
        except _Rejected as rejected:
            self._out += _error_line(request_id, rejected.cls, rejected.desc)
            return None

    def _request(self, message: dict[str, object], request_id: object) -> CommandRequest:
        oob_enabled = "oob" in self._enabled
        exec_key = name = ""
        arguments: dict[str, object] = {}
        # SECURITY: peer-controlled object; every member is checked before use.
        for key, value in message.items():
            if key == "execute" or (key == "exec-oob" and oob_enabled):
                if not isinstance(value, str):
                    raise _Rejected(f"QMP input member '{key}' must be a string")
                if exec_key:
                    raise _Rejected(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key, name = key, value
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _Rejected("QMP input member 'arguments' must be an object")
                arguments = value
            elif key != "id":
                raise _Rejected(f"QMP input member '{key}' is unexpected")
        if not exec_key:
            raise _Rejected("QMP input lacks member 'execute'")
        if self._state is NegotiationState.NEGOTIATING and name != "qmp_capabilities":
            raise _Rejected(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                ErrorClass.COMMAND_NOT_FOUND,
            )
        return CommandRequest(name=name, arguments=arguments, id=request_id, oob=exec_key == "exec-oob")

    def _negotiate(self, id: object, arguments: Mapping[str, object]) -> bytes:
        """The reply to a successful ``qmp_capabilities``; enters command mode if it is one."""
        if self._state is not NegotiationState.NEGOTIATING:
            return _error_line(
                id,
                ErrorClass.COMMAND_NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored",
            )
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            raise TypeError("qmp_capabilities answered before its arguments were checked")
        unavailable = [c for c in enable if c not in self._offered]
        if unavailable:
            return _error_line(
                id, ErrorClass.GENERIC_ERROR, f"Capability {', '.join(unavailable)} not available"
            )
        reply = _encode_line(_reply("return", {}, id))
        self._enabled = frozenset(enable)
        self._transition(_Trigger.CAPABILITIES_ACCEPTED)
        return reply


class _Rejected(Exception):
    def __init__(self, desc: str, cls: ErrorClass = ErrorClass.GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


def _offered_capabilities(greeting: Mapping[str, object]) -> frozenset[str]:
    qmp = greeting.get("QMP")
    if isinstance(qmp, Mapping) and isinstance(qmp.get("version"), Mapping):
        capabilities = qmp.get("capabilities")
        if isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities):
            return frozenset(capabilities)
    raise ValueError("greeting must be {'QMP': {'version': {...}, 'capabilities': [...]}}")


def _error_line(id: object, cls: ErrorClass, desc: str) -> bytes:
    return _encode_line(_reply("error", {"class": str(cls), "desc": desc}, id))


def _reply(kind: str, value: object, id: object) -> dict[str, object]:
    reply = {kind: value}
    if id is not NO_ID:
        reply["id"] = id
    return reply


# --- output: QEMU's JSON formatting --------------------------------------------------


class _Punctuation(str):
    """Output text that is already JSON."""


_END: Final = object()


def _encode_line(message: Mapping[str, object]) -> bytes:
    """``message`` as one line: ", " and ": " separators, ASCII only, CRLF.

    Iterative, so a deeply nested ``id`` echoed back cannot exhaust Python's
    stack; raises ``TypeError``/``ValueError`` for what JSON cannot carry.
    """
    out: list[str] = []
    stack: list[Iterator[object]] = [iter((message,))]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif type(item) is _Punctuation:
            out.append(item)
        elif isinstance(item, Mapping | list | tuple):
            if len(stack) > MAX_NESTING + 1:
                raise ValueError("JSON output nested too deeply (circular reference?)")
            stack.append(_object(item) if isinstance(item, Mapping) else _array(item))
        else:
            out.append(_scalar(item))
    out.append("\r\n")
    return "".join(out).encode("ascii")


def _object(members: Mapping[object, object]) -> Iterator[object]:
    yield _Punctuation("{")
    for index, (key, value) in enumerate(members.items()):
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
        yield _Punctuation(f"{', ' if index else ''}{json.dumps(key)}: ")
        yield value
    yield _Punctuation("}")


def _array(elements: list[object] | tuple[object, ...]) -> Iterator[object]:
    yield _Punctuation("[")
    for index, element in enumerate(elements):
        if index:
            yield _Punctuation(", ")
        yield element
    yield _Punctuation("]")


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # escapes everything outside ASCII
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not JSON")
        return float.__repr__(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- input: QEMU's JSON lexer, streamer and parser -------------------------------------


class _Tok(Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    KEYWORD = "keyword"
    ERROR = "error"


_STRUCTURAL: Final = {ord(t.value): t for t in _Tok if len(t.value) == 1}
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*")
_DIGITS: Final = re.compile(rb"[0-9]*")
_KEYWORD: Final = re.compile(rb"[a-z]*")
# After a lexical error QEMU skips input up to a structural character or an
# ASCII control character other than tab (qmp-spec: "Forcing the JSON parser
# into known-good state").
_RECOVERY_SKIP: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*")
# String bodies: raw bytes 0x20..0xFD (UTF-8 checked later) and backslash pairs.
_STRING_BODY: Final = {
    quote: re.compile(rb"(?:[^" + re.escape(bytes([quote])) + rb"\\\x00-\x1f\xfe\xff]+|\\[\x20-\xfd])*")
    for quote in b"\"'"
}
_BACKSLASH: Final = ord("\\")


class _LexState(Enum):
    START = "start"
    STRING = "string"
    RECOVERY = "recovery"


class _Lexer:
    """Bytes to tokens with QEMU's token grammar and error recovery (qobject/json-lexer.c).

    Pull-based: ``next_token`` returns None when the next token is not
    complete yet; its bytes stay buffered (``pending``).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed token
        self._state = _LexState.START
        self._quote = 0
        self._scan = 0  # in a string: first byte not yet checked

    @property
    def pending(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        del self._buf[: self._pos]  # consumed tokens
        self._scan -= self._pos
        self._pos = 0
        self._buf += data

    def abandon_token(self) -> None:
        """Drop the unfinished token and skip input as after a lexical error."""
        self._buf.clear()
        self._pos = 0
        self._state = _LexState.RECOVERY

    def next_token(self) -> tuple[_Tok, bytes] | None:
        buf = self._buf
        while True:
            if self._state is _LexState.STRING:
                return self._string()
            if self._state is _LexState.RECOVERY:
                self._pos = _skip(_RECOVERY_SKIP, buf, self._pos)
                if self._pos == len(buf):
                    return None
                self._state = _LexState.START
            pos = self._pos = _skip(_WHITESPACE, buf, self._pos)
            if pos == len(buf):
                return None
            char = buf[pos]
            if char in _STRUCTURAL:
                self._pos = pos + 1
                return _STRUCTURAL[char], bytes(buf[pos : pos + 1])
            if char in b"\"'":
                self._state, self._quote, self._scan = _LexState.STRING, char, pos + 1
            elif char == ord("-") or _isdigit(char):
                return self._number()
            elif ord("a") <= char <= ord("z"):
                end = _skip(_KEYWORD, buf, pos)
                return None if end == len(buf) else self._token(_Tok.KEYWORD, end)
            else:
                return self._error(pos + 1)

    def _string(self) -> tuple[_Tok, bytes] | None:
        buf = self._buf
        end = self._scan = _skip(_STRING_BODY[self._quote], buf, self._scan)
        if end == len(buf):
            return None
        if buf[end] == self._quote:
            self._state = _LexState.START
            return self._token(_Tok.STRING, end + 1)
        if buf[end] == _BACKSLASH:  # followed by a control character, 0xFE/0xFF, or nothing yet
            return None if end + 1 == len(buf) else self._error(end + 2)
        return self._error(end + 1)

    def _number(self) -> tuple[_Tok, bytes] | None:
        """QEMU's number automaton; a number ends at the first byte it cannot take."""
        buf, n, i = self._buf, len(self._buf), self._pos
        kind = _Tok.INTEGER
        if buf[i] == ord("-"):
            i += 1
            if i == n:
                return None
            if not _isdigit(buf[i]):
                return self._error(i + 1)
        if buf[i] == ord("0"):
            i += 1
            if i < n and _isdigit(buf[i]):
                return self._error(i + 1)
            exponent_allowed = False  # QEMU ends "0" before an 'e'
        else:
            i = _skip(_DIGITS, buf, i)
            exponent_allowed = True
        if i < n and buf[i] == ord("."):
            i += 1
            if i < n and not _isdigit(buf[i]):
                return self._error(i + 1)
            i = _skip(_DIGITS, buf, i)
            kind, exponent_allowed = _Tok.FLOAT, True
        if exponent_allowed and i < n and buf[i] in b"eE":
            i += 1
            if i < n and buf[i] in b"+-":
                i += 1
            if i < n and not _isdigit(buf[i]):
                return self._error(i + 1)
            i = _skip(_DIGITS, buf, i)
            kind = _Tok.FLOAT
        return None if i == n else self._token(kind, i)

    def _token(self, kind: _Tok, end: int) -> tuple[_Tok, bytes]:
        text = bytes(self._buf[self._pos : end])
        self._pos = end
        return kind, text

    def _error(self, end: int) -> tuple[_Tok, bytes]:
        self._state = _LexState.RECOVERY
        return self._token(_Tok.ERROR, end)


def _skip(pattern: re.Pattern[bytes], buf: bytearray, pos: int) -> int:
    """Where ``pattern``, which also matches the empty string, ends from ``pos``."""
    match = pattern.match(buf, pos)
    assert match is not None
    return match.end()


def _isdigit(char: int) -> bool:
    return ord("0") <= char <= ord("9")


class _Expect(Enum):
    FIRST = "first member or close"  # just opened
    KEY = "key"  # object, after a comma
    COLON = ":"
    VALUE = "value"  # object after a colon, array after a comma
    COMMA_OR_CLOSE = ", or close"


@dataclass(slots=True)
class _Frame:
    """An array or object still open."""

    container: dict[str, object] | list[object]
    expect: _Expect
    key: str = field(default="")


@dataclass(frozen=True, slots=True)
class _Invalid:
    """Input that does not form a JSON value; ``desc`` is QEMU's error text."""

    desc: str


class _ParseError(Exception):
    pass


_INCOMPLETE: Final = object()
_KEYWORDS: Final[Mapping[bytes, object]] = {b"true": True, b"false": False, b"null": None}
_ESCAPES: Final = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4: Final = re.compile(rb"[0-9A-Fa-f]{4}")


class _Decoder:
    """Splits the token stream into top-level values (QEMU's JSON streamer).

    Values are built token by token on an explicit stack. After an error the
    rest of the offending message is skipped: tokens are eaten until braces
    and brackets balance, so one bad message costs one error reply.
    """

    def __init__(self) -> None:
        self._lexer = _Lexer()
        self._braces = 0
        self._brackets = 0
        self._recovering = False
        self._size = 0
        self._tokens = 0
        self._stack: list[_Frame] = []

    def feed(self, data: bytes) -> None:
        self._lexer.feed(data)

    def next_message(self) -> object:
        """A complete value, an ``_Invalid``, or ``_INCOMPLETE``."""
        while True:
            token = self._lexer.next_token()
            if token is None:
                if self._size + self._lexer.pending > MAX_MESSAGE_SIZE:
                    self._lexer.abandon_token()
                    if not self._recovering:
                        return self._fail("JSON token size limit exceeded")
                return _INCOMPLETE
            message = self._token(*token)
            if message is not _INCOMPLETE:
                return message

    def _token(self, kind: _Tok, text: bytes) -> object:
        self._count_nesting(kind)
        if self._recovering:
            self._recovering = not self._balanced()
            return _INCOMPLETE
        if kind is _Tok.ERROR:
            return self._fail(f"JSON parse error, stray '{text.decode(errors='replace')}'")
        self._size += len(text)
        self._tokens += 1
        if self._size > MAX_MESSAGE_SIZE:
            return self._fail("JSON token size limit exceeded")
        if self._tokens > MAX_TOKEN_COUNT:
            return self._fail("JSON token count limit exceeded")
        if self._braces + self._brackets > MAX_NESTING:
            return self._fail("JSON nesting depth limit exceeded")
        try:
            message = self._parse(kind, text)
        except _ParseError as exc:
            return self._fail(f"JSON parse error, {exc}")
        if message is not _INCOMPLETE:
            self._size = self._tokens = 0
        return message

    def _count_nesting(self, kind: _Tok) -> None:
        """Track message boundaries; a stray closer or a lexical error ends a message."""
        if kind is _Tok.LCURLY:
            self._braces += 1
        elif kind is _Tok.LSQUARE:
            self._brackets += 1
        elif kind is _Tok.RCURLY and self._braces > 0:
            self._braces -= 1
        elif kind is _Tok.RSQUARE and self._brackets > 0:
            self._brackets -= 1
        elif kind in (_Tok.RCURLY, _Tok.RSQUARE, _Tok.ERROR):
            self._braces = self._brackets = 0

    def _balanced(self) -> bool:
        return self._braces == 0 and self._brackets == 0

    def _fail(self, desc: str) -> _Invalid:
        self._recovering = not self._balanced()
        self._size = self._tokens = 0
        self._stack.clear()
        return _Invalid(desc)

    def _parse(self, kind: _Tok, text: bytes) -> object:
        """Advance the value under construction; the same errors as QEMU's parser."""
        if self._stack:
            frame = self._stack[-1]
            is_object = isinstance(frame.container, dict)
            closer = _Tok.RCURLY if is_object else _Tok.RSQUARE
            if frame.expect is _Expect.COLON:
                if kind is not _Tok.COLON:
                    raise _ParseError("missing : in object pair")
                frame.expect = _Expect.VALUE
                return _INCOMPLETE
            if frame.expect is _Expect.COMMA_OR_CLOSE:
                if kind is _Tok.COMMA:
                    frame.expect = _Expect.KEY if is_object else _Expect.VALUE
                    return _INCOMPLETE
                if kind is closer:
                    return self._close()
                raise _ParseError(f"expected separator in {'dict' if is_object else 'list'}")
            if frame.expect is _Expect.FIRST and kind is closer:
                return self._close()
        if kind is _Tok.LCURLY:
            self._stack.append(_Frame({}, _Expect.FIRST))
            return _INCOMPLETE
        if kind is _Tok.LSQUARE:
            self._stack.append(_Frame([], _Expect.FIRST))
            return _INCOMPLETE
        return self._complete(_scalar_value(kind, text))

    def _close(self) -> object:
        return self._complete(self._stack.pop().container)

    def _complete(self, value: object) -> object:
        """Hand a finished value to its container, or out if it is top-level."""
        if not self._stack:
            return value
        parent = self._stack[-1]
        if isinstance(parent.container, list):
            parent.container.append(value)
            parent.expect = _Expect.COMMA_OR_CLOSE
        elif parent.expect in (_Expect.KEY, _Expect.FIRST):
            if not isinstance(value, str):
                raise _ParseError("key is not a string in object")
            parent.key = value
            parent.expect = _Expect.COLON
        else:
            if parent.key in parent.container:
                raise _ParseError("duplicate key")
            parent.container[parent.key] = value
            parent.expect = _Expect.COMMA_OR_CLOSE
        return _INCOMPLETE


def _scalar_value(kind: _Tok, text: bytes) -> object:
    if kind is _Tok.STRING:
        return _decode_string(text)
    # Like QEMU: int64, else uint64, else a double. Longer digit strings are
    # out of range anyway, and int() of huge strings is costly.
    if kind is _Tok.INTEGER and len(text) <= 20 and _INT_MIN <= (number := int(text)) < _UINT_END:
        return number
    if kind in (_Tok.INTEGER, _Tok.FLOAT):
        real = float(text)
        if math.isinf(real):
            # QEMU would take infinity, then fail to write it back as JSON.
            raise _ParseError("number out of range")
        return real
    if kind is _Tok.KEYWORD:
        if text in _KEYWORDS:
            return _KEYWORDS[text]
        raise _ParseError(f"invalid keyword '{text.decode()}'")
    raise _ParseError("expecting value")


def _decode_string(token: bytes) -> str:
    """A string token's value; the lexer guaranteed its quotes and escape pairs."""
    body = token[1:-1]
    parts: list[str] = []
    pos = 0
    while (escape := body.find(b"\\", pos)) >= 0:
        parts.append(_utf8(body[pos:escape]))
        code = body[escape + 1]
        if code == ord("u"):
            char, pos = _unicode_escape(body, escape)
            parts.append(char)
        elif code in _ESCAPES:
            parts.append(_ESCAPES[code])
            pos = escape + 2
        else:
            raise _ParseError("invalid escape sequence in string")
    parts.append(_utf8(body[pos:]))
    return "".join(parts)


def _unicode_escape(body: bytes, escape: int) -> tuple[str, int]:
    end = escape + 6
    codepoint = _hex4(body[escape + 2 : end])
    if 0xD800 <= codepoint <= 0xDBFF and body[end : end + 2] == b"\\u":
        low = _hex4(body[end + 2 : end + 6])
        if 0xDC00 <= low <= 0xDFFF:
            codepoint = 0x10000 + ((codepoint - 0xD800) << 10) + (low - 0xDC00)
            end += 6
        else:
            codepoint = -1
    if not _is_valid_codepoint(codepoint):
        text = body[escape : escape + 6].decode(errors="replace")
        raise _ParseError(f"{text} is not a valid Unicode character")
    return chr(codepoint), end


def _hex4(text: bytes) -> int:
    return int(text, 16) if _HEX4.fullmatch(text) else -1


def _is_valid_codepoint(codepoint: int) -> bool:
    """QEMU's rule: in range, not a surrogate, not a noncharacter."""
    return (
        0 <= codepoint <= 0x10FFFF
        and not 0xD800 <= codepoint <= 0xDFFF
        and (codepoint & 0xFFFE) != 0xFFFE
        and not 0xFDD0 <= codepoint <= 0xFDEF
    )


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise _ParseError("invalid UTF-8 sequence in string") from None
