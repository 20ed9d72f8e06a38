"""A platform's full certificate chain and its verification up to the AMD root.

::

    ARK --signs--> ASK --signs--> CEK --signs--> PEK --signs--> PDH
                                  OCA --signs--> PEK
                                  OCA --signs--> OCA

PDH_CERT_EXPORT hands out the PDH and PEK || OCA || CEK; the ASK and ARK come
from AMD (in this emulation, from the installation's root directory). The
guest owner verifies the whole chain before trusting a PDH; SEND_START
verifies parts of the receiver's chain depending on the guest's policy
(:func:`verify_sev_chain` under the SEV bit, :func:`verify_domain_chain` under
the DOMAIN bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from confmig.platform.psp.amd_cert import AmdCertificate, validate_ark, validate_ask
from confmig.platform.psp.cert import SEV_CERT_SIZE, SevCertificate, validate
from confmig.platform.psp.status import SevError, SevStatus

PLATFORM_CHAIN_SIZE: Final = 3 * SEV_CERT_SIZE  # PEK || OCA || CEK


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformCertificates:
    pdh: SevCertificate
    pek: SevCertificate
    oca: SevCertificate
    cek: SevCertificate
    ask: AmdCertificate
    ark: AmdCertificate

    def platform_chain(self) -> bytes:
        """PEK || OCA || CEK, the layout of PDH_CERT_EXPORT and SEND_START."""
        return self.pek.to_bytes() + self.oca.to_bytes() + self.cek.to_bytes()

    def amd_chain(self) -> bytes:
        """ASK || ARK, the layout of SEND_START's ``amd_certs``."""
        return self.ask.to_bytes() + self.ark.to_bytes()

    @classmethod
    def from_exports(
        cls, *, pdh: bytes, platform_chain: bytes, ask: bytes, ark: bytes
    ) -> PlatformCertificates:
        # SECURITY: bytes from an untrusted host; only lengths are checked here, verify() does the rest.
        if len(platform_chain) != PLATFORM_CHAIN_SIZE:
            raise SevError(SevStatus.INVALID_LEN)
        pek, oca, cek = (
            SevCertificate.from_bytes(platform_chain[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE])
            for i in range(3)
        )
        return cls(
            pdh=SevCertificate.from_bytes(pdh),
            pek=pek,
            oca=oca,
            cek=cek,
            ask=AmdCertificate.from_bytes(ask),
            ark=AmdCertificate.from_bytes(ark),
        )

    def verify(self, *, trusted_ark_hash: bytes) -> None:
        """The whole chain, root first. Raises ``SevError`` (INVALID_CERTIFICATE, BAD_SIGNATURE)."""
        validate_ark(self.ark, trusted_hash=trusted_ark_hash)
        validate_ask(self.ask, self.ark)
        validate(self.cek, self.ask.public_key())
        validate(self.oca, self.oca.public_key())
        validate(self.pek, self.cek.public_key())
        validate(self.pek, self.oca.public_key())
        validate(self.pdh, self.pek.public_key())


def verify_sev_chain(
    *,
    pdh: SevCertificate,
    pek: SevCertificate,
    cek: SevCertificate,
    ask: AmdCertificate,
    ark: AmdCertificate,
    trusted_ark_hash: bytes,
) -> None:
    """ARK -> ASK -> CEK -> PEK -> PDH, root first (SEND_START under the SEV policy bit).

    Raises ``SevError`` (INVALID_CERTIFICATE, BAD_SIGNATURE) at the first link that fails.
    """
    validate_ark(ark, trusted_hash=trusted_ark_hash)
    validate_ask(ask, ark)
    validate(cek, ask.public_key())
    validate(pek, cek.public_key())
    validate(pdh, pek.public_key())


def verify_domain_chain(*, pdh: SevCertificate, pek: SevCertificate, oca: SevCertificate) -> None:
    """OCA (self-signed) -> PEK -> PDH (SEND_START under the DOMAIN policy bit).

    Whether the OCA is *ours* is the caller's check (a POLICY_FAILURE, not a certificate error).
    """
    validate(oca, oca.public_key())
    validate(pek, oca.public_key())
    validate(pdh, pek.public_key())
