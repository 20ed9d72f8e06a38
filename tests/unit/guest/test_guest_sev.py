"""An SEV guest on the fake vCPU: private data, shared device pages and their reports,
the kernel's leg of the live-migration negotiation, the launch secret's verdicts."""

import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from machine import Machine, running

from confmig.bench.kv_client import KvClient
from confmig.common.units import PAGE_SIZE, MiB
from confmig.guest import kernel, mem_encrypt
from confmig.guest.firmware import bootinfo, secret, varstore
from confmig.guest.firmware.boot import NO_MIGRATION_FILE
from confmig.guest.layout import (
    FW_CFG_BOUNCE_GPA,
    KERNEL_BASE,
    MH_MAILBOX_GPA,
    MH_MAILBOX_SIZE,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
    VARSTORE_GPA,
    VARSTORE_SIZE,
)
from confmig.guest.workloads import dirty
from confmig.guest.workloads import kv as guest_kv
from confmig.platform.cpu.abi import (
    C_BIT,
    KV_PORT_BASE,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
)
from confmig.proto.kvdev import KV_REG_STATUS_CONTROL

SELFCHECK = "confmig-selfcheck"
WORKLOAD_LINE = "confmig kernel: workload"
ALLOWED = kernel.MIGRATION_ALLOWED_LINE
NOT_ALLOWED = kernel.MIGRATION_NOT_ALLOWED
NO_HYPERVISOR = "hypervisor: no KVM_FEATURE_MIGRATION_CONTROL"
NO_VARIABLE = "firmware: SevLiveMigrationEnabled not set"
KERNEL_OFF = "kernel: sev_migration=off"
BOUNCE_GFN = FW_CFG_BOUNCE_GPA // PAGE_SIZE
MAILBOX_GFNS = set(range(MH_MAILBOX_GPA // PAGE_SIZE, (MH_MAILBOX_GPA + MH_MAILBOX_SIZE) // PAGE_SIZE))
"""The Migration Handler's mailboxes: shared by the firmware of every SEV guest."""
FIRMWARE_SHARED = {BOUNCE_GFN} | MAILBOX_GFNS
U64 = (1 << 64) - 1
IDLE_WAIT = 0.002


def queue_gfns(queue: int) -> set[int]:
    return set(range(queue // PAGE_SIZE, queue // PAGE_SIZE + guest_kv.QUEUE_PAGES))


def failure_lines(m: Machine) -> list[str]:
    return [line for line in m.lines if "KVM_HC_MAP_GPA_RANGE failed" in line]


def mailbox_reports(batch: int = mem_encrypt.PAGE_STATE_BATCH) -> list[tuple[int, int, int, int, int]]:
    """The firmware's reports of the mailboxes, ``batch`` pages at a time."""
    n = MH_MAILBOX_SIZE // PAGE_SIZE
    return [(KVM_HC_MAP_GPA_RANGE, MH_MAILBOX_GPA + i * PAGE_SIZE, min(batch, n - i), 0, 0)
            for i in range(0, n, batch)]


def workload_reports(m: Machine) -> list[tuple[int, int, int, int, int]]:
    """The page-state reports made after the firmware's."""
    return [hc for hc in m.cpu.hypercalls if hc[1] >= MH_MAILBOX_GPA + MH_MAILBOX_SIZE]


# --- boot ---------------------------------------------------------------------------------------


def test_sev_boot_shares_and_reports_the_fw_cfg_bounce_page() -> None:
    with Machine("workload=idle", sev=True) as m:
        m.run_until_line(WORKLOAD_LINE)
        assert m.lines[0] == "confmig firmware 1.0: fw_cfg DMA, 1 CPU(s), RAM 64 MiB, SEV (C-bit 51)"
        assert m.cpu.hypercalls == [(KVM_HC_MAP_GPA_RANGE, FW_CFG_BOUNCE_GPA, 1, 0, 0),  # attrs 0: shared
                                    *mailbox_reports()]
        assert m.cpu.shared_pages == FIRMWARE_SHARED
        platform = bootinfo.load(m.cpu).platform
        assert platform.sev and platform.c_bit_position == 51 and not platform.hypercall_error
        assert m.cpu.shutdown_reason is None


def test_kernel_and_dirty_data_reach_ram_only_as_ciphertext() -> None:
    with Machine("workload=dirty rate=0 wss=1M seed=5", sev=True) as m:
        m.run_until_line("dirty: working set written")
        m.cpu.inject(2)
        assert m.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=256 writes=256"
        assert m.cpu.shared_pages == FIRMWARE_SHARED  # nothing else was ever touched without the C-bit
        low = m.memory.read(0, 1 * MiB)  # boot info, kernel data, workload state, variable store
        for plaintext in (b"CMBOOT01", b"workload=dirty", b"CMKERN01", b"CMDIRTY1", b"CMVARS01",
                          varstore.SEV_LIVE_MIGRATION_ENABLED.encode("utf-16-le")):
            assert plaintext not in low
        st = dirty.load_state(m.cpu)
        n = st.table_pages + st.npages
        seen = m.cpu.read_pages(st.table | C_BIT, n)
        host = np.frombuffer(m.memory.read(st.table, n * PAGE_SIZE), np.uint8).reshape(n, PAGE_SIZE)
        assert not (seen == host).all(axis=1).any()  # no page of table or working set in the clear
        first = st.ranges[0][0]
        assert int.from_bytes(seen[st.table_pages, :8].tobytes(), "little") == first  # header: plain GPA


def test_a_plain_guest_keeps_its_data_in_the_clear_and_never_negotiates() -> None:
    with Machine("workload=dirty rate=0 wss=1M seed=5") as m:
        m.run_until_line("dirty: working set written")
        low = m.memory.read(0, 1 * MiB)
        assert b"CMKERN01" in low and b"CMDIRTY1" in low
        assert m.cpu.hypercalls == [] and m.cpu.msr_writes == []
        assert not any("SEV" in line or "launch secret" in line for line in m.lines)


def test_ciphertext_the_host_changes_fails_the_self_check() -> None:
    with Machine("workload=dirty rate=0 wss=1M", sev=True) as m:
        m.run_until_line("dirty: working set written")
        st = dirty.load_state(m.cpu)
        victim = st.ranges[0][0] + 17 * PAGE_SIZE
        m.memory.write(victim + 1234, bytes([m.memory.read(victim + 1234, 1)[0] ^ 1]))
        m.cpu.inject(2)
        assert m.run_until_line(SELFCHECK) == f"{SELFCHECK}: FAIL bad=1 first={victim:#x} pages=256"


def test_kernel_and_workload_steps_find_the_mask_out_once(tmp_path: Path) -> None:
    with Machine("workload=dirty rate=0 wss=32M", sev=True) as m:  # two self-check steps
        m.run_until_line("dirty: working set written")
        m.cpu.inject(2)
        m.run_until_line(SELFCHECK)
        assert m.cpu.sev_lookups["kernel"] == 1 and m.cpu.sev_lookups["dirty"] == 1
    with Machine("workload=kv slots=16", sev=True, kv_socket=tmp_path / "kv.sock",
                 idle_wait=IDLE_WAIT) as m:
        assert m.kv is not None
        m.kv.start()
        with running(m):
            client = KvClient(tmp_path / "kv.sock")
            client.put(b"k", b"v")
            assert client.get(b"k") == b"v"
        assert m.cpu.sev_lookups["kv"] == 1


# --- the kv queue: shared, reported, and the device still works ----------------------------------


def test_the_kv_queue_is_shared_and_reported_before_the_device_goes_live(tmp_path: Path) -> None:
    with Machine("workload=kv slots=64", sev=True, kv_socket=tmp_path / "kv.sock",
                 idle_wait=IDLE_WAIT) as m:
        assert m.kv is not None
        m.run(lambda c: len(c.hypercalls) == 2 + len(mailbox_reports()))
        queue = guest_kv.load_state(m.cpu).queue
        assert workload_reports(m) == [(KVM_HC_MAP_GPA_RANGE, queue, guest_kv.QUEUE_PAGES, 0, 0)]
        assert m.kv.io_in(KV_PORT_BASE + KV_REG_STATUS_CONTROL, 4) == bytes(4)  # not live yet
        m.run_until_line("kv: serving")
        m.kv.start()
        with running(m):
            client = KvClient(tmp_path / "kv.sock")
            for i in range(20):
                client.put(b"key-%d" % i, b"value-%d" % i)
            assert client.get(b"key-7") == b"value-7" and client.verify().ok
        st = guest_kv.load_state(m.cpu)
        assert m.cpu.shared_pages == FIRMWARE_SHARED | queue_gfns(st.queue)
        table = m.memory.read(st.table, st.table_pages * PAGE_SIZE)
        assert b"key-1" not in table and b"value-1" not in table
        assert b"value-1" in m.cpu.read(st.table | C_BIT, st.table_pages * PAGE_SIZE)
        assert guest_kv.selfcheck(m.cpu).passed and st.keys == 20


def test_the_queue_is_shared_in_bounded_batches(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(mem_encrypt, "PAGE_STATE_BATCH", 8)
    with Machine("workload=kv slots=16", sev=True, kv_socket=tmp_path / "kv.sock") as m:
        m.run_until_line("kv: serving")
        queue = guest_kv.load_state(m.cpu).queue
        n = guest_kv.QUEUE_PAGES
        assert m.cpu.hypercalls[1 : 1 + len(mailbox_reports(8))] == mailbox_reports(8)
        assert workload_reports(m) == [
            (KVM_HC_MAP_GPA_RANGE, queue + i * PAGE_SIZE, min(8, n - i), 0, 0) for i in range(0, n, 8)
        ]


def test_a_plain_kv_guest_shares_nothing(tmp_path: Path) -> None:
    with Machine("workload=kv slots=16", kv_socket=tmp_path / "kv.sock") as m:
        m.run_until_line("kv: serving")
        assert m.cpu.hypercalls == []


# --- page-state reports the host refuses ---------------------------------------------------------


def test_a_host_without_hypercall_exits_gets_one_line_and_the_guest_carries_on(tmp_path: Path) -> None:
    with Machine("workload=kv slots=16", sev=True, kv_socket=tmp_path / "kv.sock",
                 hypercall_result=-KVM_ENOSYS) as m:
        m.run_until_line("kv: serving")
        assert len(workload_reports(m)) == 1  # the firmware's and the workload's: all tried
        assert len(m.cpu.hypercalls) == 2 + len(mailbox_reports())
        assert failure_lines(m) == [
            "confmig firmware: KVM_HC_MAP_GPA_RANGE failed with -1000 (KVM_CAP_EXIT_HYPERCALL not "
            "enabled); page-state changes are not reported to the host"
        ]
        assert bootinfo.load(m.cpu).platform.hypercall_error == -KVM_ENOSYS & U64
        assert ALLOWED in m.lines  # a failed report does not stop the negotiation either
        m.cpu.inject(2)
        assert m.run_until_line(SELFCHECK).startswith(f"{SELFCHECK}: PASS")


def test_a_refused_queue_report_is_printed_once_by_the_workload(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(mem_encrypt, "PAGE_STATE_BATCH", 8)  # five refused reports
    with Machine("workload=kv slots=16", sev=True, kv_socket=tmp_path / "kv.sock") as m:
        m.run_until_line(WORKLOAD_LINE)
        m.cpu.hypercall_result = -22
        m.run_until_line("kv: serving")
        assert len(workload_reports(m)) == 5
        assert failure_lines(m) == [
            "confmig kv: KVM_HC_MAP_GPA_RANGE failed with -22; page-state changes are not reported "
            "to the host"
        ]


# --- the live-migration negotiation, the guest's side ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "cmdline", "verdict"),
    [
        ({"sev": True}, "", ALLOWED),
        ({"sev": False}, "", None),
        ({"sev": False}, " sev_migration=off", None),
        ({"sev": True, "migration_control": False}, "",
         f"{NOT_ALLOWED} ({NO_HYPERVISOR}; {NO_VARIABLE})"),
        ({"sev": True, "fw_cfg_files": {NO_MIGRATION_FILE: b"1"}}, "", f"{NOT_ALLOWED} ({NO_VARIABLE})"),
        ({"sev": True}, " sev_migration=off", f"{NOT_ALLOWED} ({KERNEL_OFF})"),
        ({"sev": True}, " sev_migration=on", ALLOWED),
        ({"sev": True, "fw_cfg_files": {NO_MIGRATION_FILE: b""}}, " sev_migration=off",
         f"{NOT_ALLOWED} ({NO_VARIABLE}; {KERNEL_OFF})"),
    ],
    ids=["all-legs", "plain", "plain-opt-out", "no-cpuid-bit", "firmware-opt-out", "kernel-opt-out",
         "kernel-on", "both-opt-outs"],
)
def test_negotiation(options: dict[str, object], cmdline: str, verdict: str | None) -> None:
    # workload=idle takes no options: a sev_migration= that reached it would halt the boot.
    with Machine("workload=idle" + cmdline, **options) as m:  # type: ignore[arg-type]
        m.run_until_line(WORKLOAD_LINE)
        kernel_lines = [line for line in m.lines if line.startswith("confmig kernel")]
        assert kernel_lines == [*([verdict] if verdict else []), f"{WORKLOAD_LINE} idle (no options)"]
        allowed = verdict == ALLOWED
        assert m.cpu.msr_writes == ([(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)] if allowed else [])
        assert m.cpu.migration_control == int(allowed)


def test_the_allowed_line_is_printed_after_the_msr_write() -> None:
    with Machine("workload=idle", sev=True) as m:
        m.run(lambda c: bool(c.msr_writes))
        assert m.cpu.regs.rip == KERNEL_BASE + kernel.Phase.MIGRATION
        assert not any("live migration" in line for line in m.lines)
        assert m.run_until_line("confmig kernel") == ALLOWED


def _set(data: bytes, guid: uuid.UUID = varstore.AMD_SEV_MEM_ENCRYPT_GUID) -> varstore.Variable:
    return varstore.Variable(name=varstore.SEV_LIVE_MIGRATION_ENABLED, guid=guid, attributes=7, data=data)


@pytest.mark.parametrize(
    "store",
    [[_set(b"\x00")], [_set(b"")], [_set(b"\x01", guid=uuid.uuid4())], []],
    ids=["false", "empty", "other-guid", "erased"],
)
def test_the_kernel_reads_the_uefi_variable_itself(store: list[varstore.Variable]) -> None:
    with Machine("workload=idle", sev=True) as m:
        m.run(lambda c: c.regs.rip == KERNEL_BASE)  # the firmware set it; now change the store
        m.cpu.write(VARSTORE_GPA | C_BIT, varstore.encode(store, VARSTORE_SIZE))
        m.run_until_line(WORKLOAD_LINE)
        assert f"{NOT_ALLOWED} ({NO_VARIABLE})" in m.lines and m.cpu.msr_writes == []


def test_the_host_cannot_plant_the_variable() -> None:
    with Machine("workload=idle", sev=True, fw_cfg_files={NO_MIGRATION_FILE: b""}) as m:
        m.run(lambda c: c.regs.rip == KERNEL_BASE)
        m.memory.write(VARSTORE_GPA, varstore.encode([_set(b"\x01")], VARSTORE_SIZE))  # plaintext
        m.run_until_line(WORKLOAD_LINE)
        assert f"{NOT_ALLOWED} ({NO_VARIABLE})" in m.lines and m.cpu.msr_writes == []


def test_a_bad_command_line_halts_before_negotiating() -> None:
    with Machine("workload=idle colour=blue", sev=True) as m:
        m.run(lambda _: False)
        assert m.lines[-1].endswith("unknown option(s) colour for workload idle; halted")
        assert m.cpu.msr_writes == [] and not any("live migration" in line for line in m.lines)


def test_the_kernel_takes_sev_migration_out_of_the_workloads_options() -> None:
    parsed = kernel.parse_cmdline("workload=dirty rate=5 sev_migration=off seed=2")
    assert parsed == kernel.Cmdline(workload="dirty", options={"rate": "5", "seed": "2"},
                                    sev_migration=False)
    assert kernel.parse_cmdline("").sev_migration
    with pytest.raises(ValueError, match="sev_migration=maybe"):
        kernel.parse_cmdline("sev_migration=maybe")


# --- the launch secret ---------------------------------------------------------------------------

SECRET = bytes(range(0xA0, 0xC0))
"""32 bytes that must never reach the console."""


def table(*entries: tuple[uuid.UUID, bytes], total: int | None = None) -> bytes:
    body = b"".join(guid.bytes_le + struct.pack("<I", 20 + len(data)) + data for guid, data in entries)
    length = 20 + len(body) if total is None else total
    return secret.SECRET_TABLE_HEADER_GUID.bytes_le + struct.pack("<I", length) + body


KEY = secret.MIGRATION_TRANSPORT_KEY_GUID
PASS = secret.DISK_PASSPHRASE_GUID
PREFIX = "confmig firmware: launch secret:"


@pytest.mark.parametrize(
    ("area", "line"),
    [
        (table((KEY, SECRET), (secret.NULL_GUID, b"gone"), (PASS, b"hunter2")), f"{PREFIX} 2 entries"),
        (b"", f"{PREFIX} none (the secret area holds no secret table)"),
        (table(total=5000), f"{PREFIX} ignored (table length 5000 exceeds the 4096-byte secret area)"),
        (table(total=10), f"{PREFIX} ignored (table length 10 is too small)"),
        # entry 0 is fine; the header claims 24 more bytes, where the "entry" has length 0
        (table((KEY, SECRET), total=20 + 52 + 24),
         f"{PREFIX} ignored (entry 1 has a length outside the table's 96 bytes)"),
        # entry 0's length runs past the table: the bytes after it are secret and stay unprinted
        (table((KEY, SECRET), total=20 + 30),
         f"{PREFIX} ignored (entry 0 has a length outside the table's 50 bytes)"),
    ],
    ids=["valid", "none", "too-big", "too-small", "corrupted-tail", "corrupted-entry"],
)
def test_secret_table_verdicts(area: bytes, line: str) -> None:
    with Machine("workload=idle", sev=True) as m:
        # as LAUNCH_SECRET leaves it: encrypted under the guest's key (written with the C-bit)
        m.cpu.write(SECRET_AREA_GPA | C_BIT, area.ljust(SECRET_AREA_SIZE, b"\0"))
        m.run_until_line(WORKLOAD_LINE)
        assert m.lines[1] == line
        assert str(int.from_bytes(SECRET[:4], "little")) not in m.console.decode()
        platform = bootinfo.load(m.cpu).platform
        if line.endswith("2 entries"):
            assert platform.secret_status == secret.SecretStatus.VALID
            assert platform.secret_entries == (
                secret.SecretEntry(guid=KEY, offset=40, length=32),
                secret.SecretEntry(guid=PASS, offset=20 + 52 + 24 + 20, length=7),
            )
            assert SECRET not in m.console
        elif "ignored" in line:
            assert platform.secret_detail == line.split("ignored (", 1)[1][:-1]


def test_a_secret_table_the_host_writes_in_the_clear_is_no_secret() -> None:
    with Machine("workload=idle", sev=True) as m:
        m.memory.write(SECRET_AREA_GPA, table((KEY, SECRET)))  # without the C-bit: not LAUNCH_SECRET
        m.run_until_line(WORKLOAD_LINE)
        assert m.lines[1] == f"{PREFIX} none (the secret area holds no secret table)"
