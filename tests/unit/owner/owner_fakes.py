"""The PSP test platform (``tests/support/psp_fakes.py``) with the host's side of an
owner-attested launch, and the launch up to LAUNCH_MEASURE with ``confmig.owner`` as the owner."""

from __future__ import annotations

from psp_fakes import Platform as PspPlatform
from psp_fakes import make_identity

from confmig.common.units import Spa
from confmig.owner import KeyBroker
from confmig.platform.psp import (
    ActivateRequest,
    Asid,
    GuestHandle,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    PdhCertExportRequest,
)
from confmig.proto.keybroker import LaunchRequest, MeasurementRequest

__all__ = ["Platform", "launch_to_measure", "make_identity"]


class Platform(PspPlatform):
    """The PSP test platform with the host's side of an owner-attested launch."""

    def export(self) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT: the PDH and PEK || OCA || CEK, as query-sev-capabilities returns them."""
        export = self.psp.pdh_cert_export(PdhCertExportRequest(pdh_cert_len=2084, certs_len=3 * 2084))
        return export.pdh_cert, export.cert_chain

    def start(self, policy: int, *, godh: bytes, session: bytes, asid: int) -> GuestHandle:
        """LAUNCH_START with the owner's session, then ACTIVATE (what KVM's LAUNCH_START does)."""
        started = self.psp.launch_start(LaunchStartRequest(policy=policy, dh_cert=godh, session=session))
        self.psp.activate(ActivateRequest(handle=started.handle, asid=Asid(asid)))
        return started.handle

    def import_firmware(self, handle: GuestHandle, image: bytes, spa: Spa) -> None:
        """What the VMM does with ``-bios``: copy the image in, then LAUNCH_UPDATE_DATA over it."""
        self.memory.write_plain(spa, image)
        self.psp.launch_update_data(LaunchUpdateDataRequest(handle=handle, paddr=spa, length=len(image)))


def launch_to_measure(
    p: Platform, broker: KeyBroker, *, vm: str, policy: int, image: bytes, spa: Spa, asid: int,
    migration_target: bool = False,
) -> tuple[GuestHandle, str, MeasurementRequest]:
    """The host's launch up to LAUNCH_MEASURE with ``broker`` as the owner: what the VMM relays."""
    pdh, chain = p.export()
    offer = broker.launch(LaunchRequest(vm=vm, pdh=pdh, cert_chain=chain, policy=policy,
                                        migration_target=migration_target))
    handle = p.start(policy, godh=offer.godh, session=offer.session, asid=asid)
    p.import_firmware(handle, image, spa)
    fw = p.psp.firmware
    measured = MeasurementRequest(
        measurement=p.measure(handle), api_major=fw.api_major, api_minor=fw.api_minor, build=fw.build
    )
    return handle, offer.session_id, measured
