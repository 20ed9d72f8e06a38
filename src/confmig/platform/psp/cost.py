"""How long the PSP takes: an optional cost model, off by default.

A real PSP is one small embedded core behind a mailbox: every command is a
round trip from the x86 driver to the PSP and back, and every byte of guest
data it moves goes through its crypto engine (the CCP) and the memory
controller. The SEV API's migration path pays that once per page (KVM allows
one page per SEND/RECEIVE_UPDATE_DATA). No published per-command latency or
CCP throughput figures could be found (reference §5), so the emulation does
not invent any: by default a command costs what the emulation's own work
costs. :class:`PspCostModel` lets a run add an explicit, stated assumption::

    elapsed = command_latency + data_bytes / bandwidth

charged once per mailbox command, while the PSP is busy (commands are
serialised, so the cost also delays every other caller). ``data_bytes`` is the
guest data the command encrypts, decrypts or measures (LAUNCH_UPDATE_*,
LAUNCH_SECRET, SEND/RECEIVE_UPDATE_*, DBG_*); other commands cost only the
latency. Benchmarks that set it must print the values they used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class PspCostModel:
    command_latency: float = 0.0
    """Seconds per mailbox command on top of its data (0: none)."""
    bandwidth: float = 0.0
    """Bytes of guest data per second through the PSP's crypto engine (0: unlimited)."""

    def __post_init__(self) -> None:
        for name in ("command_latency", "bandwidth"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"PspCostModel.{name} must be a finite number >= 0, not {value!r}")

    @property
    def enabled(self) -> bool:
        return self.command_latency > 0 or self.bandwidth > 0

    def cost(self, data_bytes: int) -> float:
        """Seconds one command that processes ``data_bytes`` of guest data takes."""
        transfer = data_bytes / self.bandwidth if self.bandwidth else 0.0
        return self.command_latency + transfer


NO_COST = PspCostModel()
"""The default: the emulation adds no delay of its own."""
