"""AMD's own certificate format, used by the ARK (root) and the ASK (SEV signing key).

Layout (little-endian; AMD firmware ``amd_cert.h``, virtee/sev ``ca/cert/v1.rs``)::

    0x00  version            u32 (= 1)
    0x04  key_id             u8[16]
    0x14  certifying_id      u8[16]   (the signer's key_id; the ARK's own for the ARK)
    0x24  key_usage          u32      (ARK 0x00, ASK 0x13)
    0x28  reserved           u8[16]
    0x38  pubexp_size_bits   u32      (2048 or 4096)
    0x3C  modulus_size_bits  u32      (2048 or 4096)
    0x40  pubexp             pubexp_size_bits/8 bytes, little-endian
          modulus            modulus_size_bits/8 bytes, little-endian
          signature          modulus_size_bits/8 bytes, little-endian (byte-reversed RSA-PSS)

The signature is RSA-PSS with SHA-384 (MGF1-SHA-384, salt = 48 bytes) over
everything before it. The firmware always hashes with SHA-384 here and, when
it exports an AMD key to check a SEV certificate (the CEK's signature by the
ASK), labels it RSA_SHA384.

Emulation: AMD's real ARK is trusted because its hash is fused into the chip.
Our ARK belongs to the installation (see ``identity.py``); ``validate_ark``
takes the trusted hash the caller obtained out of band.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric import rsa

from confmig.platform.psp.cert import CertAlgo, CertKeyPair, CertPublicKey, CertUsage
from confmig.platform.psp.status import SevError, SevStatus

AMD_CERT_VERSION: Final = 1
KEY_ID_SIZE: Final = 16
_FIXED: Final = struct.Struct("<I16s16sI16sII")  # 64 bytes
_KEY_BITS: Final = frozenset({2048, 4096})
AMD_CERT_MAX_SIZE: Final = _FIXED.size + 3 * 4096 // 8


@dataclass(frozen=True, slots=True, kw_only=True)
class AmdCertificate:
    key_id: bytes
    certifying_id: bytes
    key_usage: int
    pubexp_bits: int
    modulus_bits: int
    pubexp: bytes = field(repr=False)
    modulus: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    version: int = AMD_CERT_VERSION
    reserved: bytes = bytes(KEY_ID_SIZE)

    @classmethod
    def from_bytes(cls, data: bytes) -> AmdCertificate:
        # SECURITY: sizes come from the certificate itself; bound them before slicing.
        if len(data) < _FIXED.size or len(data) > AMD_CERT_MAX_SIZE:
            raise SevError(SevStatus.INVALID_CERTIFICATE)
        version, key_id, certifying_id, usage, reserved, pubexp_bits, modulus_bits = _FIXED.unpack_from(data)
        if pubexp_bits not in _KEY_BITS or modulus_bits not in _KEY_BITS:
            raise SevError(SevStatus.INVALID_CERTIFICATE)
        e_size, n_size = pubexp_bits // 8, modulus_bits // 8
        if len(data) != _FIXED.size + e_size + 2 * n_size:
            raise SevError(SevStatus.INVALID_CERTIFICATE)
        off = _FIXED.size
        return cls(
            version=version,
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=usage,
            reserved=reserved,
            pubexp_bits=pubexp_bits,
            modulus_bits=modulus_bits,
            pubexp=bytes(data[off : off + e_size]),
            modulus=bytes(data[off + e_size : off + e_size + n_size]),
            signature=bytes(data[off + e_size + n_size :]),
        )

    def signed_part(self) -> bytes:
        fixed = _FIXED.pack(
            self.version,
            self.key_id,
            self.certifying_id,
            self.key_usage,
            self.reserved,
            self.pubexp_bits,
            self.modulus_bits,
        )
        return fixed + self.pubexp + self.modulus

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    def public_key_hash(self) -> bytes:
        """SHA-384 over the fixed part, exponent and modulus: what the chip has fused for the ARK."""
        return hashlib.sha384(self.signed_part()).digest()

    def rsa_public_key(self) -> rsa.RSAPublicKey:
        e = int.from_bytes(self.pubexp, "little")
        n = int.from_bytes(self.modulus, "little")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise SevError(SevStatus.INVALID_CERTIFICATE) from None

    def public_key(self) -> CertPublicKey:
        """The key as the firmware exports it to check SEV certificates (``amd_cert_export_pubkey``)."""
        return CertPublicKey(usage=self.key_usage, algo=CertAlgo.RSA_SHA384, key=self.rsa_public_key())


def _cert_size(data: bytes) -> int:
    """The size the fixed part of the certificate at the start of ``data`` declares."""
    if len(data) < _FIXED.size:
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    fields = _FIXED.unpack_from(data)
    pubexp_bits, modulus_bits = int(fields[5]), int(fields[6])
    if pubexp_bits not in _KEY_BITS or modulus_bits not in _KEY_BITS:
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    return _FIXED.size + pubexp_bits // 8 + 2 * (modulus_bits // 8)


def split_amd_chain(data: bytes) -> tuple[AmdCertificate, AmdCertificate]:
    """ASK || ARK, as SEND_START's ``amd_certs`` carries them: (ask, ark).

    Each certificate's size follows from its own key sizes; anything that is
    not exactly two certificates is ``INVALID_CERTIFICATE``.
    """
    # SECURITY: bytes from the host; sizes are bounded by _cert_size before slicing.
    ask_size = _cert_size(data)
    ask = AmdCertificate.from_bytes(data[:ask_size])
    return ask, AmdCertificate.from_bytes(data[ask_size:])


def _verify(cert: AmdCertificate, parent: AmdCertificate) -> None:
    signer = CertPublicKey(usage=parent.key_usage, algo=CertAlgo.RSA_SHA384, key=parent.rsa_public_key())
    # The signature field is as long as the certificate's own modulus (amd_cert_init).
    if not signer.verify(cert.signed_part(), cert.signature):
        raise SevError(SevStatus.BAD_SIGNATURE)


def _validate(cert: AmdCertificate, parent: AmdCertificate, usage: CertUsage) -> None:
    if parent.modulus_bits not in _KEY_BITS or cert.modulus_bits not in _KEY_BITS:
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    _verify(cert, parent)  # the signature before any other field
    if cert.version != AMD_CERT_VERSION or cert.pubexp_bits not in _KEY_BITS:
        raise SevError(SevStatus.INVALID_CERTIFICATE)
    if cert.key_usage != usage or cert.certifying_id != parent.key_id:
        raise SevError(SevStatus.INVALID_CERTIFICATE)


def validate_ark(ark: AmdCertificate, *, trusted_hash: bytes) -> None:
    """Self-signed, usage ARK, and its key hash equals the trusted (fused) one."""
    _validate(ark, ark, CertUsage.ARK)
    if not hmac.compare_digest(ark.public_key_hash(), trusted_hash):
        raise SevError(SevStatus.INVALID_CERTIFICATE)


def validate_ask(ask: AmdCertificate, ark: AmdCertificate) -> None:
    """Signed by the ARK, usage ASK, certifying id = the ARK's key id."""
    _validate(ask, ark, CertUsage.ASK)


