"""The intra-host backend (``mode=cpr-transfer``): a new VMM process takes over the guest.

Nothing of guest RAM travels: before the main channel, the old VMM handed the
new one its RAM memfds, its VM fd and its mirror VM fd on the ``cpr`` channel
(:mod:`confmig.vmm.migration.cpr`); the new VMM maps the very same memory. So
this backend keeps no dirty log (:class:`RamInPlace`: the first round finds
nothing to send and the engine switches over at once), reads no page and writes
none. The stream carries what it always carries at switch-over, the vCPUs' and
devices' state, plus, for an SEV guest, the shared-regions list (the VMM's
record of the guest's hypercalls). On the target, :meth:`LocalIncoming.take_over`
moves the SEV context (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``) just before the guest
runs: from then on the old VM is dead and only the new VMM can run the guest.

Failure: before the move, the old VMM resumes its guest as after any failed
migration. After it, the old VMM must never run the guest again: if the new VMM's
verdict does not come, the old one asks KVM whether its VM is dead (``EIO``) and,
if so, stays stopped; a plain guest has no such witness, so once the whole stream
is out without a verdict the old VMM stays stopped too (the new one may run it).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfmigError, KvmError, MigrationError, StreamError
from confmig.proto import ioctl
from confmig.proto.stream import shared_regions as shared_regions_record
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.machine import Machine
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.cpr import CprSender
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import Batch, DirtyLog, MainChannelSink, RoundCounters
from confmig.vmm.migration.stats import ConfidentialCounters
from confmig.vmm.shared_regions import SharedRegions

log = logging.getLogger(__name__)

HANDED_OVER = "it handed its guest to a new VMM process on this host (cpr-transfer)"
VM_DEAD = "its SEV context moved to the new VMM process: its VM is dead (EIO)"
NOT_TAKEN = b"cpr-transfer: not taken"
"""The new VMM's message to the old one with its failure: it never took the guest (its load
failed before :meth:`LocalIncoming.take_over`), so the old VMM may run it again."""
VERDICT_LOST = ("the whole state went to the new VMM process, whose verdict never came: it may run "
                "the guest on the same memory (a plain guest has no KVM witness; quit that VMM first)")


def local_counters() -> ConfidentialCounters:
    """``query-migrate``'s ``x-confmig.confidential`` for a local migration: no page, no PSP
    command; what went over the cpr channel."""
    return ConfidentialCounters(backend="local", commands_name="psp-commands",
                                extra={"fds-passed": 0, "cpr-bytes": 0})


class RamInPlace:
    """The engine's :class:`DirtyLog` for RAM the target maps itself: never a page to send."""

    def sync(self) -> int:
        return 0

    def take_round(self, batch_pages: int) -> Iterator[Batch]:
        return iter(())


class LocalOutgoing(OutgoingBackend):
    """The old VMM's side."""

    name = "local"

    @staticmethod
    def check(machine: Machine, params: MigrationParameters) -> None:
        if params.x_confidential_backend:
            raise MigrationError(f"x-confidential-backend '{params.x_confidential_backend}': mode "
                                 "cpr-transfer moves every guest by handing its memory over (leave it empty)")
        if machine.mh is not None and machine.mh.sent_away:
            raise MigrationError("the guest's Migration Handler sealed its state for another target")

    def __init__(self, machine: Machine, sender: CprSender, out: MainChannelSink) -> None:
        self.machine = machine
        self.sender = sender
        self.out = out
        self.counters: ConfidentialCounters = local_counters()
        self._stream_out = False
        self._released = False
        """The new VMM said it never took the guest."""
        self._ours = False
        """:meth:`cancel` found that the new VMM cannot have taken the guest."""

    def dirty_log(self, start: Callable[[], DirtyLog]) -> DirtyLog:
        return RamInPlace()  # the new VMM maps this very memory: no dirty logging at all

    def setup(self) -> None:
        self.counters.extra.update({"fds-passed": len(self.sender.fds), "cpr-bytes": self.sender.sent})

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        raise MigrationError("cpr-transfer: guest RAM is handed over, never sent")

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        raise MigrationError("cpr-transfer: guest RAM is handed over, never sent")

    def complete(self, vcpu_ids: list[int]) -> None:
        """The shared-regions list (the VMM's, from the guest's hypercalls): the new VMM's next
        migration of this guest needs it."""
        sev = self.machine.sev
        if sev is not None:
            self.out.confidential(shared_regions_record.SUBTYPE, [sev.shared.encode()])
        self._stream_out = True

    def from_target(self, payload: bytes) -> None:
        if payload != NOT_TAKEN:
            raise StreamError("cpr-transfer: unexpected message from the new VMM")
        self._released = True

    def finish(self) -> None:
        """The new VMM runs the guest: this one never will again, and its VM (dead, for an SEV
        guest) and vCPUs go."""
        self.machine.handed_over = HANDED_OVER
        self.machine.retire()

    def cancel(self) -> None:
        """No verdict: resume only if the new VMM cannot have taken the guest."""
        if not self.sender.handed:
            self._ours = True
            return  # the descriptors never arrived: nothing to take back
        m = self.machine
        if m.sev is not None:
            try:
                m.vm.check_extension(ioctl.KVM_CAP_USER_MEMORY)
            except KvmError as exc:
                if exc.errno != errno.EIO:  # only a dead VM (its context moved) answers EIO
                    raise MigrationError(f"the source guest stays stopped: cannot tell whether the "
                                         f"new VMM took it ({exc})") from exc
                log.error("cpr-transfer: %s", exc)
                m.handed_over = VM_DEAD
                m.retire()
                raise MigrationError(f"the source guest stays stopped: {VM_DEAD}") from exc
            self._ours = True
            return  # alive: the move never happened, and our VM runs the guest again
        if self._stream_out and not self._released:
            m.handed_over = VERDICT_LOST
            raise MigrationError(f"the source guest stays stopped: {VERDICT_LOST}")
        self._ours = True

    def resumable_without_verdict(self) -> bool:
        """The kernel tells: an SEV guest's VM that still answers was never moved; a plain one
        whose new VMM said it did not take the guest is still ours."""
        return self._ours


class LocalIncoming(IncomingBackend):
    """The new VMM's side: it maps the guest's RAM already (:class:`Machine` built on the
    cpr channel's descriptors); the stream brings vCPU and device state."""

    name = "local"
    ram_starts_zero = False

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.counters: ConfidentialCounters = local_counters()
        self._shared = False
        self._taken = False

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        sev = self.machine.sev
        if subtype != ConfidentialSubtype.SHARED_REGIONS or sev is None or self._shared:
            raise StreamError(f"cpr-transfer: unexpected confidential record {subtype.name}")
        # SECURITY: from the old VMM; decode() checks the list's shape and bounds.
        sev.shared = SharedRegions.decode(payload)
        self._shared = True

    def take_over(self) -> None:
        try:
            self.machine.take_over()
        except ConfmigError as exc:
            raise MigrationError(f"cpr-transfer: the guest's context did not move here: {exc}") from exc
        self._taken = True
        self.counters.extra["fds-passed"] = len(self.machine.cpr.fds) if self.machine.cpr else 0

    def abort(self) -> bytes:
        """The load failed: if the guest was never taken here, the old VMM may run it again."""
        return b"" if self._taken else NOT_TAKEN
