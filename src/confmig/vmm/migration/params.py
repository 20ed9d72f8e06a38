"""Migration capabilities and parameters, with QEMU's names, defaults and bounds.

Only what the engine honours is listed: asking for an unknown or unsupported
capability is an error, not a silent no-op.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, fields, replace

from confmig.common.errors import ConfigError

MAX_THROTTLE = 128 << 20
"""QEMU's default ``max-bandwidth``: 128 MiB/s."""
MAX_DOWNTIME_LIMIT_MS = 2_000_000
MAX_MULTIFD_CHANNELS = 255

CONFIDENTIAL_BACKENDS = ("psp", "mh")
"""Values of ``x-confidential-backend`` besides empty (the guest's default): the PSP and
the Migration Handler (``mh``). ``backends.BACKENDS`` has an entry for each. The intra-host
backend (``local``) is chosen by ``mode`` instead, for every kind of guest."""

MIG_MODES = ("normal", "cpr-reboot", "cpr-transfer")
"""QEMU's ``MigMode``. ``cpr-transfer`` hands the guest to a new VMM process on this host
(its RAM by file descriptor, an SEV context moved inside KVM: ``docs/local.md``);
``cpr-reboot`` is QEMU's too but not implemented here (refused)."""

CAPABILITIES = ("events", "multifd")
"""Capabilities confmig implements. ``events`` gates the MIGRATION and
MIGRATION_PASS events, as in QEMU."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationParameters:
    downtime_limit: int = 300
    """Milliseconds the guest may stay stopped at switch-over."""
    max_bandwidth: int = MAX_THROTTLE
    """Bytes per second (0 would stall: QEMU rejects it too)."""
    avail_switchover_bandwidth: int = 0
    """Bytes per second assumed for the final round; 0 = use the measured rate."""
    multifd_channels: int = 2
    mode: str = "normal"
    """QEMU's ``mode``: ``normal`` or ``cpr-transfer`` (intra-host: ``backends`` picks the
    ``local`` backend, and ``migrate`` needs a ``cpr`` channel)."""
    sev_pdh: str = ""
    """The target platform's PDH certificate, base64 (its ``query-sev-capabilities`` ``pdh``)."""
    sev_plat_cert: str = ""
    """The target's platform chain PEK || OCA || CEK, base64 (``cert-chain``)."""
    sev_amd_cert: str = ""
    """The AMD chain ASK || ARK, base64 (``confmig amd-certs``; on real hosts, from AMD's KDS)."""
    x_confidential_backend: str = ""
    """How a confidential guest's private pages move (ours); empty: the guest's default."""
    x_mh_target_challenge: str = ""
    """The target Migration Handler's challenge, hex (its ``x-query-migration-handler``
    ``target-challenge``): its own 16 random bytes, which the source's MH seals into the
    completion record so that it opens on that target only, then the 16-byte ticket under
    which the guest owner released that target's transport key (ours)."""
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def qmp_parameters(self) -> dict[str, object]:
        return {
            "downtime-limit": self.downtime_limit,
            "max-bandwidth": self.max_bandwidth,
            "avail-switchover-bandwidth": self.avail_switchover_bandwidth,
            "multifd-channels": self.multifd_channels,
            "multifd-compression": "none",
            "sev-pdh": self.sev_pdh,
            "sev-plat-cert": self.sev_plat_cert,
            "sev-amd-cert": self.sev_amd_cert,
            "x-confidential-backend": self.x_confidential_backend,
            "x-mh-target-challenge": self.x_mh_target_challenge,
            "mode": self.mode,
        }

    def qmp_capabilities(self) -> list[dict[str, object]]:
        return [{"capability": c, "state": c in self.capabilities} for c in CAPABILITIES]

    def with_parameters(self, args: dict[str, object]) -> MigrationParameters:
        """Apply ``migrate-set-parameters`` arguments (QMP names), validated."""
        names = {f.name.replace("_", "-"): f.name for f in fields(self) if f.name != "capabilities"}
        changes: dict[str, object] = {}
        for key, value in args.items():
            if key == "multifd-compression":
                if value != "none":
                    raise ConfigError("Parameter 'multifd-compression' only supports 'none'")
                continue
            if key not in names:
                raise ConfigError(f"Parameter '{key}' is unexpected")
            if key in _SEV_CERT_PARAMETERS:
                changes[names[key]] = _base64_parameter(key, value)
                continue
            if key == "x-confidential-backend":
                changes[names[key]] = _backend_parameter(key, value)
                continue
            if key == "x-mh-target-challenge":
                changes[names[key]] = _challenge_parameter(key, value)
                continue
            if key == "mode":
                changes[names[key]] = _mode_parameter(key, value)
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"Invalid parameter type for '{key}', expected: integer")
            _check_range(key, value)
            changes[names[key]] = value
        return replace(self, **changes)  # type: ignore[arg-type]

    def with_capabilities(self, caps: list[tuple[str, bool]]) -> MigrationParameters:
        enabled = set(self.capabilities)
        for name, state in caps:
            if name not in CAPABILITIES:
                raise ConfigError(f"Capability '{name}' is not supported by confmig")
            (enabled.add if state else enabled.discard)(name)
        return replace(self, capabilities=frozenset(enabled))


_SEV_CERT_PARAMETERS = ("sev-pdh", "sev-plat-cert", "sev-amd-cert")
MAX_CERT_PARAMETER = 64 * 1024
"""Base64 characters of one certificate parameter (PEK || OCA || CEK, the longest, is 8336)."""


def _base64_parameter(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
    if len(value) > MAX_CERT_PARAMETER:
        raise ConfigError(f"Parameter '{key}' is longer than {MAX_CERT_PARAMETER} characters")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"Parameter '{key}' is not valid base64") from None
    return value


def _backend_parameter(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
    if value and value not in CONFIDENTIAL_BACKENDS:
        # QAPI's wording for an enum value it does not know
        raise ConfigError(f"Parameter '{key}' does not accept value '{value}'")
    return value


MH_CHALLENGE_HEX = 64
"""Hex digits of a Migration Handler target challenge (32 bytes: challenge and ticket)."""


def _challenge_parameter(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
    if value and (len(value) != MH_CHALLENGE_HEX or any(c not in "0123456789abcdefABCDEF" for c in value)):
        raise ConfigError(f"Parameter '{key}' expects {MH_CHALLENGE_HEX} hex digits (32 bytes)")
    return value.lower()


def _check_range(key: str, value: int) -> None:
    bounds = {
        "downtime-limit": (0, MAX_DOWNTIME_LIMIT_MS, "an integer in range [0, 2000000]"),
        "max-bandwidth": (1, 1 << 62, "a positive integer"),
        "avail-switchover-bandwidth": (0, 1 << 62, "a non-negative integer"),
        "multifd-channels": (1, MAX_MULTIFD_CHANNELS, "an integer in range [1, 255]"),
    }
    lo, hi, text = bounds[key]
    if not lo <= value <= hi:
        raise ConfigError(f"Parameter '{key}' expects {text}")


def _mode_parameter(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
    if value not in MIG_MODES:
        raise ConfigError(f"Parameter '{key}' does not accept value '{value}'")
    if value == "cpr-reboot":
        raise ConfigError("Parameter 'mode': cpr-reboot is not supported by confmig (cpr-transfer is)")
    return value
