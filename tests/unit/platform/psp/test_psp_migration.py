"""PSP-based migration between two hosts' PSPs: SEND_* on one, RECEIVE_* on the other.

The two platforms have different identities (same emulated AMD root), different
key slots and different memory; a page is re-encrypted by the source's PSP
under the transport keys and by the target's under a new VEK at another
system physical address.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import pytest
from psp_fakes import Platform

from confmig.common.units import Spa
from confmig.platform.psp import (
    ActivateRequest,
    Asid,
    DbgDecryptRequest,
    DeactivateRequest,
    DecommissionRequest,
    FirmwareVersion,
    GuestHandle,
    GuestPolicy,
    GuestState,
    GuestStatusRequest,
    PlatformIdentity,
    PlatformState,
    PlatformStatusRequest,
    PolicyFlag,
    PspConfig,
    ReceiveFinishRequest,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendCancelRequest,
    SendFinishRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateResponse,
    SendUpdateVmsaRequest,
    SevError,
    SevStatus,
    create_launch_session,
)
from confmig.platform.psp.cost import PspCostModel
from confmig.platform.psp.packet import PacketHeader
from confmig.platform.psp.vmsa import VMSA_CRC_PADDR_OFFSET, vmsa_crc

SRC_ASID, DST_ASID = 17, 40  # SEV (non-ES) ASIDs with the tests' PspConfig; deliberately different
SRC_SPA, DST_SPA = Spa(0x10000), Spa(0x23000)  # the target puts the page at another address
PAGE_A = hashlib.sha512(b"page A").digest() * 64
PAGE_B = hashlib.sha512(b"page B").digest() * 64
SRC_SPA_B, DST_SPA_B = Spa(0x11000), Spa(0x24000)


def _fails(status: SevStatus) -> AbstractContextManager[pytest.ExceptionInfo[SevError]]:
    return pytest.raises(SevError, match=f"{status.name} ")


def _state(p: Platform, handle: GuestHandle) -> GuestState:
    return p.psp.guest_status(GuestStatusRequest(handle=handle)).state


@pytest.fixture
def hosts(identity: PlatformIdentity, other_identity: PlatformIdentity) -> tuple[Platform, Platform]:
    src, dst = Platform.build(identity), Platform.build(other_identity)
    src.boot()
    dst.boot()
    return src, dst


def _send_page(src: Platform, handle: GuestHandle, spa: Spa, length: int = 4096) -> SendUpdateResponse:
    return src.psp.send_update_data(
        SendUpdateDataRequest(handle=handle, hdr_len=52, guest_paddr=spa, guest_len=length, trans_len=length)
    )


def _receive_page(dst: Platform, handle: GuestHandle, packet: SendUpdateResponse, spa: Spa) -> None:
    dst.psp.receive_update_data(
        ReceiveUpdateDataRequest(
            handle=handle, hdr=packet.hdr, guest_paddr=spa, guest_len=len(packet.trans), trans=packet.trans
        )
    )


def _started(hosts: tuple[Platform, Platform], policy: int = 0) -> tuple[GuestHandle, GuestHandle]:
    """A running guest on the source, SEND_START to the target, RECEIVE_START there."""
    src, dst = hosts
    handle = src.running(policy, asid=SRC_ASID, pages={SRC_SPA: PAGE_A, SRC_SPA_B: PAGE_B})
    started = src.send_start_to(handle, dst.identity)
    return handle, dst.receive_start_from(started, src.identity, asid=DST_ASID)


# -- the whole flow ---------------------------------------------------------------


def test_a_page_migrates_to_another_host_under_a_new_key_at_another_address(
    hosts: tuple[Platform, Platform],
) -> None:
    src, dst = hosts
    handle = src.running(PolicyFlag.NODBG, asid=SRC_ASID, pages={SRC_SPA: PAGE_A})
    source_ciphertext = bytes(src.memory.raw[SRC_SPA : SRC_SPA + 4096])

    started = src.send_start_to(handle, dst.identity)
    assert (started.policy, started.session_len, len(started.session)) == (PolicyFlag.NODBG, 128, 128)
    assert _state(src, handle) is GuestState.SUPDATE
    assert src.psp.asid_runnable(Asid(SRC_ASID))  # the guest keeps running while it is sent

    packet = _send_page(src, handle, SRC_SPA)
    assert (len(packet.hdr), packet.hdr_len, len(packet.trans)) == (52, 52, 4096)
    header = PacketHeader.from_bytes(packet.hdr)
    assert header.flags == 0
    assert packet.trans not in (
        PAGE_A,
        source_ciphertext,
    )  # under the TEK: neither plaintext nor VEK ciphertext
    assert bytes(src.memory.raw[SRC_SPA : SRC_SPA + 4096]) == source_ciphertext  # sending reads only

    received = dst.receive_start_from(started, src.identity, asid=DST_ASID)
    assert _state(dst, received) is GuestState.RUPDATE
    assert not dst.psp.asid_runnable(Asid(DST_ASID))  # bound, not runnable before RECEIVE_FINISH
    _receive_page(dst, received, packet, DST_SPA)

    assert dst.memory.read_encrypted(Asid(DST_ASID), DST_SPA, 4096) == PAGE_A
    stored = bytes(dst.memory.raw[DST_SPA : DST_SPA + 4096])
    assert stored not in (PAGE_A, source_ciphertext, packet.trans)
    assert dst.keys.vek(DST_ASID) != src.keys.vek(SRC_ASID)  # RECEIVE_START drew a new VEK
    # The source's ciphertext copied to the target (other key, other address) is garbage there.
    dst.memory.raw[DST_SPA_B : DST_SPA_B + 4096] = source_ciphertext
    assert dst.memory.read_encrypted(Asid(DST_ASID), DST_SPA_B, 4096) != PAGE_A

    dst.psp.receive_finish(ReceiveFinishRequest(handle=received))
    status = dst.psp.guest_status(GuestStatusRequest(handle=received))
    assert (status.state, status.policy, status.asid) == (GuestState.RUNNING, PolicyFlag.NODBG, DST_ASID)
    assert dst.psp.asid_runnable(Asid(DST_ASID))

    src.psp.send_finish(SendFinishRequest(handle=handle))
    assert _state(src, handle) is GuestState.SENT
    with _fails(SevStatus.INVALID_GUEST_STATE):  # the channel is closed: no more packets
        _send_page(src, handle, SRC_SPA)
    src.psp.deactivate(DeactivateRequest(handle=handle))
    with _fails(SevStatus.INVALID_GUEST_STATE):  # a SENT guest never runs again here
        src.psp.activate(ActivateRequest(handle=handle, asid=Asid(SRC_ASID + 1)))
    src.psp.decommission(DecommissionRequest(handle=handle))
    assert src.psp.platform_status(PlatformStatusRequest()).state is PlatformState.INIT


def test_the_cores_may_run_a_guest_from_its_finish_to_its_send_finish(
    hosts: tuple[Platform, Platform],
) -> None:
    """What the PSP tells the cores through the key slots, at every step of both guests' lives."""
    src, dst = hosts
    src_asid, dst_asid = Asid(SRC_ASID), Asid(DST_ASID)

    def runnable(p: Platform, asid: Asid) -> bool:
        assert p.keys.runnable(asid) == p.psp.asid_runnable(asid)  # the slot says what the PSP knows
        return p.keys.runnable(asid)

    launching, _ = src.launch(0, asid=SRC_ASID)
    assert src.keys.vek(src_asid) is not None and not runnable(src, src_asid)  # LUPDATE
    src.psp.deactivate(DeactivateRequest(handle=launching))
    src.psp.decommission(DecommissionRequest(handle=launching))
    handle, received = _started(hosts)
    assert runnable(src, src_asid)  # SUPDATE: the guest runs while its pages are sent
    assert not runnable(dst, dst_asid)  # RUPDATE
    src.psp.send_cancel(SendCancelRequest(handle=handle))
    assert runnable(src, src_asid)  # RUNNING again
    src.send_start_to(handle, dst.identity)
    src.psp.send_finish(SendFinishRequest(handle=handle))
    assert _state(src, handle) is GuestState.SENT and not runnable(src, src_asid)
    assert src.keys.vek(src_asid) is not None  # still activated: only the cores refuse it
    dst.psp.receive_finish(ReceiveFinishRequest(handle=received))
    assert runnable(dst, dst_asid)
    dst.psp.deactivate(DeactivateRequest(handle=received))
    assert not runnable(dst, dst_asid)


