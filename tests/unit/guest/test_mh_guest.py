"""The Migration Handler inside a whole guest on the fake vCPU: what the firmware prepares,
target mode, the kernel's run gate, and a guest that migrates through its MH and runs on.

The MH vCPUs are fake vCPUs beside the guest's own, on the same RAM and memory key (a
mirror VM); the test is the VMM of both sides."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from fakecpu import MIGRATION_FEATURES, FakeCpu
from machine import ROM, Machine
from mhhost import TICKET, MhDriver, launch_secret

from confmig.common.units import PAGE_SIZE, MiB
from confmig.guest import gate, kernel, mem_encrypt, saved_state
from confmig.guest.firmware import bootinfo, mh
from confmig.guest.firmware.boot import (
    MIGRATION_TARGET_FILE,
    TARGET_WITHOUT_TICKET,
    TICKET_WITHOUT_TARGET,
    WAITING_LINE,
    Phase,
)
from confmig.guest.firmware.image import build_firmware_image
from confmig.guest.layout import (
    FIRMWARE_BASE,
    FW_CFG_BOUNCE_GPA,
    MH_AREA_GPA,
    MH_AREA_SIZE,
    MH_ENTRY,
    MH_MAILBOX_GPA,
    MH_MAILBOX_SIZE,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
)
from confmig.platform.cpu.abi import C_BIT, NMI_VECTOR, RESET_VECTOR, Registers
from confmig.proto import mailbox as mb
from confmig.proto import ovmf_table

KEY = os.urandom(32)
RAM = 24 * MiB
DIRTY = "workload=dirty rate=0 wss=1M seed=9"
WRITTEN = "dirty: working set written"
SELFCHECK = "confmig-selfcheck"
AWAY = gate.REASONS[gate.MIGRATED_AWAY]
TARGET = {MIGRATION_TARGET_FILE: b"1"}


class Mirror(MhDriver):
    """MH vCPUs of a machine: fake vCPUs on its RAM, with its memory key."""

    def __init__(self, m: Machine, owner: tuple[bytes, bytes] | None = (KEY, TICKET)) -> None:
        self.m = m
        self.cpus: dict[int, FakeCpu] = {}
        self.owner = owner  # a target's COMPLETE goes with its owner's grant (the guest's key)

    def store(self, gpa: int, data: bytes) -> None:
        self.m.memory.write(gpa, data)

    def load(self, gpa: int, size: int) -> bytes:
        return self.m.memory.read(gpa, size)

    def enter(self, index: int) -> None:
        if index not in self.cpus:
            self.cpus[index] = FakeCpu(self.m.memory, [], vcpu_id=index, sev=True, es=self.m.cpu.es,
                                       kvm_features=MIGRATION_FEATURES)
            self.cpus[index].regs.rip = MH_ENTRY
        cpu = self.cpus[index]
        cpu.step(ROM)
        assert cpu.shutdown_reason is None and cpu.halted and cpu.regs.rip == MH_ENTRY


@contextmanager
def guest(cmdline: str = DIRTY, *, key: bytes | None = KEY, ticket: bool | None = None,
          **kwargs: object) -> Iterator[Machine]:
    """An SEV machine whose owner injected ``key`` as the transport key, or, as a migration
    target (``ticket``; by default when fw_cfg asks for a target), a ticket and its key."""
    if ticket is None:
        ticket = MIGRATION_TARGET_FILE in kwargs.get("fw_cfg_files", {})  # type: ignore[operator]
    with Machine(cmdline, ram_size=RAM, sev=True, **kwargs) as m:  # type: ignore[arg-type]
        if key is not None:
            area = launch_secret(key, target=ticket)
            m.cpu.write(SECRET_AREA_GPA | C_BIT, area.ljust(SECRET_AREA_SIZE, b"\0"))
        yield m


def session(m: Machine) -> mh.Session | None:
    return mh.load_session(m.cpu, C_BIT)


def private_gpas(m: Machine) -> list[int]:
    """What a VMM migrates through the MH: every page but shared ones and the MH's area."""
    gfns = np.arange(m.memory.ram_size // PAGE_SIZE, dtype=np.int64)
    shared = mem_encrypt.shared_pages(m.cpu, gfns, C_BIT)
    area = (gfns >= MH_AREA_GPA // PAGE_SIZE) & (gfns < (MH_AREA_GPA + MH_AREA_SIZE) // PAGE_SIZE)
    return [int(g) * PAGE_SIZE for g in gfns[~shared & ~area]]


# --- what the firmware prepares ----------------------------------------------------------------------


def test_an_sev_guests_firmware_shares_the_mailboxes_and_prepares_the_mh() -> None:
    with guest() as m:
        m.run_until_line(WRITTEN)
        platform = bootinfo.load(m.cpu).platform
        assert platform.flags & bootinfo.PLATFORM_MIGRATION_HANDLER
        assert not platform.flags & bootinfo.PLATFORM_MIGRATION_TARGET
        assert session(m) == mh.Session(phase=mh.SessionPhase.RUNNING)
        gfns = np.arange(RAM // PAGE_SIZE, dtype=np.int64)
        shared = set(gfns[mem_encrypt.shared_pages(m.cpu, gfns, C_BIT)].tolist())
        mailboxes = set(range(MH_MAILBOX_GPA // PAGE_SIZE, (MH_MAILBOX_GPA + MH_MAILBOX_SIZE) // PAGE_SIZE))
        assert shared == {FW_CFG_BOUNCE_GPA // PAGE_SIZE} | mailboxes  # the guest's own page-state list
        assert m.memory.read(MH_MAILBOX_GPA, MH_MAILBOX_SIZE) == bytes(MH_MAILBOX_SIZE)
        assert gate.load(m.cpu, C_BIT) == gate.OPEN


def test_a_guest_without_room_for_the_mh_boots_without_one() -> None:
    with Machine("workload=idle", ram_size=12 * MiB, sev=True) as m:
        m.run_until_line("confmig kernel: workload")
        assert not bootinfo.load(m.cpu).platform.flags & bootinfo.PLATFORM_MIGRATION_HANDLER
    with Machine("workload=idle") as m:  # a plain guest has no MH to prepare
        m.run_until_line("confmig kernel: workload")
        assert not bootinfo.load(m.cpu).platform.flags & bootinfo.PLATFORM_MIGRATION_HANDLER


def test_the_image_says_where_the_mh_starts_and_what_the_vmm_must_not_migrate() -> None:
    table = ovmf_table.parse_table(build_firmware_image())
    raw = table[ovmf_table.MIGRATION_HANDLER_BLOCK_GUID]
    version, flags, *_ = ovmf_table.MIGRATION_HANDLER_BLOCK.unpack(raw)
    block = ovmf_table.migration_handler(table)
    assert block is not None and (version, flags) == (2, 0)
    entry, gpa, size, area = block.entry, block.mailbox_gpa, block.mailbox_size, block.area_size
    assert entry == FIRMWARE_BASE + Phase.MH and entry == MH_ENTRY
    assert (gpa, size, area) == (MH_MAILBOX_GPA, 4 * mb.MAILBOX_STRIDE, MH_AREA_SIZE)
    assert mb.max_mh_vcpus(size) == 4 and gpa == MH_AREA_GPA


@pytest.mark.parametrize("value", [b"1", b"yes", b"TRUE"])
def test_a_migration_target_waits_with_only_its_mh(value: bytes) -> None:
    with guest(fw_cfg_files={MIGRATION_TARGET_FILE: value}) as m:
        m.run(lambda _: False)  # until it halts for good
        assert m.lines[-1] == WAITING_LINE
        assert not any(line.startswith("confmig kernel") for line in m.lines)
        assert m.cpu.halted and m.cpu.regs.rip == FIRMWARE_BASE + Phase.PARK
        s = session(m)
        assert s is not None and s.phase == mh.SessionPhase.AWAITING
        assert s.challenge != bytes(mb.CHALLENGE_SIZE)  # drawn after the mailboxes were zeroed
        assert Mirror(m).challenge() == s.challenge
        assert bootinfo.load(m.cpu).platform.flags & bootinfo.PLATFORM_MIGRATION_TARGET


def test_a_false_target_flag_boots_the_kernel() -> None:
    with guest(fw_cfg_files={MIGRATION_TARGET_FILE: b"0"}, ticket=False) as m:
        m.run_until_line(WRITTEN)
        assert WAITING_LINE not in m.lines and session(m) == mh.Session(phase=mh.SessionPhase.RUNNING)


@pytest.mark.parametrize(("files", "ticket", "line"), [
    (TARGET, False, TARGET_WITHOUT_TICKET),
    ({}, True, TICKET_WITHOUT_TARGET),
    ({MIGRATION_TARGET_FILE: b"0"}, True, TICKET_WITHOUT_TARGET),
], ids=["target-without-ticket", "ticket-without-target", "ticket-with-false-flag"])
def test_a_guest_is_a_migration_target_only_if_host_and_owner_both_say_so(
        files: dict[str, bytes], ticket: bool, line: str) -> None:
    """A host that boots a guest launched with its own key in target mode would have a target
    that opens any migration of it; one that boots a target as a guest, a guest with no key."""
    with guest(fw_cfg_files=files, ticket=ticket) as m:
        m.run(lambda _: False)  # until it halts for good
        assert m.lines[-1] == f"confmig firmware: {line}"
        assert WAITING_LINE not in m.lines and not any(x.startswith("confmig kernel") for x in m.lines)
        assert m.cpu.regs.rip == FIRMWARE_BASE + Phase.PARK


# --- the run gate ------------------------------------------------------------------------------------


def test_after_finish_the_guest_parks_and_an_abort_token_lets_it_run_on() -> None:
    with guest() as src, guest(fw_cfg_files=TARGET) as dst:
        src.run_until_line(WRITTEN)
        dst.run_until_line(WAITING_LINE)
        smh, dmh = Mirror(src), Mirror(dst)
        ret, mid = smh.init(0, mb.Role.SOURCE)
        assert ret == 0 and smh.token(mb.MhCommand.FINISH, dmh.challenge())[0] == 0
        src.cpu.inject(NMI_VECTOR)
        src.run(lambda _: False)  # until it halts for good
        assert src.lines[-1] == AWAY and src.lines.count(AWAY) == 1
        assert not any(line.startswith(SELFCHECK) for line in src.lines)
        assert src.cpu.regs.rip == kernel.KERNEL_BASE + kernel.Phase.GATED
        src.cpu.inject(NMI_VECTOR)  # still parked: it halts again, silently
        src.run(lambda _: False)
        assert src.lines.count(AWAY) == 1 and src.cpu.halted

        assert dmh.init(0, mb.Role.TARGET, mid)[0] == 0
        ret, token = dmh.token(mb.MhCommand.ABORT)
        assert ret == 0 and gate.load(dst.cpu, C_BIT) == gate.ABORTED
        assert smh.token(mb.MhCommand.RESUME, token)[0] == 0
        src.cpu.inject(NMI_VECTOR)
        assert src.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=256 writes=256"


def test_a_guest_that_migrated_away_does_not_boot_again() -> None:
    with guest() as m:
        m.run_until_line(WRITTEN)
        smh = Mirror(m)
        assert smh.init(0, mb.Role.SOURCE)[0] == 0
        assert smh.token(mb.MhCommand.FINISH, os.urandom(mb.CHALLENGE_SIZE))[0] == 0
        banners = sum(line.startswith("confmig firmware 1.0") for line in m.lines)
        m.cpu.regs = Registers()
        m.cpu.regs.rip = RESET_VECTOR
        m.cpu.halted = False
        m.run(lambda _: False)
        assert m.lines[-1] == AWAY
        assert sum(line.startswith("confmig firmware 1.0") for line in m.lines) == banners


# --- a whole migration --------------------------------------------------------------------------------


def test_a_guest_migrates_through_its_mh_and_runs_on_at_the_target() -> None:
    with guest() as src, guest(fw_cfg_files=TARGET) as dst:
        src.run_until_line(WRITTEN)
        dst.run_until_line(WAITING_LINE)
        smh, dmh = Mirror(src), Mirror(dst)
        ret, mid = smh.init(0, mb.Role.SOURCE, nstreams=2)
        assert smh.init(1, mb.Role.SOURCE) == (0, mid)
        assert dmh.init(0, mb.Role.TARGET, mid)[0] == 0  # MH vCPU 0 names the target's migration
        assert dmh.init(1, mb.Role.TARGET, mid)[0] == 0
        gpas = private_gpas(src)
        for i in (0, 1):  # the source's vCPU is stopped; a page travels on its own stream
            mine = [g for g in gpas if mb.stream_of(np.array([g // 4096]), 2)[0] == i]
            for k in range(0, len(mine), mb.BATCH_PAGES):
                slot = (k // mb.BATCH_PAGES) % mb.SLOTS
                ret, record = smh.export(i, mine[k : k + mb.BATCH_PAGES], slot=slot)
                assert ret == 0
                assert dmh.import_(i, record, slot=slot) == 0
        ret, completion = smh.token(mb.MhCommand.FINISH, dmh.challenge())
        assert ret == 0
        assert gate.load(dst.cpu, C_BIT) == gate.INCOMING
        assert dmh.token(mb.MhCommand.COMPLETE, completion)[0] == 0
        assert gate.load(dst.cpu, C_BIT) == gate.OPEN
        dst.memory.write(FW_CFG_BOUNCE_GPA, src.memory.read(FW_CFG_BOUNCE_GPA, PAGE_SIZE))  # shared
        snap = src.snapshot()
        for device in dst.devices:
            device.load_state(snap.devices[device.vmsd_name])
        dst.cpu.restore(snap.cpu)  # SEV: the VMM sets the registers of the parked vCPU

        dst.cpu.inject(NMI_VECTOR)
        assert dst.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=256 writes=256"
        assert AWAY not in dst.lines
        src.cpu.inject(NMI_VECTOR)
        src.run(lambda _: False)
        assert src.lines[-1] == AWAY and not any(line.startswith(SELFCHECK) for line in src.lines)
        for canary in (KEY, b"CMKERN01", b"CMDIRTY1"):
            assert canary not in src.memory.read(0, RAM) and canary not in dst.memory.read(0, RAM)


def test_an_sev_es_guest_saves_its_registers_and_its_target_continues_from_them() -> None:
    """Neither VMM touches an SEV-ES guest's registers: its vCPU saves them when the MH asks
    (PARK), they travel sealed in the completion record, the target's firmware loads them."""
    saving = gate.REASONS[gate.SAVING]
    with guest(es=True) as src, guest(fw_cfg_files=TARGET, es=True) as dst:
        src.run_until_line(WRITTEN)
        dst.run_until_line(WAITING_LINE)
        assert dst.cpu.regs.rip == FIRMWARE_BASE + Phase.RESTORE
        dst.run(lambda _: False)  # nothing arrived: it waits
        assert dst.cpu.halted and dst.cpu.regs.rip == FIRMWARE_BASE + Phase.RESTORE
        smh, dmh = Mirror(src), Mirror(dst)
        ret, mid = smh.init(0, mb.Role.SOURCE)
        assert ret == 0 and dmh.init(0, mb.Role.TARGET, mid)[0] == 0
        assert smh.command(0, mb.MhCommand.PARK, slot=0).length == 0
        src.cpu.inject(NMI_VECTOR)  # wakes it; the gate comes first: no self-check
        src.run_until_line(saving)
        at_park = saved_state.load(src.cpu, 0, C_BIT)
        assert at_park is not None and at_park.rip != src.cpu.regs.rip  # saved before it parked
        assert src.cpu.regs.rip == kernel.KERNEL_BASE + kernel.Phase.GATED
        assert smh.command(0, mb.MhCommand.PARK, slot=0).length == 1
        gpas_all = private_gpas(src)
        for k in range(0, len(gpas_all) // mb.BATCH_PAGES + 1):
            gpas = gpas_all[k * mb.BATCH_PAGES : (k + 1) * mb.BATCH_PAGES]
            ret, record = smh.export(0, gpas, slot=k % mb.SLOTS)
            assert ret == 0 and dmh.import_(0, record, slot=k % mb.SLOTS) == 0
        ret, completion = smh.token(mb.MhCommand.FINISH, dmh.challenge())
        assert ret == 0 and dmh.token(mb.MhCommand.COMPLETE, completion)[0] == 0
        dst.memory.write(FW_CFG_BOUNCE_GPA, src.memory.read(FW_CFG_BOUNCE_GPA, PAGE_SIZE))  # shared
        snap = src.snapshot()
        for device in dst.devices:
            device.load_state(snap.devices[device.vmsd_name])
        dst.cpu.tsc, dst.cpu.tsc_deadline = snap.cpu.tsc, snap.cpu.tsc_deadline  # KVM's, not the VMSA's

        dst.cpu.inject(NMI_VECTOR)
        assert dst.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=256 writes=256"
        assert saved_state.load(dst.cpu, 0, C_BIT) is None  # loaded once: a reboot boots
        src.cpu.inject(NMI_VECTOR)
        src.run(lambda _: False)  # parked since PARK; FINISH keeps it so for good
        assert gate.load(src.cpu, C_BIT) == gate.MIGRATED_AWAY and src.lines[-1] == saving
        assert not any(line.startswith(SELFCHECK) for line in src.lines)


def test_an_sev_es_guest_whose_migration_did_not_happen_runs_on_from_where_it_parked() -> None:
    with guest(es=True) as src:
        src.run_until_line(WRITTEN)
        smh = Mirror(src)
        assert smh.init(0, mb.Role.SOURCE)[0] == 0
        smh.command(0, mb.MhCommand.PARK, slot=0)
        src.cpu.inject(NMI_VECTOR)
        src.run_until_line(gate.REASONS[gate.SAVING])
        assert smh.command(0, mb.MhCommand.RESET).ret == 0
        src.cpu.inject(NMI_VECTOR)
        assert src.run_until_line(SELFCHECK) == f"{SELFCHECK}: PASS pages=256 writes=256"
        assert saved_state.load(src.cpu, 0, C_BIT) is None  # what it saved will not be used


def test_a_target_rebooted_in_the_middle_of_an_import_does_not_boot_what_arrived() -> None:
    """The source's secret area (the guest's own key, no ticket) may arrive before the page with
    the run gate: from its first imported page a target's gate is closed, so a host that reboots
    it then, not asking for a target any more, finds it parked, not booting a half-imported
    guest with its source's secrets beside the source (a fork)."""
    with guest() as src, guest(fw_cfg_files=TARGET) as dst:
        src.run_until_line(WRITTEN)
        dst.run_until_line(WAITING_LINE)
        smh, dmh = Mirror(src), Mirror(dst)
        ret, mid = smh.init(0, mb.Role.SOURCE)
        assert ret == 0 and dmh.init(0, mb.Role.TARGET, mid)[0] == 0
        ret, record = smh.export(0, [SECRET_AREA_GPA], slot=0)
        assert ret == 0 and dmh.import_(0, record, slot=0) == 0
        assert mh.launch_ticket(dst.cpu, C_BIT) is None  # the source's secret is there now
        rebooted = Machine(DIRTY, memory=dst.memory, sev=True)  # the same RAM; dst closes it
        rebooted.run(lambda _: bool(rebooted.console))  # up to its first console line
        assert rebooted.lines == [gate.REASONS[gate.INCOMING]]
        assert rebooted.cpu.regs.rip == FIRMWARE_BASE + Phase.PARK
