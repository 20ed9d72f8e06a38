"""KVM's SEND_* / RECEIVE_* (``KVM_MEMORY_ENCRYPT_OP``) on two hosts' real PSPs and engines.

The tests speak the bytes a VMM speaks: ``struct kvm_sev_cmd``, the command's
struct from ``confmig.kvm.sev``, the inline buffers; and they check what a
VMM gets back (result, firmware ``error``, the reply) and, on the trusted
side, what the guest would read.
"""

from __future__ import annotations

import errno
import hashlib
import struct

import pytest
from sev_hosts import RAM_SIZE, Reply, SevHost, Vm, launch, u32

from confmig.common.units import PAGE_SIZE
from confmig.kvm import sev as ksev
from confmig.platform.psp import GuestState, SevStatus

PAGE_0 = hashlib.sha512(b"the guest's page at GPA 0").digest() * 64
PAGE_5 = hashlib.sha512(b"the guest's page at GPA 0x5000").digest() * 64
NOSEND, ES, SEV_BIT = 1 << 3, 1 << 2, 1 << 5
EIO, EINVAL, ENOTTY = -errno.EIO, -errno.EINVAL, -errno.ENOTTY
NO_FW_CALL = ksev.SEV_RET_NO_FW_CALL


# -- what a VMM does (QEMU's sev_save_setup / sev_save_outgoing_page / sev_load_incoming_page) --


def certificates(target: SevHost) -> tuple[bytes, bytes, bytes]:
    """The target's PDH and PEK‖OCA‖CEK (its ``query-sev-capabilities``, from ``/dev/sev``), and
    ASK‖ARK (the installation's AMD certificates): QEMU's sev-pdh, sev-plat-cert, sev-amd-cert."""
    result, out = ksev.issue_sev_cmd(target.port, struct.pack("<I", ksev.SEV_PDH_CERT_EXPORT))
    assert result == 0
    pdh_len, chain_len = u32(out, 4), u32(out, 8)
    pdh, chain = out[12 : 12 + pdh_len], out[12 + pdh_len : 12 + pdh_len + chain_len]
    return pdh, chain, target.identity.certificates.amd_chain()


