"""The AMD Secure Processor (PSP) running the SEV firmware, emulated with real cryptography.

Trusted: holds the platform's private keys, every guest's VEK and transport
keys. Nothing here is importable from ``kvm``/``vmm`` (import-linter).

Start with :class:`SecureProcessor` (the firmware), :class:`PlatformIdentity`
(the keys and certificates, persisted), :class:`KeySlotWriter` (how it fills the
memory-encryption engine's key slots), :class:`GuestMemoryPort` (how it reaches
guest memory) and :class:`PspMailbox` (the PSP as KVM's ``SecureProcessor``
port sees it). The guest owner's side of the protocol is in
:mod:`.session` (:func:`create_launch_session`), :mod:`.measure` and
:mod:`.packet` (:func:`seal_launch_secret`); :mod:`.chain` verifies a
platform's certificates up to the AMD root. Migration between two PSPs is
SEND_* on one and RECEIVE_* on the other (:class:`SecureProcessor`);
:class:`PspCostModel` makes its speed an explicit assumption. ``docs/psp.md`` has the overview.
"""

from confmig.platform.psp.amd_cert import AmdCertificate
from confmig.platform.psp.cert import CertAlgo, CertUsage, SevCertificate
from confmig.platform.psp.chain import PlatformCertificates
from confmig.platform.psp.commands import (
    ActivateRequest,
    DbgDecryptRequest,
    DbgDecryptResponse,
    DbgEncryptRequest,
    DeactivateRequest,
    DecommissionRequest,
    DfFlushRequest,
    GuestStatus,
    GuestStatusRequest,
    InitRequest,
    LaunchFinishRequest,
    LaunchMeasureRequest,
    LaunchMeasureResponse,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchStartResponse,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExportRequest,
    PdhCertExportResponse,
    PlatformStatus,
    PlatformStatusRequest,
    ReceiveFinishRequest,
    ReceiveStartRequest,
    ReceiveStartResponse,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendCancelRequest,
    SendFinishRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateResponse,
    SendUpdateVmsaRequest,
    SevRequest,
    SevResponse,
    ShutdownRequest,
)
from confmig.platform.psp.cost import PspCostModel
from confmig.platform.psp.handles import Asid, GuestHandle
from confmig.platform.psp.identity import (
    AmdCertificates,
    AmdRootOfTrust,
    PlatformIdentity,
    load_amd_certificates,
)
from confmig.platform.psp.keystore import VEK_SIZE, KeySlotWriter
from confmig.platform.psp.mailbox import PspMailbox
from confmig.platform.psp.measure import LaunchMeasurement, launch_digest, measurement_matches
from confmig.platform.psp.memory import GuestMemoryPort, SpaOutOfRange
from confmig.platform.psp.packet import PacketHeader, seal_launch_secret
from confmig.platform.psp.policy import GuestPolicy, PolicyFlag
from confmig.platform.psp.psp import PspConfig, SecureProcessor
from confmig.platform.psp.session import LaunchSession, TransportKeys, create_launch_session
from confmig.platform.psp.states import GuestState, PlatformState, SevCommand
from confmig.platform.psp.status import SevError, SevStatus
from confmig.platform.psp.version import FirmwareVersion
from confmig.platform.psp.vmsa import TmrMemory, vmsa_image

__all__ = [
    "VEK_SIZE",
    "ActivateRequest",
    "AmdCertificate",
    "AmdCertificates",
    "AmdRootOfTrust",
    "Asid",
    "CertAlgo",
    "CertUsage",
    "DbgDecryptRequest",
    "DbgDecryptResponse",
    "DbgEncryptRequest",
    "DeactivateRequest",
    "DecommissionRequest",
    "DfFlushRequest",
    "FirmwareVersion",
    "GuestHandle",
    "GuestMemoryPort",
    "GuestPolicy",
    "GuestState",
    "GuestStatus",
    "GuestStatusRequest",
    "InitRequest",
    "KeySlotWriter",
    "LaunchFinishRequest",
    "LaunchMeasureRequest",
    "LaunchMeasureResponse",
    "LaunchMeasurement",
    "LaunchSecretRequest",
    "LaunchSession",
    "LaunchStartRequest",
    "LaunchStartResponse",
    "LaunchUpdateDataRequest",
    "LaunchUpdateVmsaRequest",
    "PacketHeader",
    "PdhCertExportRequest",
    "PdhCertExportResponse",
    "PlatformCertificates",
    "PlatformIdentity",
    "PlatformState",
    "PlatformStatus",
    "PlatformStatusRequest",
    "PolicyFlag",
    "PspConfig",
    "PspCostModel",
    "PspMailbox",
    "ReceiveFinishRequest",
    "ReceiveStartRequest",
    "ReceiveStartResponse",
    "ReceiveUpdateDataRequest",
    "ReceiveUpdateVmsaRequest",
    "SecureProcessor",
    "SendCancelRequest",
    "SendFinishRequest",
    "SendStartRequest",
    "SendStartResponse",
    "SendUpdateDataRequest",
    "SendUpdateResponse",
    "SendUpdateVmsaRequest",
    "SevCertificate",
    "SevCommand",
    "SevError",
    "SevRequest",
    "SevResponse",
    "SevStatus",
    "ShutdownRequest",
    "SpaOutOfRange",
    "TmrMemory",
    "TransportKeys",
    "create_launch_session",
    "launch_digest",
    "load_amd_certificates",
    "measurement_matches",
    "seal_launch_secret",
    "vmsa_image",
]
