"""``analyze``: the summary of a stream file, decoded in chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamcases import RAM_SECTION, Op, PagesOp, Script, build, sample_script

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import analyze, device_section, eof, format_report, header
from confmig.proto.stream.decoder import DEFAULT_BUFFER_SIZE


def test_report_of_the_sample_stream(tmp_path: Path) -> None:
    script = sample_script()
    devices = script.devices
    built = build(script)
    path = tmp_path / "stream.bin"
    path.write_bytes(built.data)

    report = analyze(path)

    assert (report["size"], report["version"], report["machine_type"]) == (
        len(built.data),
        3,
        "pc-q35-7.2",
    )
    assert report["ram"] == {
        "blocks": {"pc.ram": 24 * PAGE_SIZE, "vga.vram": 4 * PAGE_SIZE},
        "pages": sum(1 for e in built.expected if e[0] == "page"),
        "zero_pages": sum(1 for e in built.expected if e[0] == "zero"),
        "eos": 1 + 3,
        "confidential": {"psp_packet": 1, "shared_regions": 1, "mh_record": 1},
        "confidential_bytes": 32 + 116 + 0,
    }
    assert report["ram"]["zero_pages"] == 3 + 3 + 1  # found in round 1, ZeroOp, found in round 2
    sections = {s["section_id"]: s for s in report["sections"]}
    assert [(s["idstr"], s["full"], s["parts"]) for s in sections.values()] == [
        ("ram", False, 4),
        ("cpu", True, 1),
        ("serial", True, 1),
        ("kv", True, 1),
    ]
    for d in devices:
        section = device_section(d.section_id, d.idstr, d.instance_id, d.version_id, d.state)
        assert sections[d.section_id]["bytes"] == len(section)
    trailer = len(built.data) - built.eof_end
    assert report["framing_bytes"] == len(header("pc-q35-7.2")) + len(eof()) + trailer
    assert sum(s["bytes"] for s in report["sections"]) + report["framing_bytes"] == len(built.data)
    assert [(d["idstr"], d["state_size"]) for d in report["devices"]] == [
        ("cpu", 40),
        ("serial", 9),
        ("kv", 0),
    ]
    assert report["vmdescription"] is not None
    assert [d["name"] for d in report["vmdescription"]["devices"]] == ["cpu", "serial", "kv"]

    text = format_report(report)
    assert f"normal pages: {report['ram']['pages']}" in text
    assert "confidential: psp_packet 1, shared_regions 1, mh_record 1 (148 payload bytes)" in text
    assert "serial (section 8, instance 1, version 3): 9 bytes of state" in text
    assert f"{RAM_SECTION:>4}  ram" in text
    assert json.dumps(report["vmdescription"], indent=2) in text


def test_a_file_larger_than_the_buffer_is_read_in_chunks(tmp_path: Path) -> None:
    pages = np.random.default_rng(2).integers(0, 256, (3000, PAGE_SIZE), dtype=np.uint8)
    rounds: list[list[Op]] = [[PagesOp("pc.ram", list(range(s, s + 1000)))] for s in (0, 1000, 2000)]
    built = build(Script("pc", {"pc.ram": pages}, rounds, []), batch_pages=1000)
    path = tmp_path / "big.bin"
    path.write_bytes(built.data)
    report = analyze(path)
    assert report["ram"]["pages"] == 3000
    assert report["size"] == len(built.data) > 2 * DEFAULT_BUFFER_SIZE


def test_a_corrupt_file_is_rejected(tmp_path: Path) -> None:
    data = bytearray(build(sample_script()).data)
    data[-3] ^= 0xFF  # inside the vmdescription JSON
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(StreamError, match="vmdescription is not valid JSON"):
        analyze(path)
