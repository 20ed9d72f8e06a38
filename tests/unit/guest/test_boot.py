"""Firmware and kernel on the fake vCPU: reset vector to workload, and the step discipline."""

import itertools

import pytest
from fakecpu import FakeCpu
from machine import ROM, Machine

from confmig.common.units import GiB, KiB, MiB
from confmig.guest import kernel, layout
from confmig.guest.firmware import bootinfo
from confmig.guest.workloads import WORKLOADS
from confmig.platform.cpu.abi import RESET_VECTOR, TSC_HZ, GuestCpu, RomRegion
from confmig.vmm.devices.serial import Serial
from confmig.vmm.memory import GuestMemory


def test_image_regions_do_not_overlap_and_the_firmware_holds_the_reset_vector() -> None:
    regions = sorted(ROM, key=lambda r: r.base)
    for a, b in itertools.pairwise(regions):
        assert a.base + a.size <= b.base, (a.name, b.name)
    assert [r.name for r in ROM if r.contains(RESET_VECTOR)] == ["firmware"]
    assert {r.name for r in ROM} == {"firmware", "kernel", *WORKLOADS}


def test_boot_reads_fw_cfg_and_runs_the_workload_from_the_cmdline() -> None:
    with Machine("workload=dirty rate=10 wss=1M seed=7") as m:
        m.run_until_line("dirty:")
        firmware, kern, dirty = m.lines[:3]
        assert firmware == "confmig firmware 1.0: fw_cfg DMA, 1 CPU(s), RAM 64 MiB"
        assert kern == "confmig kernel: workload dirty (rate=10 wss=1 MiB fill=random seed=7)"
        assert dirty.startswith("dirty: 256 pages")
        info = bootinfo.load(m.cpu)
        assert info.cmdline == "workload=dirty rate=10 wss=1M seed=7"
        assert info.ram_size == 64 * MiB
        assert m.cpu.shutdown_reason is None


def test_boot_info_carries_both_ram_regions() -> None:
    with Machine("workload=idle", ram_size=3 * GiB + 16 * MiB) as m:
        m.run_until_line("confmig kernel")
        info = bootinfo.load(m.cpu)
        ram = [(r.start, r.size) for r in info.ram]
        assert ram == [(0, 3 * GiB), (4 * GiB, 16 * MiB)]
        assert bootinfo.load_ram(m.cpu) == info.ram  # the MH's reading: header and map only
        entries = [bootinfo.E820Entry(address=0, length=640 * KiB, type=bootinfo.E820_RAM),
                   bootinfo.E820Entry(address=640 * KiB, length=384 * KiB, type=bootinfo.E820_RAM + 1),
                   bootinfo.E820Entry(address=1 * MiB, length=3 * GiB - MiB, type=bootinfo.E820_RAM)]
        bootinfo.store_e820(m.cpu, entries)  # a map with a hole that is not RAM
        assert bootinfo.load_ram(m.cpu) == bootinfo.load(m.cpu).ram
        assert [(r.start, r.size) for r in bootinfo.load_ram(m.cpu)] == [(0, 640 * KiB), (MiB, 3 * GiB - MiB)]
        assert "RAM 3088 MiB" in m.lines[0]


def test_without_a_workload_option_the_guest_idles() -> None:
    with Machine("") as m:
        assert m.run_until_line("confmig kernel") == "confmig kernel: workload idle (no options)"


@pytest.mark.parametrize(
    ("cmdline", "error"),
    [
        ("workload=dirty rate=5 colour=blue", "unknown option(s) colour for workload dirty"),
        ("workload=tetris", "unknown workload 'tetris'"),
        ("workload=dirty rate", "malformed option 'rate'"),
        ("workload=dirty rate=1 rate=2", "option 'rate' given twice"),
        ("workload=dirty fill=ones", "fill=ones"),
        ("workload=dirty wss=lots", "invalid size"),
        ("workload=idle verbose=1", "unknown option(s) verbose for workload idle"),
        ("workload=kv slots=1000", "slots=1000 is not a power of two"),
        ("workload=idle sev_migration=maybe", "sev_migration=maybe (expected on or off)"),
    ],
)
def test_bad_cmdline_prints_one_error_and_halts(cmdline: str, error: str) -> None:
    with Machine(cmdline) as m:
        m.run(lambda _: False)  # returns once the vCPU is halted for good
        assert m.cpu.halted and m.cpu.shutdown_reason is None
        last = m.lines[-1]
        assert last.startswith("confmig kernel: ") and error in last and last.endswith("; halted")
        assert len(m.lines) == 2  # firmware banner, then the error


