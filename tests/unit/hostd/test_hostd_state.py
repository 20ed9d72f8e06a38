"""A host keeps its identity in the state directory across runs; one certified by an AMD root
other than the installation's is refused at start, saying what to remove."""

from __future__ import annotations

from pathlib import Path

import pytest
from psp_fakes import make_identity

from confmig.common.errors import ConfigError
from confmig.hostd.main import serve
from confmig.platform.psp.identity import AmdRootOfTrust


def test_an_identity_of_another_amd_root_is_refused_before_serving(tmp_path: Path) -> None:
    state = tmp_path / "host"
    make_identity(state, tmp_path / "old-root")
    AmdRootOfTrust.load_or_create(tmp_path / "new-root", key_bits=2048)
    sock = tmp_path / "host.sock"
    with pytest.raises(ConfigError, match=rf"certified by another AMD root .* remove {state}"):
        serve(str(sock), str(state), amd_root=str(tmp_path / "new-root"))
    assert not sock.exists()
