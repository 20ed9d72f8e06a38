"""The boot firmware: from the reset vector to the kernel.

A state machine whose state is ``rip``. Each phase consumes the result of the
previous fw_cfg transfer from the bounce buffer, records it in the boot-info
block, and starts the next transfer (one exiting ``out``)::

    RESET_VECTOR  APs park. The BSP clears the boot info, finds out whether it
                  runs as an SEV guest (CPUID 0x8000001F, MSR_AMD64_SEV) and
                  what the hypervisor offers (CPUID 0x40000001), formats the
                  variable store; in an SEV guest it makes the bounce buffer
                  shared and reports it (KVM_HC_MAP_GPA_RANGE) -> BOUNCE;
                  otherwise it reads the signature
    BOUNCE        the report's result (a failure is remembered) -> read the signature
    SIGNATURE     "QEMU"?                          -> read the feature ID
    ID            DMA supported?                   -> read the file directory
    FILE_DIR      find etc/e820 (and opt/confmig/no-migration) -> read etc/e820
    E820          store the memory map             -> read the command-line size
    CMDLINE_SIZE  fits in the boot info?           -> read the command line
    CMDLINE_DATA  store it                         -> read the CPU count
    NB_CPUS       store it. A plain guest: seal the boot info, print the banner,
                  jump to the kernel. An SEV guest first reads the launch secret
                  and sets SevLiveMigrationEnabled if the hypervisor offers
                  migration control (and fw_cfg does not opt out), then seals and
                  prints the banner -> SECRET
    SECRET        print the launch secret's verdict -> HC_REPORT or the kernel
    HC_REPORT     print that page-state reports fail (once) -> the kernel
    PARK          hlt, forever (APs, and the BSP after a fatal error)

In an SEV guest every firmware data access but the bounce buffer's carries the
C-bit (:func:`confmig.guest.mem_encrypt.private`); a plain guest boots exactly
as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from confmig.common.units import Gpa, MemoryRange, MiB
from confmig.guest import mem_encrypt
from confmig.guest.firmware import bootinfo, fw_cfg, secret, varstore
from confmig.guest.layout import (
    FIRMWARE_BASE,
    FIRMWARE_SIZE,
    FLASH_WINDOW,
    FW_CFG_BOUNCE_GPA,
    FW_CFG_DMA_DATA_MAX,
    KERNEL_BASE,
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
    bootinfo.clear(cpu)
    status = mem_encrypt.sev_status(cpu)
    sev = bool(status & MSR_AMD64_SEV_ENABLED)
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
        # fw_cfg DMA goes through the bounce buffer: the device must read our requests
        # and we its data, so the page is shared (OVMF clears the C-bit in its PTE).
        mem_encrypt.move_to_shared(cpu, FW_CFG_BOUNCE_GPA, 1)
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
    if platform.hypercall_error and not platform.flags & bootinfo.PLATFORM_HYPERCALL_REPORTED:
        _goto(cpu, Phase.HC_REPORT)
    else:
        cpu.regs.rip = KERNEL_BASE
    cpu.outs(COM1_PORT, (table.line + "\n").encode())


def _hc_report(cpu: GuestCpu) -> None:
    platform = bootinfo.load_platform(cpu)
    bootinfo.set_flags(cpu, bootinfo.PLATFORM_HYPERCALL_REPORTED)
    cpu.regs.rip = KERNEL_BASE
    line = mem_encrypt.hypercall_failure_line("firmware", platform.hypercall_error)
    cpu.outs(COM1_PORT, (line + "\n").encode())


def _park(cpu: GuestCpu) -> None:
    cpu.hlt()


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
    Phase.HC_REPORT: _hc_report,
}


step = phase_program("firmware", FIRMWARE_BASE, _PHASES)


REGION = RomRegion(name="firmware", base=FIRMWARE_BASE, size=FIRMWARE_SIZE, step=step)