def send_start(vm: Vm, certs: tuple[bytes, bytes, bytes]) -> tuple[int, bytes]:
    query = vm.op(ksev.KVM_SEV_SEND_START, ksev.SEND_START.pack(*[0] * 14))
    assert (query.result, query.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    session_len = ksev.SEND_START.unpack_from(query.out)[12]
    assert session_len == ksev.SESSION_LEN
    reply = send_start_op(vm, certs, session_len)
    assert (reply.result, reply.error) == (0, 0), reply
    fields = ksev.SEND_START.unpack_from(reply.out)
    assert fields[12] == session_len
    return fields[0], reply.out[ksev.SEND_START.size :]


def send_start_op(vm: Vm, certs: tuple[bytes, bytes, bytes], session_len: int = 128) -> Reply:
    pdh, chain, amd = certs
    body = ksev.SEND_START.pack(0, 0, 0, len(pdh), 0, 0, len(chain), 0, 0, len(amd), 0, 0, session_len, 0)
    return vm.op(ksev.KVM_SEV_SEND_START, body + pdh + chain + amd)


def send_page(vm: Vm, gpa: int, length: int = PAGE_SIZE) -> tuple[bytes, bytes]:
    query = vm.op(ksev.KVM_SEV_SEND_UPDATE_DATA, ksev.SEND_UPDATE_DATA.pack(0, 0, 0, gpa, length, 0, 0, 0, 0))
    assert (query.result, query.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    hdr_len = ksev.SEND_UPDATE_DATA.unpack_from(query.out)[1]
    assert hdr_len == ksev.PACKET_HEADER_LEN
    body = ksev.SEND_UPDATE_DATA.pack(0, hdr_len, 0, gpa, length, 0, 0, length, 0)
    reply = vm.op(ksev.KVM_SEV_SEND_UPDATE_DATA, body)
    assert (reply.result, reply.error) == (0, 0), reply
    data = reply.out[ksev.SEND_UPDATE_DATA.size :]
    assert len(data) == hdr_len + length
    return data[:hdr_len], data[hdr_len:]


def receive_start(vm: Vm, policy: int, source_pdh: bytes, session: bytes) -> Reply:
    body = ksev.RECEIVE_START.pack(0, policy, 0, len(source_pdh), 0, 0, len(session), 0)
    return vm.op(ksev.KVM_SEV_RECEIVE_START, body + source_pdh + session)


def receive_page(vm: Vm, gpa: int, hdr: bytes, trans: bytes, guest_len: int | None = None) -> Reply:
    length = len(trans) if guest_len is None else guest_len
    body = ksev.RECEIVE_UPDATE_DATA.pack(0, len(hdr), 0, gpa, length, 0, 0, len(trans), 0)
    return vm.op(ksev.KVM_SEV_RECEIVE_UPDATE_DATA, body + hdr + trans)


def migrating(host_a: SevHost, host_b: SevHost, policy: int = 0) -> tuple[Vm, Vm]:
    """A running guest on A, SEND_START to B, RECEIVE_START on B's new VM."""
    source = host_a.vm()
    launch(source, policy, {0: PAGE_0, 0x5000: PAGE_5})
    target = host_b.vm()
    assert target.op(ksev.KVM_SEV_INIT).result == 0
    policy, session = send_start(source, certificates(host_b))
    source_pdh = certificates(host_a)[0]
    reply = receive_start(target, policy, source_pdh, session)
    assert (reply.result, reply.error) == (0, 0), reply
    return source, target


# -- the whole flow -------------------------------------------------------------------------


def test_the_kvm_structs_and_command_ids() -> None:
    assert (ksev.SEND_START.size, ksev.SEND_UPDATE_DATA.size) == (72, 48)
    assert (ksev.RECEIVE_START.size, ksev.RECEIVE_UPDATE_DATA.size) == (40, 48)
    ids = (
        ksev.KVM_SEV_SEND_START,
        ksev.KVM_SEV_SEND_UPDATE_DATA,
        ksev.KVM_SEV_SEND_UPDATE_VMSA,
        ksev.KVM_SEV_SEND_FINISH,
        ksev.KVM_SEV_RECEIVE_START,
        ksev.KVM_SEV_RECEIVE_UPDATE_DATA,
        ksev.KVM_SEV_RECEIVE_UPDATE_VMSA,
        ksev.KVM_SEV_RECEIVE_FINISH,
        ksev.KVM_SEV_SEND_CANCEL,
    )
    assert ids == (8, 9, 10, 11, 12, 13, 14, 15, 21)  # enum sev_cmd_id


def test_private_pages_migrate_through_kvm_to_another_host(host_a: SevHost, host_b: SevHost) -> None:
    source, target = migrating(host_a, host_b)
    assert source.guest_state() == GuestState.SUPDATE
    assert target.guest_state() == GuestState.RUPDATE
    assert target.bound == [(target.asid, False)]  # KVM ACTIVATEd the new handle on the VM's ASID
    assert not host_b.psp.asid_runnable(target.asid)  # but it runs only after RECEIVE_FINISH

    for gpa in (0, 0x5000):  # GPA 0 is a page like any other
        hdr, trans = send_page(source, gpa)
        assert PAGE_0 not in trans and PAGE_5 not in trans and trans != bytes(host_a.ram[gpa : gpa + 4096])
        reply = receive_page(target, gpa, hdr, trans)
        assert (reply.result, reply.error, reply.out) == (0, 0, b"")

    assert host_b.plaintext(target.asid, 0) == PAGE_0
    assert host_b.plaintext(target.asid, 0x5000) == PAGE_5
    assert bytes(host_b.ram[:4096]) not in (PAGE_0, bytes(host_a.ram[:4096]))  # new key, new address
    assert host_b.slots.vek(target.asid) != host_a.slots.vek(source.asid)

    assert target.op(ksev.KVM_SEV_RECEIVE_FINISH).result == 0
    assert target.guest_state() == GuestState.RUNNING and host_b.psp.asid_runnable(target.asid)
    assert source.op(ksev.KVM_SEV_SEND_FINISH).result == 0
    assert source.guest_state() == GuestState.SENT
    status = source.op(ksev.KVM_SEV_GUEST_STATUS, ksev.GUEST_STATUS.pack(0, 0, 0))
    assert ksev.GUEST_STATUS.unpack_from(status.out)[1] == GuestState.SENT
    source.sev.destroy()  # teardown of a SENT guest: DEACTIVATE, DECOMMISSION, DF_FLUSH
    assert host_a.port.guest_status(1) == (0, 0, GuestState.INVALID)


# -- argument checks and queries --------------------------------------------------------------


def test_send_start_query_and_argument_checks(host_a: SevHost, host_b: SevHost) -> None:
    source = host_a.vm()
    assert source.op(ksev.KVM_SEV_SEND_START, ksev.SEND_START.pack(*[0] * 14)).result == ENOTTY  # not SEV
    launch(source, 0, {0: PAGE_0})
    assert host_b.port.platform_init(es=False) == 0
    pdh, chain, amd = certificates(host_b)
    for bad in (
        (b"", chain, amd),
        (pdh, b"", amd),
        (pdh, chain, b""),
    ):  # psp_copy_user_blob: none may be empty
        assert (send_start_op(source, bad).result, send_start_op(source, bad).error) == (EINVAL, NO_FW_CALL)
    reply = send_start_op(source, (pdh, chain, amd), session_len=ksev.SEV_FW_BLOB_MAX_SIZE + 1)
    assert (reply.result, reply.error) == (EINVAL, NO_FW_CALL)
    body = ksev.SEND_START.pack(0, 0, 0, len(pdh), 0, 0, len(chain), 0, 0, len(amd), 0, 0, 128, 0)
    assert source.op(ksev.KVM_SEV_SEND_START, body + pdh + chain).result == EINVAL  # lengths != inline bytes
    # A session buffer of the wrong size reaches the firmware, which answers with the size it needs.
    reply = send_start_op(source, (pdh, chain, amd), session_len=64)
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    assert ksev.SEND_START.unpack_from(reply.out)[12] == 128 and len(reply.out) == ksev.SEND_START.size
    assert source.guest_state() == GuestState.RUNNING


def test_send_update_data_query_and_argument_checks(host_a: SevHost, host_b: SevHost) -> None:
    source, _target = migrating(host_a, host_b)

    def op(hdr_len: int, gpa: int, guest_len: int, trans_len: int) -> Reply:
        body = ksev.SEND_UPDATE_DATA.pack(0, hdr_len, 0, gpa, guest_len, 0, 0, trans_len, 0)
        return source.op(ksev.KVM_SEV_SEND_UPDATE_DATA, body)

    query = op(52, 0x5000, 4096, 0)  # either length 0 is the query
    assert (query.result, query.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    assert ksev.SEND_UPDATE_DATA.unpack_from(query.out)[1::4] == (52, 0)  # hdr_len, trans_len
    for args in (
        (52, 0x5FF0, 32, 32),  # crosses into the next page: at most one page per call
        (52, 0x5000, 4097, 4097),
        (52, 0x5000, 0, 4096),
        (52, RAM_SIZE, 16, 16),  # no memory slot there
    ):
        reply = op(*args)
        assert (reply.result, reply.error) == (EINVAL, NO_FW_CALL), args
    reply = op(16, 0x5000, 4096, 4096)  # a short header buffer: the firmware refuses it
    assert (reply.result, reply.error, reply.out) == (EIO, ksev.SEV_RET_INVALID_LEN, b"")
    reply = op(52, 0x5008, 16, 16)  # within the page but not 16-byte aligned
    assert (reply.result, reply.error) == (EIO, SevStatus.INVALID_ADDRESS)
    reply = op(64, 0x5000, 4096, 8192)  # bigger buffers come back whole, zero-filled
    data = reply.out[ksev.SEND_UPDATE_DATA.size :]
    assert reply.result == 0 and len(data) == 64 + 8192
    assert data[52:64] == bytes(12) and data[64 + 4096 :] == bytes(4096)
    # A sub-page packet (16-byte granular) inside one page is fine.
    sub = op(52, 0x5010, 32, 32)
    assert sub.result == 0 and len(sub.out) == ksev.SEND_UPDATE_DATA.size + 52 + 32


def test_receive_argument_checks(host_a: SevHost, host_b: SevHost) -> None:
    plain = host_b.vm()
    assert receive_page(plain, 0, bytes(52), bytes(4096)).result == EINVAL  # not SEV: EINVAL, not ENOTTY
    assert receive_start(plain, 0, bytes(2084), bytes(128)).result == ENOTTY
    source, target = migrating(host_a, host_b)
    hdr, trans = send_page(source, 0)
    for reply in (
        receive_page(target, 0xFF0, hdr, trans[:32]),  # crosses a page
        receive_page(target, 0, b"", trans),
        receive_page(target, 0, hdr, b"", guest_len=4096),
        receive_page(target, 0, hdr, trans, guest_len=0),
        receive_page(target, RAM_SIZE, hdr, trans),
        target.op(
            ksev.KVM_SEV_RECEIVE_UPDATE_DATA,
            ksev.RECEIVE_UPDATE_DATA.pack(0, 52, 0, 0, 4096, 0, 0, 4096, 0) + hdr + trans[:100],
        ),
    ):
        assert (reply.result, reply.error) == (EINVAL, NO_FW_CALL)
    reply = receive_page(target, 0, hdr, trans, guest_len=2048)  # the firmware: guest_len != trans_len
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    assert receive_start(target, 0, bytes(2084), b"").result == EINVAL


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_tampered_packet_fails_in_the_target_psp_and_nothing_is_written(
    host_a: SevHost, host_b: SevHost, where: str
) -> None:
    source, target = migrating(host_a, host_b)
    hdr, trans = send_page(source, 0x5000)
    if where == "header":
        hdr = hdr[:30] + bytes([hdr[30] ^ 1]) + hdr[31:]  # the MAC
    else:
        trans = trans[:7] + bytes([trans[7] ^ 0x40]) + trans[8:]
    before = bytes(host_b.ram)
    reply = receive_page(target, 0x5000, hdr, trans)
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_BAD_MEASUREMENT)
    assert bytes(host_b.ram) == before
    assert target.guest_state() == GuestState.RUPDATE


def test_a_packet_replayed_from_an_earlier_migration_is_refused(host_a: SevHost, host_b: SevHost) -> None:
    source, first = migrating(host_a, host_b)
    old_hdr, old_trans = send_page(source, 0)
    assert source.op(ksev.KVM_SEV_SEND_CANCEL).result == 0
    first.sev.destroy()
    # The next attempt: a new target VM, a new session.
    policy, session = send_start(source, certificates(host_b))
    second = host_b.vm()
    assert second.op(ksev.KVM_SEV_INIT).result == 0
    assert receive_start(second, policy, certificates(host_a)[0], session).result == 0
    before = bytes(host_b.ram)
    reply = receive_page(second, 0, old_hdr, old_trans)
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_BAD_MEASUREMENT)
    assert bytes(host_b.ram) == before
    assert receive_page(second, 0, *send_page(source, 0)).result == 0
    assert host_b.plaintext(second.asid, 0) == PAGE_0


def test_within_one_migration_kvm_accepts_a_page_replayed_at_another_gpa(
    host_a: SevHost, host_b: SevHost
) -> None:
    """The SEV API's known gap (docs/psp.md): the packet MAC does not bind the GPA."""
    source, target = migrating(host_a, host_b)
    hdr, trans = send_page(source, 0)
    assert receive_page(target, 0x5000, hdr, trans).result == 0  # page 0's packet at GPA 0x5000
    assert host_b.plaintext(target.asid, 0x5000) == PAGE_0


def test_a_nosend_guest_is_refused_and_keeps_running(host_a: SevHost, host_b: SevHost) -> None:
    source = host_a.vm()
    launch(source, NOSEND, {0: PAGE_0})
    assert host_b.port.platform_init(es=False) == 0
    reply = send_start_op(source, certificates(host_b))
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_POLICY_FAILURE)
    assert ksev.SEND_START.unpack_from(reply.out)[0] == 0  # no policy, and no session, came back
    assert len(reply.out) == ksev.SEND_START.size
    assert source.guest_state() == GuestState.RUNNING and host_a.psp.asid_runnable(source.asid)


