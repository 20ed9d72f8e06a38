"""A migration stream file, summarised: what ``scripts/analyze-migration.py`` tells about a QEMU
stream, decoded by our own :class:`StreamDecoder` (so it also checks the stream)."""

from __future__ import annotations

import json
import os
from typing import Any, TypedDict

from confmig.common.units import PAGE_SIZE
from confmig.proto.stream.decoder import (
    NEED_DATA,
    Confidential,
    DeviceState,
    End,
    Header,
    RamEos,
    RamMemSize,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    VmDescription,
)
from confmig.proto.stream.format import ConfidentialSubtype


class SectionReport(TypedDict):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    full: bool
    parts: int
    """Headers seen: START + PARTs + END for ``ram``, 1 for a device."""
    bytes: int
    """Wire bytes from each header through its footer."""


class RamReport(TypedDict):
    blocks: dict[str, int]
    pages: int
    zero_pages: int
    eos: int
    confidential: dict[str, int]
    """Record count per subtype name."""
    confidential_bytes: int


class DeviceReport(TypedDict):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    state_size: int


class Report(TypedDict):
    path: str
    size: int
    version: int
    machine_type: str
    sections: list[SectionReport]
    ram: RamReport
    devices: list[DeviceReport]
    framing_bytes: int
    """Bytes outside every section: file header, EOF, vmdescription."""
    vmdescription: dict[str, Any] | None


def analyze(path: str | os.PathLike[str]) -> Report:
    """Decode the stream file at ``path``; raises ``StreamError`` if it is not valid."""
    decoder = StreamDecoder()
    report = Report(
        path=os.fspath(path),
        size=0,
        version=0,
        machine_type="",
        sections=[],
        ram=RamReport(
            blocks={},
            pages=0,
            zero_pages=0,
            eos=0,
            confidential={s.name.lower(): 0 for s in ConfidentialSubtype},
            confidential_bytes=0,
        ),
        devices=[],
        framing_bytes=0,
        vmdescription=None,
    )
    ram = report["ram"]
    sections: dict[int, SectionReport] = {}
    current: SectionReport | None = None
    with open(path, "rb", buffering=0) as f:
        while True:
            before = decoder.offset
            event = decoder.next_event()
            if event is NEED_DATA:
                n = f.readinto(decoder.get_buffer())
                if n:
                    decoder.buffer_updated(n)
                else:
                    decoder.feed_eof()
                continue
            match event:
                case Header(version=version, machine_type=machine_type):
                    report["version"], report["machine_type"] = version, machine_type
                case SectionStart():
                    current = sections[event.section_id] = SectionReport(
                        section_id=event.section_id,
                        idstr=event.idstr,
                        instance_id=event.instance_id,
                        version_id=event.version_id,
                        full=event.full,
                        parts=1,
                        bytes=0,
                    )
                case SectionPart(section_id=section_id) | SectionEnd(section_id=section_id):
                    current = sections[section_id]
                    current["parts"] += 1
                case RamMemSize(blocks=blocks):
                    ram["blocks"] = dict(blocks)
                case RamPages(indices=indices):
                    ram["pages"] += len(indices)
                case RamZeroPages(indices=indices):
                    ram["zero_pages"] += len(indices)
                case RamEos():
                    ram["eos"] += 1
                case Confidential(subtype=subtype, payload=payload):
                    ram["confidential"][subtype.name.lower()] += 1
                    ram["confidential_bytes"] += len(payload)
                case DeviceState():
                    report["devices"].append(
                        DeviceReport(
                            section_id=event.section_id,
                            idstr=event.idstr,
                            instance_id=event.instance_id,
                            version_id=event.version_id,
                            state_size=len(event.state),
                        )
                    )
                case VmDescription(json=desc):
                    report["vmdescription"] = desc
            consumed = decoder.offset - before
            if current is None:
                report["framing_bytes"] += consumed
            else:
                current["bytes"] += consumed
            if isinstance(event, SectionFooter):
                current = None
            elif isinstance(event, End):
                break
    report["size"] = decoder.offset
    report["sections"] = list(sections.values())
    return report


def format_report(report: Report) -> str:
    """The report as text for a terminal."""
    ram = report["ram"]
    lines = [
        f"{report['path']}: {report['size']:,} bytes, stream version {report['version']}, "
        f"machine {report['machine_type']}",
        "",
        "sections:",
        f"  {'id':>4}  {'idstr':<20} {'inst':>4} {'ver':>4}  {'kind':<9} {'parts':>5}  bytes",
    ]
    for s in report["sections"]:
        kind = "full" if s["full"] else "iterative"
        lines.append(
            f"  {s['section_id']:>4}  {s['idstr']:<20} {s['instance_id']:>4} "
            f"{s['version_id']:>4}  {kind:<9} {s['parts']:>5}  {s['bytes']:,}"
        )
    lines.append(f"  framing (header, EOF, vmdescription): {report['framing_bytes']:,} bytes")
    lines += ["", "ram:"]
    for name, size in ram["blocks"].items():
        lines.append(f"  block {name}: {size:,} bytes ({size // PAGE_SIZE:,} pages)")
    lines += [
        f"  normal pages: {ram['pages']:,} ({ram['pages'] * PAGE_SIZE:,} bytes)",
        f"  zero pages:   {ram['zero_pages']:,}",
        f"  EOS records:  {ram['eos']:,}",
        "  confidential: "
        + ", ".join(f"{name} {count:,}" for name, count in ram["confidential"].items())
        + f" ({ram['confidential_bytes']:,} payload bytes)",
        "",
        "devices:",
    ]
    for d in report["devices"]:
        lines.append(
            f"  {d['idstr']} (section {d['section_id']}, instance {d['instance_id']}, "
            f"version {d['version_id']}): {d['state_size']:,} bytes of state"
        )
    lines += ["", "vmdescription:"]
    desc = report["vmdescription"]
    lines.append(json.dumps(desc, indent=2) if desc is not None else "  (none)")
    return "\n".join(lines)
