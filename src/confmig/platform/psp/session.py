"""The 128-byte session blob that carries the transport keys (TEK, TIK) to a PSP.

Layout (AMD firmware ``sev_channel.h``)::

    0x00  NONCE       16   context of the master-secret KDF
    0x10  WRAP_TK     32   AES-128-CTR(KEK, IV=WRAP_IV) over TEK || TIK
    0x30  WRAP_IV     16
    0x40  WRAP_MAC    32   HMAC-SHA256(KIK, WRAP_TK)
    0x60  POLICY_MAC  32   HMAC-SHA256(TIK, policy as LE32)

The sender of the keys (the guest owner for LAUNCH_START, the source PSP for
SEND_START) builds it with :func:`wrap_session`; the receiving PSP opens it
with :func:`unwrap_session` and checks :func:`verify_policy_mac`. Both are
pure functions of their inputs, so the owner and the firmware share them and
the known-answer vectors apply to both.

:func:`create_launch_session` is the owner's whole step for LAUNCH_START: an
ephemeral P-384 key, its (unsigned) PDH certificate, fresh TEK/TIK, the blob.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confmig.platform.psp.cert import CertAlgo, CertUsage, SevCertificate, sanity_check
from confmig.platform.psp.kdf import derive_kek, derive_kik, derive_master_secret, ecdh_shared_secret
from confmig.platform.psp.secret import Secret
from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import DEFAULT_FIRMWARE, FirmwareVersion

SESSION_SIZE: Final = 128
NONCE_SIZE: Final = 16
WRAP_IV_SIZE: Final = 16
TEK_SIZE: Final = 16
TIK_SIZE: Final = 16
MAC_SIZE: Final = 32

Rng = Callable[[int], bytes]


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class TransportKeys(Secret):
    """TEK (AES-128-CTR key) and TIK (HMAC-SHA256 key) of one trusted channel."""

    tek: bytes
    tik: bytes

    def __post_init__(self) -> None:
        if len(self.tek) != TEK_SIZE or len(self.tik) != TIK_SIZE:
            raise ValueError("TEK and TIK are 16 bytes each")

    @classmethod
    def generate(cls, rng: Rng = os.urandom) -> TransportKeys:
        return cls(tek=rng(TEK_SIZE), tik=rng(TIK_SIZE))

    @classmethod
    def zero(cls) -> TransportKeys:
        """The firmware's channel when LAUNCH_START had no session: all-zero keys."""
        return cls(tek=bytes(TEK_SIZE), tik=bytes(TIK_SIZE))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionBlob:
    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionBlob:
        if len(data) != SESSION_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        return cls(
            nonce=bytes(data[0x00:0x10]),
            wrap_tk=bytes(data[0x10:0x30]),
            wrap_iv=bytes(data[0x30:0x40]),
            wrap_mac=bytes(data[0x40:0x60]),
            policy_mac=bytes(data[0x60:0x80]),
        )

    def to_bytes(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def policy_mac(tik: bytes, policy: int) -> bytes:
    return hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest()


def wrap_session(
    *, master_secret: bytes, keys: TransportKeys, policy: int, nonce: bytes, wrap_iv: bytes
) -> SessionBlob:
    """Build the blob (the firmware's ``create_session``).

    ``nonce`` must be the one the master secret was derived with.
    """
    if len(nonce) != NONCE_SIZE or len(wrap_iv) != WRAP_IV_SIZE:
        raise ValueError("nonce and WRAP_IV are 16 bytes each")
    kek = derive_kek(master_secret)
    kik = derive_kik(master_secret)
    wrap_tk = _aes_ctr(kek, wrap_iv, keys.tek + keys.tik)
    return SessionBlob(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=hmac.new(kik, wrap_tk, hashlib.sha256).digest(),
        policy_mac=policy_mac(keys.tik, policy),
    )


def unwrap_session(*, master_secret: bytes, blob: SessionBlob) -> TransportKeys:
    """Check WRAP_MAC, then unwrap TEK || TIK (the firmware's ``establish_channel``).

    Raises ``SevError(BAD_MEASUREMENT)`` if the MAC does not match.
    """
    kik = derive_kik(master_secret)
    expected = hmac.new(kik, blob.wrap_tk, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, blob.wrap_mac):
        raise SevError(SevStatus.BAD_MEASUREMENT)
    keys = _aes_ctr(derive_kek(master_secret), blob.wrap_iv, blob.wrap_tk)
    return TransportKeys(tek=keys[:TEK_SIZE], tik=keys[TEK_SIZE:])


def verify_policy_mac(keys: TransportKeys, policy: int, blob: SessionBlob) -> None:
    """Raises ``SevError(BAD_MEASUREMENT)`` unless POLICY_MAC covers ``policy``."""
    if not hmac.compare_digest(policy_mac(keys.tik, policy), blob.policy_mac):
        raise SevError(SevStatus.BAD_MEASUREMENT)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class LaunchSession(Secret):
    """What the guest owner keeps and sends for LAUNCH_START.

    ``dh_cert`` (2084 bytes) and ``session`` (128 bytes) go to the host with
    the policy; ``keys`` stay with the owner, for checking LAUNCH_MEASURE and
    sealing LAUNCH_SECRET.
    """

    dh_cert: bytes
    session: bytes
    policy: int
    keys: TransportKeys


def create_launch_session(
    platform_pdh: SevCertificate,
    *,
    policy: int,
    firmware: FirmwareVersion = DEFAULT_FIRMWARE,
    rng: Rng = os.urandom,
) -> LaunchSession:
    """The owner's side of LAUNCH_START for a platform whose PDH the owner has verified."""
    sanity_check(platform_pdh, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256)
    peer = platform_pdh.public_key().key
    assert isinstance(peer, ec.EllipticCurvePublicKey)  # sanity_check guarantees an ECDH key
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    dh_cert = SevCertificate.build(
        ephemeral.public_key(), usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256, firmware=firmware
    )
    nonce = rng(NONCE_SIZE)
    master = derive_master_secret(ecdh_shared_secret(ephemeral, peer), nonce)
    keys = TransportKeys.generate(rng)
    wrap_iv = rng(WRAP_IV_SIZE)
    blob = wrap_session(master_secret=master, keys=keys, policy=policy, nonce=nonce, wrap_iv=wrap_iv)
    return LaunchSession(dh_cert=dh_cert.to_bytes(), session=blob.to_bytes(), policy=policy, keys=keys)