def test_the_sev_policy_bit_refuses_a_pdh_the_targets_chain_did_not_sign(
    host_a: SevHost, host_b: SevHost
) -> None:
    source = host_a.vm()
    launch(source, SEV_BIT, {0: PAGE_0})
    assert host_b.port.platform_init(es=False) == 0
    _pdh, chain, amd = certificates(host_b)
    impostor = certificates(host_a)[0]  # some other platform's PDH with the target's chain
    reply = send_start_op(source, (impostor, chain, amd))
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_BAD_SIGNATURE)
    assert send_start_op(source, certificates(host_b)).result == 0


def test_send_cancel_returns_the_guest_to_running(host_a: SevHost, host_b: SevHost) -> None:
    source, _target = migrating(host_a, host_b)
    send_page(source, 0)
    assert source.op(ksev.KVM_SEV_SEND_CANCEL).result == 0
    assert source.guest_state() == GuestState.RUNNING
    assert host_a.psp.asid_runnable(source.asid)  # its vCPUs may VMRUN again
    host_a.guest_writes(source.asid, 0, PAGE_5)  # and it runs on, under its own key
    assert host_a.plaintext(source.asid, 0) == PAGE_5
    reply = source.op(ksev.KVM_SEV_SEND_CANCEL)  # nothing to cancel any more
    assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_INVALID_GUEST_STATE)
    send_start(source, certificates(host_b))  # a later migration may start afresh


