"""The CPR state codec: what goes in comes out, and any corruption or overlong message is refused."""

from __future__ import annotations

import pytest

from confmig.proto import cpr

STATE = cpr.CprState(fds=(cpr.CprFd(kind=cpr.FdKind.RAM, name="pc.ram", size=1 << 30),
                          cpr.CprFd(kind=cpr.FdKind.RAM, name="pc.bios", size=1 << 20),
                          cpr.CprFd(kind=cpr.FdKind.VM), cpr.CprFd(kind=cpr.FdKind.MIRROR_VM)),
                     sev_handle=7)


def split(data: bytes) -> tuple[bytes, bytes]:
    return data[: cpr.HEADER.size], data[cpr.HEADER.size :]


def test_a_state_round_trips() -> None:
    data = cpr.encode(STATE)
    head, rest = split(data)
    n, want = cpr.decode_header(head)
    assert n == 4 and want == len(rest)
    got = cpr.decode(head, rest)
    assert got == STATE
    assert got.index(cpr.FdKind.VM) == 2 and got.index(cpr.FdKind.MIRROR_VM) == 3
    assert [e.name for _, e in got.ram()] == ["pc.ram", "pc.bios"]


def test_every_flipped_byte_is_refused() -> None:
    data = cpr.encode(STATE)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        head, rest = split(bytes(bad))
        with pytest.raises(cpr.CprError):
            cpr.decode(head, rest)


def test_truncation_and_bounds_are_refused() -> None:
    head, rest = split(cpr.encode(STATE))
    with pytest.raises(cpr.CprError, match="bytes after the header"):
        cpr.decode(head, rest[:-1])
    too_many = cpr.HEADER.pack(cpr.MAGIC, cpr.VERSION, cpr.MAX_ENTRIES + 1, 10)
    with pytest.raises(cpr.CprError, match="exceeds the bounds"):
        cpr.decode_header(too_many)
    with pytest.raises(ValueError, match="descriptors"):
        cpr.encode(cpr.CprState(fds=(cpr.CprFd(kind=cpr.FdKind.VM),) * (cpr.MAX_ENTRIES + 1)))
    with pytest.raises(cpr.CprError, match="2 descriptors of kind VM"):
        cpr.CprState(fds=(cpr.CprFd(kind=cpr.FdKind.VM),) * 2).index(cpr.FdKind.VM)
