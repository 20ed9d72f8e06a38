"""A VM as its owner configured it: the launch it expects, and the secrets it releases after.

Secrets are keyed by GUID, as entries of the SEV secret table
(:mod:`confmig.owner.secret_table`). Two GUIDs have a meaning here:

* :data:`DISK_PASSPHRASE_GUID`, the entry GRUB's ``efisecret`` (and Coconut
  SVSM) read as the disk encryption passphrase;
* :data:`MIGRATION_TRANSPORT_KEY_GUID`, confmig's own: the guest's transport key,
  from which its Migration Handler derives the key of each migration (``PROTOCOLS.md`` §6).

A migration target gets none of these: its VMM says so at the launch
(``migration_target``), and if the launch is the expected one the owner releases
only a fresh 16-byte ticket and the ticket's key (:meth:`VmProfile.target_secret_table`):
HKDF-SHA256 of the guest's transport key, salt the ticket, info
``proto.mailbox.TICKET_KDF_INFO``. The source's Migration Handler derives the same key from
the ticket the target published; a stream sealed under it opens on that target
only, and no other launch ever gets that key: a recorded stream replayed to a
second target, or a saved one restored later, finds no key that opens it. The
guest's own secrets reach the target with its memory. An owner who allows the
2021 RFC's version 1 (:data:`MIGRATION_V1_ALLOWED_GUID`), which has no tickets,
also releases the guest's own transport key to targets, and with it the
clones that version allows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confmig.owner.measurement import ExpectedLaunch
from confmig.owner.secret_table import build_secret_table
from confmig.platform.psp.secret import Secret
from confmig.proto import mailbox as mb

DISK_PASSPHRASE_GUID: Final = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
MIGRATION_TRANSPORT_KEY_GUID: Final = uuid.UUID("6845d1fd-39d8-45ee-b008-6e296a740351")
MIGRATION_V1_ALLOWED_GUID: Final = uuid.UUID("d5b06470-c9eb-4c99-9417-3fecd60130a0")
MIGRATION_TICKET_GUID: Final = uuid.UUID("5940d2e7-9131-426a-9238-6c50e7597a32")
MIGRATION_TARGET_KEY_GUID: Final = uuid.UUID("b67640d0-3d72-4b73-b844-f508029ada6f")
TICKET_SIZE: Final = 16
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

    @property
    def migratable(self) -> bool:
        """The guest has a transport key: it may migrate, and targets may be launched for it."""
        return any(guid == MIGRATION_TRANSPORT_KEY_GUID for guid, _ in self.secrets)

    def ticket_key(self, ticket: bytes) -> bytes:
        """The key of one migration ticket, what that ticket's target alone is given."""
        master = dict(self.secrets).get(MIGRATION_TRANSPORT_KEY_GUID)
        if master is None or len(ticket) != TICKET_SIZE:
            raise ValueError("a migration target needs the guest's transport key and a 16-byte ticket")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=ticket, info=mb.TICKET_KDF_INFO).derive(master)

    def target_secret_table(self, ticket: bytes) -> bytes:
        """A migration target's secret: ``ticket`` and its key (and, where the owner allows
        version 1, the guest's transport key and that permission)."""
        entries = dict(self.secrets)
        key = self.ticket_key(ticket)
        table = [(MIGRATION_TICKET_GUID, ticket), (MIGRATION_TARGET_KEY_GUID, key)]
        if MIGRATION_V1_ALLOWED_GUID in entries:
            table += [(MIGRATION_TRANSPORT_KEY_GUID, entries[MIGRATION_TRANSPORT_KEY_GUID]),
                      (MIGRATION_V1_ALLOWED_GUID, entries[MIGRATION_V1_ALLOWED_GUID])]
        return build_secret_table(table)
