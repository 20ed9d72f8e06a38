"""LAUNCH_MEASURE: the launch digest and the measurement the guest owner checks.

The PSP hashes (SHA-256) every plaintext byte LAUNCH_UPDATE_DATA and
LAUNCH_UPDATE_VMSA import, in order. LAUNCH_MEASURE then returns 48 bytes,
``MEASURE (32) || MNONCE (16)``, with::

    MEASURE = HMAC-SHA256(TIK, 0x04 || api_major || api_minor || build
                               || policy (LE32) || launch_digest (32) || mnonce (16))

(AMD firmware ``sev_guest_measure``; the mnonce comes from the TRNG). The
owner, knowing the expected digest of what it meant to launch and its own
TIK, recomputes MEASURE with :func:`measurement_matches`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import FirmwareVersion

MEASUREMENT_SIZE: Final = 48
MNONCE_SIZE: Final = 16
DIGEST_SIZE: Final = 32
CONTEXT_MEASURE: Final = 0x04


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchMeasurement:
    measure: bytes
    mnonce: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> LaunchMeasurement:
        if len(data) != MEASUREMENT_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        return cls(measure=bytes(data[:32]), mnonce=bytes(data[32:]))

    def to_bytes(self) -> bytes:
        return self.measure + self.mnonce


def launch_digest(chunks: Iterable[bytes]) -> bytes:
    """SHA-256 over the plaintext the host imports, in import order."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


def compute_measure(
    tik: bytes, *, firmware: FirmwareVersion, policy: int, digest: bytes, mnonce: bytes
) -> bytes:
    if len(digest) != DIGEST_SIZE or len(mnonce) != MNONCE_SIZE:
        raise ValueError("the digest is 32 bytes and the mnonce 16")
    message = (
        struct.pack("<BBBBI", CONTEXT_MEASURE, firmware.api_major, firmware.api_minor, firmware.build, policy)
        + digest
        + mnonce
    )
    return hmac.new(tik, message, hashlib.sha256).digest()


def measurement_matches(
    tik: bytes,
    measurement: LaunchMeasurement,
    *,
    firmware: FirmwareVersion,
    policy: int,
    expected_digest: bytes,
) -> bool:
    """The owner's check: did the platform launch exactly ``expected_digest`` under ``policy``?"""
    expected = compute_measure(
        tik, firmware=firmware, policy=policy, digest=expected_digest, mnonce=measurement.mnonce
    )
    return hmac.compare_digest(expected, measurement.measure)
