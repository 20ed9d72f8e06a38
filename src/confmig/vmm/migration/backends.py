"""Which backend moves a guest: the one place that knows every backend by name.

``x-confidential-backend`` (a migration parameter, ours) picks the confidential
backend of a confidential guest; empty means the guest's own default. A plain
guest moves with the plain backend and refuses a confidential one. A new
backend joins with a line in each of :data:`OUTGOING` and :data:`INCOMING`, and
its name in ``params.CONFIDENTIAL_BACKENDS`` (the parameter's schema); the
engine does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from confmig.common.errors import MigrationError
from confmig.vmm.machine import Machine
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.plain import PlainIncoming, PlainOutgoing
from confmig.vmm.migration.psp import PspIncoming, PspOutgoing
from confmig.vmm.migration.ram import MainChannelSink, PageSink
from confmig.vmm.sev import SevGuest

DEFAULT_CONFIDENTIAL: Final = "psp"
"""What a confidential guest uses when ``x-confidential-backend`` is empty."""

class OutgoingFactory(Protocol):
    """A confidential backend's source side: what it refuses up front, and how it is built."""

    def check(self, params: MigrationParameters) -> None: ...

    def __call__(self, sev: SevGuest, params: MigrationParameters,
                 out: MainChannelSink) -> OutgoingBackend: ...


IncomingFactory = Callable[[SevGuest, Machine], IncomingBackend]

OUTGOING: Final[dict[str, OutgoingFactory]] = {
    "psp": PspOutgoing,
}
INCOMING: Final[dict[str, IncomingFactory]] = {
    "psp": lambda sev, machine: PspIncoming(sev, machine.memory, {v.fd.vcpu_id for v in machine.vcpus}),
}


def _confidential(machine: Machine, params: MigrationParameters) -> tuple[str, SevGuest] | None:
    """The confidential backend this migration uses and its guest, or None for the plain one."""
    chosen = params.x_confidential_backend
    sev = machine.sev
    if sev is None or sev.config.x_plain_copy:
        if chosen:
            why = ("this SEV guest migrates as a plain one (sev-guest x-plain-copy=on)" if sev is not None
                   else "requires a confidential guest (-object sev-guest ... "
                   "-machine confidential-guest-support=...)")
            raise MigrationError(f"x-confidential-backend '{chosen}': {why}")
        return None
    return chosen or DEFAULT_CONFIDENTIAL, sev


def check(machine: Machine, params: MigrationParameters) -> None:
    """Refuse, before anything starts, a backend this guest cannot use."""
    chosen = _confidential(machine, params)
    if chosen is not None:
        OUTGOING[chosen[0]].check(params)


def outgoing_backend(machine: Machine, params: MigrationParameters, out: MainChannelSink,
                     pages: PageSink) -> OutgoingBackend:
    chosen = _confidential(machine, params)
    if chosen is None:
        return PlainOutgoing(pages)
    name, sev = chosen
    return OUTGOING[name](sev, params, out)


def incoming_backend(machine: Machine, params: MigrationParameters) -> IncomingBackend:
    chosen = _confidential(machine, params)
    if chosen is None:
        return PlainIncoming()
    name, sev = chosen
    return INCOMING[name](sev, machine)
