"""The Migration Handler against a hostile VMM: any command block, io header and data area.

The mailbox is the host's: every field the MH reads there (command, GPA, batch size, length,
epoch, the io header's length and bytes, the records in a slot's data area) may be anything.
Whatever it is, the MH serves the block and halts to the host (it never faults, loops or
crashes: that would be a guest the host can kill), answers with ``go`` 0, ``done`` 1 and one of
its three return codes, and never accepts a record, a completion or an abort token the host
made up (only the migration's key makes one).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

import pytest
from hostile import budget
from hypothesis import given
from hypothesis import strategies as st
from mhhost import Guest, seal

from confmig.guest.layout import MH_AREA_GPA, MH_AREA_SIZE, MH_MAILBOX_GPA
from confmig.platform.cpu.abi import C_BIT
from confmig.proto import mailbox as mb

pytestmark = pytest.mark.fuzz

KEY = os.urandom(32)
FORGER_KEY = os.urandom(32)
RETURNS = {int(r) for r in mb.MhReturn}
Cmd = mb.MhCommand
FORGED_MUST_FAIL = {Cmd.IMPORT, Cmd.VERIFY, Cmd.COMPLETE, Cmd.RESUME, Cmd.DECRYPT}
"""Commands that take a record: none the host made up may succeed."""


@contextmanager
def migration_ready() -> Iterator[dict[str, Guest]]:
    """A source and a target, each INITed as a migration would (the states with the most
    commands to attack), fresh for every script: a host may FINISH or ABORT at will, and the
    commands after that would meet a session that is over."""
    with closing(Guest(spa=0x1_0000_0000, master=KEY, seed=1)) as src, \
            closing(Guest(spa=0x7_4000_0000, master=KEY, target=True, seed=2)) as dst:
        ret, mid = src.init(0, mb.Role.SOURCE)
        assert ret == 0
        assert dst.init(0, mb.Role.TARGET, mid)[0] == 0
        yield {"source": src, "target": dst}


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
gpas = st.one_of(
    st.integers(0, 64).map(lambda p: MH_AREA_GPA + MH_AREA_SIZE + p * 4096),  # the guest's own pages
    st.integers(0, MH_AREA_SIZE // 4096).map(lambda p: MH_AREA_GPA + p * 4096),  # the MH's
    st.sampled_from([0, MH_MAILBOX_GPA, C_BIT, 2**64 - 4096, 1, 0xFFF]),
    u64,
)
known_commands = st.sampled_from([int(c) for c in Cmd])
commands = st.one_of(known_commands, known_commands, known_commands, u64)


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """What a host puts in a data area: a made-up record (a plausible header, a GPA list, any
    bytes), one sealed under a key that is not the migration's, a GPA list, or garbage."""
    kind = draw(st.sampled_from(["header", "sealed", "gpas", "own", "bytes"]))
    if kind == "own":  # pages the source may export: it seals them, and a target refuses them
        pages = draw(st.lists(st.integers(0, 127), min_size=1, max_size=8, unique=True))
        return b"".join(struct.pack("<Q", MH_AREA_GPA + MH_AREA_SIZE + p * 4096) for p in pages)
    if kind == "sealed":
        pages = draw(st.lists(gpas, min_size=1, max_size=3))
        return seal(FORGER_KEY, draw(st.binary(min_size=16, max_size=16)), stream=draw(st.integers(0, 2)),
                    seq=draw(st.integers(0, 3)), gpas=[p & ~0xFFF for p in pages])
    if kind == "gpas":
        return b"".join(struct.pack("<Q", g) for g in draw(st.lists(gpas, max_size=8)))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    npages = draw(st.integers(0, 4))
    head = mb.RECORD_HEADER.pack(
        draw(st.sampled_from([mb.RECORD_VERSION, 1])), mb.ALG_AES_256_GCM,
        draw(st.sampled_from([int(k) for k in mb.RecordKind] + [0, 9])),
        draw(st.sampled_from([0, 1, mb.V1_STREAM, mb.COMPLETION_STREAM, mb.ABORT_STREAM])),
        draw(st.integers(0, 3)), draw(st.integers(0, 2)), npages, draw(st.integers(0, npages)),
        draw(st.integers(0, 64)), draw(st.integers(0, 3)), draw(st.binary(min_size=16, max_size=16)))
    entries = b"".join(struct.pack("<Q", g) for g in draw(st.lists(gpas, min_size=npages, max_size=npages)))
    return head + entries + draw(st.binary(max_size=300))


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """One command a hostile VMM publishes: which guest, MH vCPU and block, every field."""

    guest: str
    vcpu: int
    slot: int | None
    cmd: int
    gpa: int
    prefetch: int
    ret: int
    done: int
    npages: int
    length: int
    epoch: int
    data: bytes
    io_length: int
    io: bytes
    page: bytes


