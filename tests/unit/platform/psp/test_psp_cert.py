"""Certificates: layout, the chain up to the emulated AMD root, and every way to break it."""

from __future__ import annotations

import dataclasses
import stat
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from psp_fakes import make_identity

from confmig.common.errors import ConfigError
from confmig.platform.psp import (
    AmdCertificate,
    CertAlgo,
    CertUsage,
    PlatformCertificates,
    PlatformIdentity,
    SevCertificate,
    SevError,
    SevStatus,
    load_amd_certificates,
)
from confmig.platform.psp.cert import BODY_SIZE, SEV_CERT_SIZE, CertSignature, sanity_check, validate
from confmig.platform.psp.identity import AMD_CERTS_FILE, AMD_ROOT_FILE, IDENTITY_FILE


def _status(exc: pytest.ExceptionInfo[SevError]) -> SevStatus:
    return exc.value.status


@pytest.fixture(scope="module")
def chain(identity: PlatformIdentity, amd_root_dir: Path) -> PlatformCertificates:
    return identity.certificates


@pytest.fixture(scope="module")
def trusted(amd_root_dir: Path) -> bytes:
    return load_amd_certificates(amd_root_dir).trusted_ark_hash


def test_sev_certificate_layout(chain: PlatformCertificates) -> None:
    raw = chain.pdh.to_bytes()
    assert len(raw) == SEV_CERT_SIZE == 2084
    version, major, minor = struct.unpack_from("<IBB", raw)
    usage, algo, curve = struct.unpack_from("<III", raw, 0x08)
    assert (version, major, minor) == (1, 1, 55)
    assert (usage, algo, curve) == (CertUsage.PDH, CertAlgo.ECDH_SHA256, 2)
    numbers = chain.pdh.public_key().key.public_numbers()
    assert isinstance(numbers, ec.EllipticCurvePublicNumbers)
    # Coordinates little-endian, zero-padded to 72 bytes.
    assert raw[0x14 : 0x14 + 72] == numbers.x.to_bytes(72, "little")
    assert raw[0x5C : 0x5C + 72] == numbers.y.to_bytes(72, "little")
    # PDH signed by the PEK in slot 1; slot 2 unused.
    assert struct.unpack_from("<II", raw, 0x414) == (CertUsage.PEK, CertAlgo.ECDSA_SHA256)
    assert struct.unpack_from("<II", raw, 0x61C) == (CertUsage.INVALID, CertAlgo.INVALID)
    assert SevCertificate.from_bytes(raw) == chain.pdh
    # The PEK carries the OCA's signature, then the CEK's.
    assert (chain.pek.sig1.usage, chain.pek.sig2.usage) == (CertUsage.OCA, CertUsage.CEK)
    assert (chain.cek.sig1.usage, chain.cek.sig1.algo) == (CertUsage.ASK, CertAlgo.RSA_SHA384)


def test_amd_certificate_layout(chain: PlatformCertificates) -> None:
    raw = chain.ark.to_bytes()
    assert len(raw) == 64 + 3 * 256  # 2048-bit test keys; 64 + 3 * 512 with 4096
    assert struct.unpack_from("<I", raw)[0] == 1
    assert raw[4:20] == raw[20:36] == chain.ark.key_id  # self-certified
    assert struct.unpack_from("<I", raw, 0x24)[0] == CertUsage.ARK
    assert struct.unpack_from("<II", raw, 0x38) == (2048, 2048)
    assert chain.ask.certifying_id == chain.ark.key_id and chain.ask.key_usage == CertUsage.ASK
    assert AmdCertificate.from_bytes(chain.ask.to_bytes()) == chain.ask


