"""The serving processes under hostile input: a host's ioctl socket, a VMM's QMP server, the
guest owner's HTTP service. Each runs as a real process; the test sends it many hostile
sessions, then checks that it still serves, and that its descriptors, threads and resident
memory came back to what they were (``/proc/<pid>``). Then the per-connection limits: what one
client may hold of a process that serves others, each refused with a clear error.

The hostile input is drawn from a seeded RNG (``make fuzz``: a fresh seed, printed on failure).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from hostile import FUZZ, open_fds, rounds, rss, settled, threads

from confmig.bench.lab import HostProc, Lab, VmProc
from confmig.common.errors import KvmError
from confmig.common.units import GiB, KiB, MiB
from confmig.kvm import channel
from confmig.kvm.client import Kvm
from confmig.kvm.host import MAX_OPEN_MEMORY, MAX_REQUEST_PAYLOAD, MAX_VM_MEMORY, MAX_VMS_PER_OPEN
from confmig.proto import ioctl
from confmig.vmm.qmp.server import MAX_CLIENTS

pytestmark = pytest.mark.fuzz

SEED = random.randrange(2**32) if FUZZ else 20261207
RSS_SLACK = 24 * MiB
"""Resident growth allowed after the hostile rounds: allocator caches and lazily imported code,
not a leak (a leak of a connection's buffers would grow with the rounds)."""
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def host(lab: Lab) -> HostProc:
    return lab.host("fuzzhost")


@pytest.fixture
def rng() -> random.Random:
    print(f"hostile input seed: {SEED}")
    return random.Random(SEED)


def measure(pid: int) -> tuple[int, int, int]:
    return open_fds(pid), threads(pid), rss(pid)


def assert_nothing_leaked(pid: int, before: tuple[int, int, int]) -> None:
    fds, nthreads, resident = before
    assert settled(lambda: open_fds(pid), fds) <= fds, "descriptors leaked"
    assert settled(lambda: threads(pid), nthreads) <= nthreads, "threads leaked"
    grown = rss(pid) - resident
    assert grown < RSS_SLACK, f"resident memory grew by {grown >> 20} MiB"


# --- the host's ioctl socket ------------------------------------------------------------------

SYSTEM_REQUESTS = [ioctl.KVM_GET_API_VERSION, ioctl.KVM_CHECK_EXTENSION, ioctl.KVM_GET_VCPU_MMAP_SIZE,
                   ioctl.KVM_CREATE_VM, 0xC010_5300]  # the last: SEV_ISSUE_CMD
VM_REQUESTS = [ioctl.KVM_SET_USER_MEMORY_REGION, ioctl.KVM_GET_DIRTY_LOG, ioctl.KVM_CLEAR_DIRTY_LOG,
               ioctl.KVM_ENABLE_CAP, ioctl.KVM_CHECK_EXTENSION, ioctl.KVM_MEMORY_ENCRYPT_OP,
               ioctl.KVM_X86_SET_MSR_FILTER, ioctl.KVM_CREATE_VCPU]


def hostile_payload(rng: random.Random, request: int) -> bytes:
    if request == ioctl.KVM_CREATE_VCPU:
        return struct.pack("<Q", rng.choice([32, 33, 2**64 - 1]))  # never a vCPU: no process spawned
    if request == ioctl.KVM_CREATE_VM and rng.random() < 0.7:
        return struct.pack("<Q", rng.choice([1, 2**63]))  # a VM type we do not make
    if request == ioctl.KVM_SET_USER_MEMORY_REGION and rng.random() < 0.7:
        return ioctl.UserspaceMemoryRegion(
            slot=rng.choice([0, 1, 31, 32, 2**32 - 1]), flags=rng.choice([0, 1, 2, 4]),
            guest_phys_addr=rng.choice([0, 4096, 1, 2**64 - 4096]),
            memory_size=rng.choice([0, 4096, 64 * KiB, 1 << 40, 4095]),
            offset=rng.choice([0, 4096, 2**63])).encode()
    if request == ioctl.KVM_ENABLE_CAP and rng.random() < 0.7:
        return ioctl.EnableCap(cap=rng.choice([*sorted(ioctl.CAP_NAMES), 0, 2**32 - 1]),
                               flags=rng.choice([0, 1]), args=(rng.randrange(2**64), 0, 0, 0)).encode()
    if request == ioctl.KVM_MEMORY_ENCRYPT_OP:
        # struct kvm_sev_cmd (id, pad, data, error, sev_fd) then any bytes: every SEV command id
        return struct.pack("<IIQII", rng.randrange(32), 0, 0, 0, 0) + rng.randbytes(rng.randrange(0, 200))
    return rng.randbytes(rng.choice([0, 4, 8, 16, 32, 104, rng.randrange(300)]))


def hostile_frame(rng: random.Random, requests: list[int]) -> tuple[bytes, int]:
    request = rng.choice(requests) if rng.random() < 0.9 else rng.randrange(2**32)
    payload = hostile_payload(rng, request)
    nfds = rng.choice([0, 0, 0, 1, 2, 5])
    length = len(payload) if rng.random() < 0.9 else rng.choice([0, len(payload) + 9, 2**32 - 1])
    return struct.pack("<IIII", length, request, rng.randrange(2**32), nfds) + payload, nfds


def send_hostile(sock: socket.socket, rng: random.Random, requests: list[int], frames: int) -> None:
    """Send frames, with memfds or /dev/null riding along; read what comes back, and hang up."""
    for _ in range(frames):
        data, nfds = hostile_frame(rng, requests)
        fds = [os.memfd_create("fuzz", os.MFD_CLOEXEC) if rng.random() < 0.5
               else os.open(os.devnull, os.O_RDWR) for _ in range(rng.randrange(nfds + 1))]
        for fd in fds:
            if rng.random() < 0.5:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, rng.choice([4096, 64 * KiB]))
        try:
            if fds:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))
                sock.sendmsg([data[:1]], [rights])
                sock.sendall(data[1:])
            else:
                sock.sendall(data)
            drain_replies(sock)
        except OSError:
            return  # the host dropped us: that is its right
        finally:
            for fd in fds:
                os.close(fd)


