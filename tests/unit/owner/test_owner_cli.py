"""``confmig owner``: option parsing and refusals before anything is served."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from confmig.owner import DISK_PASSPHRASE_GUID, AmdRoot
from confmig.owner.cli import build_profile, owner, parse_listen, parse_policy, parse_secret


def test_parse_secret(tmp_path: Path) -> None:
    guid = str(DISK_PASSPHRASE_GUID)
    assert parse_secret(f"{guid}=00ff") == (DISK_PASSPHRASE_GUID, b"\x00\xff")
    key = tmp_path / "key"
    key.write_bytes(b"raw key bytes\n")
    assert parse_secret(f"{guid}=@{key}") == (DISK_PASSPHRASE_GUID, b"raw key bytes\n")
    for bad, error in (
        ("nope=00", "bad GUID"),
        (guid, "expected GUID=HEX"),
        (f"{guid}=0g", "not hexadecimal"),
        (f"{guid}=@{tmp_path / 'missing'}", "cannot read"),
    ):
        with pytest.raises(click.BadParameter, match=error):
            parse_secret(bad)


def test_parse_policy_and_listen() -> None:
    assert parse_policy("0x5") == 5 and parse_policy("7") == 7
    for bad in ("x", "-1", "0x100000000"):
        with pytest.raises(click.BadParameter):
            parse_policy(bad)
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    for bad in ("8080", ":80", "h:", "h:99999", "h:x"):
        with pytest.raises(click.BadParameter):
            parse_listen(bad)


def test_build_profile(tmp_path: Path) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\xf0" * 8192)
    digest = hashlib.sha256(fw.read_bytes()).digest()
    by_image = build_profile(firmware=str(fw), firmware_digest=None, policy=1, secrets=())
    by_digest = build_profile(firmware=None, firmware_digest=digest.hex(), policy=1,
                              secrets=(f"{uuid.UUID(int=1)}=aa",))
    assert by_image.expected == by_digest.expected
    assert by_digest.secrets == ((uuid.UUID(int=1), b"\xaa"),)
    with pytest.raises(click.UsageError, match="exactly one"):
        build_profile(firmware=str(fw), firmware_digest=digest.hex(), policy=1, secrets=())
    with pytest.raises(click.UsageError, match="exactly one"):
        build_profile(firmware=None, firmware_digest=None, policy=1, secrets=())
    with pytest.raises(click.BadParameter, match="32 bytes"):
        build_profile(firmware=None, firmware_digest="00" * 31, policy=1, secrets=())
    with pytest.raises(click.BadParameter, match="twice"):
        build_profile(firmware=str(fw), firmware_digest=None, policy=1,
                      secrets=(f"{uuid.UUID(int=1)}=aa", f"{uuid.UUID(int=1)}=bb"))


def test_digest_command(tmp_path: Path) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\x01" * 4096)
    result = CliRunner().invoke(owner, ["digest", str(fw)])
    assert result.exit_code == 0 and result.output.strip() == hashlib.sha256(b"\x01" * 4096).hexdigest()


def test_serve_refuses_bad_configuration_before_listening(amd_root_dir: Path, root: AmdRoot,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["serve", "--amd-root", str(amd_root_dir), "--firmware-digest", "00" * 32, "--policy", "0x1"]
    runner = CliRunner()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the default root: not created yet
    missing = runner.invoke(owner, ["serve", "--firmware-digest", "00" * 32, "--policy", "1"])
    assert missing.exit_code == 1 and str(tmp_path / "state" / "confmig" / "amd-root") in missing.output
    pinned = runner.invoke(owner, [*base, "--ark-hash", "00" * 48])
    assert pinned.exit_code == 1 and "not the pinned one" in pinned.output
    not_a_root = runner.invoke(owner, [*base[:2], str(tmp_path), *base[3:]])
    assert not_a_root.exit_code == 1 and "cannot read" in not_a_root.output
    bad_policy = runner.invoke(owner, [*base[:-1], "high"])
    assert bad_policy.exit_code == 2 and "expected an integer" in bad_policy.output
