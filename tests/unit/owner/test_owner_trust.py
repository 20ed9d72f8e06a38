"""Platform verification: a chain up to the trusted AMD root, or a refusal naming the bad link."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from confmig.common.errors import ConfigError
from confmig.owner import AmdRoot, PlatformRejected, verify_platform
from confmig.platform.psp import PlatformCertificates, PlatformIdentity, SevError
from confmig.platform.psp.cert import CertAlgo, CertUsage, SevCertificate

CERT = 2084
SIG1, SIG2 = 0x414 + 8, 0x61C + 8  # first byte of each signature payload
PEK, OCA, CEK = 0, CERT, 2 * CERT  # offsets in PEK || OCA || CEK


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


def _exports(identity: PlatformIdentity) -> tuple[bytes, bytes]:
    return identity.certificates.pdh.to_bytes(), identity.certificates.platform_chain()


def pdh(identity: PlatformIdentity) -> bytes:
    return identity.certificates.pdh.to_bytes()


def chain(identity: PlatformIdentity) -> bytes:
    return identity.certificates.platform_chain()


def test_a_platform_of_the_trusted_installation_verifies(root: AmdRoot, identity: PlatformIdentity) -> None:
    certs = verify_platform(root, pdh=pdh(identity), cert_chain=chain(identity))
    assert certs.pdh.to_bytes() == pdh(identity) and certs.platform_chain() == chain(identity)


def _ecdsa_pdh(host: PlatformIdentity) -> bytes:
    """A "PDH" the PEK really signed, but with a signing algorithm: only the last check catches it."""
    key = host.certificates.pdh.public_key().key
    cert = SevCertificate.build(key, usage=CertUsage.PDH, algo=CertAlgo.ECDSA_SHA256)
    return cert.signed_by(host._pek).to_bytes()


# (this host, another host of the installation, a host of another installation) -> (pdh, chain)
Tamper = Callable[[PlatformIdentity, PlatformIdentity, PlatformIdentity], tuple[bytes, bytes]]
BAD: dict[str, tuple[Tamper, str]] = {
    "pdh signature": (lambda h, s, f: (_flip(pdh(h), SIG1 + 3), chain(h)), "PDH is not signed by the PEK"),
    "pdh key": (lambda h, s, f: (_flip(pdh(h), 0x20), chain(h)), "PDH is not signed by the PEK"),
    "pdh of another host": (lambda h, s, f: (pdh(s), chain(h)), "PDH is not signed by the PEK"),
    "pek as pdh": (lambda h, s, f: (chain(h)[:CERT], chain(h)), "PDH is not signed by the PEK"),
    "pdh with a signing algo": (lambda h, s, f: (_ecdsa_pdh(h), chain(h)), "PDH is not an ECDH P-384 key"),
    "pek signed by oca": (
        lambda h, s, f: (pdh(h), _flip(chain(h), PEK + SIG1 + 5)),
        "PEK is not signed by the OCA",
    ),
    "pek signed by cek": (
        lambda h, s, f: (pdh(h), _flip(chain(h), PEK + SIG2 + 5)),
        "PEK is not signed by the CEK",
    ),
    "oca": (lambda h, s, f: (pdh(h), _flip(chain(h), OCA + SIG1 + 7)), "OCA is not a valid self-signed"),
    "cek": (lambda h, s, f: (pdh(h), _flip(chain(h), CEK + SIG1 + 9)), "CEK is not certified"),
    "cek body": (lambda h, s, f: (pdh(h), _flip(chain(h), CEK + 0x30)), "CEK is not certified"),
    "chain of another installation": (lambda h, s, f: _exports(f), "CEK is not certified"),
    "pek of another host": (
        lambda h, s, f: (pdh(h), chain(s)[:CERT] + chain(h)[CERT:]),
        "PEK is not signed by the CEK",
    ),
    "chain out of order": (
        lambda h, s, f: (pdh(h), chain(h)[CERT : 2 * CERT] + chain(h)[:CERT] + chain(h)[2 * CERT :]),
        "OCA is not a valid self-signed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_link_is_refused_by_name(
    case: str, root: AmdRoot, identity: PlatformIdentity, sibling: PlatformIdentity, foreign: PlatformIdentity
) -> None:
    tamper, reason = BAD[case]
    bad_pdh, bad_chain = tamper(identity, sibling, foreign)
    with pytest.raises(PlatformRejected, match=reason):
        verify_platform(root, pdh=bad_pdh, cert_chain=bad_chain)
    if case != "pdh with a signing algo":  # the PSP's own verify() ends at the signatures
        certs = PlatformCertificates.from_exports(
            pdh=bad_pdh, platform_chain=bad_chain, ask=root.ask.to_bytes(), ark=root.ark.to_bytes()
        )
        with pytest.raises(SevError):
            certs.verify(trusted_ark_hash=root.trusted_ark_hash)


@pytest.mark.parametrize(
    ("pdh_len", "chain_len"), [(0, 3 * CERT), (CERT - 1, 3 * CERT), (CERT, 2 * CERT), (CERT, 3 * CERT + 1)]
)
def test_wrong_lengths_are_refused(
    root: AmdRoot, identity: PlatformIdentity, pdh_len: int, chain_len: int
) -> None:
    with pytest.raises(PlatformRejected, match="bytes, not"):
        verify_platform(root, pdh=(pdh(identity) * 2)[:pdh_len], cert_chain=(chain(identity) * 2)[:chain_len])


def test_a_root_the_owner_does_not_trust_refuses_every_platform(
    foreign_root_dir: Path, identity: PlatformIdentity, foreign: PlatformIdentity
) -> None:
    foreign_root = AmdRoot.load(foreign_root_dir)
    with pytest.raises(PlatformRejected, match="CEK is not certified"):
        verify_platform(foreign_root, pdh=pdh(identity), cert_chain=chain(identity))
    verify_platform(foreign_root, pdh=pdh(foreign), cert_chain=chain(foreign))
    with pytest.raises(PlatformRejected, match="ARK is not the trusted AMD root"):
        unpinned = replace(foreign_root, trusted_ark_hash=bytes(48))
        verify_platform(unpinned, pdh=pdh(foreign), cert_chain=chain(foreign))


def test_loading_the_root(amd_root_dir: Path, root: AmdRoot, tmp_path: Path) -> None:
    assert AmdRoot.load(amd_root_dir, pin=root.trusted_ark_hash) == root
    with pytest.raises(ConfigError, match="not the pinned one"):
        AmdRoot.load(amd_root_dir, pin=bytes(48))
    with pytest.raises(ConfigError, match="cannot read"):
        AmdRoot.load(tmp_path)