def test_the_whole_chain_verifies(chain: PlatformCertificates, trusted: bytes) -> None:
    chain.verify(trusted_ark_hash=trusted)
    again = PlatformCertificates.from_exports(
        pdh=chain.pdh.to_bytes(),
        platform_chain=chain.platform_chain(),
        ask=chain.ask.to_bytes(),
        ark=chain.ark.to_bytes(),
    )
    again.verify(trusted_ark_hash=trusted)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _sev_offsets(cert: SevCertificate) -> list[int]:
    """Every field of the body, and every byte of the used signatures' usage/algo/r/s."""
    offsets = [0, 4, 5, 8, 0x0C, 0x10, 0x14, 0x14 + 47, 0x5C, 0x5C + 47, 0x5C + 60, 0x200, BODY_SIZE - 1]
    for base, sig in ((0x414, cert.sig1), (0x61C, cert.sig2)):
        offsets += [base, base + 4]  # usage, algo (an unused slot becomes malformed)
        if not sig.is_empty:
            offsets += [base + 8, base + 8 + 47, base + 8 + 72, base + 8 + 72 + 47]  # r, s
    return offsets


SEV_CERTS = ["pdh", "pek", "oca", "cek"]


def _with(
    chain: PlatformCertificates, name: str, cert: SevCertificate | AmdCertificate
) -> PlatformCertificates:
    fields = {f: getattr(chain, f) for f in ("pdh", "pek", "oca", "cek", "ask", "ark")}
    fields[name] = cert
    return PlatformCertificates(**fields)


@pytest.mark.parametrize("name", SEV_CERTS)
def test_a_flipped_byte_in_any_sev_certificate_breaks_the_chain(
    chain: PlatformCertificates, trusted: bytes, name: str
) -> None:
    cert: SevCertificate = getattr(chain, name)
    raw = cert.to_bytes()
    for offset in _sev_offsets(cert):
        broken = _with(chain, name, SevCertificate.from_bytes(_flip(raw, offset)))
        with pytest.raises(SevError) as exc:
            broken.verify(trusted_ark_hash=trusted)
        assert _status(exc) in (SevStatus.BAD_SIGNATURE, SevStatus.INVALID_CERTIFICATE), (name, hex(offset))


@pytest.mark.parametrize("name", ["ask", "ark"])
def test_a_flipped_byte_in_an_amd_certificate_breaks_the_chain(
    chain: PlatformCertificates, trusted: bytes, name: str
) -> None:
    cert: AmdCertificate = getattr(chain, name)
    raw = cert.to_bytes()
    for offset in [
        0,
        4,
        20,
        0x24,
        0x28,
        0x38,
        0x3C,
        64,
        64 + 255,
        64 + 256,
        64 + 511,
        64 + 512,
        len(raw) - 1,
    ]:
        with pytest.raises(SevError) as exc:
            _with(chain, name, AmdCertificate.from_bytes(_flip(raw, offset))).verify(trusted_ark_hash=trusted)
        assert _status(exc) in (SevStatus.BAD_SIGNATURE, SevStatus.INVALID_CERTIFICATE), (name, offset)


def test_another_installations_root_is_not_trusted(chain: PlatformCertificates, tmp_path: Path) -> None:
    other = make_identity(tmp_path / "host", tmp_path / "other-root")
    with pytest.raises(SevError) as exc:
        other.certificates.verify(trusted_ark_hash=chain.ark.public_key_hash())
    assert _status(exc) is SevStatus.INVALID_CERTIFICATE
    # Nor a chain that mixes one installation's platform with another's AMD keys.
    with pytest.raises(SevError):
        dataclasses.replace(chain, ask=other.certificates.ask, ark=other.certificates.ark).verify(
            trusted_ark_hash=other.certificates.ark.public_key_hash()
        )


def test_wrong_usage_is_refused(chain: PlatformCertificates) -> None:
    with pytest.raises(SevError) as exc:
        sanity_check(chain.pek, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256)
    assert _status(exc) is SevStatus.INVALID_CERTIFICATE
    with pytest.raises(SevError) as exc:
        sanity_check(chain.pdh, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA384)
    assert _status(exc) is SevStatus.INVALID_CERTIFICATE
    # A PDH validated against the OCA: a signature by it is missing (and the OCA may not sign a PDH).
    with pytest.raises(SevError) as exc:
        validate(chain.pdh, chain.oca.public_key())
    assert _status(exc) is SevStatus.INVALID_CERTIFICATE


