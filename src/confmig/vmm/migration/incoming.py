"""The target side: accept the stream, land RAM and device state, resume.

A stream that is truncated or corrupt fails the incoming migration with a
clear error and the target stays stopped (it never runs a half-loaded guest);
the source learns it through the return path and keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from confmig.common.errors import ConfmigError, StreamError
from confmig.proto.stream import decoder as dec
from confmig.proto.stream.format import MULTIFD_MAGIC
from confmig.vmm.machine import CpuState, Machine
from confmig.vmm.migration.multifd import MultifdReceiver
from confmig.vmm.migration.outgoing import MIG_RP_MSG_SHUT, RP_HEADER
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.psp import PspLanding, bound_socket_buffer
from confmig.vmm.migration.ram import RamLanding
from confmig.vmm.migration.stats import ConfidentialCounters, MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import Channel, Listener, MigrationUri
from confmig.vmm.runstate import RunState

log = logging.getLogger(__name__)


class IncomingMigration(threading.Thread):
    def __init__(
        self,
        machine: Machine,
        uri: MigrationUri,
        params: MigrationParameters,
        stats: MigrationStats,
        set_status: Callable[[MigrationStatus], None],
    ) -> None:
        super().__init__(name="migration-incoming", daemon=True)
        self.machine = machine
        self.params = params
        self.stats = stats
        self.set_status = set_status
        self.error: str | None = None
        self.listener = Listener(uri)  # bind now: a busy port is the caller's error
        self._main: Channel | None = None
        self.landing = RamLanding(machine.memory)
        self._multifd: MultifdReceiver | None = None
        self._psp: PspLanding | None = None

    @property
    def address(self) -> str:
        return self.listener.address

    def run(self) -> None:
        self.set_status(MigrationStatus.SETUP)
        self.stats.total_bytes = self.machine.memory.ram_size
        ok = False
        try:
            self._receive()
            ok = True
        except (ConfmigError, OSError, ValueError, struct.error) as exc:
            self.error = f"load of migration failed: {exc}"
            log.error("%s", self.error)
            self.set_status(MigrationStatus.FAILED)
        finally:
            self._reply(ok)
            if self._multifd is not None:
                self._multifd.close()
            if self._main is not None:
                self._main.close()
            self.listener.close()
        if ok:
            self.set_status(MigrationStatus.COMPLETED)

    def _accept(self) -> tuple[Channel, bytes]:
        """Accept the main channel. With multifd, every connection is accepted by a
        thread that tells channels apart by their first four bytes (the multifd
        magic, or the stream's ``QEVM``), in whatever order they arrive."""
        if "multifd" not in self.params.capabilities or not self.listener.uri.is_socket:
            return self.listener.accept(), b""
        receiver = MultifdReceiver(self.landing, self.stats, self.params.multifd_channels)
        self._multifd = receiver
        mains: queue.Queue[tuple[Channel, bytes]] = queue.Queue()

        def accept_all() -> None:
            while not receiver.closed:
                try:
                    ch = self.listener.accept()
                    magic = ch.recv_exact(4)
                except (OSError, ConfmigError):
                    return
                if int.from_bytes(magic, "big") == MULTIFD_MAGIC:
                    try:
                        receiver.add_channel(ch, magic)
                    except StreamError as exc:
                        log.warning("%s", exc)
                else:
                    mains.put((ch, magic))

        threading.Thread(target=accept_all, name="multifd-accept", daemon=True).start()
        return mains.get()

    def _receive(self) -> None:
        m = self.machine
        main, prefix = self._accept()
        self._main = main
        self.set_status(MigrationStatus.ACTIVE)
        d = dec.StreamDecoder()
        if prefix:
            d.receive_data(prefix)
        landing = self.landing
        cpu_states: dict[int, CpuState] = {}
        stats = self.stats
        rounds = 0
        while True:
            ev = d.next_event()
            if ev is dec.NEED_DATA:
                buf = d.get_buffer()
                n = main.recv_into(buf)
                if n == 0:
                    d.feed_eof()
                else:
                    d.buffer_updated(n)
                    stats.transferred += n
                continue
            match ev:
                case dec.RamPages():
                    landing.pages(ev.block, ev.indices, ev.data)
                    stats.normal += len(ev.indices)
                case dec.RamZeroPages():
                    landing.zeros(ev.block, ev.indices)
                    stats.duplicate += len(ev.indices)
                case dec.RamMemSize():
                    self._check_blocks(ev.blocks)
                case dec.RamEos():
                    log.debug("end of a ram section part")
                    rounds += 1
                    if self._multifd is not None:
                        self._multifd.wait_sync(rounds)
                case dec.DeviceState():
                    if ev.idstr == "cpu":
                        cpu_states[ev.instance_id] = CpuState.decode(ev.state)
                    else:
                        dev = m.device(ev.idstr)
                        if dev is None:
                            raise StreamError(f"unknown device section '{ev.idstr}'")
                        dev.load_state(ev.state)
                case dec.Confidential():
                    self._confidential(ev)
                case dec.VmDescription() | dec.End():
                    break
        log.debug("stream loaded")
        if set(cpu_states) != {v.fd.vcpu_id for v in m.vcpus}:
            raise StreamError(f"stream has state for vCPUs {sorted(cpu_states)}, this VM has {len(m.vcpus)}")
        for v in m.vcpus:
            m.load_cpu(v, cpu_states[v.fd.vcpu_id])
        log.debug("cpu state loaded")
        sev = m.psp_guest
        if sev is not None and not sev.receiving:
            raise StreamError("the stream carried no PSP session for this SEV guest")
        if sev is not None and sev.config.es and (self._psp is None or len(self._psp.vmsas) != len(m.vcpus)):
            raise StreamError("the stream did not carry the VMSA of every vCPU of this SEV-ES guest")
        if m.autostart:
            m.start()
        else:
            m.set_runstate(RunState.PAUSED)
        log.debug("incoming migration finished")

    def _confidential(self, ev: dec.Confidential) -> None:
        sev = self.machine.psp_guest
        if sev is None:
            raise StreamError("confidential records need an SEV guest on this side "
                              "(-object sev-guest ... -machine confidential-guest-support=...)")
        if self._psp is None:
            if self._main is not None:
                bound_socket_buffer(self._main.sock, socket.SO_RCVBUF)
            self.stats.confidential = ConfidentialCounters(backend="psp")
            self._psp = PspLanding(sev, self.machine.memory, self.stats.confidential,
                                   {v.fd.vcpu_id for v in self.machine.vcpus})
        self._psp.record(ev.subtype, ev.payload)

    def _check_blocks(self, sent: Sequence[tuple[str, int]]) -> None:
        ours = {b.idstr: b.size for b in self.machine.memory.blocks}
        for idstr, size in sent:
            if idstr not in ours:
                raise StreamError(f"Unknown ramblock \"{idstr}\", cannot accept migration")
            if ours[idstr] != size:
                raise StreamError(f"Length mismatch: {idstr}: {size:#x} in != {ours[idstr]:#x}: "
                                  "Invalid argument")

    def _reply(self, ok: bool) -> None:
        """Tell the source (return path) whether we loaded and resumed."""
        if self._main is None or self._main.sock is None:
            return
        with contextlib.suppress(OSError, ConfmigError):
            self._main.send_all(RP_HEADER.pack(MIG_RP_MSG_SHUT, 4) + struct.pack(">I", 0 if ok else 1))

    def close(self) -> None:
        self.listener.close()
