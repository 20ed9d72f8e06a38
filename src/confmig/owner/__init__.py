"""The guest owner: verifies platforms, checks launch measurements, releases secrets.

Trusted, outside the host: it holds the transport keys (TEK/TIK) of every
launch session and the secrets it releases. The host reaches it only over
HTTP with opaque blobs (``confmig.kvm``, ``confmig.vmm`` and ``confmig.proto``
must never import it); it uses the PSP's formats and cryptography
(certificates, session blob, packets, measurement) but never a
``SecureProcessor``.

* :mod:`.trust` — the trusted AMD root; a platform's chain verified up to it.
* :mod:`.measurement` — the expected launch (firmware digest, policy) and the check of LAUNCH_MEASURE.
* :mod:`.secret_table` — the SEV secret table (OVMF / ``efi_secret`` layout).
* :mod:`.profile` — a VM as configured: expected launch and secrets.
* :mod:`.session` — one launch session and its lifecycle.
* :mod:`.broker` — :class:`KeyBroker`, the sans-IO key broker.
* :mod:`.service`, :mod:`.client` — the HTTP API (:mod:`confmig.proto.keybroker`): its server, a client.
* :mod:`.cli` — ``confmig owner serve`` / ``confmig owner digest``.

``docs/owner.md`` has the overview and the wire format.
"""

from confmig.owner.broker import KeyBroker
from confmig.owner.client import OwnerClient
from confmig.owner.errors import (
    BrokerBusy,
    MeasurementRejected,
    OwnerError,
    PlatformRejected,
    PolicyRejected,
    RemoteOwnerError,
    RequestError,
    RequestTooLarge,
    SessionClosed,
    SessionError,
    SessionExpired,
    UnknownVm,
)
from confmig.owner.measurement import ExpectedLaunch, check_measurement, firmware_digest
from confmig.owner.profile import ANY_VM, DISK_PASSPHRASE_GUID, MIGRATION_TRANSPORT_KEY_GUID, VmProfile
from confmig.owner.secret_table import SECRET_TABLE_HEADER_GUID, build_secret_table
from confmig.owner.service import OwnerServer, make_server
from confmig.owner.trust import AmdRoot, verify_platform

__all__ = [
    "ANY_VM",
    "DISK_PASSPHRASE_GUID",
    "MIGRATION_TRANSPORT_KEY_GUID",
    "SECRET_TABLE_HEADER_GUID",
    "AmdRoot",
    "BrokerBusy",
    "ExpectedLaunch",
    "KeyBroker",
    "MeasurementRejected",
    "OwnerClient",
    "OwnerError",
    "OwnerServer",
    "PlatformRejected",
    "PolicyRejected",
    "RemoteOwnerError",
    "RequestError",
    "RequestTooLarge",
    "SessionClosed",
    "SessionError",
    "SessionExpired",
    "UnknownVm",
    "VmProfile",
    "build_secret_table",
    "check_measurement",
    "firmware_digest",
    "make_server",
    "verify_platform",
]
