"""The guest owner's key-broker protocol: paths, JSON bodies, errors and sizes, defined once.

Three parties speak it: the VMM during an SEV launch (:mod:`confmig.vmm.sev`),
the owner's client for tools and tests (:mod:`confmig.owner.client`), and the
key broker's HTTP service (:mod:`confmig.owner.service`). ``docs/owner.md``
describes the same format for re-implementations. Routes::

    POST /v1/launch                          LaunchRequest      -> 200 LaunchResponse
    POST /v1/launch/<session_id>/measurement MeasurementRequest -> 200 SecretResponse
    POST /v1/migration/decision              DecisionRequest    -> 200 DecisionResponse
    GET  /v1/health                          (no body)          -> 200 HealthResponse
    any failure                                                  -> 4xx/5xx ErrorReply

* Bodies are JSON objects of at most :data:`MAX_BODY` bytes, both ways; unknown
  or repeated fields are refused, so that a client and a broker that disagree
  find out at once.
* Byte strings are standard base64 with padding (RFC 4648 §4), in its one
  canonical spelling.
* Integers are JSON integers (``true`` is not an integer here).

Sans-IO: :func:`encode` and :func:`decode` turn messages into bytes and back,
:func:`decode_reply` says what an HTTP answer means. The one piece of I/O is
:func:`post_json`, the blocking POST both clients make. Nothing here is secret:
the blobs are certificates, a session wrapped for the platform and a packet
sealed for the guest, opaque to the host that relays them.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Final, Protocol, Self, TypeVar

from confmig.common.errors import ConfigError, KeyBrokerMessageError
from confmig.proto.mailbox import CHALLENGE_SIZE, MIGRATION_ID_SIZE, TICKET_SIZE

LAUNCH_PATH: Final = "/v1/launch"
DECISION_PATH: Final = "/v1/migration/decision"
HEALTH_PATH: Final = "/v1/health"
SESSION_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
MEASUREMENT_PATH_RE: Final = re.compile(rf"{LAUNCH_PATH}/({SESSION_ID_RE.pattern})/measurement")

MAX_BODY: Final = 64 * 1024
"""Bytes of any body, request or reply. The largest request, ``POST /v1/launch``, carries
2780 + 8336 base64 characters of certificates; the largest reply, a secret of
:data:`MAX_SECRET_SIZE`, 27308 + 72 characters of packet."""
MAX_ERROR_SIZE: Final = 1024
"""Characters of an error message: the broker's messages name what was refused in one line;
a longer text is not a message but a payload."""
TIMEOUT: Final = 30.0
"""Seconds one call may take: verifying a chain and making a session takes milliseconds."""

# The SEV formats' sizes (confmig.platform.psp: cert, chain, measure, packet), repeated because
# proto may not import the platform; a protocol test keeps them equal.
PDH_SIZE: Final = 2084
CERT_CHAIN_SIZE: Final = 3 * 2084
SESSION_BLOB_SIZE: Final = 128
MEASUREMENT_SIZE: Final = 48
PACKET_HEADER_SIZE: Final = 52
MAX_SECRET_SIZE: Final = 0x5000
MAX_TOKEN_SIZE: Final = 256
"""A commit grant or abort token: a 72-byte record header, a body under 100 bytes, a tag."""
OUTCOMES: Final = ("commit", "abort")
_VM_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:@+-]{1,128}")
_MAX_NAMES_SHOWN: Final = 4
"""Field names an error quotes: the names come from the peer, the message goes to a log."""

Json = Mapping[str, object]


class Message(Protocol):
    """What every body of this protocol is: a JSON object and back."""

    def to_json(self) -> dict[str, object]: ...

    @classmethod
    def from_json(cls, obj: object) -> Self: ...


_M = TypeVar("_M", bound=Message)


def measurement_path(session_id: str) -> str:
    """Where a session's measurement goes; ``session_id`` as a :class:`LaunchResponse` carries it."""
    return f"{LAUNCH_PATH}/{session_id}/measurement"


def encode(message: Message) -> bytes:
    """The body for ``message``: ASCII JSON, as every decoder of the protocol reads it."""
    return json.dumps(message.to_json()).encode("ascii")


def decode(kind: type[_M], data: bytes) -> _M:
    """The message of type ``kind`` that ``data`` holds, or :class:`KeyBrokerMessageError`."""
    # SECURITY: a body from the peer (the untrusted host, or the network between the VMM and the
    # owner): bounded before it is parsed, then every field is type- and size-checked.
    if len(data) > MAX_BODY:
        raise KeyBrokerMessageError(f"body of {len(data)} bytes exceeds {MAX_BODY}")
    try:
        obj = json.loads(data, object_pairs_hook=_unique_fields)
    except (ValueError, RecursionError) as exc:
        raise KeyBrokerMessageError("body is not valid JSON") from exc
    return kind.from_json(obj)


