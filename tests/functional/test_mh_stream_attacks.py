"""A hostile host between two Migration Handler VMMs rewrites whole MH records on the live
stream (issue 11, "What the tests must show": swaps, replays, reorders, drops, truncates and
flips). Whatever it does, no target runs a corrupted guest: the migration fails, the target
says what refused it, and the source's guest runs on and passes its self-check.

The proxy (``confmig.bench.attacks``) parses the stream with our decoder and re-encodes the records it
moves or changes with our encoder; its tally shows that each attack did happen. The first
tests check the proxy itself on an in-memory stream, without sockets or processes.
"""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable, Iterator

import pytest
from chunked import through
from test_mh_live_migration import SETTINGS, mh_pair, wait_migration

from confmig.bench.attacks import (
    LAST,
    Attack,
    CutShort,
    Drop,
    Duplicate,
    Flip,
    Inject,
    Part,
    ProxyServer,
    RecordId,
    Reorder,
    Replay,
    StreamProxy,
    Swap,
    Truncate,
)
from confmig.bench.lab import HostProc, Lab, VmProc
from confmig.bench.scenario import configure, incoming_uri, mh_target_challenge, migrate, wait_status
from confmig.common.units import PAGE_SIZE
from confmig.proto import mailbox as mb
from confmig.proto.stream.decoder import NEED_DATA, Confidential, End, StreamDecoder
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import DeviceSection, StreamWriter
from confmig.vmm.migration.mh import FINAL_EPOCH
from confmig.vmm.qmp.client import QmpCommandError

Expect = Callable[[list[RecordId]], list[RecordId]]
"""The page records the target gets in the window's place, from the window's."""

# --- the proxy on an in-memory stream ------------------------------------------------------


def fake_record(seq: int, *, stream: int = 0, nstreams: int = 1, epoch: int = 0,
                kind: mb.RecordKind = mb.RecordKind.PAGES) -> bytes:
    """A record shaped as the MH seals one (a data page and a zero page, the zero one last for
    an even ``seq``, first for an odd one); its bytes are noise."""
    npages, nzero = (2, 1) if kind == mb.RecordKind.PAGES else (0, 0)
    header = mb.RecordHeader(mb.RECORD_VERSION, mb.ALG_AES_256_GCM, kind, stream, seq, epoch, npages,
                             nzero, 0, nstreams, bytes(range(16)))
    entries = [(2 * seq + i) * PAGE_SIZE | ((i + seq) & mb.ZERO_FLAG) for i in range(npages)]
    gpas = struct.pack(f"<{npages}Q", *entries)
    rng = random.Random(seq * nstreams + stream)
    return header.pack() + gpas + rng.randbytes((npages - nzero) * PAGE_SIZE + mb.TAG_SIZE)


def fake_stream(rounds: tuple[int, int] = (40, 5), nstreams: int = 1) -> bytes:
    """A stream in the MH backend's shape: a precopy round and the final part of page records
    (``nstreams`` streams, round-robin), the completion record, a shared-regions list, a
    device, EOF."""
    w = StreamWriter("pc-q35-7.2")
    mh = ConfidentialSubtype.MH_RECORD

    def records(seqs: range, epoch: int) -> list[bytes]:
        return [w.confidential(mh, fake_record(seq, stream=s, nstreams=nstreams, epoch=epoch))
                for seq in seqs for s in range(nstreams)]

    out = [w.setup([("pc.ram", 1 << 20)]), w.begin_round(), *records(range(rounds[0]), 0),
           w.end_part(), w.begin_final(), *records(range(rounds[0], sum(rounds)), 1)]
    out += [w.confidential(mh, fake_record(0, kind=mb.RecordKind.COMPLETION)),
            w.confidential(ConfidentialSubtype.SHARED_REGIONS, b"\0" * 4), w.end_part(),
            w.device(DeviceSection(idstr="cpu", instance_id=0, version_id=1, state=b"regs")), w.eof()]
    return b"".join(out)




def page_records(stream: bytes) -> Iterator[tuple[RecordId, bytes]]:
    """The MH page records a target would decode from ``stream``, in order."""
    decoder = StreamDecoder()
    decoder.receive_data(stream)
    decoder.feed_eof()
    while not isinstance(event := decoder.next_event(), End):
        assert event is not NEED_DATA
        if isinstance(event, Confidential) and event.subtype == ConfidentialSubtype.MH_RECORD:
            h = mb.RecordHeader(*mb.RECORD_HEADER.unpack_from(event.payload))
            if h.kind == mb.RecordKind.PAGES:
                yield RecordId(h.stream, h.seq), event.payload