def test_a_failed_receive_start_leaves_no_guest_behind(host_a: SevHost, host_b: SevHost) -> None:
    source = host_a.vm()
    launch(source, 0, {0: PAGE_0})
    target = host_b.vm()
    assert target.op(ksev.KVM_SEV_INIT).result == 0
    policy, session = send_start(source, certificates(host_b))
    pdh = certificates(host_a)[0]
    tampered = session[:0x70] + bytes([session[0x70] ^ 1]) + session[0x71:]  # POLICY_MAC
    for reply in (
        receive_start(target, policy, pdh, tampered),
        receive_start(target, policy | 1, pdh, session),
    ):
        assert (reply.result, reply.error) == (EIO, ksev.SEV_RET_BAD_MEASUREMENT)
    assert target.bound == [] and target.handle == 0
    guests = ksev.issue_sev_cmd(host_b.port, struct.pack("<I", ksev.SEV_PLATFORM_STATUS))[1]
    assert u32(guests, 12) == 0  # sev_user_data_status.guest_count
    # An SEV-ES guest's session into a plain SEV VM: RECEIVE_START succeeds, ACTIVATE on the
    # VM's (non-ES) ASID fails, and KVM decommissions the new handle.
    es_source = host_a.vm()
    launch(es_source, ES, {}, es=True)
    es_policy, es_session = send_start(es_source, certificates(host_b))
    reply = receive_start(target, es_policy, pdh, es_session)
    assert (reply.result, reply.error) == (EIO, SevStatus.INVALID_ASID)
    assert (
        target.bound == []
        and u32(ksev.issue_sev_cmd(host_b.port, struct.pack("<I", ksev.SEV_PLATFORM_STATUS))[1], 12) == 0
    )


