"""The kv device against a hand-driven ring (the guest driver is tested in tests/unit/guest)."""

import queue
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import ProtocolError
from confmig.common.units import MiB
from confmig.platform.cpu import abi
from confmig.proto.kvdev import (
    KV_CONTROL_ENABLE,
    KV_DEVICE_ID,
    KV_HEADER,
    KV_IRQ_VECTOR,
    KV_PORT_BASE,
    KV_PORT_COUNT,
    KV_QUEUE_AVAIL,
    KV_QUEUE_RING,
    KV_QUEUE_USED,
    KV_REG_GPA_HI,
    KV_REG_ID_GPA_LO,
    KV_REG_NOTIFY,
    KV_REG_STATUS_CONTROL,
    KV_RING_SIZE,
    KV_SLOT_KEY,
    KV_SLOT_SIZE,
    KV_SLOT_VALUE,
    KvOp,
    KvStatus,
)
from confmig.vmm.devices.kv import (
    KV_FRAME_MAX,
    FrameDecoder,
    KvDevice,
    KvReply,
    KvRequest,
    MalformedRequest,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)
from confmig.vmm.memory import GuestMemory

QUEUE = 1 * MiB
TIMEOUT = 5.0


def test_device_numbers_match_the_guest_abi() -> None:
    assert (KV_PORT_BASE, KV_PORT_COUNT) == (abi.KV_PORT_BASE, abi.KV_PORT_COUNT)
    assert KV_IRQ_VECTOR == abi.INTERRUPT_VECTOR_KV


# --- wire format -----------------------------------------------------------------------------


def test_request_and_reply_round_trip() -> None:
    req = KvRequest(op=KvOp.PUT, id=0x1234_0000_0001, key=b"k", value=b"v" * 1000)
    assert FrameDecoder().feed(encode_request(req)) == [encode_request(req)[4:]]
    assert parse_request(encode_request(req)[4:]) == req
    rep = KvReply(status=KvStatus.OK, id=7, value=b"xyz")
    assert parse_reply(encode_reply(rep)[4:]) == rep


