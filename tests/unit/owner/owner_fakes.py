"""In-memory stand-ins for the key slots and the memory-encryption engine, and a platform built on them.

A copy of ``tests/unit/platform/psp/psp_fakes.py`` (test modules do not import
each other across directories), without the fake owner: the owner here is
``confmig.owner``.

:class:`FakeKeySlots` has the shape of ``confmig.platform.mee.KeySlots``
(install, clear, vek) without the shared memory. :class:`FakeSystemMemory`
implements :class:`~confmig.platform.psp.memory.GuestMemoryPort` over a
bytearray of "system physical memory"; private accesses are encrypted per
16-byte block with an XEX construction keyed by the slot's VEK and tweaked by
the block's address: enough to show that the PSP only ever hands the port
plaintext and ASIDs, never keys, and that ciphertext is bound to key and
address. ``test_psp_with_mee.py`` runs the PSP on the real engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confmig.common.units import Spa
from confmig.owner import KeyBroker
from confmig.owner.wire import LaunchRequest, MeasurementRequest
from confmig.platform.psp import (
    ActivateRequest,
    Asid,
    DfFlushRequest,
    GuestHandle,
    InitRequest,
    LaunchMeasureRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    PdhCertExportRequest,
    PlatformIdentity,
    PspConfig,
    SecureProcessor,
    SpaOutOfRange,
)
from confmig.platform.psp.commands import INIT_FLAG_ES
from confmig.platform.psp.vmsa import TMR_SIZE

MEMORY_SIZE = 256 * 1024
TEST_CONFIG = PspConfig(min_sev_asid=17)
"""ASIDs 1-16 for SEV-ES guests, 17-509 for SEV guests."""
TMR_BASE = Spa(0x1000_0000)  # outside the fake RAM: the TMR is PSP-private here


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _ecb(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(data) + ctx.finalize()


class FakeKeySlots:
    def __init__(self) -> None:
        self._slots: dict[int, bytes] = {}

    def install(self, asid: int, vek: bytes) -> None:
        assert 1 <= asid <= 509 and len(vek) == 16
        self._slots[asid] = bytes(vek)

    def clear(self, asid: int) -> None:
        self._slots.pop(asid, None)

    def vek(self, asid: int) -> bytes | None:
        return self._slots.get(asid)


class FakeSystemMemory:
    def __init__(self, keys: FakeKeySlots, size: int = MEMORY_SIZE) -> None:
        self.raw = bytearray(size)
        self._keys = keys
        self.private_writes = 0

    def _check(self, spa: int, size: int) -> None:
        if spa < 0 or size < 0 or spa + size > len(self.raw):
            raise SpaOutOfRange(f"[{spa:#x}, +{size:#x}) outside {len(self.raw):#x} bytes")
        if spa % 16 or size % 16:
            raise ValueError("private accesses are whole 16-byte blocks")

    def _vek(self, asid: int) -> bytes:
        vek = self._keys.vek(asid)
        if vek is None:
            raise PermissionError(f"no key in the slot of ASID {asid}")
        return vek

    def _tweaks(self, vek: bytes, spa: int, size: int) -> bytes:
        addresses = b"".join((spa + i).to_bytes(16, "little") for i in range(0, size, 16))
        return _ecb(bytes(b ^ 0x5C for b in vek), addresses)

    def read(self, spa: Spa, size: int) -> bytes:
        if spa < 0 or spa + size > len(self.raw):
            raise SpaOutOfRange(f"[{spa:#x}, +{size:#x})")
        return bytes(self.raw[spa : spa + size])

    def read_encrypted(self, asid: Asid, spa: Spa, size: int) -> bytes:
        self._check(spa, size)
        vek = self._vek(asid)
        t = self._tweaks(vek, spa, size)
        return _xor(_ecb(vek, _xor(bytes(self.raw[spa : spa + size]), t), decrypt=True), t)

    def write_encrypted(self, asid: Asid, spa: Spa, data: bytes) -> None:
        self._check(spa, len(data))
        vek = self._vek(asid)
        t = self._tweaks(vek, spa, len(data))
        self.raw[spa : spa + len(data)] = _xor(_ecb(vek, _xor(data, t)), t)
        self.private_writes += 1

    def write_plain(self, spa: int, data: bytes) -> None:
        """What the host does before LAUNCH_UPDATE_DATA: copy plaintext into guest memory."""
        self.raw[spa : spa + len(data)] = data


@dataclass
class Platform:
    """A PSP wired to fake memory, as the composition root will wire it to the MEE."""

    psp: SecureProcessor
    memory: FakeSystemMemory
    keys: FakeKeySlots

    @classmethod
    def build(
        cls,
        identity: PlatformIdentity,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        config: PspConfig | None = None,
    ) -> Platform:
        keys = FakeKeySlots()
        memory = FakeSystemMemory(keys)
        psp = SecureProcessor(identity, memory=memory, keys=keys, config=config or TEST_CONFIG, rng=rng)
        return cls(psp=psp, memory=memory, keys=keys)

    def boot(self, *, es: bool = False) -> None:
        """INIT, then DF_FLUSH, as Linux's ``sev_platform_init`` does."""
        if es:
            self.psp.init(InitRequest(flags=INIT_FLAG_ES, tmr_paddr=TMR_BASE, tmr_length=TMR_SIZE))
        else:
            self.psp.init(InitRequest())
        self.psp.df_flush(DfFlushRequest())

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

    def measure(self, handle: GuestHandle) -> bytes:
        return self.psp.launch_measure(LaunchMeasureRequest(handle=handle)).measurement


def launch_to_measure(
    p: Platform, broker: KeyBroker, *, vm: str, policy: int, image: bytes, spa: Spa, asid: int
) -> tuple[GuestHandle, str, MeasurementRequest]:
    """The host's launch up to LAUNCH_MEASURE with ``broker`` as the owner: what the VMM relays."""
    pdh, chain = p.export()
    offer = broker.launch(LaunchRequest(vm=vm, pdh=pdh, cert_chain=chain, policy=policy))
    handle = p.start(policy, godh=offer.godh, session=offer.session, asid=asid)
    p.import_firmware(handle, image, spa)
    fw = p.psp.firmware
    measured = MeasurementRequest(
        measurement=p.measure(handle), api_major=fw.api_major, api_minor=fw.api_minor, build=fw.build
    )
    return handle, offer.session_id, measured


def make_identity(state_dir: Path, amd_root_dir: Path) -> PlatformIdentity:
    # 2048-bit AMD keys keep the tests fast; the format and checks are the same as 4096.
    return PlatformIdentity.load_or_create(state_dir, amd_root_dir=amd_root_dir, amd_key_bits=2048)
