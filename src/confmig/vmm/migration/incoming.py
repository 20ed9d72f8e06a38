"""The target side: accept the stream, land RAM and device state, resume.

A stream that is truncated or corrupt fails the incoming migration with a
clear error and the target stays stopped (it never runs a half-loaded guest);
the source learns it through the return path and keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from confmig.common.errors import ConfmigError, StreamError
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import return_path as rp
from confmig.proto.stream.format import MULTIFD_MAGIC
from confmig.proto.stream.writer import DeviceSection
from confmig.vmm.memory import GuestMemory
from confmig.vmm.migration.backend import IncomingBackend
from confmig.vmm.migration.multifd import MultifdReceiver
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import RamLanding
from confmig.vmm.migration.stats import MigrationStats
from confmig.vmm.migration.status import MigrationStatus
from confmig.vmm.migration.transport import Channel, Listener, MigrationUri

log = logging.getLogger(__name__)


class TargetVm(Protocol):
    """What the engine needs of the machine it receives into (``vmstate.MachineVm``)."""

    memory: GuestMemory

    @property
    def vcpu_ids(self) -> list[int]: ...

    def check_blocks(self, sent: Sequence[tuple[str, int]]) -> None: ...

    def load_section(self, section: DeviceSection) -> None: ...

    def finish_load(self) -> None: ...

    def resume(self) -> None: ...


class IncomingMigration(threading.Thread):
    def __init__(
        self,
        vm: TargetVm,
        uri: MigrationUri,
        params: MigrationParameters,
        stats: MigrationStats,
        set_status: Callable[[MigrationStatus], None],
        backend: IncomingBackend,
    ) -> None:
        super().__init__(name="migration-incoming", daemon=True)
        self.vm = vm
        self.params = params
        self.stats = stats
        self.set_status = set_status
        self.backend = backend
        self.error: str | None = None
        self.listener = Listener(uri)  # bind now: a busy port is the caller's error
        self._main: Channel | None = None
        self.landing = RamLanding(vm.memory, starts_zero=backend.ram_starts_zero)
        self._multifd: MultifdReceiver | None = None

    @property
    def address(self) -> str:
        return self.listener.address

    def run(self) -> None:
        self.set_status(MigrationStatus.SETUP)
        self.stats.total_bytes = self.vm.memory.ram_size
        self.stats.confidential = self.backend.counters
        ok = False
        try:
            self._receive()
            ok = True
        except (ConfmigError, OSError, ValueError, struct.error) as exc:
            self.error = f"load of migration failed: {exc}"
            log.error("%s", self.error)
            self.set_status(MigrationStatus.FAILED)
        except Exception as exc:  # a bug: the target still fails cleanly, stopped, and says so
            self.error = f"load of migration failed: internal error: {type(exc).__name__}: {exc}"
            log.exception("incoming migration failed")
            self.set_status(MigrationStatus.FAILED)
        finally:
            try:
                self._reply(ok)
            finally:  # whatever the reply met, the source must see the channel close
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
        main, prefix = self._accept()
        self._main = main
        if self.backend.receive_buffer:
            main.set_buffer_size(receive=self.backend.receive_buffer)
        self.set_status(MigrationStatus.ACTIVE)
        d = dec.StreamDecoder()
        if prefix:
            d.receive_data(prefix)
        landing, stats, backend, vm = self.landing, self.stats, self.backend, self.vm
        rounds = 0
        while True:
            ev = d.next_event()
            if ev is dec.NEED_DATA:
                n = main.recv_into(d.get_buffer())
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
                    vm.check_blocks(ev.blocks)
                case dec.RamEos():
                    rounds += 1
                    if self._multifd is not None:
                        self._multifd.wait_sync(rounds)
                case dec.DeviceState():
                    vm.load_section(DeviceSection(idstr=ev.idstr, instance_id=ev.instance_id,
                                                  version_id=ev.version_id, state=ev.state))
                case dec.Confidential():
                    backend.record(ev.subtype, ev.payload)
                case dec.VmDescription() | dec.End():
                    break
        log.debug("stream loaded")
        vm.finish_load()
        backend.verify()
        backend.take_over()
        vm.resume()
        log.debug("incoming migration finished")

    def _reply(self, ok: bool) -> None:
        """Tell the source (return path) whether we loaded and resumed; after a failure, first
        whatever the backend has for the source (an abort token that lets its guest run on)."""
        if self._main is None or self._main.sock is None:
            return
        message = b""
        if not ok:
            # The backend's abort may need this host (the MH's vCPUs run there): one that died
            # gives an OSError, and no token. The source must hear the failure all the same: an
            # abort that escaped left the main channel open and the source blocked in its send.
            try:
                token = self.backend.abort()
            except (ConfmigError, OSError) as exc:
                log.error("%s backend: abort failed: %s", self.backend.name, exc)
                token = b""
            except Exception:  # a bug: no token either (the source's guest stays as it would)
                log.exception("%s backend: abort failed", self.backend.name)
                token = b""
            if token:
                message = rp.encode(rp.Confidential(payload=token))
        with contextlib.suppress(OSError, ConfmigError):
            self._main.send_all(message + rp.encode(rp.Shut(status=0 if ok else 1)))

    def close(self) -> None:
        self.listener.close()
