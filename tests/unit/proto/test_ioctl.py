from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import ProtocolError
from confmig.proto import ioctl


def test_ioctl_numbers_are_kvms() -> None:
    assert ioctl.KVM_CREATE_VM == 0xAE01
    assert ioctl.KVM_RUN == 0xAE80
    assert ioctl.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert ioctl.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert ioctl.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert ioctl.KVM_ENABLE_CAP == 0x4068AEA3
    assert ioctl.KVM_GET_REGS == 0x8090AE81
    assert ioctl.KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA


exits = st.one_of(
    st.builds(ioctl.ExitIo, st.sampled_from([0, 1]), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF), st.integers(1, 100), st.binary(max_size=64)),
    st.builds(ioctl.ExitMmio, st.integers(0, 2**64 - 1), st.integers(1, 8), st.booleans(),
              st.binary(max_size=8)),
    st.builds(ioctl.ExitHypercall, st.integers(0, 2**64 - 1),
              st.tuples(*[st.integers(0, 2**64 - 1)] * 6)),
    st.builds(ioctl.ExitMsr, st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    st.builds(ioctl.ExitFailEntry, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.just(ioctl.ExitHlt()), st.just(ioctl.ExitShutdown()), st.just(ioctl.ExitIntr()),
)


@given(exits)
def test_exit_round_trip(ex: ioctl.VcpuExit) -> None:
    assert ioctl.decode_exit(ioctl.encode_exit(ex)) == ex


@given(st.binary(max_size=40))
def test_exit_decoder_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        ioctl.decode_exit(data)


def test_headers_are_bounded() -> None:
    head = ioctl.encode_request(ioctl.Request(ioctl.KVM_RUN, 1, b"x"))[:16]
    assert ioctl.decode_request_header(head) == (1, ioctl.KVM_RUN, 1, 0)
    huge = (ioctl.MAX_PAYLOAD + 1).to_bytes(4, "little") + head[4:]
    with pytest.raises(ProtocolError, match="exceeds"):
        ioctl.decode_request_header(huge)


@given(st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=8))
def test_msrs_round_trip(msrs: dict[int, int]) -> None:
    assert ioctl.decode_msrs(ioctl.encode_msrs(msrs)) == msrs
