"""What the guest runs after boot, chosen by ``workload=`` on the kernel command line.

* ``idle`` — sleeps on a slow tick.
* ``dirty`` — writes pages at a set rate over a working set; self-checks on NMI.
* ``kv`` — a key-value store in guest RAM behind the kv device.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from confmig.guest.kernel import Workload
from confmig.guest.workloads import dirty, idle, kv

WORKLOADS: Mapping[str, Workload] = MappingProxyType(
    {w.name: w for w in (idle.WORKLOAD, dirty.WORKLOAD, kv.WORKLOAD)}
)
