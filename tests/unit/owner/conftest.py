"""Owner test fixtures: two installations (AMD roots), hosts under them, the owner's trusted root.

Key generation is the slow part: everything here is made once per session,
with 2048-bit AMD keys (the format and the checks are those of 4096).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from owner_fakes import Platform, make_identity

from confmig.owner import AmdRoot
from confmig.platform.psp import PlatformIdentity


@pytest.fixture(scope="session")
def amd_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("owner-amd-root")


@pytest.fixture(scope="session")
def identity(tmp_path_factory: pytest.TempPathFactory, amd_root_dir: Path) -> PlatformIdentity:
    return make_identity(tmp_path_factory.mktemp("owner-host-a"), amd_root_dir)


@pytest.fixture(scope="session")
def sibling(tmp_path_factory: pytest.TempPathFactory, amd_root_dir: Path) -> PlatformIdentity:
    """Another host of the same installation."""
    return make_identity(tmp_path_factory.mktemp("owner-host-b"), amd_root_dir)


@pytest.fixture(scope="session")
def foreign_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("foreign-amd-root")


@pytest.fixture(scope="session")
def foreign(tmp_path_factory: pytest.TempPathFactory, foreign_root_dir: Path) -> PlatformIdentity:
    """A host of another installation: its chain leads to another AMD root."""
    return make_identity(tmp_path_factory.mktemp("owner-host-x"), foreign_root_dir)


@pytest.fixture(scope="session")
def root(amd_root_dir: Path, identity: PlatformIdentity) -> AmdRoot:
    return AmdRoot.load(amd_root_dir)


@pytest.fixture
def booted(identity: PlatformIdentity) -> Platform:
    platform = Platform.build(identity)
    platform.boot()
    return platform
