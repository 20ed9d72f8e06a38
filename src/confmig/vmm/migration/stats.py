"""Migration counters, reported by ``query-migrate`` under QEMU's field names."""

from __future__ import annotations

from dataclasses import dataclass, field

from confmig.common.clock import Clock, MonotonicClock
from confmig.common.units import PAGE_SIZE


@dataclass
class ConfidentialCounters:
    """What a confidential backend did (``query-migrate``'s ``x-confmig.confidential``)."""

    backend: str
    private_pages: int = 0
    shared_pages: int = 0
    commands: int = 0
    """Firmware commands the backend issued (Secure Processor commands, Migration Handler requests)."""
    commands_name: str = "commands"
    """What ``commands`` is called in ``query-migrate``: the backend names it."""
    extra: dict[str, int] = field(default_factory=dict)
    """Counters only this backend has, by their ``query-migrate`` names."""

    def qmp(self) -> dict[str, object]:
        return {"backend": self.backend, "private-pages": self.private_pages,
                "shared-pages": self.shared_pages, self.commands_name: self.commands, **self.extra}


@dataclass
class MigrationStats:
    """Mutable counters owned by the migration thread; readers get a consistent-enough view."""

    clock: Clock = field(default_factory=MonotonicClock)
    """Where the migration takes its time from (a ``ManualClock`` in unit tests)."""
    start: float = field(init=False)
    """When the migration began, on :attr:`clock` (its creation)."""
    setup_time_ms: int = 0
    total_time_ms: int = 0
    downtime_ms: int = 0
    expected_downtime_ms: int = 0
    total_bytes: int = 0
    """Guest RAM size."""
    transferred: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    multifd_bytes: int = 0
    normal: int = 0
    duplicate: int = 0
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    pages_per_second: int = 0
    rounds: int = 0
    downtime_breakdown: dict[str, float] = field(default_factory=dict)
    """Milliseconds spent in each step of the switch-over (Cloud Hypervisor style)."""
    confidential: ConfidentialCounters | None = None

    def __post_init__(self) -> None:
        self.start = self.clock.monotonic()

    def elapsed_ms(self) -> int:
        return int((self.clock.monotonic() - self.start) * 1000)

    def ram(self) -> dict[str, object]:
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total_bytes,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": self.multifd_bytes,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
