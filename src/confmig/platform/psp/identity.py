"""The platform's identity: its keys and certificates, made on first start and kept on disk.

Two levels, as on real hardware:

* The **AMD root of trust** (:class:`AmdRootOfTrust`): an ARK and an ASK, RSA,
  in AMD's certificate format. AMD holds these for real chips; in the
  emulation they belong to the *installation* and are shared by all its hosts,
  in a directory the caller chooses (``amd_root_dir``). Only the ASK's private
  key is ever used: once per host, to certify the host's CEK.
* The **platform identity** (:class:`PlatformIdentity`), one per host, in the
  host's state directory:

  - a chip-unique key (CUK, 32 random bytes) from which the CEK (ECDSA P-384)
    is derived as the firmware does: ``KDF(SHA-256(CUK), "sev-chip-endorsement-key")``
    gives 56 bytes *c*, and *d = (c mod (n-1)) + 1* (FIPS 186-4 B.4.1; the
    byte order of *c* is our choice, nothing outside the PSP depends on it);
  - the CEK certificate, signed by the ASK (the firmware exports the CEK
    unsigned and owners fetch the signed one from AMD's key server; the
    emulation folds that lookup in and exports the signed one);
  - the OCA (ECDSA P-384, self-signed), the PEK (ECDSA P-384, signed by the
    OCA and the CEK) and the PDH (ECDH P-384, signed by the PEK), all with the
    algorithms the firmware uses (ECDSA_SHA256, ECDH_SHA256).

Private keys leave this package only for its state files: both classes redact ``repr``
and refuse pickling, and every file is written with mode 0600, which keeps them from
other users, not from processes of the user the hosts run as (docs/architecture.md,
"Trust boundary").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from confmig.common.errors import ConfigError
from confmig.platform.psp.amd_cert import KEY_ID_SIZE, AmdCertificate, issue_amd_cert
from confmig.platform.psp.cert import CertAlgo, CertKeyPair, CertUsage, SevCertificate
from confmig.platform.psp.chain import PlatformCertificates
from confmig.platform.psp.kdf import LABEL_CEK, ecdh_shared_secret, kdf
from confmig.platform.psp.persist import create_state_file, read_state_file
from confmig.platform.psp.secret import Secret
from confmig.platform.psp.status import SevError
from confmig.platform.psp.version import DEFAULT_FIRMWARE, FirmwareVersion

AMD_ROOT_FILE: Final = "amd-root.json"
AMD_CERTS_FILE: Final = "amd-certs.json"
IDENTITY_FILE: Final = "psp-identity.json"
CUK_SIZE: Final = 32
_CEK_SEED_BITS: Final = 384 + 64  # FIPS 186-4 B.4.1: len(n) + 64 bits
_P384_ORDER: Final = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
)

Rng = Callable[[int], bytes]


def _der(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).hex()


def _load_ec(hex_der: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(bytes.fromhex(hex_der), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError("PSP identity holds a key that is not P-384")
    return key


def _load_rsa(hex_der: str) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(bytes.fromhex(hex_der), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("AMD root holds a key that is not RSA")
    return key


def _same_key(cert: SevCertificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key().key.public_numbers() == key.public_key().public_numbers()


@dataclass(frozen=True, slots=True, kw_only=True)
class AmdCertificates:
    """The installation's public AMD certificates, for guest owners and SEND_START."""

    ark: AmdCertificate
    ask: AmdCertificate

    @property
    def trusted_ark_hash(self) -> bytes:
        """What a chip of this installation has "fused": the ARK's key hash."""
        return self.ark.public_key_hash()


def load_amd_certificates(root_dir: Path) -> AmdCertificates:
    payload = read_state_file(root_dir / AMD_CERTS_FILE, "amd-certs")
    return AmdCertificates(
        ark=AmdCertificate.from_bytes(bytes.fromhex(payload["ark_cert"])),
        ask=AmdCertificate.from_bytes(bytes.fromhex(payload["ask_cert"])),
    )


def amd_chain(root_dir: Path) -> bytes:
    """ASK || ARK of the installation's AMD root: SEND_START's ``amd_certs`` (QEMU's
    ``sev-amd-cert``), what a real host fetches from AMD's key distribution server."""
    certs = load_amd_certificates(root_dir)
    return certs.ask.to_bytes() + certs.ark.to_bytes()


