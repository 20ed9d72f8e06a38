"""The 52-byte transport packet header and its encrypt-then-MAC.

Header (AMD firmware ``sev_packet_header_t``)::

    0x00  FLAGS  u32 LE   bit 0 = COMPRESSED (never set by the firmware, refused on import)
    0x04  IV     16       fresh for every packet
    0x14  MAC    32

``ciphertext = AES-128-CTR(TEK, IV, plaintext)`` and::

    MAC = HMAC-SHA256(TIK, ctx || FLAGS(LE32) || IV || uncompressed_len(LE32)
                           || trans_len(LE32) || ciphertext [|| measurement])

``ctx`` is the channel context byte: SECRET (0x01) for LAUNCH_SECRET, which
also appends the 32-byte launch measurement; DATA (0x02) for
SEND/RECEIVE_UPDATE_DATA and, in this firmware version, for the VMSA commands
too. The MAC does not cover the guest address, so packets can be replayed or
reordered within a session; the firmware does not prevent it and neither do we.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confmig.platform.psp.session import TransportKeys
from confmig.platform.psp.status import SevError, SevStatus

PACKET_HEADER_SIZE: Final = 52
IV_SIZE: Final = 16
MAC_SIZE: Final = 32
MEASUREMENT_MAC_SIZE: Final = 32
_HEADER: Final = struct.Struct("<I16s32s")


class PacketFlags(IntFlag):
    COMPRESSED = 1 << 0


class ChannelContext(IntEnum):
    SECRET = 0x01
    DATA = 0x02
    VMSA = 0x03  # defined by the firmware, not used: VMSA packets are MACed as DATA
    MEASURE = 0x04


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketHeader:
    flags: int
    iv: bytes
    mac: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> PacketHeader:
        if len(data) != PACKET_HEADER_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        flags, iv, mac = _HEADER.unpack(data)
        return cls(flags=flags, iv=iv, mac=mac)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.flags, self.iv, self.mac)


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def packet_mac(
    tik: bytes,
    *,
    context: ChannelContext,
    flags: int,
    iv: bytes,
    ciphertext: bytes,
    uncompressed_len: int,
    measurement: bytes = b"",
) -> bytes:
    aad = struct.pack("<BI", context, flags) + iv + struct.pack("<II", uncompressed_len, len(ciphertext))
    return hmac.new(tik, aad + ciphertext + measurement, hashlib.sha256).digest()


def seal_packet(
    keys: TransportKeys,
    plaintext: bytes,
    *,
    context: ChannelContext,
    iv: bytes,
    flags: int = 0,
    measurement: bytes = b"",
) -> tuple[PacketHeader, bytes]:
    """Encrypt then MAC; returns the header and the transport data."""
    if len(iv) != IV_SIZE:
        raise ValueError("the packet IV is 16 bytes")
    ciphertext = _aes_ctr(keys.tek, iv, plaintext)
    mac = packet_mac(
        keys.tik,
        context=context,
        flags=flags,
        iv=iv,
        ciphertext=ciphertext,
        uncompressed_len=len(plaintext),
        measurement=measurement,
    )
    return PacketHeader(flags=flags, iv=iv, mac=mac), ciphertext


def open_packet(
    keys: TransportKeys,
    header: PacketHeader,
    ciphertext: bytes,
    *,
    context: ChannelContext,
    uncompressed_len: int,
    measurement: bytes = b"",
) -> bytes:
    """Verify the MAC first, then decrypt. ``SevError(BAD_MEASUREMENT)`` on a mismatch."""
    expected = packet_mac(
        keys.tik,
        context=context,
        flags=header.flags,
        iv=header.iv,
        ciphertext=ciphertext,
        uncompressed_len=uncompressed_len,
        measurement=measurement,
    )
    if not hmac.compare_digest(expected, header.mac):
        raise SevError(SevStatus.BAD_MEASUREMENT)
    return _aes_ctr(keys.tek, header.iv, ciphertext)


def seal_launch_secret(
    keys: TransportKeys, secret: bytes, *, measurement: bytes, iv: bytes
) -> tuple[PacketHeader, bytes]:
    """The guest owner's LAUNCH_SECRET packet, bound to the launch measurement it accepted.

    ``secret`` must be a non-empty multiple of 16 bytes, at most 0x5000.
    """
    if len(measurement) != MEASUREMENT_MAC_SIZE:
        raise ValueError("the launch measurement MAC is 32 bytes")
    return seal_packet(keys, secret, context=ChannelContext.SECRET, iv=iv, measurement=measurement)
