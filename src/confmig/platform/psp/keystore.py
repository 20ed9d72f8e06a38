"""How the PSP fills the memory controller's key slots: one VEK per ASID.

ACTIVATE installs a guest's VEK in the slot of its ASID (the firmware's
``set_umc_key``); DEACTIVATE, DECOMMISSION and SHUTDOWN empty it. The PSP also
marks the slot runnable while the guest on it may run (RUNNING or SUPDATE, and
activated): the cores refuse VMRUN with any other ASID. The slots
themselves belong to the memory-encryption engine
(:class:`confmig.platform.mee.KeySlots`, shared with the vCPU processes), which
reads them on every private access; the PSP only writes, through this port.
Nothing outside the platform is ever handed a VEK.

A VEK is 16 bytes: the firmware's UMC key seed. The engine uses it as its
AES-128 key and derives its address-tweak vectors from it.
"""

from __future__ import annotations

from typing import Protocol

VEK_SIZE = 16


class KeySlotWriter(Protocol):
    def install(self, asid: int, vek: bytes) -> None:
        """Load ``vek`` into ``asid``'s slot."""
        ...

    def clear(self, asid: int) -> None:
        """Empty ``asid``'s slot: nothing decrypts under it any more, nothing runs on it."""
        ...

    def set_runnable(self, asid: int, runnable: bool) -> None:
        """Tell the cores whether they may VMRUN with ``asid`` (whose slot holds a key)."""
        ...
