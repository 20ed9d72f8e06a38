"""A VM as its owner configured it: the launch it expects, and the secrets it releases after.

Secrets are keyed by GUID, as entries of the SEV secret table
(:mod:`confmig.owner.secret_table`). Two GUIDs have a meaning here:

* :data:`DISK_PASSPHRASE_GUID`, the entry GRUB's ``efisecret`` (and Coconut
  SVSM) read as the disk encryption passphrase;
* :data:`MIGRATION_TRANSPORT_KEY_GUID`, confmig's own: the transport key the
  Migration Handlers of a migrating guest share (``PROTOCOLS.md`` §6).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from confmig.owner.measurement import ExpectedLaunch
from confmig.owner.secret_table import build_secret_table
from confmig.platform.psp.secret import Secret

DISK_PASSPHRASE_GUID: Final = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
MIGRATION_TRANSPORT_KEY_GUID: Final = uuid.UUID("6845d1fd-39d8-45ee-b008-6e296a740351")
ANY_VM: Final = "*"
"""The profile name that applies to every VM without a profile of its own."""


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class VmProfile(Secret):
    """The expected launch, and the secret table released when a launch matches it."""

    expected: ExpectedLaunch
    secrets: tuple[tuple[uuid.UUID, bytes], ...] = field(default=())

    def __post_init__(self) -> None:
        guids = [guid for guid, _ in self.secrets]
        if len(set(guids)) != len(guids):
            raise ValueError("a secret GUID appears twice")
        build_secret_table(self.secrets)  # fits in one LAUNCH_SECRET, or ValueError now rather than at launch

    @classmethod
    def build(
        cls, *, digest: bytes, policy: int, secrets: Iterable[tuple[uuid.UUID, bytes]] = ()
    ) -> VmProfile:
        return cls(expected=ExpectedLaunch(digest=digest, policy=policy), secrets=tuple(secrets))

    @property
    def policy(self) -> int:
        return self.expected.policy

    def secret_table(self) -> bytes:
        return build_secret_table(self.secrets)
