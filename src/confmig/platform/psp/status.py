"""SEV firmware status codes and the one exception the PSP raises.

The codes are those of the SEV API (Linux ``include/uapi/linux/psp-sev.h``;
the firmware's own names, where they differ, are given in comments). A command
either returns its typed response or raises :class:`SevError` carrying the
status; KVM copies that status into ``kvm_sev_cmd.error``.
"""

from __future__ import annotations

from enum import IntEnum

from confmig.common.errors import ConfmigError


class SevStatus(IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LEN = 0x04  # firmware: INVALID_LENGTH
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B  # also every HMAC mismatch
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWSEV_RET_PLATFORM = 0x13
    HWSEV_RET_UNSAFE = 0x14  # firmware: HARDWARE_UNSAFE
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


class SevError(ConfmigError):
    """A firmware command failed with ``status``.

    ``output`` carries the fields the firmware writes back even on failure
    (the length queries: LAUNCH_MEASURE and PDH_CERT_EXPORT answer
    ``INVALID_LEN`` together with the length they need). The message never
    contains key material or guest data: only the status name.
    """

    def __init__(self, status: SevStatus, *, output: object = None) -> None:
        super().__init__(f"SEV firmware status {status.name} (0x{status.value:02x})")
        self.status = status
        self.output = output

    def __reduce__(self) -> tuple[type[SevError], tuple[SevStatus], dict[str, object]]:
        # Exceptions pickle their args by default; ours are not the constructor's.
        return (type(self), (self.status,), {"output": self.output})