def test_without_an_attack_the_proxy_passes_the_stream_byte_for_byte() -> None:
    stream = fake_stream()
    proxy = StreamProxy()
    assert through(proxy, stream) == stream
    assert proxy.tally.received == proxy.tally.forwarded == [RecordId(0, s) for s in range(45)]
    assert proxy.tally.completion and not proxy.tally.done and proxy.tally.error is None


def ids(*seqs: int) -> list[RecordId]:
    return [RecordId(0, s) for s in seqs]


@pytest.mark.parametrize(("attack", "window", "seqs"), [
    (Swap(at=10), ids(10, 11, 12, 13), ids(13, 11, 12, 10)),
    (Replay(at=10), ids(10, 11, 12, 13), ids(10, 11, 12, 13, 10)),
    (Reorder(at=39), ids(39, 40), ids(40, 39)),  # across the end of a round: framing stays valid
    (Drop(at=10), ids(10), ids()),
    (Duplicate(at=10), ids(10), ids(10, 10)),
    (Inject(at=10), ids(10), ids(10, 10)),
    (Drop(at=LAST), ids(44), ids()),
    (Flip(at=10, part=Part.TAG), ids(10), ids(10)),
    (Truncate(at=10), ids(10), ids(10)),
], ids=lambda v: getattr(v, "name", None))
def test_the_proxy_rewrites_whole_records_in_a_valid_stream(
        attack: Attack, window: list[RecordId], seqs: list[RecordId]) -> None:
    stream = fake_stream()
    proxy = StreamProxy(attack)
    out = through(proxy, stream, seed=len(seqs))
    got = list(page_records(out))  # the target's decoder takes the framing: only records changed
    before = [RecordId(0, s) for s in range(window[0].seq)]
    after = [RecordId(0, s) for s in range(window[-1].seq + 1, 45)]
    assert [r for r, _ in got] == before + seqs + after
    assert proxy.tally.window == window and len(proxy.tally.done) == 1
    assert proxy.tally.forwarded == before + seqs + after
    genuine = dict(page_records(stream))
    changed = [r for r, payload in got if payload != genuine[r]]
    assert len(changed) == proxy.tally.changed == (1 if isinstance(attack, Inject | Flip | Truncate) else 0)


def test_with_two_streams_the_window_is_one_streams_records() -> None:
    """Records of stream 1 between the window's records of stream 0 pass in place."""
    stream = fake_stream(nstreams=2)
    proxy = StreamProxy(Swap(at=20, distance=2))  # page record 20 is stream 0's 10th
    got = [r for r, _ in page_records(through(proxy, stream))]
    assert proxy.tally.window == [RecordId(0, 10), RecordId(0, 11), RecordId(0, 12)]
    i = got.index(RecordId(0, 12))
    assert got[i : i + 6] == [RecordId(0, 12), RecordId(1, 10), RecordId(0, 11), RecordId(1, 11),
                              RecordId(0, 10), RecordId(1, 12)]
    assert sorted(got) == sorted(r for r, _ in page_records(stream))


@pytest.mark.parametrize(("seq", "left"), [(2, (1, 0)), (3, (1, 1))], ids=["zero-page-last", "data-last"])
def test_a_truncated_record_is_well_formed_and_one_page_shorter(seq: int, left: tuple[int, int]) -> None:
    out = through(StreamProxy(Truncate(at=seq)), fake_stream())
    payload = dict(page_records(out))[RecordId(0, seq)]
    h = mb.decode_record_header(payload)  # the target's VMM finds nothing wrong with it
    assert (h.npages, h.nzero) == left
    assert payload[-mb.TAG_SIZE :] == fake_record(seq)[-mb.TAG_SIZE :]


def test_a_cut_ends_the_stream_inside_the_record() -> None:
    stream = fake_stream()
    proxy = StreamProxy(CutShort(at=5))
    out = through(proxy, stream)
    assert proxy.ended and proxy.tally.forwarded == ids(0, 1, 2, 3, 4)
    assert stream.startswith(out) and len(out) < stream.index(fake_record(5)) + len(fake_record(5))


# --- the attacks between two MH VMMs -------------------------------------------------------