@given(st.lists(st.binary(max_size=KV_FRAME_MAX), max_size=5), st.data())
def test_frames_decode_the_same_under_any_chunking(
    bodies: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(len(b).to_bytes(4, "little") + b for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder, out, start = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == bodies


def test_oversized_frame_is_refused_before_buffering() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed((KV_FRAME_MAX + 1).to_bytes(4, "little"))


def body(
    op: int, key: bytes, value: bytes = b"", request_id: int = 99, key_len: int | None = None
) -> bytes:
    klen = len(key) if key_len is None else key_len
    return KV_HEADER.pack(op, 0, klen, len(value), request_id) + key + value


@pytest.mark.parametrize(
    "raw",
    [
        body(9, b"k"),  # unknown op
        body(KvOp.PUT, b""),  # empty key
        body(KvOp.PUT, b"k" * 65),  # key too long
        body(KvOp.GET, b"k", b"v"),  # a value on a get
        body(KvOp.PUT, b"k", b"v" * 1025),  # value too long
        body(KvOp.PUT, b"key", key_len=5),  # lengths disagree with the body
    ],
)
def test_malformed_requests_are_refused_with_their_id(raw: bytes) -> None:
    with pytest.raises(MalformedRequest) as info:
        parse_request(raw)
    assert info.value.request_id == 99


def test_short_request_has_no_id() -> None:
    with pytest.raises(MalformedRequest) as info:
        parse_request(b"\x01\x00")
    assert info.value.request_id == 0


# --- the device and a hand-driven ring --------------------------------------------------------


class Ring:
    """Plays the guest: owns the queue in RAM, completes requests with ``answer``."""

    def __init__(self, memory: GuestMemory, dev: KvDevice) -> None:
        self.memory, self.dev, self.used = memory, dev, 0

    def enable(self, gpa: int = QUEUE) -> bool:
        for reg, value in (
            (KV_REG_ID_GPA_LO, gpa & 0xFFFF_FFFF),
            (KV_REG_GPA_HI, gpa >> 32),
            (KV_REG_STATUS_CONTROL, KV_CONTROL_ENABLE),
        ):
            self.dev.io_out(KV_PORT_BASE + reg, value.to_bytes(4, "little"))
        return self.dev.io_in(KV_PORT_BASE + KV_REG_STATUS_CONTROL, 4) == (1).to_bytes(4, "little")

    @property
    def avail(self) -> int:
        return int.from_bytes(self.memory.read(QUEUE + KV_QUEUE_AVAIL, 4), "little")

    def slot(self, index: int) -> int:
        return QUEUE + KV_QUEUE_RING + (index % KV_RING_SIZE) * KV_SLOT_SIZE

    def request(self, index: int) -> KvRequest:
        raw = self.memory.read(self.slot(index), KV_SLOT_SIZE)
        op, _, klen, vlen, rid = KV_HEADER.unpack_from(raw)
        key = raw[KV_SLOT_KEY : KV_SLOT_KEY + klen]
        value = raw[KV_SLOT_VALUE : KV_SLOT_VALUE + vlen]
        return KvRequest(op=KvOp(op), id=rid, key=key, value=value)

    def complete(self, answer: Callable[[KvRequest], tuple[int, bytes, int]], count: int) -> None:
        for index in range(self.used, self.used + count):
            status, value, rid = answer(self.request(index))
            header = KV_HEADER.pack(status, 0, 0, len(value), rid)
            self.memory.write(self.slot(index), header + bytes(64) + value)
        self.used += count
        self.memory.write(QUEUE + KV_QUEUE_USED, self.used.to_bytes(4, "little"))
        self.dev.io_out(KV_PORT_BASE + KV_REG_NOTIFY, b"\0\0\0\0")


def echo(req: KvRequest) -> tuple[int, bytes, int]:
    return KvStatus.OK, req.key, req.id


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()
        self.replies: list[bytes] = []

    def send(self, op: KvOp, key: bytes, value: bytes = b"", request_id: int = 1) -> None:
        self.sock.sendall(encode_request(KvRequest(op=op, id=request_id, key=key, value=value)))

    def reply(self) -> KvReply:
        while not self.replies:
            self.replies += self.decoder.feed(self.sock.recv(65536))
        return parse_reply(self.replies.pop(0))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.pc(16 * MiB)
    yield mem
    mem.close()


@pytest.fixture
def irqs() -> "queue.Queue[int]":
    return queue.Queue()


@pytest.fixture
def dev(memory: GuestMemory, irqs: "queue.Queue[int]", tmp_path: Path) -> Iterator[KvDevice]:
    device = KvDevice(memory, irqs.put, tmp_path / "kv.sock")
    device.start()
    yield device
    device.stop()


def wait_avail(ring: Ring, irqs: "queue.Queue[int]", count: int) -> None:
    while ring.avail != count:
        assert irqs.get(timeout=TIMEOUT) == KV_IRQ_VECTOR


def test_identifies_itself(dev: KvDevice) -> None:
    assert dev.io_in(KV_PORT_BASE + KV_REG_ID_GPA_LO, 4) == KV_DEVICE_ID.to_bytes(4, "little")


def test_request_travels_through_the_ring_and_back(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    assert ring.enable()
    client = Client(tmp_path / "kv.sock")
    client.send(KvOp.PUT, b"key", b"value", request_id=42)
    wait_avail(ring, irqs, 1)
    assert ring.request(0) == KvRequest(op=KvOp.PUT, id=42, key=b"key", value=b"value")
    ring.complete(lambda r: (KvStatus.OK, b"", r.id), 1)
    assert client.reply() == KvReply(status=KvStatus.OK, id=42)


def test_replies_go_to_their_own_clients(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    a, b = Client(tmp_path / "kv.sock"), Client(tmp_path / "kv.sock")
    a.send(KvOp.GET, b"from-a", request_id=1)
    wait_avail(ring, irqs, 1)
    b.send(KvOp.GET, b"from-b", request_id=1)  # same id, different client
    wait_avail(ring, irqs, 2)
    ring.complete(echo, 2)
    assert a.reply().value == b"from-a"
    assert b.reply().value == b"from-b"


def test_malformed_frames_get_an_error_and_never_reach_the_ring(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    client = Client(tmp_path / "kv.sock")
    bad = body(KvOp.GET, b"k", b"surprise", request_id=5)
    client.sock.sendall(len(bad).to_bytes(4, "little") + bad)
    assert client.reply() == KvReply(status=KvStatus.MALFORMED, id=5)
    client.send(KvOp.GET, b"ok", request_id=6)  # the connection still works
    wait_avail(ring, irqs, 1)
    assert ring.request(0).id == 6


def test_oversized_frame_ends_the_connection(dev: KvDevice, tmp_path: Path) -> None:
    client = Client(tmp_path / "kv.sock")
    client.sock.sendall((1 << 30).to_bytes(4, "little"))
    assert client.reply().status == KvStatus.MALFORMED
    assert client.sock.recv(1) == b""


def test_queue_outside_ram_is_refused_and_requests_wait(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    assert not ring.enable(gpa=16 * MiB - 4096)  # runs off the end of RAM
    assert not ring.enable(gpa=QUEUE + 8)  # not page aligned
    client = Client(tmp_path / "kv.sock")
    client.send(KvOp.GET, b"early")
    assert ring.enable()
    wait_avail(ring, irqs, 1)
    ring.complete(echo, 1)
    assert client.reply().value == b"early"


def test_a_full_ring_holds_requests_back_until_a_slot_frees(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    client = Client(tmp_path / "kv.sock")
    for i in range(KV_RING_SIZE + 1):  # pipelined on one connection
        client.send(KvOp.GET, b"k%d" % i, request_id=i)
    wait_avail(ring, irqs, KV_RING_SIZE)
    ring.complete(echo, 1)
    wait_avail(ring, irqs, KV_RING_SIZE + 1)
    assert ring.request(KV_RING_SIZE).id == KV_RING_SIZE  # reused slot 0
    ring.complete(echo, KV_RING_SIZE)
    assert [client.reply().id for _ in range(KV_RING_SIZE + 1)] == list(range(KV_RING_SIZE + 1))


def test_used_index_beyond_avail_is_ignored(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    client = Client(tmp_path / "kv.sock")
    client.send(KvOp.GET, b"k", request_id=3)
    wait_avail(ring, irqs, 1)
    memory.write(QUEUE + KV_QUEUE_USED, (5).to_bytes(4, "little"))
    dev.io_out(KV_PORT_BASE + KV_REG_NOTIFY, b"\0\0\0\0")
    ring.complete(echo, 1)  # a sane index afterwards still works
    assert client.reply() == KvReply(status=KvStatus.OK, id=3, value=b"k")


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: (KvStatus.OK, b"", r.id + 1),  # wrong id
        lambda r: (77, b"", r.id),  # unknown status
        lambda r: (KvStatus.OK, b"x" * 8, r.id),  # a value on a put
    ],
)
def test_bad_completions_become_io_errors(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path,
    answer: Callable[[KvRequest], tuple[int, bytes, int]],
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    client = Client(tmp_path / "kv.sock")
    client.send(KvOp.PUT, b"k", b"v", request_id=8)
    wait_avail(ring, irqs, 1)
    ring.complete(answer, 1)
    assert client.reply() == KvReply(status=KvStatus.IO_ERROR, id=8)


def test_migrated_device_drops_orphans_and_serves_new_requests(
    memory: GuestMemory, dev: KvDevice, irqs: "queue.Queue[int]", tmp_path: Path
) -> None:
    ring = Ring(memory, dev)
    ring.enable()
    client = Client(tmp_path / "kv.sock")
    client.send(KvOp.GET, b"in-flight", request_id=1)
    wait_avail(ring, irqs, 1)
    dev.stop()
    assert client.sock.recv(1) == b""  # clients are dropped
    assert not (tmp_path / "kv.sock").exists()
    state = dev.save_state()

    target = KvDevice(memory, irqs.put, tmp_path / "target.sock")
    target.load_state(state)
    target.start()
    try:
        ring.dev = target
        ring.complete(echo, 1)  # the orphan: nobody to answer
        client = Client(tmp_path / "target.sock")
        client.send(KvOp.GET, b"after", request_id=2)
        wait_avail(ring, irqs, 2)
        assert ring.request(1).key == b"after"
        ring.complete(echo, 1)
        assert client.reply() == KvReply(status=KvStatus.OK, id=2, value=b"after")
    finally:
        target.stop()


def test_load_state_refuses_garbage(memory: GuestMemory, tmp_path: Path) -> None:
    dev = KvDevice(memory, lambda _: None, tmp_path / "kv.sock")
    with pytest.raises(ProtocolError):
        dev.load_state(b"\0" * 3)
    outside = struct.pack("<Q?QII", 0, True, 1 << 40, 0, 0)
    with pytest.raises(ProtocolError):
        dev.load_state(outside)
