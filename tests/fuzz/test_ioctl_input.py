"""Hostile frames on the ioctl channel (a VMM's socket to its host) and hostile payloads of
every ioctl struct the host or a vCPU process decodes.

The frame reader either returns a request, refuses an oversized one whole
(``RequestTooLarge``: the framing survives, the host answers ``-E2BIG``), or raises
``ProtocolError``; the descriptors that came with a frame it refuses are closed, and it holds
no more memory than the bound, whatever the header claims. The live host's side (it keeps
serving, leaks nothing) is in ``test_serving_processes``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import pytest
from hostile import budget, open_fds
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import ProtocolError
from confmig.kvm import channel
from confmig.proto import ioctl

pytestmark = pytest.mark.fuzz

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
requests = st.one_of(st.sampled_from(sorted(ioctl.NAMES)), u32)
MAX = 256
"""The receiver's payload bound in these tests (the host's is ``kvm.host.MAX_REQUEST_PAYLOAD``)."""


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, int]:
    """(bytes, descriptors to send with them): a header that may lie about everything."""
    payload = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, 80), st.integers(MAX + 1, MAX + 600),
                            st.sampled_from([ioctl.MAX_PAYLOAD + 1, 2**32 - 1])))
    if MAX < length <= MAX + 600 and draw(st.booleans()):
        payload = payload.ljust(length, b"\0")  # an oversized request sent whole: skipped, answered
    nfds = draw(st.integers(0, ioctl.MAX_FDS + 2))
    sent = draw(st.one_of(st.just(nfds), st.integers(0, ioctl.MAX_FDS + 2)))
    head = struct.pack("<IIII", length, draw(requests), draw(u32), nfds)
    cut = draw(st.one_of(st.none(), st.integers(0, 15)))
    return (head + payload)[:cut] if cut is not None else head + payload, sent


@budget(80)
@given(st.lists(frames(), min_size=1, max_size=6))
def test_any_frames_are_requests_refusals_or_a_protocol_error_and_no_fd_leaks(
    sequence: list[tuple[bytes, int]],
) -> None:
    before = open_fds(os.getpid())
    host, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with host, vmm:
        for data, nfds in sequence:
            fds = [os.memfd_create("fuzz", os.MFD_CLOEXEC) for _ in range(nfds)]
            try:
                if fds:
                    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))
                    vmm.sendmsg([data[:1]], [rights])
                    vmm.sendall(data[1:])
                elif data:
                    vmm.sendall(data)
            except OSError:  # sendmsg of fds with nothing to carry them
                pass
            finally:
                for fd in fds:
                    os.close(fd)
        vmm.shutdown(socket.SHUT_WR)
        outcomes = []
        while True:
            try:
                req, fds = channel.recv_request(host, max_payload=MAX)
            except channel.RequestTooLarge as exc:
                assert "exceeds the 256-byte limit" in str(exc)
                outcomes.append("too large")
                continue
            except (ProtocolError, channel.ChannelClosed):
                break
            assert len(req.payload) <= MAX and len(fds) == req.nfds <= ioctl.MAX_FDS
            outcomes.append(ioctl.name(req.request))
            for fd in fds:
                os.close(fd)
    assert open_fds(os.getpid()) == before


def test_an_oversized_request_is_skipped_and_the_next_one_read() -> None:
    host, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with host, vmm:
        big = ioctl.Request(ioctl.KVM_CLEAR_DIRTY_LOG, 7, bytes(MAX + 1))
        channel.send_request(vmm, big)
        channel.send_request(vmm, ioctl.Request(ioctl.KVM_GET_API_VERSION, 8))
        with pytest.raises(channel.RequestTooLarge) as refused:
            channel.recv_request(host, max_payload=MAX)
        assert (refused.value.request, refused.value.seq) == (ioctl.KVM_CLEAR_DIRTY_LOG, 7)
        req, _ = channel.recv_request(host, max_payload=MAX)
        assert (req.request, req.seq) == (ioctl.KVM_GET_API_VERSION, 8)


def test_descriptors_of_a_frame_cut_short_are_closed() -> None:
    """Found while writing the property above: a header that brought descriptors, then EOF
    inside its payload, left them open in the host."""
    before = open_fds(os.getpid())
    host, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with host, vmm:
        fd = os.memfd_create("fuzz")
        head = struct.pack("<IIII", 32, ioctl.KVM_SET_USER_MEMORY_REGION, 1, 1)
        vmm.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        vmm.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="EOF before its 32-byte payload"):
            channel.recv_request(host)
    assert open_fds(os.getpid()) == before


# --- payloads ---------------------------------------------------------------------------------


@budget(60)
@given(st.binary(min_size=16, max_size=16))
def test_headers_are_bounded_or_refused(head: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        length, _request, _seq, nfds = ioctl.decode_request_header(head)
        assert length <= ioctl.MAX_PAYLOAD and nfds <= ioctl.MAX_FDS
    with contextlib.suppress(ProtocolError):
        assert ioctl.decode_reply_header(head)[0] <= ioctl.MAX_PAYLOAD


def counted_array(entry: int, limit: int) -> st.SearchStrategy[bytes]:
    """``u32 count | u32 pad | entries`` with a count that may lie."""
    return st.builds(lambda n, pad, body: struct.pack("<I", n) + pad + body,
                     st.one_of(st.integers(0, 4), st.sampled_from([limit, limit + 1, 2**32 - 1])),
                     st.binary(min_size=0, max_size=4), st.binary(max_size=4 * entry))


@budget(60)
@given(st.one_of(st.binary(max_size=120), counted_array(40, 256), counted_array(16, 256),
                 counted_array(4, 64)))
def test_struct_payloads_decode_or_are_protocol_errors(payload: bytes) -> None:
    decoders = (ioctl.UserspaceMemoryRegion.decode, ioctl.EnableCap.decode, ioctl.decode_cpuid,
                ioctl.decode_msr_filter, ioctl.decode_msrs, ioctl.RunRequest.decode, ioctl.decode_exit)
    for decode in decoders:
        with contextlib.suppress(ProtocolError):
            decode(payload)
    with contextlib.suppress(ProtocolError):
        assert ioctl.UserspaceMemoryRegion.decode(payload).encode() == payload
    with contextlib.suppress(ProtocolError):
        assert len(ioctl.decode_cpuid(payload)) <= 256
    with contextlib.suppress(ProtocolError):
        assert len(ioctl.decode_msr_filter(payload)) <= 64