def issue_amd_cert(
    *,
    key: rsa.RSAPublicKey,
    key_id: bytes,
    usage: CertUsage,
    signer: rsa.RSAPrivateKey,
    signer_key_id: bytes,
) -> AmdCertificate:
    """An AMD-format certificate for ``key``, signed by ``signer`` (emulation only: AMD signs real ones)."""
    bits = key.key_size
    if bits not in _KEY_BITS or signer.key_size != bits:
        raise ValueError("ARK and ASK must be RSA keys of one size, 2048 or 4096 bits")
    numbers = key.public_numbers()
    unsigned = AmdCertificate(
        key_id=key_id,
        certifying_id=signer_key_id,
        key_usage=usage,
        pubexp_bits=bits,
        modulus_bits=bits,
        pubexp=numbers.e.to_bytes(bits // 8, "little"),
        modulus=numbers.n.to_bytes(bits // 8, "little"),
        signature=b"",
    )
    # Only the ARK signs AMD-format certificates (itself and the ASK).
    signing_key = CertKeyPair(usage=CertUsage.ARK, algo=CertAlgo.RSA_SHA384, key=signer)
    sig = signing_key.sign(unsigned.signed_part())[: bits // 8]
    return AmdCertificate(
        key_id=key_id,
        certifying_id=signer_key_id,
        key_usage=usage,
        pubexp_bits=bits,
        modulus_bits=bits,
        pubexp=unsigned.pubexp,
        modulus=unsigned.modulus,
        signature=sig,
    )
