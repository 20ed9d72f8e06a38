"""The SEV secret table (OVMF / Linux efi_secret layout): golden bytes and bounds."""

from __future__ import annotations

import pickle
import uuid

import pytest

from confmig.owner import DISK_PASSPHRASE_GUID, SECRET_TABLE_HEADER_GUID, VmProfile, build_secret_table

# Written out by hand from the layout, not from the code: GUIDs in EFI byte order
# (the first three fields little-endian), lengths u32 little-endian.
HEADER_GUID_LE = "42f5741e" "dd71" "664d" "963eef4287ff173b"
DISK_GUID_LE = "e5696873" "f084" "7349" "92ec06879ce3da0b"
OTHER = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
OTHER_LE = "33221100" "5544" "7766" "8899aabbccddeeff"


def test_golden_one_entry() -> None:
    table = build_secret_table([(DISK_PASSPHRASE_GUID, b"key")])
    expected = (
        HEADER_GUID_LE + "2b000000"  # 20 + 23 = 43
        + DISK_GUID_LE + "17000000" + b"key".hex()  # 20 + 3 = 23
        + "00" * 5  # padded to 48
    )
    assert table.hex() == expected


def test_golden_two_entries_back_to_back() -> None:
    table = build_secret_table([(DISK_PASSPHRASE_GUID, b"\xaa" * 12), (OTHER, b"")])
    expected = (
        HEADER_GUID_LE + "48000000"  # 20 + 32 + 20 = 72
        + DISK_GUID_LE + "20000000" + "aa" * 12
        + OTHER_LE + "14000000"
        + "00" * 8  # 72 -> 80
    )
    assert table.hex() == expected


def test_an_empty_table_is_a_padded_header() -> None:
    assert build_secret_table([]) == SECRET_TABLE_HEADER_GUID.bytes_le + b"\x14\0\0\0" + bytes(12)


@pytest.mark.parametrize("size", [0, 1, 11, 12, 13, 27, 28, 29])
def test_always_padded_to_16(size: int) -> None:
    table = build_secret_table([(OTHER, b"x" * size)])
    assert len(table) % 16 == 0 and int.from_bytes(table[16:20], "little") == 40 + size
    assert table[40 + size :] == bytes(len(table) - 40 - size)


def test_one_launch_secret_at_most() -> None:
    assert len(build_secret_table([(OTHER, bytes(0x5000 - 40))])) == 0x5000
    with pytest.raises(ValueError, match="at most 20480"):
        build_secret_table([(OTHER, bytes(0x5000 - 39))])
    with pytest.raises(ValueError, match="at most"):
        VmProfile.build(digest=bytes(32), policy=0, secrets=[(OTHER, bytes(0x5000))])


def test_a_profile_has_each_guid_once_and_never_shows_its_secrets() -> None:
    with pytest.raises(ValueError, match="twice"):
        VmProfile.build(digest=bytes(32), policy=0, secrets=[(OTHER, b"a"), (OTHER, b"b")])
    profile = VmProfile.build(digest=bytes(32), policy=0, secrets=[(OTHER, b"hunter2")])
    assert "hunter2" not in repr(profile) and "redacted" in repr(profile)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(profile)
