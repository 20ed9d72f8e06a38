"""Our plain streams, read the way QEMU's ``scripts/analyze-migration.py`` reads a file.

QEMU is not installed here, so the reader below restates that script's rules (QEMU 7.2 to
10.x): the JSON is found from the end of the file, device sections are read field by field
from the JSON, ``ram`` sections by its flag rules, and every footer must match its section.
"""

from __future__ import annotations

import json
import struct

from streamcases import ConfidentialOp, build, sample_script


class _QemuStyleReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "unexpected end of file"
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def name(self) -> str:
        length = int.from_bytes(self.take(1), "big", signed=True)  # the script reads it signed
        return self.take(length).decode()

    def ram(self, page_size: int, counts: dict[str, int]) -> None:
        while True:
            word = self.uint(8)
            flags, addr = word & (page_size - 1), word & ~(page_size - 1)
            if flags & 0x04:  # MEM_SIZE
                total = addr
                while total > 0:
                    self.name()
                    total -= self.uint(8)
                flags &= ~0x04
            if flags & 0x02:  # ZERO
                if not flags & 0x20:
                    self.name()
                flags &= ~0x22
                self.uint(1)
                counts["zero"] += 1
            elif flags & 0x08:  # PAGE
                if not flags & 0x20:
                    self.name()
                flags &= ~0x28
                self.take(page_size)
                counts["pages"] += 1
            if flags & 0x10:
                return
            assert flags == 0, f"Unknown RAM flags: {flags:x}"


def qemu_style_read(data: bytes) -> dict[str, int]:
    tail = data[-10_000_000:]
    brace = tail.find(b"{", tail.rfind(b"\0"))
    json_at = len(data) - len(tail) + brace
    assert data[json_at - 5] == 0x06, "No Debug Migration device found"
    desc = json.loads(data[json_at : json_at + struct.unpack(">I", data[json_at - 4 : json_at])[0]])
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}

    r = _QemuStyleReader(data)
    assert r.uint(4) == 0x5145564D and r.uint(4) == 3
    counts = {"pages": 0, "zero": 0, "devices": 0, "footers": 0}
    sections: dict[int, tuple[str, int]] = {}
    section_id = -1
    while True:
        kind = r.uint(1)
        if kind == 0x00:
            return counts
        if kind == 0x07:  # no "configuration" in the JSON: u32 length + machine type
            r.take(r.uint(4))
        elif kind in (0x01, 0x04):
            section_id = r.uint(4)
            key = (r.name(), r.uint(4))
            version = r.uint(4)
            sections[section_id] = key
            if key == ("ram", 0):
                assert version == 4
                r.ram(desc["page_size"], counts)
            else:
                for field in devices[key]["fields"]:
                    r.take(int(field["size"]))
                counts["devices"] += 1
        elif kind in (0x02, 0x03):
            section_id = r.uint(4)
            assert sections[section_id] == ("ram", 0)
            r.ram(desc["page_size"], counts)
        elif kind == 0x7E:
            assert r.uint(4) == section_id, "Mismatched section footer"
            counts["footers"] += 1
        else:
            raise AssertionError(f"Unknown section type: {kind}")


def test_analyze_migration_reads_our_plain_stream() -> None:
    script = sample_script()
    script.rounds = [[op for op in ops if not isinstance(op, ConfidentialOp)] for ops in script.rounds]
    built = build(script)
    counts = qemu_style_read(built.data)
    pages = sum(1 for e in built.expected if e[0] == "page")
    zero = sum(1 for e in built.expected if e[0] == "zero")
    assert counts == {
        "pages": pages,
        "zero": zero,
        "devices": 3,
        "footers": 1 + 3 + 3,
    }  # setup, 3 rounds, 3 devices
