"""Migration Handler live migration of SEV guests between two emulated hosts (issue 11).

Both guests are launched and attested by their owner, who gives both the same
transport key; the target's firmware runs only its Migration Handler. Private
pages travel as records sealed by the source's MH and opened by the target's;
the VMMs see GPAs and ciphertext. The relay in the middle records, corrupts or
cuts the stream.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kv_load import KvLoad
from procmem import process_memory
from relay import Relay

from confmig.bench.lab import WORKING_SET_WRITTEN, HostProc, Lab, VmProc, VmSpec
from confmig.bench.scenario import (
    SEV_ES_POLICY,
    SEV_POLICY,
    MigrationSettings,
    configure,
    incoming_uri,
    mh_guest_args,
    mh_target_challenge,
    migrate,
    wait_status,
)
from confmig.common.units import PAGE_SIZE, MiB
from confmig.guest.layout import MH_AREA_SIZE
from confmig.proto import mailbox as mb
from confmig.vmm.qmp.client import QmpCommandError

DIRTY = "dirty,rate=300,wss=2M,prefill=on"
PRIVATE_MAGICS = (b"CMKERN01", b"CMBOOT01", b"CMVARS01")
MH_PAGE_RECORD = re.compile(re.escape(bytes.fromhex("0000000000000800") + b"\x03") + b"....\x02\x01\x01\x00",
                            re.S)
"""A CONFIDENTIAL record (flag 0x800), subtype MH_RECORD, a sealed record of kind PAGES."""
RECORD_PAYLOAD = 8 + 1 + 4
"""Where the sealed record starts in such a stream record."""
TARGET_WAITING = re.compile(rb"Waiting for incoming confidential migration")


def mh_pair(lab: Lab, hosts: tuple[HostProc, HostProc], *, guest: str = DIRTY, mh_vcpus: int = 1,
            key: bytes | None = None, policy: int = SEV_POLICY) -> tuple[VmProc, VmProc]:
    """A running SEV guest (SEV-ES with :data:`SEV_ES_POLICY`) with MH vCPUs on hostA; on hostB
    its target, launched by the same owner and running only its Migration Handler."""
    a, b = hosts
    source, target = mh_guest_args(lab, mh_vcpus, key=key, policy=policy)
    src, dst = lab.start_vms(VmSpec(name="src", host=a, ram="64M", guest=guest, extra=source),
                             VmSpec(name="dst", host=b, ram="64M", guest=guest, extra=target))
    src.wait_console(WORKING_SET_WRITTEN)
    dst.wait_console(TARGET_WAITING)
    return src, dst


def two_targets(lab: Lab, hosts: tuple[HostProc, HostProc], *names: str) -> tuple[VmProc, VmProc, VmProc]:
    """A running source and two attested MH targets of it, launched by one owner (one key)."""
    a, b = hosts
    source, target = mh_guest_args(lab)
    src, t1, t2 = lab.start_vms(
        VmSpec(name="src", host=a, ram="64M", guest=DIRTY, extra=source),
        *(VmSpec(name=n, host=b, ram="64M", guest=DIRTY, extra=target) for n in names))
    src.wait_console(WORKING_SET_WRITTEN)
    for t in (t1, t2):
        t.wait_console(TARGET_WAITING)
    return src, t1, t2


SETTINGS = MigrationSettings(downtime_limit_ms=300, confidential_backend="mh")


def through(relay_factory: Callable[..., Relay], src: VmProc, dst: VmProc,
            **relay: object) -> tuple[str, Relay]:
    """Start the target listening; return a URI that reaches it through a relay."""
    configure(dst, SETTINGS)
    host, port = incoming_uri(dst).removeprefix("tcp:").rsplit(":", 1)
    src.qmp.execute("migrate-set-parameters", **mh_target_challenge(dst))
    r = relay_factory((host, int(port)), **relay)
    return r.uri, r


@pytest.mark.parametrize("mh_vcpus", [1, 2])
def test_a_running_sev_guest_migrates_through_its_migration_handler(
        lab: Lab, hosts: tuple[HostProc, HostProc], mh_vcpus: int) -> None:
    src, dst = mh_pair(lab, hosts, mh_vcpus=mh_vcpus)
    result = migrate(src, dst, settings=SETTINGS)
    assert result.status == "completed", result.info.get("error-desc")
    c = result.info["x-confmig"]["confidential"]
    assert c["backend"] == "mh" and c["mh-vcpus"] == mh_vcpus
    # all of RAM but the MH's area and shared pages
    assert c["private-pages"] >= 64 * 256 - MH_AREA_SIZE // PAGE_SIZE - 16
    assert c["batches"] >= c["private-pages"] // mb.BATCH_PAGES and c["shared-pages"] >= 1
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_running_sev_es_guest_migrates_its_vcpu_state_through_the_mh(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """SEV-ES: neither VMM can read or set the guest's registers. Its vCPUs save them into
    private memory when the MH asks (PARK), FINISH seals them with the completion record, the
    target's MH installs them and its firmware continues there."""
    src, dst = mh_pair(lab, hosts, policy=SEV_ES_POLICY)
    assert src.qmp.execute("query-sev")["sev-type"] == "sev-es"
    result = migrate(src, dst, settings=SETTINGS)
    assert result.status == "completed", result.info.get("error-desc")
    assert result.info["x-confmig"]["confidential"]["backend"] == "mh"
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")
    assert src.qmp.execute("query-status")["status"] == "postmigrate"


