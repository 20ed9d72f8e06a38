"""What the guest owner trusts: the installation's AMD root, and platforms whose chain leads up to it.

::

    ARK --signs--> ASK --signs--> CEK --signs--> PEK --signs--> PDH
    (trusted by    (from the                     OCA --signs--> PEK
     its hash)      AMD root)                    OCA --signs--> OCA

Real owners trust AMD's ARK and fetch the ASK from AMD; here the ARK and ASK
belong to the installation and sit in its AMD root directory
(``amd-certs.json``, public certificates only), and the owner trusts the ARK by
its SHA-384 key hash, optionally pinned. The host sends the rest, as QEMU's
``query-sev-capabilities`` returns it: the PDH and PEK || OCA || CEK. A PDH is
used only if every link verifies, checked in the order of
:meth:`confmig.platform.psp.chain.PlatformCertificates.verify`, with an error
that names the failing link.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confmig.common.errors import ConfigError
from confmig.owner.errors import PlatformRejected
from confmig.platform.psp.amd_cert import AmdCertificate, validate_ark, validate_ask
from confmig.platform.psp.cert import SEV_CERT_SIZE, CertAlgo, CertUsage, sanity_check, validate
from confmig.platform.psp.chain import PLATFORM_CHAIN_SIZE, PlatformCertificates
from confmig.platform.psp.identity import load_amd_certificates
from confmig.platform.psp.status import SevError


@dataclass(frozen=True, slots=True, kw_only=True)
class AmdRoot:
    """The ARK (trusted by its key hash) and the ASK it signed."""

    ark: AmdCertificate
    ask: AmdCertificate
    trusted_ark_hash: bytes

    @classmethod
    def load(cls, root_dir: Path, *, pin: bytes | None = None) -> AmdRoot:
        """The root in ``root_dir``; with ``pin`` (SHA-384), its ARK must have that key hash.

        Raises ``ConfigError`` if the files are missing or corrupt, the pin
        does not match, or the ARK and ASK do not verify.
        """
        try:
            certs = load_amd_certificates(root_dir)
        except (KeyError, ValueError, SevError) as exc:
            raise ConfigError(f"AMD root {root_dir}: amd-certs.json is corrupt") from exc
        ark_hash = certs.trusted_ark_hash
        if pin is not None and not hmac.compare_digest(pin, ark_hash):
            raise ConfigError(f"AMD root {root_dir}: ARK key hash {ark_hash.hex()} is not the pinned one")
        root = cls(ark=certs.ark, ask=certs.ask, trusted_ark_hash=ark_hash)
        try:
            validate_ark(root.ark, trusted_hash=root.trusted_ark_hash)
            validate_ask(root.ask, root.ark)
        except SevError as exc:
            raise ConfigError(f"AMD root {root_dir}: ARK and ASK do not verify ({exc.status.name})") from exc
        return root


def _links(root: AmdRoot, c: PlatformCertificates) -> tuple[tuple[str, Callable[[], None]], ...]:
    # The order of PlatformCertificates.verify: root first, the PDH last.
    ark_hash = root.trusted_ark_hash
    return (
        ("the ARK is not the trusted AMD root", lambda: validate_ark(c.ark, trusted_hash=ark_hash)),
        ("the ASK is not signed by the ARK", lambda: validate_ask(c.ask, c.ark)),
        ("the CEK is not certified by the trusted root's ASK", lambda: validate(c.cek, c.ask.public_key())),
        ("the OCA is not a valid self-signed certificate", lambda: validate(c.oca, c.oca.public_key())),
        ("the PEK is not signed by the CEK", lambda: validate(c.pek, c.cek.public_key())),
        ("the PEK is not signed by the OCA", lambda: validate(c.pek, c.oca.public_key())),
        ("the PDH is not signed by the PEK", lambda: validate(c.pdh, c.pek.public_key())),
        (
            "the PDH is not an ECDH P-384 key",
            lambda: sanity_check(c.pdh, usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256),
        ),
    )


def verify_platform(root: AmdRoot, *, pdh: bytes, cert_chain: bytes) -> PlatformCertificates:
    """The platform's certificates, verified up to ``root``; ``PlatformRejected`` naming the bad link."""
    # SECURITY: pdh and cert_chain come from the untrusted host; nothing is used before every link verifies.
    if len(pdh) != SEV_CERT_SIZE:
        raise PlatformRejected(f"the PDH certificate is {len(pdh)} bytes, not {SEV_CERT_SIZE}")
    if len(cert_chain) != PLATFORM_CHAIN_SIZE:
        raise PlatformRejected(
            f"the certificate chain is {len(cert_chain)} bytes, not {PLATFORM_CHAIN_SIZE} (PEK || OCA || CEK)"
        )
    certs = PlatformCertificates.from_exports(
        pdh=pdh, platform_chain=cert_chain, ask=root.ask.to_bytes(), ark=root.ark.to_bytes()
    )
    for failure, check in _links(root, certs):
        try:
            check()
        except SevError as exc:
            raise PlatformRejected(f"platform certificates rejected: {failure} ({exc.status.name})") from exc
    return certs
