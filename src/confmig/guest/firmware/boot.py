"""The boot firmware: from the reset vector to the kernel.

A state machine whose state is ``rip``. Each phase consumes the result of the
previous fw_cfg transfer from the bounce buffer, records it in the boot-info
block, and starts the next transfer (one exiting ``out``)::

    RESET_VECTOR  APs park. An SEV guest whose run gate is closed (it migrated
                  away, is saving its state for a migration, or its incoming
                  migration was aborted) says so and parks.
                  The BSP clears the boot info, finds out whether it runs as an
                  SEV guest (CPUID 0x8000001F, MSR_AMD64_SEV) and what the
                  hypervisor offers (CPUID 0x40000001), formats the variable
                  store; in an SEV guest it opens the run gate, clears the
                  page-state list, makes the bounce buffer shared and reports it
                  (KVM_HC_MAP_GPA_RANGE) -> BOUNCE; otherwise it reads the signature
    BOUNCE        the report's result (a failure is remembered) -> read the signature
    SIGNATURE     "QEMU"?                          -> read the feature ID
    ID            DMA supported?                   -> read the file directory
    FILE_DIR      find etc/e820 (and opt/confmig/no-migration; the selector of
                  opt/ovmf/PcdSevIsMigrationTarget goes to r12) -> read etc/e820
    E820          store the memory map             -> read the command-line size
    CMDLINE_SIZE  fits in the boot info?           -> read the command line
    CMDLINE_DATA  store it                         -> read the CPU count
    NB_CPUS       store it. A plain guest: seal the boot info, print the banner,
                  jump to the kernel. An SEV guest first reads the launch secret
                  and sets SevLiveMigrationEnabled if the hypervisor offers
                  migration control (and fw_cfg does not opt out), then seals and
                  prints the banner -> SECRET
    SECRET        print the launch secret's verdict -> MH_SHARE (RAM covers the
                  Migration Handler's area) or AFTER_MH
    MH_SHARE      make the next PAGE_STATE_BATCH mailbox pages shared (zeros; rbx
                  counts them) and report them -> MH_SHARED; without reports, on
                  to the next batch. After the last: zero the MH's state -> AFTER_MH
    MH_SHARED     the report's result (a failure is remembered) -> MH_SHARE
    AFTER_MH      page-state reports failed: HC_REPORT; else TARGET_READ
    HC_REPORT     print that page-state reports fail (once) -> TARGET_READ
    TARGET_READ   fw_cfg has opt/ovmf/PcdSevIsMigrationTarget: read it -> TARGET;
                  else the kernel
    TARGET        true ("1", "y", "yes", "true"): the guest's memory may be
                  imported if the owner's launch secret has a migration ticket
                  (else a fatal error); print "Waiting for incoming confidential
                  migration." -> PARK (SEV-ES: RESTORE). Else the kernel, unless
                  the launch secret has a ticket (a fatal error: host and owner
                  disagree; the same without the fw_cfg file)
    PARK          hlt, forever (APs, the BSP after a fatal error, a migration target)
    RESTORE       SEV-ES migration target: hlt until the Migration Handler accepted
                  the completion record (its session RUNNING again, the run gate
                  open) and this vCPU's saved state arrived; then load it and
                  continue there (:mod:`confmig.guest.saved_state`)

A migration target's BSP parks without booting the kernel: the VMM replaces
its registers when the migration ends (SEV-ES: the VMM cannot, and the BSP
loads the registers its source saved into guest memory), and the import
overwrites its memory, so nothing it leaves there matters. The Migration Handler's entry, MH_ENTRY,
is a phase of this program too (:mod:`confmig.guest.firmware.mh`).

In an SEV guest every firmware data access but the shared pages' carries the
C-bit (:func:`confmig.guest.mem_encrypt.private`); a plain guest boots exactly
as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from confmig.common.units import PAGE_SIZE, Gpa, MemoryRange, MiB
from confmig.guest import gate, mem_encrypt, saved_state
from confmig.guest.firmware import bootinfo, fw_cfg, mh, secret, varstore
from confmig.guest.layout import (
    FIRMWARE_BASE,
    FIRMWARE_SIZE,
    FLASH_WINDOW,
    FW_CFG_BOUNCE_GPA,
    FW_CFG_DMA_DATA_MAX,
    KERNEL_BASE,
    MH_AREA_GPA,
    MH_AREA_SIZE,
    MH_ENTRY,
    MH_MAILBOX_GPA,
    MH_MAILBOX_SIZE,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
    VARSTORE_GPA,
    VARSTORE_SIZE,
)
from confmig.guest.phases import phase_program
from confmig.platform.cpu.abi import (
    COM1_PORT,
    MSR_AMD64_SEV_ENABLED,
    MSR_AMD64_SEV_ES_ENABLED,
    RESET_VECTOR,
    GuestCpu,
    RomRegion,
)

FIRMWARE_VERSION = "1.0"
E820_FILE = "etc/e820"
NO_MIGRATION_FILE = "opt/confmig/no-migration"
"""Present in fw_cfg: do not set SevLiveMigrationEnabled (tests the negotiation's firmware leg)."""
MIGRATION_TARGET_FILE = "opt/ovmf/PcdSevIsMigrationTarget"
"""True in fw_cfg: boot only as far as the Migration Handler and wait for an incoming
migration (the 2021 RFC's name, as QEMU's ``-fw_cfg name=...,string=1`` gives it)."""
TRUE_WORDS = frozenset({b"1", b"y", b"yes", b"true"})
"""What the file may say for true (OVMF's ``QemuFwCfgParseBool``)."""
WAITING_LINE = "Waiting for incoming confidential migration."
TARGET_WITHOUT_TICKET = ("a migration target needs its owner's ticket (the launch secret has none: the "
                         "owner launched no target); halted")
TICKET_WITHOUT_TARGET = ("the owner launched this guest as a migration target, but the host did not ask "
                         "for one (opt/ovmf/PcdSevIsMigrationTarget); halted")
MH_MAILBOX_PAGES = MH_MAILBOX_SIZE // PAGE_SIZE
_E820_ENTRY_SIZE = 20


class Phase(IntEnum):
    SIGNATURE = 0x10
    ID = 0x20
    FILE_DIR = 0x30
    E820 = 0x40
    CMDLINE_SIZE = 0x50
    CMDLINE_DATA = 0x60
    NB_CPUS = 0x70
    PARK = 0x80
    BOUNCE = 0x90
    SECRET = 0xA0
    HC_REPORT = 0xB0
    MH_SHARE = 0xC0
    MH_SHARED = 0xD0
    AFTER_MH = 0xE0
    TARGET_READ = 0xF0
    TARGET = 0x100
    RESTORE = 0x110
    MH = MH_ENTRY - FIRMWARE_BASE
    RESET = RESET_VECTOR - FIRMWARE_BASE


def _goto(cpu: GuestCpu, phase: Phase) -> None:
    cpu.regs.rip = FIRMWARE_BASE + phase


def _read(cpu: GuestCpu, selector: int, length: int, then: Phase) -> None:
    _goto(cpu, then)
    fw_cfg.start_read(cpu, selector, length)


def _fatal(cpu: GuestCpu, message: str) -> None:
    _goto(cpu, Phase.PARK)
    cpu.outs(COM1_PORT, f"confmig firmware: {message}\n".encode())


def _reset(cpu: GuestCpu) -> None:
    if cpu.vcpu_id != 0:
        _goto(cpu, Phase.PARK)
        cpu.hlt()
        return
    status = mem_encrypt.sev_status(cpu)
    sev = bool(status & MSR_AMD64_SEV_ENABLED)
    mask = 1 << mem_encrypt.c_bit_position(cpu) if sev else 0
    if sev and gate.closed(value := gate.load(cpu, mask)):
        # A reboot does not make a second copy of a guest run, nor boot a half-imported one.
        _goto(cpu, Phase.PARK)
        cpu.outs(COM1_PORT, (gate.REASONS[value] + "\n").encode())
        return
    cpu.regs.r12 = 0  # no target file seen yet
    bootinfo.clear(cpu)
    migration_control = mem_encrypt.has_migration_control(cpu)
    flags = (
        (bootinfo.PLATFORM_SEV if sev else 0)
        | (bootinfo.PLATFORM_SEV_ES if sev and status & MSR_AMD64_SEV_ES_ENABLED else 0)
        | (bootinfo.PLATFORM_MIGRATION_CONTROL if migration_control else 0)
    )
    bootinfo.store_platform(cpu, bootinfo.PlatformInfo(
        flags=flags,
        c_bit_position=mem_encrypt.c_bit_position(cpu) if sev else 0,
        secret_area=MemoryRange(start=Gpa(SECRET_AREA_GPA), size=SECRET_AREA_SIZE) if sev else None,
        varstore=MemoryRange(start=Gpa(VARSTORE_GPA), size=VARSTORE_SIZE),
    ))
    varstore.format_store(cpu, VARSTORE_GPA, VARSTORE_SIZE)
    if sev:
        gate.store(cpu, gate.OPEN, mask)
        saved_state.clear_all(cpu, mask)
        mem_encrypt.clear_page_state(cpu, mask)
        # fw_cfg DMA goes through the bounce buffer: the device must read our requests
        # and we its data, so the page is shared (OVMF clears the C-bit in its PTE).
        mem_encrypt.move_to_shared(cpu, FW_CFG_BOUNCE_GPA, 1, mask)
        if mem_encrypt.reports_page_state(cpu):
            _goto(cpu, Phase.BOUNCE)
            mem_encrypt.map_gpa_range(cpu, FW_CFG_BOUNCE_GPA, 1, encrypted=False)
            return
    _read(cpu, fw_cfg.FW_CFG_SIGNATURE, 4, then=Phase.SIGNATURE)


def _bounce(cpu: GuestCpu) -> None:
    if mem_encrypt.hypercall_error(cpu.regs.rax):
        bootinfo.store_hypercall_error(cpu, cpu.regs.rax)  # reported on the console later
    _read(cpu, fw_cfg.FW_CFG_SIGNATURE, 4, then=Phase.SIGNATURE)


def _signature(cpu: GuestCpu) -> None:
    if fw_cfg.finish_read(cpu) != b"QEMU":
        _fatal(cpu, "no fw_cfg device")
        return
    _read(cpu, fw_cfg.FW_CFG_ID, 4, then=Phase.ID)


def _id(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu)
    if data is None or not int.from_bytes(data, "little") & fw_cfg.FW_CFG_VERSION_DMA:
        _fatal(cpu, "fw_cfg has no DMA interface")
        return
    _read(cpu, fw_cfg.FW_CFG_FILE_DIR, FW_CFG_DMA_DATA_MAX, then=Phase.FILE_DIR)


def _file_dir(cpu: GuestCpu) -> None:
    directory = fw_cfg.finish_read(cpu) or b""
    found = fw_cfg.find_file(directory, E820_FILE)
    if found is None:
        _fatal(cpu, f"fw_cfg has no {E820_FILE}")
        return
    if fw_cfg.find_file(directory, NO_MIGRATION_FILE) is not None:
        bootinfo.set_flags(cpu, bootinfo.PLATFORM_NO_MIGRATION)
    target = fw_cfg.find_file(directory, MIGRATION_TARGET_FILE)
    if target is not None:  # read after the banners, once the Migration Handler is ready
        cpu.regs.r12 = target[0] << 32 | min(target[1], FW_CFG_DMA_DATA_MAX)
    selector, size = found
    _read(cpu, selector, min(size, bootinfo.E820_MAX * _E820_ENTRY_SIZE), then=Phase.E820)


def _e820(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu)
    if not data:
        _fatal(cpu, f"cannot read {E820_FILE}")
        return
    whole = len(data) - len(data) % _E820_ENTRY_SIZE
    entries = [
        _e820_entry(
            address=int.from_bytes(data[i : i + 8], "little"),
            length=int.from_bytes(data[i + 8 : i + 16], "little"),
            type=int.from_bytes(data[i + 16 : i + 20], "little"),
        )
        for i in range(0, whole, _E820_ENTRY_SIZE)
    ]
    bootinfo.store_e820(cpu, entries)
    _read(cpu, fw_cfg.FW_CFG_CMDLINE_SIZE, 4, then=Phase.CMDLINE_SIZE)


def _e820_entry(*, address: int, length: int, type: int) -> bootinfo.E820Entry:
    """An entry as the kernel gets it: the flash is never RAM, whatever the host says
    (OVMF builds the OS's memory map itself; the flash is not in it)."""
    if type == bootinfo.E820_RAM and FLASH_WINDOW.contains(address, max(length, 1)):
        type = bootinfo.E820_RESERVED
    return bootinfo.E820Entry(address=address, length=length, type=type)


def _cmdline_size(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu)
    size = int.from_bytes(data, "little") if data else 0
    if size > bootinfo.CMDLINE_MAX + 1:  # the size counts the NUL
        _fatal(cpu, f"command line of {size} bytes exceeds {bootinfo.CMDLINE_MAX}")
        return
    _read(cpu, fw_cfg.FW_CFG_CMDLINE_DATA, size, then=Phase.CMDLINE_DATA)


def _cmdline_data(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu) or b""
    bootinfo.store_cmdline(cpu, data.split(b"\0", 1)[0])
    _read(cpu, fw_cfg.FW_CFG_NB_CPUS, 2, then=Phase.NB_CPUS)


def _nb_cpus(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu)
    nb_cpus = max(1, int.from_bytes(data, "little")) if data else 1
    platform = bootinfo.load_platform(cpu)
    if platform.sev:
        _launch_secret(cpu)
        _set_migration_variable(cpu, platform)
    bootinfo.seal(cpu, nb_cpus)
    info = bootinfo.load(cpu)
    banner = (
        f"confmig firmware {FIRMWARE_VERSION}: fw_cfg DMA, {nb_cpus} CPU(s), "
        f"RAM {info.ram_size // MiB} MiB"
    )
    if platform.sev:
        kind = "SEV-ES" if platform.flags & bootinfo.PLATFORM_SEV_ES else "SEV"
        banner += f", {kind} (C-bit {platform.c_bit_position})"
        _goto(cpu, Phase.SECRET)
    else:
        cpu.regs.rip = KERNEL_BASE
    cpu.outs(COM1_PORT, (banner + "\n").encode())


def _launch_secret(cpu: GuestCpu) -> None:
    """Read the secret area (private: LAUNCH_SECRET encrypted it under our key) and
    record what it holds; the secret itself stays where it is."""
    area = cpu.read(mem_encrypt.private(cpu, SECRET_AREA_GPA), SECRET_AREA_SIZE)
    bootinfo.store_secret(cpu, secret.parse_secret_table(area))


def _set_migration_variable(cpu: GuestCpu, platform: bootinfo.PlatformInfo) -> None:
    """OVMF's AmdSevDxe at EndOfDxe: SevLiveMigrationEnabled, if the hypervisor
    offers migration control (KVM_FEATURE_MIGRATION_CONTROL)."""
    if not platform.flags & bootinfo.PLATFORM_MIGRATION_CONTROL:
        return
    if platform.flags & bootinfo.PLATFORM_NO_MIGRATION:
        return
    attributes = (varstore.EFI_VARIABLE_NON_VOLATILE | varstore.EFI_VARIABLE_BOOTSERVICE_ACCESS
                  | varstore.EFI_VARIABLE_RUNTIME_ACCESS)
    varstore.set_variable(cpu, VARSTORE_GPA, VARSTORE_SIZE, varstore.Variable(
        name=varstore.SEV_LIVE_MIGRATION_ENABLED, guid=varstore.AMD_SEV_MEM_ENCRYPT_GUID,
        attributes=attributes, data=b"\x01",
    ))
    bootinfo.set_flags(cpu, bootinfo.PLATFORM_MIGRATION_VARIABLE)


def _secret(cpu: GuestCpu) -> None:
    platform = bootinfo.load_platform(cpu)
    table = secret.SecretTable(status=platform.secret_status, entries=platform.secret_entries,
                               detail=platform.secret_detail)
    mh_area = MemoryRange(start=Gpa(MH_AREA_GPA), size=MH_AREA_SIZE)
    if any(r.start <= mh_area.start and mh_area.end <= r.end for r in bootinfo.load(cpu).ram):
        cpu.regs.rbx = 0  # mailbox pages shared so far
        _goto(cpu, Phase.MH_SHARE)
    else:
        _goto(cpu, Phase.AFTER_MH)  # RAM ends below 16 MiB: no Migration Handler
    cpu.outs(COM1_PORT, (table.line + "\n").encode())


def _mh_share(cpu: GuestCpu) -> None:
    """The Migration Handler's mailboxes become shared, zeroed, one reported batch a step."""
    mask = mem_encrypt.encryption_mask(cpu)
    done = cpu.regs.rbx
    n = min(mem_encrypt.PAGE_STATE_BATCH, MH_MAILBOX_PAGES - done)
    gpa = MH_MAILBOX_GPA + done * PAGE_SIZE
    mem_encrypt.move_to_shared(cpu, gpa, n, mask, zero=True)
    cpu.regs.rbx = done + n
    if mem_encrypt.reports_page_state(cpu, mask):
        _goto(cpu, Phase.MH_SHARED)
        mem_encrypt.map_gpa_range(cpu, gpa, n, encrypted=False)
    elif cpu.regs.rbx == MH_MAILBOX_PAGES:
        _mh_ready(cpu, mask)


def _mh_shared(cpu: GuestCpu) -> None:
    if mem_encrypt.hypercall_error(cpu.regs.rax):
        bootinfo.store_hypercall_error(cpu, cpu.regs.rax)  # reported on the console later
    if cpu.regs.rbx == MH_MAILBOX_PAGES:
        _mh_ready(cpu, mem_encrypt.encryption_mask(cpu))
    else:
        _mh_share(cpu)


def _mh_ready(cpu: GuestCpu, mask: int) -> None:
    mh.prepare(cpu, mask)
    bootinfo.set_flags(cpu, bootinfo.PLATFORM_MIGRATION_HANDLER, mask)
    _goto(cpu, Phase.AFTER_MH)


def _after_mh(cpu: GuestCpu) -> None:
    platform = bootinfo.load_platform(cpu)
    if platform.hypercall_error and not platform.flags & bootinfo.PLATFORM_HYPERCALL_REPORTED:
        _goto(cpu, Phase.HC_REPORT)
    else:
        _goto(cpu, Phase.TARGET_READ)


def _hc_report(cpu: GuestCpu) -> None:
    platform = bootinfo.load_platform(cpu)
    bootinfo.set_flags(cpu, bootinfo.PLATFORM_HYPERCALL_REPORTED)
    _goto(cpu, Phase.TARGET_READ)
    line = mem_encrypt.hypercall_failure_line("firmware", platform.hypercall_error)
    cpu.outs(COM1_PORT, (line + "\n").encode())


def _target_read(cpu: GuestCpu) -> None:
    if not cpu.regs.r12:
        _boot_kernel(cpu)
        return
    _read(cpu, cpu.regs.r12 >> 32, cpu.regs.r12 & 0xFFFF_FFFF, then=Phase.TARGET)


def _boot_kernel(cpu: GuestCpu) -> None:
    """On to the kernel, unless the owner launched this guest as a migration target (its secret
    has a ticket): then the host's word and the owner's disagree, and it boots nothing."""
    mask = mem_encrypt.encryption_mask(cpu)
    if mask and mh.launch_ticket(cpu, mask) is not None:
        _fatal(cpu, TICKET_WITHOUT_TARGET)
        return
    cpu.regs.rip = KERNEL_BASE


def _target(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu) or b""
    if data.rstrip(b"\0 \n").lower() not in TRUE_WORDS:
        _boot_kernel(cpu)
        return
    mask = mem_encrypt.encryption_mask(cpu)
    platform = bootinfo.set_flags(cpu, bootinfo.PLATFORM_MIGRATION_TARGET, mask)
    if platform & bootinfo.PLATFORM_MIGRATION_HANDLER and not mh.await_incoming(cpu, mask):
        _fatal(cpu, TARGET_WITHOUT_TICKET)
        return
    _goto(cpu, Phase.RESTORE if platform & bootinfo.PLATFORM_SEV_ES else Phase.PARK)
    cpu.outs(COM1_PORT, (WAITING_LINE + "\n").encode())


def _park(cpu: GuestCpu) -> None:
    cpu.hlt()


def _restore(cpu: GuestCpu) -> None:
    mask = mem_encrypt.encryption_mask(cpu)
    session = mh.load_session(cpu, mask)
    arrived = session is not None and session.phase == mh.SessionPhase.RUNNING
    regs = saved_state.load(cpu, cpu.vcpu_id, mask) if arrived else None
    if regs is None or gate.closed(gate.load(cpu, mask)):
        cpu.hlt()  # not yet: the VMM enters us again
        return
    saved_state.clear(cpu, cpu.vcpu_id, mask)  # used once: a reboot boots
    saved_state.install(cpu, regs)


_PHASES: dict[int, Callable[[GuestCpu], None]] = {
    Phase.RESET: _reset,
    Phase.SIGNATURE: _signature,
    Phase.ID: _id,
    Phase.FILE_DIR: _file_dir,
    Phase.E820: _e820,
    Phase.CMDLINE_SIZE: _cmdline_size,
    Phase.CMDLINE_DATA: _cmdline_data,
    Phase.NB_CPUS: _nb_cpus,
    Phase.PARK: _park,
    Phase.BOUNCE: _bounce,
    Phase.SECRET: _secret,
    Phase.MH_SHARE: _mh_share,
    Phase.MH_SHARED: _mh_shared,
    Phase.AFTER_MH: _after_mh,
    Phase.HC_REPORT: _hc_report,
    Phase.TARGET_READ: _target_read,
    Phase.TARGET: _target,
    Phase.RESTORE: _restore,
    Phase.MH: mh.step,
}


step = phase_program("firmware", FIRMWARE_BASE, _PHASES)


REGION = RomRegion(name="firmware", base=FIRMWARE_BASE, size=FIRMWARE_SIZE, step=step)
