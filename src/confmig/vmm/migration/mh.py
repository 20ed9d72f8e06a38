"""The Migration Handler backend: SEV guests migrated the "fast", guest-assisted way.

The guest's own firmware does the work (:mod:`confmig.vmm.mh` drives it): on the
source each MH vCPU seals batches of private pages under the transport key the
guest owner gave the guest, on the target the MH opens them and writes the
pages under the target's memory key. The VMM moves sealed records it cannot
read (``CONFIDENTIAL`` records of subtype ``MH_RECORD``, one per batch), sends
shared pages itself as plain RAM records, and skips the MH's own area (each
side's MH owns its mailboxes and state). The firmware image is not migrated:
the target was launched from the same image, measured and checked by the
owner.

Order on the source: INIT of every MH vCPU (role source, a fresh migration
id) before the first page; batches of every round in epoch 0; at switch-over,
for an SEV-ES guest, PARK while its vCPUs still run (each saves its registers
into private memory and parks), then epoch 1 begins; after the last pages
FINISH seals the completion record (every stream's record and page counts;
SEV-ES: the saved registers), and from then on the source's guest refuses
to run unless its MH opens an abort token from the target. On the target the
first record names the migration; each stream's records go to the MH vCPU of
the same number; ``verify`` hands the completion record to the MH (COMPLETE),
which refuses unless every record and every private page arrived.

Pipelining: the batches of one call of :meth:`MhOutgoing.pages` go round-robin
to the MH vCPUs and alternate between each vCPU's two slots, so that the MH
seals the next batches while the VMM sends the previous ones.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

import numpy as np
import numpy.typing as npt

from confmig.common.errors import ConfigError, MigrationError, StreamError
from confmig.common.units import PAGE_SHIFT
from confmig.proto import mailbox as mb
from confmig.proto.stream import shared_regions as shared_regions_record
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.vmm.memory import RamBlock
from confmig.vmm.mh import MhError, MhVcpu, MigrationHandler
from confmig.vmm.migration.backend import IncomingBackend, OutgoingBackend
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink, RoundCounters
from confmig.vmm.migration.stats import ConfidentialCounters
from confmig.vmm.sev import OwnerUnreachable, SevGuest
from confmig.vmm.shared_regions import SharedRegions

log = logging.getLogger(__name__)

SUBTYPE: Final = ConfidentialSubtype.MH_RECORD
LIVE_EPOCH: Final = 0
FINAL_EPOCH: Final = 1
"""The guest is stopped: the stop-and-copy pages."""
PARK_TIMEOUT: Final = 10.0
"""Seconds an SEV-ES guest's vCPUs have to save their state (each does at its next step; the
VMM wakes sleeping ones with an interrupt)."""
PARK_POLL: Final = 0.001
OWNER_ATTEMPTS: Final = 3
OWNER_RETRY_DELAY: Final = 1.0
"""A source whose guest waits for the owner's abort token asks this many times, this many
seconds apart, while the owner cannot be reached (each attempt has the protocol's timeout)."""
RAM_BLOCK: Final = "pc.ram"
"""The one block whose pages migrate; the firmware's flash is the target's own, measured copy."""


def mh_counters(nvcpus: int) -> ConfidentialCounters:
    return ConfidentialCounters(backend="mh", commands_name="mh-commands",
                                extra={"mh-vcpus": nvcpus, "batches": 0, "zero-pages-elided": 0})


def _refused(what: str, ret: int) -> str:
    try:
        name = mb.MhReturn(ret).name
    except ValueError:
        name = str(ret)
    return f"the Migration Handler refused {what} ({name})"


class MhOutgoing(OutgoingBackend):
    """The source's side: batches of private pages sealed by the MH, shared pages in the clear."""

    name = "mh"
    counters: ConfidentialCounters

    @staticmethod
    def check(params: MigrationParameters) -> None:
        if "multifd" in params.capabilities:
            raise MigrationError("multifd is not supported with x-confidential-backend 'mh': its "
                                 "sealed records use the main channel (more MH vCPUs seal in parallel)")
        if not params.x_mh_target_challenge:
            raise MigrationError("Migration Handler: set the migration parameter x-mh-target-challenge "
                                 "to the target's 'target-challenge' (x-query-migration-handler on the "
                                 "target): the completion record opens on that target only")

    def __init__(self, sev: SevGuest, mh: MigrationHandler, params: MigrationParameters,
                 out: MainChannelSink, *, wake_guest: Callable[[], None] = lambda: None) -> None:
        self.check(params)
        self.sev = sev
        self.mh = mh
        self.out = out
        self.wake_guest = wake_guest
        """Interrupt the guest's vCPUs (SEV-ES PARK: a sleeping vCPU saves at its next step)."""
        offer = bytes.fromhex(params.x_mh_target_challenge)
        self.challenge = offer[: mb.CHALLENGE_SIZE]
        """The target MH's own: FINISH seals it, so the completion opens on that target only."""
        self.ticket = offer[mb.CHALLENGE_SIZE : mb.TARGET_OFFER_SIZE]
        """The owner's ticket for that target: INIT names it, the records are sealed under its key."""
        self.counters = mh_counters(len(mh.vcpus))
        self.migration_id = b""
        """The source MH draws it at the first INIT and says it in the io header."""
        self.epoch = LIVE_EPOCH
        self.finished = False
        """FINISH succeeded: the source's guest may not run again here (without an abort token)."""
        self.abort_token: bytes | None = None
        self._area = mh.area
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"mh{v.index}") for v in mh.vcpus]
        self._pending: deque[tuple[MhVcpu, Future[memoryview]]] = deque()
        self._submitted = [0] * len(mh.vcpus)
        """Batches given to each MH vCPU: which of its slots the next one uses."""

    # --- the engine's hooks -------------------------------------------------------------

    def setup(self) -> None:
        """Start the MH if nobody did (``start-migration-handler``), INIT every MH vCPU."""
        self.mh.start()
        nstreams = len(self.mh.vcpus)
        for v in self.mh.vcpus:  # MH vCPU 0 first: it opens the session the others join
            v.io_header(mb.encode_init(mb.Role.SOURCE, self.ticket, nstreams))
            self._check(v.command(mb.MhCommand.INIT).ret, f"INIT on MH vCPU {v.index}")
            try:
                init = mb.decode_init(v.read_io_header())
            except mb.MailboxError as exc:
                raise MhError(f"Migration Handler vCPU {v.index} answered INIT with {exc}") from None
            if init.nstreams != nstreams:
                raise MhError(f"Migration Handler vCPU {v.index} joined a session of {init.nstreams} "
                              f"streams, not {nstreams}")
            self.migration_id = init.migration_id

    def pages(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        return self._send(block, indices, zero=False)

    def zeros(self, block: RamBlock, indices: npt.NDArray[np.int64]) -> RoundCounters:
        """Pages zero on the host's side: shared ones are zero pages; private ones are whatever
        the guest reads there, which only its MH can say, so they go through it too."""
        return self._send(block, indices, zero=True)

    def before_stop(self) -> None:
        """SEV-ES: the guest's registers are in its encrypted VMSAs, which no VMM reads: its
        vCPUs save them into private memory themselves (PARK), while they still run; FINISH
        then seals that state for the target's MH to install."""
        if not self.sev.config.es:
            return
        v = self.mh.vcpus[0]
        deadline = time.monotonic() + PARK_TIMEOUT
        while True:
            answer = v.command(mb.MhCommand.PARK, slot=0)
            self.counters.commands += 1
            self._check(answer.ret, "PARK")
            if answer.length == 1:
                return
            self.wake_guest()  # a halted vCPU would only look at its next timer tick
            if time.monotonic() >= deadline:
                raise MhError(f"the guest's vCPUs did not save their state within {PARK_TIMEOUT:.0f} s "
                              "(SEV-ES: a guest still in its firmware cannot migrate through its "
                              "Migration Handler)")
            time.sleep(PARK_POLL)

    def switchover(self) -> None:
        self.epoch = FINAL_EPOCH

    def complete(self, vcpu_ids: list[int]) -> None:
        """FINISH: the completion record, then the shared-regions list for the target's VMM."""
        v = self.mh.vcpus[0]
        v.data(0)[: mb.CHALLENGE_SIZE] = self.challenge
        answer = v.command(mb.MhCommand.FINISH, slot=0, length=mb.CHALLENGE_SIZE, epoch=self.epoch)
        self._check(answer.ret, "FINISH")
        self.finished = True
        self.mh.sent_away = True
        self.counters.commands += 1
        self.out.confidential(SUBTYPE, [self._record(v, 0, answer.length)])
        self.out.confidential(shared_regions_record.SUBTYPE, [self.sev.shared.encode()])

    def finish(self) -> None:
        self._close()

    def from_target(self, payload: bytes) -> None:
        """The target MH's abort token (its guest never ran and never will): kept for cancel."""
        # SECURITY: the target host's bytes; only the source MH can tell a genuine token.
        if not self.finished or self.abort_token is not None:
            raise StreamError("an abort token from the target before FINISH, or a second one")
        self.abort_token = payload

    def cancel(self) -> None:
        """Before FINISH the MH just forgets the session (RESET). After it, the guest may run
        here again only if the target's MH sent an abort token that this MH opens (RESUME);
        without one (the target died, or the link did) it stays stopped: it may run there."""
        self._drain(send=False)
        self._close()
        if self.finished:
            self._resume()
            return
        if not self.mh.started:
            return  # setup failed before the MH was started: no session to leave
        for v in self.mh.vcpus:
            with contextlib.suppress(MhError):  # failed already: its next INIT resets it
                v.command(mb.MhCommand.RESET)

    def resumable_without_verdict(self) -> bool:
        """After FINISH only an abort token reopens the guest's run gate: the target's, or the
        owner's, who then never lets that target run. So once RESUME took one (or the stream
        never carried a completion record), the target cannot have the guest."""
        return not self.finished

    def _resume(self) -> None:
        """RESUME with the target's abort token; without one, or with one the MH refuses (the
        host's bytes on the return path), with the owner's (the target or the link died)."""
        if self.abort_token is not None and self._resume_with(self.abort_token):
            return
        token = self._owners_abort()
        if not self._resume_with(token):
            raise MhError("the Migration Handler refused RESUME with the owner's abort token: "
                          "the guest stays stopped here")

    def _owners_abort(self) -> bytes:
        """The owner's abort token, asked again while the owner cannot be reached (a refusal is
        final: the target committed, and the guest runs there)."""
        for attempt in range(OWNER_ATTEMPTS):
            try:
                return self.sev.migration_decision("abort", ticket=self.ticket,
                                                   migration_id=self.migration_id,
                                                   challenge=self.challenge)
            except OwnerUnreachable as exc:
                error: ConfigError = exc
                if attempt + 1 < OWNER_ATTEMPTS:
                    time.sleep(OWNER_RETRY_DELAY)
            except ConfigError as exc:
                error = exc
                break
        raise MhError("the migration failed after FINISH, the target sent no abort token (or one "
                      f"its MH refused) and the guest owner gave none ({error}): the guest stays "
                      "stopped here (it may be running there)")

    def _resume_with(self, token: bytes) -> bool:
        if not 0 < len(token) <= mb.SLOT_DATA:
            return False
        v = self.mh.vcpus[0]
        v.data(0)[: len(token)] = token
        answer = v.command(mb.MhCommand.RESUME, slot=0, length=len(token))
        self.counters.commands += 1
        if answer.ret != mb.MhReturn.SUCCESS:
            log.warning("%s", _refused("RESUME with an abort token", answer.ret))
            return False
        self.finished = False
        self.mh.sent_away = False
        return True

    def _close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False)

    # --- pages ----------------------------------------------------------------------------

    def _send(self, block: RamBlock, indices: npt.NDArray[np.int64], *, zero: bool) -> RoundCounters:
        if block.idstr != RAM_BLOCK:
            return RoundCounters()
        gpas = block.gpas(indices)
        start, size = self._area
        keep = (gpas >= 0) & ~((gpas >= start) & (gpas < start + size))
        shared = keep & self.sev.shared.shared_mask(gpas >> PAGE_SHIFT)
        total = RoundCounters()
        if shared.any():
            send = self.out.zeros if zero else self.out.pages
            total += send(block, indices[shared])
            self.counters.shared_pages += int(np.count_nonzero(shared))
        private = gpas[keep & ~shared]
        # A page has one stream (proto.mailbox.stream_of): the MH refuses any other, so that
        # each page's versions are ordered by one stream's sequence numbers.
        nvcpus = len(self.mh.vcpus)
        of = mb.stream_of(private >> PAGE_SHIFT, nvcpus)
        streams = [private[of == i] for i in range(nvcpus)]
        batches = max((len(g) + mb.BATCH_PAGES - 1) // mb.BATCH_PAGES for g in streams)
        for b in range(batches):  # round-robin over the streams: every MH vCPU works
            for v, g in zip(self.mh.vcpus, streams, strict=True):
                chunk = g[b * mb.BATCH_PAGES : (b + 1) * mb.BATCH_PAGES]
                if len(chunk):
                    total += self._submit(v, chunk)
        total += self._drain(send=True)
        return total

    def _submit(self, v: MhVcpu, gpas: npt.NDArray[np.int64]) -> RoundCounters:
        """Hand a batch to MH vCPU ``v``'s next slot; first send what that slot held before."""
        sent = RoundCounters()
        while sum(1 for owner, _ in self._pending if owner is v) >= mb.SLOTS:
            sent += self._drain_one(send=True)  # in order: the oldest, up to v's in that slot
        slot = self._submitted[v.index] % mb.SLOTS
        self._submitted[v.index] += 1
        self._pending.append((v, self._pools[v.index].submit(self._export, v, slot, gpas, self.epoch)))
        return sent

    def _export(self, v: MhVcpu, slot: int, gpas: npt.NDArray[np.int64], epoch: int) -> memoryview:
        """The record, where it lies in the slot: sent from there by :meth:`_drain_one` before
        :meth:`_submit` hands the slot out again (no copy on the MH vCPU's critical path)."""
        data = v.data(slot)
        n = len(gpas)
        np.frombuffer(data, "<u8", n)[:] = gpas
        answer = v.command(mb.MhCommand.EXPORT, slot=slot, npages=n, epoch=epoch)
        self._check(answer.ret, f"to export {n} pages from {int(gpas[0]):#x}")
        return self._record_view(v, slot, answer.length)

    def _drain(self, *, send: bool) -> RoundCounters:
        total = RoundCounters()
        while self._pending:
            total += self._drain_one(send=send)
        return total

    def _drain_one(self, *, send: bool) -> RoundCounters:
        _owner, fut = self._pending.popleft()
        if not send:
            fut.exception()  # wait; the migration failed already
            return RoundCounters()
        record = fut.result()
        header = mb.decode_record_header(record)
        sent = self.out.confidential(SUBTYPE, [record])
        c = self.counters
        c.private_pages += header.npages
        c.commands += 1
        c.extra["batches"] += 1
        c.extra["zero-pages-elided"] += header.nzero
        return RoundCounters(normal=header.npages - header.nzero, zero=header.nzero, bytes=sent)

    @staticmethod
    def _record_view(v: MhVcpu, slot: int, length: int) -> memoryview:
        # SECURITY: the length is the guest's word; the record is checked again by the target.
        if not mb.RECORD_HEADER.size <= length <= mb.SLOT_DATA:
            raise MhError(f"Migration Handler vCPU {v.index} answered a record of {length} bytes")
        return v.data(slot)[:length]

    @classmethod
    def _record(cls, v: MhVcpu, slot: int, length: int) -> bytes:
        return bytes(cls._record_view(v, slot, length))

    @staticmethod
    def _check(ret: int, what: str) -> None:
        if ret != mb.MhReturn.SUCCESS:
            raise MhError(_refused(what, ret))


class MhIncoming(IncomingBackend):
    """The target's side: each record to the MH vCPU of its stream; COMPLETE before the guest runs."""

    name = "mh"
    counters: ConfidentialCounters
    ram_starts_zero = False  # the target was launched and booted its firmware: its RAM is not blank

    def __init__(self, sev: SevGuest, mh: MigrationHandler) -> None:
        self.sev = sev
        self.mh = mh
        self.counters = mh_counters(len(mh.vcpus))
        self.migration_id: bytes | None = None
        self._initialized: set[int] = set()
        self._completion: bytes | None = None
        self.shared_received = False
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"mh-in{v.index}") for v in mh.vcpus]
        self._pending: deque[tuple[MhVcpu, Future[None]]] = deque()
        """Imports under way, oldest first: each MH vCPU imports its stream's records in order,
        the MH vCPUs side by side (a page has one stream, so their order does not matter)."""
        self._imports = [0] * len(mh.vcpus)

    def record(self, subtype: ConfidentialSubtype, payload: bytes) -> None:
        # SECURITY: everything here comes from the source host. Lengths are bounded by the
        # codec; the MH checks each record's tag, sequence and GPAs before writing a page.
        if subtype == ConfidentialSubtype.SHARED_REGIONS:
            if self.shared_received:
                raise StreamError("a second shared-regions list")
            self.sev.shared = SharedRegions.decode(payload)
            self.shared_received = True
            return
        if subtype != SUBTYPE:
            raise StreamError(f"confidential record {subtype.name} is not for the Migration Handler path")
        try:
            header = mb.decode_record_header(payload)
        except mb.MailboxError as exc:
            raise StreamError(f"Migration Handler record: {exc}") from None
        if self.migration_id is None:
            self.migration_id = header.migration_id
        elif header.migration_id != self.migration_id:
            raise StreamError("Migration Handler records of two different migrations in one stream")
        if header.kind == mb.RecordKind.COMPLETION:
            if self._completion is not None:
                raise StreamError("a second Migration Handler completion record")
            self._completion = payload
            return
        if header.kind != mb.RecordKind.PAGES or self._completion is not None:
            raise StreamError("a Migration Handler record that is not a page batch, or one after the end")
        if header.stream >= len(self.mh.vcpus):
            raise StreamError(f"Migration Handler stream {header.stream}: this target has "
                              f"{len(self.mh.vcpus)} MH vCPUs (-smp ...,mirrorvcpus=)")
        v = self.mh.vcpus[header.stream]
        self._init(v)
        while sum(1 for owner, _ in self._pending if owner is v) >= mb.SLOTS:
            self._wait_one()  # the slot this record takes is free once its import is done
        slot = self._imports[v.index] % mb.SLOTS
        self._imports[v.index] += 1
        self._pending.append((v, self._pools[v.index].submit(
            self._import, v, mb.MhCommand.IMPORT, payload, header.epoch, slot)))
        self.counters.commands += 1
        self.counters.private_pages += header.npages
        self.counters.extra["batches"] += 1
        self.counters.extra["zero-pages-elided"] += header.nzero

    def abort(self) -> bytes:
        """ABORT: the target MH seals its word that this guest never ran here and never will,
        for the source's MH (RESUME). Nothing if no record named the migration."""
        if self.migration_id is None:
            return b""
        self._close(wait_quietly=True)
        v = self.mh.vcpus[0]
        self._init(v)
        answer = v.command(mb.MhCommand.ABORT, slot=0)
        self.counters.commands += 1
        if answer.ret != mb.MhReturn.SUCCESS:
            raise MhError(_refused("ABORT", answer.ret))
        if not mb.RECORD_HEADER.size <= answer.length <= mb.SLOT_DATA:
            raise MhError(f"Migration Handler vCPU 0 answered ABORT with {answer.length} bytes")
        return bytes(v.data(0)[: answer.length])

    def verify(self) -> None:
        """VERIFY: the MH says whether every record and every private page arrived; then the
        owner's commit grant; then COMPLETE, after which the guest may run. The owner gives
        either the grant or, to the source, an abort token, never both; asking only once the
        MH verified leaves a window of one MH entry in which a target that dies leaves no copy
        running (never two)."""
        if self._completion is None:
            raise StreamError("the stream ended without the Migration Handler's completion record")
        self._close(wait_quietly=False)  # every import done, the first refusal raised
        v = self.mh.vcpus[0]
        self._init(v)
        assert self.migration_id is not None
        self.counters.commands += 1
        self._import(v, mb.MhCommand.VERIFY, self._completion, FINAL_EPOCH, what="the completion record")
        offer = self.mh.target_challenge()
        try:
            grant = self.sev.migration_decision(
                "commit", ticket=offer[mb.CHALLENGE_SIZE :], migration_id=self.migration_id,
                challenge=offer[: mb.CHALLENGE_SIZE])
        except ConfigError as exc:
            raise MigrationError(f"the guest owner did not commit the migration here: {exc}") from None
        self.counters.commands += 1
        self._import(v, mb.MhCommand.COMPLETE, self._completion + grant, FINAL_EPOCH,
                     what="the completion record and the owner's grant")

    def _init(self, v: MhVcpu) -> None:
        """INIT ``v`` as a target of this migration; MH vCPU 0 first, which names the migration
        for the whole target (the others only join it)."""
        if v.index in self._initialized:
            return
        assert self.migration_id is not None
        if v.index != 0:
            self._init(self.mh.vcpus[0])
        self.mh.start()
        v.io_header(mb.encode_init(mb.Role.TARGET, self.migration_id))
        answer = v.command(mb.MhCommand.INIT)
        if answer.ret != mb.MhReturn.SUCCESS:
            raise StreamError(_refused(f"INIT on MH vCPU {v.index}", answer.ret))
        self._initialized.add(v.index)

    def _wait_one(self) -> None:
        _v, fut = self._pending.popleft()
        fut.result()  # a refusal is the migration's failure

    def _close(self, *, wait_quietly: bool) -> None:
        """Wait for every import under way (bounded: each MH entry has its deadline); raise the
        first refusal unless ``wait_quietly`` (the load failed already)."""
        try:
            while self._pending:
                if wait_quietly:
                    self._pending.popleft()[1].exception()
                else:
                    self._wait_one()
        finally:
            for pool in self._pools:
                pool.shutdown(wait=False)

    def _import(self, v: MhVcpu, cmd: mb.MhCommand, payload: bytes, epoch: int, slot: int = 0,
                *, what: str = "") -> None:
        data = v.data(slot)
        data[: len(payload)] = payload
        answer = v.command(cmd, slot=slot, length=len(payload), epoch=epoch)
        if answer.ret != mb.MhReturn.SUCCESS:
            if not what:
                header = mb.decode_record_header(payload)
                what = f"a record of stream {header.stream} (sequence {header.seq})"
            raise StreamError(_refused(f"{cmd.name} of {what}", answer.ret))
