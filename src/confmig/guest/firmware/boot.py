"""The boot firmware: from the reset vector to the kernel.

A state machine whose state is ``rip``. Each phase consumes the result of the
previous fw_cfg transfer from the bounce buffer, records it in the boot-info
block, and starts the next transfer (one exiting ``out``)::

    RESET_VECTOR  APs park; the BSP reads the signature
    SIGNATURE     "QEMU"?                          -> read the feature ID
    ID            DMA supported?                   -> read the file directory
    FILE_DIR      find etc/e820                    -> read it
    E820          store the memory map             -> read the command-line size
    CMDLINE_SIZE  fits in the boot info?           -> read the command line
    CMDLINE_DATA  store it                         -> read the CPU count
    NB_CPUS       store it, seal the boot info, print the banner, jump to the kernel
    PARK          hlt, forever (APs, and the BSP after a fatal error)
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from confmig.common.units import MiB
from confmig.guest.firmware import bootinfo, fw_cfg
from confmig.guest.layout import FIRMWARE_BASE, FIRMWARE_SIZE, FW_CFG_DMA_DATA_MAX, KERNEL_BASE
from confmig.guest.phases import phase_program
from confmig.platform.cpu.abi import COM1_PORT, RESET_VECTOR, GuestCpu, RomRegion

FIRMWARE_VERSION = "1.0"
E820_FILE = "etc/e820"
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
    found = fw_cfg.find_file(fw_cfg.finish_read(cpu) or b"", E820_FILE)
    if found is None:
        _fatal(cpu, f"fw_cfg has no {E820_FILE}")
        return
    selector, size = found
    _read(cpu, selector, min(size, bootinfo.E820_MAX * _E820_ENTRY_SIZE), then=Phase.E820)


def _e820(cpu: GuestCpu) -> None:
    data = fw_cfg.finish_read(cpu)
    if not data:
        _fatal(cpu, f"cannot read {E820_FILE}")
        return
    whole = len(data) - len(data) % _E820_ENTRY_SIZE
    entries = [
        bootinfo.E820Entry(
            address=int.from_bytes(data[i : i + 8], "little"),
            length=int.from_bytes(data[i + 8 : i + 16], "little"),
            type=int.from_bytes(data[i + 16 : i + 20], "little"),
        )
        for i in range(0, whole, _E820_ENTRY_SIZE)
    ]
    bootinfo.store_e820(cpu, entries)
    _read(cpu, fw_cfg.FW_CFG_CMDLINE_SIZE, 4, then=Phase.CMDLINE_SIZE)


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
    bootinfo.seal(cpu, nb_cpus)
    ram = bootinfo.load(cpu).ram_size
    banner = (
        f"confmig firmware {FIRMWARE_VERSION}: fw_cfg DMA, {nb_cpus} CPU(s), "
        f"RAM {ram // MiB} MiB\n"
    )
    cpu.regs.rip = KERNEL_BASE
    cpu.outs(COM1_PORT, banner.encode())


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
}


step = phase_program("firmware", FIRMWARE_BASE, _PHASES)


REGION = RomRegion(name="firmware", base=FIRMWARE_BASE, size=FIRMWARE_SIZE, step=step)
