"""``kv``: a key-value store in guest RAM, served to the kv device's clients.

Options: ``slots=`` hash-table slots, a power of two (default 4096: 8 MiB).

Memory: workload memory starts with the device queue (``KV_QUEUE_SIZE``
bytes, read and written by the device: shared in an SEV guest), then the hash
table. The table is open addressing with linear probing over
``KV_SLOT_SIZE``-byte slots: ``u8 state (0 empty, 1 used, 2 deleted), u8
key_len, le16 value_len, le32 crc, le64 write id``, the key at +16 and the
value at +80; the CRC-32 covers lengths, write id, key and value. The write id
is the id of the request that last wrote the slot: a retried put or delete
that already took effect is acknowledged without being applied again.

The device protocol (port registers, queue and slot layout, op and status
numbers) is the one ``confmig.vmm.devices.kv`` documents; the guest keeps its
own copy of the numbers, as a driver does of a device specification.

Start-up: clear the queue header and the table, check the device ID, give the
device the queue GPA, switch the queue live and confirm (one port access per
step). An SEV guest first makes the queue pages shared, at most
PAGE_STATE_BATCH pages a step, and reports each batch to the host with
``KVM_HC_MAP_GPA_RANGE`` when it reports page states at all
(:func:`confmig.guest.mem_encrypt.reports_page_state`); a refused report is
printed once a boot and the workload carries on. Everything else of the
workload (state page, hash table) is private: accessed with the C-bit (the
step's ``mask``), held in guest RAM only as ciphertext.

Then each step completes every published request, in place, raises ``used``
and notifies the device; with nothing to do it sleeps until the device's
interrupt or the tick. Requests are checked before use (the host is
not trusted): a slot that does not parse gets MALFORMED, and an ``avail`` that
runs ahead of the ring stops the workload.

Self-check: every used slot's CRC and lengths, and the number of live keys.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np

from confmig.common.units import PAGE_SIZE, format_size
from confmig.guest import kernel, mem_encrypt
from confmig.guest.firmware import bootinfo
from confmig.guest.layout import WORKLOAD_STATE_GPA, workload_code, workload_memory
from confmig.guest.phases import TaskProgram, task_program
from confmig.platform.cpu.abi import KV_PORT_BASE, TSC_HZ, GuestCpu, GuestFault
from confmig.proto.kvdev import (
    KV_CONTROL_ENABLE,
    KV_DEVICE_ID,
    KV_HEADER,
    KV_KEY_MAX,
    KV_QUEUE_AVAIL,
    KV_QUEUE_RING,
    KV_QUEUE_SIZE,
    KV_QUEUE_USED,
    KV_REG_GPA_HI,
    KV_REG_ID_GPA_LO,
    KV_REG_NOTIFY,
    KV_REG_STATUS_CONTROL,
    KV_RING_SIZE,
    KV_SLOT_KEY,
    KV_SLOT_SIZE,
    KV_SLOT_VALUE,
    KV_VALUE_MAX,
    KvOp,
    KvStatus,
)

CODE_BASE = workload_code(2)
TICK_NS = TSC_HZ // 10
"""Also the longest a request can wait if the device's interrupt were lost."""

OP_PUT, OP_GET, OP_DEL = int(KvOp.PUT), int(KvOp.GET), int(KvOp.DEL)
ST_OK, ST_NOT_FOUND = int(KvStatus.OK), int(KvStatus.NOT_FOUND)
ST_MALFORMED, ST_FULL = int(KvStatus.MALFORMED), int(KvStatus.FULL)

SLOTS_DEFAULT = 4096
SLOTS_MAX = 1 << 20
"""2 GiB of table; the table must fit in RAM below 3 GiB."""
ZERO_BATCH = 1024
"""Pages cleared per step at start."""
QUEUE_PAGES = KV_QUEUE_SIZE // PAGE_SIZE
"""The device queue's pages: shared in an SEV guest (one page-state batch)."""
CHECK_SLOTS = 2048
"""Slots verified per self-check step (4 MiB)."""

EMPTY, USED, DELETED = 0, 1, 2
_ENTRY = struct.Struct("<BBHIQ")
"""Table slot header: state, key_len, value_len, crc, write id."""
_U32 = 0xFFFF_FFFF