def decode_reply(kind: type[_M], status: int, data: bytes) -> _M | ErrorReply:
    """What the broker's HTTP answer means: a ``kind`` for 200, the broker's refusal for 4xx and 5xx."""
    if status == 200:
        return decode(kind, data)
    if not 400 <= status < 600:
        raise KeyBrokerMessageError(f"unexpected HTTP status {status}")
    try:
        return decode(ErrorReply, data)
    except KeyBrokerMessageError as exc:
        raise KeyBrokerMessageError(f"HTTP status {status} with a malformed error body: {exc}") from exc


def _unique_fields(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # JSON parsers disagree on which of two equal keys wins; refusing both leaves nothing to disagree on.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise KeyBrokerMessageError("repeated field")
    return obj


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(name[:32]) for name in names[:_MAX_NAMES_SHOWN])
    return shown + (", ..." if len(names) > _MAX_NAMES_SHOWN else "")


def _fields(obj: object, what: str, names: tuple[str, ...]) -> Json:
    if not isinstance(obj, dict):
        raise KeyBrokerMessageError(f"{what}: expected a JSON object")
    missing = [n for n in names if n not in obj]
    unknown = sorted(set(obj) - set(names))
    if missing:
        raise KeyBrokerMessageError(f"{what}: missing field(s) {_names(missing)}")
    if unknown:
        raise KeyBrokerMessageError(f"{what}: unknown field(s) {_names(unknown)}")
    return obj


