"""The firmware image (``-bios``), as the VMM handles it: mapped below 4 GiB like
QEMU maps OVMF's flash, and read for its OVMF GUIDed table
(:mod:`confmig.proto.ovmf_table`), from which QEMU learns where the SEV secret
area is (``pc_system_ovmf_table_find``) and confmig where the Migration Handler
starts and where its mailbox is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confmig.common.errors import ConfigError
from confmig.common.units import PAGE_SIZE, GiB, MiB
from confmig.proto import ovmf_table
from confmig.proto.ovmf_table import MigrationHandlerBlock

MAX_IMAGE_SIZE = 16 * MiB
"""QEMU's flash region below 4 GiB is bounded; so is ours."""


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    data: bytes
    table: dict[uuid.UUID, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> FirmwareImage:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"-bios: cannot read {path}: {exc.strerror}") from None
        if not data or len(data) > MAX_IMAGE_SIZE or len(data) % PAGE_SIZE:
            raise ConfigError(f"-bios: {path}: size {len(data)} is not a multiple of 4 KiB up to 16 MiB")
        return cls(data, ovmf_table.parse_table(data))

    @property
    def gpa(self) -> int:
        """Mapped so that it ends at 4 GiB, as pflash is."""
        return 4 * GiB - len(self.data)

    def secret_area(self) -> tuple[int, int] | None:
        """(GPA, size) of the SEV secret area, if the firmware declares one."""
        return ovmf_table.secret_area(self.table)

    def migration_handler(self) -> MigrationHandlerBlock | None:
        """The Migration Handler the image declares, if any (version 0 or no entry: none)."""
        return ovmf_table.migration_handler(self.table)
