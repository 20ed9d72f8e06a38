"""The machine as the migration engine sees it: RAM blocks, run state, vCPU and device state.

QEMU's ``vmstate`` role: the engine asks for state sections and hands received
ones back, without knowing what a vCPU or a device is. :class:`MachineVm` adapts a
:class:`Machine` to the engine's :class:`~confmig.vmm.migration.outgoing.SourceVm`
and :class:`~confmig.vmm.migration.incoming.TargetVm`.
"""

from __future__ import annotations

from collections.abc import Sequence

from confmig.common.errors import StreamError
from confmig.proto.stream.writer import DeviceSection
from confmig.vmm.machine import MACHINE_TYPE, CpuState, Machine
from confmig.vmm.migration.ram import DirtyLog, RamSender
from confmig.vmm.runstate import RunState

CPU_SECTION = "cpu"
CPU_VERSION = 1
DEVICE_VERSION = 1


class MachineVm:
    """A :class:`Machine` behind the engine's interfaces."""

    machine_type = MACHINE_TYPE

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.memory = machine.memory
        self._was_running = False
        self._cpus: dict[int, CpuState] = {}
        self._loaded: set[tuple[str, int]] = set()

    @property
    def blocks(self) -> list[tuple[str, int]]:
        return [(b.idstr, b.size) for b in self.machine.memory.blocks]

    @property
    def vcpu_ids(self) -> list[int]:
        return [v.fd.vcpu_id for v in self.machine.vcpus]

    def dirty_log(self) -> DirtyLog:
        return RamSender(self.machine.memory, self.machine.vm)

    def set_dirty_logging(self, on: bool) -> None:
        self.machine.set_dirty_logging(on)

    # --- source ----------------------------------------------------------------------

    def stop_for_switchover(self) -> None:
        """QEMU's ``migration_stop_vm``: vCPUs out, devices that write guest RAM quiet."""
        m = self.machine
        self._was_running = m.runstate == RunState.RUNNING
        m.stop(RunState.FINISH_MIGRATE)
        m.quiesce_devices()

    def recover(self, *, resume: bool = True) -> None:
        """Back to where we were (QEMU's ``vm_old_state``): a guest that ran runs again. Without
        ``resume`` it stays paused, devices quiet, until ``cont``."""
        m = self.machine
        if m.runstate == RunState.FINISH_MIGRATE:
            m.set_runstate(RunState.PAUSED)
            if self._was_running and resume:
                m.start()
        if resume:
            m.resume_devices()

    def save_sections(self) -> list[DeviceSection]:
        m = self.machine
        sections = [DeviceSection(idstr=CPU_SECTION, instance_id=v.fd.vcpu_id, version_id=CPU_VERSION,
                                  state=m.save_cpu(v).encode()) for v in m.vcpus]
        sections += [DeviceSection(idstr=d.vmsd_name, instance_id=0, version_id=DEVICE_VERSION,
                                   state=d.save_state()) for d in m.devices]
        return sections

    def migrated(self) -> None:
        self.machine.set_runstate(RunState.POSTMIGRATE)

    # --- target ----------------------------------------------------------------------

    def check_blocks(self, sent: Sequence[tuple[str, int]]) -> None:
        """The source's RAM blocks must be ours, size for size (QEMU's wording)."""
        # SECURITY: names and sizes come from the stream; nothing is sized by them here.
        ours = {b.idstr: b.size for b in self.machine.memory.blocks}
        for idstr, size in sent:
            if idstr not in ours:
                raise StreamError(f"Unknown ramblock \"{idstr}\", cannot accept migration")
            if ours[idstr] != size:
                raise StreamError(f"Length mismatch: {idstr}: {size:#x} in != {ours[idstr]:#x}: "
                                  "Invalid argument")

    def load_section(self, section: DeviceSection) -> None:
        """Load one received section as it arrives: a device's now, a vCPU's once all arrived
        (``finish_load``). Each vCPU and device may come once."""
        # SECURITY: the section's name and instance come from the stream: only this VM's
        # vCPUs and devices are accepted, once each, so a source cannot make us keep more.
        m = self.machine
        key = (section.idstr, section.instance_id)
        if key in self._loaded:
            raise StreamError(f"a second section for {section.idstr} {section.instance_id}")
        if section.idstr == CPU_SECTION:
            if section.instance_id not in self.vcpu_ids:
                raise StreamError(f"state for vCPU {section.instance_id}, this VM has {len(m.vcpus)}")
            self._cpus[section.instance_id] = CpuState.decode(section.state)
        else:
            dev = m.device(section.idstr)
            if dev is None:
                raise StreamError(f"unknown device section '{section.idstr}'")
            dev.load_state(section.state)
        self._loaded.add(key)

    def finish_load(self) -> None:
        """Every vCPU's state arrived: load them."""
        m = self.machine
        if set(self._cpus) != set(self.vcpu_ids):
            raise StreamError(f"stream has state for vCPUs {sorted(self._cpus)}, this VM has {len(m.vcpus)}")
        for v in m.vcpus:
            m.load_cpu(v, self._cpus[v.fd.vcpu_id])
        m.awaiting_guest = False  # its devices' state is loaded: they serve once it runs

    def resume(self) -> None:
        """Run the loaded guest, unless ``-S`` or a ``stop`` said otherwise."""
        m = self.machine
        if m.autostart:
            m.start()
        else:
            m.set_runstate(RunState.PAUSED)