# -- SEV-ES: the VMSA --------------------------------------------------------------------------

VMSA_GPA = 0x8000
VMSA = bytes(range(256)) * 16


def test_an_es_guests_vmsa_goes_through_send_and_receive_update_vmsa(
    host_a: SevHost, host_b: SevHost
) -> None:
    source = host_a.vm()
    host_a.ram[VMSA_GPA : VMSA_GPA + 4096] = VMSA
    launch(source, ES, {0: PAGE_0}, es=True, vmsa={0: VMSA_GPA})
    assert source.vcpu_calls == [("sync", 0), ("launched", 0)]  # the image, then the PSP, then sealed
    target = host_b.vm()
    assert target.op(ksev.KVM_SEV_ES_INIT).result == 0
    target.vmsa[0] = 0xA000  # its vCPU, created after the INIT
    policy, session = send_start(source, certificates(host_b))
    assert receive_start(target, policy, certificates(host_a)[0], session).result == 0
    assert target.bound == [(target.asid, True)] and target.asid < ksev.MIN_SEV_ASID

    query = source.op(ksev.KVM_SEV_SEND_UPDATE_VMSA, ksev.SEND_UPDATE_VMSA.pack(0, 0, 0, 0, 0, 0, 0, 0))
    assert (query.result, query.error) == (EIO, ksev.SEV_RET_INVALID_LEN)
    assert ksev.SEND_UPDATE_VMSA.unpack_from(query.out)[3] == 52
    reply = source.op(ksev.KVM_SEV_SEND_UPDATE_VMSA, ksev.SEND_UPDATE_VMSA.pack(0, 0, 0, 52, 0, 0, 4096, 0))
    assert (reply.result, reply.error) == (0, 0)
    assert source.vcpu_calls[-1] == ("save", 0)  # the vCPU stored its registers first
    hdr = reply.out[ksev.SEND_UPDATE_VMSA.size :][:52]
    trans = reply.out[ksev.SEND_UPDATE_VMSA.size + 52 :]
    body = ksev.RECEIVE_UPDATE_VMSA.pack(0, 0, 0, 52, 0, 0, 4096, 0)
    tampered = trans[:7] + bytes([trans[7] ^ 1]) + trans[8:]
    refused = target.op(ksev.KVM_SEV_RECEIVE_UPDATE_VMSA, body + hdr + tampered)
    assert (refused.result, refused.error) == (EIO, ksev.SEV_RET_BAD_MEASUREMENT)
    assert target.vcpu_calls == [("page", 0)] and not any(host_b.ram[0xA000:0xB000])  # nothing loaded
    assert target.op(ksev.KVM_SEV_RECEIVE_UPDATE_VMSA, body + hdr + trans).result == 0
    assert target.vcpu_calls[-2:] == [("page", 0), ("load", 0)]  # the PSP wrote it, then the vCPU loads
    received = host_b.plaintext(target.asid, 0xA000)
    assert received[:0x380] == VMSA[:0x380] and received[0x390:] == VMSA[0x390:]  # all but the CRC block

    # A vCPU without a VMSA page, and a VM that is not SEV-ES.
    missing = source.op(ksev.KVM_SEV_SEND_UPDATE_VMSA, ksev.SEND_UPDATE_VMSA.pack(1, 0, 0, 52, 0, 0, 4096, 0))
    assert (missing.result, missing.error) == (EINVAL, NO_FW_CALL)
    plain = host_a.vm()
    launch(plain, 0, {})
    reply = plain.op(ksev.KVM_SEV_SEND_UPDATE_VMSA, ksev.SEND_UPDATE_VMSA.pack(0, 0, 0, 52, 0, 0, 4096, 0))
    assert reply.result == ENOTTY