def _int(obj: Json, name: str, *, bits: int) -> int:
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise KeyBrokerMessageError(f"{name}: expected an integer from 0 to {(1 << bits) - 1}")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(obj: Json, name: str, *, size: int | None = None, max_size: int | None = None) -> bytes:
    value = obj[name]
    if not isinstance(value, str):
        raise KeyBrokerMessageError(f"{name}: expected a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyBrokerMessageError(f"{name}: not valid base64") from exc
    # One spelling per value: the decoder ignores a last character's unused bits, we do not.
    if _b64(data) != value:
        raise KeyBrokerMessageError(f"{name}: not canonical base64")
    if size is not None and len(data) != size:
        raise KeyBrokerMessageError(f"{name}: expected {size} bytes, got {len(data)}")
    if max_size is not None and not 0 < len(data) <= max_size:
        raise KeyBrokerMessageError(f"{name}: expected 1 to {max_size} bytes, got {len(data)}")
    return data


def _str(obj: Json, name: str, pattern: re.Pattern[str]) -> str:
    value = obj[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise KeyBrokerMessageError(f"{name}: expected a string matching {pattern.pattern}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchRequest:
    """``POST /v1/launch``: the platform's certificates and the guest policy the VMM will launch
    with, and whether the launch is a migration target (it then gets a ticket and its key only)."""

    vm: str
    pdh: bytes
    cert_chain: bytes
    policy: int
    migration_target: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "pdh": _b64(self.pdh),
            "cert_chain": _b64(self.cert_chain),
            "policy": self.policy,
            "migration_target": self.migration_target,
        }

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a body from the untrusted host; every field is type- and size-checked.
        o = _fields(obj, "launch request", ("vm", "pdh", "cert_chain", "policy", "migration_target"))
        target = o["migration_target"]
        if not isinstance(target, bool):
            raise KeyBrokerMessageError("migration_target: expected true or false")
        return cls(
            vm=_str(o, "vm", _VM_NAME_RE),
            pdh=_bytes(o, "pdh", size=PDH_SIZE),
            cert_chain=_bytes(o, "cert_chain", size=CERT_CHAIN_SIZE),
            policy=_int(o, "policy", bits=32),
            migration_target=target,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchResponse:
    """The owner's Diffie-Hellman certificate and the session blob, for LAUNCH_START."""

    session_id: str
    godh: bytes
    session: bytes

    def to_json(self) -> dict[str, object]:
        return {"session_id": self.session_id, "godh": _b64(self.godh), "session": _b64(self.session)}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a reply that crossed the host's network; session_id becomes part of the next
        # request's path, hence its pattern.
        o = _fields(obj, "launch reply", ("session_id", "godh", "session"))
        return cls(
            session_id=_str(o, "session_id", SESSION_ID_RE),
            godh=_bytes(o, "godh", size=PDH_SIZE),
            session=_bytes(o, "session", size=SESSION_BLOB_SIZE),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementRequest:
    """``POST /v1/launch/<session_id>/measurement``: LAUNCH_MEASURE's output and the firmware version."""

    measurement: bytes
    api_major: int
    api_minor: int
    build: int

    def to_json(self) -> dict[str, object]:
        return {
            "measurement": _b64(self.measurement),
            "api_major": self.api_major,
            "api_minor": self.api_minor,
            "build": self.build,
        }

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a body from the untrusted host; every field is type- and size-checked.
        o = _fields(obj, "measurement request", ("measurement", "api_major", "api_minor", "build"))
        return cls(
            measurement=_bytes(o, "measurement", size=MEASUREMENT_SIZE),
            api_major=_int(o, "api_major", bits=8),
            api_minor=_int(o, "api_minor", bits=8),
            build=_int(o, "build", bits=8),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretResponse:
    """LAUNCH_SECRET's packet: the 52-byte header and the transport data (ciphertext under the TEK)."""

    secret_header: bytes
    secret: bytes
    guest_len: int

    def to_json(self) -> dict[str, object]:
        return {
            "secret_header": _b64(self.secret_header),
            "secret": _b64(self.secret),
            "guest_len": self.guest_len,
        }

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a reply that crossed the host's network; its lengths size LAUNCH_SECRET's buffers.
        o = _fields(obj, "secret reply", ("secret_header", "secret", "guest_len"))
        reply = cls(
            secret_header=_bytes(o, "secret_header", size=PACKET_HEADER_SIZE),
            secret=_bytes(o, "secret", max_size=MAX_SECRET_SIZE),
            guest_len=_int(o, "guest_len", bits=32),
        )
        if reply.guest_len != len(reply.secret) or reply.guest_len % 16:
            raise KeyBrokerMessageError("guest_len: expected the length of secret, a multiple of 16")
        return reply


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRequest:
    """``POST /v1/migration/decision``: the outcome a VMM asks for, for the migration to the
    target that holds ``ticket``: ``commit`` (that target's VMM, before its guest runs) or
    ``abort`` (the source's VMM, to run its guest again). The owner decides once per ticket."""

    ticket: bytes
    migration_id: bytes
    challenge: bytes
    outcome: str

    def to_json(self) -> dict[str, object]:
        return {"ticket": _b64(self.ticket), "migration_id": _b64(self.migration_id),
                "challenge": _b64(self.challenge), "outcome": self.outcome}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a body from the untrusted host; every field is type- and size-checked.
        o = _fields(obj, "decision request", ("ticket", "migration_id", "challenge", "outcome"))
        return cls(ticket=_bytes(o, "ticket", size=TICKET_SIZE),
                   migration_id=_bytes(o, "migration_id", size=MIGRATION_ID_SIZE),
                   challenge=_bytes(o, "challenge", size=CHALLENGE_SIZE),
                   outcome=_outcome(o))


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionResponse:
    """The owner's decision and its proof for the Migration Handler, sealed under the ticket's
    key (the host relays it, and can neither read nor forge it): a commit grant for the
    target's MH (COMPLETE), or an abort token for the source's MH (RESUME)."""

    outcome: str
    token: bytes

    def to_json(self) -> dict[str, object]:
        return {"outcome": self.outcome, "token": _b64(self.token)}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: a reply that crossed the host's network; the MH checks the token itself.
        o = _fields(obj, "decision reply", ("outcome", "token"))
        return cls(outcome=_outcome(o), token=_bytes(o, "token", max_size=MAX_TOKEN_SIZE))


def _outcome(o: Json) -> str:
    value = o["outcome"]
    if value not in OUTCOMES:
        raise KeyBrokerMessageError(f"outcome: expected one of {', '.join(OUTCOMES)}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthResponse:
    """``GET /v1/health``: the broker serves."""

    status: str

    def to_json(self) -> dict[str, object]:
        return {"status": self.status}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        o = _fields(obj, "health reply", ("status",))
        if o["status"] != "ok":
            raise KeyBrokerMessageError('status: expected "ok"')
        return cls(status="ok")


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """Any failure, with a 4xx or 5xx status: what was refused and why, never key material."""

    error: str

    def to_json(self) -> dict[str, object]:
        return {"error": self.error}

    @classmethod
    def from_json(cls, obj: object) -> Self:
        # SECURITY: the text ends up in exceptions, logs and terminals: bounded, and without
        # control characters (no terminal escapes from whoever sits on the network).
        o = _fields(obj, "error reply", ("error",))
        error = o["error"]
        if not isinstance(error, str) or not 0 < len(error) <= MAX_ERROR_SIZE or not error.isprintable():
            raise KeyBrokerMessageError(f"error: expected 1 to {MAX_ERROR_SIZE} printable characters")
        return cls(error=error)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The broker never redirects: a 3xx is an answer (which :func:`decode_reply` refuses), not a
    reason to send the body, or a GET without it, somewhere else."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(_NoRedirect)


def check_url(url: str) -> None:
    """The broker speaks HTTP: any other scheme (``file:``, ``data:``, ``ftp:``, which urllib would
    also open) is the caller's mistake, refused before anything is opened."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"the guest owner's URL {url[:100]!r} is not http:// or https://")


def post_json(url: str, path: str, body: bytes, *, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """POST ``body`` to the broker at ``url``: the HTTP status and at most ``MAX_BODY + 1`` bytes of
    the answer (one more than :func:`decode` accepts, so that an oversize body is refused, not cut).

    :class:`OSError` when no answer arrives; :class:`KeyBrokerMessageError` when it is not HTTP.
    """
    check_url(url)
    request = urllib.request.Request(
        url.rstrip("/") + path, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:  # a status other than 2xx: the body says why
        try:
            return exc.code, exc.read(MAX_BODY + 1)
        finally:
            exc.close()
    except OSError:
        raise  # no answer (refused, reset, timed out), though http.client files some as HTTPException too
    except http.client.HTTPException as exc:
        raise KeyBrokerMessageError(f"not an HTTP answer: {type(exc).__name__}") from exc
