"""PSP test fixtures: one AMD root and one host identity per session (key generation is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest
from psp_fakes import Platform, make_identity

from confmig.platform.psp import PlatformIdentity


@pytest.fixture(scope="session")
def amd_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("amd-root")


@pytest.fixture(scope="session")
def identity(tmp_path_factory: pytest.TempPathFactory, amd_root_dir: Path) -> PlatformIdentity:
    return make_identity(tmp_path_factory.mktemp("host-a"), amd_root_dir)


@pytest.fixture(scope="session")
def other_identity(tmp_path_factory: pytest.TempPathFactory, amd_root_dir: Path) -> PlatformIdentity:
    """A second host of the same installation: same AMD root, its own CEK, OCA, PEK, PDH."""
    return make_identity(tmp_path_factory.mktemp("host-b"), amd_root_dir)


@pytest.fixture(scope="session")
def foreign_identity(tmp_path_factory: pytest.TempPathFactory) -> PlatformIdentity:
    """A host certified by another AMD root (another installation)."""
    return make_identity(tmp_path_factory.mktemp("host-x"), tmp_path_factory.mktemp("other-amd-root"))


@pytest.fixture
def platform(identity: PlatformIdentity) -> Platform:
    return Platform.build(identity)


@pytest.fixture
def booted(platform: Platform) -> Platform:
    platform.boot()
    return platform
