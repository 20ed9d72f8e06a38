"""The emulated firmware's version, and the API-version test the firmware applies to policies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class FirmwareVersion:
    """API major.minor and build id, as PLATFORM_STATUS reports them.

    The default is the version of the firmware source our reference was read
    from (AMD-ASPFW, "Genoa SEV FW version 1.55.25").
    """

    api_major: int = 1
    api_minor: int = 55
    build: int = 25

    def supports(self, major: int, minor: int) -> bool:
        """True if a guest requiring API ``major.minor`` can run on this firmware."""
        return self.api_major > major or (self.api_major == major and self.api_minor >= minor)


DEFAULT_FIRMWARE = FirmwareVersion()
