"""Key derivation: NIST SP 800-108 counter mode with HMAC-SHA256, and ECDH on P-384.

For i = 1, 2, ...::

    K(i) = HMAC-SHA256(key, LE32(i) || label || 0x00 || context || LE32(L))

with L the output length in *bits*; the output is K(1) || K(2) || ...
truncated to L bits. Counter and L are little-endian (AMD firmware
``nist_kdf.c``; virtee/sev ``session/key.rs``).

The trusted channel derives, from the ECDH shared secret Z::

    master = KDF(Z, "sev-master-secret", nonce, 16 bytes)
    KEK    = KDF(master, "sev-kek", "", 16 bytes)
    KIK    = KDF(master, "sev-kik", "", 16 bytes)
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric import ec

LABEL_MASTER_SECRET = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"
LABEL_CEK = b"sev-chip-endorsement-key"

MASTER_SECRET_SIZE = 16
KEK_SIZE = 16
KIK_SIZE = 16
ECDH_SECRET_SIZE = 48  # x-coordinate on P-384
_MAX_OUTPUT = 1024  # bytes; nothing in SEV derives more than a few dozen


def kdf(key: bytes, label: bytes, context: bytes, size: int) -> bytes:
    """SP 800-108 counter-mode KDF (HMAC-SHA256 PRF) producing ``size`` bytes."""
    if not 0 < size <= _MAX_OUTPUT:
        raise ValueError(f"KDF output size {size} out of range")
    suffix = label + b"\x00" + context + struct.pack("<I", size * 8)
    out = bytearray()
    counter = 1
    while len(out) < size:
        out += hmac.new(key, struct.pack("<I", counter) + suffix, hashlib.sha256).digest()
        counter += 1
    return bytes(out[:size])


def ecdh_shared_secret(private_key: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """Z: the x-coordinate of d*Q, 48 bytes big-endian (the standard ECDH output).

    The firmware computes it little-endian on the CCP and byte-reverses it, so
    the two agree; virtee/sev and real hardware use this output directly.
    """
    if not isinstance(private_key.curve, ec.SECP384R1) or not isinstance(peer.curve, ec.SECP384R1):
        raise ValueError("SEV ECDH is defined on P-384 only")
    return private_key.exchange(ec.ECDH(), peer)


def derive_master_secret(shared_secret: bytes, nonce: bytes) -> bytes:
    return kdf(shared_secret, LABEL_MASTER_SECRET, nonce, MASTER_SECRET_SIZE)


def derive_kek(master_secret: bytes) -> bytes:
    return kdf(master_secret, LABEL_KEK, b"", KEK_SIZE)


def derive_kik(master_secret: bytes) -> bytes:
    return kdf(master_secret, LABEL_KIK, b"", KIK_SIZE)
