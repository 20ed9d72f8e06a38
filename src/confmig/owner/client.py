"""A client of the key broker: the two calls the VMM makes during an SEV launch.

For tools and tests; the VMM makes the same calls itself (``confmig.vmm.sev``),
since it may not import ``confmig.owner``. Both speak
:mod:`confmig.proto.keybroker`. Everything it carries is opaque to whoever
relays it.
"""

from __future__ import annotations

from typing import TypeVar

from confmig.common.errors import KeyBrokerMessageError
from confmig.owner.errors import RemoteOwnerError
from confmig.proto.keybroker import (
    LAUNCH_PATH,
    TIMEOUT,
    ErrorReply,
    LaunchRequest,
    LaunchResponse,
    MeasurementRequest,
    Message,
    SecretResponse,
    decode_reply,
    encode,
    measurement_path,
    post_json,
)

_Reply = TypeVar("_Reply", LaunchResponse, SecretResponse)


class OwnerClient:
    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def launch(self, *, vm: str, pdh: bytes, cert_chain: bytes, policy: int,
               migration_target: bool = False) -> LaunchResponse:
        """``POST /v1/launch``: the owner's DH certificate and session blob for LAUNCH_START."""
        request = LaunchRequest(vm=vm, pdh=pdh, cert_chain=cert_chain, policy=policy,
                                migration_target=migration_target)
        return self._call(LAUNCH_PATH, request, LaunchResponse)

    def measurement(
        self, session_id: str, *, measurement: bytes, api_major: int, api_minor: int, build: int
    ) -> SecretResponse:
        """``POST /v1/launch/<id>/measurement``: the LAUNCH_SECRET packet, if the owner accepts the launch."""
        request = MeasurementRequest(
            measurement=measurement, api_major=api_major, api_minor=api_minor, build=build
        )
        return self._call(measurement_path(session_id), request, SecretResponse)

    def _call(self, path: str, request: Message, kind: type[_Reply]) -> _Reply:
        try:
            status, data = post_json(self.url, path, encode(request), timeout=self.timeout)
            reply = decode_reply(kind, status, data)
        except KeyBrokerMessageError as exc:
            raise RemoteOwnerError(0, f"malformed reply: {exc}") from exc
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteOwnerError(0, f"cannot reach {self.url}: {reason}") from exc
        if isinstance(reply, ErrorReply):
            raise RemoteOwnerError(status, reply.error)
        return reply