def test_sub_page_packets_and_a_whole_scratch_buffer(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    sent, received = _started(hosts)
    small = _send_page(src, sent, Spa(SRC_SPA + 0x40), 32)
    assert len(small.trans) == 32
    _receive_page(dst, received, small, Spa(DST_SPA + 0x800))
    assert dst.memory.read_encrypted(Asid(DST_ASID), Spa(DST_SPA + 0x800), 32) == PAGE_A[0x40:0x60]
    # The firmware itself takes up to 0x5000 bytes (KVM sends one page at a time).
    src.memory.write_plain(0x30000, bytes(0x5000))
    big = _send_page(src, sent, SRC_SPA, 0x2000)
    _receive_page(dst, received, big, Spa(0x30000))
    assert dst.memory.read_encrypted(Asid(DST_ASID), Spa(0x30000), 0x2000) == PAGE_A + PAGE_B


def test_receive_start_moves_the_platform_from_init_to_working(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    assert dst.psp.platform_status(PlatformStatusRequest()).state is PlatformState.INIT
    handle = src.running(0, asid=SRC_ASID)
    dst.receive_start_from(src.send_start_to(handle, dst.identity), src.identity, asid=DST_ASID)
    status = dst.psp.platform_status(PlatformStatusRequest())
    assert (status.state, status.guest_count) == (PlatformState.WORKING, 1)


# -- what the target refuses --------------------------------------------------------


@pytest.mark.parametrize("what", ["mac", "iv", "data", "flags", "header-length", "length"])
def test_a_tampered_packet_is_refused_and_nothing_is_written(
    hosts: tuple[Platform, Platform], what: str
) -> None:
    src, dst = hosts
    sent, received = _started(hosts)
    packet = _send_page(src, sent, SRC_SPA)
    header = PacketHeader.from_bytes(packet.hdr)
    hdr, trans, guest_len = packet.hdr, packet.trans, 4096
    if what == "mac":
        hdr = replace(header, mac=bytes([header.mac[0] ^ 1]) + header.mac[1:]).to_bytes()
    elif what == "iv":
        hdr = replace(header, iv=bytes([header.iv[0] ^ 0x80]) + header.iv[1:]).to_bytes()
    elif what == "flags":
        hdr = replace(header, flags=0x2).to_bytes()  # a bit the MAC covers (bit 0 is refused below)
    elif what == "data":
        trans = trans[:100] + bytes([trans[100] ^ 1]) + trans[101:]
    elif what == "header-length":
        hdr = hdr + b"\0" * 12  # a longer buffer is read as its first 52 bytes: still the right MAC
    else:  # a consistent but shorter packet: the MAC covers the lengths and all the ciphertext
        trans, guest_len = trans[:4080], 4080
    before, writes = bytes(dst.memory.raw), dst.memory.private_writes
    request = ReceiveUpdateDataRequest(
        handle=received, hdr=hdr, guest_paddr=DST_SPA, guest_len=guest_len, trans=trans
    )
    if what == "header-length":
        dst.psp.receive_update_data(request)
        assert dst.memory.read_encrypted(Asid(DST_ASID), DST_SPA, 4096) == PAGE_A
        return
    with _fails(SevStatus.BAD_MEASUREMENT):
        dst.psp.receive_update_data(request)
    assert bytes(dst.memory.raw) == before and dst.memory.private_writes == writes
    assert _state(dst, received) is GuestState.RUPDATE  # the migration may go on


def test_a_compressed_packet_is_unsupported(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    sent, received = _started(hosts)
    packet = _send_page(src, sent, SRC_SPA)
    hdr = replace(PacketHeader.from_bytes(packet.hdr), flags=1).to_bytes()
    before = bytes(dst.memory.raw)
    with _fails(SevStatus.UNSUPPORTED):  # checked before the MAC, as the firmware does
        _receive_page(dst, received, replace(packet, hdr=hdr), DST_SPA)
    assert bytes(dst.memory.raw) == before


@pytest.mark.parametrize("cut", ["header", "data", "data-length"])
def test_a_truncated_packet_is_refused(hosts: tuple[Platform, Platform], cut: str) -> None:
    src, dst = hosts
    sent, received = _started(hosts)
    packet = _send_page(src, sent, SRC_SPA)
    hdr, trans, guest_len = packet.hdr, packet.trans, 4096
    if cut == "header":
        hdr = hdr[:51]
    elif cut == "data":
        trans = trans[:2048]  # guest_len still says 4096
    else:
        guest_len = 2048  # the data is whole, the length says half
    before, writes = bytes(dst.memory.raw), dst.memory.private_writes
    with _fails(SevStatus.INVALID_LEN):
        dst.psp.receive_update_data(
            ReceiveUpdateDataRequest(
                handle=received, hdr=hdr, guest_paddr=DST_SPA, guest_len=guest_len, trans=trans
            )
        )
    assert bytes(dst.memory.raw) == before and dst.memory.private_writes == writes


def test_a_packet_of_an_earlier_migration_is_refused(hosts: tuple[Platform, Platform]) -> None:
    """Each SEND_START draws a fresh TEK and TIK, so a recorded packet fails the next session's MAC."""
    src, dst = hosts
    sent, first = _started(hosts)
    old = _send_page(src, sent, SRC_SPA)
    _receive_page(dst, first, old, DST_SPA)
    # That migration is abandoned; the guest runs on and is migrated again, to a new target context.
    src.psp.send_cancel(SendCancelRequest(handle=sent))
    dst.psp.deactivate(DeactivateRequest(handle=first))
    dst.psp.decommission(DecommissionRequest(handle=first))
    started = src.send_start_to(sent, dst.identity)
    second = dst.receive_start_from(started, src.identity, asid=DST_ASID + 1)

    before, writes = bytes(dst.memory.raw), dst.memory.private_writes
    with _fails(SevStatus.BAD_MEASUREMENT):
        _receive_page(dst, second, old, DST_SPA)
    assert bytes(dst.memory.raw) == before and dst.memory.private_writes == writes
    fresh = _send_page(src, sent, SRC_SPA)
    assert fresh.hdr[4:20] != old.hdr[4:20]  # a new random IV for every packet
    _receive_page(dst, second, fresh, DST_SPA)
    assert dst.memory.read_encrypted(Asid(DST_ASID + 1), DST_SPA, 4096) == PAGE_A


def test_within_one_migration_a_packet_can_be_replayed_at_another_address(
    hosts: tuple[Platform, Platform],
) -> None:
    """What the SEV API does not stop (reference §1.5): the MAC covers flags, IV, lengths and
    ciphertext, not the guest address, and the firmware keeps no sequence numbers. A malicious
    host can therefore put page A's packet where page B belongs, or replay an old version of a
    page, within one migration; the target PSP accepts it. ``docs/psp.md`` lists this."""
    src, dst = hosts
    sent, received = _started(hosts)
    packet_a, packet_b = _send_page(src, sent, SRC_SPA), _send_page(src, sent, SRC_SPA_B)
    _receive_page(dst, received, packet_a, DST_SPA)
    _receive_page(dst, received, packet_a, DST_SPA_B)  # A's packet at B's address: accepted
    assert dst.memory.read_encrypted(Asid(DST_ASID), DST_SPA_B, 4096) == PAGE_A  # B's content is lost
    _receive_page(dst, received, packet_a, DST_SPA_B)  # and again: duplicates are not detected
    # Reordering: an older version of a page replayed after a newer one wins.
    _receive_page(dst, received, packet_b, DST_SPA_B)
    _receive_page(dst, received, packet_a, DST_SPA_B)
    assert dst.memory.read_encrypted(Asid(DST_ASID), DST_SPA_B, 4096) == PAGE_A
    dst.psp.receive_finish(ReceiveFinishRequest(handle=received))
    assert _state(dst, received) is GuestState.RUNNING  # nothing noticed


def test_receive_start_refuses_a_tampered_session_or_policy(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    handle = src.running(PolicyFlag.NODBG, asid=SRC_ASID)
    started = src.send_start_to(handle, dst.identity)
    pdh = src.identity.certificates.pdh.to_bytes()
    good = ReceiveStartRequest(policy=started.policy, pdh_cert=pdh, session=started.session)
    for bad in (
        replace(
            good,
            session=bytes([started.session[0x20] ^ 1]).join([started.session[:0x20], started.session[0x21:]]),
        ),
        replace(good, session=started.session[:0x60] + bytes(32)),  # POLICY_MAC
        replace(good, policy=0),  # the host may not drop NODBG in transit: POLICY_MAC covers it
        replace(good, pdh_cert=dst.identity.certificates.pdh.to_bytes()),  # not the sender's PDH
    ):
        with _fails(SevStatus.BAD_MEASUREMENT):
            dst.psp.receive_start(bad)
    for bad, status in (
        (replace(good, session=started.session[:-1]), SevStatus.INVALID_LEN),  # the session length first
        (replace(good, pdh_cert=pdh[:-1]), SevStatus.INVALID_LEN),
        (replace(good, pdh_cert=src.identity.certificates.pek.to_bytes()), SevStatus.INVALID_CERTIFICATE),
        (replace(good, handle=GuestHandle(9)), SevStatus.INVALID_GUEST),
    ):
        with _fails(status):
            dst.psp.receive_start(bad)
    assert dst.psp.platform_status(PlatformStatusRequest()).guest_count == 0
    # A session made for another platform's PDH does not open here.
    third = Platform.build(src.identity)
    third.boot()
    with _fails(SevStatus.BAD_MEASUREMENT):
        third.psp.receive_start(good)


def test_receive_start_policy_checks(hosts: tuple[Platform, Platform]) -> None:
    _src, dst = hosts
    pdh = dst.pdh()
    for policy, status in (
        (1 << 6, SevStatus.POLICY_FAILURE),  # reserved bit
        (1 << 16 | 56 << 24, SevStatus.POLICY_FAILURE),  # API 1.56 > this firmware's 1.55
        (PolicyFlag.ES, SevStatus.UNSUPPORTED),  # the target platform was not initialised with SEV-ES
    ):
        session = create_launch_session(pdh, policy=policy)  # same blob format as SEND_START's
        with _fails(status):
            dst.psp.receive_start(
                ReceiveStartRequest(policy=policy, pdh_cert=session.dh_cert, session=session.session)
            )
    # Key sharing with a guest already on the target: as for LAUNCH_START.
    noks = create_launch_session(pdh, policy=PolicyFlag.NOKS)
    first = dst.psp.receive_start(
        ReceiveStartRequest(policy=PolicyFlag.NOKS, pdh_cert=noks.dh_cert, session=noks.session)
    ).handle
    again = create_launch_session(pdh, policy=PolicyFlag.NOKS)
    with _fails(SevStatus.POLICY_FAILURE):
        dst.psp.receive_start(
            ReceiveStartRequest(
                policy=PolicyFlag.NOKS, pdh_cert=again.dh_cert, session=again.session, handle=first
            )
        )


def test_receive_update_checks_in_firmware_order(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    sent, received = _started(hosts)
    packet = _send_page(src, sent, SRC_SPA)
    good = ReceiveUpdateDataRequest(
        handle=received, hdr=packet.hdr, guest_paddr=DST_SPA, guest_len=4096, trans=packet.trans
    )
    for bad, status in (
        (replace(good, handle=GuestHandle(99)), SevStatus.INVALID_GUEST),
        (replace(good, trans=b"", guest_len=0), SevStatus.INVALID_LEN),
        (replace(good, trans=bytes(0x5010), guest_len=0x5010), SevStatus.INVALID_LEN),
        (replace(good, trans=packet.trans[:17], guest_len=17), SevStatus.INVALID_LEN),
        # The lengths come before the address.
        (replace(good, guest_paddr=Spa(DST_SPA + 8), guest_len=4095), SevStatus.INVALID_LEN),
        (replace(good, guest_paddr=Spa(DST_SPA + 8)), SevStatus.INVALID_ADDRESS),
        (replace(good, guest_paddr=Spa(1 << 40)), SevStatus.INVALID_ADDRESS),  # no such memory: after the MAC
    ):
        with _fails(status):
            dst.psp.receive_update_data(bad)
    with _fails(SevStatus.UNSUPPORTED):  # not an SEV-ES guest
        dst.psp.receive_update_vmsa(ReceiveUpdateVmsaRequest(**{f: getattr(good, f) for f in good.__slots__}))
    dst.psp.deactivate(DeactivateRequest(handle=received))
    with _fails(SevStatus.INACTIVE):
        dst.psp.receive_update_data(good)


# -- what the source refuses ----------------------------------------------------------


def test_nosend_guests_cannot_be_sent(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    handle = src.running(PolicyFlag.NOSEND, asid=SRC_ASID)
    with _fails(SevStatus.POLICY_FAILURE):
        src.send_start_to(handle, dst.identity)
    assert _state(src, handle) is GuestState.RUNNING and src.psp.asid_runnable(Asid(SRC_ASID))
    with _fails(SevStatus.INVALID_GUEST_STATE):  # no channel was opened
        _send_page(src, handle, SRC_SPA)


def test_send_start_checks_in_firmware_order(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    certs = dst.identity.certificates
    launching, _ = src.launch(0, asid=SRC_ASID)  # LUPDATE
    request = SendStartRequest(handle=launching, pdh_cert=certs.pdh.to_bytes())
    with _fails(SevStatus.INVALID_GUEST):
        src.psp.send_start(replace(request, handle=GuestHandle(77)))
    # The session length is checked before the guest's state: the query works in any state.
    with pytest.raises(SevError) as exc:
        src.psp.send_start(replace(request, session_len=0))
    assert exc.value.status is SevStatus.INVALID_LEN
    assert isinstance(exc.value.output, SendStartResponse) and exc.value.output.session_len == 128
    with _fails(SevStatus.INVALID_LEN):
        src.psp.send_start(replace(request, session_len=129))
    with _fails(SevStatus.INVALID_GUEST_STATE):
        src.psp.send_start(request)
    running = src.running(0, asid=SRC_ASID + 1)
    request = replace(request, handle=running)
    with _fails(SevStatus.INVALID_LEN):
        src.psp.send_start(replace(request, pdh_cert=request.pdh_cert[:-1]))
    pek_as_pdh = certs.pek.to_bytes()  # a certificate, but not an ECDH PDH
    with _fails(SevStatus.INVALID_CERTIFICATE):
        src.psp.send_start(replace(request, pdh_cert=pek_as_pdh))
    off_curve = bytearray(request.pdh_cert)
    off_curve[0x5C] ^= 1
    with _fails(SevStatus.INVALID_CERTIFICATE):
        src.psp.send_start(replace(request, pdh_cert=bytes(off_curve)))
    assert _state(src, running) is GuestState.RUNNING  # nothing failed half-way


def test_without_the_sev_or_domain_bit_any_pdh_is_accepted(
    hosts: tuple[Platform, Platform], foreign_identity: PlatformIdentity
) -> None:
    """The firmware checks no chain then: whoever the host names as the target gets the keys."""
    src, _dst = hosts
    handle = src.running(0, asid=SRC_ASID)
    src.psp.send_start(SendStartRequest(handle=handle, pdh_cert=foreign_identity.certificates.pdh.to_bytes()))
    assert _state(src, handle) is GuestState.SUPDATE


SEV_POLICY = PolicyFlag.SEV | 1 << 16 | 55 << 24  # migrate only to AMD-certified platforms of API >= 1.55


def test_the_sev_bit_verifies_the_targets_chain_to_the_amd_root(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    handle = src.running(SEV_POLICY, asid=SRC_ASID)
    started = src.send_start_to(handle, dst.identity)
    received = dst.receive_start_from(started, src.identity, asid=DST_ASID)
    assert dst.psp.guest_status(GuestStatusRequest(handle=received)).policy == SEV_POLICY


def _chain_request(handle: GuestHandle, target: PlatformIdentity, **changes: bytes) -> SendStartRequest:
    c = target.certificates
    request = SendStartRequest(
        handle=handle, pdh_cert=c.pdh.to_bytes(), plat_certs=c.platform_chain(), amd_certs=c.amd_chain()
    )
    return replace(request, **changes)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("foreign-amd-root", SevStatus.INVALID_CERTIFICATE),  # an ARK this chip does not trust
        ("foreign-platform", SevStatus.BAD_SIGNATURE),  # our ARK and ASK, another root's CEK
        ("pdh-of-another-host", SevStatus.BAD_SIGNATURE),  # the PEK did not sign it
        ("cek-signature", SevStatus.BAD_SIGNATURE),
        ("pek-signature", SevStatus.BAD_SIGNATURE),
        ("no-amd-certs", SevStatus.INVALID_CERTIFICATE),
        ("short-platform-chain", SevStatus.INVALID_LEN),
        ("swapped-chain", SevStatus.INVALID_CERTIFICATE),  # CEK in the PEK's place
    ],
)
def test_the_sev_bit_refuses_a_wrong_target_chain(
    hosts: tuple[Platform, Platform],
    foreign_identity: PlatformIdentity,
    case: str,
    status: SevStatus,
) -> None:
    src, dst = hosts
    handle = src.running(SEV_POLICY, asid=SRC_ASID)
    ours, foreign = dst.identity.certificates, foreign_identity.certificates
    changes: dict[str, bytes] = {}
    if case == "foreign-amd-root":
        request = _chain_request(handle, foreign_identity)
    elif case == "foreign-platform":
        request = _chain_request(handle, foreign_identity, amd_certs=ours.amd_chain())
    else:
        if case == "pdh-of-another-host":
            changes["pdh_cert"] = src.identity.certificates.pdh.to_bytes()
        elif case == "cek-signature":
            changes["plat_certs"] = _flip(ours.platform_chain(), 2 * 2084 + 0x414 + 8 + 5)
        elif case == "pek-signature":
            pek = ours.pek.to_bytes()
            cek_slot = 0x61C if ours.pek.sig2.usage == 0x1004 else 0x414
            changes["plat_certs"] = _flip(pek, cek_slot + 8 + 5) + ours.platform_chain()[2084:]
        elif case == "no-amd-certs":
            changes["amd_certs"] = b""
        elif case == "short-platform-chain":
            changes["plat_certs"] = ours.platform_chain()[:-1]
        else:
            changes["plat_certs"] = ours.cek.to_bytes() + ours.oca.to_bytes() + ours.cek.to_bytes()
        request = _chain_request(handle, dst.identity, **changes)
    with _fails(status):
        src.psp.send_start(request)
    assert foreign.ark.to_bytes() != ours.ark.to_bytes()
    assert _state(src, handle) is GuestState.RUNNING


def test_the_sev_bit_needs_a_target_api_at_least_the_policys(
    hosts: tuple[Platform, Platform], tmp_path: Path, amd_root_dir: Path
) -> None:
    src, _dst = hosts
    older = PlatformIdentity.load_or_create(
        tmp_path / "old-firmware",
        amd_root_dir=amd_root_dir,
        firmware=FirmwareVersion(api_major=1, api_minor=54, build=3),
        amd_key_bits=2048,
    )
    handle = src.running(SEV_POLICY, asid=SRC_ASID)
    with _fails(SevStatus.POLICY_FAILURE):  # a valid chain, but the PEK says API 1.54
        src.psp.send_start(_chain_request(handle, older))
    relaxed = src.running(PolicyFlag.SEV | 1 << 16 | 54 << 24, asid=SRC_ASID + 1)
    src.psp.send_start(_chain_request(relaxed, older))


def test_the_domain_bit_keeps_the_guest_with_its_oca(
    hosts: tuple[Platform, Platform], identity: PlatformIdentity
) -> None:
    src, dst = hosts
    handle = src.running(PolicyFlag.DOMAIN, asid=SRC_ASID)
    with _fails(SevStatus.POLICY_FAILURE):  # a valid chain, but another owner's OCA
        src.send_start_to(handle, dst.identity)
    with _fails(SevStatus.INVALID_LEN):
        src.psp.send_start(_chain_request(handle, identity, plat_certs=b""))
    # A PDH that the OCA's PEK did not sign does not pass either.
    with _fails(SevStatus.BAD_SIGNATURE):
        src.psp.send_start(
            _chain_request(handle, identity, pdh_cert=dst.identity.certificates.pdh.to_bytes())
        )
    # A platform under the same OCA (here: the same identity on a second PSP) is in the domain.
    same_domain = Platform.build(identity)
    same_domain.boot()
    started = src.send_start_to(handle, identity)
    received = same_domain.receive_start_from(started, identity, asid=DST_ASID)
    assert _state(same_domain, received) is GuestState.RUPDATE


# -- SEND_UPDATE_DATA, SEND_CANCEL ------------------------------------------------------


def test_send_update_checks_in_firmware_order(hosts: tuple[Platform, Platform]) -> None:
    src, _dst = hosts
    sent, _ = _started(hosts)
    good = SendUpdateDataRequest(handle=sent, hdr_len=52, guest_paddr=SRC_SPA, guest_len=4096, trans_len=4096)
    # The header length is checked first, even before the handle: that is the query.
    with pytest.raises(SevError) as exc:
        src.psp.send_update_data(replace(good, handle=GuestHandle(99), hdr_len=0))
    assert exc.value.status is SevStatus.INVALID_LEN
    assert isinstance(exc.value.output, SendUpdateResponse) and exc.value.output.hdr_len == 52
    for bad, status in (
        (replace(good, handle=GuestHandle(99)), SevStatus.INVALID_GUEST),
        (replace(good, guest_len=0), SevStatus.INVALID_LEN),
        (replace(good, guest_len=17), SevStatus.INVALID_LEN),
        (replace(good, guest_len=0x5010, trans_len=0x5010), SevStatus.INVALID_LEN),
        (replace(good, trans_len=0), SevStatus.INVALID_LEN),
        (replace(good, trans_len=4080), SevStatus.INVALID_LEN),
        (replace(good, guest_paddr=Spa(SRC_SPA + 4)), SevStatus.INVALID_ADDRESS),
        (replace(good, guest_paddr=Spa(1 << 40)), SevStatus.INVALID_ADDRESS),
    ):
        with _fails(status):
            src.psp.send_update_data(bad)
    with _fails(SevStatus.UNSUPPORTED):  # not an SEV-ES guest
        src.psp.send_update_vmsa(SendUpdateVmsaRequest(**{f: getattr(good, f) for f in good.__slots__}))
    bigger = src.psp.send_update_data(replace(good, hdr_len=200, trans_len=8192))
    assert (bigger.hdr_len, len(bigger.hdr), len(bigger.trans)) == (52, 52, 4096)  # guest_len bytes only
    src.psp.deactivate(DeactivateRequest(handle=sent))
    with _fails(SevStatus.INACTIVE):
        src.psp.send_update_data(good)


def test_send_cancel_returns_the_guest_to_running_and_it_runs_on(hosts: tuple[Platform, Platform]) -> None:
    src, dst = hosts
    sent, _received = _started(hosts)
    _send_page(src, sent, SRC_SPA)
    src.psp.send_cancel(SendCancelRequest(handle=sent))
    assert _state(src, sent) is GuestState.RUNNING
    assert src.psp.asid_runnable(Asid(SRC_ASID))  # the cores may run it
    assert src.memory.read_encrypted(Asid(SRC_ASID), SRC_SPA, 4096) == PAGE_A  # its memory is intact
    # The guest writes on (through the engine, under its own VEK), and reads it back.
    src.memory.write_encrypted(Asid(SRC_ASID), SRC_SPA, PAGE_B)
    assert (
        src.psp.dbg_decrypt(DbgDecryptRequest(handle=sent, src_paddr=SRC_SPA, length=64)).data == PAGE_B[:64]
    )
    with _fails(SevStatus.INVALID_GUEST_STATE):  # the old channel is closed
        _send_page(src, sent, SRC_SPA)
    with _fails(SevStatus.INVALID_GUEST_STATE):
        src.psp.send_cancel(SendCancelRequest(handle=sent))
    # And it can be migrated later, to a new target context.
    again = src.send_start_to(sent, dst.identity)
    target = dst.receive_start_from(again, src.identity, asid=DST_ASID + 1)
    _receive_page(dst, target, _send_page(src, sent, SRC_SPA), DST_SPA)
    assert dst.memory.read_encrypted(Asid(DST_ASID + 1), DST_SPA, 4096) == PAGE_B


# -- SEV-ES: the VMSA ------------------------------------------------------------------

ES_SRC_ASID, ES_DST_ASID = 1, 5
VMSA_SRC, VMSA_DST = Spa(0x14000), Spa(0x2A000)
VMSA = bytes(range(256)) * 16


@pytest.fixture
def es_hosts(identity: PlatformIdentity, other_identity: PlatformIdentity) -> tuple[Platform, Platform]:
    src, dst = Platform.build(identity), Platform.build(other_identity)
    src.boot(es=True)
    dst.boot(es=True)
    return src, dst


def _send_vmsa(src: Platform, handle: GuestHandle, spa: Spa = VMSA_SRC) -> SendUpdateResponse:
    return src.psp.send_update_vmsa(
        SendUpdateVmsaRequest(handle=handle, hdr_len=52, guest_paddr=spa, guest_len=4096, trans_len=4096)
    )


def test_an_es_guests_vmsa_migrates_and_is_resealed_in_the_targets_tmr(
    es_hosts: tuple[Platform, Platform],
) -> None:
    src, dst = es_hosts
    src.memory.write_plain(VMSA_SRC, VMSA)
    handle = src.running(PolicyFlag.ES, asid=ES_SRC_ASID, pages={SRC_SPA: PAGE_A}, vmsa_spa=VMSA_SRC)
    started = src.send_start_to(handle, dst.identity)
    packet = _send_vmsa(src, handle)
    received = dst.receive_start_from(started, src.identity, asid=ES_DST_ASID)
    dst.psp.receive_update_vmsa(
        ReceiveUpdateVmsaRequest(
            handle=received, hdr=packet.hdr, guest_paddr=VMSA_DST, guest_len=4096, trans=packet.trans
        )
    )
    source_page = src.memory.read_encrypted(Asid(ES_SRC_ASID), VMSA_SRC, 4096)
    target_page = dst.memory.read_encrypted(Asid(ES_DST_ASID), VMSA_DST, 4096)
    # The registers arrive; only the CRC block address changes, to one in the target's own TMR.
    crc = slice(VMSA_CRC_PADDR_OFFSET, VMSA_CRC_PADDR_OFFSET + 8)
    assert target_page[:0x380] == VMSA[:0x380] and target_page[crc.stop :] == VMSA[crc.stop :]
    assert target_page[:0x388] == source_page[:0x388] and target_page[crc.stop :] == source_page[crc.stop :]
    block = Spa(int.from_bytes(target_page[crc], "little"))
    assert dst.psp._tmr is not None and dst.psp._tmr.lookup(block) == vmsa_crc(target_page)
    assert source_page[crc] != bytes(8)
    dst.psp.receive_finish(ReceiveFinishRequest(handle=received))
    # Sealed properly: the target can send it on (SEND_UPDATE_VMSA re-checks the CRC).
    onward = dst.send_start_to(received, src.identity)
    assert onward.policy == PolicyFlag.ES
    assert len(_send_vmsa(dst, received, VMSA_DST).trans) == 4096


def test_send_update_vmsa_rechecks_the_crc(es_hosts: tuple[Platform, Platform]) -> None:
    src, dst = es_hosts
    handle = src.running(PolicyFlag.ES, asid=ES_SRC_ASID, pages={SRC_SPA: PAGE_A}, vmsa_spa=VMSA_SRC)
    src.send_start_to(handle, dst.identity)
    with _fails(SevStatus.INVALID_PARAM):  # a data page is not a sealed VMSA
        _send_vmsa(src, handle, SRC_SPA)
    with _fails(SevStatus.INVALID_LEN):  # one whole VMSA page
        src.psp.send_update_vmsa(
            SendUpdateVmsaRequest(
                handle=handle, hdr_len=52, guest_paddr=VMSA_SRC, guest_len=2048, trans_len=4096
            )
        )
    src.memory.raw[VMSA_SRC + 0x100] ^= 1  # the host flips a ciphertext bit: the registers change
    with _fails(SevStatus.INVALID_PARAM):
        _send_vmsa(src, handle)


# -- the cost model --------------------------------------------------------------------


def test_the_cost_model_is_off_by_default_and_charges_latency_and_bandwidth(
    identity: PlatformIdentity,
) -> None:
    slept: list[float] = []
    free = Platform.build(identity, sleep=slept.append)
    free.boot()
    free.running(0, asid=SRC_ASID, pages={SRC_SPA: PAGE_A})
    assert slept == []

    cost = PspCostModel(command_latency=0.001, bandwidth=4096 / 0.004)  # 1 ms + 4 ms per page
    p = Platform.build(identity, config=PspConfig(min_sev_asid=17, cost=cost), sleep=slept.append)
    p.boot()
    handle = p.running(0, asid=SRC_ASID, pages={SRC_SPA: PAGE_A})
    slept.clear()
    p.psp.send_start(SendStartRequest(handle=handle, pdh_cert=p.identity.certificates.pdh.to_bytes()))
    _send_page(p, handle, SRC_SPA)
    _send_page(p, handle, SRC_SPA, 2048)
    with _fails(SevStatus.INVALID_LEN):
        _send_page(p, handle, SRC_SPA, 17)  # a refused command still took the mailbox round trip
    p.psp.guest_status(GuestStatusRequest(handle=handle))
    assert slept == pytest.approx([0.001, 0.005, 0.003, 0.001, 0.001])
    for bad in ({"command_latency": -1.0}, {"bandwidth": float("inf")}):
        with pytest.raises(ValueError):
            PspCostModel(**bad)
    assert not PspCostModel().enabled and cost.enabled
    assert GuestPolicy.from_u32(SEV_POLICY).api_minor == 55
