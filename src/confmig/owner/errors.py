"""The guest owner's refusals, each with the HTTP status the key broker answers with.

::

    ConfmigError
    └── OwnerError                  the guest owner refused or failed a request
        ├── RequestError            400  malformed request: JSON, field, type, size, base64
        │   └── RequestTooLarge     413  a body larger than the broker reads
        ├── PlatformRejected        403  the platform's certificates do not chain up to the trusted AMD root
        ├── PolicyRejected          403  the guest policy is not the one configured for this VM
        ├── MeasurementRejected     403  the launch measurement is not that of the expected firmware
        │                                 under the expected policy (one fixed message)
        ├── UnknownVm               404  no VM of that name is configured
        ├── SessionError            404  no such launch session
        │   ├── SessionClosed       409  the session already released its secret, or was refused
        │   └── SessionExpired      410  the session outlived its time to live
        ├── BrokerBusy              503  too many open sessions or concurrent requests
        └── RemoteOwnerError        (client side) the key broker answered with an error or
                                         could not be reached; ``status`` is the HTTP status (0: no answer)

Every message names what was refused and why, and never carries key material.
"""

from __future__ import annotations

from typing import ClassVar

from confmig.common.errors import ConfmigError


class OwnerError(ConfmigError):
    """Root of the guest owner's errors."""

    http_status: ClassVar[int] = 500


class RequestError(OwnerError):
    http_status = 400


class RequestTooLarge(RequestError):
    http_status = 413


class PlatformRejected(OwnerError):
    http_status = 403


class PolicyRejected(OwnerError):
    http_status = 403


class MeasurementRejected(OwnerError):
    """Deliberately opaque, like every integrity failure: the HMAC does not say which input differed."""

    http_status = 403
    MESSAGE: ClassVar[str] = "launch measurement does not match the expected firmware digest and policy"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class UnknownVm(OwnerError):
    http_status = 404


class SessionError(OwnerError):
    http_status = 404


class SessionClosed(SessionError):
    http_status = 409


class SessionExpired(SessionError):
    http_status = 410


class DecisionRefused(OwnerError):
    """A migration ticket the owner never issued, or one decided the other way already."""

    http_status = 409


class BrokerBusy(OwnerError):
    http_status = 503


class RemoteOwnerError(OwnerError):
    """What :class:`~confmig.owner.client.OwnerClient` raises; ``status`` 0 means no HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        prefix = f"guest owner refused ({status})" if status else "guest owner"
        super().__init__(f"{prefix}: {message}")
        self.status = status
        self.error = message
