"""Which backend moves a guest: the one place that knows every backend by name.

``x-confidential-backend`` (a migration parameter, ours) picks the confidential
backend of a confidential guest; empty means the guest's own default. A plain
guest moves with the plain backend and refuses a confidential one. A new
backend joins with an entry in :data:`BACKENDS` and its name in
``params.CONFIDENTIAL_BACKENDS`` (the parameter's schema); the engine does not
change.

``mode=cpr-transfer`` (QEMU's) overrides both: every guest, plain or SEV, moves
with the intra-host backend (:mod:`~confmig.vmm.migration.local`), whose
descriptors go ahead of the main channel on the ``cpr`` channel
(:func:`outgoing`); a target built on such descriptors receives with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from confmig.common.errors import MigrationError
from confmig.common.x86 import LOCAL_TIMER_VECTOR
from confmig.vmm.machine import Machine
from confmig.vmm.mh import MigrationHandler
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.cpr import CprSender
from confmig.vmm.migration.local import LocalIncoming, LocalOutgoing
from confmig.vmm.migration.mh import MhIncoming, MhOutgoing
from confmig.vmm.migration.outgoing import BackendFactory
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.plain import PlainIncoming, PlainOutgoing
from confmig.vmm.migration.psp import PspIncoming, PspOutgoing
from confmig.vmm.migration.ram import MainChannelSink, PageSink
from confmig.vmm.migration.transport import Connect, MigrationUri, connect
from confmig.vmm.sev import SevGuest


@dataclass(frozen=True, slots=True)
class ConfidentialBackend:
    """One confidential backend: what it refuses up front, and how each side is built."""

    check: Callable[[Machine, MigrationParameters], None]
    outgoing: Callable[[Machine, SevGuest, MigrationParameters, MainChannelSink], OutgoingBackend]
    incoming: Callable[[Machine, SevGuest], IncomingBackend]


def _mh(machine: Machine) -> MigrationHandler:
    if machine.mh is None:
        raise MigrationError("x-confidential-backend 'mh': the guest has no Migration Handler vCPU "
                             "(-smp N,mirrorvcpus=M, and a firmware with a Migration Handler)")
    return machine.mh


def _check_mh(machine: Machine, params: MigrationParameters) -> None:
    _mh(machine)
    MhOutgoing.check(params)


BACKENDS: Final[dict[str, ConfidentialBackend]] = {
    "psp": ConfidentialBackend(
        check=lambda _machine, params: PspOutgoing.check(params),
        outgoing=lambda _machine, sev, params, out: PspOutgoing(sev, params, out),
        incoming=lambda machine, sev: PspIncoming(sev, machine.memory, {v.fd.vcpu_id for v in machine.vcpus}),
    ),
    "mh": ConfidentialBackend(
        check=_check_mh,
        outgoing=lambda machine, sev, params, out: MhOutgoing(
            sev, _mh(machine), params, out, wake_guest=lambda: machine.raise_irq(LOCAL_TIMER_VECTOR)),
        incoming=lambda machine, sev: MhIncoming(sev, _mh(machine)),
    ),
}


def default_confidential(machine: Machine) -> str:
    """A guest with Migration Handler vCPUs uses them; any other SEV guest the PSP."""
    return "mh" if machine.mh is not None else "psp"


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
    return chosen or default_confidential(machine), sev


def check(machine: Machine, params: MigrationParameters) -> None:
    """Refuse, before anything starts, a backend this guest cannot use."""
    if params.mode == "cpr-transfer":
        LocalOutgoing.check(machine, params)
        return
    chosen = _confidential(machine, params)
    if chosen is not None:
        BACKENDS[chosen[0]].check(machine, params)


def outgoing_backend(machine: Machine, params: MigrationParameters, out: MainChannelSink,
                     pages: PageSink) -> OutgoingBackend:
    chosen = _confidential(machine, params)
    if chosen is None:
        return PlainOutgoing(pages)
    name, sev = chosen
    return BACKENDS[name].outgoing(machine, sev, params, out)


def outgoing(machine: Machine, params: MigrationParameters, cpr_uri: MigrationUri | None
             ) -> tuple[Connect, BackendFactory]:
    """How this migration connects its channels, and the factory of its backend: in
    ``cpr-transfer`` mode, the cpr channel's hand-over of the guest's descriptors comes first."""
    if params.mode == "cpr-transfer":
        if cpr_uri is None:
            raise MigrationError("mode cpr-transfer: 'migrate' needs a channel of channel-type 'cpr' "
                                 "(a unix socket the new VMM listens on)")
        if cpr_uri.scheme != "unix":
            raise MigrationError(f"the 'cpr' channel '{cpr_uri}' must be a unix socket "
                                 "(descriptors pass with SCM_RIGHTS)")
        state, fds = machine.cpr_state()
        sender = CprSender(cpr_uri, state, fds)
        return sender.connect, lambda out, _pages: LocalOutgoing(machine, sender, out)
    if cpr_uri is not None:
        raise MigrationError("a 'cpr' migration channel needs migrate-set-parameters mode=cpr-transfer")
    return connect, lambda out, pages: outgoing_backend(machine, params, out, pages)


def incoming_backend(machine: Machine, params: MigrationParameters) -> IncomingBackend:
    if machine.cpr is not None:  # built on an old VMM's descriptors: it takes the guest over
        return LocalIncoming(machine)
    chosen = _confidential(machine, params)
    if chosen is None:
        return PlainIncoming()
    name, sev = chosen
    return BACKENDS[name].incoming(machine, sev)
