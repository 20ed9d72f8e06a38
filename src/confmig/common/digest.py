"""The digest of a tree of Python sources: what the firmware image states of its guest code and
what a vCPU process checks before it runs that code (one algorithm, so the two agree)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path


def source_tree_digest(root: Path) -> bytes:
    """SHA-256 over every ``*.py`` under ``root`` in order of relative path: for each, u32 name
    length, u32 data length, the name (POSIX, relative), the bytes. ValueError if none."""
    sources = sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
    if not sources:
        raise ValueError(f"no Python sources under {root}")
    h = hashlib.sha256()
    for path in sources:
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(struct.pack("<II", len(name), len(data)) + name + data)
    return h.digest()
