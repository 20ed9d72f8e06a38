"""Two hosts of one installation (same emulated AMD root, their own identities)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sev_hosts import SevHost

from confmig.platform.psp import PlatformIdentity

ROMS = Path(__file__).parent / "roms"
os.environ["PYTHONPATH"] = os.pathsep.join(  # guest programs the vCPU processes can import
    p for p in (str(ROMS), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def kvm_amd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvm-amd-root")


def _identity(tmp_path_factory: pytest.TempPathFactory, root: Path, name: str) -> PlatformIdentity:
    # 2048-bit AMD keys keep the tests fast; the format and checks are those of 4096.
    return PlatformIdentity.load_or_create(
        tmp_path_factory.mktemp(name), amd_root_dir=root, amd_key_bits=2048
    )


@pytest.fixture(scope="session")
def identity_a(tmp_path_factory: pytest.TempPathFactory, kvm_amd_root: Path) -> PlatformIdentity:
    return _identity(tmp_path_factory, kvm_amd_root, "kvm-host-a")


@pytest.fixture(scope="session")
def identity_b(tmp_path_factory: pytest.TempPathFactory, kvm_amd_root: Path) -> PlatformIdentity:
    return _identity(tmp_path_factory, kvm_amd_root, "kvm-host-b")


@pytest.fixture
def host_a(identity_a: PlatformIdentity) -> Iterator[SevHost]:
    host = SevHost(identity_a, spa_base=0x1_0000_0000)
    yield host
    host.close()


@pytest.fixture
def host_b(identity_b: PlatformIdentity) -> Iterator[SevHost]:
    host = SevHost(identity_b, spa_base=0x7_4020_0000)  # another host: other physical addresses
    yield host
    host.close()
