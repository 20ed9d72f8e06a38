"""The dirty workload: rate, working set, page format, and a self-check that catches
corruption, lost writes and misplaced pages."""

import time

import numpy as np
import pytest
from machine import Machine

from confmig.common.units import PAGE_SIZE, GiB, Gpa, KiB, MiB
from confmig.guest.layout import WORKLOAD_MEMORY_BASE
from confmig.guest.workloads import dirty
from confmig.platform.cpu.abi import TSC_HZ
from confmig.vmm.memory import GuestMemory, RamBlock, RamRegion, pc_regions

SELFCHECK = "confmig-selfcheck"


def start(cmdline: str, **kwargs: object) -> Machine:
    """A machine whose dirty workload has just started writing."""
    m = Machine(cmdline, **kwargs)  # type: ignore[arg-type]
    m.run_until_line("dirty:")
    return m


def page_gpa(st: dirty.DirtyState, index: int) -> int:
    for gpa, npages in st.ranges:
        if index < npages:
            return gpa + index * PAGE_SIZE
        index -= npages
    raise IndexError(index)


def nmi_selfcheck(m: Machine) -> str:
    m.cpu.inject(2)
    return m.run_until_line(SELFCHECK)


@pytest.mark.parametrize("rate", [2000, 50_000])
def test_writes_at_the_rate(rate: int) -> None:
    with start(f"workload=dirty rate={rate} wss=32M") as m:
        t0 = m.cpu.tsc
        m.run(lambda c: c.tsc >= t0 + 2 * TSC_HZ)
        written = dirty.load_state(m.cpu).written
        assert 2 * rate * 0.98 <= written <= 2 * rate * 1.01


def test_sleeps_between_batches_instead_of_spinning() -> None:
    # Steps as slow as the real core's: every step finds a page or so due.
    with start("workload=dirty rate=2000 wss=32M", step_ns=300_000) as m:
        steps = m.cpu.steps
        t0 = m.cpu.tsc
        m.run(lambda c: c.tsc >= t0 + TSC_HZ)
        assert m.cpu.steps - steps < 250  # ~100 wake-ups of ~20 pages, and the ticks
        assert 1900 <= dirty.load_state(m.cpu).written <= 2020


def test_passes_sweep_the_working_set_and_bump_the_version() -> None:
    with start("workload=dirty rate=5000 wss=1M") as m:  # 256 pages: ~20 passes a second
        t0 = m.cpu.tsc
        m.run(lambda c: c.tsc >= t0 + TSC_HZ)
        st = dirty.load_state(m.cpu)
        assert st.npages == 256 and st.pass_no == st.written // 256 + 1
        assert st.cursor == st.written % 256
        header = np.frombuffer(m.cpu.read(page_gpa(st, 0), 24), dtype="<u8")
        assert header[0] == page_gpa(st, 0) and header[1] == st.pass_no - (st.cursor == 0)
        assert nmi_selfcheck(m) == f"{SELFCHECK}: PASS pages=256 writes={st.written}"


def test_rate_zero_writes_the_working_set_once_then_idles() -> None:
    with start("workload=dirty rate=0 wss=4M") as m:
        line = m.run_until_line("dirty: working set")
        assert line == "dirty: working set written (1024 pages); idle"
        steps, t0 = m.cpu.steps, m.cpu.tsc
        m.run(lambda c: c.tsc >= t0 + 3 * TSC_HZ)
        assert dirty.load_state(m.cpu).written == 1024
        assert m.cpu.steps - steps < 50