class Phase(IntEnum):
    ENTRY = 0x00
    ZERO = 0x10
    PROBE = 0x20
    GPA_HI = 0x30
    ENABLE = 0x40
    CONFIRM = 0x50
    STATUS = 0x60
    RUN = 0x70
    SELFCHECK = 0x80
    CHECK = 0x90
    SHARE = 0xA0
    """SEV: make the next batch of queue pages shared, and report it."""
    SHARED = 0xB0
    """SEV: the report's result."""
    DETECT = 0xC0
    """Read the device ID."""


# --- options ---------------------------------------------------------------------------------


def parse(options: Mapping[str, str]) -> bytes:
    unknown = set(options) - {"slots"}
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for workload kv (known: slots)"
        )
    slots = int(options.get("slots", str(SLOTS_DEFAULT)))
    if not 16 <= slots <= SLOTS_MAX or slots & (slots - 1):
        raise ValueError(f"slots={slots} is not a power of two in 16..{SLOTS_MAX}")
    return slots.to_bytes(8, "little")


def describe(encoded: bytes) -> str:
    slots = int.from_bytes(encoded, "little")
    return f"slots={slots} ({format_size(slots * KV_SLOT_SIZE)} table)"


# --- state -----------------------------------------------------------------------------------

STATE_MAGIC = b"CMKVST01"
_STATE = struct.Struct("<8s12Q")


@dataclass(frozen=True, slots=True, kw_only=True)
class KvState:
    slots: int
    queue: int
    """GPA of the device queue; the table follows it."""
    zeroed: int = 0
    """Pages of queue and table cleared so far."""
    served: int = 0
    """Requests completed; the low 32 bits are the queue's ``used`` index. Kept here,
    in private memory, because the queue header is the host's to scribble on."""
    writes: int = 0
    keys: int = 0
    check: int = 0
    live: int = 0
    bad: int = 0
    first_bad: int = 0
    checked_pages: int = 0
    shared: int = 0
    """Queue pages made shared so far (SEV)."""

    @property
    def table(self) -> int:
        return self.queue + KV_QUEUE_SIZE

    @property
    def table_pages(self) -> int:
        return self.slots * KV_SLOT_SIZE // PAGE_SIZE

    @property
    def zero_pages(self) -> int:
        return QUEUE_PAGES + self.table_pages



def load_state(cpu: GuestCpu, mask: int | None = None) -> KvState:
    """The state page (``mask``: the step's encryption mask; None finds it out)."""
    magic, *f = _STATE.unpack(cpu.read(mem_encrypt.private(cpu, WORKLOAD_STATE_GPA, mask), _STATE.size))
    if magic != STATE_MAGIC:
        raise GuestFault("kv: state page lost its magic")
    return KvState(
        slots=f[0], queue=f[1], zeroed=f[2], served=f[3], writes=f[4], keys=f[5], check=f[6],
        live=f[7], bad=f[8], first_bad=f[9], checked_pages=f[10], shared=f[11],
    )


def _store_state(cpu: GuestCpu, st: KvState, mask: int) -> None:
    cpu.write(
        WORKLOAD_STATE_GPA | mask,
        _STATE.pack(
            STATE_MAGIC, st.slots, st.queue, st.zeroed, st.served, st.writes, st.keys,
            st.check, st.live, st.bad, st.first_bad, st.checked_pages, st.shared,
        ),
    )


# --- the hash table --------------------------------------------------------------------------


def _crc(key: bytes, value: bytes, write_id: int) -> int:
    return zlib.crc32(struct.pack("<BHQ", len(key), len(value), write_id) + key + value)


def _probe(cpu: GuestCpu, st: KvState, key: bytes, mask: int) -> tuple[int | None, int, int | None]:
    """``(slot holding key, its write id, slot to insert key)``; None where there is none."""
    wrap = st.slots - 1
    home = zlib.crc32(key) & wrap
    insert = None
    for i in range(st.slots):
        slot = (home + i) & wrap
        raw = cpu.read((st.table + slot * KV_SLOT_SIZE) | mask, KV_SLOT_VALUE)
        state, key_len, _, _, write_id = _ENTRY.unpack_from(raw)
        if state == EMPTY:
            return None, 0, insert if insert is not None else slot
        if state == DELETED:
            insert = slot if insert is None else insert
        elif raw[KV_SLOT_KEY : KV_SLOT_KEY + key_len] == key:
            return slot, write_id, slot
    return None, 0, insert


