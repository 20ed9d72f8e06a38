"""``cpr-transfer`` in the VMM: a machine built on another VMM process's guest, and the move.

The old VMM (:meth:`Machine.cpr_state`) hands over its guest's RAM memfds, its
VM fd and, with a Migration Handler, its mirror VM fd. The new VMM maps the
same memfds and registers them in a new VM at the same offsets: the host keeps
their physical addresses, so the guest's ciphertext stays valid. It issues no
``KVM_SEV_INIT`` and no launch command. Once the old VMM's vCPUs are stopped and
the stream is loaded, :func:`move_enc_context` takes the guest's SEV context
(and, SEV-ES, its VMSAs) with ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``; the old VM is
dead afterwards (``EIO``), so the old VMM can never run the guest again. A
mirror VM is moved the same way into a new mirror VM (:class:`MovedMigrationHandler`):
an SEV-ES mirror's vCPUs have launched VMSAs, measured with the guest, that no
one could make again.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Final

from confmig.common.errors import KvmError
from confmig.common.x86 import KVM_HC_MAP_GPA_RANGE, MSR_KVM_MIGRATION_CONTROL
from confmig.kvm.client import Kvm, VmFd
from confmig.proto import ioctl
from confmig.proto.ovmf_table import MigrationHandlerBlock
from confmig.vmm.memory import GuestMemory
from confmig.vmm.mh import MigrationHandler, SlotRegions

MOVE_BUSY_RETRIES: Final = 200
MOVE_BUSY_WAIT: Final = 0.005
"""Linux waits for the source's vCPU mutexes; the emulated host answers ``EBUSY`` while one of
them is inside ``KVM_RUN``: the old VMM stops its vCPUs before the last bytes of the stream, so
a retry for up to a second covers a vCPU thread that is still on its way out."""


def sev_hooks(vm: VmFd) -> None:
    """What ``SevGuest.init`` sets up besides ``KVM_SEV_INIT``: the page-state hypercall's exit
    and the migration-control MSR's filter. A VM that takes over an SEV guest needs them; its
    context arrives with the move."""
    vm.enable_cap(ioctl.KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vm.set_msr_filter([MSR_KVM_MIGRATION_CONTROL])
    vm.enable_cap(ioctl.KVM_CAP_X86_USER_SPACE_MSR, ioctl.KVM_MSR_EXIT_REASON_FILTER)


def move_enc_context(vm: VmFd, source_fd: int) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)`` on ``vm`` from the VM whose fd is
    ``source_fd``, retried while the host answers ``EBUSY``. All or nothing: a refusal leaves
    the source VM as it was."""
    for attempt in range(MOVE_BUSY_RETRIES + 1):
        try:
            vm.enable_cap_fd(ioctl.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, source_fd)
            return
        except KvmError as exc:
            if exc.errno != errno.EBUSY or attempt == MOVE_BUSY_RETRIES:
                raise
            time.sleep(MOVE_BUSY_WAIT)


class MovedMigrationHandler(MigrationHandler):
    """A Migration Handler whose mirror VM takes the old VMM's mirror by a move, not a copy:
    a new mirror VM with as many vCPUs and the same slots, its context from :meth:`move_from`.

    Built as :class:`MigrationHandler` builds itself, minus the copy and the launch (the
    mirror module takes no other way in; see the report of issue 12)."""

    def __init__(self, kvm: Kvm, memory: GuestMemory, block: MigrationHandlerBlock, nvcpus: int,
                 slot_regions: SlotRegions, *, protected: bool) -> None:
        self.block = block
        self.memory = memory
        self.mirror = kvm.create_vm()
        self.vcpus = []
        try:
            for region, fd in slot_regions():
                self.mirror.set_user_memory_region(region, fd)
            for i in range(nvcpus):
                self.vcpus.append(self._vcpu(i))
        except BaseException:
            self.close()
            raise
        self.protected = protected
        self._start_lock = threading.Lock()
        self.started = False
        self.sent_away = False
        self.moved = False

    def move_from(self, old_mirror_fd: int) -> None:
        """The old mirror's context (and, SEV-ES, its vCPUs' VMSAs) into ours: ours is a
        mirror of the guest from now on, the old one is dead."""
        move_enc_context(self.mirror, old_mirror_fd)
        self.moved = True
