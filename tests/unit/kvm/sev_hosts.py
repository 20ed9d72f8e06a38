"""Two emulated hosts' SEV stacks without processes: KVM's dispatcher on a real PSP and engine.

Each :class:`SevHost` is what ``confmig host`` wires (``hostd/main.py``): the
UMC key slots, the memory-encryption engine, the PSP's memory port over the
host's RAM (the production ``HostMemoryPort``), the PSP with its own identity,
and KVM's view of it, ``PspMailbox``. Its RAM is one bytearray at a host-chosen
system physical base; a VM's single memory slot maps GPA 0 there.
:meth:`SevHost.vm` gives a ``SevVm`` that the tests drive with the same bytes
a VMM sends in ``KVM_MEMORY_ENCRYPT_OP``.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from confmig.common.errors import ProtocolError
from confmig.common.units import PAGE_SIZE
from confmig.hostd.memory import HostMemoryPort
from confmig.kvm import sev as ksev
from confmig.kvm.ports import SecureProcessor as KvmSecureProcessor
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp import PlatformIdentity, PspConfig, PspMailbox, SecureProcessor

RAM_SIZE = 64 * PAGE_SIZE


@dataclass
class Reply:
    result: int
    error: int
    out: bytes


@dataclass
class Vm:
    """One VM's SEV state in KVM, with the hooks the host kernel gives it."""

    host: SevHost
    sev: ksev.SevVm
    vmsa: dict[int, int] = field(default_factory=dict)
    """vCPU id -> GPA of its VMSA page, in the host's RAM (KVM's own pages without processes:
    the test writes the plaintext image itself; no core stores or loads registers)."""
    bound: list[tuple[int, bool]] = field(default_factory=list)
    vcpu_calls: list[tuple[str, int]] = field(default_factory=list)
    """What SEV asked of the vCPUs: (hook, vCPU id)."""

    # -- kvm.sev.EsVcpus -----------------------------------------------------------------

    def vcpu_ids(self) -> list[int]:
        return sorted(self.vmsa)

    def _page(self, hook: str, vcpu_id: int) -> int:
        self.vcpu_calls.append((hook, vcpu_id))
        gpa = self.vmsa.get(vcpu_id)
        return -errno.EINVAL if gpa is None else self.host.spa_base + gpa

    def sync_vmsa(self, vcpu_id: int) -> int:
        return self._page("sync", vcpu_id)

    def vmsa_launched(self, vcpu_id: int) -> int:
        return min(0, self._page("launched", vcpu_id))

    def save_vmsa(self, vcpu_id: int) -> int:
        return self._page("save", vcpu_id)

    def vmsa_page(self, vcpu_id: int) -> int:
        return self._page("page", vcpu_id)

    def load_vmsa(self, vcpu_id: int) -> int:
        return min(0, self._page("load", vcpu_id))

    def op(self, cmd_id: int, body: bytes = b"") -> Reply:
        """``KVM_MEMORY_ENCRYPT_OP``: ``struct kvm_sev_cmd`` then the command's struct and inline buffers."""
        result, reply = self.sev.encrypt_op(ksev.SEV_CMD.pack(cmd_id, 0, 0, 0, 0) + body)
        _id, _pad, _data, error, _fd = ksev.SEV_CMD.unpack_from(reply)
        return Reply(result, error, reply[ksev.SEV_CMD.size :])

    @property
    def handle(self) -> int:
        return self.sev.state.handle

    @property
    def asid(self) -> int:
        return self.sev.state.asid

    def guest_state(self) -> int:
        status, _policy, state = self.host.port.guest_status(self.handle)
        assert status == 0
        return state