def _apply(
    cpu: GuestCpu, st: KvState, op: int, request_id: int, key: bytes, value: bytes, mask: int
) -> tuple[int, bytes, KvState]:
    """Run one request against the table: ``(status, reply value, new state)``."""
    found, write_id, insert = _probe(cpu, st, key, mask)
    if op == OP_GET:
        if found is None:
            return ST_NOT_FOUND, b"", st
        raw = cpu.read((st.table + found * KV_SLOT_SIZE) | mask, KV_SLOT_VALUE + KV_VALUE_MAX)
        value_len = _ENTRY.unpack_from(raw)[2]
        return ST_OK, raw[KV_SLOT_VALUE : KV_SLOT_VALUE + min(value_len, KV_VALUE_MAX)], st
    if found is not None and write_id == request_id:
        return ST_OK, b"", st  # a retry of a write that already took effect
    if op == OP_DEL:
        if found is None:
            return ST_NOT_FOUND, b"", st
        cpu.write((st.table + found * KV_SLOT_SIZE) | mask, _ENTRY.pack(DELETED, 0, 0, 0, request_id))
        return ST_OK, b"", replace(st, writes=st.writes + 1, keys=st.keys - 1)
    if insert is None:
        return ST_FULL, b"", st
    entry = _ENTRY.pack(USED, len(key), len(value), _crc(key, value, request_id), request_id)
    cpu.write((st.table + insert * KV_SLOT_SIZE) | mask, entry + key.ljust(KV_KEY_MAX, b"\0") + value)
    return ST_OK, b"", replace(st, writes=st.writes + 1, keys=st.keys + (found is None))


def _serve(cpu: GuestCpu, st: KvState, raw: bytes, mask: int) -> tuple[bytes, KvState]:
    """The completion for the request in ring slot ``raw``, and the new state."""
    op, _, key_len, value_len, request_id = KV_HEADER.unpack_from(raw)
    # SECURITY: the request slot is host-written; check it before use.
    if (
        op not in (OP_PUT, OP_GET, OP_DEL)
        or not 1 <= key_len <= KV_KEY_MAX
        or value_len > (KV_VALUE_MAX if op == OP_PUT else 0)
    ):
        status, value = ST_MALFORMED, b""
    else:
        key = raw[KV_SLOT_KEY : KV_SLOT_KEY + key_len]
        status, value, st = _apply(
            cpu, st, op, request_id, key, raw[KV_SLOT_VALUE : KV_SLOT_VALUE + value_len], mask
        )
    completion = KV_HEADER.pack(status, 0, 0, len(value), request_id) + bytes(KV_KEY_MAX) + value
    return completion, st


# --- self-check ----------------------------------------------------------------------------


def _check_batch(cpu: GuestCpu, st: KvState, mask: int) -> KvState:
    n = min(CHECK_SLOTS, st.slots - st.check)
    npages = n * KV_SLOT_SIZE // PAGE_SIZE
    rows = cpu.read_pages((st.table + st.check * KV_SLOT_SIZE) | mask, npages).reshape(n, KV_SLOT_SIZE)
    used = np.flatnonzero(rows[:, 0] == USED)
    bad = []
    for i in used:
        row = rows[i].tobytes()
        _, key_len, value_len, crc, write_id = _ENTRY.unpack_from(row)
        key = row[KV_SLOT_KEY : KV_SLOT_KEY + key_len]
        value = row[KV_SLOT_VALUE : KV_SLOT_VALUE + value_len]
        if not (1 <= key_len <= KV_KEY_MAX and value_len <= KV_VALUE_MAX) or crc != _crc(
            key, value, write_id
        ):
            bad.append(int(i))
    first = st.first_bad if st.bad or not bad else st.table + (st.check + bad[0]) * KV_SLOT_SIZE
    return replace(
        st, check=st.check + n, live=st.live + len(used), bad=st.bad + len(bad), first_bad=first,
        checked_pages=st.checked_pages + npages,
    )