class AmdRootOfTrust(Secret):
    """The emulated ARK and ASK with their private keys."""

    __slots__ = ("_ark_key", "_ask_key", "certificates")

    def __init__(
        self, *, ark_key: rsa.RSAPrivateKey, ask_key: rsa.RSAPrivateKey, certificates: AmdCertificates
    ) -> None:
        self._ark_key = ark_key
        self._ask_key = ask_key
        self.certificates = certificates

    @classmethod
    def load_or_create(cls, root_dir: Path, *, key_bits: int = 4096, rng: Rng = os.urandom) -> AmdRootOfTrust:
        """Load the installation's root, creating it if this is the first host to start."""
        path = root_dir / AMD_ROOT_FILE
        if not path.exists():
            root = cls._generate(key_bits, rng)
            root._save(path)  # another host may win the race; we then load its root
        root = cls._load(path)
        create_state_file(
            root_dir / AMD_CERTS_FILE,
            "amd-certs",
            {
                "ark_cert": root.certificates.ark.to_bytes().hex(),
                "ask_cert": root.certificates.ask.to_bytes().hex(),
            },
        )
        return root

    @classmethod
    def _generate(cls, key_bits: int, rng: Rng) -> AmdRootOfTrust:
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        ark_id, ask_id = rng(KEY_ID_SIZE), rng(KEY_ID_SIZE)
        ark = issue_amd_cert(
            key=ark_key.public_key(), key_id=ark_id, usage=CertUsage.ARK, signer=ark_key, signer_key_id=ark_id
        )
        ask = issue_amd_cert(
            key=ask_key.public_key(), key_id=ask_id, usage=CertUsage.ASK, signer=ark_key, signer_key_id=ark_id
        )
        return cls(ark_key=ark_key, ask_key=ask_key, certificates=AmdCertificates(ark=ark, ask=ask))

    def _save(self, path: Path) -> bool:
        return create_state_file(
            path,
            "amd-root",
            {
                "ark_key": _der(self._ark_key),
                "ask_key": _der(self._ask_key),
                "ark_cert": self.certificates.ark.to_bytes().hex(),
                "ask_cert": self.certificates.ask.to_bytes().hex(),
            },
        )

    @classmethod
    def _load(cls, path: Path) -> AmdRootOfTrust:
        payload = read_state_file(path, "amd-root")
        try:
            return cls(
                ark_key=_load_rsa(payload["ark_key"]),
                ask_key=_load_rsa(payload["ask_key"]),
                certificates=AmdCertificates(
                    ark=AmdCertificate.from_bytes(bytes.fromhex(payload["ark_cert"])),
                    ask=AmdCertificate.from_bytes(bytes.fromhex(payload["ask_cert"])),
                ),
            )
        except (KeyError, ValueError, SevError) as exc:
            raise ConfigError(f"AMD root file {path} is corrupt") from exc

    def certify_cek(self, cek_cert: SevCertificate) -> SevCertificate:
        """Sign a chip's CEK certificate with the ASK (what AMD's key server hands out)."""
        ask = CertKeyPair(usage=CertUsage.ASK, algo=CertAlgo.RSA_SHA384, key=self._ask_key)
        return cek_cert.signed_by(ask)