def test_the_source_refuses_to_run_again_after_its_guest_left(lab: Lab,
                                                             hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = mh_pair(lab, hosts)
    assert migrate(src, dst, settings=SETTINGS).status == "completed"
    with pytest.raises(QmpCommandError, match="migrated away"):
        src.qmp.execute("cont")
    assert src.qmp.execute("query-status")["status"] == "postmigrate"
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


def test_the_rfcs_qmp_commands_start_the_handler_and_the_incoming_side(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = mh_pair(lab, hosts)
    configure(dst, SETTINGS)
    configure(src, SETTINGS)
    dst.qmp.execute("start-migration-handler")
    src.qmp.execute("start-migration-handler")
    dst.qmp.execute("start-migrate-incoming", uri="tcp:127.0.0.1:0")
    assert dst.qmp.execute("query-status")["status"] == "inmigrate"
    a = dst.qmp.execute("query-migrate")["socket-address"][0]
    src.qmp.execute("migrate-set-parameters", **mh_target_challenge(dst))
    result = migrate(src, None, f"tcp:{a['host']}:{a['port']}", settings=SETTINGS)
    assert result.status == "completed", result.info.get("error-desc")
    wait_status(dst, "running")
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


def test_no_plaintext_and_no_key_in_the_stream_the_vmms_or_their_files(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    key = os.urandom(32)
    src, dst = mh_pair(lab, hosts, key=key)
    uri, relay = through(Relay, src, dst)
    result = migrate(src, None, uri, settings=SETTINGS)
    assert result.status == "completed", result.info.get("error-desc")
    stream = bytes(relay.seen)
    records = list(MH_PAGE_RECORD.finditer(stream))
    assert len(records) >= (64 * MiB - MH_AREA_SIZE) // (mb.BATCH_PAGES * PAGE_SIZE)
    # The key the records are sealed under: HKDF of the owner's key with the migration id,
    # which every record header names (as the MH derives it).
    migration_id = mb.RecordHeader(*mb.RECORD_HEADER.unpack_from(
        stream, records[0].start() + RECORD_PAYLOAD)).migration_id
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id,
                   info=mb.TRANSPORT_KDF_INFO).derive(key)
    canaries = (key, derived, *PRIVATE_MAGICS)
    for canary in canaries:
        assert canary not in stream
    wait_status(dst, "running")
    for vm in (src, dst):  # both VMMs, guest RAM and mailboxes included
        for region in process_memory(vm.proc.pid):
            for canary in canaries:
                assert canary not in region, f"{vm.name}'s VMM holds {canary[:8]!r}"
    for path in lab.root.rglob("*"):  # what the VMMs and hosts wrote: consoles, logs, sockets
        if path.is_file() and not path.is_relative_to(lab.amd_root):
            data = path.read_bytes()
            assert key not in data and derived not in data, f"{path.name} holds a transport key"
    assert dst.selfcheck().startswith("confmig-selfcheck: PASS")


class RecordTamper(Relay):
    """Changes the Nth MH page record it forwards: ``edit`` says how."""

    NTH = 30

    def __init__(self, target: tuple[str, int]) -> None:
        self.window = bytearray()
        self.window_start = 0
        self.found = 0
        self.last = -1
        self.edit_at: int | None = None
        self.edit_bytes = b""
        super().__init__(target, tamper=self._tamper)

    def edit(self, record: int) -> tuple[int, bytes]:
        """(absolute offset, bytes XORed in there) for the record starting at ``record``."""
        raise NotImplementedError

    def _tamper(self, chunk: bytearray, offset: int) -> None:
        if self.edit_at is None:
            self.window += chunk
            for m in MH_PAGE_RECORD.finditer(self.window):
                start = self.window_start + m.start()
                if start <= self.last:
                    continue
                self.last = start
                self.found += 1
                if self.found == self.NTH:
                    self.edit_at, self.edit_bytes = self.edit(start + RECORD_PAYLOAD)
                    break
            keep = 32
            self.window_start += max(0, len(self.window) - keep)
            self.window = self.window[-keep:]
        if self.edit_at is None:
            return
        for i, b in enumerate(self.edit_bytes):
            pos = self.edit_at + i - offset
            if 0 <= pos < len(chunk):
                chunk[pos] ^= b


class FlipCiphertext(RecordTamper):
    def edit(self, record: int) -> tuple[int, bytes]:
        return record + 56 + 8 * 128 + 100, b"\x01"  # inside the first page's ciphertext


class FlipSequence(RecordTamper):
    def edit(self, record: int) -> tuple[int, bytes]:
        return record + 8, b"\x01"  # the sequence number: a reordered record


class FlipGpa(RecordTamper):
    def edit(self, record: int) -> tuple[int, bytes]:
        return record + 56 + 1, b"\x10"  # the first GPA, 4 KiB further: a swapped page


@pytest.mark.parametrize("tamper", [FlipCiphertext, FlipSequence, FlipGpa], ids=["ciphertext", "seq", "gpa"])
def test_a_tampered_record_is_refused_and_the_source_runs_on(
        lab: Lab, hosts: tuple[HostProc, HostProc], tamper: type[RecordTamper]) -> None:
    src, dst = mh_pair(lab, hosts)
    uri, relay = through(tamper, src, dst)
    result = migrate(src, None, uri, settings=SETTINGS)
    assert isinstance(relay, RecordTamper) and relay.edit_at is not None
    assert result.status == "failed"
    target_error = dst.qmp.execute("query-migrate").get("error-desc", "")
    assert "Migration Handler refused" in target_error and "AUTH_ERR" in target_error
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_truncated_stream_fails_and_the_source_runs_on(lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, dst = mh_pair(lab, hosts)
    uri, _relay = through(Relay, src, dst, cut_after=3_000_000)
    result = migrate(src, None, uri, settings=SETTINGS)
    assert result.status == "failed"
    assert src.qmp.execute("query-status")["status"] == "running"
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


@pytest.mark.parametrize("policy", [SEV_POLICY, SEV_ES_POLICY], ids=["sev", "sev-es"])
def test_kv_keeps_every_acknowledged_write_across_an_mh_migration(
        lab: Lab, hosts: tuple[HostProc, HostProc], policy: int) -> None:
    """A client writes all along: its table is private (sealed by the MH), its ring shared."""
    a, b = hosts
    source, target = mh_guest_args(lab, policy=policy)
    src_sock, dst_sock = str(lab.root / "kv-src.sock"), str(lab.root / "kv-dst.sock")
    src, dst = lab.start_vms(
        VmSpec(name="src", host=a, ram="64M", guest="kv",
               extra=(*source, "-device", f"confmig-kv,path={src_sock}")),
        VmSpec(name="dst", host=b, ram="64M", guest="kv",
               extra=(*target, "-device", f"confmig-kv,path={dst_sock}")))
    src.wait_console(re.compile(rb"confmig kernel: workload kv"))
    dst.wait_console(TARGET_WAITING)
    assert not os.path.exists(dst_sock)  # the target serves nobody before its guest arrives
    load = KvLoad(src_sock, dst_sock)
    load.start()
    result = migrate(src, dst, settings=SETTINGS)
    load.finish()
    client, errors, puts = load.client, load.errors, load.puts
    assert not errors, errors
    assert result.status == "completed", result.info.get("error-desc")
    assert result.info["x-confmig"]["confidential"]["shared-pages"] >= 2  # bounce page and ring
    assert puts["after"] >= 200, "the client never got service from the target"
    check = client.verify()
    assert check.ok, f"lost acknowledged writes: {check.mismatched[:5]}"
    assert check.keys == 300
    assert "PASS" in dst.selfcheck()
    client.close()


def test_a_recorded_stream_replayed_to_a_second_target_never_runs_there(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """The host records a completed migration and plays it to another attested target of the
    same guest (a clone). The owner released that target's key for a ticket of its own, so not
    one record opens there: its MH refuses the first IMPORT."""
    import contextlib
    import socket
    import time

    src, first, second = two_targets(lab, hosts, "first", "second")
    challenges = {mh_target_challenge(t)["x-mh-target-challenge"] for t in (first, second)}
    assert len(challenges) == 2 and bytes(32).hex() not in challenges
    uri, relay = through(Relay, src, first)
    assert migrate(src, None, uri, settings=SETTINGS).status == "completed"
    wait_status(first, "running")

    configure(second, SETTINGS)
    host, port = incoming_uri(second).removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as replay:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # refused mid-stream
            replay.sendall(bytes(relay.sent))
        deadline = time.monotonic() + 60
        while second.qmp.execute("query-migrate").get("status") not in ("failed", "completed"):
            assert time.monotonic() < deadline, "the replayed stream was neither loaded nor refused"
            time.sleep(0.1)
    info = second.qmp.execute("query-migrate")
    assert info["status"] == "failed"
    assert "refused IMPORT" in info.get("error-desc", "") and "AUTH_ERR" in info.get("error-desc", "")
    assert second.qmp.execute("query-status")["status"] != "running"
    assert first.selfcheck().startswith("confmig-selfcheck: PASS")


def test_migrate_without_the_targets_challenge_is_refused_up_front(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    src, _dst = mh_pair(lab, hosts)
    configure(src, SETTINGS)
    with pytest.raises(QmpCommandError, match="x-mh-target-challenge"):
        src.qmp.execute("migrate", uri="tcp:127.0.0.1:9")
    assert src.qmp.execute("query-status")["status"] == "running"


MH_COMPLETION_RECORD = re.compile(re.escape(bytes.fromhex("0000000000000800") + b"\x03")
                                  + b"....\x02\x01\x02\x00", re.S)
"""A CONFIDENTIAL record of subtype MH_RECORD holding the source MH's completion record."""


class BreakCompletion(Relay):
    """Flips a bit in the completion record's tag: the target's MH refuses it (VERIFY)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.window = bytearray()
        self.broken = False
        super().__init__(target, tamper=self._tamper)

    def _tamper(self, chunk: bytearray, offset: int) -> None:
        if self.broken:
            return
        start = len(self.window)
        self.window += chunk
        m = MH_COMPLETION_RECORD.search(self.window)
        if m is None:
            del self.window[: max(0, len(self.window) - 64)]
            return
        length = int.from_bytes(self.window[m.start() + 9 : m.start() + 13], "big")
        last = m.start() + RECORD_PAYLOAD + length - 1  # the tag's last byte, in the window
        pos = last - start
        if 0 <= pos < len(chunk):
            chunk[pos] ^= 1
            self.broken = True


@pytest.mark.parametrize("policy", [SEV_POLICY, SEV_ES_POLICY], ids=["sev", "sev-es"])
def test_a_failure_after_finish_resumes_the_source_with_the_targets_abort_token(
        lab: Lab, hosts: tuple[HostProc, HostProc], policy: int) -> None:
    src, dst = mh_pair(lab, hosts, policy=policy)
    uri, relay = through(BreakCompletion, src, dst)
    result = migrate(src, None, uri, settings=SETTINGS)
    assert isinstance(relay, BreakCompletion) and relay.broken
    assert result.status == "failed"
    assert "refused VERIFY" in dst.qmp.execute("query-migrate").get("error-desc", "")
    assert dst.qmp.execute("query-status")["status"] != "running"
    wait_status(src, "running")  # the source's MH opened the target's abort token
    assert not src.qmp.execute("x-query-migration-handler")["sent-away"]
    assert src.selfcheck().startswith("confmig-selfcheck: PASS")


def test_a_saved_stream_restores_only_on_the_target_it_was_sealed_for(
        lab: Lab, hosts: tuple[HostProc, HostProc]) -> None:
    """``migrate file:`` saves the guest sealed for one target (its ticket's key, its challenge);
    restoring the file on another attested target (a clone, or a rollback to a saved state)
    opens no record there."""
    src, named, other = two_targets(lab, hosts, "named", "other")
    configure(src, SETTINGS)
    src.qmp.execute("migrate-set-parameters", **mh_target_challenge(named))
    saved = lab.root / "guest.mig"
    assert migrate(src, None, f"file:{saved}", settings=SETTINGS).status == "completed"
    with pytest.raises(QmpCommandError, match="migrated away"):
        src.qmp.execute("cont")  # saved for a target: it does not run here any more

    configure(other, SETTINGS)
    other.qmp.execute("migrate-incoming", uri=f"file:{saved}")
    wait_migration(other, "failed")
    assert "refused IMPORT" in other.qmp.execute("query-migrate").get("error-desc", "")
    assert other.qmp.execute("query-status")["status"] != "running"

    configure(named, SETTINGS)
    named.qmp.execute("migrate-incoming", uri=f"file:{saved}")
    wait_migration(named, "completed")
    wait_status(named, "running")
    assert named.selfcheck().startswith("confmig-selfcheck: PASS")


def wait_migration(vm: VmProc, status: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while (now := vm.qmp.execute("query-migrate").get("status")) != status:
        assert now not in ("failed", "completed", "cancelled"), f"{vm.name}: {now}"
        assert time.monotonic() < deadline, f"{vm.name} never reached {status}"
        time.sleep(0.1)
