"""The key broker's HTTP wire format: paths, JSON bodies, sizes. Pure data, standard library only.

Both sides use it: the service (:mod:`.service`) to parse requests and the
client (:mod:`.client`) to parse replies. ``docs/owner.md`` describes the same
format for re-implementations (the VMM may not import ``confmig.owner``).

* Bodies are JSON objects; unknown fields are refused, so that a client and
  a broker that disagree find out at once.
* Byte strings are standard base64 with padding (RFC 4648 §4).
* Integers are JSON integers (``true`` is not an integer here).
* An error is ``{"error": "..."}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from confmig.owner.errors import RequestError

LAUNCH_PATH: Final = "/v1/launch"
HEALTH_PATH: Final = "/v1/health"
MEASUREMENT_PATH_RE: Final = re.compile(r"/v1/launch/([0-9a-f]{32})/measurement")
SESSION_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
MAX_BODY: Final = 64 * 1024
"""Bytes of a request or reply body: the largest, POST /v1/launch, carries 2780 + 8336
base64 characters of certificates, about 11 KB."""

# The SEV formats' sizes (confmig.platform.psp: cert, chain, measure, packet), repeated so that
# this module needs nothing but the standard library; a unit test keeps them equal.
PDH_SIZE: Final = 2084
CERT_CHAIN_SIZE: Final = 3 * 2084
SESSION_BLOB_SIZE: Final = 128
MEASUREMENT_SIZE: Final = 48
PACKET_HEADER_SIZE: Final = 52
MAX_SECRET_SIZE: Final = 0x5000
_VM_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:@+-]{1,128}")

Json = Mapping[str, object]


def measurement_path(session_id: str) -> str:
    return f"{LAUNCH_PATH}/{session_id}/measurement"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fields(obj: object, what: str, names: tuple[str, ...]) -> Json:
    if not isinstance(obj, dict):
        raise RequestError(f"{what}: expected a JSON object")
    missing = [n for n in names if n not in obj]
    unknown = sorted(set(obj) - set(names))
    if missing:
        raise RequestError(f"{what}: missing field(s) {', '.join(missing)}")
    if unknown:
        raise RequestError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return obj


def _int(obj: Json, name: str, *, bits: int) -> int:
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise RequestError(f"{name}: expected an integer from 0 to {(1 << bits) - 1}")
    return value


def _bytes(obj: Json, name: str, *, size: int | None = None, max_size: int | None = None) -> bytes:
    value = obj[name]
    if not isinstance(value, str):
        raise RequestError(f"{name}: expected a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid base64") from None
    if size is not None and len(data) != size:
        raise RequestError(f"{name}: expected {size} bytes, got {len(data)}")
    if max_size is not None and not 0 < len(data) <= max_size:
        raise RequestError(f"{name}: expected 1 to {max_size} bytes, got {len(data)}")
    return data


def _str(obj: Json, name: str, pattern: re.Pattern[str]) -> str:
    value = obj[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RequestError(f"{name}: expected a string matching {pattern.pattern}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchRequest:
    """``POST /v1/launch``: the platform's certificates and the guest policy the VMM will launch with."""

    vm: str
    pdh: bytes
    cert_chain: bytes
    policy: int

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "pdh": b64(self.pdh),
            "cert_chain": b64(self.cert_chain),
            "policy": self.policy,
        }

    @classmethod
    def from_json(cls, obj: object) -> LaunchRequest:
        # SECURITY: a body from the untrusted host; every field is type- and size-checked.
        o = _fields(obj, "launch request", ("vm", "pdh", "cert_chain", "policy"))
        return cls(
            vm=_str(o, "vm", _VM_NAME_RE),
            pdh=_bytes(o, "pdh", size=PDH_SIZE),
            cert_chain=_bytes(o, "cert_chain", size=CERT_CHAIN_SIZE),
            policy=_int(o, "policy", bits=32),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchResponse:
    """The owner's Diffie-Hellman certificate and the session blob, for LAUNCH_START."""

    session_id: str
    godh: bytes
    session: bytes

    def to_json(self) -> dict[str, object]:
        return {"session_id": self.session_id, "godh": b64(self.godh), "session": b64(self.session)}

    @classmethod
    def from_json(cls, obj: object) -> LaunchResponse:
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
            "measurement": b64(self.measurement),
            "api_major": self.api_major,
            "api_minor": self.api_minor,
            "build": self.build,
        }

    @classmethod
    def from_json(cls, obj: object) -> MeasurementRequest:
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
            "secret_header": b64(self.secret_header),
            "secret": b64(self.secret),
            "guest_len": self.guest_len,
        }

    @classmethod
    def from_json(cls, obj: object) -> SecretResponse:
        o = _fields(obj, "secret reply", ("secret_header", "secret", "guest_len"))
        reply = cls(
            secret_header=_bytes(o, "secret_header", size=PACKET_HEADER_SIZE),
            secret=_bytes(o, "secret", max_size=MAX_SECRET_SIZE),
            guest_len=_int(o, "guest_len", bits=32),
        )
        if reply.guest_len != len(reply.secret) or reply.guest_len % 16:
            raise RequestError("guest_len: expected the length of secret, a multiple of 16")
        return reply
