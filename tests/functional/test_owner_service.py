"""The key broker over real HTTP, in front of a real (emulated) platform.

The broker serves on 127.0.0.1:0 in a thread; the "host" is a PSP on the real
memory-encryption engine, driven through KVM's port with primitive types, as
the host kernel drives it. The host relays only what the VMM would: the
platform's certificates, the owner's blobs, the measurement, the packet.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mee_port import MeePort

from confmig.common.clock import ManualClock
from confmig.common.errors import ConfigError
from confmig.common.units import PAGE_SIZE
from confmig.owner import (
    DISK_PASSPHRASE_GUID,
    AmdRoot,
    KeyBroker,
    OwnerClient,
    OwnerServer,
    RemoteOwnerError,
    VmProfile,
    build_secret_table,
    firmware_digest,
    make_server,
)
from confmig.owner.broker import SESSION_TTL
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.platform.psp import PlatformIdentity, PspMailbox, SecureProcessor
from confmig.platform.psp.mailbox import STATUS
from confmig.proto.keybroker import LaunchResponse, SecretResponse

RAM = 32 * PAGE_SIZE
FIRMWARE = hashlib.sha512(b"owner-service firmware").digest() * (2 * PAGE_SIZE // 64)
FIRMWARE_SPA = PAGE_SIZE
SECRET_SPA = 8 * PAGE_SIZE
DISK_KEY = b"a disk key only the guest may see"
TABLE = build_secret_table([(DISK_PASSPHRASE_GUID, DISK_KEY)])
POLICY = 0x1  # NODBG
ASID = 3


@dataclass
class Host:
    port: PspMailbox
    memory: MeePort

    def capabilities(self) -> tuple[bytes, bytes]:
        status, pdh, chain = self.port.pdh_cert_export()
        assert status == 0
        return pdh, chain

    def firmware_version(self) -> tuple[int, int, int]:
        api_major, api_minor, _state, _flags, build, _guests = STATUS.unpack(self.port.platform_status()[1])
        return api_major, api_minor, build

    def launch_until_measured(
        self, godh: bytes, session: bytes, image: bytes = FIRMWARE
    ) -> tuple[int, bytes]:
        status, handle = self.port.launch_start(0, POLICY, godh, session)
        assert status == 0
        assert self.port.activate(handle, ASID) == 0
        self.memory.raw[FIRMWARE_SPA : FIRMWARE_SPA + len(image)] = image
        assert self.port.launch_update_data(handle, FIRMWARE_SPA, len(image)) == 0
        status, blob = self.port.launch_measure(handle)
        assert status == 0
        return handle, blob


@pytest.fixture(scope="module")
def amd_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("amd-root")


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory, amd_root_dir: Path) -> PlatformIdentity:
    return PlatformIdentity.load_or_create(tmp_path_factory.mktemp("host"), amd_root_dir=amd_root_dir,
                                           amd_key_bits=2048)


@pytest.fixture
def host(identity: PlatformIdentity) -> Iterator[Host]:
    slots = KeySlots()
    memory = MeePort(MemoryEncryptionEngine(slots), RAM)
    port = PspMailbox(SecureProcessor(identity, memory=memory, keys=slots))
    assert port.platform_init(es=False) == 0
    yield Host(port=port, memory=memory)
    os.close(slots.fd)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def server(amd_root_dir: Path, identity: PlatformIdentity, clock: ManualClock) -> Iterator[OwnerServer]:
    profile = VmProfile.build(digest=firmware_digest(FIRMWARE), policy=POLICY,
                              secrets=[(DISK_PASSPHRASE_GUID, DISK_KEY)])
    srv = make_server(KeyBroker(AmdRoot.load(amd_root_dir), {"vm1": profile}, clock=clock), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def client(server: OwnerServer) -> OwnerClient:
    return OwnerClient(server.url, timeout=10)


def _launch(client: OwnerClient, host: Host) -> LaunchResponse:
    pdh, chain = host.capabilities()
    return client.launch(vm="vm1", pdh=pdh, cert_chain=chain, policy=POLICY)


def _measurement(client: OwnerClient, host: Host, session_id: str, blob: bytes) -> SecretResponse:
    major, minor, build = host.firmware_version()
    return client.measurement(session_id, measurement=blob, api_major=major, api_minor=minor, build=build)


def test_an_attested_launch_over_http(client: OwnerClient, host: Host) -> None:
    offer = _launch(client, host)
    handle, blob = host.launch_until_measured(offer.godh, offer.session)
    reply = _measurement(client, host, offer.session_id, blob)
    hdr, trans = reply.secret_header, reply.secret
    assert host.port.launch_secret(handle, hdr, SECRET_SPA, reply.guest_len, trans) == 0
    assert host.port.launch_finish(handle) == 0
    assert DISK_KEY not in host.memory.raw and DISK_KEY not in reply.secret
    assert host.memory.read_encrypted(ASID, SECRET_SPA, len(TABLE)) == TABLE  # what the guest reads
    with pytest.raises(RemoteOwnerError, match="already released") as again:
        _measurement(client, host, offer.session_id, blob)
    assert again.value.status == 409


def test_the_vmms_own_client_speaks_the_same_wire_format(server: OwnerServer, host: Host) -> None:
    from confmig.vmm.sev import OwnerLink  # the VMM's own client (it may not import confmig.owner)

    link = OwnerLink(server.url)
    pdh, chain = host.capabilities()
    offer = link.launch("vm1", pdh, chain, POLICY)
    handle, blob = host.launch_until_measured(offer.godh, offer.session)
    reply = link.measurement(offer.session_id, blob, host.firmware_version())
    hdr, trans = reply.secret_header, reply.secret
    assert host.port.launch_secret(handle, hdr, SECRET_SPA, reply.guest_len, trans) == 0
    assert host.memory.read_encrypted(ASID, SECRET_SPA, len(TABLE)) == TABLE
    with pytest.raises(ConfigError, match=r"guest owner refused: .*already released"):
        link.measurement(offer.session_id, blob, host.firmware_version())


def test_a_wrong_firmware_is_refused_and_the_session_closed(client: OwnerClient, host: Host) -> None:
    offer = _launch(client, host)
    _handle, blob = host.launch_until_measured(offer.godh, offer.session, image=FIRMWARE[::-1])
    with pytest.raises(RemoteOwnerError, match="does not match the expected firmware digest") as refused:
        _measurement(client, host, offer.session_id, blob)
    assert refused.value.status == 403
    with pytest.raises(RemoteOwnerError, match="was refused") as closed:
        _measurement(client, host, offer.session_id, blob)
    assert closed.value.status == 409


def test_bad_certificates_and_policies_get_no_session(client: OwnerClient, host: Host) -> None:
    pdh, chain = host.capabilities()
    bad = bytearray(chain)
    bad[2 * 2084 + 0x414 + 8] ^= 1  # the CEK's signature by the ASK
    with pytest.raises(RemoteOwnerError, match="CEK is not certified") as platform:
        client.launch(vm="vm1", pdh=pdh, cert_chain=bytes(bad), policy=POLICY)
    assert platform.value.status == 403
    with pytest.raises(RemoteOwnerError, match="not the configured policy") as policy:
        client.launch(vm="vm1", pdh=pdh, cert_chain=chain, policy=0)
    assert policy.value.status == 403
    with pytest.raises(RemoteOwnerError, match="no VM 'vm9'") as vm:
        client.launch(vm="vm9", pdh=pdh, cert_chain=chain, policy=POLICY)
    assert vm.value.status == 404


def test_sessions_expire(client: OwnerClient, host: Host, clock: ManualClock) -> None:
    offer = _launch(client, host)
    _handle, blob = host.launch_until_measured(offer.godh, offer.session)
    clock.advance(SESSION_TTL + 1)
    with pytest.raises(RemoteOwnerError, match="expired") as expired:
        _measurement(client, host, offer.session_id, blob)
    assert expired.value.status == 410
    with pytest.raises(RemoteOwnerError, match="no launch session") as unknown:
        _measurement(client, host, "0" * 32, blob)
    assert unknown.value.status == 404


def _raw(server: OwnerServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/v1/launch", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/launch", b"[]", 400, "expected a JSON object"),
        ("POST", "/v1/launch", b'{"vm": "vm1"}', 400, "missing field"),
        ("POST", "/v1/launch", json.dumps({"vm": "vm1", "pdh": "%%", "cert_chain": "", "policy": 1,
                                          "migration_target": False}).encode(),
         400, "pdh: not valid base64"),
        ("POST", "/v1/launch/" + "a" * 32 + "/measurement", b"{}", 400, "missing field"),
        ("POST", "/v1/nothing", b"{}", 404, "no such endpoint"),
        ("GET", "/v1/launch", None, 405, "use POST"),
        ("DELETE", "/v1/launch/" + "a" * 32 + "/measurement", None, 405, "use POST"),
        ("GET", "/", None, 404, "no such endpoint"),
    ],
)
def test_every_failure_is_a_clear_json_error(server: OwnerServer, method: str, path: str, body: bytes | None,
                                             status: int, error: str) -> None:
    got, reply = _raw(server, method, path, body, {"Content-Type": "application/json"})
    assert got == status and error in str(reply["error"])


def test_health_and_bounded_bodies(server: OwnerServer) -> None:
    assert _raw(server, "GET", "/v1/health") == (200, {"status": "ok"})
    reply = _exchange(server, b"POST /v1/launch HTTP/1.0\r\nContent-Length: 100000000\r\n\r\n")
    assert reply.startswith("HTTP/1.0 413") and "exceeds 65536" in reply
    reply = _exchange(server, b"POST /v1/launch HTTP/1.0\r\n\r\n")
    assert reply.startswith("HTTP/1.0 400") and "Content-Length is required" in reply


def _exchange(server: OwnerServer, request: bytes) -> str:
    """Send raw bytes (no body), read the reply until the server closes."""
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_an_unreachable_owner_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(RemoteOwnerError, match="cannot reach") as exc:
        OwnerClient(f"http://127.0.0.1:{port}", timeout=5).launch(vm="vm1", pdh=b"", cert_chain=b"", policy=1)
    assert exc.value.status == 0


def test_owner_serve_command(amd_root_dir: Path, tmp_path: Path) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(FIRMWARE)
    key = tmp_path / "disk.key"
    key.write_bytes(DISK_KEY)
    state = tmp_path / "owner"
    argv = [sys.executable, "-c", "import sys; from confmig.owner.cli import owner; owner(sys.argv[1:])",
            "serve", "--amd-root", str(amd_root_dir), "--firmware", str(fw), "--policy", "0x1",
            "--secret", f"{DISK_PASSPHRASE_GUID}=@{key}", "--secret", f"{uuid.UUID(int=7)}=0011",
            "--listen", "127.0.0.1:0", "--state", str(state)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("confmig owner: serving on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        deadline = time.monotonic() + 10
        while not (state / "url").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (state / "url").read_text().strip() == url
        with urllib.request.urlopen(url + "/v1/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with pytest.raises(RemoteOwnerError, match=r"CEK is not certified|bytes, not"):
            OwnerClient(url).launch(vm="vm1", pdh=bytes(2084), cert_chain=bytes(6252), policy=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        audit = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        assert [r["event"] for r in audit] == ["launch-refused"]
        assert DISK_KEY.hex() not in (state / "audit.jsonl").read_text()
        assert (state / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
