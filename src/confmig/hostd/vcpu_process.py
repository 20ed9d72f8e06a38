"""Entry point of one vCPU process: a CPU core running guest code under KVM's run loop.

The process loads the guest code (the ROM) and digests it, for the core to compare with
the digest in the measured firmware image before the first VMRUN
(:meth:`confmig.platform.cpu.core.CpuCore.enter`). The digest is this module's own
computation over the guest package the ROM was imported from, not the guest code's word
about itself: edited guest code could otherwise vouch for itself.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from confmig.common.digest import source_tree_digest
from confmig.common.malloc import keep_large_allocations
from confmig.common.pdeathsig import die_with_parent
from confmig.kvm.vcpu import SlotMemory, Vcpu
from confmig.platform.cpu.abi import RESET_VECTOR, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp.vmsa import TmrMemory

GUEST_PACKAGE = "confmig.guest"
"""The guest code whose digest the firmware image carries (``code_digest()`` there)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedRom:
    regions: Sequence[RomRegion]
    code_digest: bytes | None
    """SHA-256 of the guest package the ROM came from, as the firmware image states it; None
    for a ROM from elsewhere (the tests' own), which no image states."""


def _loaded_guest_digest() -> bytes | None:
    """The digest of the guest package as this process imported it: None if it came from
    more than one directory, or a module of it from outside the tree digested."""
    roots = list(getattr(sys.modules[GUEST_PACKAGE], "__path__", []))
    if len(roots) != 1:
        return None
    root = Path(roots[0]).resolve()
    for name, module in list(sys.modules.items()):
        if name == GUEST_PACKAGE or name.startswith(GUEST_PACKAGE + "."):
            origin = getattr(module, "__file__", None)
            if origin is None or not Path(origin).resolve().is_relative_to(root):
                return None
    # Digested after the import: a file edited since is caught (its digest changes), except
    # by a process of this user that swaps files or bytecode caches around this moment.
    return source_tree_digest(root)  # from the files: the check never imports what it checks


def load_rom(spec: str) -> LoadedRom:
    """``module:function`` returning the guest code image, and the digest of its code."""
    module, _, func = spec.partition(":")
    factory: Callable[[], Sequence[RomRegion]] = getattr(importlib.import_module(module), func)
    regions = factory()
    ours = module == GUEST_PACKAGE or module.startswith(GUEST_PACKAGE + ".")
    return LoadedRom(regions=regions, code_digest=_loaded_guest_digest() if ours else None)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="confmig-vcpu")
    p.add_argument("--vcpu-id", type=int, required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--control", type=int, required=True)
    p.add_argument("--rom", required=True)
    p.add_argument("--key-slots", type=int, default=None)
    p.add_argument("--tmr", type=int, default=None)
    p.add_argument("--parent", type=int, required=True, help="the host's pid: the vCPU ends with it")
    args = p.parse_args(argv)
    die_with_parent(args.parent)  # a host that dies unwinding nothing leaves no vCPU behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host, not the terminal, ends vCPUs
    keep_large_allocations()  # a Migration Handler's batches reuse their buffers
    rom = load_rom(args.rom)
    mee = MemoryEncryptionEngine(KeySlots(args.key_slots)) if args.key_slots is not None else None
    tmr = TmrMemory(args.tmr) if args.tmr is not None else None

    def make_core(vcpu_id: int, memory: object) -> CpuCore:
        assert isinstance(memory, SlotMemory)
        core = CpuCore(vcpu_id, memory, rom.regions, mee=mee, tmr=tmr, code_digest=rom.code_digest)
        core.regs.rip = RESET_VECTOR
        return core

    vcpu = Vcpu(args.vcpu_id, socket.socket(fileno=args.fd), socket.socket(fileno=args.control),
                make_core)
    vcpu.serve()


if __name__ == "__main__":
    main()
