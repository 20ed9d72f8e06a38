"""The SEV certificate (2084 bytes): layout, signing, validation.

Layout (little-endian, packed; AMD firmware ``sev_cert.h``, virtee/sev)::

    0x000  version      u32 (= 1)
    0x004  api_major    u8
    0x005  api_minor    u8
    0x006  reserved     u8[2]
    0x008  pubkey.usage u32
    0x00C  pubkey.algo  u32
    0x010  pubkey.key   1028 bytes, for ECC:  curve u32 | Qx[72] | Qy[72] | zeros
                                    for RSA:  modulus_bits u32 | pub_exp[512] | modulus[512]
    0x414  sig1         usage u32 | algo u32 | sig[512]
    0x61C  sig2         usage u32 | algo u32 | sig[512]

Integers (coordinates, ECDSA r and s, RSA values and signatures) are stored
little-endian, zero-padded. A signature covers the body, bytes 0x000-0x413.
An unused signature slot has usage INVALID (0x1000) and algo INVALID (0); a
slot where only one of the two is INVALID is malformed.

Validation follows the firmware exactly (``sev_cert.c``): first the signing
key must be valid, then a signature slot matching the signing key's usage and
algo must verify, then the body is checked, then the parent/child usages must
fit (PDH by PEK, PEK by OCA or CEK, OCA by itself, CEK by ASK).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from confmig.platform.psp.secret import Secret
from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import DEFAULT_FIRMWARE, FirmwareVersion

SEV_CERT_SIZE: Final = 0x824  # 2084
SEV_CERT_VERSION: Final = 1
BODY_SIZE: Final = 0x414
_KEY_UNION_SIZE: Final = 1028
_SIG_SIZE: Final = 512
_SIG_SLOT_SIZE: Final = 8 + _SIG_SIZE
_SIG1_OFFSET: Final = BODY_SIZE
_SIG2_OFFSET: Final = BODY_SIZE + _SIG_SLOT_SIZE
_ECC_COORD_SIZE: Final = 72
_RSA_FIELD_SIZE: Final = 512
_P384_SIZE: Final = 48


class CertUsage(IntEnum):
    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class CertAlgo(IntEnum):
    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103


class EccCurve(IntEnum):
    P256 = 1
    P384 = 2


_VALID_USAGES: Final = frozenset(u for u in CertUsage if u is not CertUsage.INVALID)
_RSA_ALGOS: Final = frozenset({CertAlgo.RSA_SHA256, CertAlgo.RSA_SHA384})
_ECDSA_ALGOS: Final = frozenset({CertAlgo.ECDSA_SHA256, CertAlgo.ECDSA_SHA384})
_ECC_ALGOS: Final = _ECDSA_ALGOS | {CertAlgo.ECDH_SHA256, CertAlgo.ECDH_SHA384}
_RSA_MAX_BITS: Final = 4096  # rsa_pubkey_is_valid: any modulus up to the 512-byte field

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _hash_for(algo: int) -> hashes.HashAlgorithm:
    return hashes.SHA384() if algo & 0x100 else hashes.SHA256()


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


@dataclass(frozen=True, slots=True, kw_only=True)
class CertSignature:
    """One signature slot: who signed (usage), how (algo), and the 512-byte payload."""

    usage: int = CertUsage.INVALID
    algo: int = CertAlgo.INVALID
    sig: bytes = bytes(_SIG_SIZE)

    @property
    def is_empty(self) -> bool:
        return self.usage == CertUsage.INVALID

    @property
    def is_malformed(self) -> bool:
        return (self.algo == CertAlgo.INVALID) != (self.usage == CertUsage.INVALID)

    def to_bytes(self) -> bytes:
        return struct.pack("<II", self.usage, self.algo) + self.sig

    @classmethod
    def from_bytes(cls, data: bytes) -> CertSignature:
        usage, algo = struct.unpack_from("<II", data)
        return cls(usage=usage, algo=algo, sig=bytes(data[8:_SIG_SLOT_SIZE]))


@dataclass(frozen=True, slots=True, kw_only=True)
class CertPublicKey:
    """A public key with its SEV usage and algorithm (the firmware's ``sev_cert_pubkey_t``)."""

    usage: int
    algo: int
    key: PublicKey

    def is_valid(self) -> bool:
        if self.usage not in _VALID_USAGES:
            return False
        if self.algo in _RSA_ALGOS:
            return isinstance(self.key, rsa.RSAPublicKey) and self.key.key_size <= _RSA_MAX_BITS
        if self.algo in _ECC_ALGOS:
            return isinstance(self.key, ec.EllipticCurvePublicKey) and isinstance(
                self.key.curve, ec.SECP384R1
            )
        return False

    def verify(self, message: bytes, sig: bytes) -> bool:
        """True if the 512-byte signature payload ``sig`` is this key's signature of ``message``."""
        digest = _hash_for(self.algo)
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                r = int.from_bytes(sig[:_ECC_COORD_SIZE], "little")
                s = int.from_bytes(sig[_ECC_COORD_SIZE : 2 * _ECC_COORD_SIZE], "little")
                self.key.verify(encode_dss_signature(r, s), message, ec.ECDSA(digest))
            else:
                size = self.key.key_size // 8
                self.key.verify(
                    sig[:size][::-1],
                    message,
                    padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size),
                    digest,
                )
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class CertKeyPair(Secret):
    """A key pair with its SEV usage and algorithm (``sev_cert_keypair_t``). Never leaves the platform."""

    usage: int
    algo: int
    key: PrivateKey

    def public(self) -> CertPublicKey:
        return CertPublicKey(usage=self.usage, algo=self.algo, key=self.key.public_key())

    def sign(self, message: bytes) -> bytes:
        """The 512-byte signature payload of ``message`` in AMD's little-endian layout."""
        digest = _hash_for(self.algo)
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            if self.algo not in _ECDSA_ALGOS:
                raise SevError(SevStatus.UNSUPPORTED)  # an ECDH key does not sign
            r, s = decode_dss_signature(self.key.sign(message, ec.ECDSA(digest)))
            payload = _le(r, _ECC_COORD_SIZE) + _le(s, _ECC_COORD_SIZE)
        else:
            big_endian = self.key.sign(
                message, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest
            )
            payload = big_endian[::-1]
        return payload.ljust(_SIG_SIZE, b"\x00")


