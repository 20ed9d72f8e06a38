"""The built-in firmware image, installed where ``confmig vm`` finds it.

QEMU loads its default firmware from its data directory; confmig builds its
image from the guest code (``confmig.guest.firmware.image``) and keeps it under
the state directory, named by its content, so that every VMM of this
installation loads the same bytes and the guest owner can be told what to
expect (``confmig firmware``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from confmig.common.errors import ConfigError
from confmig.common.paths import state_home
from confmig.common.pdeathsig import child_environment

FIRMWARE_TIMEOUT = 60.0
"""Seconds for ``confmig firmware`` to build and install the image (it takes a fraction of one)."""


def default_bios() -> Path:
    """The path of the built-in firmware image, written if it is not there yet."""
    from confmig.guest.firmware.boot import FIRMWARE_VERSION
    from confmig.guest.firmware.image import build_firmware_image

    image = build_firmware_image()
    name = f"confmig-{FIRMWARE_VERSION}-{hashlib.sha256(image).hexdigest()[:16]}.fd"
    path = state_home() / "firmware" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(image)
        tmp.replace(path)  # atomic: concurrent VMMs never see half an image
    return path


def with_default_bios(args: list[str]) -> list[str]:
    """``args`` with ``-bios`` the built-in image unless one is given.

    The image is found by a child process (``confmig firmware``), so that the VMM
    process never loads guest code, as a real VMM only ever sees the firmware's bytes.
    """
    if any(a in ("-bios", "--bios", "-h", "--help", "-help") for a in args):
        return args
    try:
        found = subprocess.run([sys.executable, "-m", "confmig", "firmware"], capture_output=True, text=True,
                               check=False, env=child_environment(), timeout=FIRMWARE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"cannot install the built-in firmware image: no answer in {FIRMWARE_TIMEOUT:g} s") from None
    if found.returncode != 0:
        raise ConfigError(f"cannot install the built-in firmware image: {found.stderr.strip()}")
    return [*args, "-bios", found.stdout.strip()]
