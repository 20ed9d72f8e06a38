"""In-memory stand-ins for the key slots and the memory-encryption engine, and a platform built on them.

:class:`FakeKeySlots` has the shape of ``confmig.platform.mee.KeySlots``
(install, clear, set_runnable, runnable, vek) without the shared memory. :class:`FakeSystemMemory`
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
from confmig.platform.psp import (
    ActivateRequest,
    Asid,
    DfFlushRequest,
    GuestHandle,
    InitRequest,
    LaunchFinishRequest,
    LaunchMeasureRequest,
    LaunchSession,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExportRequest,
    PlatformIdentity,
    PspConfig,
    ReceiveStartRequest,
    SecureProcessor,
    SendStartRequest,
    SendStartResponse,
    SevCertificate,
    SpaOutOfRange,
    create_launch_session,
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
        self._runnable: set[int] = set()

    def install(self, asid: int, vek: bytes) -> None:
        assert 1 <= asid <= 509 and len(vek) == 16
        self._slots[asid] = bytes(vek)
        self._runnable.discard(asid)

    def clear(self, asid: int) -> None:
        self._slots.pop(asid, None)
        self._runnable.discard(asid)

    def set_runnable(self, asid: int, runnable: bool) -> None:
        assert asid in self._slots
        (self._runnable.add if runnable else self._runnable.discard)(asid)

    def runnable(self, asid: int) -> bool:
        return asid in self._runnable

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
    identity: PlatformIdentity

    @classmethod
    def build(
        cls,
        identity: PlatformIdentity,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        config: PspConfig | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> Platform:
        keys = FakeKeySlots()
        memory = FakeSystemMemory(keys)
        psp = SecureProcessor(
            identity,
            memory=memory,
            keys=keys,
            config=config or TEST_CONFIG,
            rng=rng,
            **({"sleep": sleep} if sleep else {}),
        )
        return cls(psp=psp, memory=memory, keys=keys, identity=identity)

    def boot(self, *, es: bool = False) -> None:
        """INIT, then DF_FLUSH, as Linux's ``sev_platform_init`` does."""
        if es:
            self.psp.init(InitRequest(flags=INIT_FLAG_ES, tmr_paddr=TMR_BASE, tmr_length=TMR_SIZE))
        else:
            self.psp.init(InitRequest())
        self.psp.df_flush(DfFlushRequest())

    def pdh(self) -> SevCertificate:
        export = self.psp.pdh_cert_export(PdhCertExportRequest(pdh_cert_len=2084, certs_len=3 * 2084))
        return SevCertificate.from_bytes(export.pdh_cert)

    def owner_session(self, policy: int) -> LaunchSession:
        return create_launch_session(self.pdh(), policy=policy, firmware=self.psp.firmware)

    def launch(self, policy: int, *, asid: int) -> tuple[GuestHandle, LaunchSession]:
        """LAUNCH_START with an owner session, then ACTIVATE (what KVM's LAUNCH_START does)."""
        session = self.owner_session(policy)
        started = self.psp.launch_start(
            LaunchStartRequest(policy=policy, dh_cert=session.dh_cert, session=session.session)
        )
        self.psp.activate(ActivateRequest(handle=started.handle, asid=Asid(asid)))
        return started.handle, session

    def measure(self, handle: GuestHandle) -> bytes:
        return self.psp.launch_measure(LaunchMeasureRequest(handle=handle)).measurement

    def running(
        self, policy: int, *, asid: int, pages: dict[int, bytes] | None = None, vmsa_spa: int | None = None
    ) -> GuestHandle:
        """A launched, RUNNING guest: ``pages`` (SPA -> plaintext) imported with LAUNCH_UPDATE_DATA,
        the page at ``vmsa_spa`` with LAUNCH_UPDATE_VMSA (SEV-ES)."""
        for spa, data in (pages or {}).items():
            self.memory.write_plain(spa, data)
        handle, _ = self.launch(policy, asid=asid)
        for spa, data in (pages or {}).items():
            self.psp.launch_update_data(
                LaunchUpdateDataRequest(handle=handle, paddr=Spa(spa), length=len(data))
            )
        if vmsa_spa is not None:
            self.psp.launch_update_vmsa(
                LaunchUpdateVmsaRequest(handle=handle, paddr=Spa(vmsa_spa), length=4096)
            )
        self.measure(handle)
        self.psp.launch_finish(LaunchFinishRequest(handle=handle))
        return handle

    def send_start_to(self, handle: GuestHandle, target: PlatformIdentity) -> SendStartResponse:
        """SEND_START with the target's whole chain, as QEMU passes it (sev-pdh, -plat-cert, -amd-cert)."""
        certs = target.certificates
        return self.psp.send_start(
            SendStartRequest(
                handle=handle,
                pdh_cert=certs.pdh.to_bytes(),
                plat_certs=certs.platform_chain(),
                amd_certs=certs.amd_chain(),
            )
        )

    def receive_start_from(
        self, started: SendStartResponse, source: PlatformIdentity, *, asid: int
    ) -> GuestHandle:
        """RECEIVE_START with the source's PDH and session, then ACTIVATE (what KVM's RECEIVE_START does)."""
        handle = self.psp.receive_start(
            ReceiveStartRequest(
                policy=started.policy, pdh_cert=source.certificates.pdh.to_bytes(), session=started.session
            )
        ).handle
        self.psp.activate(ActivateRequest(handle=handle, asid=Asid(asid)))
        return handle


def make_identity(state_dir: Path, amd_root_dir: Path) -> PlatformIdentity:
    # 2048-bit AMD keys keep the tests fast; the format and checks are the same as 4096.
    return PlatformIdentity.load_or_create(state_dir, amd_root_dir=amd_root_dir, amd_key_bits=2048)
