"""What a kind of guest adds to a migration: the backend interface of the engine.

The engine (``outgoing``, ``incoming``) owns the rounds, the dirty-log sync, the
bandwidth limit and downtime estimate, the switch-over, the return path, the
status and events, and the statistics. A backend owns what differs between kinds
of guests, in the vocabulary of QEMU's ``SaveVMHandlers`` and Cloud Hypervisor's
``Migratable``: its setup (negotiation, sessions, keys), how a batch of dirty
pages becomes records, its completion (the final records, state only it may
read), its cancel; on the target, how its records become memory and when the
guest may run. Every hook but ``pages`` has a default that does nothing.

Backends are chosen per migration by ``backends.outgoing_backend`` /
``backends.incoming_backend``; the engine never names one. Lifecycle on the
source::

    dirty_log(start)                once, before the first round: which pages to send
    setup(out)                      inside the first round's part, before any page
    pages / zeros                   for every batch of every round (also the final one)
    before_stop()                   the guest still runs; the engine stops it next
    switchover()                    the guest is stopped; before the final pages
    complete(out, vcpu_ids)         inside the final part, after the last pages
    from_target(payload)            a return-path message from the target's backend (its abort)
    finish()                        the target confirmed: the guest now lives there
    cancel()                        the migration did not complete (any phase after setup)

and on the target::

    record(subtype, payload)        each CONFIDENTIAL record of the stream
    verify()                        the stream is loaded: everything arrived?
    take_over()                     the guest becomes this VM's (the last step before it runs)
    abort()                         the load failed: a message for the source's backend
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from confmig.common.errors import StreamError
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import RamBlock
from confmig.vmm.migration.ram import BATCH_PAGES, MAX_BATCH_PAGES, DirtyLog, RoundCounters
from confmig.vmm.migration.stats import ConfidentialCounters


class OutgoingBackend:
    """The source's side of one kind of guest."""

    name: ClassVar[str]
    counters: ConfidentialCounters | None = None
    """What a confidential backend reports in ``query-migrate`` (None: nothing)."""
    send_buffer: ClassVar[int] = 0
    """Bytes of socket send buffer the main channel should have (0: the kernel's choice)."""
    batch_pages: ClassVar[int] = BATCH_PAGES
    """Most pages per call of ``pages`` (up to ``MAX_BATCH_PAGES``): between calls the engine
    looks for a cancel and paces the bandwidth."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not 0 < cls.batch_pages <= MAX_BATCH_PAGES:
            raise TypeError(f"{cls.__name__}.batch_pages must be 1..{MAX_BATCH_PAGES}")

    def dirty_log(self, start: Callable[[], DirtyLog]) -> DirtyLog:
        """Which pages this migration sends: every page, then what the guest and the VMM
        dirty (``start`` turns KVM's dirty logging on and returns that log). A backend whose
        target maps the very same RAM (intra-host) returns a log with nothing in it."""
        return start()

    def setup(self) -> None:
        """Open sessions and write the records that must precede every page."""

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """A batch of dirty pages, as records (every backend writes its own)."""
        raise NotImplementedError

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """Pages known to be zero on the host's side (never written)."""
        raise NotImplementedError

    def before_stop(self) -> None:
        """Switch-over begins (downtime counts from here): what must happen while the guest's
        vCPUs still run (SEV-ES through the Migration Handler: they save their own state)."""

    def switchover(self) -> None:
        """The guest's vCPUs are stopped; the final pages come next."""

    def complete(self, vcpu_ids: list[int]) -> None:
        """Write what only the stopped guest has: the final records of the stream."""

    def finish(self) -> None:
        """The target loaded the stream and runs the guest."""

    def cancel(self) -> None:
        """Undo setup: the source keeps the guest."""

    def resumable_without_verdict(self) -> bool:
        """After :meth:`cancel`, when the whole stream went out and the target's verdict was
        lost: whether this backend knows the target cannot have taken the guest, so that it may
        run here again. By default it does not: the source stays paused."""
        return False

    def from_target(self, payload: bytes) -> None:
        """A return-path message for this backend (the target's, e.g. an abort token); it
        arrives before the target's verdict."""
        raise StreamError(f"the {self.name} backend expects no message from the target")


class IncomingBackend:
    """The target's side of one kind of guest."""

    name: ClassVar[str]
    counters: ConfidentialCounters | None = None
    receive_buffer: ClassVar[int] = 0
    """Bytes of socket receive buffer the main channel should have (0: the kernel's choice)."""
    ram_starts_zero: ClassVar[bool] = True
    """The target's guest RAM is blank until pages land (a VM started with ``-incoming``); False
    for a target that ran before (its zero pages must be written)."""

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        """One CONFIDENTIAL record of the stream."""
        raise StreamError(f"confidential record {subtype.name} for a guest that is not confidential "
                          "(-object sev-guest ... -machine confidential-guest-support=...)")

    def verify(self) -> None:
        """Everything the guest needs arrived: raise :class:`StreamError` if not. The guest
        does not run before this returns."""

    def take_over(self) -> None:
        """The stream is loaded and verified: whatever makes the guest this VM's, the last
        step before it runs here (intra-host: the encryption context moves from the source's
        VM, which is dead afterwards). A failure here fails the load; after it succeeded, the
        guest is this VM's whatever happens next."""

    def abort(self) -> bytes:
        """The load failed and the guest never ran here: what the source's backend should get
        (sent on the return path before the failure), or nothing."""
        return b""
