"""The boot-info block: what the firmware hands the kernel (at ``BOOT_INFO_GPA``).

The firmware clears it at reset, fills it piece by piece as its fw_cfg reads
complete and writes the magic last, so a kernel that finds the magic finds a
whole block. It is guest-private: in an SEV guest it is reached with the C-bit::

    +0      8s    magic "CMBOOT01"
    +8      le32  CPU count
    +12     le32  e820 entry count (<= E820_MAX)
    +16     le32  command-line length (<= CMDLINE_MAX, no NUL)
    +32     e820 entries: le64 address, le64 length, le32 type, le32 0
    +1024   command line
    +3072   platform (confidential computing):
            le32 flags (PLATFORM_*), le32 C-bit position (0: not SEV),
            le64 first failed KVM_HC_MAP_GPA_RANGE result (as u64; 0: none),
            le64 secret area GPA, le32 its size, le32 secret status (SecretStatus),
            le32 secret entries kept, le32 0,
            le64 variable store GPA, le32 its size, le32 0
    +3136   secret entries (<= SECRET_ENTRIES_MAX): 16s GUID, le32 data offset, le32 data length
    +3584   le32 length, then why the secret table was ignored (ASCII, <= SECRET_DETAIL_MAX)

The functions the kernel and workloads call take the step's encryption mask
(``mask``); without one they find it out (:func:`confmig.guest.mem_encrypt.step_mask`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from confmig.common.units import PAGE_SIZE, Gpa, MemoryRange
from confmig.guest.firmware.secret import SECRET_ENTRIES_MAX, SecretEntry, SecretStatus, SecretTable
from confmig.guest.layout import BOOT_INFO_GPA
from confmig.guest.mem_encrypt import step_mask
from confmig.platform.cpu.abi import GuestCpu, GuestFault

BOOT_INFO_MAGIC = b"CMBOOT01"
E820_MAX = 32
"""Entries kept; QEMU's pc machine reports two RAM ranges."""
CMDLINE_MAX = 2048
"""Longest command line, as Linux's COMMAND_LINE_SIZE on x86."""
E820_RAM = 1
E820_RESERVED = 2

PLATFORM_SEV = 1 << 0
"""``MSR_AMD64_SEV`` bit 0: this guest's memory is encrypted."""
PLATFORM_SEV_ES = 1 << 1
PLATFORM_MIGRATION_CONTROL = 1 << 2
"""The hypervisor advertises ``KVM_FEATURE_MIGRATION_CONTROL``."""
PLATFORM_NO_MIGRATION = 1 << 3
"""fw_cfg ``opt/confmig/no-migration`` is present: the firmware does not set the variable."""
PLATFORM_MIGRATION_VARIABLE = 1 << 4
"""The firmware set ``SevLiveMigrationEnabled``."""
PLATFORM_HYPERCALL_REPORTED = 1 << 5
"""A failed ``KVM_HC_MAP_GPA_RANGE`` was reported on the console (report it once per boot)."""
PLATFORM_MIGRATION_HANDLER = 1 << 6
"""The firmware prepared the Migration Handler's area (an SEV guest with RAM up to 16 MiB)."""
PLATFORM_MIGRATION_TARGET = 1 << 7
"""fw_cfg ``opt/ovmf/PcdSevIsMigrationTarget`` is true: the firmware waits for an incoming
migration instead of booting the kernel."""

_HEADER = struct.Struct("<8sIII")
_E820 = struct.Struct("<QQII")
_E820_OFFSET = 32
_CMDLINE_OFFSET = 1024
_PLATFORM_OFFSET = 3072
_PLATFORM = struct.Struct("<IIQQIIIIQII")
_FLAGS_OFFSET = _PLATFORM_OFFSET
_HC_ERROR_OFFSET = _PLATFORM_OFFSET + 8
_SECRET_OFFSET = _PLATFORM_OFFSET + 24
_SECRET_ENTRIES_OFFSET = 3136
_SECRET_ENTRY = struct.Struct("<16sII")
_SECRET_DETAIL_OFFSET = 3584
SECRET_DETAIL_MAX = 256
"""Longest reason kept for an ignored secret table (the console line carries it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class E820Entry:
    address: int
    length: int
    type: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformInfo:
    """What the firmware found out about the platform, for the kernel."""

    flags: int = 0
    c_bit_position: int = 0
    hypercall_error: int = 0
    """The first failed page-state report's result (as u64), 0 if none failed."""
    secret_area: MemoryRange | None = None
    secret_status: SecretStatus = SecretStatus.ABSENT
    secret_entries: tuple[SecretEntry, ...] = ()
    varstore: MemoryRange | None = None
    secret_detail: str = ""
    """Why the secret table was ignored (empty for a valid table or none)."""

    @property
    def sev(self) -> bool:
        return bool(self.flags & PLATFORM_SEV)


