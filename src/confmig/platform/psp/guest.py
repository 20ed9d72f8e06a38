"""A guest context inside the PSP: everything the firmware keeps per guest handle."""

from __future__ import annotations

import hashlib

from confmig.common.units import Spa
from confmig.platform.psp.handles import Asid, GuestHandle
from confmig.platform.psp.policy import GuestPolicy, PolicyFlag
from confmig.platform.psp.secret import Secret
from confmig.platform.psp.session import TransportKeys
from confmig.platform.psp.states import GuestState


class GuestContext(Secret):
    """Mutable; owned by :class:`~confmig.platform.psp.psp.SecureProcessor`, never handed out."""

    __slots__ = (
        "_digest",
        "active",
        "asid",
        "channel",
        "handle",
        "launch_digest",
        "measurement",
        "pending",
        "policy",
        "state",
        "vek",
        "vmsa_crc_blocks",
    )

    def __init__(self, *, handle: GuestHandle, policy: int, vek: bytes, channel: TransportKeys) -> None:
        self.handle = handle
        self.policy = policy
        self.state = GuestState.INVALID
        self.vek = vek
        self.asid = Asid(0)
        self.active = False  # bound to an ASID and runnable
        self.pending = False  # bound to an ASID, runnable once the launch finishes
        self.channel: TransportKeys | None = channel
        self.measurement = b""  # LAUNCH_MEASURE's MAC, bound into LAUNCH_SECRET's packet MAC
        self._digest = hashlib.sha256()
        self.launch_digest = b""
        self.vmsa_crc_blocks: list[Spa] = []

    @property
    def es(self) -> bool:
        return PolicyFlag.ES in GuestPolicy.from_u32(self.policy)

    @property
    def inactive(self) -> bool:
        return not (self.active or self.pending)

    def measure(self, data: bytes) -> None:
        self._digest.update(data)

    def finish_digest(self) -> bytes:
        self.launch_digest = self._digest.digest()
        return self.launch_digest
