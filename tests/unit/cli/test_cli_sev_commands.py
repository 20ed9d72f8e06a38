"""The small SEV commands of ``confmig``: what they print is what the other side parses."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from click.testing import CliRunner
from psp_fakes import make_identity

from confmig.cli.main import cli
from confmig.guest.firmware.image import build_firmware_image
from confmig.owner.measurement import firmware_digest
from confmig.platform.psp.amd_cert import split_amd_chain
from confmig.platform.psp.identity import load_amd_certificates
from confmig.platform.psp.measure import launch_digest
from confmig.platform.psp.vmsa import RESET_REGISTERS, vmsa_image
from confmig.proto import ovmf_table
from confmig.vmm.firmware import FirmwareImage


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    return tmp_path / "confmig"


def test_firmware_installs_the_built_in_image_the_vmm_can_parse(state_home: Path) -> None:
    result = CliRunner().invoke(cli, ["firmware"])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path.parent == state_home / "firmware" and path.stat().st_size == 64 * 1024
    image = FirmwareImage.load(str(path))
    assert image.gpa == 4 * 1024**3 - 64 * 1024
    assert image.secret_area() == (0x5000, 0x1000)  # what the guest's firmware reads
    assert CliRunner().invoke(cli, ["firmware"]).output.strip() == str(path)  # content-addressed


def test_amd_certs_prints_the_chain_send_start_takes(tmp_path: Path) -> None:
    root = tmp_path / "amd-root"
    make_identity(tmp_path / "host", root)
    result = CliRunner().invoke(cli, ["amd-certs", "--amd-root", str(root)])
    assert result.exit_code == 0, result.output
    ask, ark = split_amd_chain(base64.b64decode(result.output.strip(), validate=True))
    certs = load_amd_certificates(root)
    assert (ask.to_bytes(), ark.to_bytes()) == (certs.ask.to_bytes(), certs.ark.to_bytes())


def test_amd_certs_without_a_root_is_a_clear_error(state_home: Path) -> None:
    result = CliRunner().invoke(cli, ["amd-certs"])
    assert result.exit_code == 1 and "cannot read the AMD root" in result.output


def test_owner_digest_of_an_sev_es_launch_covers_the_vmsas(tmp_path: Path) -> None:
    fw = tmp_path / "fw.fd"
    fw.write_bytes(b"\x5a" * 8192)
    plain = CliRunner().invoke(cli, ["owner", "digest", str(fw)]).output.strip()
    es = CliRunner().invoke(cli, ["owner", "digest", str(fw), "--sev-es-vcpus", "2"]).output.strip()
    assert plain == firmware_digest(fw.read_bytes()).hex()
    assert es == firmware_digest(fw.read_bytes(), sev_es_vcpus=2).hex() and es != plain


def test_owner_digest_of_an_sev_es_launch_with_mh_vcpus_covers_their_entry(tmp_path: Path) -> None:
    """A mirror VM's vCPUs are launched with the guest's: each VMSA at the image's MH entry."""
    fw = tmp_path / "fw.fd"
    fw.write_bytes(build_firmware_image())
    args = ["owner", "digest", str(fw), "--sev-es-vcpus", "1"]
    es = CliRunner().invoke(cli, args).output.strip()
    with_mh = CliRunner().invoke(cli, [*args, "--mh-vcpus", "2"]).output.strip()
    block = ovmf_table.migration_handler(ovmf_table.parse_table(fw.read_bytes()))
    assert block is not None
    expected = launch_digest([fw.read_bytes(), vmsa_image(RESET_REGISTERS),
                              *[vmsa_image({"rip": block.entry, "rflags": 2})] * 2])
    assert with_mh == expected.hex() and with_mh != es
    no_mh = tmp_path / "no-mh.fd"
    no_mh.write_bytes(b"\x5a" * 8192)
    result = CliRunner().invoke(cli, ["owner", "digest", str(no_mh), "--sev-es-vcpus", "1",
                                      "--mh-vcpus", "1"])
    assert result.exit_code == 2 and "declares no Migration Handler" in result.output