@dataclass(frozen=True, slots=True, kw_only=True)
class BootInfo:
    nb_cpus: int
    e820: tuple[E820Entry, ...]
    cmdline: str
    platform: PlatformInfo

    @property
    def ram(self) -> list[MemoryRange]:
        return _ram(self.e820)

    @property
    def ram_size(self) -> int:
        return sum(r.size for r in self.ram)


def _ram(e820: tuple[E820Entry, ...]) -> list[MemoryRange]:
    return [MemoryRange(start=Gpa(e.address), size=e.length) for e in e820 if e.type == E820_RAM]


def _at(cpu: GuestCpu, offset: int, mask: int | None = None) -> int:
    return (BOOT_INFO_GPA + offset) | step_mask(cpu, mask)


def clear(cpu: GuestCpu) -> None:
    """Start afresh (RAM need not start zeroed, and a reboot finds the old block)."""
    cpu.write(_at(cpu, 0), bytes(PAGE_SIZE))


def store_e820(cpu: GuestCpu, entries: list[E820Entry]) -> None:
    kept = entries[:E820_MAX]
    cpu.write(_at(cpu, 12), len(kept).to_bytes(4, "little"))
    table = b"".join(_E820.pack(e.address, e.length, e.type, 0) for e in kept)
    cpu.write(_at(cpu, _E820_OFFSET), table)


def store_cmdline(cpu: GuestCpu, cmdline: bytes) -> None:
    text = cmdline[:CMDLINE_MAX]
    cpu.write(_at(cpu, 16), len(text).to_bytes(4, "little"))
    cpu.write(_at(cpu, _CMDLINE_OFFSET), text)


def store_platform(cpu: GuestCpu, p: PlatformInfo) -> None:
    """The platform section (the secret entries go with :func:`store_secret`)."""
    area = p.secret_area or MemoryRange(start=Gpa(0), size=0)
    store = p.varstore or MemoryRange(start=Gpa(0), size=0)
    cpu.write(_at(cpu, _PLATFORM_OFFSET), _PLATFORM.pack(
        p.flags, p.c_bit_position, p.hypercall_error, area.start, area.size, p.secret_status,
        len(p.secret_entries), 0, store.start, store.size, 0,
    ))


def set_flags(cpu: GuestCpu, flags: int, mask: int | None = None) -> int:
    """Set ``flags``; returns the flags as they were."""
    at = _at(cpu, _FLAGS_OFFSET, mask)
    current = int.from_bytes(cpu.read(at, 4), "little")
    cpu.write(at, (current | flags).to_bytes(4, "little"))
    return current


def store_hypercall_error(cpu: GuestCpu, rax: int, mask: int | None = None) -> None:
    """Remember a failed page-state report (the first one) for the console."""
    at = _at(cpu, _HC_ERROR_OFFSET, mask)
    if not int.from_bytes(cpu.read(at, 8), "little"):
        cpu.write(at, rax.to_bytes(8, "little"))


def claim_hypercall_report(cpu: GuestCpu, mask: int | None = None) -> bool:
    """Whether the caller is the one to print that page-state reports fail: True the
    first time in a boot (firmware, kernel and workload share the flag)."""
    return not set_flags(cpu, PLATFORM_HYPERCALL_REPORTED, mask) & PLATFORM_HYPERCALL_REPORTED


def store_secret(cpu: GuestCpu, table: SecretTable) -> None:
    """The launch secret's verdict, its entries' GUIDs and lengths and, for an ignored
    table, why; never its bytes (the detail names only lengths and offsets)."""
    kept = table.entries[:SECRET_ENTRIES_MAX]
    cpu.write(_at(cpu, _SECRET_OFFSET + 4), struct.pack("<II", table.status, len(kept)))
    cpu.write(_at(cpu, _SECRET_ENTRIES_OFFSET), b"".join(
        _SECRET_ENTRY.pack(e.guid.bytes_le, e.offset, e.length) for e in kept))
    detail = table.detail.encode("ascii", errors="replace")[:SECRET_DETAIL_MAX]
    cpu.write(_at(cpu, _SECRET_DETAIL_OFFSET), len(detail).to_bytes(4, "little") + detail)


