"""The PSP backend on the target: what it accepts, and the clear error for anything else.

The record codec itself is tested in ``tests/protocol/stream/test_confidential_records.py``."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from migration_fakes import FakeChannel, stream_events

from confmig.common.errors import ConfigError, StreamError
from confmig.proto.stream import decoder as dec
from confmig.proto.stream import psp as records
from confmig.proto.stream.format import ConfidentialSubtype
from confmig.proto.stream.writer import StreamWriter
from confmig.vmm.memory import GuestMemory
from confmig.vmm.migration import psp
from confmig.vmm.migration.params import MigrationParameters
from confmig.vmm.migration.ram import MainChannelSink
from confmig.vmm.shared_regions import SharedRegions

HDR, TRANS = b"h" * 52, b"t" * 4096


@dataclass
class FakeConfig:
    es: bool = False


@dataclass
class FakeSev:
    """Records what KVM would have been asked; the PSP's own checks are tested elsewhere."""

    config: FakeConfig = field(default_factory=FakeConfig)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    shared: SharedRegions = field(default_factory=SharedRegions)
    receiving: bool = False

    def receive_start(self, policy: int, pdh: bytes, session: bytes) -> None:
        self.calls.append(("start", policy, len(pdh), len(session)))

    def receive_update_data(self, gpa: int, hdr: bytes, trans: bytes) -> None:
        self.calls.append(("page", gpa))

    def receive_update_vmsa(self, vcpu_id: int, hdr: bytes, trans: bytes) -> None:
        self.calls.append(("vmsa", vcpu_id))


def landing(es: bool = False) -> tuple[psp.PspIncoming, FakeSev]:
    sev = FakeSev(config=FakeConfig(es=es))
    memory = GuestMemory.pc(16 << 20)
    return psp.PspIncoming(sev, memory, {0, 1}), sev  # type: ignore[arg-type]