IMPORT_REFUSED = (r"the Migration Handler refused IMPORT of a record of stream \d \(sequence \d+\) "
                  r"\(AUTH_ERR\)")
VERIFY_REFUSED = r"the Migration Handler refused VERIFY .*\(AUTH_ERR\)"
"""What the target says (``error-desc``): its MH refused a record, or the completion record."""


def swapped(w: list[RecordId]) -> list[RecordId]:
    return [w[-1], *w[1:-1], w[0]]


ATTACKS = [
    # (attack, MH vCPUs (streams), what the target gets in the window's place, what it says)
    pytest.param(Swap(), 2, swapped, IMPORT_REFUSED, id="swap"),
    pytest.param(Replay(), 1, lambda w: [*w, w[0]], IMPORT_REFUSED, id="replay"),
    pytest.param(Reorder(), 2, swapped, IMPORT_REFUSED, id="reorder"),
    pytest.param(Drop(), 1, lambda w: [], IMPORT_REFUSED, id="drop"),
    pytest.param(Duplicate(), 1, lambda w: [w[0], w[0]], IMPORT_REFUSED, id="duplicate"),
    pytest.param(Inject(), 1, lambda w: [w[0], w[0]], IMPORT_REFUSED, id="inject"),
    pytest.param(Flip(part=Part.HEADER), 1, list, IMPORT_REFUSED, id="flip-header"),
    pytest.param(Flip(part=Part.CIPHERTEXT), 1, list, IMPORT_REFUSED, id="flip-payload"),
    pytest.param(Truncate(), 1, list, IMPORT_REFUSED, id="truncate"),
    pytest.param(CutShort(), 1, lambda w: [], r"truncated: confidential record", id="cut"),
    pytest.param(Drop(at=LAST), 1, lambda w: [], VERIFY_REFUSED, id="drop-last"),
]


def through_proxy(src: VmProc, dst: VmProc, attack: Attack) -> ProxyServer:
    """Start the target listening and a proxy in front of it (``through`` of the MH tests,
    with our proxy)."""
    configure(dst, SETTINGS)
    host, port = incoming_uri(dst).removeprefix("tcp:").rsplit(":", 1)
    src.qmp.execute("migrate-set-parameters", **mh_target_challenge(dst))
    return ProxyServer((host, int(port)), attack)


@pytest.mark.parametrize(("attack", "mh_vcpus", "expect", "refusal"), ATTACKS)
def test_an_attack_on_mh_records_fails_the_migration_and_the_source_runs_on(
        lab: Lab, hosts: tuple[HostProc, HostProc], attack: Attack, mh_vcpus: int, expect: Expect,
        refusal: str) -> None:
    src, dst = mh_pair(lab, hosts, mh_vcpus=mh_vcpus)
    with through_proxy(src, dst, attack) as proxy:
        result = migrate(src, None, proxy.uri, settings=SETTINGS)
        assert result.status == "failed"
        assert proxy.finished.wait(10), "the proxy still forwards"
    tally = proxy.tally  # the attack did happen, as intended
    assert tally.error is None, tally.error
    assert len(tally.done) == 1 and tally.window, tally
    stream = tally.window[0].stream  # other streams' records pass in place, as they came
    received = [r for r in tally.received if r.stream == stream]
    forwarded = [r for r in tally.forwarded if r.stream == stream]
    first = received.index(tally.window[0])
    got = expect(tally.window)
    assert forwarded[:first] == received[:first]
    assert forwarded[first : first + len(got)] == got, tally.done
    assert tally.changed == (1 if isinstance(attack, Flip | Inject | Truncate | CutShort) else 0)
    if attack.at == LAST:  # the stop-and-copy part's last record: only COMPLETE can miss it
        assert tally.completion and tally.forwarded == tally.received[:-1]
        assert tally.window_epochs == [FINAL_EPOCH]
    assert proxy.connections == 1  # the main channel only: nothing went around the proxy

    wait_migration(dst, "failed")
    target_error = dst.qmp.execute("query-migrate").get("error-desc", "")
    assert re.search(refusal, target_error), target_error
    assert dst.qmp.execute("query-status")["status"] != "running"
    with pytest.raises(QmpCommandError, match="not finalized"):
        dst.qmp.execute("cont")  # nor does its host get it to run what arrived

    wait_status(src, "running")  # after FINISH (drop-last): once it opened the target's abort token
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")
    assert dst.qmp.execute("query-status")["status"] != "running"
