"""The guest code image: every program the vCPUs may execute, at its instruction addresses."""

from __future__ import annotations

from confmig.guest import kernel
from confmig.guest.firmware import boot
from confmig.guest.workloads import WORKLOADS
from confmig.platform.cpu.abi import RomRegion


def rom() -> list[RomRegion]:
    """Firmware (holding the reset vector), kernel, and one region per workload."""
    return [
        boot.REGION,
        kernel.kernel_region(WORKLOADS),
        *(kernel.task_region(w) for w in WORKLOADS.values()),
    ]
