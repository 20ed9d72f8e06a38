"""The PSP on the real memory-encryption engine and key slots, driven through KVM's port.

``PspMailbox`` must satisfy ``confmig.kvm.ports.SecureProcessor`` (checked by
mypy at the assignment below); the launch flow then runs with primitive types
only, as the host kernel drives it, and guest memory holds the engine's
ciphertext.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator

import pytest
from mee_port import MeePort

from confmig.common.units import PAGE_SIZE, Spa
from confmig.kvm.ports import SecureProcessor as KvmSecureProcessor
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp import (
    Asid,
    GuestState,
    LaunchMeasurement,
    PlatformIdentity,
    PspMailbox,
    SecureProcessor,
    SevCertificate,
    SevStatus,
    create_launch_session,
    measurement_matches,
    seal_launch_secret,
)
from confmig.platform.psp.mailbox import STATUS

RAM = 64 * PAGE_SIZE


@pytest.fixture
def slots() -> Iterator[KeySlots]:
    slots = KeySlots()
    yield slots
    os.close(slots.fd)


def test_launch_through_the_kvm_port_on_the_real_engine(identity: PlatformIdentity, slots: KeySlots) -> None:
    engine = MemoryEncryptionEngine(slots)
    memory = MeePort(engine, RAM)
    psp = SecureProcessor(identity, memory=memory, keys=slots)
    port: KvmSecureProcessor = PspMailbox(psp)

    assert port.platform_init(es=False) == SevStatus.SUCCESS
    status, info = port.platform_status()
    api_major, api_minor, state, flags, build, guests = STATUS.unpack(info)
    assert (status, api_major, api_minor, state, flags, build, guests) == (0, 1, 55, 1, 0x100, 25, 0)
    status, pdh, chain = port.pdh_cert_export()
    assert status == 0 and len(pdh) == 2084 and len(chain) == 3 * 2084

    policy = 0x1  # NODBG
    owner = create_launch_session(SevCertificate.from_bytes(pdh), policy=policy)
    status, handle = port.launch_start(0, policy, owner.dh_cert, owner.session)
    assert (status, handle) == (0, 1)
    asid = 5
    assert port.activate(handle, asid) == 0

    image = hashlib.sha512(b"firmware").digest() * (2 * PAGE_SIZE // 64)
    memory.raw[PAGE_SIZE : 3 * PAGE_SIZE] = image
    assert port.launch_update_data(handle, PAGE_SIZE, len(image)) == 0
    assert bytes(memory.raw[PAGE_SIZE : 3 * PAGE_SIZE]) == engine.encrypt(asid, PAGE_SIZE, image)

    status, blob = port.launch_measure(handle)
    m = LaunchMeasurement.from_bytes(blob)
    assert status == 0
    assert measurement_matches(
        owner.keys.tik,
        m,
        firmware=psp.firmware,
        policy=policy,
        expected_digest=hashlib.sha256(image).digest(),
    )
    secret = b"a secret for the guest only".ljust(48, b".")
    header, trans = seal_launch_secret(owner.keys, secret, measurement=m.measure, iv=os.urandom(16))
    secret_spa = 4 * PAGE_SIZE + 0x100
    assert port.launch_secret(handle, header.to_bytes(), secret_spa, len(secret), trans) == 0
    assert secret not in memory.raw
    assert memory.read_encrypted(Asid(asid), Spa(secret_spa), len(secret)) == secret
    assert port.launch_finish(handle) == 0
    assert port.guest_status(handle) == (0, policy, GuestState.RUNNING)

    # NODBG: the host cannot read the guest back.
    assert port.dbg_decrypt(handle, PAGE_SIZE, 64) == (SevStatus.POLICY_FAILURE, b"")
    # A bad packet or a stale handle is a status, not an exception.
    assert port.launch_secret(handle, bytes(52), secret_spa, 16, bytes(16)) == SevStatus.INVALID_GUEST_STATE
    assert port.deactivate(handle) == 0
    assert slots.vek(asid) is None
    assert port.decommission(handle) == 0
    assert port.guest_status(handle) == (0, 0, GuestState.INVALID)
    # The ASID ran: a new guest may have it only after DF_FLUSH.
    status, second = port.launch_start(0, 0, b"", b"")
    assert status == 0
    assert port.activate(second, asid) == SevStatus.DFFLUSH_REQUIRED
    assert PspMailbox(psp).df_flush() == 0
    assert port.activate(second, asid) == 0
    assert port.deactivate(second) == 0 and port.decommission(second) == 0
    assert struct.unpack_from("<B", port.platform_status()[1], 2) == (1,)  # back to INIT
