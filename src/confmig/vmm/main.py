"""``confmig vm``: one VMM process, QEMU's role."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import BinaryIO

from confmig.common.errors import ConfmigError
from confmig.common.malloc import keep_large_allocations
from confmig.vmm import cmdline
from confmig.vmm.machine import Machine
from confmig.vmm.migration.cpr import CprListener
from confmig.vmm.migration.state import MigrationState
from confmig.vmm.qmp.commands import register
from confmig.vmm.qmp.schema import QmpRegistry
from confmig.vmm.qmp.server import QmpServer

log = logging.getLogger("confmig.vm")


def console_sink(spec: str) -> tuple[Callable[[bytes], None], BinaryIO | None]:
    """Where guest serial output goes: stdout, a log file, or nowhere."""
    if spec == "none":
        return (lambda _b: None), None
    if spec == "stdio":
        out = sys.stdout.buffer

        def write_stdout(data: bytes) -> None:
            out.write(data)
            out.flush()

        return write_stdout, None
    f = open(spec[5:], "ab", buffering=0)  # noqa: SIM115 - lives as long as the VM

    def write_file(data: bytes) -> None:
        f.write(data)

    return write_file, f


async def serve(config: cmdline.MachineConfig, ready: Callable[[], None] = lambda: None) -> int:
    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    registry = QmpRegistry()
    server = QmpServer(registry)
    console, console_file = console_sink(config.serial)
    cpr_listener = CprListener(config.cpr_incoming) if config.cpr_incoming else None
    received = None
    if cpr_listener is not None:
        # QEMU's cpr-transfer: read the cpr channel before building the machine or opening
        # the monitor; the machine is the old VMM's guest, on the descriptors that came.
        try:
            received = await asyncio.to_thread(cpr_listener.receive)
        except BaseException:
            cpr_listener.release()
            raise
    try:
        machine = Machine(config, events=server.emit_event, console=console, cpr=received)
    except BaseException:
        if received is not None:
            received.close()
        if cpr_listener is not None:
            cpr_listener.release()  # the old VMM sees the hang-up, fails to connect, runs on
        raise
    migration = MigrationState(machine, server.emit_event)

    def request_quit() -> None:
        loop.call_soon_threadsafe(quit_event.set)

    register(registry, machine, migration, request_quit=request_quit)
    try:
        for ep in config.qmp:
            if ep.kind == "unix":
                await server.start_unix(ep.path)
            else:
                await server.start_tcp(ep.host, ep.port)
        if config.incoming and config.incoming != "defer":
            migration.migrate_incoming(config.incoming)
        if cpr_listener is not None:
            cpr_listener.release()  # we listen on the main channel: the old VMM connects next
        elif not config.incoming and not config.start_paused:
            machine.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, quit_event.set)
        ready()
        await quit_event.wait()
        return 0
    finally:
        await server.close()
        machine.close()
        if console_file is not None:
            console_file.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("CONFMIG_LOG", "WARNING"),
                        format="%(asctime)s vm[%(process)d] %(levelname)s %(message)s")
    keep_large_allocations()  # migration batches reuse their buffers
    try:
        config = cmdline.parse(argv)
    except ConfmigError as exc:
        print(f"confmig vm: {exc}", file=sys.stderr)
        return 1
    if config.daemonize:
        return _daemonize(config)
    try:
        return asyncio.run(serve(config, ready=lambda: _write_pidfile(config)))
    except ConfmigError as exc:
        print(f"confmig vm: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"confmig vm: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _write_pidfile(config: cmdline.MachineConfig) -> None:
    if config.pidfile:
        with open(config.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")


def _daemonize(config: cmdline.MachineConfig) -> int:
    """As QEMU's ``-daemonize``: the parent returns once the VM is up (or failed)."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read()
        if msg == b"ok":
            return 0
        print(f"confmig vm: {msg.decode(errors='replace') or 'failed to start'}", file=sys.stderr)
        return 1
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def ready() -> None:
        _write_pidfile(config)
        os.write(wfd, b"ok")
        os.close(wfd)

    try:
        code = asyncio.run(serve(config, ready=ready))
    except (ConfmigError, OSError) as exc:
        try:
            os.write(wfd, str(exc).encode())
            os.close(wfd)
        except OSError:
            pass
        code = 1
    os._exit(code)
