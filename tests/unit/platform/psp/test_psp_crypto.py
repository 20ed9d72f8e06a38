"""Known-answer tests (virtee/sev vectors, sev-platform.md §2.6) and the crypto building blocks."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confmig.platform.psp import FirmwareVersion, SevError, SevStatus, TransportKeys
from confmig.platform.psp.kdf import derive_kek, derive_kik, derive_master_secret, ecdh_shared_secret, kdf
from confmig.platform.psp.measure import (
    LaunchMeasurement,
    compute_measure,
    launch_digest,
    measurement_matches,
)
from confmig.platform.psp.packet import (
    PACKET_HEADER_SIZE,
    ChannelContext,
    PacketHeader,
    open_packet,
    seal_launch_secret,
    seal_packet,
)
from confmig.platform.psp.session import (
    SESSION_SIZE,
    SessionBlob,
    policy_mac,
    unwrap_session,
    verify_policy_mac,
    wrap_session,
)
from confmig.platform.psp.vmsa import crc32c, crc64_vmsa

ZERO16 = bytes(16)
VECTOR_MASTER = bytes.fromhex("ab4d269fcc62bedb4511d56c386ce706")
VECTOR_WRAP_TK = bytes.fromhex("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
VECTOR_WRAP_MAC = bytes.fromhex("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
VECTOR_POLICY_MAC = bytes.fromhex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")


def test_kdf_master_secret_vector() -> None:
    assert kdf(ZERO16, b"sev-master-secret", ZERO16, 16) == VECTOR_MASTER
    assert derive_master_secret(ZERO16, ZERO16) == VECTOR_MASTER


def test_session_wrap_vectors() -> None:
    blob = wrap_session(
        master_secret=derive_master_secret(ZERO16, ZERO16),
        keys=TransportKeys.zero(),
        policy=0,
        nonce=ZERO16,
        wrap_iv=ZERO16,
    )
    assert blob.wrap_tk == VECTOR_WRAP_TK
    assert blob.wrap_mac == VECTOR_WRAP_MAC
    assert blob.policy_mac == VECTOR_POLICY_MAC
    assert blob.nonce == ZERO16 and blob.wrap_iv == ZERO16


def test_kdf_matches_sp800_108_definition_for_multi_block_output() -> None:
    key, label, ctx = b"k" * 48, b"label", b"context"
    blocks = [
        hmac.new(
            key, struct.pack("<I", i) + label + b"\0" + ctx + struct.pack("<I", 80 * 8), hashlib.sha256
        ).digest()
        for i in (1, 2, 3)
    ]
    assert kdf(key, label, ctx, 80) == b"".join(blocks)[:80]
    # The length is part of every block: a shorter output is not a prefix of a longer one.
    assert kdf(key, label, ctx, 16) != kdf(key, label, ctx, 32)[:16]


def test_kek_and_kik_are_distinct_labels_of_the_master() -> None:
    assert derive_kek(VECTOR_MASTER) == kdf(VECTOR_MASTER, b"sev-kek", b"", 16)
    assert derive_kik(VECTOR_MASTER) == kdf(VECTOR_MASTER, b"sev-kik", b"", 16)
    assert derive_kek(VECTOR_MASTER) != derive_kik(VECTOR_MASTER)


def test_ecdh_is_the_big_endian_x_coordinate_and_symmetric() -> None:
    a = ec.derive_private_key(0x1234567, ec.SECP384R1())
    b = ec.derive_private_key(0x89ABCDEF, ec.SECP384R1())
    z = ecdh_shared_secret(a, b.public_key())
    assert z == ecdh_shared_secret(b, a.public_key())
    x = ec.derive_private_key(0x1234567 * 0x89ABCDEF, ec.SECP384R1()).public_key().public_numbers().x
    assert z == x.to_bytes(48, "big")
    with pytest.raises(ValueError):
        ecdh_shared_secret(ec.generate_private_key(ec.SECP256R1()), b.public_key())


def test_session_round_trip_and_layout() -> None:
    keys = TransportKeys(tek=bytes(range(16)), tik=bytes(range(16, 32)))
    master = bytes(range(100, 116))
    blob = wrap_session(master_secret=master, keys=keys, policy=0x10003, nonce=b"n" * 16, wrap_iv=b"i" * 16)
    raw = blob.to_bytes()
    assert len(raw) == SESSION_SIZE
    assert raw[0x00:0x10] == b"n" * 16 and raw[0x30:0x40] == b"i" * 16
    assert raw[0x60:0x80] == policy_mac(keys.tik, 0x10003)
    assert SessionBlob.from_bytes(raw) == blob
    opened = unwrap_session(master_secret=master, blob=SessionBlob.from_bytes(raw))
    assert (opened.tek, opened.tik) == (keys.tek, keys.tik)
    verify_policy_mac(opened, 0x10003, blob)


@pytest.mark.parametrize("offset", [0x10, 0x2F, 0x40, 0x5F])
def test_tampered_wrapped_keys_or_wrap_mac_are_refused(offset: int) -> None:
    master = bytes(16)
    raw = bytearray(
        wrap_session(
            master_secret=master, keys=TransportKeys.zero(), policy=0, nonce=ZERO16, wrap_iv=ZERO16
        ).to_bytes()
    )
    raw[offset] ^= 0x01
    with pytest.raises(SevError) as exc:
        unwrap_session(master_secret=master, blob=SessionBlob.from_bytes(bytes(raw)))
    assert exc.value.status is SevStatus.BAD_MEASUREMENT


def test_policy_mac_binds_the_policy() -> None:
    keys = TransportKeys.generate()
    blob = wrap_session(master_secret=bytes(16), keys=keys, policy=0x1, nonce=ZERO16, wrap_iv=ZERO16)
    with pytest.raises(SevError) as exc:
        verify_policy_mac(keys, 0x0, blob)
    assert exc.value.status is SevStatus.BAD_MEASUREMENT


def test_session_of_wrong_length_is_invalid_len() -> None:
    with pytest.raises(SevError) as exc:
        SessionBlob.from_bytes(bytes(127))
    assert exc.value.status is SevStatus.INVALID_LEN


def _reference_packet_mac(
    tik: bytes, ctx: int, flags: int, iv: bytes, ct: bytes, trailer: bytes = b""
) -> bytes:
    aad = bytes([ctx]) + flags.to_bytes(4, "little") + iv + len(ct).to_bytes(4, "little") * 2
    assert len(aad) == 29
    return hmac.new(tik, aad + ct + trailer, hashlib.sha256).digest()


def test_packet_is_aes_ctr_then_hmac_over_the_29_byte_aad() -> None:
    keys = TransportKeys(tek=b"T" * 16, tik=b"I" * 16)
    iv = bytes(range(16))
    plaintext = bytes(range(256)) * 2
    header, ct = seal_packet(keys, plaintext, context=ChannelContext.DATA, iv=iv)
    ctr = Cipher(algorithms.AES(keys.tek), modes.CTR(iv)).encryptor()
    assert ct == ctr.update(plaintext) + ctr.finalize()
    assert header.mac == _reference_packet_mac(keys.tik, 0x02, 0, iv, ct)
    raw = header.to_bytes()
    assert (
        len(raw) == PACKET_HEADER_SIZE and raw[:4] == bytes(4) and raw[4:20] == iv and raw[20:] == header.mac
    )
    assert PacketHeader.from_bytes(raw) == header
    assert open_packet(keys, header, ct, context=ChannelContext.DATA, uncompressed_len=len(ct)) == plaintext


def test_launch_secret_packet_appends_the_measurement_to_the_mac() -> None:
    keys = TransportKeys.generate()
    measurement = b"M" * 32
    header, ct = seal_launch_secret(keys, b"s" * 32, measurement=measurement, iv=b"v" * 16)
    assert header.mac == _reference_packet_mac(keys.tik, 0x01, 0, b"v" * 16, ct, measurement)
    with pytest.raises(SevError):  # another measurement: another MAC
        open_packet(
            keys, header, ct, context=ChannelContext.SECRET, uncompressed_len=32, measurement=b"m" * 32
        )


@pytest.mark.parametrize("what", ["flags", "iv", "mac", "data", "context", "length"])
def test_any_change_to_a_packet_is_bad_measurement(what: str) -> None:
    keys = TransportKeys.generate()
    header, ct = seal_packet(keys, b"p" * 64, context=ChannelContext.DATA, iv=b"v" * 16)
    ctx, length = ChannelContext.DATA, 64
    if what == "flags":
        header = PacketHeader(flags=1, iv=header.iv, mac=header.mac)
    elif what == "iv":
        header = PacketHeader(flags=0, iv=b"w" * 16, mac=header.mac)
    elif what == "mac":
        header = PacketHeader(flags=0, iv=header.iv, mac=bytes(32))
    elif what == "data":
        ct = bytes([ct[0] ^ 1]) + ct[1:]
    elif what == "context":
        ctx = ChannelContext.SECRET
    else:
        length = 48
    with pytest.raises(SevError) as exc:
        open_packet(keys, header, ct, context=ctx, uncompressed_len=length)
    assert exc.value.status is SevStatus.BAD_MEASUREMENT


def test_measurement_is_hmac_over_context_version_policy_digest_mnonce() -> None:
    fw = FirmwareVersion(api_major=1, api_minor=55, build=25)
    tik, digest, mnonce = b"k" * 16, hashlib.sha256(b"firmware").digest(), b"n" * 16
    message = bytes([0x04, 1, 55, 25]) + (0x30001).to_bytes(4, "little") + digest + mnonce
    expected = hmac.new(tik, message, hashlib.sha256).digest()
    measure = compute_measure(tik, firmware=fw, policy=0x30001, digest=digest, mnonce=mnonce)
    assert measure == expected
    blob = LaunchMeasurement(measure=measure, mnonce=mnonce)
    assert LaunchMeasurement.from_bytes(blob.to_bytes()) == blob and len(blob.to_bytes()) == 48
    assert measurement_matches(tik, blob, firmware=fw, policy=0x30001, expected_digest=digest)
    assert not measurement_matches(tik, blob, firmware=fw, policy=0x30000, expected_digest=digest)
    assert not measurement_matches(tik, blob, firmware=fw, policy=0x30001, expected_digest=bytes(32))
    assert launch_digest([b"firm", b"ware"]) == digest


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # CRC-32C (Castagnoli) catalogue check value


def _firmware_crc64_vmsa(data: bytes) -> int:
    """The firmware's procedure, index by index: lane k gets bytes 24*i + 8*k .. +8; the tail, lane 2."""
    lanes: list[bytearray] = [bytearray(), bytearray(), bytearray()]
    strides = len(data) // 24
    for i in range(strides):
        for k in range(3):
            for j in range(8):
                lanes[k].append(data[24 * i + 8 * k + j])
    lanes[2] += data[24 * strides :]
    c = [crc32c(bytes(lane)) for lane in lanes]
    return (c[0] ^ c[1] ^ c[2]) << 32 | crc32c(b"".join(x.to_bytes(4, "little") for x in c))


@pytest.mark.parametrize("size", [24, 32, 48, 0xFC0])
def test_vmsa_checksum_follows_the_firmware(size: int) -> None:
    data = hashlib.sha256(b"vmsa").digest() * (size // 32 + 1)
    assert crc64_vmsa(data[:size]) == _firmware_crc64_vmsa(data[:size])
    flipped = bytes([data[0] ^ 1]) + data[1:size]
    assert crc64_vmsa(flipped) != crc64_vmsa(data[:size])
