"""The wire format: what the broker accepts and what its client accepts back."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from confmig.owner import RequestError, wire
from confmig.platform.psp.cert import SEV_CERT_SIZE
from confmig.platform.psp.chain import PLATFORM_CHAIN_SIZE
from confmig.platform.psp.measure import MEASUREMENT_SIZE
from confmig.platform.psp.packet import PACKET_HEADER_SIZE
from confmig.platform.psp.session import SESSION_SIZE

B64 = base64.b64encode


def test_sizes_are_the_psps() -> None:
    assert (wire.PDH_SIZE, wire.CERT_CHAIN_SIZE, wire.SESSION_BLOB_SIZE, wire.MEASUREMENT_SIZE,
            wire.PACKET_HEADER_SIZE) == (SEV_CERT_SIZE, PLATFORM_CHAIN_SIZE, SESSION_SIZE, MEASUREMENT_SIZE,
                                         PACKET_HEADER_SIZE)


GOOD_LAUNCH: dict[str, Any] = {
    "vm": "guest-1.example",
    "pdh": B64(b"p" * 2084).decode(),
    "cert_chain": B64(b"c" * 6252).decode(),
    "policy": 0x1,
}
GOOD_MEASUREMENT: dict[str, Any] = {"measurement": B64(b"m" * 48).decode(), "api_major": 1, "api_minor": 55,
                                    "build": 25}


def test_round_trips() -> None:
    launch = wire.LaunchRequest.from_json(GOOD_LAUNCH)
    assert launch.to_json() == GOOD_LAUNCH and launch.pdh == b"p" * 2084
    measured = wire.MeasurementRequest.from_json(GOOD_MEASUREMENT)
    assert measured.to_json() == GOOD_MEASUREMENT
    offer = wire.LaunchResponse(session_id="ab" * 16, godh=b"g" * 2084, session=b"s" * 128)
    assert wire.LaunchResponse.from_json(offer.to_json()) == offer
    secret = wire.SecretResponse(secret_header=b"h" * 52, secret=b"x" * 64, guest_len=64)
    assert wire.SecretResponse.from_json(secret.to_json()) == secret
    assert wire.measurement_path("ab" * 16) == "/v1/launch/" + "ab" * 16 + "/measurement"
    assert wire.MEASUREMENT_PATH_RE.fullmatch(wire.measurement_path("ab" * 16))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"policy": True}, "policy: expected an integer"),
        ({"policy": -1}, "policy: expected an integer"),
        ({"policy": 1 << 32}, "policy: expected an integer"),
        ({"policy": "0x1"}, "policy: expected an integer"),
        ({"pdh": "not base64!"}, "pdh: not valid base64"),
        ({"pdh": B64(b"p" * 2083).decode()}, "pdh: expected 2084 bytes, got 2083"),
        ({"cert_chain": B64(b"c" * 2084).decode()}, "cert_chain: expected 6252 bytes"),
        ({"pdh": 5}, "pdh: expected a base64 string"),
        ({"vm": ""}, "vm: expected a string"),
        ({"vm": "a b"}, "vm: expected a string"),
        ({"vm": "x" * 129}, "vm: expected a string"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_launch_requests(change: dict[str, Any], error: str) -> None:
    with pytest.raises(RequestError, match=error):
        wire.LaunchRequest.from_json({**GOOD_LAUNCH, **change})


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
    with pytest.raises(RequestError, match=error):
        wire.MeasurementRequest.from_json(body)


def test_a_client_refuses_inconsistent_replies() -> None:
    reply = wire.SecretResponse(secret_header=b"h" * 52, secret=b"x" * 64, guest_len=48).to_json()
    with pytest.raises(RequestError, match="guest_len"):
        wire.SecretResponse.from_json(reply)
    with pytest.raises(RequestError, match="session_id"):
        wire.LaunchResponse.from_json({"session_id": "../x", "godh": B64(b"g" * 2084).decode(),
                                       "session": B64(b"s" * 128).decode()})
