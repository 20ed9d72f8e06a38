"""A whole SEV launch on the real (emulated) PSP, with confmig.owner as the guest owner.

The host's part (LAUNCH_START, UPDATE_DATA, MEASURE, SECRET, FINISH) is played
by the test against ``SecureProcessor`` over fake memory; the owner's part is
:class:`~confmig.owner.KeyBroker`, which sees only what the host would relay.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace

import pytest
from owner_fakes import Platform, launch_to_measure

from confmig.common.units import Spa
from confmig.guest.firmware import mh, secret
from confmig.owner import (
    DISK_PASSPHRASE_GUID,
    MIGRATION_TRANSPORT_KEY_GUID,
    AmdRoot,
    KeyBroker,
    MeasurementRejected,
    PolicyRejected,
    SessionClosed,
    VmProfile,
    build_secret_table,
    firmware_digest,
)
from confmig.owner.profile import (
    MIGRATION_TARGET_KEY_GUID,
    MIGRATION_TICKET_GUID,
    MIGRATION_V1_ALLOWED_GUID,
)
from confmig.owner.session import SessionState
from confmig.platform.psp import (
    Asid,
    DbgDecryptRequest,
    GuestHandle,
    GuestState,
    GuestStatusRequest,
    LaunchFinishRequest,
    LaunchSecretRequest,
    PlatformIdentity,
    PolicyFlag,
    SevError,
    SevStatus,
)
from confmig.proto.keybroker import LaunchRequest, MeasurementRequest, SecretResponse

FIRMWARE = bytes(range(256)) * 96  # 24 KiB: two LAUNCH_UPDATE_DATA scratch chunks
FIRMWARE_SPA = Spa(0x10000)
SECRET_SPA = Spa(0x30000)
ASID = 17
DISK_KEY = b"correct horse battery staple"
TRANSPORT_KEY = bytes(range(32))
SECRETS = ((DISK_PASSPHRASE_GUID, DISK_KEY), (MIGRATION_TRANSPORT_KEY_GUID, TRANSPORT_KEY))
TABLE = build_secret_table(SECRETS)


def _broker(root: AmdRoot, policy: int) -> KeyBroker:
    profile = VmProfile.build(digest=firmware_digest(FIRMWARE), policy=policy, secrets=SECRETS)
    return KeyBroker(root, {"vm1": profile})


def _launch_to_measure(p: Platform, broker: KeyBroker, policy: int, image: bytes = FIRMWARE, *,
                       asid: int = ASID, migration_target: bool = False,
                       ) -> tuple[GuestHandle, str, MeasurementRequest]:
    return launch_to_measure(p, broker, vm="vm1", policy=policy, image=image, spa=FIRMWARE_SPA, asid=asid,
                             migration_target=migration_target)


def _secret(handle: GuestHandle, reply: SecretResponse) -> LaunchSecretRequest:
    return LaunchSecretRequest(handle=handle, hdr=reply.secret_header, guest_paddr=SECRET_SPA,
                               guest_len=reply.guest_len, trans=reply.secret)


@pytest.mark.parametrize("policy", [0, int(PolicyFlag.NODBG | PolicyFlag.NOKS)])
def test_a_full_launch_driven_by_the_owner(booted: Platform, root: AmdRoot, policy: int) -> None:
    p, broker = booted, _broker(root, policy)
    handle, session_id, measured = _launch_to_measure(p, broker, policy)
    reply = broker.measurement(session_id, measured)
    assert reply.guest_len == len(TABLE) == len(reply.secret)
    assert DISK_KEY not in reply.secret and TRANSPORT_KEY not in reply.secret  # sealed under the TEK

    p.psp.launch_secret(_secret(handle, reply))
    assert DISK_KEY not in p.memory.raw  # private memory: ciphertext only
    assert p.memory.read_encrypted(Asid(ASID), SECRET_SPA, len(TABLE)) == TABLE
    if not policy & PolicyFlag.NODBG:
        dbg = DbgDecryptRequest(handle=handle, src_paddr=SECRET_SPA, length=len(TABLE))
        assert p.psp.dbg_decrypt(dbg).data == TABLE
    p.psp.launch_finish(LaunchFinishRequest(handle=handle))
    assert p.psp.guest_status(GuestStatusRequest(handle=handle)).state is GuestState.RUNNING
    assert broker.session_state(session_id) is SessionState.RELEASED
    with pytest.raises(SessionClosed, match="already released"):
        broker.measurement(session_id, measured)


def test_another_firmware_gets_nothing(booted: Platform, root: AmdRoot) -> None:
    broker = _broker(root, 0)
    _handle, session_id, measured = _launch_to_measure(booted, broker, 0, image=FIRMWARE[:-1] + b"!")
    with pytest.raises(MeasurementRejected):
        broker.measurement(session_id, measured)
    assert broker.session_state(session_id) is SessionState.REFUSED
    with pytest.raises(SessionClosed, match="refused"):
        broker.measurement(session_id, measured)


@pytest.mark.parametrize("offset", [0x00, 0x10, 0x30, 0x40, 0x60, 0x7F])
def test_a_tampered_session_is_refused_by_the_psp(booted: Platform, root: AmdRoot, offset: int) -> None:
    pdh, chain = booted.export()
    offer = _broker(root, 0).launch(LaunchRequest(vm="vm1", pdh=pdh, cert_chain=chain, policy=0))
    session = bytearray(offer.session)
    session[offset] ^= 0x01
    with pytest.raises(SevError, match=SevStatus.BAD_MEASUREMENT.name):
        booted.start(0, godh=offer.godh, session=bytes(session), asid=ASID)
    with pytest.raises(SevError, match=SevStatus.BAD_MEASUREMENT.name):  # a session under another policy
        booted.start(PolicyFlag.NODBG, godh=offer.godh, session=offer.session, asid=ASID)


@pytest.mark.parametrize("what", ["iv", "mac", "flags", "data", "another-launch"])
def test_a_tampered_secret_packet_is_refused_by_the_psp_and_nothing_is_written(
    booted: Platform, root: AmdRoot, identity: PlatformIdentity, what: str
) -> None:
    p, broker = booted, _broker(root, 0)
    handle, session_id, measured = _launch_to_measure(p, broker, 0)
    reply = broker.measurement(session_id, measured)
    if what == "another-launch":  # a packet the owner sealed for another launch of the same VM
        other = Platform.build(identity)
        other.boot()
        _h2, s2, m2 = _launch_to_measure(other, broker, 0)
        reply = broker.measurement(s2, m2)
    else:
        offset = {"flags": 0, "iv": 4, "mac": 20}.get(what)
        if offset is None:
            reply = replace(reply, secret=bytes([reply.secret[0] ^ 1]) + reply.secret[1:])
        else:
            header = bytearray(reply.secret_header)
            header[offset] ^= 1
            reply = replace(reply, secret_header=bytes(header))
    before, writes = bytes(p.memory.raw), p.memory.private_writes
    with pytest.raises(SevError, match=SevStatus.BAD_MEASUREMENT.name):
        p.psp.launch_secret(_secret(handle, reply))
    assert bytes(p.memory.raw) == before and p.memory.private_writes == writes


def _released_table(p: Platform, broker: KeyBroker, asid: int) -> dict[uuid.UUID, bytes]:
    """A migration target's launch: the secret table as it lands in the target's memory."""
    handle, session_id, measured = _launch_to_measure(p, broker, 0, asid=asid, migration_target=True)
    reply = broker.measurement(session_id, measured)
    p.psp.launch_secret(_secret(handle, reply))
    table = p.memory.read_encrypted(Asid(asid), SECRET_SPA, reply.guest_len)
    parsed = secret.parse_secret_table(table.ljust(4096, b"\0"))
    return {e.guid: secret.entry_data(table, e) for e in parsed.entries}


def test_a_migration_target_gets_a_ticket_of_its_own_and_its_key_never_the_guests_secrets(
        booted: Platform, root: AmdRoot) -> None:
    records: list[Mapping[str, object]] = []
    broker = KeyBroker(root, {"vm1": VmProfile.build(digest=firmware_digest(FIRMWARE), policy=0,
                                                     secrets=SECRETS)}, audit=records.append)
    first, second = _released_table(booted, broker, ASID), _released_table(booted, broker, ASID + 1)
    for table in (first, second):
        assert set(table) == {secret.MIGRATION_TICKET_GUID, secret.MIGRATION_TARGET_KEY_GUID}
        ticket = table[secret.MIGRATION_TICKET_GUID]
        # The guest firmware's derivation: a source derives the same key from its own.
        assert table[secret.MIGRATION_TARGET_KEY_GUID] == mh.ticket_key(TRANSPORT_KEY, ticket)
    assert first[secret.MIGRATION_TICKET_GUID] != second[secret.MIGRATION_TICKET_GUID]  # released once each
    released = [r for r in records if r["event"] == "released"]
    assert [r["ticket"] for r in released] == [t[secret.MIGRATION_TICKET_GUID].hex() for t in (first, second)]
    assert TRANSPORT_KEY.hex() not in repr(records) and first[secret.MIGRATION_TARGET_KEY_GUID].hex() \
        not in repr(records)


def test_no_migration_target_is_launched_for_a_guest_without_a_transport_key(
        booted: Platform, root: AmdRoot) -> None:
    profile = VmProfile.build(digest=firmware_digest(FIRMWARE), policy=0, secrets=SECRETS[:1])
    pdh, chain = booted.export()
    with pytest.raises(PolicyRejected, match="no migration transport key"):
        KeyBroker(root, {"vm1": profile}).launch(
            LaunchRequest(vm="vm1", pdh=pdh, cert_chain=chain, policy=0, migration_target=True))


def test_the_owner_and_the_firmware_name_the_migration_secrets_alike() -> None:
    assert (MIGRATION_TICKET_GUID, MIGRATION_TARGET_KEY_GUID, MIGRATION_V1_ALLOWED_GUID) == (
        secret.MIGRATION_TICKET_GUID, secret.MIGRATION_TARGET_KEY_GUID, secret.MIGRATION_V1_ALLOWED_GUID)