class SevHost:
    def __init__(self, identity: PlatformIdentity, *, spa_base: int) -> None:
        self.identity = identity
        self.spa_base = spa_base
        self.ram = bytearray(RAM_SIZE)
        self.slots = KeySlots()
        self.engine = MemoryEncryptionEngine(self.slots)
        memory = HostMemoryPort(self._window, self.engine)
        config = PspConfig(min_sev_asid=ksev.MIN_SEV_ASID)  # as hostd: KVM's ES/SEV ASID split
        self.psp = SecureProcessor(identity, memory=memory, keys=self.slots, config=config)
        self.mailbox = PspMailbox(self.psp)
        self.port: KvmSecureProcessor = self.mailbox  # what KVM gets (checked by mypy)
        self.asids = ksev.AsidAllocator()

    def close(self) -> None:
        os.close(self.slots.fd)

    def _window(self, spa: int, size: int) -> memoryview | None:
        off = spa - self.spa_base
        if off < 0 or off + size > len(self.ram):
            return None
        return memoryview(self.ram)[off : off + size]

    def translate(self, gpa: int, length: int) -> list[tuple[int, int]]:
        if gpa < 0 or gpa + length > len(self.ram):
            raise ProtocolError(f"GPA {gpa:#x} is not backed by a memory slot")
        return [(self.spa_base + gpa, length)]

    def vm(self) -> Vm:
        vm: Vm
        sev = ksev.SevVm(self.port, self.asids, self.translate, lambda asid, es: vm.bound.append((asid, es)))
        vm = Vm(host=self, sev=sev)
        sev.vcpus = vm
        return vm

    # -- what the trusted side can see, for the tests' assertions ---------------------

    def plaintext(self, asid: int, gpa: int, size: int = PAGE_SIZE) -> bytes:
        """The page as the guest reads it: through the engine under ``asid``'s key."""
        first = gpa - gpa % PAGE_SIZE
        page = self.engine.decrypt(asid, self.spa_base + first, bytes(self.ram[first : first + PAGE_SIZE]))
        return page[gpa - first : gpa - first + size]

    def guest_writes(self, asid: int, gpa: int, data: bytes) -> None:
        """The guest (a vCPU through the engine) writes a whole private page."""
        self.ram[gpa : gpa + PAGE_SIZE] = self.engine.encrypt(asid, self.spa_base + gpa, data)


def launch(vm: Vm, policy: int, pages: dict[int, bytes], *, es: bool = False,
           vmsa: dict[int, int] | None = None) -> None:
    """KVM_SEV_(ES_)INIT, the vCPUs ``vmsa`` names (id -> GPA of its VMSA page; created after
    the INIT, as KVM requires), LAUNCH_START (no owner), LAUNCH_UPDATE_DATA of ``pages`` (GPA ->
    plaintext, copied in by the VMM first), LAUNCH_MEASURE, LAUNCH_FINISH: a RUNNING guest."""
    assert vm.op(ksev.KVM_SEV_ES_INIT if es else ksev.KVM_SEV_INIT).result == 0
    vm.vmsa.update(vmsa or {})
    reply = vm.op(ksev.KVM_SEV_LAUNCH_START, ksev.LAUNCH_START.pack(0, policy, 0, 0, 0, 0, 0, 0))
    assert (reply.result, reply.error) == (0, 0), reply
    for gpa, data in pages.items():
        vm.host.ram[gpa : gpa + len(data)] = data
        assert (
            vm.op(ksev.KVM_SEV_LAUNCH_UPDATE_DATA, ksev.LAUNCH_UPDATE_DATA.pack(gpa, len(data), 0)).result
            == 0
        )
    if vm.vmsa:
        assert vm.op(ksev.KVM_SEV_LAUNCH_UPDATE_VMSA).result == 0
    body = ksev.LAUNCH_MEASURE.pack(0, ksev.MEASUREMENT_LEN, 0)
    assert vm.op(ksev.KVM_SEV_LAUNCH_MEASURE, body).result == 0
    assert vm.op(ksev.KVM_SEV_LAUNCH_FINISH).result == 0


def u32(data: bytes, offset: int = 0) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])
