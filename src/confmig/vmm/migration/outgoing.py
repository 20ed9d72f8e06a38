"""The source side: setup, precopy rounds, switch-over, completion.

Runs in its own thread (QEMU's ``migration_thread``). Whatever happens, a
migration that does not complete leaves the source VM running as it was.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable

from confmig.common.errors import ConfmigError, RemoteMigrationError
from confmig.proto.stream import encoder as enc
from confmig.vmm.machine import MACHINE_TYPE, Machine
from confmig.vmm.migration import psp as psp_backend
from confmig.vmm.migration.convergence import (
    ConvergencePolicy,
    RoundResult,
    downtime_limit_policy,
    expected_downtime_ms,
)
from confmig.vmm.migration.multifd import MultifdSender
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import (
    Cancelled,
    MainChannelSink,
    PageSink,
    RamSender,
    RateLimiter,
    send_round,
)
from confmig.vmm.migration.stats import ConfidentialCounters, MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import Channel, MigrationUri, connect
from confmig.vmm.runstate import RunState

log = logging.getLogger(__name__)

RAM_SECTION_ID = 0
RAM_VERSION = 4
CPU_VERSION = 1
RETURN_PATH_TIMEOUT = 60.0
"""Seconds the source waits for the target's verdict after the last byte."""
MIG_RP_MSG_SHUT = 1
"""Return-path message: the target is done; u32 0 on success."""
RP_HEADER = struct.Struct(">HH")


