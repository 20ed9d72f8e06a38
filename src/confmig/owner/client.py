"""A client of the key broker: the two calls the VMM makes during an SEV launch.

Plain HTTP and JSON on the standard library (``docs/owner.md`` has the wire
format): the VMM may not import ``confmig.owner``, so it carries a
re-implementation of these few lines; this one serves tools and tests.
Everything it carries is opaque to whoever relays it.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from typing import Final, TypeVar

from confmig.owner.errors import RemoteOwnerError, RequestError
from confmig.owner.wire import (
    LAUNCH_PATH,
    MAX_BODY,
    LaunchRequest,
    LaunchResponse,
    MeasurementRequest,
    SecretResponse,
    measurement_path,
)

_Reply = TypeVar("_Reply", LaunchResponse, SecretResponse)

TIMEOUT: Final = 30.0
"""Seconds one call may take: verifying a chain and making a session takes milliseconds."""


class OwnerClient:
    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def launch(self, *, vm: str, pdh: bytes, cert_chain: bytes, policy: int) -> LaunchResponse:
        """``POST /v1/launch``: the owner's DH certificate and session blob for LAUNCH_START."""
        request = LaunchRequest(vm=vm, pdh=pdh, cert_chain=cert_chain, policy=policy)
        return self._parse(LaunchResponse, self._post(LAUNCH_PATH, request.to_json()))

    def measurement(
        self, session_id: str, *, measurement: bytes, api_major: int, api_minor: int, build: int
    ) -> SecretResponse:
        """``POST /v1/launch/<id>/measurement``: the LAUNCH_SECRET packet, if the owner accepts the launch."""
        request = MeasurementRequest(
            measurement=measurement, api_major=api_major, api_minor=api_minor, build=build
        )
        return self._parse(SecretResponse, self._post(measurement_path(session_id), request.to_json()))

    def _post(self, path: str, body: dict[str, object]) -> object:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = resp.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = str(json.loads(detail)["error"])
            raise RemoteOwnerError(exc.code, detail) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteOwnerError(0, f"cannot reach {self.url}: {reason}") from None
        if len(data) > MAX_BODY:
            raise RemoteOwnerError(0, "reply larger than any the broker sends")
        try:
            return json.loads(data)
        except ValueError:
            raise RemoteOwnerError(0, "reply is not JSON") from None

    @staticmethod
    def _parse(kind: type[_Reply], reply: object) -> _Reply:
        try:
            return kind.from_json(reply)
        except RequestError as exc:
            raise RemoteOwnerError(0, f"malformed reply: {exc}") from None