def drain_replies(sock: socket.socket, wait: float = 0.02) -> None:
    """Read whatever answers arrive within ``wait`` (recv(): descriptors in them are dropped)."""
    while select.select([sock], [], [], wait)[0]:
        if not sock.recv(65536):
            return


def test_the_host_keeps_serving_and_leaks_nothing(host: HostProc, rng: random.Random) -> None:
    pid = host.proc.pid
    warm = Kvm(host.socket)
    warm.create_vm().close()
    warm.close()
    before = measure(pid)
    for _ in range(rounds(40)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(host.socket)
            if rng.random() < 0.5:  # a VM fd to attack, from a well-formed KVM_CREATE_VM
                kvm = Kvm(host.socket)
                with contextlib.closing(kvm), contextlib.closing(kvm.create_vm()) as vm:
                    vm.sock.settimeout(TIMEOUT)
                    send_hostile(vm.sock, rng, VM_REQUESTS, rng.randrange(1, 12))
            send_hostile(sock, rng, SYSTEM_REQUESTS, rng.randrange(1, 8))
    assert host.proc.poll() is None, "the host died"
    kvm = Kvm(host.socket)  # still serving: a VM with memory, as a VMM makes one
    with contextlib.closing(kvm), contextlib.closing(kvm.create_vm()) as vm:
        fd = os.memfd_create("ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, MiB)
        ram = ioctl.UserspaceMemoryRegion(slot=0, flags=ioctl.KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0,
                                          memory_size=MiB, offset=0)
        vm.set_user_memory_region(ram, fd)
        os.close(fd)
        assert not vm.get_dirty_log(0, MiB // 4096).any()
    assert_nothing_leaked(pid, before)


def test_an_oversized_request_is_refused_e2big_and_the_connection_goes_on(host: HostProc) -> None:
    kvm = Kvm(host.socket)
    with contextlib.closing(kvm):
        channel.send_request(kvm.sock, ioctl.Request(ioctl.KVM_CHECK_EXTENSION, 41,
                                                     bytes(MAX_REQUEST_PAYLOAD + 1)))
        reply, _ = channel.recv_reply(kvm.sock)
        assert (reply.seq, reply.result) == (41, -errno.E2BIG)
        assert kvm.check_extension(ioctl.KVM_CAP_USER_MEMORY) == 1  # the same connection serves on


def test_one_open_dev_kvm_holds_a_bounded_number_of_vms(host: HostProc) -> None:
    kvm = Kvm(host.socket)
    with contextlib.closing(kvm):
        vms = [kvm.create_vm() for _ in range(MAX_VMS_PER_OPEN)]
        with pytest.raises(KvmError) as refused:
            kvm.create_vm()
        assert refused.value.errno == errno.EMFILE and "KVM_CREATE_VM" in str(refused.value)
        other = Kvm(host.socket)  # another VMM's connection is not affected
        other.create_vm().close()
        other.close()
        vms.pop().close()  # a VM closed frees its place
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                vms.append(kvm.create_vm())
                break
            except KvmError:  # the host tears the closed VM down a moment later
                assert time.monotonic() < deadline, "a closed VM never freed its place"
                time.sleep(0.05)
        for vm in vms:
            vm.close()


def sparse_memfd(size: int) -> int:
    """Guest RAM of ``size`` bytes that costs nothing until it is touched."""
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def region(slot: int, gpa: int, size: int) -> ioctl.UserspaceMemoryRegion:
    return ioctl.UserspaceMemoryRegion(slot=slot, flags=0, guest_phys_addr=gpa, memory_size=size, offset=0)


def test_guest_memory_is_bounded_per_vm_and_per_open_dev_kvm(host: HostProc) -> None:
    kvm = Kvm(host.socket)
    fd = sparse_memfd(MAX_VM_MEMORY)
    try:
        with contextlib.closing(kvm):
            first = kvm.create_vm()
            first.set_user_memory_region(region(0, 0, MAX_VM_MEMORY), fd)
            with pytest.raises(KvmError) as per_vm:
                first.set_user_memory_region(region(1, MAX_VM_MEMORY, 4096), fd)
            assert per_vm.value.errno == errno.ENOMEM
            vms = [first]
            while sum(1 for _ in vms) * MAX_VM_MEMORY < MAX_OPEN_MEMORY:
                vms.append(kvm.create_vm())
                vms[-1].set_user_memory_region(region(0, 0, MAX_VM_MEMORY), fd)
            last = kvm.create_vm()
            with pytest.raises(KvmError) as per_open:
                last.set_user_memory_region(region(0, 0, 4096), fd)
            assert per_open.value.errno == errno.ENOMEM
            vms[0].set_user_memory_region(region(0, 0, 0), None)  # a slot deleted frees its memory
            last.set_user_memory_region(region(0, 0, 4096), fd)
            for vm in [*vms, last]:
                vm.close()
    finally:
        os.close(fd)
    assert MAX_OPEN_MEMORY >= 2 * MAX_VM_MEMORY >= 2 * 8 * GiB  # a guest and its mirror VM


# --- a VMM's QMP server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vm(lab: Lab, host: HostProc) -> VmProc:
    return lab.vm("fuzzvm", host, ram="64M", guest="idle")


SAFE_COMMANDS = ["query-status", "query-version", "query-commands", "query-name", "query-kvm",
                 "query-migrate", "query-migrate-parameters", "query-cpus-fast", "qmp_capabilities",
                 "no-such-command", "", "x" * 300]
"""Commands a hostile client may run with any arguments: none changes the VM (no ``quit``,
``stop``, ``migrate``: those with valid arguments would do what they say)."""
QMP_GARBAGE = [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b",", b":", b"\x00", b"\n", b"\xff", b"-", b"1e",
               b"tru", b'{"execute":', b'"\\u', b"\xc3", b"[" * 1100, b'{"exec-oob": "query-status"}']


def hostile_qmp(rng: random.Random) -> bytes:
    pieces = []
    if rng.random() < 0.7:
        pieces.append(b'{"execute": "qmp_capabilities"}')
    for _ in range(rng.randrange(1, 10)):
        roll = rng.random()
        if roll < 0.4:
            msg: dict[str, object] = {"execute": rng.choice(SAFE_COMMANDS)}
            if rng.random() < 0.6:
                msg["arguments"] = rng.choice([{"bogus": 1}, {"enable": ["oob", 5]}, [], "x", {"enable": []}])
            if rng.random() < 0.5:
                msg["id"] = rng.choice([1, None, "a" * 100, [[[]]], {"x": 1.5}])
            pieces.append(json.dumps(msg).encode())
        elif roll < 0.8:
            pieces.append(rng.choice(QMP_GARBAGE))
        else:
            pieces.append(rng.randbytes(rng.randrange(1, 40)))
    return b"".join(pieces)


def qmp_session(path: str, data: bytes, *, read_replies: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        assert sock.recv(65536).startswith(b'{"QMP":')
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if read_replies:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass


def test_the_qmp_server_keeps_serving_and_leaks_nothing(vm: VmProc, rng: random.Random) -> None:
    pid = vm.proc.pid
    # Warm-up, the largest first: a message past the size limit (the allocator keeps what it
    # grew to for it; a leak would grow with the rounds after it).
    huge = b'{"execute": "query-status", "arguments": {"s": "' + b"a" * (17 * MiB) + b'"}}'
    qmp_session(vm.qmp_path, huge + b'{"execute": "qmp_capabilities"}', read_replies=True)
    qmp_session(vm.qmp_path, hostile_qmp(rng), read_replies=True)
    before = measure(pid)
    for _ in range(rounds(60)):
        qmp_session(vm.qmp_path, hostile_qmp(rng), read_replies=rng.random() < 0.7)
    assert vm.proc.poll() is None, "the VMM died"
    assert vm.qmp.execute("query-status")["status"] == "running"
    assert_nothing_leaked(pid, before)


def test_the_qmp_server_serves_a_bounded_number_of_clients(vm: VmProc) -> None:
    held = []
    try:
        for _ in range(MAX_CLIENTS - 1):  # the lab's own client is connected too
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(vm.qmp_path)
            assert sock.recv(65536).startswith(b'{"QMP":')
            held.append(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(TIMEOUT)
            extra.connect(vm.qmp_path)
            line = extra.recv(65536)
            assert json.loads(line) == {"error": {"class": "GenericError", "desc":
                                                  f"Too many QMP clients (at most {MAX_CLIENTS} at once)"}}
            assert extra.recv(1) == b""  # and disconnected
        assert vm.qmp.execute("query-status")["status"] == "running"  # the others go on
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + TIMEOUT
    while True:  # once they left, a new client is served
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as again:
            again.settimeout(TIMEOUT)
            again.connect(vm.qmp_path)
            if again.recv(65536).startswith(b'{"QMP":'):
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- the guest owner's HTTP service -----------------------------------------------------------


@pytest.fixture(scope="module")
def owner(lab: Lab, host: HostProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """``confmig owner serve`` as its own process (the host made the AMD root it trusts)."""
    tmp = tmp_path_factory.mktemp("owner")
    fw = tmp / "fw.bin"
    fw.write_bytes(bytes(8192))
    argv = [sys.executable, "-c", "import sys; from confmig.owner.cli import owner; owner(sys.argv[1:])",
            "serve", "--amd-root", str(lab.amd_root), "--firmware", str(fw), "--policy", "0x1",
            "--secret", f"{uuid.UUID(int=7)}=0011", "--listen", "127.0.0.1:0", "--state", str(tmp / "state")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield proc.pid, match.group(0)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http(url: str, request: bytes, *, read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)  # a body shorter than announced ends here, not at a timeout
        if not read:
            return b""
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


BODIES = [b"{not json", b"[]", b"{}", b'{"vm": "vm1"}', b'{"vm": 1, "vm": 2}', b"[" * 100_000,
          json.dumps({"vm": "vm1", "pdh": "A" * 2780, "cert_chain": "%%", "policy": 2**40,
                      "migration_target": "yes"}).encode(),
          json.dumps({"measurement": "AA==", "api_major": -1, "api_minor": 1.5, "build": None}).encode()]
PATHS = ["/v1/launch", "/v1/launch/" + "a" * 32 + "/measurement", "/v1/health", "/", "/v1/launch/../x",
         "/" + "x" * 5000, "*"]


def hostile_http(rng: random.Random) -> bytes:
    method = rng.choice([b"POST", b"GET", b"PUT", b"DELETE", b"BREW", b"POST"])
    path = rng.choice(PATHS).encode()
    body = rng.choice(BODIES) if rng.random() < 0.8 else rng.randbytes(rng.randrange(200))
    length = rng.choice([str(len(body)), str(len(body)), "", "-1", "²", "9" * 5000, "0x10", "100000000",
                         str(len(body) + 5)])
    head = b"%s %s HTTP/1.%d\r\n" % (method, path, rng.randrange(2))
    headers = b"Content-Length: %s\r\n" % length.encode() if length else b""
    if rng.random() < 0.2:
        headers += b"X-Junk: " + b"j" * rng.choice([10, 70_000]) + b"\r\n"
    request = head + headers + b"\r\n" + body
    return request[: rng.randrange(len(request) + 1)] if rng.random() < 0.2 else request


def test_the_owner_service_keeps_serving_and_leaks_nothing(owner: tuple[int, str],
                                                           rng: random.Random) -> None:
    pid, url = owner
    http(url, b"GET /v1/health HTTP/1.0\r\n\r\n")
    before = measure(pid)
    for _ in range(rounds(60)):
        reply = http(url, hostile_http(rng), read=rng.random() < 0.8)
        assert not reply.startswith(b"HTTP/1.0 500"), reply[:300]
    reply = http(url, b"GET /v1/health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b'{"status": "ok"}'), reply
    assert_nothing_leaked(pid, before)


@pytest.mark.parametrize(("length", "status"),
                         [("9" * 5000, b"413"), ("²", b"400"), ("0" * 30 + "12", b"400")])
def test_a_content_length_that_is_not_a_small_ascii_number_is_a_client_error(
    owner: tuple[int, str], length: str, status: bytes,
) -> None:
    """Found by the property above: '²' passed ``str.isdigit`` and 5000 digits passed it too,
    then ``int()`` raised, and the service answered 500 (an internal error) to a bad request."""
    _pid, url = owner
    request = b"POST /v1/launch HTTP/1.0\r\nContent-Length: " + length.encode("latin-1") + b"\r\n\r\n{}"
    reply = http(url, request)
    assert reply.startswith(b"HTTP/1.0 " + status), reply[:300]
