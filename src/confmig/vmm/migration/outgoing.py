"""The source side of the engine: setup, precopy rounds, switch-over, completion.

One loop for every kind of guest (QEMU's ``migration_thread``): the engine owns
the rounds, the dirty-log sync, the bandwidth limit and the downtime estimate,
the switch-over, the return path, the status and the statistics; a backend
(``backend.OutgoingBackend``) turns batches of dirty pages into records and owns
its sessions, its final records and its cancel. The engine talks to the machine
through :class:`SourceVm` and takes its time from the statistics' clock, so it
runs in unit tests with fakes of all three.

Whatever happens, a migration that does not complete leaves the source VM
running as it was; once the target has confirmed, the guest is the target's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from confmig.common.errors import ConfmigError, RemoteMigrationError, StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.decoder import NEED_DATA
from confmig.proto.stream.writer import DeviceSection, StreamWriter
from confmig.vmm.migration.backend import OutgoingBackend
from confmig.vmm.migration.convergence import (
    ConvergencePolicy,
    RoundResult,
    downtime_limit_policy,
    expected_downtime_ms,
)
from confmig.vmm.migration.multifd import MultifdSender
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import (
    MAX_BATCH_PAGES,
    Cancelled,
    DirtyLog,
    MainChannelSink,
    PageSink,
    RateLimiter,
    RoundCounters,
)
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import Channel, Connect, MigrationUri, connect

log = logging.getLogger(__name__)

RETURN_PATH_TIMEOUT = 60.0
"""Seconds the source waits for the target's verdict after the last byte."""


class SourceVm(Protocol):
    """What the engine needs of the machine it migrates (``vmstate.MachineVm``)."""

    machine_type: str

    @property
    def blocks(self) -> list[tuple[str, int]]: ...

    @property
    def vcpu_ids(self) -> list[int]: ...

    def dirty_log(self) -> DirtyLog: ...

    def set_dirty_logging(self, on: bool) -> None: ...

    def stop_for_switchover(self) -> None: ...

    def recover(self, *, resume: bool = True) -> None: ...

    def save_sections(self) -> Sequence[DeviceSection]: ...

    def migrated(self) -> None: ...


BackendFactory = Callable[[MainChannelSink, PageSink], OutgoingBackend]
"""Builds this migration's backend once the main channel exists (``backends.outgoing_backend``)."""


