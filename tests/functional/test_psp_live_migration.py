"""PSP-based live migration of SEV guests between two emulated hosts (issue 4).

Every private page is re-encrypted by the source's PSP under a transport key
only the two PSPs share; the VMMs and the network see packets. The relay in
the middle records the stream, corrupts it or cuts it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping

import pytest
from relay import Relay

from confmig.bench.firmware import default_bios
from confmig.bench.lab import WORKING_SET_WRITTEN, HostProc, Lab, VmProc
from confmig.bench.scenario import (
    SEV_ES_POLICY,
    SEV_POLICY,
    MigrationSettings,
    configure,
    incoming_uri,
    migrate,
    sev_args,
    sev_target_certificates,
    wait_status,
)
from confmig.owner import DISK_PASSPHRASE_GUID
from confmig.platform.psp.policy import PolicyFlag
from confmig.vmm.qmp.client import QmpCommandError

DIRTY = "dirty,rate=300,wss=2M,prefill=on"
PRIVATE_MAGICS = (b"CMKERN01", b"CMBOOT01", b"CMVARS01")
PSP_PAGE_RECORD = re.compile(re.escape(bytes.fromhex("0000000000000800") + b"\x01") + b"....\x02", re.S)
"""A CONFIDENTIAL record (flag 0x800), subtype PSP_PACKET, kind PAGE."""
PSP_PAGE_HEAD = re.compile(PSP_PAGE_RECORD.pattern + b"(.{8})", re.S)
"""... and its GPA."""
PSP_PAGE_HEAD_SIZE = 13 + 1 + 8
PAGE_RECORD_PACKET = PSP_PAGE_HEAD_SIZE
"""Where the packet (u32 hdr_len, header, u32 trans_len, data) starts in such a record."""
PAGE_PACKET_SIZE = 4 + 52 + 4 + 4096
PAGE_RECORD_TRANS = PAGE_RECORD_PACKET + 4 + 52 + 4
"""Where the transport data starts."""


def sev_pair(lab: Lab, hosts: tuple[HostProc, HostProc], *, guest: str = DIRTY,
             policy: int = SEV_POLICY) -> tuple[VmProc, VmProc]:
    a, b = hosts
    obj = sev_args(policy)
    src = lab.vm("src", a, ram="64M", guest=guest, extra=obj)
    dst = lab.vm("dst", b, ram="64M", guest=guest, incoming="defer", extra=obj)
    src.wait_console(WORKING_SET_WRITTEN)
    return src, dst


def through(lab: Lab, relay_factory: Callable[..., Relay], src: VmProc, dst: VmProc,
            **relay: object) -> tuple[str, Relay]:
    """Start the target listening; return a URI that reaches it through a relay."""
    configure(dst, settings(lab))
    host, port = incoming_uri(dst).removeprefix("tcp:").rsplit(":", 1)
    r = relay_factory((host, int(port)), **relay)  # type: ignore[arg-type]
    src.qmp.execute("migrate-set-parameters", **sev_target_certificates(dst, lab.amd_root))
    return r.uri, r


def settings(lab: Lab) -> MigrationSettings:
    return MigrationSettings(downtime_limit_ms=300, sev_target_certs=True, amd_root=lab.amd_root)


@pytest.mark.parametrize("es", [False, True], ids=["sev", "sev-es"])
def test_a_running_sev_guest_migrates_through_the_psp(lab: Lab, hosts: tuple[HostProc, HostProc],
                                                      es: bool) -> None:
    src, dst = sev_pair(lab, hosts, policy=SEV_ES_POLICY if es else SEV_POLICY)
    result = migrate(src, dst, settings=settings(lab))
    assert result.status == "completed", result.info.get("error-desc")
    c = result.info["x-confmig"]["confidential"]
    assert c["backend"] == "psp" and c["private-pages"] >= 512 and c["shared-pages"] >= 1
    assert c["psp-commands"] >= c["private-pages"]
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")
    assert dst.qmp.execute("query-sev")["state"] == "running"
    assert src.qmp.execute("query-status")["status"] == "postmigrate"
    shared = dst.qmp.execute("x-query-sev-shared-regions")
    assert {"start": 0x1000, "size": 0x1000} in shared  # the list travelled with the guest
    # No fork: the source's PSP says SENT, and the VMM refuses to run the guest a second time.
    assert src.qmp.execute("query-sev")["state"] == "sent"
    with pytest.raises(QmpCommandError, match="its PSP sent it to the target"):
        src.qmp.execute("cont")
    assert src.qmp.execute("query-status")["status"] == "postmigrate"


def test_the_stream_carries_no_plaintext_and_no_key(lab: Lab, hosts: tuple[HostProc, HostProc],
                                                    captured_keys: list[bytes]) -> None:
    a, b = hosts
    passphrase = os.urandom(32)
    verdicts: list[Mapping[str, object]] = []
    owner = lab.owner(firmware=default_bios(), policy=SEV_POLICY,
                      secrets=[(DISK_PASSPHRASE_GUID, passphrase)],
                      audit=verdicts.append)
    obj = sev_args(owner=owner.url)
    src = lab.vm("src", a, ram="64M", guest=DIRTY, extra=obj)
    dst = lab.vm("dst", b, ram="64M", guest=DIRTY, incoming="defer", extra=sev_args())
    src.wait_console(WORKING_SET_WRITTEN)
    assert [v["event"] for v in verdicts] == ["launch", "released"]
    uri, relay = through(lab, Relay, src, dst)
    result = migrate(src, None, uri, settings=settings(lab))
    assert result.status == "completed", result.info.get("error-desc")
    stream = bytes(relay.seen)
    assert len(PSP_PAGE_RECORD.findall(stream)) >= 512
    assert len(captured_keys) == 2  # the launch's TEK and TIK, from the owner
    for canary in (passphrase, *captured_keys, *PRIVATE_MAGICS):
        assert canary not in stream
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


class PageRecordRelay(Relay):
    """Finds the Nth PSP page record it forwards and rewrites part of it (see ``edit``)."""

    NTH = 20

    def __init__(self, target: tuple[str, int]) -> None:
        self.window = bytearray()
        self.window_start = 0
        self.found = 0
        self.last_match = -1
        self.edit_at: int | None = None
        self.edit_bytes = b""
        self.xor = True
        super().__init__(target, tamper=self._tamper)

    def edit(self, record_start: int, gpa: int) -> tuple[int, bytes, bool] | None:
        """(absolute stream offset, bytes, XOR (True) or replace (False)) for the found record;
        None: not this one, try the next."""
        raise NotImplementedError

    def _tamper(self, chunk: bytearray, offset: int) -> None:
        self.window += chunk
        if self.edit_at is None:
            for m in PSP_PAGE_HEAD.finditer(self.window):
                start = self.window_start + m.start()
                if start <= self.last_match:
                    continue  # seen in the previous window's tail
                self.last_match = start
                self.found += 1
                if self.found >= self.NTH:
                    edit = self.edit(start, int.from_bytes(m.group(1), "big"))
                    if edit is not None:
                        self.edit_at, self.edit_bytes, self.xor = edit
                        break
            keep = PSP_PAGE_HEAD_SIZE  # a record head may straddle two chunks
            self.window_start += max(0, len(self.window) - keep)
            self.window = self.window[-keep:]
        if self.edit_at is None:
            return
        for i, b in enumerate(self.edit_bytes):  # the part of the edit inside this chunk
            pos = self.edit_at + i - offset
            if 0 <= pos < len(chunk):
                chunk[pos] = chunk[pos] ^ b if self.xor else b


class TamperingRelay(PageRecordRelay):
    """Flips one bit in the transport data of the Nth PSP page record."""

    def edit(self, record_start: int, gpa: int) -> tuple[int, bytes, bool] | None:
        return record_start + PAGE_RECORD_TRANS + 100, b"\x01", True


class ReplayingRelay(PageRecordRelay):
    """Puts, in place of the Nth PSP page record's packet, the packet an earlier migration
    carried for the same guest page (same GPA, same length: a clean replay)."""

    def __init__(self, target: tuple[str, int], earlier: dict[int, bytes]) -> None:
        self.earlier = earlier
        self.replayed_gpa: int | None = None
        super().__init__(target)

    def edit(self, record_start: int, gpa: int) -> tuple[int, bytes, bool] | None:
        if gpa not in self.earlier:
            return None
        self.replayed_gpa = gpa
        return record_start + PAGE_RECORD_PACKET, self.earlier[gpa], False


def page_packets(stream: bytes) -> dict[int, bytes]:
    """GPA -> packet (u32 hdr_len, header, u32 trans_len, data) of every PSP page record."""
    out = {}
    for m in PSP_PAGE_HEAD.finditer(stream):
        start = m.start() + PAGE_RECORD_PACKET
        out[int.from_bytes(m.group(1), "big")] = stream[start : start + PAGE_PACKET_SIZE]
    return out


def test_a_tampered_packet_is_refused_and_the_source_runs_on(lab: Lab,
                                                             hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = sev_pair(lab, hosts)
    uri, relay = through(lab, TamperingRelay, src, dst)
    result = migrate(src, None, uri, settings=settings(lab))
    assert isinstance(relay, TamperingRelay) and relay.edit_at is not None
    assert result.status == "failed"
    target_error = dst.qmp.execute("query-migrate").get("error-desc", "")
    assert "RECEIVE_UPDATE_DATA" in target_error and "BAD_MEASUREMENT" in target_error
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.qmp.execute("query-sev")["state"] == "running"  # SEND_CANCEL
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_truncated_stream_fails_and_the_source_runs_on(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = sev_pair(lab, hosts)
    uri, _relay = through(lab, Relay, src, dst, cut_after=600_000)
    result = migrate(src, None, uri, settings=settings(lab))
    assert result.status == "failed"
    assert dst.qmp.execute("query-status")["status"] == "inmigrate"  # never ran a half guest
    deadline = time.monotonic() + 30  # the target finds out on its own time
    while dst.qmp.execute("query-migrate").get("status") != "failed":
        assert time.monotonic() < deadline, dst.qmp.execute("query-migrate")
        time.sleep(0.05)
    with pytest.raises(QmpCommandError, match="start a new target"):  # its PSP context is half received
        dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")
    # and the guest can still go elsewhere afterwards
    assert src.qmp.execute("query-sev")["state"] == "running"


def test_a_nosend_guest_is_not_migrated(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = sev_pair(lab, hosts, policy=SEV_POLICY | PolicyFlag.NOSEND)
    result = migrate(src, dst, settings=settings(lab))
    assert result.status == "failed"
    assert "SEND_START" in result.info["error-desc"] and "POLICY_FAILURE" in result.info["error-desc"]
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


def test_migrating_without_the_targets_certificates_is_a_clear_error(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = sev_pair(lab, hosts)
    configure(dst, MigrationSettings())
    with pytest.raises(QmpCommandError, match="sev-pdh"):  # refused before anything starts
        src.qmp.execute("migrate", uri=incoming_uri(dst))
    assert "status" not in src.qmp.execute("query-migrate")
    assert src.qmp.execute("query-status")["status"] == "running"


def test_migrate_cancel_sends_send_cancel_and_the_guest_runs_on(lab: Lab,
                                                                 hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = sev_pair(lab, hosts)
    slow = MigrationSettings(downtime_limit_ms=300, max_bandwidth=400_000, sev_target_certs=True,
                             amd_root=lab.amd_root)
    configure(src, slow)
    configure(dst, slow)
    src.qmp.execute("migrate-set-parameters", **sev_target_certificates(dst, lab.amd_root))
    src.qmp.execute("migrate", uri=incoming_uri(dst))
    deadline = time.monotonic() + 30
    while src.qmp.execute("query-sev")["state"] != "send-update" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert src.qmp.execute("query-sev")["state"] == "send-update"  # SEND_START done, pages flowing
    src.qmp.execute("migrate_cancel")
    while src.qmp.execute("query-migrate")["status"] not in ("cancelled", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert src.qmp.execute("query-migrate")["status"] == "cancelled"
    assert src.qmp.execute("query-sev")["state"] == "running"  # SEND_CANCEL
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_packet_replayed_from_an_earlier_migration_is_refused(lab: Lab,
                                                                hosts: tuple[HostProc, HostProc]) -> None:
    """Migrate A -> B, recording; then B -> A with one page's packet swapped for the one the
    first migration carried for that page. Another session, another TEK/TIK: refused."""
    src, mid = sev_pair(lab, hosts)
    uri, first = through(lab, Relay, src, mid)
    assert migrate(src, None, uri, settings=settings(lab)).status == "completed"
    earlier = page_packets(bytes(first.seen))
    assert len(earlier) >= 512
    back = lab.vm("back", hosts[0], ram="64M", guest=DIRTY, incoming="defer",
                  extra=sev_args())
    uri, relay = through(lab, lambda target: ReplayingRelay(target, earlier), mid, back)
    result = migrate(mid, None, uri, settings=settings(lab))
    assert isinstance(relay, ReplayingRelay) and relay.replayed_gpa is not None
    assert result.status == "failed"
    target_error = back.qmp.execute("query-migrate").get("error-desc", "")
    assert "RECEIVE_UPDATE_DATA" in target_error and "BAD_MEASUREMENT" in target_error
    assert mid.qmp.execute("query-status")["status"] == "running"
    assert mid.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_migrated_sev_guest_migrates_again(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """A -> B -> A: the guest's consent (MSR_KVM_MIGRATION_CONTROL) and its shared-regions list
    travel with it; pages it never touched go as zero pages, not through the PSP."""
    src, mid = sev_pair(lab, hosts)
    first = migrate(src, mid, settings=settings(lab))
    assert first.status == "completed"
    back = lab.vm("back", hosts[0], ram="64M", guest=DIRTY, incoming="defer", extra=sev_args())
    assert mid.qmp.execute("query-migrate").get("blocked-reasons") is None
    second = migrate(mid, back, settings=settings(lab))
    assert second.status == "completed", second.info.get("error-desc")
    c1 = first.info["x-confmig"]["confidential"]
    c2 = second.info["x-confmig"]["confidential"]
    assert c2["private-pages"] < 2 * c1["private-pages"]  # not all 16 K pages of a preallocated target
    assert back.selfcheck().startswith("confmig-selfcheck: PASS")


def test_an_sev_guest_saved_for_a_platform_restores_there(lab: Lab,
                                                          hosts: tuple[HostProc, HostProc]) -> None:
    """Save to a file under the target platform's certificates, restore on that platform:
    the file holds PSP packets, no plaintext of a private page, and decodes as a stream."""
    from confmig.proto.stream.analyze import analyze

    src, dst = sev_pair(lab, hosts)
    configure(src, settings(lab))
    src.qmp.execute("migrate-set-parameters", **sev_target_certificates(dst, lab.amd_root))
    path = lab.root / "saved.mig"
    assert migrate(src, None, f"file:{path}", settings=settings(lab)).status == "completed"
    report = analyze(path)
    assert report["ram"]["confidential"]["psp_packet"] >= 512 + 1  # the pages and the session
    assert report["ram"]["confidential"]["shared_regions"] == 1
    saved = path.read_bytes()
    assert not any(magic in saved for magic in PRIVATE_MAGICS)
    dst.qmp.execute("migrate-incoming", uri=f"file:{path}")
    wait_status(dst, "running")
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


def test_kv_keeps_every_acknowledged_write_across_a_psp_migration(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """The kv guest's table is private (through the PSP), its ring shared (plain records)."""
    from confmig.bench.kv_client import KvClient

    a, b = hosts
    src_sock, dst_sock = str(lab.root / "kv-src.sock"), str(lab.root / "kv-dst.sock")
    src = lab.vm("src", a, ram="64M", guest="kv",
                 extra=[*sev_args(), "-device", f"confmig-kv,path={src_sock}"])
    dst = lab.vm("dst", b, ram="64M", guest="kv", incoming="defer",
                 extra=[*sev_args(), "-device", f"confmig-kv,path={dst_sock}"])
    src.wait_console(re.compile(rb"confmig kernel: workload kv"))
    client = KvClient(src_sock)
    for i in range(300):
        client.put(f"key{i}".encode(), f"value{i}".encode())
    result = migrate(src, dst, settings=settings(lab))
    assert result.status == "completed", result.info.get("error-desc")
    assert result.info["x-confmig"]["confidential"]["shared-pages"] >= 2  # bounce page and ring
    client.reconnect(dst_sock)
    for i in range(300):
        assert client.get(f"key{i}".encode()) == f"value{i}".encode()
    client.put(b"after", b"migration")
    assert client.get(b"after") == b"migration"
    assert "PASS" in dst.selfcheck()
    client.close()