V1_BLOCK = {Cmd.INIT, Cmd.RESET, Cmd.ENCRYPT, Cmd.DECRYPT}
SOURCE_SIDE = {Cmd.INIT, Cmd.RESET, Cmd.ENCRYPT, Cmd.EXPORT, Cmd.PARK, Cmd.FINISH, Cmd.RESUME}


@st.composite
def addressed(draw: st.DrawFn) -> dict[str, object]:
    """Command, guest and block: mostly where the MH serves the command (the deepest checks),
    sometimes anywhere."""
    cmd = draw(commands)
    if cmd in mb.MhCommand._value2member_map_ and draw(st.integers(0, 4)):
        guest = "source" if cmd in SOURCE_SIDE else "target"
        if cmd in (Cmd.INIT, Cmd.RESET):
            guest = draw(st.sampled_from(["source", "target"]))
        slot = None if cmd in V1_BLOCK else draw(st.sampled_from([0, 1]))
    else:
        guest, slot = draw(st.sampled_from(["source", "target"])), draw(st.sampled_from([None, 0, 1]))
    return {"cmd": cmd, "guest": guest, "slot": slot}


blocks = addressed().flatmap(lambda where: st.builds(
    Block,
    guest=st.just(where["guest"]),
    vcpu=st.sampled_from([0, 0, 1]),
    slot=st.just(where["slot"]),
    cmd=st.just(where["cmd"]),
    gpa=gpas,
    prefetch=i32, ret=i32, done=i32,
    npages=st.one_of(st.integers(0, mb.BATCH_PAGES + 1), u32, st.just(-1)),  # -1: the GPA list's own
    length=st.one_of(st.sampled_from([0, mb.CHALLENGE_SIZE, mb.RECORD_HEADER.size, mb.SLOT_DATA,
                                      mb.SLOT_DATA + 1]), u32, st.just(-1)),  # -1: the data's own
    epoch=st.one_of(st.integers(0, 3), u64),
    data=records(),
    io_length=st.one_of(st.sampled_from([0, mb.INIT_PARAMS.size, mb.V1_IO_HDR_LEN, mb.IO_HDR_MAX,
                                         mb.IO_HDR_MAX + 1]), u32),
    io=st.one_of(
        st.builds(lambda role, n, mid: mb.INIT_PARAMS.pack(mb.PROTOCOL_VERSION, role, n, mid),
                  st.integers(0, 3), st.one_of(st.integers(0, 3), u32), st.binary(min_size=16, max_size=16)),
        st.binary(max_size=mb.V1_IO_HDR_LEN)),
    page=st.binary(max_size=64),
))


@budget(30)
@given(st.lists(blocks, min_size=1, max_size=6))
def test_any_mailbox_contents_get_an_answer_and_no_made_up_record_is_accepted(script: list[Block]) -> None:
    with migration_ready() as guests:
        for b in script:
            serve_hostile(guests[b.guest], b)


def serve_hostile(g: Guest, b: Block) -> None:
    """Publish ``b`` as a hostile VMM would, enter the MH vCPU, check the answer."""
    length = len(b.data) if b.length < 0 else b.length
    npages = len(b.data) // 8 if b.npages < 0 else b.npages
    mailbox = g.mailbox(b.vcpu)
    at = mailbox + (mb.CMD_OFFSET if b.slot is None else mb.slot_offset(b.slot))
    if b.slot is not None:
        g.store(g.data(b.vcpu, b.slot), b.data[: mb.SLOT_DATA])
    g.store(mailbox + mb.IO_HDR_OFFSET, struct.pack("<I", b.io_length) + b.io)
    g.store(mailbox + mb.IO_PAGE_OFFSET, b.page)
    g.store(at, mb.COMMAND.pack(b.cmd, b.gpa, b.prefetch, b.ret, 1, b.done)
            + mb.V2_FIELDS.pack(npages, length, b.epoch))
    g.enter(b.vcpu)  # one step, which must end in HLT at the MH's entry
    answer = mb.decode_command(g.load(at, mb.COMMAND.size + mb.V2_FIELDS.size))
    assert (answer.go, answer.done) == (0, 1), (b, answer)
    assert answer.ret in RETURNS, (b, answer)
    if b.cmd in FORGED_MUST_FAIL:
        assert answer.ret != 0, (b, answer)