def encode_public_key(key: PublicKey) -> bytes:
    """The 1028-byte key union for ``key``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise ValueError("SEV certificates carry P-384 keys")
        numbers = key.public_numbers()
        x, y = _le(numbers.x, _ECC_COORD_SIZE), _le(numbers.y, _ECC_COORD_SIZE)
        body = struct.pack("<I", EccCurve.P384) + x + y
    else:
        rsa_numbers = key.public_numbers()
        body = (
            struct.pack("<I", key.key_size)
            + _le(rsa_numbers.e, _RSA_FIELD_SIZE)
            + _le(rsa_numbers.n, _RSA_FIELD_SIZE)
        )
    return body.ljust(_KEY_UNION_SIZE, b"\x00")


def _decode_public_key(algo: int, key: bytes) -> PublicKey | None:
    """The key in a certificate's key union, or None if it is not a valid key."""
    # SECURITY: every byte here may come from a peer; any failure means "invalid key".
    try:
        if algo in _ECC_ALGOS:
            (curve,) = struct.unpack_from("<I", key)
            if curve != EccCurve.P384:
                return None
            x = int.from_bytes(key[4 : 4 + _ECC_COORD_SIZE], "little")
            y = int.from_bytes(key[4 + _ECC_COORD_SIZE : 4 + 2 * _ECC_COORD_SIZE], "little")
            return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
        if algo in _RSA_ALGOS:
            (bits,) = struct.unpack_from("<I", key)
            if not 0 < bits <= _RSA_MAX_BITS:
                return None
            e = int.from_bytes(key[4 : 4 + _RSA_FIELD_SIZE], "little")
            n = int.from_bytes(key[4 + _RSA_FIELD_SIZE : 4 + 2 * _RSA_FIELD_SIZE], "little")
            return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        return None
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SevCertificate:
    version: int = SEV_CERT_VERSION
    api_major: int = DEFAULT_FIRMWARE.api_major
    api_minor: int = DEFAULT_FIRMWARE.api_minor
    reserved: bytes = bytes(2)
    usage: int = CertUsage.INVALID
    algo: int = CertAlgo.INVALID
    key: bytes = field(default=bytes(_KEY_UNION_SIZE), repr=False)
    sig1: CertSignature = field(default=CertSignature(), repr=False)
    sig2: CertSignature = field(default=CertSignature(), repr=False)

    @classmethod
    def build(
        cls,
        public_key: PublicKey,
        *,
        usage: CertUsage,
        algo: CertAlgo,
        firmware: FirmwareVersion = DEFAULT_FIRMWARE,
    ) -> SevCertificate:
        """An unsigned certificate for ``public_key`` (the firmware's ``sev_cert_create``)."""
        return cls(
            api_major=firmware.api_major,
            api_minor=firmware.api_minor,
            usage=usage,
            algo=algo,
            key=encode_public_key(public_key),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SevCertificate:
        if len(data) != SEV_CERT_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        version, api_major, api_minor = struct.unpack_from("<IBB", data)
        usage, algo = struct.unpack_from("<II", data, 0x08)
        return cls(
            version=version,
            api_major=api_major,
            api_minor=api_minor,
            reserved=bytes(data[6:8]),
            usage=usage,
            algo=algo,
            key=bytes(data[0x10:BODY_SIZE]),
            sig1=CertSignature.from_bytes(data[_SIG1_OFFSET:_SIG2_OFFSET]),
            sig2=CertSignature.from_bytes(data[_SIG2_OFFSET:SEV_CERT_SIZE]),
        )

    def body(self) -> bytes:
        """The signed part, bytes 0x000-0x413."""
        return (
            struct.pack("<IBB", self.version, self.api_major, self.api_minor)
            + self.reserved
            + struct.pack("<II", self.usage, self.algo)
            + self.key
        )

    def to_bytes(self) -> bytes:
        return self.body() + self.sig1.to_bytes() + self.sig2.to_bytes()

    def public_key(self) -> CertPublicKey:
        """The certified key; ``SevError(INVALID_CERTIFICATE)`` if it is not a valid key."""
        key = _decode_public_key(self.algo, self.key)
        if key is None or self.usage not in _VALID_USAGES:
            raise SevError(SevStatus.INVALID_CERTIFICATE)
        return CertPublicKey(usage=self.usage, algo=self.algo, key=key)

    def with_signature(self, sig: CertSignature) -> SevCertificate:
        """Place ``sig`` in the first unused slot (``sev_cert_set_sig``)."""
        if self.sig1.is_empty:
            return replace(self, sig1=sig)
        if self.sig2.is_empty:
            return replace(self, sig2=sig)
        raise SevError(SevStatus.INVALID_CERTIFICATE)

    def signed_by(self, signer: CertKeyPair) -> SevCertificate:
        if signer.usage not in _VALID_USAGES:
            raise ValueError(f"cannot sign with usage {signer.usage:#x}")
        sig = CertSignature(usage=signer.usage, algo=signer.algo, sig=signer.sign(self.body()))
        return self.with_signature(sig)


def _body_is_valid(cert: SevCertificate) -> bool:
    return (
        cert.version == SEV_CERT_VERSION
        and cert.usage in _VALID_USAGES
        and (_decode_public_key(cert.algo, cert.key) is not None)
    )


def sanity_check(cert: SevCertificate, *, usage: CertUsage, algo: CertAlgo) -> None:
    """Version 1, a valid key (a P-384 point on the curve), the expected usage and algo.

    What the firmware asks of a peer's PDH when no signature chain is checked
    (``sev_cert_sanity_check``). Raises ``SevError(INVALID_CERTIFICATE)``.
    """
    if not _body_is_valid(cert) or cert.usage != usage or cert.algo != algo:
        raise SevError(SevStatus.INVALID_CERTIFICATE)


_PARENT_USAGES: Final[dict[int, frozenset[int]]] = {
    CertUsage.PDH: frozenset({CertUsage.PEK}),
    CertUsage.PEK: frozenset({CertUsage.OCA, CertUsage.CEK}),
    CertUsage.OCA: frozenset({CertUsage.OCA}),
    CertUsage.CEK: frozenset({CertUsage.ASK}),
}


def _check_signatures(cert: SevCertificate, signer: CertPublicKey) -> None:
    # No slot made by this key: INVALID_CERTIFICATE. A slot made by it that does
    # not verify: BAD_SIGNATURE, unless a later slot by the same key verifies.
    status = SevStatus.INVALID_CERTIFICATE
    for sig in (cert.sig1, cert.sig2):
        if sig.is_malformed:
            raise SevError(SevStatus.BAD_SIGNATURE)
        if sig.algo != signer.algo or sig.usage != signer.usage:
            continue
        if signer.algo not in _RSA_ALGOS | _ECDSA_ALGOS:
            raise SevError(SevStatus.UNSUPPORTED)
        status = SevStatus.SUCCESS if signer.verify(cert.body(), sig.sig) else SevStatus.BAD_SIGNATURE
    if status is not SevStatus.SUCCESS:
        raise SevError(status)


def validate(cert: SevCertificate, signer: CertPublicKey) -> None:
    """Check that ``signer`` signed ``cert`` and may sign it (``sev_cert_validate``).

    Raises ``SevError`` with INVALID_CERTIFICATE or BAD_SIGNATURE.
    """
    if not signer.is_valid():
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    _check_signatures(cert, signer)
    if not _body_is_valid(cert):
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    if signer.usage not in _PARENT_USAGES.get(cert.usage, frozenset()):
        raise SevError(SevStatus.INVALID_CERTIFICATE)
