"""``cpr-transfer`` in the VMM: a machine built on another VMM process's guest, and the move.

The old VMM (:meth:`Machine.cpr_state`) hands over its guest's RAM memfds, its
VM fd and, with a Migration Handler, its mirror VM fd. The new VMM maps the
same memfds and registers them in a new VM at the same offsets: the host keeps
their physical addresses, so the guest's ciphertext stays valid. It issues no
``KVM_SEV_INIT`` and no launch command. Once the old VMM's vCPUs are stopped and
the stream is loaded, :func:`move_enc_context` takes the guest's SEV context
(and, SEV-ES, its VMSAs) with ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``; the old VM is
dead afterwards (``EIO``), so the old VMM can never run the guest again. A
mirror VM is moved the same way into a new mirror VM
(:class:`~confmig.vmm.mh.MigrationHandler` with no guest VM to copy from): an SEV-ES mirror's vCPUs
have launched VMSAs, measured with the guest, that no one could make again.
"""

from __future__ import annotations

import errno
import time
from typing import Final

from confmig.common.errors import KvmError
from confmig.kvm.client import VmFd
from confmig.proto import ioctl

MOVE_BUSY_RETRIES: Final = 200
MOVE_BUSY_WAIT: Final = 0.005
"""Linux waits for the source's vCPU mutexes; the emulated host answers ``EBUSY`` while one of
them is inside ``KVM_RUN``: the old VMM stops its vCPUs before the last bytes of the stream, so
a retry for up to a second covers a vCPU thread that is still on its way out."""


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