def _blob(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _record(payload: bytes) -> bytes:
    """A CONFIDENTIAL record of subtype PSP_PACKET around a raw payload (the codec would refuse
    to write the malformed ones)."""
    return struct.pack(">QBI", 0x800, ConfidentialSubtype.PSP_PACKET, len(payload)) + payload


def session_record(policy: int, pdh: bytes, session: bytes) -> bytes:
    return _record(b"\x01" + struct.pack(">I", policy) + _blob(pdh) + _blob(session))


def page_record(gpa: int, hdr: bytes, trans: bytes) -> bytes:
    return _record(b"\x02" + struct.pack(">Q", gpa) + _blob(hdr) + _blob(trans))


def vmsa_record(vcpu_id: int, hdr: bytes, trans: bytes) -> bytes:
    return _record(b"\x03" + struct.pack(">I", vcpu_id) + _blob(hdr) + _blob(trans))


def shared_regions_record(shared: SharedRegions) -> bytes:
    payload = shared.encode()
    return struct.pack(">QBI", 0x800, ConfidentialSubtype.SHARED_REGIONS, len(payload)) + payload


def payload(record: bytes) -> tuple[ConfidentialSubtype, bytes]:
    d = dec.StreamDecoder()
    # A CONFIDENTIAL record only decodes inside a ram section: wrap it as the engine sends it.
    d.receive_data(b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2")
    d.receive_data(b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04")
    d.receive_data(struct.pack(">Q", 16 << 20 | 0x04) + b"\x06pc.ram" + struct.pack(">Q", 16 << 20))
    d.receive_data(struct.pack(">Q", 0x10) + b"\x7e\x00\x00\x00\x00")
    d.receive_data(b"\x02\x00\x00\x00\x00" + record)
    while True:
        ev = d.next_event()
        if isinstance(ev, dec.Confidential):
            return ev.subtype, ev.payload


def session() -> bytes:
    return payload(session_record(1, b"p" * 2084, b"s" * 128))[1]


def test_records_round_trip_through_the_stream_codec() -> None:
    land, sev = landing(es=True)
    for record in (session_record(1, b"p" * 2084, b"s" * 128), page_record(0x3000, HDR, TRANS),
                   vmsa_record(1, HDR, TRANS)):
        land.record(*payload(record))
    shared = SharedRegions()
    shared.update(1, 1, shared=True)
    land.record(*payload(shared_regions_record(shared)))
    assert sev.calls == [("start", 1, 2084, 128), ("page", 0x3000), ("vmsa", 1)]
    assert land.vmsas == {1} and sev.shared.is_shared(1)
    assert land.counters.commands == 3 and land.counters.private_pages == 1


def test_the_records_the_codec_writes_are_the_ones_the_backend_reads() -> None:
    land, sev = landing()
    land.record(records.SUBTYPE, records.encode(records.PspSession(policy=1, pdh=b"p", session=b"s")))
    land.record(records.SUBTYPE, records.encode(records.PspPage(gpa=0x5000, header=HDR, transport=TRANS)))
    assert sev.calls == [("start", 1, 1, 1), ("page", 0x5000)]


def test_verify_refuses_a_stream_without_session_or_without_every_vmsa() -> None:
    land, _sev = landing(es=True)
    with pytest.raises(StreamError, match="no PSP session"):
        land.verify()
    land.record(ConfidentialSubtype.PSP_PACKET, session())
    land.record(*payload(vmsa_record(0, HDR, TRANS)))
    with pytest.raises(StreamError, match="VMSA of every vCPU"):
        land.verify()
    land.record(*payload(vmsa_record(1, HDR, TRANS)))
    land.verify()


@pytest.mark.parametrize("records, message", [
    ([page_record(0x3000, HDR, TRANS)], "before the PSP session"),
    ([session_record(1, b"p", b"s"), session_record(1, b"p", b"s")], "a second PSP session"),
    ([session_record(1, b"p", b"s"), page_record(0x3001, HDR, TRANS)], "not one whole page"),
    ([session_record(1, b"p", b"s"), page_record(0x3000, HDR, TRANS[:100])], "not one whole page"),
    ([session_record(1, b"p", b"s"), page_record(1 << 40, HDR, TRANS)], "outside guest RAM"),
    ([session_record(1, b"p", b"s"), vmsa_record(0, HDR, TRANS)], "not SEV-ES"),
    ([session_record(1, b"p" * 20_000, b"s")], "PDH of 20000 bytes"),
])
def test_bad_records_are_one_clear_error(records: list[bytes], message: str) -> None:
    land, _sev = landing()
    with pytest.raises(StreamError, match=message):
        for record in records:
            land.record(*payload(record))


@pytest.mark.parametrize("raw, message", [
    (b"", "empty PSP record"),
    (b"\x09", "unknown PSP record kind 9"),
    (b"\x01\x00\x00", "truncated"),
    (b"\x02" + struct.pack(">QI", 0x3000, 52) + HDR + struct.pack(">I", 4096) + TRANS + b"x", "trailing"),
])
def test_malformed_payloads_are_refused(raw: bytes, message: str) -> None:
    land, _sev = landing()
    if raw[:1] == b"\x02":
        land.record(ConfidentialSubtype.PSP_PACKET, session())
    with pytest.raises(StreamError, match=message):
        land.record(ConfidentialSubtype.PSP_PACKET, raw)


def test_a_vmsa_for_an_unknown_or_repeated_vcpu_is_refused() -> None:
    land, _sev = landing(es=True)
    land.record(ConfidentialSubtype.PSP_PACKET, session())
    land.record(*payload(vmsa_record(0, HDR, TRANS)))
    for vcpu in (0, 7):
        with pytest.raises(StreamError, match=f"vCPU {vcpu}"):
            land.record(*payload(vmsa_record(vcpu, HDR, TRANS)))


@pytest.mark.parametrize("value, message", [
    (42, "expected: string"), ("not base64!", "not valid base64"), ("A" * 70_000, "longer than"),
])
def test_sev_certificate_parameters_are_checked(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MigrationParameters().with_parameters({"sev-pdh": value})
    ok = MigrationParameters().with_parameters({"sev-pdh": "AAAA", "sev-amd-cert": ""})
    assert ok.qmp_parameters()["sev-pdh"] == "AAAA"


# --- the source's side ----------------------------------------------------------------------


@dataclass
class FakeSendingSev:
    """The source's SEV guest as the backend drives it; the PSP itself is tested elsewhere."""

    config: FakeConfig = field(default_factory=FakeConfig)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    shared: SharedRegions = field(default_factory=SharedRegions)

    def send_start(self, pdh: bytes, plat: bytes, amd: bytes) -> tuple[int, bytes]:
        self.calls.append(("start",))
        return 1, b"s" * 128

    def capabilities_raw(self) -> tuple[bytes, bytes]:
        return b"p" * 64, b"chain"

    def send_update_data(self, gpa: int) -> tuple[bytes, bytes]:
        self.calls.append(("page", gpa))
        return HDR, TRANS

    def send_update_vmsa(self, vcpu_id: int) -> tuple[bytes, bytes]:
        self.calls.append(("vmsa", vcpu_id))
        return HDR, TRANS

    def send_finish(self) -> None:
        self.calls.append(("finish",))

    def send_cancel(self) -> None:
        self.calls.append(("cancel",))


CERTS = MigrationParameters(sev_pdh="AA==", sev_plat_cert="AA==", sev_amd_cert="AA==")


def sending(es: bool = False) -> tuple[psp.PspOutgoing, FakeSendingSev, FakeChannel, GuestMemory]:
    sev = FakeSendingSev(config=FakeConfig(es=es))
    memory = GuestMemory.pc(16 << 20)
    ch = FakeChannel()
    out = MainChannelSink(ch, StreamWriter("pc-q35-7.2"))
    out.open_stream([(b.idstr, b.size) for b in memory.blocks])
    out.begin_round()
    return psp.PspOutgoing(sev, CERTS, out), sev, ch, memory  # type: ignore[arg-type]


def test_private_pages_go_through_the_psp_shared_and_untouched_ones_as_ram_records() -> None:
    backend, sev, ch, memory = sending()
    block = memory.blocks[0]
    block.pages[[1, 2, 3]] = 0xC5  # ciphertext of pages the guest wrote
    sev.shared.update(2, 1, shared=True)  # page 2 is shared: the host may read it
    backend.setup()
    sent = backend.pages(block, np.array([1, 2, 3, 4], dtype=np.int64))
    assert (sent.normal, sent.zero) == (3, 1)
    assert sev.calls == [("start",), ("page", 0x1000), ("page", 0x3000)]
    out = backend.out
    out.end_part()
    out.begin_final()
    out.end_part()
    out.close_stream([])
    events = stream_events(ch.wire)
    plain = [int(i) for e in events if isinstance(e, dec.RamPages) for i in e.indices]
    zero = [int(i) for e in events if isinstance(e, dec.RamZeroPages) for i in e.indices]
    packets = [records.decode(e.payload) for e in events if isinstance(e, dec.Confidential)]
    assert plain == [2] and zero == [4]
    assert [type(p).__name__ for p in packets] == ["PspSession", "PspPage", "PspPage"]
    assert backend.counters.qmp() == {"backend": "psp", "private-pages": 2, "shared-pages": 1,
                                      "psp-commands": 4}


def test_send_cancel_only_after_send_start_and_only_once() -> None:
    backend, sev, _ch, _memory = sending()
    backend.cancel()
    assert sev.calls == []
    backend.setup()
    backend.cancel()
    backend.cancel()
    assert sev.calls == [("start",), ("cancel",)]


def test_the_final_records_are_every_vmsa_then_the_shared_regions_list() -> None:
    backend, sev, ch, _memory = sending(es=True)
    backend.setup()
    at = len(ch.wire)
    backend.complete([0, 1])
    assert sev.calls[1:] == [("vmsa", 0), ("vmsa", 1)]
    tail = bytes(ch.wire[at:])
    subtypes = []
    while tail:
        subtype, length = struct.unpack_from(">BI", tail, 8)
        subtypes.append(ConfidentialSubtype(subtype))
        tail = tail[13 + length :]
    assert subtypes == [ConfidentialSubtype.PSP_PACKET] * 2 + [ConfidentialSubtype.SHARED_REGIONS]
    backend.finish()
    backend.cancel()  # after SEND_FINISH there is nothing to cancel
    assert sev.calls[-1] == ("finish",)
