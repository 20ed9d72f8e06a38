"""The PSP backend: SEV guests migrated the "slow" way.

The Secure Processor re-encrypts each private page from the guest's memory key
to a transport key it shares with the target's PSP (SEND_UPDATE_DATA on the
source, RECEIVE_UPDATE_DATA on the target); the VMM moves packets it cannot
read. Shared pages, which the guest reported with ``KVM_HC_MAP_GPA_RANGE``, go
as ordinary RAM records, and so do pages never written (zero on the host's
side of the source, so zero on the target's too).

The records (``confmig.proto.stream.psp``): SESSION, the output of SEND_START,
is the first record of the first round, before any page (QEMU's order: the
SEND_START output precedes the first encrypted page); PAGE records in every
round; at switch-over, with the vCPUs stopped, each SEV-ES vCPU's VMSA and
then the shared-regions list, so that the target knows which pages are shared
before its guest runs. The ``cpu`` device sections of an SEV-ES guest carry
zeros where a plain guest's registers are.
"""

from __future__ import annotations

import base64
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.errors import MigrationError, StreamError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE
from confmig.proto.stream import psp as records
from confmig.proto.stream import shared_regions as shared_regions_record
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import GuestMemory, RamBlock
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink, RoundCounters
from confmig.vmm.migration.stats import ConfidentialCounters
from confmig.vmm.sev import SevGuest
from confmig.vmm.shared_regions import SharedRegions

SOCKET_BUFFER: Final = 256 * 1024
"""Socket buffers of a PSP migration, each way (the engine applies them). The target's
PSP is the bottleneck (one RECEIVE_UPDATE_DATA per page): whatever sits in the buffers at switch-over is
downtime the source's estimate cannot see, so they are kept small (about 15 ms of
target PSP work at the 17 MB/s of benchmarks/psp-20261201-142251.md) instead of the
megabytes TCP autotuning grows them to (584 ms of downtime in psp-20261201-134949.md)."""


PACKETS_PER_SEND: Final = 32
"""PSP packets per write (about 130 KiB, half the socket buffer): the target's PSP works on
one group while the source's makes the next. A write of a whole batch's packets, several
times the socket buffer, makes the two PSPs take turns instead."""


def psp_counters() -> ConfidentialCounters:
    return ConfidentialCounters(backend="psp", commands_name="psp-commands")


class PspOutgoing(OutgoingBackend):
    """The source's side: SEND_START, a SEND_UPDATE_DATA per private page, the VMSAs and the
    shared-regions list at switch-over, SEND_FINISH, or SEND_CANCEL when the migration
    does not complete."""

    name = "psp"
    counters: ConfidentialCounters
    send_buffer = SOCKET_BUFFER

    @staticmethod
    def check(params: MigrationParameters) -> None:
        """What ``migrate`` refuses before anything starts."""
        if "multifd" in params.capabilities:
            raise MigrationError("multifd is not supported for SEV guests: the PSP path sends every "
                                 "page through the main channel")
        if not params.sev_pdh or not params.sev_plat_cert or not params.sev_amd_cert:
            raise MigrationError("SEV: set the migration parameters sev-pdh and sev-plat-cert to the "
                                 "target's 'pdh' and 'cert-chain' from its query-sev-capabilities, and "
                                 "sev-amd-cert to the AMD chain ASK || ARK ('confmig amd-certs')")

    def __init__(self, sev: SevGuest, params: MigrationParameters, out: MainChannelSink) -> None:
        self.check(params)
        self.sev = sev
        self.params = params
        self.out = out
        self.counters = psp_counters()
        self.sending = False
        """SEND_START done and neither SEND_FINISH nor SEND_CANCEL yet."""

    def setup(self) -> None:
        """SEND_START for the target's certificates; its output opens the stream."""
        p = self.params
        policy, session = self.sev.send_start(base64.b64decode(p.sev_pdh), base64.b64decode(p.sev_plat_cert),
                                              base64.b64decode(p.sev_amd_cert))
        self.sending = True
        self.counters.commands += 2  # the length query, then the command
        own_pdh, _chain = self.sev.capabilities_raw()
        self.out.confidential(records.SUBTYPE, [records.encode(records.PspSession(
            policy=policy, pdh=own_pdh, session=session))])

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """Private pages through the PSP, one SEND_UPDATE_DATA each; shared ones as plain RAM."""
        gpas = block.gpas(indices)
        shared = self.sev.shared.shared_mask(gpas >> PAGE_SHIFT)
        total = self.out.pages(block, indices[shared]) if shared.any() else RoundCounters()
        self.counters.shared_pages += int(np.count_nonzero(shared))
        private, gpas = indices[~shared], gpas[~shared]
        # A private page that is all zero on the host's side was never written through the
        # memory encryption (ciphertext is never all zero): it goes as a zero page, which
        # leaves the target's host-side bytes the same, as for never-written pages.
        untouched = ~block.pages[private].any(axis=1)
        if untouched.any():
            total += self.out.zeros(block, private[untouched])
        written = gpas[~untouched]
        for start in range(0, len(written), PACKETS_PER_SEND):
            packets = []
            for gpa in written[start : start + PACKETS_PER_SEND]:
                header, transport = self.sev.send_update_data(int(gpa))
                packets.append(records.encode(records.PspPage(gpa=int(gpa), header=header,
                                                              transport=transport)))
            total += RoundCounters(normal=len(packets), bytes=self.out.confidential(records.SUBTYPE, packets))
            self.counters.private_pages += len(packets)
            self.counters.commands += len(packets)
        return total

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self.out.zeros(block, indices)

    def complete(self, vcpu_ids: list[int]) -> None:
        """With the vCPUs stopped: each vCPU's VMSA (SEV-ES), then the shared-regions list."""
        if self.sev.config.es:
            vmsas = []
            for vcpu_id in vcpu_ids:
                header, transport = self.sev.send_update_vmsa(vcpu_id)
                vmsas.append(records.encode(records.PspVmsa(vcpu_id=vcpu_id, header=header,
                                                            transport=transport)))
                self.counters.commands += 1
            self.out.confidential(records.SUBTYPE, vmsas)
        self.out.confidential(shared_regions_record.SUBTYPE, [self.sev.shared.encode()])

    def finish(self) -> None:
        self.sev.send_finish()
        self.sending = False
        self.counters.commands += 1

    def cancel(self) -> None:
        """The PSP's guest goes back to RUNNING."""
        if self.sending:
            self.sending = False
            self.sev.send_cancel()
            self.counters.commands += 1


