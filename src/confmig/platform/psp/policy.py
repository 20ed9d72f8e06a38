"""The 32-bit SEV guest policy.

Bits 0-5 are flags, bits 6-15 are reserved (must be zero), bits 16-23 and
24-31 are the minimum firmware API major and minor version the guest accepts.
The PSP keeps the raw value (GUEST_STATUS reports it, the policy MAC covers
it); :class:`GuestPolicy` is the parsed view.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import FirmwareVersion

POLICY_RESERVED_MASK = 0x0000_FFC0
_API_MAJOR_SHIFT = 16
_API_MINOR_SHIFT = 24


class PolicyFlag(IntFlag):
    NODBG = 1 << 0  # DBG_DECRYPT/DBG_ENCRYPT refused
    NOKS = 1 << 1  # no key sharing with another guest
    ES = 1 << 2  # SEV-ES required
    NOSEND = 1 << 3  # SEND_START refused
    DOMAIN = 1 << 4  # migrate only within the OCA's domain
    SEV = 1 << 5  # migrate only to AMD-certified platforms


_NO_FLAGS = PolicyFlag(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestPolicy:
    flags: PolicyFlag = _NO_FLAGS
    api_major: int = 0
    api_minor: int = 0
    reserved: int = 0
    """Bits 6-15 as found; non-zero makes the policy invalid."""

    @classmethod
    def from_u32(cls, value: int) -> GuestPolicy:
        if not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"policy {value:#x} does not fit in 32 bits")
        return cls(
            flags=PolicyFlag(value & 0x3F),
            api_major=(value >> _API_MAJOR_SHIFT) & 0xFF,
            api_minor=(value >> _API_MINOR_SHIFT) & 0xFF,
            reserved=value & POLICY_RESERVED_MASK,
        )

    def to_u32(self) -> int:
        return (
            int(self.flags)
            | self.reserved
            | (self.api_major & 0xFF) << _API_MAJOR_SHIFT
            | (self.api_minor & 0xFF) << _API_MINOR_SHIFT
        )

    def __contains__(self, flag: PolicyFlag) -> bool:
        return flag in self.flags

    def check(self, firmware: FirmwareVersion) -> None:
        """The firmware's policy check: API version supported, reserved bits zero.

        Raises ``SevError(POLICY_FAILURE)``.
        """
        if not firmware.supports(self.api_major, self.api_minor) or self.reserved:
            raise SevError(SevStatus.POLICY_FAILURE)
