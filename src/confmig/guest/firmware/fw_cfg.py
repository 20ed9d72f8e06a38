"""The firmware's fw_cfg driver: DMA reads through the bounce buffer.

A read is two steps. :func:`start_read` writes an ``FWCfgDmaAccess`` block
(select + read, big-endian) into the bounce buffer and issues the one exiting
``out``: the low half of the DMA address register, whose write runs the
transfer. The high half is never written: the device clears the register after
each transfer and the bounce buffer lies below 4 GiB. In the next step,
:func:`finish_read` checks that the device cleared the control word and returns
the data.

Selector numbers and structures are QEMU's (``docs/specs/fw_cfg.rst``).
"""

from __future__ import annotations

import struct

from confmig.guest.layout import FW_CFG_DMA_ACCESS_GPA, FW_CFG_DMA_DATA_GPA, FW_CFG_DMA_DATA_MAX
from confmig.platform.cpu.abi import FW_CFG_PORT_DMA_LO, GuestCpu

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_NB_CPUS = 0x0005
FW_CFG_CMDLINE_SIZE = 0x0014
FW_CFG_CMDLINE_DATA = 0x0015
FW_CFG_FILE_DIR = 0x0019
FW_CFG_VERSION_DMA = 0x02
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SELECT = 0x08

_ACCESS = struct.Struct(">IIQ")
_FILE = struct.Struct(">IHH56s")


def start_read(cpu: GuestCpu, selector: int, length: int) -> None:
    """Ask for the first ``length`` bytes of item ``selector``. Exits (last)."""
    length = min(length, FW_CFG_DMA_DATA_MAX)
    control = (selector << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ
    cpu.write(FW_CFG_DMA_ACCESS_GPA, _ACCESS.pack(control, length, FW_CFG_DMA_DATA_GPA))
    # The register is big-endian; `out` puts the value on the port little-endian.
    register = int.from_bytes(FW_CFG_DMA_ACCESS_GPA.to_bytes(4, "big"), "little")
    cpu.out(FW_CFG_PORT_DMA_LO, register, 4)


def finish_read(cpu: GuestCpu) -> bytes | None:
    """The data of the transfer :func:`start_read` began, or None if it failed."""
    control, length, _ = _ACCESS.unpack(cpu.read(FW_CFG_DMA_ACCESS_GPA, _ACCESS.size))
    if control != 0:  # ERROR set, or READ still set: the device never ran the transfer
        return None
    return cpu.read(FW_CFG_DMA_DATA_GPA, min(length, FW_CFG_DMA_DATA_MAX))


def find_file(directory: bytes, name: str) -> tuple[int, int] | None:
    """``(selector, size)`` of ``name`` in a FILE_DIR item, if listed."""
    if len(directory) < 4:
        return None
    count = int.from_bytes(directory[:4], "big")
    # SECURITY: the count is host-provided; only whole entries we actually read count.
    entries = directory[4 : 4 + min(count, (len(directory) - 4) // _FILE.size) * _FILE.size]
    wanted = name.encode()
    for size, select, _, raw_name in _FILE.iter_unpack(entries):
        if raw_name.split(b"\0", 1)[0] == wanted:
            return select, size
    return None