def _verdict(st: KvState) -> kernel.SelfCheck:
    bad, first = st.bad, st.first_bad
    if st.live != st.keys:  # a key appeared or vanished behind the counter's back
        bad, first = bad + 1, first if bad else st.table
    return kernel.SelfCheck(pages=st.checked_pages, writes=st.writes, bad=bad, first_bad=first)


def _ready(st: KvState) -> bool:
    return st.zeroed == st.zero_pages


def selfcheck(cpu: GuestCpu) -> kernel.SelfCheck:
    """The whole self-check at once, without exits (for tests and tools)."""
    mask = mem_encrypt.encryption_mask(cpu)
    st = load_state(cpu, mask)
    if not _ready(st):
        return kernel.SelfCheck(pages=0, writes=0)
    st = replace(st, check=0, live=0, bad=0, first_bad=0, checked_pages=0)
    while st.check < st.slots:
        st = _check_batch(cpu, st, mask)
    return _verdict(st)


# --- phases --------------------------------------------------------------------------------


def _goto(cpu: GuestCpu, phase: Phase) -> None:
    cpu.regs.rip = CODE_BASE + phase


def _entry(cpu: GuestCpu, mask: int) -> None:
    slots = int.from_bytes(kernel.params(cpu, mask), "little")
    free = workload_memory(bootinfo.load(cpu, mask).ram)
    need = KV_QUEUE_SIZE + slots * KV_SLOT_SIZE
    if not free or free[0].size < need:
        kernel.halt(cpu, f"kv: {slots} slots need {format_size(need)} of low RAM")
        return
    _store_state(cpu, KvState(slots=slots, queue=free[0].start), mask)
    _goto(cpu, Phase.ZERO)