def seal(cpu: GuestCpu, nb_cpus: int) -> None:
    """Record the CPU count and publish the block (magic last)."""
    cpu.write(_at(cpu, 8), nb_cpus.to_bytes(4, "little"))
    cpu.write(_at(cpu, 0), BOOT_INFO_MAGIC)


def _secret_status(value: int) -> SecretStatus:
    try:
        return SecretStatus(value)
    except ValueError:
        return SecretStatus.ABSENT


def _load_platform(raw: bytes) -> PlatformInfo:
    (flags, cbit, hc_error, area_gpa, area_size, status, n_secret, _, store_gpa, store_size,
     _) = _PLATFORM.unpack_from(raw, _PLATFORM_OFFSET)
    n_secret = min(n_secret, SECRET_ENTRIES_MAX)
    entries = tuple(
        SecretEntry(guid=uuid.UUID(bytes_le=g), offset=off, length=n)
        for g, off, n in _SECRET_ENTRY.iter_unpack(
            raw[_SECRET_ENTRIES_OFFSET : _SECRET_ENTRIES_OFFSET + n_secret * _SECRET_ENTRY.size])
    )
    detail_len = min(int.from_bytes(raw[_SECRET_DETAIL_OFFSET : _SECRET_DETAIL_OFFSET + 4], "little"),
                     SECRET_DETAIL_MAX)
    detail_at = _SECRET_DETAIL_OFFSET + 4
    return PlatformInfo(
        flags=flags, c_bit_position=cbit, hypercall_error=hc_error,
        secret_area=MemoryRange(start=Gpa(area_gpa), size=area_size) if area_size else None,
        secret_status=_secret_status(status),
        secret_entries=entries,
        varstore=MemoryRange(start=Gpa(store_gpa), size=store_size) if store_size else None,
        secret_detail=raw[detail_at : detail_at + detail_len].decode("ascii", errors="replace"),
    )


def load_platform(cpu: GuestCpu, mask: int | None = None) -> PlatformInfo:
    """The platform section, sealed or not (the firmware reads it back while booting)."""
    return _load_platform(cpu.read(_at(cpu, 0, mask), PAGE_SIZE))


def _header(raw: bytes) -> tuple[int, int, int]:
    """``(nb_cpus, e820 entries, cmdline length)`` of a published block."""
    magic, nb_cpus, n_e820, cmdline_len = _HEADER.unpack_from(raw)
    if magic != BOOT_INFO_MAGIC or n_e820 > E820_MAX or cmdline_len > CMDLINE_MAX:
        raise GuestFault("kernel: no valid boot info from the firmware")
    return nb_cpus, n_e820, cmdline_len


def _e820(raw: bytes, n_e820: int) -> tuple[E820Entry, ...]:
    return tuple(
        E820Entry(address=a, length=n, type=t)
        for a, n, t, _ in _E820.iter_unpack(raw[_E820_OFFSET : _E820_OFFSET + n_e820 * _E820.size])
    )


def load(cpu: GuestCpu, mask: int | None = None) -> BootInfo:
    raw = cpu.read(_at(cpu, 0, mask), PAGE_SIZE)
    nb_cpus, n_e820, cmdline_len = _header(raw)
    cmdline = raw[_CMDLINE_OFFSET : _CMDLINE_OFFSET + cmdline_len].decode(errors="replace")
    return BootInfo(nb_cpus=nb_cpus, e820=_e820(raw, n_e820), cmdline=cmdline, platform=_load_platform(raw))


def load_ram(cpu: GuestCpu, mask: int | None = None) -> list[MemoryRange]:
    """:attr:`BootInfo.ram` reading only the header and the memory map (the Migration Handler
    asks on every command)."""
    at = _at(cpu, 0, mask)
    _, n_e820, _ = _header(cpu.read(at, _E820_OFFSET))
    raw = cpu.read(at, _E820_OFFSET + n_e820 * _E820.size)
    return _ram(_e820(raw, n_e820))