class PspIncoming(IncomingBackend):
    """The target's side: RECEIVE_START on the session, RECEIVE_UPDATE_DATA per page,
    RECEIVE_UPDATE_VMSA per vCPU (SEV-ES). RECEIVE_FINISH comes when the guest starts."""

    name = "psp"
    counters: ConfidentialCounters
    receive_buffer = SOCKET_BUFFER

    def __init__(self, sev: SevGuest, memory: GuestMemory, vcpu_ids: set[int]) -> None:
        if sev.receiving:
            raise MigrationError("this SEV guest's context was half received by a failed incoming "
                                 "migration (its PSP guest and ASID are taken): start a new target, "
                                 "as QEMU, which exits here")
        self.sev = sev
        self.memory = memory
        self.vcpu_ids = vcpu_ids
        self.vmsas: set[int] = set()
        """vCPUs whose VMSA arrived (SEV-ES)."""
        self.counters = psp_counters()
        self.started = False
        self.shared_received = False

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        # SECURITY: the payload comes from the source host (untrusted): the codec bounds every
        # length, addresses are checked against guest RAM here, and the PSP checks each
        # packet's MAC before it writes anything.
        if subtype == ConfidentialSubtype.SHARED_REGIONS:
            if not self.started or self.shared_received:
                raise StreamError("a shared-regions list before the PSP session, or a second one")
            self.sev.shared = SharedRegions.decode(payload)
            self.shared_received = True
            return
        if subtype != records.SUBTYPE:
            raise StreamError(f"confidential record {subtype.name} is not for the PSP path")
        match records.decode(payload):
            case records.PspSession() as s:
                if self.started:
                    raise StreamError("a second PSP session in one stream")
                self.sev.receive_start(s.policy, s.pdh, s.session)
                self.started = True
                self.counters.commands += 1
            case records.PspPage() as page:
                if not self.started:
                    raise StreamError("a PSP page before the PSP session")
                try:
                    self.memory.translate(page.gpa, PAGE_SIZE)
                except ValueError:
                    raise StreamError(f"PSP page at {page.gpa:#x} is outside guest RAM") from None
                self.sev.receive_update_data(page.gpa, page.header, page.transport)
                self.counters.private_pages += 1
                self.counters.commands += 1
            case records.PspVmsa() as vmsa:
                if not self.started or not self.sev.config.es:
                    raise StreamError("a VMSA record for a guest that is not SEV-ES (or before the session)")
                if vmsa.vcpu_id not in self.vcpu_ids or vmsa.vcpu_id in self.vmsas:
                    raise StreamError(f"VMSA record for vCPU {vmsa.vcpu_id}: no such vCPU, or a second one")
                self.sev.receive_update_vmsa(vmsa.vcpu_id, vmsa.header, vmsa.transport)
                self.vmsas.add(vmsa.vcpu_id)
                self.counters.commands += 1

    def verify(self) -> None:
        if not self.started:
            raise StreamError("the stream carried no PSP session for this SEV guest")
        if self.sev.config.es and self.vmsas != self.vcpu_ids:
            raise StreamError("the stream did not carry the VMSA of every vCPU of this SEV-ES guest")