def test_application_processors_park_quietly() -> None:
    with Machine("workload=idle") as m:
        ap = FakeCpu(m.memory, m.devices, vcpu_id=1)
        ap.run(ROM, until=lambda _: False)
        assert ap.halted and ap.steps == 1 and m.console == b""


def test_firmware_without_fw_cfg_stops_with_a_message() -> None:
    memory = GuestMemory.pc(16 * MiB)
    try:
        console = bytearray()
        cpu = FakeCpu(memory, [Serial(console.extend)])
        cpu.run(ROM, until=lambda _: False)
        assert console == b"confmig firmware: no fw_cfg device\n"
        assert cpu.halted
    finally:
        memory.close()


def test_idle_sleeps_on_a_slow_tick_and_answers_an_nmi() -> None:
    with Machine("workload=idle") as m:
        m.run_until_line("confmig kernel")
        boot_steps = m.cpu.steps
        m.run(lambda c: c.tsc >= 10 * TSC_HZ)
        assert m.cpu.steps - boot_steps <= 12  # about one wake-up a second
        assert kernel.load_data(m.cpu).jiffies >= 9
        m.cpu.inject(2)
        assert m.run_until_line("confmig-selfcheck") == "confmig-selfcheck: PASS pages=0 writes=0"


# --- the fake vCPU itself holds guest code to the step discipline ----------------------------


def _program(body: object) -> list[RomRegion]:
    def step(cpu: GuestCpu) -> None:
        body(cpu)  # type: ignore[operator]

    return [RomRegion(name="test", base=RESET_VECTOR, size=16, step=step)]


@pytest.mark.parametrize(
    "body",
    [
        lambda cpu: (cpu.out(0x80, 1), cpu.out(0x80, 2)),  # two exits
        lambda cpu: (cpu.hlt(), cpu.read(0, 1)),  # work after the exit
        lambda cpu: cpu.read(1 << 40, 8),  # no RAM there
        lambda cpu: cpu.rdmsr(0x1234),  # unknown MSR
    ],
)
def test_fake_cpu_shuts_down_on_guest_faults(body: object) -> None:
    memory = GuestMemory.pc(16 * MiB)
    try:
        cpu = FakeCpu(memory, [])
        cpu.run(_program(body), until=lambda c: c.steps > 0)
        assert cpu.shutdown_reason is not None
    finally:
        memory.close()


def test_fake_cpu_delivers_in_results_for_the_next_step() -> None:
    seen: list[int] = []

    def step(cpu: GuestCpu) -> None:
        seen.append(cpu.regs.rax)
        cpu.inp(0x3FD, 1)  # COM1 line status

    memory = GuestMemory.pc(16 * MiB)
    try:
        cpu = FakeCpu(memory, [Serial(lambda _: None)])
        region = RomRegion(name="t", base=RESET_VECTOR, size=16, step=step)
        cpu.run([region], until=lambda c: c.steps == 2)
        assert seen == [0, 0x60]
    finally:
        memory.close()


def test_a_jump_to_nowhere_in_the_kernel_shuts_the_vcpu_down() -> None:
    with Machine("workload=idle") as m:
        m.run_until_line("confmig kernel")
        m.cpu.regs.rip = layout.KERNEL_BASE + 0x999  # no such phase
        m.cpu.halted = False
        m.run(lambda c: c.shutdown_reason is not None)
        assert "kernel: no instruction" in str(m.cpu.shutdown_reason)