def _zero(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    n = min(ZERO_BATCH, st.zero_pages - st.zeroed)
    cpu.write_pages((st.queue + st.zeroed * PAGE_SIZE) | mask, np.zeros((n, PAGE_SIZE), np.uint8))
    st = replace(st, zeroed=st.zeroed + n)
    _store_state(cpu, st, mask)
    if _ready(st):
        if mask:  # the device must read and write the queue: share it first
            _goto(cpu, Phase.SHARE)
        else:
            _detect(cpu)


def _share(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    n = min(mem_encrypt.PAGE_STATE_BATCH, QUEUE_PAGES - st.shared)
    gpa = st.queue + st.shared * PAGE_SIZE
    mem_encrypt.move_to_shared(cpu, gpa, n, mask)  # the zeros stay: avail = used = 0
    st = replace(st, shared=st.shared + n)
    _store_state(cpu, st, mask)
    if mem_encrypt.reports_page_state(cpu, mask):
        _goto(cpu, Phase.SHARED)
        mem_encrypt.map_gpa_range(cpu, gpa, n, encrypted=False)
    elif st.shared == QUEUE_PAGES:
        _detect(cpu)


def _shared(cpu: GuestCpu, mask: int) -> None:
    """The result of a batch's report: a failure is printed once a boot, then on."""
    rax = cpu.regs.rax  # SECURITY: the host's answer: only recorded and printed
    done = load_state(cpu, mask).shared == QUEUE_PAGES
    if mem_encrypt.hypercall_error(rax):
        bootinfo.store_hypercall_error(cpu, rax, mask)
        if bootinfo.claim_hypercall_report(cpu, mask):
            _goto(cpu, Phase.DETECT if done else Phase.SHARE)
            kernel.console_write(cpu, mem_encrypt.hypercall_failure_line("kv", rax))
            return
    if done:
        _detect(cpu)
    else:
        _share(cpu, mask)


def _detect(cpu: GuestCpu, _mask: int = 0) -> None:
    _goto(cpu, Phase.PROBE)
    cpu.inp(KV_PORT_BASE + KV_REG_ID_GPA_LO, 4)


def _probe_device(cpu: GuestCpu, mask: int) -> None:
    if cpu.regs.rax & _U32 != KV_DEVICE_ID:
        kernel.halt(cpu, f"kv: no kv device at port {KV_PORT_BASE:#x}")
        return
    _goto(cpu, Phase.GPA_HI)
    cpu.out(KV_PORT_BASE + KV_REG_ID_GPA_LO, load_state(cpu, mask).queue & _U32, 4)


def _gpa_hi(cpu: GuestCpu, mask: int) -> None:
    _goto(cpu, Phase.ENABLE)
    cpu.out(KV_PORT_BASE + KV_REG_GPA_HI, load_state(cpu, mask).queue >> 32, 4)


def _enable(cpu: GuestCpu, _mask: int) -> None:
    _goto(cpu, Phase.CONFIRM)
    cpu.out(KV_PORT_BASE + KV_REG_STATUS_CONTROL, KV_CONTROL_ENABLE, 4)


def _confirm(cpu: GuestCpu, _mask: int) -> None:
    _goto(cpu, Phase.STATUS)
    cpu.inp(KV_PORT_BASE + KV_REG_STATUS_CONTROL, 4)


def _status(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    if cpu.regs.rax & _U32 != 1:
        kernel.halt(cpu, f"kv: the device refused the queue at {st.queue:#x}")
        return
    _goto(cpu, Phase.RUN)
    kernel.console_write(
        cpu, f"kv: serving {st.slots} slots; queue at {st.queue:#x}, table at {st.table:#x}"
    )


def _run(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    # The queue is the device's: shared, reached without the C-bit.
    avail = int.from_bytes(cpu.read(st.queue + KV_QUEUE_AVAIL, 4), "little")
    pending = (avail - st.served) & _U32
    if pending > KV_RING_SIZE:  # SECURITY: the host may not make us read past the ring
        kernel.halt(cpu, f"kv: device claims {pending} requests in a {KV_RING_SIZE}-slot ring")
        return
    if pending == 0:
        kernel.sleep_until(cpu, cpu.rdtsc() + TICK_NS, mask)
        return
    for i in range(pending):
        slot = st.queue + KV_QUEUE_RING + ((st.served + i) % KV_RING_SIZE) * KV_SLOT_SIZE
        completion, st = _serve(cpu, st, cpu.read(slot, KV_SLOT_VALUE + KV_VALUE_MAX), mask)
        cpu.write(slot, completion)
    st = replace(st, served=st.served + pending)
    _store_state(cpu, st, mask)
    cpu.write(st.queue + KV_QUEUE_USED, (st.served & _U32).to_bytes(4, "little"))
    cpu.out(KV_PORT_BASE + KV_REG_NOTIFY, 1, 4)


def _selfcheck(cpu: GuestCpu, mask: int) -> None:
    st = load_state(cpu, mask)
    if not _ready(st):
        kernel.nmi_return(cpu, mask)
        kernel.console_write(cpu, kernel.SelfCheck(pages=0, writes=0).line)
        return
    _store_state(cpu, replace(st, check=0, live=0, bad=0, first_bad=0, checked_pages=0), mask)
    _goto(cpu, Phase.CHECK)


def _check(cpu: GuestCpu, mask: int) -> None:
    st = _check_batch(cpu, load_state(cpu, mask), mask)
    _store_state(cpu, st, mask)
    if st.check == st.slots:
        kernel.nmi_return(cpu, mask)
        kernel.console_write(cpu, _verdict(st).line)


_PHASES: dict[int, TaskProgram] = {
    Phase.ENTRY: _entry,
    Phase.ZERO: _zero,
    Phase.SHARE: _share,
    Phase.SHARED: _shared,
    Phase.DETECT: _detect,
    Phase.PROBE: _probe_device,
    Phase.GPA_HI: _gpa_hi,
    Phase.ENABLE: _enable,
    Phase.CONFIRM: _confirm,
    Phase.STATUS: _status,
    Phase.RUN: _run,
    Phase.SELFCHECK: _selfcheck,
    Phase.CHECK: _check,
}


step = task_program("kv", CODE_BASE, _PHASES)


WORKLOAD = kernel.Workload(
    name="kv",
    code_base=CODE_BASE,
    entry=CODE_BASE + Phase.ENTRY,
    selfcheck=CODE_BASE + Phase.SELFCHECK,
    tick_ns=TICK_NS,
    parse=parse,
    describe=describe,
    step=step,
)
