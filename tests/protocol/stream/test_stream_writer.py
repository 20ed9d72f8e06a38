"""The stream writer keeps QEMU's record order: what it writes decodes, and every step out of
order is refused before a byte is produced."""

from __future__ import annotations

import numpy as np
import pytest
from migration_fakes import stream_events

from confmig.common.errors import StateError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import decoder as dec
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import DeviceSection, StreamWriter, WriterState

BLOCKS = [("pc.ram", 16 * PAGE_SIZE)]
PAGES = np.zeros((16, PAGE_SIZE), dtype=np.uint8)
PAGES[3] = 3


def test_a_whole_stream_written_in_order_decodes() -> None:
    w = StreamWriter("pc-q35-7.2", batch_pages=8)
    parts = [w.setup(BLOCKS), w.begin_round()]
    batch = w.pages("pc.ram", PAGES, np.array([2, 3], dtype=np.int64))
    parts += [bytes(batch.wire), w.zero_pages("pc.ram", batch.zero), w.end_part(), w.begin_round(),
              w.confidential(ConfidentialSubtype.SHARED_REGIONS, b"\0\0\0\0"), w.end_part(),
              w.begin_final(), w.end_part(),
              w.device(DeviceSection(idstr="cpu", instance_id=0, version_id=1, state=b"regs")),
              w.device(DeviceSection(idstr="serial", instance_id=0, version_id=1, state=b"")),
              w.eof()]
    assert w.state is WriterState.DONE
    evs = stream_events(b"".join(parts))
    devices = [e for e in evs if isinstance(e, dec.DeviceState)]
    assert [(d.section_id, d.idstr, d.state) for d in devices] == [(1, "cpu", b"regs"), (2, "serial", b"")]
    assert [type(e) for e in evs].count(dec.SectionPart) == 2
    assert isinstance(evs[-1], dec.VmDescription) and len(evs[-1].json["devices"]) == 2


def step(w: StreamWriter, name: str) -> None:
    idx = np.array([0], dtype=np.int64)
    {
        "setup": lambda: w.setup(BLOCKS),
        "round": w.begin_round,
        "final": w.begin_final,
        "end": w.end_part,
        "pages": lambda: w.pages("pc.ram", PAGES, idx),
        "zeros": lambda: w.zero_pages("pc.ram", idx),
        "confidential": lambda: w.confidential(ConfidentialSubtype.PSP_PACKET, b"x"),
        "device": lambda: w.device(DeviceSection(idstr="cpu", instance_id=0, version_id=1, state=b"")),
        "eof": w.eof,
    }[name]()


ORDER = ["setup", "round", "pages", "end", "final", "zeros", "end", "device", "eof"]
ALLOWED = {
    WriterState.START: {"setup"},
    WriterState.SETUP: {"round", "final"},
    WriterState.ROUND: {"pages", "zeros", "confidential", "end"},
    WriterState.FINAL: {"pages", "zeros", "confidential", "end"},
    WriterState.DEVICES: {"device", "eof"},
    WriterState.DONE: set(),
}
ALL = ["setup", "round", "final", "end", "pages", "zeros", "confidential", "device", "eof"]


@pytest.mark.parametrize("prefix", range(len(ORDER) + 1))
def test_every_step_out_of_order_is_refused_in_every_state(prefix: int) -> None:
    for name in ALL:
        w = StreamWriter("pc-q35-7.2")
        for done in ORDER[:prefix]:
            step(w, done)
        state = w.state
        if name in ALLOWED[state]:
            step(w, name)
        else:
            with pytest.raises(StateError, match=f"not allowed in state {state.value}"):
                step(w, name)
            assert w.state is state