def test_nmi_selfcheck_passes_and_agrees_with_the_pure_check() -> None:
    with start("workload=dirty rate=3000 wss=4M seed=9") as m:
        t0 = m.cpu.tsc
        m.run(lambda c: c.tsc >= t0 + TSC_HZ // 4)  # part of the first pass only
        pure = dirty.selfcheck(m.cpu)
        line = nmi_selfcheck(m)
        assert pure.passed and pure.pages == pure.writes == dirty.load_state(m.cpu).written
        assert line == pure.line == f"{SELFCHECK}: PASS pages={pure.pages} writes={pure.writes}"


@pytest.fixture
def settled() -> Machine:
    """A working set written more than once (pass 2 under way), paused between steps."""
    m = start("workload=dirty rate=4000 wss=1M")
    t0 = m.cpu.tsc
    m.run(lambda c: c.tsc >= t0 + TSC_HZ // 10)
    return m


def ram(m: Machine, gpa: int, size: int) -> bytes:
    return m.memory.read(gpa, size)


def test_a_corrupted_byte_fails(settled: Machine) -> None:
    with settled as m:
        st = dirty.load_state(m.cpu)
        victim = page_gpa(st, 17)
        m.memory.write(victim + 1234, bytes([ram(m, victim + 1234, 1)[0] ^ 0x01]))
        assert nmi_selfcheck(m) == f"{SELFCHECK}: FAIL bad=1 first={victim:#x} pages=256"
        assert not dirty.selfcheck(m.cpu).passed


def test_a_lost_write_fails(settled: Machine) -> None:
    with settled as m:
        st = dirty.load_state(m.cpu)
        index = st.cursor  # the next page to be written
        victim = page_gpa(st, index)
        old = ram(m, victim, PAGE_SIZE)
        m.run(lambda c: dirty.load_state(c).cursor > index)
        m.memory.write(victim, old)  # a migration that lost the newer copy
        assert nmi_selfcheck(m).startswith(f"{SELFCHECK}: FAIL bad=1 first={victim:#x} ")


def test_a_lost_version_table_write_fails(settled: Machine) -> None:
    with settled as m:
        st = dirty.load_state(m.cpu)
        index = st.cursor
        entry = st.table + index * 8
        old = ram(m, entry, 8)
        m.run(lambda c: dirty.load_state(c).cursor > index)
        m.memory.write(entry, old)
        victim = page_gpa(st, index)
        assert nmi_selfcheck(m).startswith(f"{SELFCHECK}: FAIL bad=1 first={victim:#x} ")


def test_a_page_copied_to_another_gpa_fails(settled: Machine) -> None:
    with settled as m:
        st = dirty.load_state(m.cpu)
        source, target = page_gpa(st, 3), page_gpa(st, 200)
        m.memory.write(target, ram(m, source, PAGE_SIZE))
        assert nmi_selfcheck(m) == f"{SELFCHECK}: FAIL bad=1 first={target:#x} pages=256"


def test_a_second_nmi_waits_for_the_first_selfcheck() -> None:
    with start("workload=dirty rate=0 wss=32M") as m:  # 8192 pages: two check steps
        m.run_until_line("dirty: working set")
        m.cpu.inject(2)
        m.run(lambda c: c.regs.rip == dirty.CODE_BASE + dirty.Phase.CHECK)
        m.cpu.inject(2)
        m.run_until_line(SELFCHECK)
        m.run_until_line(SELFCHECK)
        verdicts = [line for line in m.lines if line.startswith(SELFCHECK)]
        assert verdicts == [f"{SELFCHECK}: PASS pages=8192 writes=8192"] * 2


def test_fill_zero_and_random() -> None:
    zero = dirty.make_pages(0x200000, 2, version=3, fill=dirty.FILL_ZERO, seed=1)
    assert not zero[:, 24:].any()
    first = dirty.make_pages(0x200000, 2, version=3, fill=dirty.FILL_RANDOM, seed=1)
    again = dirty.make_pages(0x200000, 2, version=3, fill=dirty.FILL_RANDOM, seed=1)
    other = dirty.make_pages(0x200000, 2, version=3, fill=dirty.FILL_RANDOM, seed=2)
    assert np.array_equal(first, again) and not np.array_equal(first[:, 24:], other[:, 24:])
    gpas = np.array([0x200000, 0x201000], dtype=np.uint64)
    for pages in (zero, first):
        assert dirty.page_ok(pages, gpas, np.array([3, 3], dtype=np.uint64)).all()


def two_region_memory(low: int, high: int) -> GuestMemory:
    memory = GuestMemory()
    block = RamBlock("pc.ram", low + high)
    block.regions.append(RamRegion(name="ram-below-4g", gpa=Gpa(0), offset=0, size=low, slot=0))
    block.regions.append(
        RamRegion(name="ram-above-4g", gpa=Gpa(4 * GiB), offset=low, size=high, slot=1)
    )
    memory.blocks.append(block)
    return memory


def test_wss_all_spans_both_ram_regions() -> None:
    with start("workload=dirty rate=0 wss=all", memory=two_region_memory(24 * MiB, 8 * MiB)) as m:
        m.run_until_line("dirty: working set")
        st = dirty.load_state(m.cpu)
        free = (24 * MiB - WORKLOAD_MEMORY_BASE + 8 * MiB) // PAGE_SIZE
        assert st.npages + st.table_pages == free and st.table_pages == 8
        assert [start for start, _ in st.ranges] == [WORKLOAD_MEMORY_BASE + 8 * PAGE_SIZE, 4 * GiB]
        last = page_gpa(st, st.npages - 1)
        assert last == 4 * GiB + 8 * MiB - PAGE_SIZE
        assert int.from_bytes(ram(m, last, 8), "little") == last
        assert nmi_selfcheck(m) == f"{SELFCHECK}: PASS pages={st.npages} writes={st.npages}"


def test_a_working_set_larger_than_ram_halts_with_a_message() -> None:
    with Machine("workload=dirty wss=1G") as m:
        m.run(lambda _: False)
        # 48 MiB from 16 MiB up; 12288 pages hold 12264 and their 24-page version table
        assert m.lines[-1] == "dirty: wss does not fit in 48 MiB (at most wss=49056K); halted"


def test_the_largest_working_set_front_ends_are_told_of_fits_and_a_page_more_does_not() -> None:
    most = dirty.max_working_set([r.range for r in pc_regions(64 * MiB)])
    with start(f"workload=dirty rate=0 wss={most // KiB}K") as m:
        assert dirty.load_state(m.cpu).npages == most // PAGE_SIZE
    with Machine(f"workload=dirty wss={(most + PAGE_SIZE) // KiB}K") as m:
        m.run(lambda _: False)
        assert m.lines[-1] == f"dirty: wss does not fit in 48 MiB (at most wss={most // KiB}K); halted"


def test_writing_and_verifying_are_fast() -> None:
    """The benchmark measures this workload's pages/s; a self-check of 1 GiB must take
    seconds, not minutes. Bounds are loose, in CPU time: they catch a per-page Python loop."""
    n = 16 * 1024  # 64 MiB
    t = time.process_time()
    batch = dirty.WRITE_BATCH
    batches = [
        dirty.make_pages(gfn * PAGE_SIZE, batch, version=1, fill=dirty.FILL_RANDOM, seed=1)
        for gfn in range(0, n, batch)
    ]
    pages = np.concatenate(batches)
    write_s = time.process_time() - t
    t = time.process_time()
    gpas = np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    for i in range(0, n, dirty.CHECK_BATCH):
        batch = slice(i, i + dirty.CHECK_BATCH)
        assert dirty.page_ok(pages[batch], gpas[batch], np.ones(dirty.CHECK_BATCH, np.uint64)).all()
    verify_s = time.process_time() - t
    assert n / write_s > 50_000  # pages per second
    assert verify_s * 16 < 5.0  # extrapolated to 1 GiB