def test_launch_update_vmsa_needs_vcpus_and_an_es_guest(host_a: SevHost) -> None:
    vm = host_a.vm()
    launch(vm, ES, {}, es=True)  # no vCPU has a VMSA page
    assert (vm.op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA).result, vm.vcpu_calls) == (EINVAL, [])
    plain = host_a.vm()
    assert plain.op(ksev.KVM_SEV_INIT).result == 0
    plain.vmsa[0] = VMSA_GPA
    assert plain.op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA).result == ENOTTY


def test_without_vmsa_pages_kvm_refuses_the_vmsa_commands(host_a: SevHost) -> None:
    """A KVM without VMSA pages (upstream's): EINVAL for every VMSA command."""
    vm = host_a.vm()
    vm.sev.vcpus = None
    launch(vm, ES, {}, es=True)
    assert host_a.port.platform_status()[0] == 0
    reply = vm.op(ksev.KVM_SEV_SEND_UPDATE_VMSA, ksev.SEND_UPDATE_VMSA.pack(0, 0, 0, 52, 0, 0, 4096, 0))
    assert (reply.result, reply.error) == (EINVAL, NO_FW_CALL)
    body = ksev.RECEIVE_UPDATE_VMSA.pack(0, 0, 0, 52, 0, 0, 4096, 0) + bytes(52 + 4096)
    assert vm.op(ksev.KVM_SEV_RECEIVE_UPDATE_VMSA, body).result == EINVAL