def test_a_point_not_on_the_curve_is_refused(chain: PlatformCertificates) -> None:
    raw = bytearray(chain.pdh.to_bytes())
    raw[0x5C] ^= 0x01  # y + 1 (or - 1): no longer on P-384
    cert = SevCertificate.from_bytes(bytes(raw))
    for check in (
        lambda: sanity_check(cert, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256),
        cert.public_key,
    ):
        with pytest.raises(SevError) as exc:
            check()
        assert _status(exc) is SevStatus.INVALID_CERTIFICATE
    # Coordinates beyond the 48 bytes of a P-384 field element are not reduced away.
    raw = bytearray(chain.pdh.to_bytes())
    raw[0x14 + 60] = 1
    with pytest.raises(SevError):
        SevCertificate.from_bytes(bytes(raw)).public_key()


def test_version_and_curve_are_checked(chain: PlatformCertificates) -> None:
    for offset, value in ((0x00, 2), (0x10, 1)):
        raw = bytearray(chain.pdh.to_bytes())
        struct.pack_into("<I", raw, offset, value)
        with pytest.raises(SevError) as exc:
            sanity_check(
                SevCertificate.from_bytes(bytes(raw)), usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256
            )
        assert _status(exc) is SevStatus.INVALID_CERTIFICATE


def test_a_malformed_signature_slot_is_bad_signature(chain: PlatformCertificates) -> None:
    cert = dataclasses.replace(
        chain.pdh, sig2=CertSignature(usage=CertUsage.INVALID, algo=CertAlgo.ECDSA_SHA256)
    )
    with pytest.raises(SevError) as exc:
        validate(cert, chain.pek.public_key())
    assert _status(exc) is SevStatus.BAD_SIGNATURE


def test_certificate_length_is_checked() -> None:
    with pytest.raises(SevError) as exc:
        SevCertificate.from_bytes(bytes(2083))
    assert _status(exc) is SevStatus.INVALID_LEN


# -- identity persistence ---------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_survives_a_restart_and_files_are_private(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "host"
    first = make_identity(state, root)
    second = make_identity(state, root)
    assert second.certificates == first.certificates
    peer = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert second.pdh_shared_secret(peer) == first.pdh_shared_secret(peer)  # same private PDH
    for path in (root / AMD_ROOT_FILE, root / AMD_CERTS_FILE, state / IDENTITY_FILE):
        assert _mode(path) == 0o600, path
    assert _mode(state) == 0o700 and _mode(root) == 0o700
    assert not [p for p in (*root.iterdir(), *state.iterdir()) if p.name.endswith(".tmp")]


def test_hosts_of_one_installation_share_the_root_but_not_their_keys(
    identity: PlatformIdentity, amd_root_dir: Path, tmp_path: Path
) -> None:
    other = make_identity(tmp_path / "host-b", amd_root_dir)
    assert other.certificates.ark == identity.certificates.ark
    assert other.certificates.ask == identity.certificates.ask
    for name in ("pdh", "pek", "oca", "cek"):
        assert getattr(other.certificates, name) != getattr(identity.certificates, name), name
    other.certificates.verify(trusted_ark_hash=load_amd_certificates(amd_root_dir).trusted_ark_hash)


def test_a_corrupt_identity_file_is_refused(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "host"
    make_identity(state, root)
    path = state / IDENTITY_FILE
    data = bytearray(path.read_bytes())
    at = data.index(b'"pdh_key"') + 20
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError):
        make_identity(state, root)


def test_a_racing_host_adopts_the_root_that_won(tmp_path: Path) -> None:
    from confmig.platform.psp import AmdRootOfTrust

    root = tmp_path / "root"
    winner = AmdRootOfTrust.load_or_create(root, key_bits=2048)
    loser = AmdRootOfTrust._generate(2048, lambda n: b"\x01" * n)
    assert not loser._save(root / AMD_ROOT_FILE)
    assert AmdRootOfTrust.load_or_create(root, key_bits=2048).certificates == winner.certificates
