"""``confmig host``: one emulated host (kernel + silicon) serving a Unix socket."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from confmig.common.errors import ConfigError
from confmig.common.paths import default_amd_root, default_host_state_dir
from confmig.hostd.launcher import DEFAULT_ROM, SubprocessLauncher
from confmig.hostd.memory import HostMemoryPort
from confmig.kvm.host import KvmHost
from confmig.kvm.sev import MIN_SEV_ASID
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp import PlatformIdentity, PspConfig, PspMailbox, SecureProcessor, TmrMemory
from confmig.platform.psp.cost import NO_COST, PspCostModel
from confmig.platform.psp.identity import load_amd_certificates

log = logging.getLogger("confmig.host")


def build_host(identity: PlatformIdentity, *, rom: str = DEFAULT_ROM,
               psp_cost: PspCostModel = NO_COST) -> KvmHost:
    """One host's kernel and silicon, wired: KVM gets the PSP's mailbox and the SPA window
    of its memory; the platform's shared state (the UMC key slots, the SEV-ES TMR) goes to
    the PSP and, by descriptor, straight to every vCPU process."""
    slots = KeySlots()
    tmr = TmrMemory.shared()
    host = KvmHost(SubprocessLauncher(rom, key_slots_fd=slots.fd, tmr_fd=tmr.fd))
    memory = HostMemoryPort(host.spa_window, MemoryEncryptionEngine(slots))
    config = PspConfig(min_sev_asid=MIN_SEV_ASID, cost=psp_cost)  # SEV-ES ASIDs below the minimum
    host.psp = PspMailbox(SecureProcessor(identity, memory=memory, keys=slots, config=config, tmr=tmr))
    return host


def serve(socket_path: str, state_dir: str | None = None, *, amd_root: str | None = None,
          rom: str = DEFAULT_ROM, ready: threading.Event | None = None,
          psp_cost: PspCostModel = NO_COST) -> None:
    """Run a host. Its identity (the platform's SEV keys and certificates) lives in
    ``state_dir``; the emulated AMD root that certifies every host of this
    installation lives in ``amd_root``."""
    state = Path(state_dir) if state_dir else default_host_state_dir(socket_path)
    root = Path(amd_root) if amd_root else default_amd_root()
    identity = PlatformIdentity.load_or_create(state, amd_root_dir=root)
    if load_amd_certificates(root).ark != identity.certificates.ark:
        # Both are kept across runs; a root made anew since would certify nothing this host says.
        raise ConfigError(f"the platform identity in {state} was certified by another AMD root than "
                          f"the one in {root}: remove {state} to have it made anew")
    host = build_host(identity, rom=rom, psp_cost=psp_cost)
    if psp_cost.enabled:
        log.warning("PSP cost model (an assumption, not a measurement): %.1f us per command, %s",
                    psp_cost.command_latency * 1e6,
                    f"{psp_cost.bandwidth / 1e6:.1f} MB/s" if psp_cost.bandwidth else "unlimited bandwidth")
    host.listen(socket_path)
    log.info("host %d serving %s", os.getpid(), socket_path)

    def stop(_sig: int, _frame: object) -> None:
        host.close()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    if ready is not None:
        ready.set()
    try:
        host.serve_forever()
    finally:
        host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
