"""The attack proxy's core on in-memory PSP and plain streams (the MH ones:
``tests/functional/test_mh_stream_attacks.py``): what a target would decode from what it
lets through. No sockets, no processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from chunked import through

from confmig.bench.attacks import (
    FINAL,
    LAST,
    CutShort,
    Drop,
    Flip,
    Inject,
    Kind,
    Part,
    Reorder,
    StaleReplay,
    StreamProxy,
    Swap,
    Truncate,
)
from confmig.bench.attacks.catalog import CASES, NOT_APPLICABLE, Expected
from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE
from confmig.proto.stream import psp as psp_records
from confmig.proto.stream.decoder import NEED_DATA, Confidential, End, RamPages, RamZeroPages, StreamDecoder
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import DeviceSection, StreamWriter

BLOCK = "pc.ram"
RAM = 1 << 20  # 256 pages
WATCHED = [(0x10000, 0x20000)]
"""Pages 16..31: those the guest checks."""


def psp_page(gpa: int, version: int) -> bytes:
    rng = random.Random(gpa * 7 + version)
    return psp_records.encode(psp_records.PspPage(gpa=gpa, header=rng.randbytes(52),
                                                  transport=rng.randbytes(PAGE_SIZE)))


def psp_stream() -> bytes:
    """Round 1: pages 0..39 (version 1); round 2: pages 16..23 (version 2); the final part:
    pages 20..27 (version 3), a VMSA, the shared-regions list; a device; EOF."""
    w = StreamWriter("pc-q35-7.2")
    sub = ConfidentialSubtype.PSP_PACKET
    session = psp_records.encode(psp_records.PspSession(policy=1, pdh=b"p" * 64, session=b"s" * 128))
    out = [w.setup([(BLOCK, RAM)]), w.begin_round(), w.confidential(sub, session),
           *(w.confidential(sub, psp_page(g * PAGE_SIZE, 1)) for g in range(40)), w.end_part(),
           w.begin_round(), *(w.confidential(sub, psp_page(g * PAGE_SIZE, 2)) for g in range(16, 24)),
           w.end_part(), w.begin_final(),
           *(w.confidential(sub, psp_page(g * PAGE_SIZE, 3)) for g in range(20, 28)),
           w.confidential(sub, psp_records.encode(psp_records.PspVmsa(vcpu_id=0, header=b"h" * 52,
                                                                      transport=b"v" * PAGE_SIZE))),
           w.confidential(ConfidentialSubtype.SHARED_REGIONS, b"\0" * 4), w.end_part(),
           w.device(DeviceSection(idstr="cpu", instance_id=0, version_id=1, state=b"regs")), w.eof()]
    return b"".join(out)


def plain_stream() -> bytes:
    """Round 1: every page (zero ones as zero records); the final part: pages 20..27 anew."""
    w = StreamWriter("pc-q35-7.2")
    ram = np.zeros((RAM // PAGE_SIZE, PAGE_SIZE), np.uint8)
    ram[:40] = np.random.default_rng(1).integers(1, 255, (40, PAGE_SIZE), dtype=np.uint8)
    out = [w.setup([(BLOCK, RAM)]), w.begin_round()]
    batch = w.pages(BLOCK, ram, np.arange(RAM // PAGE_SIZE))
    out += [bytes(batch.wire), w.zero_pages(BLOCK, batch.zero), w.end_part(), w.begin_final()]
    ram[20:28] ^= 0x5A
    out += [bytes(w.pages(BLOCK, ram, np.arange(20, 28)).wire), w.end_part(),
            w.device(DeviceSection(idstr="cpu", instance_id=0, version_id=1, state=b"regs")), w.eof()]
    return b"".join(out)




def target_view(stream: bytes) -> list[tuple[int, bytes]]:
    """(GPA, content) of every page write a target would make, in order (PSP: the packet)."""
    decoder = StreamDecoder()
    decoder.receive_data(stream)
    decoder.feed_eof()
    writes = []
    while not isinstance(event := decoder.next_event(), End):
        assert event is not NEED_DATA
        if isinstance(event, Confidential) and event.subtype == ConfidentialSubtype.PSP_PACKET:
            rec = psp_records.decode(event.payload)
            if isinstance(rec, psp_records.PspPage):
                writes.append((rec.gpa, rec.header + rec.transport))
        elif isinstance(event, RamPages):
            writes += [(int(i) * PAGE_SIZE, bytes(d)) for i, d in zip(event.indices, event.data, strict=True)]
        elif isinstance(event, RamZeroPages):
            writes += [(int(i) * PAGE_SIZE, bytes(PAGE_SIZE)) for i in event.indices]
    return writes


def final_memory(writes: list[tuple[int, bytes]]) -> dict[int, bytes]:
    return dict(writes)


@pytest.mark.parametrize(("kind", "make"), [(Kind.PSP, psp_stream), (Kind.PLAIN, plain_stream)])
def test_without_an_attack_the_stream_passes_byte_for_byte(kind: Kind, make: object) -> None:
    stream = make()  # type: ignore[operator]
    proxy = StreamProxy(kind=kind, pages=WATCHED)
    assert through(proxy, stream) == stream
    assert proxy.tally.received == proxy.tally.forwarded and len(proxy.tally.received) >= 48
    assert proxy.tally.completion and proxy.tally.error is None and not proxy.tally.done


@pytest.mark.parametrize(("kind", "make"), [(Kind.PSP, psp_stream), (Kind.PLAIN, plain_stream)])
def test_swap_in_the_final_part_exchanges_two_pages_contents(kind: Kind, make: object) -> None:
    stream = make()  # type: ignore[operator]
    proxy = StreamProxy(Swap(at=FINAL, distance=1), kind=kind, pages=WATCHED)
    out = through(proxy, stream, seed=3)
    before, after = final_memory(target_view(stream)), final_memory(target_view(out))
    a, b = 20 * PAGE_SIZE, 21 * PAGE_SIZE
    assert proxy.tally.window_gpas == [a, b] and proxy.tally.window_epochs == [1, 1]
    assert (after[a], after[b]) == (before[b], before[a])
    assert {g for g in before if before[g] != after[g]} == {a, b}


@pytest.mark.parametrize(("kind", "make"), [(Kind.PSP, psp_stream), (Kind.PLAIN, plain_stream)])
def test_a_stale_replay_leaves_the_previous_version_of_a_page(kind: Kind, make: object) -> None:
    stream = make()  # type: ignore[operator]
    proxy = StreamProxy(StaleReplay(), kind=kind, pages=WATCHED)
    out = through(proxy, stream, seed=5)
    gpa = 20 * PAGE_SIZE
    versions = [content for g, content in target_view(stream) if g == gpa]
    assert proxy.tally.window_gpas == [gpa]
    assert final_memory(target_view(out))[gpa] == versions[-2] != versions[-1]
    assert proxy.tally.changed == 0  # a genuine record, sent again


def test_windows_stay_among_the_watched_pages() -> None:
    """The final part's pages 20..27: drop-last takes 27, not a page outside 16..31; a window that
    would reach beyond the watched pages starts again inside them."""
    proxy = StreamProxy(Drop(at=LAST), kind=Kind.PSP, pages=[(0x14000, 0x18000)])  # pages 20..23
    out = through(proxy, psp_stream())
    assert proxy.tally.window_gpas == [23 * PAGE_SIZE]
    assert [g for g, _ in target_view(out)][-4:] == [g * PAGE_SIZE for g in (24, 25, 26, 27)]
    proxy = StreamProxy(Reorder(at=FINAL), kind=Kind.PSP, pages=[(0x17000, 0x19000)])  # 23, 24
    through(proxy, psp_stream())
    assert proxy.tally.window_gpas == [23 * PAGE_SIZE, 24 * PAGE_SIZE]


@pytest.mark.parametrize("part", [Part.HEADER, Part.CIPHERTEXT, Part.TAG, Part.GPA_LIST])
def test_a_flipped_psp_record_differs_in_one_bit_where_it_says(part: Part) -> None:
    stream = psp_stream()
    proxy = StreamProxy(Flip(at=FINAL, part=part), kind=Kind.PSP, pages=WATCHED)
    out = through(proxy, stream)
    assert proxy.tally.changed == 1
    if part is Part.GPA_LIST:  # the packet is the genuine one, at another page
        after = target_view(out)
        assert (21 * PAGE_SIZE, dict(target_view(stream))[20 * PAGE_SIZE]) in after
        return
    diff = np.frombuffer(stream, np.uint8) ^ np.frombuffer(out, np.uint8)
    assert len(out) == len(stream) and sum(bin(int(x)).count("1") for x in diff[diff != 0]) == 1


def test_forged_and_truncated_psp_records_keep_their_envelope() -> None:
    proxy = StreamProxy(Inject(at=FINAL), kind=Kind.PSP, pages=WATCHED)
    writes = target_view(through(proxy, psp_stream()))
    at20 = [c for g, c in writes if g == 20 * PAGE_SIZE]
    assert len(at20) == 4 and at20[-2] != at20[-1]  # round 1, round 2, the forgery, the genuine one
    proxy = StreamProxy(Truncate(at=FINAL), kind=Kind.PSP, pages=WATCHED)
    out = through(proxy, psp_stream())
    assert proxy.tally.changed == 1 and len(out) == len(psp_stream()) - 16
    with pytest.raises(StreamError, match="not one whole page"):
        target_view(out)


def test_every_backend_whose_pages_cross_a_network_has_every_attack() -> None:
    names = {b: [c.name for c in cases] for b, cases in CASES.items()}
    assert names["plain"] == names["mh"]
    assert [n for n in names["psp"] if n not in names["plain"]] == ["rogue-pdh", "rogue-pdh-sev-bit"]
    assert {"swap", "replay", "reorder", "drop", "duplicate", "truncate", "flip-header", "flip-payload",
            "inject", "rogue-target", "replay-stream", "restore-file"} <= set(names["mh"])
    assert all(c.expected is Expected.CAUGHT for c in CASES["mh"])  # the MH must catch everything
    psp_misses = {c.name for c in CASES["psp"] if c.expected is not Expected.CAUGHT}
    assert {"swap", "replay", "drop", "reorder", "replay-stream", "restore-file"} <= psp_misses
    assert {c.name for c in CASES["plain"] if c.expected is Expected.CAUGHT} == {"cut"}
    assert "local" in NOT_APPLICABLE


def test_a_cut_inside_a_run_of_plain_pages_ends_the_stream_there() -> None:
    stream = plain_stream()
    proxy = StreamProxy(CutShort(at=5), kind=Kind.PLAIN, pages=WATCHED)
    out = through(proxy, stream, seed=1)
    assert proxy.ended and proxy.tally.window_gpas == [16 * PAGE_SIZE]
    assert [g for g, _ in target_view_until_cut(out)] == [g * PAGE_SIZE for g in range(16)]


def target_view_until_cut(stream: bytes) -> list[tuple[int, bytes]]:
    """What a target decodes before the stream ends inside a record."""
    with pytest.raises(StreamError, match="truncated"):
        target_view(stream)
    decoder = StreamDecoder()
    decoder.receive_data(stream)
    writes = []
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, RamPages):
            writes += [(int(i) * PAGE_SIZE, bytes(d)) for i, d in zip(event.indices, event.data, strict=True)]
    return writes


def test_the_pages_a_dirty_guest_checks_come_from_its_console() -> None:
    from confmig.bench.attacks.harness import checked_pages

    class Console:
        name = "src"

        def console_text(self) -> bytes:
            return (b"dirty: 512 pages (2 MiB: 500 at 0x1001000, 12 at 0x100000000), version table at "
                    b"0x1000000, 300 pages/s\n")

    table = (0x1000000, 0x1001000)  # 512 le64 versions: one page
    assert checked_pages(Console()) == [table, (0x1001000, 0x1001000 + 500 * PAGE_SIZE),  # type: ignore[arg-type]
                                        (0x100000000, 0x100000000 + 12 * PAGE_SIZE)]


def test_the_saved_table_has_a_row_per_attack_and_a_column_per_backend() -> None:
    from confmig.bench.attacks.harness import Outcome, markdown, report_of

    def outcome(backend: str, case: str, verdict: str, expected: str) -> Outcome:
        return Outcome(backend=backend, case=case, what="w", expected=expected, why="y", verdict=verdict,
                       acted="a|b", migration="failed", caught_by="refused", target="inmigrate",
                       target_selfcheck="", source="running", source_selfcheck="confmig-selfcheck: PASS",
                       seconds=1.0)

    report = report_of([outcome("psp", "swap", "caught", "not caught: corrupted"),
                        outcome("mh", "swap", "caught", "caught"),
                        outcome("psp", "rogue-pdh", "not caught: memory read", "not caught: memory read")],
                       t0=0)
    lines = markdown(report)
    assert "| attack | psp | mh |" in lines
    assert "| swap | caught (**NO**) | caught |" in lines
    assert "| rogue-pdh | not caught: memory read | — |" in lines
    assert not report["all_as_designed"] and any("a\\|b" in line for line in lines)
