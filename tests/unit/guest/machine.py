"""A model machine for guest tests: RAM, COM1, fw_cfg, optionally kv, and the fake vCPU.

``sev=True`` makes it an SEV guest as confmig's VMM sets one up: the vCPU
encrypts C-bit accesses, and the hypervisor advertises migration control
(``migration_control``, default: as ``sev``) and answers ``KVM_HC_MAP_GPA_RANGE``
with ``hypercall_result`` (0; ``-KVM_ENOSYS`` models a host without
``KVM_CAP_EXIT_HYPERCALL``). ``fw_cfg_files`` are the VMM's ``-fw_cfg`` files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from fakecpu import MIGRATION_FEATURES, STEP_NS, CpuSnapshot, FakeCpu

from confmig.common.units import MiB
from confmig.guest.image import rom
from confmig.vmm.devices import PortIoDevice
from confmig.vmm.devices.fw_cfg import FwCfg
from confmig.vmm.devices.kv import KvDevice
from confmig.vmm.devices.serial import Serial
from confmig.vmm.memory import GuestMemory

ROM = rom()


@dataclass(frozen=True, slots=True)
class MachineSnapshot:
    """Everything a migration carries: RAM, vCPU state, device state (and, for the
    test's comparison, the console so far)."""

    ram: tuple[bytes, ...]
    cpu: CpuSnapshot
    devices: dict[str, bytes]
    console: bytes


class Machine:
    def __init__(
        self,
        cmdline: str,
        *,
        ram_size: int = 64 * MiB,
        memory: GuestMemory | None = None,
        kv_socket: str | os.PathLike[str] | None = None,
        idle_wait: float = 0.0,
        step_ns: int = STEP_NS,
        sev: bool = False,
        migration_control: bool | None = None,
        hypercall_result: int = 0,
        fw_cfg_files: dict[str, bytes] | None = None,
        es: bool = False,
    ) -> None:
        self.cmdline = cmdline
        self.memory = memory if memory is not None else GuestMemory.pc(ram_size)
        self.console = bytearray()
        self.serial = Serial(self.console.extend)
        self.fw_cfg = FwCfg(
            self.memory, ram_size=self.memory.ram_size, nb_cpus=1, cmdline=cmdline,
            files=fw_cfg_files or {},
        )
        self.devices: list[PortIoDevice] = [self.serial, self.fw_cfg]
        self.kv: KvDevice | None = None
        if kv_socket is not None:
            self.kv = KvDevice(self.memory, self._raise_irq, kv_socket)
            self.devices.append(self.kv)
        features = MIGRATION_FEATURES if (sev if migration_control is None else migration_control) else 0
        self.cpu = FakeCpu(
            self.memory, self.devices, idle_wait=idle_wait, step_ns=step_ns, sev=sev,
            kvm_features=features, hypercall_result=hypercall_result, es=es,
        )

    def _raise_irq(self, vector: int) -> None:
        self.cpu.inject(vector)

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.kv is not None:
            self.kv.stop()
        self.memory.close()

    def run(self, until: Callable[[FakeCpu], bool], max_steps: int = 1_000_000) -> None:
        self.cpu.run(ROM, until=until, max_steps=max_steps)

    @property
    def lines(self) -> list[str]:
        return self.console.decode().splitlines()

    def run_until_line(self, prefix: str, max_steps: int = 1_000_000) -> str:
        """Run until the console shows a (new) line starting with ``prefix``; return it."""
        seen = sum(1 for line in self.lines if line.startswith(prefix))

        def printed(_: FakeCpu) -> bool:
            return sum(1 for line in self.lines if line.startswith(prefix)) > seen

        self.run(printed, max_steps)
        matches = [line for line in self.lines if line.startswith(prefix)]
        assert len(matches) > seen, f"no {prefix!r} line; console:\n{self.console.decode()}"
        return matches[-1]

    def snapshot(self) -> MachineSnapshot:
        return MachineSnapshot(
            ram=tuple(b.bytes.tobytes() for b in self.memory.blocks),
            cpu=self.cpu.snapshot(),
            devices={d.vmsd_name: d.save_state() for d in self.devices},
            console=bytes(self.console),
        )

    @classmethod
    def restore(cls, snap: MachineSnapshot, cmdline: str, **kwargs: object) -> Machine:
        """A new machine (fresh RAM, devices and vCPU) continuing from ``snap``."""
        ram_size = sum(len(r) for r in snap.ram)
        machine = cls(cmdline, ram_size=ram_size, **kwargs)  # type: ignore[arg-type]
        for block, data in zip(machine.memory.blocks, snap.ram, strict=True):
            block.bytes[:] = np.frombuffer(data, dtype=np.uint8)
        machine.cpu.restore(snap.cpu)
        for device in machine.devices:
            device.load_state(snap.devices[device.vmsd_name])
        machine.console[:] = snap.console
        return machine


@contextmanager
def running(m: Machine) -> Iterator[None]:
    """Run the vCPU in a thread, as a VMM's vCPU thread would, until the block ends."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def vcpu() -> None:
        try:
            m.run(lambda _: stop.is_set(), max_steps=10**9)
        except BaseException as exc:  # reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=vcpu, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert not failure, failure
    assert m.cpu.shutdown_reason is None, m.cpu.shutdown_reason
