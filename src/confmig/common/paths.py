"""Where confmig keeps state on this machine (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def state_home() -> Path:
    """``$XDG_STATE_HOME/confmig`` (default ``~/.local/state/confmig``)."""
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "confmig"


def default_amd_root() -> Path:
    """The emulated AMD root of this installation, shared by all its hosts and
    trusted by its guest owners, as every real EPYC chains up to AMD's ARK."""
    return state_home() / "amd-root"


def default_host_state_dir(socket_path: str) -> Path:
    """A host's own state (its platform identity), named after its socket."""
    return state_home() / "hosts" / Path(socket_path).name
