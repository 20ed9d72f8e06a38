"""``dirty``: writes pages at a set rate over a working set, and can prove it kept them.

Options: ``rate=`` pages per second (default 1000; 0 writes the working set
once, then idles), ``wss=`` working-set size (default 64M; ``all`` is every
page of workload memory, in both RAM regions), ``fill=random|zero`` (default
random), ``seed=`` (default 1), ``prefill=on|off`` (default off: with it the
first pass writes the whole working set at full speed, then ``rate`` applies).

Memory: the version table (one le64 per working-set page) starts workload
memory, the working set follows; both are recorded in the workload state page.

Every page written carries ``le64 GPA, le64 version, le64 checksum`` and then
its fill. The checksum is the sum, mod 2^64, of the page's other 511 le64
words each times its own odd weight, so changing any one word changes it.
Random fill comes from PCG64 keyed by (seed, first GFN of the write batch,
version): a function of guest state alone.

Writes go in sequential passes and pass p writes version p, so page i must
hold version ``pass`` if ``i < cursor`` and ``pass - 1`` otherwise (0: never
written). The self-check verifies exactly that, for every page: the table
entry, and for written pages the GPA, the version and the checksum. It catches
a corrupted page, a lost write (an older version) and a page copied to the
wrong GPA; a lost write of the table page as well.

Pacing: the workload owes ``rate`` pages per second since an epoch. Once it
owes PACE_NS worth of pages it writes them, up to WRITE_BATCH per step;
otherwise it sleeps on the TSC deadline until it does. After
a long stall (a paused VM) it does not burst: the debt is capped at
MAX_BACKLOG_NS worth of pages.

In an SEV guest all of it (state page, version table, working set) is private:
every access carries the C-bit (the step's ``mask``), so guest RAM, which the host maps,
holds only its ciphertext. The GPA in a page's header is the plain GPA, without the C-bit.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from confmig.common.units import PAGE_SIZE, KiB, MemoryRange, MiB, format_size, parse_size
from confmig.guest import kernel, mem_encrypt
from confmig.guest.firmware import bootinfo
from confmig.guest.layout import WORKLOAD_STATE_GPA, workload_code, workload_memory
from confmig.guest.phases import TaskProgram, task_program
from confmig.platform.cpu.abi import TSC_HZ, GuestCpu, GuestFault, Pages

CODE_BASE = workload_code(1)
TICK_NS = TSC_HZ // 10

WRITE_BATCH = 256
"""Pages written per step: about a millisecond of work, so the VM pauses promptly."""
CHECK_BATCH = 4096
"""Pages verified per self-check step (16 MiB)."""
TABLE_ZERO_BATCH = 1024
"""Version-table pages cleared per step at start (RAM need not start zeroed)."""
PACE_NS = 10_000_000
"""Granularity of the rate: wake up about every 10 ms to write what is due."""
MAX_BACKLOG_NS = 100_000_000
"""Most debt carried over a stall; beyond it the epoch moves instead."""
RATE_MAX = 10_000_000
WS_MAX_RANGES = 4
"""Working-set pieces; the pc machine has two RAM regions."""

FILL_ZERO = 0
FILL_RANDOM = 1
_FILLS = {"zero": FILL_ZERO, "random": FILL_RANDOM}
_WORDS = PAGE_SIZE // 8
_HDR_GPA, _HDR_VERSION, _HDR_CSUM = 0, 1, 2
_U64 = np.dtype("<u8")
_WEIGHTS = (np.arange(_WORDS, dtype=_U64) * np.uint64(2) + np.uint64(1)) * np.uint64(
    0x9E37_79B9_7F4A_7C15
)
"""Odd weights, one per word: odd times odd is odd."""

U64Array = npt.NDArray[np.uint64]


class Phase(IntEnum):
    ENTRY = 0x00
    INIT_TABLE = 0x10
    RUN = 0x20
    SELFCHECK = 0x30
    CHECK = 0x40


# --- options -------------------------------------------------------------------------------

_PARAMS = struct.Struct("<QQQQQ")
"""rate, wss in bytes (0: all), fill, seed, prefill."""
_ON_OFF = {"on": 1, "off": 0, "1": 1, "0": 0}


def parse(options: Mapping[str, str]) -> bytes:
    unknown = set(options) - {"rate", "wss", "fill", "seed", "prefill"}
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for workload dirty "
            "(known: rate, wss, fill, seed, prefill)"
        )
    prefill = _ON_OFF.get(options.get("prefill", "off"))
    if prefill is None:
        raise ValueError(f"prefill={options['prefill']} (expected on or off)")
    rate = int(options.get("rate", "1000"))
    if not 0 <= rate <= RATE_MAX:
        raise ValueError(f"rate={rate} not in 0..{RATE_MAX} pages/s")
    wss_text = options.get("wss", "64M")
    wss = 0 if wss_text == "all" else parse_size(wss_text)
    if wss_text != "all" and (wss <= 0 or wss % PAGE_SIZE):
        raise ValueError(f"wss={wss_text} is not a positive multiple of 4 KiB")
    fill = options.get("fill", "random")
    if fill not in _FILLS:
        raise ValueError(f"fill={fill} (expected random or zero)")
    seed = int(options.get("seed", "1"))
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"seed={seed} out of range")
    return _PARAMS.pack(rate, wss, _FILLS[fill], seed, prefill)


def describe(encoded: bytes) -> str:
    rate, wss, fill, seed, prefill = _PARAMS.unpack(encoded)
    fill_name = next(k for k, v in _FILLS.items() if v == fill)
    size = "all" if wss == 0 else format_size(wss)
    return f"rate={rate} wss={size} fill={fill_name} seed={seed}" + (" prefill" if prefill else "")


# --- state (the workload state page) -------------------------------------------------------

STATE_MAGIC = b"CMDIRTY1"
_STATE = struct.Struct(f"<8s7Q{2 * WS_MAX_RANGES}Q10Q")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirtyState:
    rate: int
    fill: int
    seed: int
    table: int
    """GPA of the version table."""
    npages: int
    table_zeroed: int
    ranges: tuple[tuple[int, int], ...]
    """The working set as (GPA, pages) pieces; page index i counts through them in order."""
    pass_no: int = 1
    cursor: int = 0
    written: int = 0
    epoch: int = 0
    paced: int = 0
    """Pages written since ``epoch``."""
    check: int = 0
    bad: int = 0
    first_bad: int = 0
    checked: int = 0
    prefill: int = 0
    """1: the first pass is not paced."""

    @property
    def table_pages(self) -> int:
        return -(-self.npages * 8 // PAGE_SIZE)

    @property
    def ready(self) -> bool:
        return self.table_zeroed == self.table_pages


def load_state(cpu: GuestCpu, mask: int | None = None) -> DirtyState:
    """The state page (``mask``: the step's encryption mask; None finds it out)."""
    fields = _STATE.unpack(cpu.read(mem_encrypt.private(cpu, WORKLOAD_STATE_GPA, mask), _STATE.size))
    if fields[0] != STATE_MAGIC:
        raise GuestFault("dirty: state page lost its magic")
    rate, fill, seed, table, npages, nranges, zeroed = fields[1:8]
    flat = fields[8 : 8 + 2 * WS_MAX_RANGES]
    rest = fields[8 + 2 * WS_MAX_RANGES :]
    return DirtyState(
        rate=rate, fill=fill, seed=seed, table=table, npages=npages, table_zeroed=zeroed,
        ranges=tuple((flat[2 * i], flat[2 * i + 1]) for i in range(min(nranges, WS_MAX_RANGES))),
        pass_no=rest[0], cursor=rest[1], written=rest[2], epoch=rest[3], paced=rest[4],
        check=rest[5], bad=rest[6], first_bad=rest[7], checked=rest[8], prefill=rest[9],
    )


def _store_state(cpu: GuestCpu, st: DirtyState, mask: int) -> None:
    flat = [v for piece in st.ranges for v in piece]
    flat += [0] * (2 * WS_MAX_RANGES - len(flat))
    cpu.write(
        WORKLOAD_STATE_GPA | mask,
        _STATE.pack(
            STATE_MAGIC, st.rate, st.fill, st.seed, st.table, st.npages, len(st.ranges),
            st.table_zeroed, *flat, st.pass_no, st.cursor, st.written, st.epoch, st.paced,
            st.check, st.bad, st.first_bad, st.checked, st.prefill,
        ),
    )


def _segment(st: DirtyState, index: int) -> tuple[int, int]:
    """GPA of working-set page ``index`` and how many pages follow it contiguously."""
    for gpa, npages in st.ranges:
        if index < npages:
            return gpa + index * PAGE_SIZE, npages - index
        index -= npages
    raise GuestFault(f"dirty: page index {index} beyond the working set")


# --- page contents (pure, vectorized) ------------------------------------------------------


def _checksums(words: U64Array) -> U64Array:
    total = np.einsum("ij,j->i", words, _WEIGHTS)
    result: U64Array = total - words[:, _HDR_CSUM] * _WEIGHTS[_HDR_CSUM]
    return result


def make_pages(gpa: int, npages: int, *, version: int, fill: int, seed: int) -> Pages:
    """The contents of ``npages`` pages from ``gpa`` at ``version``."""
    if fill == FILL_RANDOM:
        key = np.random.SeedSequence([seed, gpa // PAGE_SIZE, version])
        raw = np.random.PCG64(key).random_raw(npages * _WORDS)
        words = np.asarray(raw, dtype=_U64).reshape(npages, _WORDS)
    else:
        words = np.zeros((npages, _WORDS), dtype=_U64)
    words[:, _HDR_GPA] = gpa + np.arange(npages, dtype=_U64) * np.uint64(PAGE_SIZE)
    words[:, _HDR_VERSION] = version
    words[:, _HDR_CSUM] = 0
    words[:, _HDR_CSUM] = _checksums(words)
    return words.view(np.uint8).reshape(npages, PAGE_SIZE)


def page_ok(pages: Pages, gpas: U64Array, versions: U64Array) -> npt.NDArray[np.bool_]:
    """Which pages carry their GPA, the expected version and a valid checksum."""
    words = pages.view(_U64).reshape(len(pages), _WORDS)
    ok: npt.NDArray[np.bool_] = (
        (words[:, _HDR_GPA] == gpas)
        & (words[:, _HDR_VERSION] == versions)
        & (words[:, _HDR_CSUM] == _checksums(words))
    )
    return ok


# --- self-check ----------------------------------------------------------------------------


def _check_batch(cpu: GuestCpu, st: DirtyState, mask: int) -> DirtyState:
    """Verify the next batch from ``st.check``; return the state with the counts added."""
    gpa, contiguous = _segment(st, st.check)
    n = min(CHECK_BATCH, contiguous)
    table = np.frombuffer(cpu.read((st.table + st.check * 8) | mask, n * 8), dtype=_U64)
    index = st.check + np.arange(n, dtype=np.uint64)
    expected = np.where(index < st.cursor, st.pass_no, st.pass_no - 1).astype(_U64)
    written = expected > 0
    bad = table != expected
    if written.any():
        gpas = gpa + np.arange(n, dtype=_U64) * np.uint64(PAGE_SIZE)
        bad |= written & ~page_ok(cpu.read_pages(gpa | mask, n), gpas, expected)
    nbad = int(bad.sum())
    first = st.first_bad if st.bad or not nbad else gpa + int(bad.argmax()) * PAGE_SIZE
    return replace(
        st, check=st.check + n, bad=st.bad + nbad, first_bad=first,
        checked=st.checked + int(written.sum()),
    )


def _verdict(st: DirtyState) -> kernel.SelfCheck:
    return kernel.SelfCheck(pages=st.checked, writes=st.written, bad=st.bad, first_bad=st.first_bad)


def selfcheck(cpu: GuestCpu) -> kernel.SelfCheck:
    """The whole self-check at once, without exits (for tests and tools)."""
    mask = mem_encrypt.encryption_mask(cpu)
    st = load_state(cpu, mask)
    if not st.ready:
        return kernel.SelfCheck(pages=0, writes=0)
    st = replace(st, check=0, bad=0, first_bad=0, checked=0)
    while st.check < st.npages:
        st = _check_batch(cpu, st, mask)
    return _verdict(st)


# --- where the working set goes -------------------------------------------------------------


def max_working_set_pages(free: Sequence[MemoryRange]) -> int:
    """The most working-set pages that fit in workload memory ``free`` (what ``wss=all``
    takes): with their version table (one le64 per page), which must fit in the first range."""
    if not free:
        return 0
    total = sum(r.size for r in free) // PAGE_SIZE
    # n + ceil(n / _WORDS) <= total holds up to exactly this n.
    return min(total - -(-total // (_WORDS + 1)), free[0].size // PAGE_SIZE * _WORDS)


def max_working_set(ram: Iterable[MemoryRange]) -> int:
    """Bytes of the largest working set a guest whose RAM map is ``ram`` can have: the rule
    the workload applies at start, for a front end to check its options before any guest runs."""
    return max_working_set_pages(workload_memory(ram)) * PAGE_SIZE


def working_set(encoded: bytes) -> int:
    """Bytes of the working set that options from :func:`parse` ask for; 0 for ``all``."""
    wss: int = _PARAMS.unpack(encoded)[1]
    return wss


# --- phases --------------------------------------------------------------------------------


def _goto(cpu: GuestCpu, phase: Phase) -> None:
    cpu.regs.rip = CODE_BASE + phase


def _entry(cpu: GuestCpu, mask: int) -> None:
    rate, wss, fill, seed, prefill = _PARAMS.unpack(kernel.params(cpu, mask))
    free = workload_memory(bootinfo.load(cpu, mask).ram)
    sizes = [r.size // PAGE_SIZE for r in free]
    most = max_working_set_pages(free)
    npages = most if wss == 0 else wss // PAGE_SIZE
    if not 0 < npages <= most:
        kernel.halt(cpu, f"dirty: wss does not fit in {sum(sizes) * PAGE_SIZE // MiB} MiB "
                         f"(at most wss={most * PAGE_SIZE // KiB}K)")
        return
    table_pages = -(-npages // _WORDS)
    pieces, skip, left = [], table_pages, npages
    for r, size in zip(free[:WS_MAX_RANGES], sizes, strict=False):
        take = min(size - skip, left)
        if take > 0:
            pieces.append((r.start + skip * PAGE_SIZE, take))
            left -= take
        skip = 0
    npages -= left  # only if RAM comes in more pieces than WS_MAX_RANGES
    st = DirtyState(
        rate=rate, fill=fill, seed=seed, table=free[0].start, npages=npages, table_zeroed=0,
        ranges=tuple(pieces), prefill=prefill,
    )
    _store_state(cpu, st, mask)
    _goto(cpu, Phase.INIT_TABLE)


def _init_table(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    n = min(TABLE_ZERO_BATCH, st.table_pages - st.table_zeroed)
    cpu.write_pages((st.table + st.table_zeroed * PAGE_SIZE) | mask, np.zeros((n, PAGE_SIZE), np.uint8))
    st = replace(st, table_zeroed=st.table_zeroed + n)
    if not st.ready:
        _store_state(cpu, st, mask)
        return
    _store_state(cpu, replace(st, epoch=cpu.rdtsc()), mask)
    _goto(cpu, Phase.RUN)
    pieces = ", ".join(f"{count} at {gpa:#x}" for gpa, count in st.ranges)
    kernel.console_write(
        cpu,
        f"dirty: {st.npages} pages ({st.npages * PAGE_SIZE // MiB} MiB: {pieces}), "
        f"version table at {st.table:#x}, {st.rate} pages/s",
    )


def _run(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    if st.rate == 0 and st.cursor == st.npages:
        kernel.sleep_until(cpu, cpu.rdtsc() + TICK_NS, mask)  # written once: idle
        return
    count = WRITE_BATCH
    if st.rate and not (st.prefill and st.pass_no == 1):
        now = cpu.rdtsc()
        due = (now - st.epoch) * st.rate // TSC_HZ - st.paced
        cap = max(WRITE_BATCH, st.rate * MAX_BACKLOG_NS // TSC_HZ)
        if due > cap:
            st = replace(st, epoch=now - cap * TSC_HZ // st.rate, paced=0)
            due = (now - st.epoch) * st.rate // TSC_HZ
        chunk = min(WRITE_BATCH, max(1, st.rate * PACE_NS // TSC_HZ))
        if due < chunk:  # a page or two due is no reason to wake up: wait for a chunk
            wake = st.epoch + -(-(st.paced + chunk) * TSC_HZ // st.rate)
            kernel.sleep_until(cpu, wake, mask)
            return
        count = min(count, due)
    gpa, contiguous = _segment(st, st.cursor)
    n = min(count, contiguous)
    cpu.write_pages(gpa | mask, make_pages(gpa, n, version=st.pass_no, fill=st.fill, seed=st.seed))
    cpu.write((st.table + st.cursor * 8) | mask, np.full(n, st.pass_no, dtype=_U64).tobytes())
    st = replace(st, cursor=st.cursor + n, written=st.written + n, paced=st.paced + n)
    if st.cursor < st.npages:
        _store_state(cpu, st, mask)
    elif st.rate and st.prefill and st.pass_no == 1:
        _store_state(cpu, replace(st, pass_no=2, cursor=0, epoch=cpu.rdtsc(), paced=0), mask)
        kernel.console_write(
            cpu, f"dirty: working set written ({st.npages} pages); now {st.rate} pages/s")
    elif st.rate:
        _store_state(cpu, replace(st, pass_no=st.pass_no + 1, cursor=0), mask)
    else:
        _store_state(cpu, st, mask)
        kernel.console_write(cpu, f"dirty: working set written ({st.npages} pages); idle")


def _selfcheck(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    if not st.ready:
        kernel.nmi_return(cpu, mask)
        kernel.console_write(cpu, kernel.SelfCheck(pages=0, writes=0).line)
        return
    _store_state(cpu, replace(st, check=0, bad=0, first_bad=0, checked=0), mask)
    _goto(cpu, Phase.CHECK)


def _check(cpu: GuestCpu, mask: int) -> None:
    st = _check_batch(cpu, load_state(cpu, mask), mask)
    _store_state(cpu, st, mask)
    if st.check == st.npages:
        kernel.nmi_return(cpu, mask)
        kernel.console_write(cpu, _verdict(st).line)


_PHASES: dict[int, TaskProgram] = {
    Phase.ENTRY: _entry,
    Phase.INIT_TABLE: _init_table,
    Phase.RUN: _run,
    Phase.SELFCHECK: _selfcheck,
    Phase.CHECK: _check,
}


step = task_program("dirty", CODE_BASE, _PHASES)


WORKLOAD = kernel.Workload(
    name="dirty",
    code_base=CODE_BASE,
    entry=CODE_BASE + Phase.ENTRY,
    selfcheck=CODE_BASE + Phase.SELFCHECK,
    tick_ns=TICK_NS,
    parse=parse,
    describe=describe,
    step=step,
)
