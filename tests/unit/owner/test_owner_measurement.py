"""The measurement check: the expected firmware digest under the expected policy, or a refusal."""

from __future__ import annotations

import hashlib

import pytest

from confmig.owner import (
    ExpectedLaunch,
    MeasurementRejected,
    PolicyRejected,
    RequestError,
    check_measurement,
    firmware_digest,
)
from confmig.platform.psp import FirmwareVersion, PolicyFlag, TransportKeys, launch_digest
from confmig.platform.psp.measure import compute_measure

FIRMWARE = bytes(range(256)) * 200  # 50 KiB: more than one LAUNCH_UPDATE_DATA scratch chunk
DIGEST = firmware_digest(FIRMWARE)
FW = FirmwareVersion(api_major=1, api_minor=55, build=25)
POLICY = int(PolicyFlag.NODBG | PolicyFlag.NOKS)
KEYS = TransportKeys(tek=b"\x11" * 16, tik=b"\x22" * 16)
MNONCE = b"\x33" * 16
EXPECTED = ExpectedLaunch(digest=DIGEST, policy=POLICY)


def _blob(*, keys: TransportKeys = KEYS, firmware: FirmwareVersion = FW, policy: int = POLICY,
          digest: bytes = DIGEST) -> bytes:
    return compute_measure(keys.tik, firmware=firmware, policy=policy, digest=digest, mnonce=MNONCE) + MNONCE


def test_the_digest_is_the_psps_over_its_chunks() -> None:
    chunks = [FIRMWARE[i : i + 0x5000] for i in range(0, len(FIRMWARE), 0x5000)]
    assert DIGEST == launch_digest(chunks) == hashlib.sha256(FIRMWARE).digest()


def test_the_expected_launch_is_accepted() -> None:
    m = check_measurement(KEYS, _blob(), firmware=FW, expected=EXPECTED)
    assert m.mnonce == MNONCE


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(_blob(digest=firmware_digest(FIRMWARE[:-1] + b"\0")), id="other-firmware"),
        pytest.param(_blob(policy=POLICY & ~PolicyFlag.NODBG), id="other-policy"),
        pytest.param(_blob(keys=TransportKeys(tek=KEYS.tek, tik=b"\x44" * 16)), id="other-session"),
        pytest.param(_blob(firmware=FirmwareVersion(api_major=1, api_minor=55, build=26)), id="other-build"),
        pytest.param(_blob()[:-1] + b"\0", id="mnonce"),
        pytest.param(b"\x01" + _blob()[1:], id="measure"),
    ],
)
def test_anything_else_is_refused_with_one_message(blob: bytes) -> None:
    with pytest.raises(MeasurementRejected) as exc:
        check_measurement(KEYS, blob, firmware=FW, expected=EXPECTED)
    assert str(exc.value) == MeasurementRejected.MESSAGE


def test_a_firmware_older_than_the_policy_requires_is_refused() -> None:
    policy = POLICY | 2 << 16  # API 2.0 at least
    expected = ExpectedLaunch(digest=DIGEST, policy=policy)
    with pytest.raises(PolicyRejected, match=r"firmware API 1\.55 is older than the policy's minimum 2\.0"):
        check_measurement(KEYS, _blob(policy=policy), firmware=FW, expected=expected)


def test_the_measurement_is_48_bytes() -> None:
    with pytest.raises(RequestError, match="48 bytes"):
        check_measurement(KEYS, _blob()[:32], firmware=FW, expected=EXPECTED)


def test_expected_launch_bounds() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ExpectedLaunch(digest=DIGEST[:16], policy=0)
    with pytest.raises(ValueError, match="32 bits"):
        ExpectedLaunch(digest=DIGEST, policy=1 << 32)