class OutgoingMigration(threading.Thread):
    def __init__(
        self,
        vm: SourceVm,
        uri: MigrationUri,
        params: MigrationParameters,
        stats: MigrationStats,
        set_status: Callable[[MigrationStatus], None],
        backend_for: BackendFactory,
        *,
        policy: ConvergencePolicy = downtime_limit_policy,
        pass_event: Callable[[int], None] = lambda _n: None,
        connect: Connect = connect,
    ) -> None:
        super().__init__(name="migration", daemon=True)
        self.vm = vm
        self.uri = uri
        self.params = params
        self.stats = stats
        self.clock = stats.clock
        self.set_status = set_status
        self.policy = policy
        self.pass_event = pass_event
        self.cancel = threading.Event()
        self.error: str | None = None
        self.backend: OutgoingBackend | None = None
        self._backend_for = backend_for
        self._connect = connect
        self._channels: list[Channel] = []
        self._multifd: MultifdSender | None = None
        self._dirty: DirtyLog | None = None
        self._main: Channel | None = None
        self._lock = threading.Lock()
        self._stream_sent = False
        """The whole stream is out: a cancel no longer cuts the channel, it waits for the verdict
        (the target may already run the guest; resuming here too would run it twice)."""
        self._handed_over = False
        """The target confirmed: from here on the guest is the target's."""
        self._refused = False
        """The target said it failed (its verdict came, negative): the guest never ran there."""
        self._limiter = RateLimiter(params.max_bandwidth, self.cancel, self.clock)

    def update_parameters(self, params: MigrationParameters) -> None:
        """``migrate-set-parameters`` during a migration applies at once, as in QEMU
        (libvirt's ``migrate-setspeed`` relies on it)."""
        self.params = params
        self._limiter.max_bandwidth = params.max_bandwidth

    def request_cancel(self) -> None:
        """``migrate_cancel``: unblock the thread at once, unless the whole stream is out."""
        with self._lock:
            self.cancel.set()
            if self._stream_sent:
                log.warning("migrate_cancel after the whole stream was sent: waiting for the "
                            "target's verdict instead")
                return
            for ch in self._channels:
                ch.abort()

    # --- the thread ----------------------------------------------------------------

    def run(self) -> None:
        try:
            out = self._setup()
            for _ in self.precopy(out):
                pass
            self._complete(out)
        except Exception as exc:  # whatever broke, the source guest must not stay stopped
            cancelled = not self._handed_over and (isinstance(exc, Cancelled) or self.cancel.is_set())
            if cancelled:
                self.set_status(MigrationStatus.CANCELLING)
            elif isinstance(exc, ConfmigError | OSError):
                self.error = str(exc) or type(exc).__name__
                log.error("migration failed: %s", self.error)
            else:
                self.error = f"internal error: {type(exc).__name__}: {exc}"
                log.exception("migration failed")
            self._recover()
            self.set_status(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED)
        finally:
            if self._multifd is not None:
                self._multifd.close()
            for ch in self._channels:
                ch.close()
            with contextlib.suppress(ConfmigError):
                self.vm.set_dirty_logging(False)
            self.stats.total_time_ms = self.stats.elapsed_ms()

    def _recover(self) -> None:
        if self._handed_over:  # the target runs the guest: it must never run here too
            with contextlib.suppress(ConfmigError):
                self.vm.migrated()
            return
        cancel_error = None
        if self.backend is not None:
            try:
                self.backend.cancel()
            except ConfmigError as exc:
                log.error("%s backend: cancel failed: %s", self.backend.name, exc)
                cancel_error = str(exc)
        lost = self._stream_sent and not self._refused
        if lost and not (self.backend is not None and self.backend.resumable_without_verdict()):
            # The whole guest went out and no verdict came back: the target may be running it.
            # Resuming here too would run two copies (QEMU would); the source stays paused.
            self.vm.recover(resume=False)
            held = cancel_error or ("the target may be running the guest (its verdict was lost), so "
                                    "the source stays paused: cont runs it here if the target does not")
            log.error("%s", held)
            self.error = f"{self.error}; {held}" if self.error else held
            return
        try:
            self.vm.recover()
        except ConfmigError as exc:  # e.g. a guest its backend sent away and got no abort for
            log.error("the source guest stays stopped: %s", exc)
            self.error = f"{self.error}; the source guest stays stopped: {exc}" if self.error else str(exc)

    # --- phases ------------------------------------------------------------------------

    def _setup(self) -> MainChannelSink:
        """Connect, build the backend, start dirty logging, write the stream's opening."""
        stats, params = self.stats, self.params
        self.set_status(MigrationStatus.SETUP)
        stats.total_bytes = sum(size for _, size in self.vm.blocks)
        main = self._connect(self.uri)
        self._channels.append(main)
        out = MainChannelSink(main, StreamWriter(self.vm.machine_type, batch_pages=MAX_BATCH_PAGES))
        self._main = main
        pages: PageSink = out
        if "multifd" in params.capabilities and self.uri.is_socket:
            self._multifd = MultifdSender(self.uri, params.multifd_channels, stats, out,
                                          connect=self._connect)
            self._channels.extend(self._multifd.channels)
            pages = self._multifd
        self.backend = self._backend_for(out, pages)
        stats.confidential = self.backend.counters
        if self.backend.send_buffer:
            main.set_buffer_size(send=self.backend.send_buffer)
        self._dirty = self.backend.dirty_log(self._start_dirty_log)
        stats.dirty_sync_count = 1
        self.pass_event(1)
        out.open_stream(self.vm.blocks)
        self._sync_channels()  # as QEMU's ram_save_setup: every EOS has its SYNC on every channel
        stats.transferred = self._sent()
        stats.setup_time_ms = stats.elapsed_ms()
        self.set_status(MigrationStatus.ACTIVE)
        return out

    def precopy(self, out: MainChannelSink) -> Iterator[RoundResult]:
        """Rounds while the guest runs, one result each, until the policy says switch over."""
        assert self.backend is not None and self._dirty is not None
        while True:
            self.stats.rounds += 1
            out.begin_round()
            if self.stats.rounds == 1:
                self.backend.setup()  # sessions and keys: not part of the round's bandwidth
            t0, b0 = self.clock.monotonic(), self._sent()
            sent = self._send_dirty(final=False)
            out.end_part()
            elapsed = max(self.clock.monotonic() - t0, 1e-6)
            result = self._end_round(self._dirty.sync(), sent, self._sent() - b0, elapsed)
            self._target_gave_up()
            yield result
            if self.cancel.is_set():
                raise Cancelled
            if self.policy(result):
                return

    def _complete(self, out: MainChannelSink) -> None:
        """Stop the guest, send what is left and its state, wait for the target's verdict."""
        vm, stats, clock, backend = self.vm, self.stats, self.clock, self.backend
        assert backend is not None and self._dirty is not None
        t_stop = clock.monotonic()
        backend.before_stop()
        t_stopping = clock.monotonic()
        vm.stop_for_switchover()
        t_stopped = clock.monotonic()
        self.set_status(MigrationStatus.DEVICE)
        stats.precopy_bytes = self._sent()
        self._dirty.sync()
        stats.dirty_sync_count += 1
        backend.switchover()
        out.begin_final()
        self._send_dirty(final=True)
        backend.complete(vm.vcpu_ids)
        out.end_part()
        t_ram = clock.monotonic()
        out.close_stream(vm.save_sections())
        with self._lock:
            self._stream_sent = True
        stats.remaining = 0
        t_sent = clock.monotonic()
        if self.uri.is_socket:
            assert self._main is not None
            self._await_target(self._main)
        self._handed_over = True
        t_done = clock.monotonic()
        try:
            backend.finish()
        except ConfmigError as exc:  # the guest runs on the target now, whatever this says
            log.error("%s backend: finishing after the target confirmed: %s", backend.name, exc)
        stats.transferred = self._sent()
        stats.downtime_bytes = stats.transferred - stats.precopy_bytes
        stats.downtime_ms = int((t_done - t_stop) * 1000)
        stats.downtime_breakdown = {
            "backend-prepare": (t_stopping - t_stop) * 1000,
            "stop-vcpus": (t_stopped - t_stopping) * 1000,
            "final-ram": (t_ram - t_stopped) * 1000,
            "device-state": (t_sent - t_ram) * 1000,
            "target-resume": (t_done - t_sent) * 1000,
        }
        stats.total_time_ms = stats.elapsed_ms()
        stats.mbps = stats.transferred * 8 / max(stats.total_time_ms / 1000, 1e-6) / 1e6
        vm.migrated()
        self.set_status(MigrationStatus.COMPLETED)

    # --- pieces --------------------------------------------------------------------------

    def _start_dirty_log(self) -> DirtyLog:
        self.vm.set_dirty_logging(True)
        dirty = self.vm.dirty_log()
        dirty.sync()  # start the dirty log from now; every page is already set
        return dirty

    def _send_dirty(self, *, final: bool) -> RoundCounters:
        """Every dirty page through the backend; rate-limited except while the guest is stopped."""
        assert self.backend is not None and self._dirty is not None
        backend, stats, total = self.backend, self.stats, RoundCounters()
        for block, indices, zero in self._dirty.take_round(backend.batch_pages):
            if self.cancel.is_set():
                raise Cancelled
            sent = backend.zeros(block, indices) if zero else backend.pages(block, indices)
            total += sent
            stats.normal += sent.normal
            stats.duplicate += sent.zero
            stats.transferred = self._sent()
            if not final:
                self._limiter.account(sent.bytes)
        self._sync_channels()
        return total

    def _end_round(self, dirty_pages: int, sent: RoundCounters, sent_bytes: int, elapsed: float
                   ) -> RoundResult:
        """Account a finished round and judge it (QEMU's ``migration_update_counters``)."""
        stats, params = self.stats, self.params  # params may have changed during the round
        stats.dirty_sync_count += 1
        self.pass_event(stats.dirty_sync_count)
        stats.pages_per_second = int((sent.normal + sent.zero) / elapsed)
        bandwidth = sent_bytes / elapsed
        stats.remaining = dirty_pages * PAGE_SIZE
        stats.dirty_pages_rate = int(dirty_pages / elapsed)
        stats.mbps = bandwidth * 8 / 1e6
        stats.expected_downtime_ms = expected_downtime_ms(stats.remaining, bandwidth)
        return RoundResult(remaining_bytes=stats.remaining, bandwidth=bandwidth,
                           downtime_limit_ms=params.downtime_limit,
                           switchover_bandwidth=params.avail_switchover_bandwidth)

    def _sync_channels(self) -> None:
        if self._multifd is not None:
            self._multifd.sync()

    def _sent(self) -> int:
        return sum(ch.sent for ch in self._channels)

    def _target_gave_up(self) -> None:
        """Between rounds, while the guest runs: a target that already failed (its verdict came
        early, an MH abort token perhaps before it) or hung up ends the migration here, where
        every backend can still take the guest back; past switch-over a confidential backend
        may not (QEMU's return-path thread reads all along). Bytes that are no verdict are left
        for the final read, which reports them."""
        main = self._main
        if main is None or main.sock is None:
            return
        try:
            early = main.sock.recv(rp.HEADER.size + rp.CONFIDENTIAL_MAX + 2 * rp.HEADER.size,
                                   socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # nothing yet: the target is still loading
        except OSError:
            early = b""  # reset: the target is gone
        if early:
            probe = rp.ReturnPathDecoder()
            probe.receive_data(early)
            try:
                while isinstance(event := probe.next_event(), rp.Confidential):
                    pass
            except StreamError:
                return
            if not isinstance(event, rp.Shut) or event.ok:
                return
        self._await_target(main)  # reads the failure (or the hang-up) for real, and raises

    def _await_target(self, main: Channel) -> None:
        """Read the return path: the target says whether it loaded and resumed."""
        deadline = self.clock.monotonic() + RETURN_PATH_TIMEOUT
        decoder = rp.ReturnPathDecoder()
        try:
            while (event := decoder.next_event()) is NEED_DATA or isinstance(event, rp.Confidential):
                if isinstance(event, rp.Confidential):
                    if self.backend is None:
                        raise StreamError("a confidential return-path message before any backend")
                    self.backend.from_target(event.payload)
                    continue
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no verdict within {RETURN_PATH_TIMEOUT:.0f} s")
                main.set_timeout(left)
                n = main.recv_into(decoder.get_buffer())
                if n:
                    decoder.buffer_updated(n)
                else:
                    decoder.feed_eof()
        except (OSError, StreamError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RemoteMigrationError(f"target did not confirm the migration: {reason}") from exc
        if not isinstance(event, rp.Shut):
            raise RemoteMigrationError(f"target did not confirm the migration: unexpected "
                                       f"return-path message {type(event).__name__.upper()}")
        if not event.ok:
            self._refused = True
            raise RemoteMigrationError("the target failed to load the migration stream")
