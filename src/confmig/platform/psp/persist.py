"""The PSP's persistent storage (the firmware keeps it in SPI flash; we keep files).

A state file is one JSON document::

    {"magic": "confmig-psp", "kind": KIND, "version": 1, "crc32": CRC, "payload": {...}}

with the CRC-32 over the canonical JSON of the payload, a size cap, and mode
0600. Files are created exclusively and atomically (written to a temporary
name, then hard-linked into place), so two hosts creating the installation's
shared AMD root at once agree on one: the loser reads the winner's file.
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from confmig.common.errors import ConfigError

MAGIC: Final = "confmig-psp"
FORMAT_VERSION: Final = 1
MAX_STATE_FILE: Final = 256 * 1024  # an identity is ~25 KB with 4096-bit AMD keys
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


def _canonical(payload: Mapping[str, str]) -> bytes:
    return json.dumps(dict(payload), sort_keys=True, separators=(",", ":")).encode()


def ensure_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def create_state_file(path: Path, kind: str, payload: Mapping[str, str]) -> bool:
    """Create ``path`` with ``payload`` unless it exists. Returns False if it already existed."""
    ensure_dir(path.parent)
    document = {
        "magic": MAGIC,
        "kind": kind,
        "version": FORMAT_VERSION,
        "crc32": zlib.crc32(_canonical(payload)),
        "payload": dict(payload),
    }
    data = json.dumps(document, sort_keys=True, indent=1).encode()
    if len(data) > MAX_STATE_FILE:
        raise ValueError(f"state file {path.name} would exceed {MAX_STATE_FILE} bytes")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # independent of the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_state_file(path: Path, kind: str) -> dict[str, str]:
    """The payload of ``path``; ``ConfigError`` if it is missing, too big, or corrupt."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read PSP state file {path}: {exc.strerror}") from exc
    if len(data) > MAX_STATE_FILE:
        raise ConfigError(f"PSP state file {path} is larger than {MAX_STATE_FILE} bytes")
    try:
        document = json.loads(data)
        payload = document["payload"]
        ok = (
            document["magic"] == MAGIC
            and document["kind"] == kind
            and document["version"] == FORMAT_VERSION
            and isinstance(payload, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in payload.items())
            and document["crc32"] == zlib.crc32(_canonical(payload))
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"PSP state file {path} is corrupt") from exc
    if not ok:
        raise ConfigError(f"PSP state file {path} is corrupt or of another kind/version")
    return dict(payload)
