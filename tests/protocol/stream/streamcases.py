"""Synthetic migration streams for the codec tests.

``build`` encodes a :class:`Script` with the encoder API and, independently of the decoder,
says which events the stream must decode to and what every byte is (for corruption tests).
Events are compared in a normal form where a run of pages is flattened to one tuple per page,
so that the grouping (which depends on chunking) does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

import numpy as np

from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import (
    NEED_DATA,
    Confidential,
    ConfidentialSubtype,
    DeviceDescription,
    DeviceState,
    End,
    Eof,
    Header,
    PageBatchEncoder,
    RamEos,
    RamMemSize,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEvent,
    VmDescription,
    confidential_record,
    device_section,
    encode_zero_pages,
    eof,
    eos_and_footer,
    header,
    ram_end_begin,
    ram_part_begin,
    ram_setup,
    vmdescription,
)

Norm = tuple[object, ...]

RAM_SECTION = 2


class Kind(Enum):
    """What a stream byte is, for corruption tests."""

    STRUCTURAL = auto()  # framing: a flip must be rejected
    VALUE = auto()  # a decoded value (page offset, id, subtype): a flip must change the events
    PAGE = auto()  # page contents
    BLOB = auto()  # device state, confidential payload, names, JSON text
    PADDING = auto()  # JSON whitespace: may change to other whitespace unnoticed


@dataclass
class PagesOp:
    block: str
    indices: list[int]


@dataclass
class ZeroOp:
    block: str
    indices: list[int]


@dataclass
class ConfidentialOp:
    subtype: ConfidentialSubtype
    payload: bytes


Op = PagesOp | ZeroOp | ConfidentialOp


@dataclass
class Device:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    state: bytes


@dataclass
class Script:
    machine_type: str
    ram: dict[str, np.ndarray]  # block -> (npages, 4096) contents, mutated between rounds
    rounds: list[list[Op]]
    devices: list[Device]
    mutations: list[dict[str, list[tuple[int, bytes]]]] = field(default_factory=list)
    """Before round i: (page, new contents) per block."""


@dataclass
class Built:
    data: bytes
    expected: list[Norm]
    kinds: list[Kind]
    eof_end: int
    """Length of the prefix up to and including QEMU_VM_EOF (a valid stream by itself)."""


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.kinds: list[Kind] = []

    def put(self, data: bytes | memoryview, kind: Kind = Kind.STRUCTURAL) -> None:
        self.parts.append(bytes(data))
        self.kinds.extend([kind] * len(data))

    def mark(self, back: int, length: int, kind: Kind) -> None:
        """Re-label ``length`` bytes starting ``back`` bytes before the end."""
        start = len(self.kinds) - back
        self.kinds[start : start + length] = [kind] * length

    def __len__(self) -> int:
        return len(self.kinds)


def _page_records_kinds(w: _Writer, nbytes: int, name_len: int) -> None:
    """Label a PageBatch wire just written: standalone record, then 4104-byte rows."""
    start = len(w) - nbytes
    first = 8 + 1 + name_len
    w.kinds[start : start + 7] = [Kind.VALUE] * 7  # offset bits (low nibble of byte 6 is flags)
    w.kinds[start + first : start + first + PAGE_SIZE] = [Kind.PAGE] * PAGE_SIZE
    pos = start + first + PAGE_SIZE
    while pos < len(w):
        w.kinds[pos : pos + 7] = [Kind.VALUE] * 7
        w.kinds[pos + 8 : pos + 8 + PAGE_SIZE] = [Kind.PAGE] * PAGE_SIZE
        pos += 8 + PAGE_SIZE


def _zero_records_kinds(w: _Writer, nbytes: int, name_len: int) -> None:
    start = len(w) - nbytes
    w.kinds[start : start + 7] = [Kind.VALUE] * 7
    pos = start + 8 + 1 + name_len + 1
    while pos < len(w):
        w.kinds[pos : pos + 7] = [Kind.VALUE] * 7
        pos += 9


def build(script: Script, *, batch_pages: int = 64, with_vmdescription: bool = True) -> Built:
    encoder = PageBatchEncoder(batch_pages)
    w = _Writer()
    expected: list[Norm] = [("header", 3, script.machine_type)]
    w.put(header(script.machine_type))
    w.mark(len(script.machine_type.encode()), len(script.machine_type.encode()), Kind.BLOB)

    blocks = [(name, len(pages) * PAGE_SIZE) for name, pages in script.ram.items()]
    w.put(ram_setup(RAM_SECTION, blocks))
    expected += [
        ("start", RAM_SECTION, "ram", 0, 4, False),
        ("memsize", tuple(blocks)),
        ("eos",),
        ("footer", RAM_SECTION),
    ]
    for i, ops in enumerate(script.rounds):
        for block, changes in (script.mutations[i] if i < len(script.mutations) else {}).items():
            for page, contents in changes:
                script.ram[block][page] = np.frombuffer(contents, np.uint8)
        last = i == len(script.rounds) - 1
        w.put(ram_end_begin(RAM_SECTION) if last else ram_part_begin(RAM_SECTION))
        expected.append(("end" if last else "part", RAM_SECTION))
        for op in ops:
            _write_op(w, expected, encoder, script, op)
        w.put(eos_and_footer(RAM_SECTION))
        expected += [("eos",), ("footer", RAM_SECTION)]

    for d in script.devices:
        section = device_section(d.section_id, d.idstr, d.instance_id, d.version_id, d.state)
        w.put(section)
        name_len = len(d.idstr.encode())
        w.mark(len(section) - 6, name_len, Kind.BLOB)  # idstr
        w.mark(len(section) - 6 - name_len, 8, Kind.VALUE)  # instance, version
        w.mark(len(d.state) + 5, len(d.state), Kind.BLOB)
        expected += [
            ("start", d.section_id, d.idstr, d.instance_id, d.version_id, True),
            ("state", d.section_id, d.idstr, d.instance_id, d.version_id, d.state),
            ("footer", d.section_id),
        ]
    w.put(eof())
    expected.append(("eof",))
    eof_end = len(w)
    if with_vmdescription:
        desc = vmdescription(
            DeviceDescription(
                idstr=d.idstr,
                instance_id=d.instance_id,
                version_id=d.version_id,
                state_size=len(d.state),
            )
            for d in script.devices
        )
        w.put(desc)
        text = desc[5:]
        padding = len(text) - len(text.rstrip(b" "))
        w.mark(len(text), len(text) - padding, Kind.BLOB)
        w.mark(padding, padding, Kind.PADDING)
        expected.append(("vmdesc", json.dumps(json.loads(text), sort_keys=True)))
    expected.append(("end",))
    return Built(data=b"".join(w.parts), expected=expected, kinds=w.kinds, eof_end=eof_end)


def _write_op(w: _Writer, expected: list[Norm], encoder: PageBatchEncoder, script: Script, op: Op) -> None:
    if isinstance(op, ConfidentialOp):
        w.put(confidential_record(op.subtype, op.payload))
        w.mark(len(op.payload) + 5, 1, Kind.VALUE)
        w.mark(len(op.payload), len(op.payload), Kind.BLOB)
        expected.append(("conf", int(op.subtype), op.payload))
        return
    pages = script.ram[op.block]
    name_len = len(op.block.encode())
    indices = np.array(op.indices, dtype=np.int64)
    if isinstance(op, ZeroOp):
        wire = encode_zero_pages(op.block, indices)
        w.put(wire)
        _zero_records_kinds(w, len(wire), name_len)
        expected += [("zero", op.block, i) for i in op.indices]
        return
    batch = encoder.encode(op.block, pages, indices)
    zero = [i for i in op.indices if not pages[i].any()]
    assert list(batch.zero) == zero, "encoder zero detection disagrees with the contents"
    if len(batch.wire):
        w.put(batch.wire)
        _page_records_kinds(w, len(batch.wire), name_len)
    expected += [("page", op.block, i, pages[i].tobytes()) for i in op.indices if i not in zero]
    if zero:
        wire = encode_zero_pages(op.block, batch.zero)
        w.put(wire)
        _zero_records_kinds(w, len(wire), name_len)
        expected += [("zero", op.block, i) for i in zero]


def normalize(event: StreamEvent) -> list[Norm]:
    """Copy everything out of the event (its arrays are views valid until the next call)."""
    match event:
        case Header(version=version, machine_type=machine_type):
            return [("header", version, machine_type)]
        case SectionStart():
            e = event
            return [("start", e.section_id, e.idstr, e.instance_id, e.version_id, e.full)]
        case SectionPart(section_id=sid):
            return [("part", sid)]
        case SectionEnd(section_id=sid):
            return [("end", sid)]
        case SectionFooter(section_id=sid):
            return [("footer", sid)]
        case RamMemSize(blocks=blocks):
            return [("memsize", blocks)]
        case RamPages(block=block, indices=indices, data=data):
            assert len(indices) == len(data)
            return [("page", block, int(i), d.tobytes()) for i, d in zip(indices, data, strict=True)]
        case RamZeroPages(block=block, indices=indices):
            return [("zero", block, int(i)) for i in indices]
        case RamEos():
            return [("eos",)]
        case Confidential(subtype=subtype, payload=payload):
            return [("conf", int(subtype), payload)]
        case DeviceState():
            e2 = event
            return [("state", e2.section_id, e2.idstr, e2.instance_id, e2.version_id, e2.state)]
        case Eof():
            return [("eof",)]
        case VmDescription(json=desc):
            return [("vmdesc", json.dumps(desc, sort_keys=True))]
        case End():
            return [("end",)]
    raise AssertionError(f"unexpected event {event!r}")


def decode(
    data: bytes,
    chunks: Iterable[int] = (),
    *,
    buffer_size: int | None = None,
    use_get_buffer: Sequence[bool] = (),
) -> list[Norm]:
    """Decode ``data`` fed in chunks of the given sizes (the rest in one piece), alternating
    between ``receive_data`` and ``get_buffer``/``buffer_updated`` as told. Raises
    ``StreamError`` like the decoder."""
    decoder = StreamDecoder() if buffer_size is None else StreamDecoder(buffer_size)
    out: list[Norm] = []
    pos = 0
    sizes = list(chunks)
    modes = list(use_get_buffer)
    step = 0
    while True:
        event = decoder.next_event()
        if event is not NEED_DATA:
            out += normalize(event)
            if isinstance(event, End):
                return out
            continue
        if pos >= len(data):
            decoder.feed_eof()
            continue
        size = sizes[step] if step < len(sizes) else len(data) - pos
        size = max(1, min(size, len(data) - pos))
        if step < len(modes) and modes[step]:
            buf = decoder.get_buffer()
            size = min(size, len(buf))
            buf[:size] = data[pos : pos + size]
            decoder.buffer_updated(size)
        else:
            decoder.receive_data(data[pos : pos + size])
        pos += size
        step += 1


def sample_script(seed: int = 1) -> Script:
    """A small fixed stream with every record kind, for exhaustive byte-by-byte tests."""
    rng = np.random.default_rng(seed)
    ram = {
        "pc.ram": rng.integers(0, 256, (24, PAGE_SIZE), dtype=np.uint8),
        "vga.vram": rng.integers(0, 256, (4, PAGE_SIZE), dtype=np.uint8),
    }
    ram["pc.ram"][[2, 5, 6]] = 0
    ram["pc.ram"][7] = 0
    ram["pc.ram"][7, 1000] = 1  # zero at every sampled word, yet not a zero page
    return Script(
        machine_type="pc-q35-7.2",
        ram=ram,
        rounds=[
            [
                PagesOp("pc.ram", [0, 1, 2, 3, 4, 5, 6, 7]),
                PagesOp("vga.vram", [3, 0]),
                ConfidentialOp(ConfidentialSubtype.SHARED_REGIONS, b"\x00" * 16 + b"\x01" * 16),
            ],
            [
                ZeroOp("pc.ram", [20, 21, 22]),
                ConfidentialOp(ConfidentialSubtype.PSP_PACKET, bytes(range(52)) + b"\xaa" * 64),
                PagesOp("pc.ram", [23, 9]),
            ],
            [ConfidentialOp(ConfidentialSubtype.MH_RECORD, b"")],
        ],
        devices=[
            Device(7, "cpu", 0, 1, rng.bytes(40)),
            Device(8, "serial", 1, 3, rng.bytes(9)),
            Device(9, "kv", 0, 2, b""),
        ],
        mutations=[{}, {"pc.ram": [(9, bytes(PAGE_SIZE)), (23, rng.bytes(PAGE_SIZE))]}],
    )
