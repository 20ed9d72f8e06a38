"""Entry point of one vCPU process: a CPU core running guest code under KVM's run loop."""

from __future__ import annotations

import argparse
import importlib
import signal
import socket
from collections.abc import Callable, Sequence

from confmig.common.malloc import keep_large_allocations
from confmig.common.pdeathsig import die_with_parent
from confmig.kvm.vcpu import SlotMemory, Vcpu
from confmig.platform.cpu.abi import RESET_VECTOR, RomRegion
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp.vmsa import TmrMemory


def load_rom(spec: str) -> Sequence[RomRegion]:
    """``module:function`` returning the guest code image."""
    module, _, func = spec.partition(":")
    factory: Callable[[], Sequence[RomRegion]] = getattr(importlib.import_module(module), func)
    return factory()


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
        core = CpuCore(vcpu_id, memory, rom, mee=mee, tmr=tmr)
        core.regs.rip = RESET_VECTOR
        return core

    vcpu = Vcpu(args.vcpu_id, socket.socket(fileno=args.fd), socket.socket(fileno=args.control),
                make_core)
    vcpu.serve()


if __name__ == "__main__":
    main()
