"""The owner's verdict on LAUNCH_MEASURE: is this the firmware it meant to launch, under its policy?

The PSP answers LAUNCH_MEASURE with ``MEASURE (32) || MNONCE (16)``, where
MEASURE is an HMAC under the owner's TIK over the firmware version, the guest
policy and the SHA-256 launch digest of everything LAUNCH_UPDATE_DATA
imported (``confmig.platform.psp.measure``). The owner knows the firmware
image it expects, hence the digest, and holds the TIK: it recomputes MEASURE.
The host cannot forge it without the TIK, and cannot tell the owner which
input differed; neither do we (one fixed message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from confmig.owner.errors import MeasurementRejected, PolicyRejected, RequestError
from confmig.platform.psp.measure import (
    DIGEST_SIZE,
    MEASUREMENT_SIZE,
    LaunchMeasurement,
    launch_digest,
    measurement_matches,
)
from confmig.platform.psp.policy import GuestPolicy
from confmig.platform.psp.session import TransportKeys
from confmig.platform.psp.version import FirmwareVersion
from confmig.platform.psp.vmsa import RESET_REGISTERS, vmsa_image
from confmig.proto import ovmf_table

POLICY_MAX: Final = 0xFFFF_FFFF


def firmware_digest(image: bytes, *, sev_es_vcpus: int = 0, mh_vcpus: int = 0) -> bytes:
    """The launch digest of a firmware image the host imports whole, as confmig's VMM does.

    LAUNCH_UPDATE_DATA hashes the plaintext it imports, in order and in chunks
    of its scratch buffer; SHA-256 does not see the chunking, so this is
    SHA-256 of the image. An SEV-ES launch then imports each vCPU's VMSA with
    LAUNCH_UPDATE_VMSA, in vCPU order; the VMM sets no register before the
    launch, so each is the reset state (``sev_es_vcpus`` of them). Then, for
    an SEV-ES guest with ``mh_vcpus`` Migration Handler vCPUs, the mirror VM's
    VMSAs, in order: each at the MH's entry (the image's table says where), so
    the owner attests where the code that reads its guest's memory starts.
    """
    vmsas = [vmsa_image(RESET_REGISTERS)] * sev_es_vcpus
    if sev_es_vcpus and mh_vcpus:
        block = ovmf_table.migration_handler(ovmf_table.parse_table(image))
        if block is None:
            raise ValueError("the firmware image declares no Migration Handler")
        entry = {"rip": block.entry, "rflags": ovmf_table.MH_INITIAL_RFLAGS}
        vmsas += [vmsa_image(entry)] * mh_vcpus
    return launch_digest([image, *vmsas])


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpectedLaunch:
    """What the owner accepts: the launch digest of its firmware and its guest policy."""

    digest: bytes
    policy: int

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"a launch digest is {DIGEST_SIZE} bytes (SHA-256)")
        if not 0 <= self.policy <= POLICY_MAX:
            raise ValueError(f"policy {self.policy:#x} does not fit in 32 bits")


def check_measurement(
    keys: TransportKeys, blob: bytes, *, firmware: FirmwareVersion, expected: ExpectedLaunch
) -> LaunchMeasurement:
    """The measurement if it is that of ``expected``; else ``MeasurementRejected`` or ``PolicyRejected``.

    ``firmware`` is the API version and build the host says the platform has
    (PLATFORM_STATUS); the HMAC covers them, so a lie fails like a wrong digest.
    """
    # SECURITY: blob and firmware come from the untrusted host; only the HMAC under our TIK decides.
    if len(blob) != MEASUREMENT_SIZE:
        raise RequestError(f"a launch measurement is {MEASUREMENT_SIZE} bytes, not {len(blob)}")
    policy = GuestPolicy.from_u32(expected.policy)
    if not firmware.supports(policy.api_major, policy.api_minor):
        raise PolicyRejected(
            f"firmware API {firmware.api_major}.{firmware.api_minor} is older than the policy's "
            f"minimum {policy.api_major}.{policy.api_minor}"
        )
    measurement = LaunchMeasurement.from_bytes(blob)
    if not measurement_matches(
        keys.tik, measurement, firmware=firmware, policy=expected.policy, expected_digest=expected.digest
    ):
        raise MeasurementRejected()
    return measurement