class OutgoingMigration(threading.Thread):
    def __init__(
        self,
        machine: Machine,
        uri: MigrationUri,
        params: MigrationParameters,
        stats: MigrationStats,
        set_status: Callable[[MigrationStatus], None],
        *,
        policy: ConvergencePolicy = downtime_limit_policy,
        pass_event: Callable[[int], None] = lambda _n: None,
    ) -> None:
        super().__init__(name="migration", daemon=True)
        self.machine = machine
        self.uri = uri
        self.params = params
        self.stats = stats
        self.set_status = set_status
        self.policy = policy
        self.pass_event = pass_event
        self.cancel = threading.Event()
        self.error: str | None = None
        self._channels: list[Channel] = []
        self._vm_was_running = False
        self._psp: psp_backend.PspOutgoing | None = None
        self._limiter = RateLimiter(params.max_bandwidth, self.cancel)

    def update_parameters(self, params: MigrationParameters) -> None:
        """``migrate-set-parameters`` during a migration applies at once, as in QEMU
        (libvirt's ``migrate-setspeed`` relies on it)."""
        self.params = params
        self._limiter.max_bandwidth = params.max_bandwidth

    def request_cancel(self) -> None:
        self.cancel.set()
        for ch in self._channels:
            ch.abort()

    # --- the thread ----------------------------------------------------------

    def run(self) -> None:
        m = self.machine
        try:
            self._migrate()
        except (Cancelled, ConfmigError, OSError) as exc:
            cancelled = isinstance(exc, Cancelled) or self.cancel.is_set()
            if cancelled:
                self.set_status(MigrationStatus.CANCELLING)
            else:
                self.error = str(exc) or type(exc).__name__
                log.error("migration failed: %s", self.error)
            self._recover()
            self.set_status(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED)
        finally:
            for ch in self._channels:
                ch.close()
            with contextlib.suppress(ConfmigError):
                m.set_dirty_logging(False)
            self.stats.total_time_ms = self.stats.elapsed_ms()

    def _recover(self) -> None:
        """Back to where we were (QEMU's ``vm_old_state``): a guest that ran runs again."""
        m = self.machine
        if self._psp is not None:
            try:
                self._psp.cancel()
            except ConfmigError as exc:
                log.error("SEND_CANCEL failed: %s", exc)
        if m.runstate == RunState.FINISH_MIGRATE:
            m.set_runstate(RunState.PAUSED)
            if self._vm_was_running:
                m.start()
        m.resume_devices()

    def _migrate(self) -> bool:
        m, stats, params = self.machine, self.stats, self.params
        self.set_status(MigrationStatus.SETUP)
        stats.total_bytes = m.memory.ram_size
        main = connect(self.uri)
        self._channels.append(main)
        multifd: MultifdSender | None = None
        sink: PageSink
        main_sink = MainChannelSink(main)
        psp: psp_backend.PspOutgoing | None = None
        if m.psp_guest is not None:
            stats.confidential = ConfidentialCounters(backend="psp")
            psp = self._psp = psp_backend.PspOutgoing(m.psp_guest, params, main_sink, stats.confidential)
            sink = psp.sink
        elif "multifd" in params.capabilities and self.uri.is_socket:
            multifd = MultifdSender(self.uri, params.multifd_channels, stats, main_sink)
            self._channels.extend(multifd.channels)
            sink = multifd
        else:
            sink = main_sink
        m.set_dirty_logging(True)
        sender = RamSender(m.memory, m.vm)
        sender.sync()  # start the dirty log from now; every page is already set
        stats.dirty_sync_count = 1
        self.pass_event(1)
        blocks = [(b.idstr, b.size) for b in m.memory.blocks]
        head = enc.header(MACHINE_TYPE) + enc.ram_setup(RAM_SECTION_ID, blocks)
        session = psp.session_record() if psp is not None else b""  # opens the first section part
        main.send_all(head)
        if multifd is not None:
            multifd.sync()  # as QEMU's ram_save_setup: every EOS has its SYNC on every channel
        stats.transferred += len(head)
        stats.setup_time_ms = stats.elapsed_ms()
        self.set_status(MigrationStatus.ACTIVE)
        limiter = self._limiter

        while True:  # precopy rounds
            stats.rounds += 1
            t0 = time.monotonic()
            part = enc.ram_part_begin(RAM_SECTION_ID) + session
            session = b""
            main.send_all(part)
            sent = send_round(sender, sink, stats, limiter, self.cancel)
            if multifd is not None:
                multifd.sync()
            tail = enc.eos_and_footer(RAM_SECTION_ID)
            main.send_all(tail)
            stats.transferred += len(part) + len(tail)
            elapsed = max(time.monotonic() - t0, 1e-6)
            dirty = sender.sync()
            stats.dirty_sync_count += 1
            self.pass_event(stats.dirty_sync_count)
            bandwidth = sent.bytes / elapsed
            stats.remaining = dirty * 4096
            stats.dirty_pages_rate = int(dirty / elapsed)
            stats.mbps = bandwidth * 8 / 1e6
            stats.pages_per_second = int((sent.normal + sent.zero) / elapsed)
            stats.expected_downtime_ms = expected_downtime_ms(stats.remaining, bandwidth)
            if self.cancel.is_set():
                raise Cancelled
            params = self.params  # may have changed during the round
            if self.policy(RoundResult(remaining_bytes=stats.remaining, bandwidth=bandwidth,
                                       downtime_limit_ms=params.downtime_limit,
                                       switchover_bandwidth=params.avail_switchover_bandwidth)):
                break

        # --- switch-over: the guest is stopped from here to the target's verdict
        self._vm_was_running = m.runstate == RunState.RUNNING
        t_stop = time.monotonic()
        m.stop(RunState.FINISH_MIGRATE)
        m.quiesce_devices()
        t_stopped = time.monotonic()
        self.set_status(MigrationStatus.DEVICE)
        sender.sync()
        stats.dirty_sync_count += 1
        end = enc.ram_end_begin(RAM_SECTION_ID)
        main.send_all(end)
        send_round(sender, sink, stats, limiter, self.cancel, downtime=True)
        if multifd is not None:
            multifd.sync()
        if psp is not None:
            final = psp.final_records([v.fd.vcpu_id for v in m.vcpus])
            main.send_all(final)
            stats.transferred += len(final)
            stats.downtime_bytes += len(final)
        tail = enc.eos_and_footer(RAM_SECTION_ID)
        main.send_all(tail)
        stats.transferred += len(end) + len(tail)
        stats.downtime_bytes += len(end) + len(tail)
        t_ram = time.monotonic()
        device_bytes = self._send_devices(main)
        stats.transferred += device_bytes
        stats.downtime_bytes += device_bytes
        stats.remaining = 0
        t_sent = time.monotonic()
        if self.uri.is_socket:
            self._await_target(main)
        t_done = time.monotonic()
        if psp is not None:
            psp.finish()
        stats.downtime_ms = int((t_done - t_stop) * 1000)
        stats.downtime_breakdown = {
            "stop-vcpus": (t_stopped - t_stop) * 1000,
            "final-ram": (t_ram - t_stopped) * 1000,
            "device-state": (t_sent - t_ram) * 1000,
            "target-resume": (t_done - t_sent) * 1000,
        }
        stats.total_time_ms = stats.elapsed_ms()
        total_s = max(stats.total_time_ms / 1000, 1e-6)
        stats.mbps = stats.transferred * 8 / total_s / 1e6
        m.set_runstate(RunState.POSTMIGRATE)
        self.set_status(MigrationStatus.COMPLETED)
        return True

    def _send_devices(self, main: Channel) -> int:
        m = self.machine
        section_id = RAM_SECTION_ID + 1
        parts: list[bytes] = []
        described: list[enc.DeviceDescription] = []
        for v in m.vcpus:
            state = m.save_cpu(v).encode()
            parts.append(enc.device_section(section_id, "cpu", v.fd.vcpu_id, CPU_VERSION, state))
            described.append(enc.DeviceDescription(idstr="cpu", instance_id=v.fd.vcpu_id,
                                                 version_id=CPU_VERSION, state_size=len(state)))
            section_id += 1
        for dev in m.devices:
            state = dev.save_state()
            parts.append(enc.device_section(section_id, dev.vmsd_name, 0, 1, state))
            described.append(enc.DeviceDescription(idstr=dev.vmsd_name, instance_id=0, version_id=1,
                                                 state_size=len(state)))
            section_id += 1
        parts.append(enc.eof())
        parts.append(enc.vmdescription(described))
        blob = b"".join(parts)
        main.send_all(blob)
        return len(blob)

    def _await_target(self, main: Channel) -> None:
        """Read the return path: the target says whether it loaded and resumed."""
        assert main.sock is not None
        main.sock.settimeout(RETURN_PATH_TIMEOUT)
        try:
            kind, length = RP_HEADER.unpack(main.recv_exact(RP_HEADER.size))
            # SECURITY: peer-controlled; check the header before waiting for a body
            # it announces (garbage would otherwise stall us until the timeout).
            if kind != MIG_RP_MSG_SHUT or length != 4:
                raise RemoteMigrationError(
                    f"unexpected return-path message {kind:#06x} of {length} bytes")
            body = main.recv_exact(length)
        except (OSError, RemoteMigrationError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RemoteMigrationError(f"target did not confirm the migration: {reason}") from exc
        if struct.unpack(">I", body)[0] != 0:
            raise RemoteMigrationError("the target failed to load the migration stream")