def derive_cek(cuk: bytes) -> ec.EllipticCurvePrivateKey:
    """The chip endorsement key from the chip-unique key (see the module docstring)."""
    seed = hashes.Hash(hashes.SHA256())
    seed.update(cuk)
    c = int.from_bytes(kdf(seed.finalize(), LABEL_CEK, b"", _CEK_SEED_BITS // 8), "big")
    return ec.derive_private_key(c % (_P384_ORDER - 1) + 1, ec.SECP384R1())


class PlatformIdentity(Secret):
    """One host's CEK, OCA, PEK and PDH key pairs and certificates."""

    __slots__ = ("_cek", "_cuk", "_oca", "_pdh", "_pek", "certificates")

    def __init__(
        self,
        *,
        cuk: bytes,
        oca: ec.EllipticCurvePrivateKey,
        pek: ec.EllipticCurvePrivateKey,
        pdh: ec.EllipticCurvePrivateKey,
        certificates: PlatformCertificates,
    ) -> None:
        self._cuk = cuk
        self._cek = CertKeyPair(usage=CertUsage.CEK, algo=CertAlgo.ECDSA_SHA256, key=derive_cek(cuk))
        self._oca = CertKeyPair(usage=CertUsage.OCA, algo=CertAlgo.ECDSA_SHA256, key=oca)
        self._pek = CertKeyPair(usage=CertUsage.PEK, algo=CertAlgo.ECDSA_SHA256, key=pek)
        self._pdh = CertKeyPair(usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256, key=pdh)
        self.certificates = certificates
        c = certificates
        if not (
            _same_key(c.cek, self._cek_key)
            and _same_key(c.oca, oca)
            and _same_key(c.pek, pek)
            and _same_key(c.pdh, pdh)
        ):
            raise ConfigError("PSP identity: a private key does not match its certificate")

    @property
    def _cek_key(self) -> ec.EllipticCurvePrivateKey:
        key = self._cek.key
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        *,
        amd_root_dir: Path,
        firmware: FirmwareVersion = DEFAULT_FIRMWARE,
        amd_key_bits: int = 4096,
        rng: Rng = os.urandom,
    ) -> PlatformIdentity:
        """The identity kept in ``state_dir``, created (and certified by the AMD root) on first start."""
        path = state_dir / IDENTITY_FILE
        if not path.exists():
            root = AmdRootOfTrust.load_or_create(amd_root_dir, key_bits=amd_key_bits, rng=rng)
            cls._generate(root, firmware, rng)._save(path)
        return cls._load(path)

    @classmethod
    def _generate(cls, root: AmdRootOfTrust, firmware: FirmwareVersion, rng: Rng) -> PlatformIdentity:
        cuk = rng(CUK_SIZE)
        cek = CertKeyPair(usage=CertUsage.CEK, algo=CertAlgo.ECDSA_SHA256, key=derive_cek(cuk))
        oca_key = ec.generate_private_key(ec.SECP384R1())
        oca = CertKeyPair(usage=CertUsage.OCA, algo=CertAlgo.ECDSA_SHA256, key=oca_key)
        pek_key = ec.generate_private_key(ec.SECP384R1())
        pek = CertKeyPair(usage=CertUsage.PEK, algo=CertAlgo.ECDSA_SHA256, key=pek_key)
        pdh_key = ec.generate_private_key(ec.SECP384R1())

        def cert(key: ec.EllipticCurvePrivateKey, usage: CertUsage, algo: CertAlgo) -> SevCertificate:
            return SevCertificate.build(key.public_key(), usage=usage, algo=algo, firmware=firmware)

        assert isinstance(cek.key, ec.EllipticCurvePrivateKey)
        certificates = PlatformCertificates(
            cek=root.certify_cek(cert(cek.key, CertUsage.CEK, CertAlgo.ECDSA_SHA256)),
            oca=cert(oca_key, CertUsage.OCA, CertAlgo.ECDSA_SHA256).signed_by(oca),
            # The firmware signs the PEK with the OCA first, then the CEK.
            pek=cert(pek_key, CertUsage.PEK, CertAlgo.ECDSA_SHA256).signed_by(oca).signed_by(cek),
            pdh=cert(pdh_key, CertUsage.PDH, CertAlgo.ECDH_SHA256).signed_by(pek),
            ask=root.certificates.ask,
            ark=root.certificates.ark,
        )
        return cls(cuk=cuk, oca=oca_key, pek=pek_key, pdh=pdh_key, certificates=certificates)

    def _save(self, path: Path) -> bool:
        c = self.certificates
        return create_state_file(
            path,
            "platform-identity",
            {
                "cuk": self._cuk.hex(),
                "oca_key": _der(self._oca_key),
                "pek_key": _der(self._pek_key),
                "pdh_key": _der(self._pdh_key),
                "cek_cert": c.cek.to_bytes().hex(),
                "oca_cert": c.oca.to_bytes().hex(),
                "pek_cert": c.pek.to_bytes().hex(),
                "pdh_cert": c.pdh.to_bytes().hex(),
                "ask_cert": c.ask.to_bytes().hex(),
                "ark_cert": c.ark.to_bytes().hex(),
            },
        )

    @classmethod
    def _load(cls, path: Path) -> PlatformIdentity:
        p = read_state_file(path, "platform-identity")
        try:

            def sev(name: str) -> SevCertificate:
                return SevCertificate.from_bytes(bytes.fromhex(p[name]))

            certificates = PlatformCertificates(
                cek=sev("cek_cert"),
                oca=sev("oca_cert"),
                pek=sev("pek_cert"),
                pdh=sev("pdh_cert"),
                ask=AmdCertificate.from_bytes(bytes.fromhex(p["ask_cert"])),
                ark=AmdCertificate.from_bytes(bytes.fromhex(p["ark_cert"])),
            )
            return cls(
                cuk=bytes.fromhex(p["cuk"]),
                oca=_load_ec(p["oca_key"]),
                pek=_load_ec(p["pek_key"]),
                pdh=_load_ec(p["pdh_key"]),
                certificates=certificates,
            )
        except (KeyError, ValueError, SevError) as exc:
            raise ConfigError(f"PSP identity file {path} is corrupt") from exc

    @property
    def _oca_key(self) -> ec.EllipticCurvePrivateKey:
        assert isinstance(self._oca.key, ec.EllipticCurvePrivateKey)
        return self._oca.key

    @property
    def _pek_key(self) -> ec.EllipticCurvePrivateKey:
        assert isinstance(self._pek.key, ec.EllipticCurvePrivateKey)
        return self._pek.key

    @property
    def _pdh_key(self) -> ec.EllipticCurvePrivateKey:
        assert isinstance(self._pdh.key, ec.EllipticCurvePrivateKey)
        return self._pdh.key

    @property
    def pdh_usage(self) -> int:
        return self._pdh.usage

    @property
    def pdh_algo(self) -> int:
        return self._pdh.algo

    def pdh_shared_secret(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH of the platform PDH with a peer's public key: Z, 48 bytes."""
        return ecdh_shared_secret(self._pdh_key, peer)
