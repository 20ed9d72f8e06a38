"""The ioctl channel between a VMM and its host (PROTOCOLS.md §1), sans-IO.

Each emulated file descriptor (``/dev/kvm``, a VM fd, a vCPU fd) is a Unix
stream socket to the host. A request is a fixed 16-byte header and a payload;
the reply echoes the request number and sequence and carries the result (``>= 0``
success, ``-errno`` failure) and a payload. File descriptors (RAM memfds, new VM
and vCPU fds, a VM fd named in ``KVM_ENABLE_CAP``) ride as SCM_RIGHTS ancillary
data on the header bytes.

Request numbers are the real KVM ioctl numbers (``_IOW(KVMIO, 0x46, ...)`` and
so on); payloads are the real structs' little-endian layouts where one exists.
Where the emulation needs something Linux does with other means, a pseudo
request is named for what it stands in for (``VCPU_SIG_IPI`` is the signal QEMU
sends a vCPU thread to kick it out of ``KVM_RUN``).

::

    request header  <u32 length> <u32 request> <u32 seq> <u32 nfds>   then payload
    reply header    <u32 length> <u32 request> <u32 seq> <i32 result> then payload
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from confmig.common.errors import ProtocolError

KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- system ioctls (/dev/kvm)
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
# --- VM ioctls
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, 16)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, 32)
KVM_ENABLE_CAP: Final = _iow(0xA3, 104)
KVM_MEMORY_ENCRYPT_OP: Final = _iowr(0xBA, 8)
KVM_CLEAR_DIRTY_LOG: Final = _iowr(0xC0, 24)
KVM_X86_SET_MSR_FILTER: Final = _iow(0xC6, 0x188)
# --- vCPU ioctls
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, 144)
KVM_SET_REGS: Final = _iow(0x82, 144)
KVM_INTERRUPT: Final = _iow(0x86, 4)
KVM_GET_MSRS: Final = _iowr(0x88, 8)
KVM_SET_MSRS: Final = _iow(0x89, 8)
KVM_GET_MP_STATE: Final = _ior(0x98, 4)
KVM_SET_MP_STATE: Final = _iow(0x99, 4)
KVM_NMI: Final = _io(0x9A)
KVM_SET_CPUID2: Final = _iow(0x90, 8)
# --- pseudo requests (documented stand-ins, never real ioctl numbers: top byte 0xFF)
VCPU_SIG_IPI: Final = 0xFF00_0001
"""The kick QEMU delivers with a signal; here a message on the vCPU fd. No reply."""

ASYNC_VCPU_REQUESTS: Final = frozenset({VCPU_SIG_IPI, KVM_INTERRUPT, KVM_NMI})
"""vCPU requests that act like signals/irqfds: accepted while KVM_RUN is in progress, no reply."""

NAMES: Final[dict[int, str]] = {
    v: k for k, v in list(globals().items()) if k.startswith(("KVM_", "VCPU_")) and isinstance(v, int)
}

# --- capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_CAP_X86_MSR_FILTER: Final = 189
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: Final = 197
"""On the mirror VM, ``args[0]`` the source VM's fd: share its SEV encryption context."""
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: Final = 206
"""On the target VM, ``args[0]`` the source VM's fd: take over its SEV encryption context."""
CAP_NAMES: Final[dict[int, str]] = {
    v: k for k, v in list(globals().items()) if k.startswith("KVM_CAP_") and isinstance(v, int)
}
"""Capability numbers are their own namespace (``KVM_CHECK_EXTENSION``, ``KVM_ENABLE_CAP``)."""

# KVM_CAP_X86_USER_SPACE_MSR's argument: which failed MSR accesses exit to the VMM.
KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK: Final = (
    KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER
)

# --- memory region flags
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

# --- exit reasons (struct kvm_run.exit_reason)
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_IO: Final = 2
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_HALTED: Final = 3

# --- bounds
MAX_PAYLOAD: Final = 64 << 20
"""Largest payload: a dirty bitmap of a 2 TiB slot is 64 MiB."""
MAX_FDS: Final = 4
"""No request passes more than a few descriptors."""

_REQ = struct.Struct("<IIII")
_REP = struct.Struct("<IIIi")
HEADER_SIZE: Final = 16


def name(request: int) -> str:
    return NAMES.get(request, f"ioctl {request:#x}")


def cap_name(cap: int) -> str:
    """``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM`` for 197: the name of a capability."""
    return CAP_NAMES.get(cap, f"capability {cap}")


@dataclass(frozen=True, slots=True)
class Request:
    request: int
    seq: int
    payload: bytes = b""
    nfds: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    request: int
    seq: int
    result: int
    payload: bytes = b""


def encode_request(req: Request) -> bytes:
    return _REQ.pack(len(req.payload), req.request, req.seq, req.nfds) + req.payload


def encode_reply(rep: Reply) -> bytes:
    return _REP.pack(len(rep.payload), rep.request, rep.seq, rep.result) + rep.payload


def unpack_request_header(header: bytes) -> tuple[int, int, int, int]:
    """(payload length, request, seq, nfds) as the peer wrote them, unchecked: for a reader
    that skips an oversized payload itself before :func:`decode_request_header` refuses it."""
    length, request, seq, nfds = _REQ.unpack(header)
    return length, request, seq, nfds


def decode_request_header(header: bytes) -> tuple[int, int, int, int]:
    """Return (payload length, request, seq, nfds), checking bounds."""
    length, request, seq, nfds = unpack_request_header(header)
    # SECURITY: lengths come from a peer process; bound them before allocating.
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{name(request)}: payload of {length} bytes exceeds {MAX_PAYLOAD}")
    if nfds > MAX_FDS:
        raise ProtocolError(f"{name(request)}: {nfds} file descriptors exceeds {MAX_FDS}")
    return length, request, seq, nfds


def decode_reply_header(header: bytes) -> tuple[int, int, int, int]:
    """Return (payload length, request, seq, result)."""
    length, request, seq, result = _REP.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{name(request)} reply: payload of {length} bytes exceeds bound")
    return length, request, seq, result


# --- payload structs ----------------------------------------------------------

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserspaceMemoryRegion:
    """``struct kvm_userspace_memory_region``; ``offset`` is the offset into the
    memfd passed with the request (it stands where ``userspace_addr`` is)."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    offset: int

    _S = struct.Struct("<IIQQQ")

    def encode(self) -> bytes:
        return self._S.pack(self.slot, self.flags, self.guest_phys_addr, self.memory_size, self.offset)

    @classmethod
    def decode(cls, data: bytes) -> UserspaceMemoryRegion:
        _check_len("kvm_userspace_memory_region", data, cls._S.size)
        slot, flags, gpa, size, off = cls._S.unpack(data)
        return cls(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, offset=off)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnableCap:
    """``struct kvm_enable_cap``."""

    cap: int
    flags: int = 0
    args: tuple[int, int, int, int] = (0, 0, 0, 0)

    _S = struct.Struct("<II4Q64x")

    def encode(self) -> bytes:
        return self._S.pack(self.cap, self.flags, *self.args)

    @classmethod
    def decode(cls, data: bytes) -> EnableCap:
        _check_len("kvm_enable_cap", data, cls._S.size)
        cap, flags, a0, a1, a2, a3 = cls._S.unpack(data)
        return cls(cap=cap, flags=flags, args=(a0, a1, a2, a3))


DIRTY_LOG = struct.Struct("<II")
"""``struct kvm_dirty_log`` head: slot, padding; the bitmap comes back in the reply."""
CLEAR_DIRTY_LOG = struct.Struct("<IIQ")
"""``struct kvm_clear_dirty_log`` head: slot, num_pages, first_page; then the bitmap."""
REGS = struct.Struct("<18Q")
"""``struct kvm_regs``: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags."""
MSR_ENTRY = struct.Struct("<IIQ")
"""``struct kvm_msr_entry``: index, reserved, data."""


CPUID_ENTRY = struct.Struct("<7I12x")
"""``struct kvm_cpuid_entry2``: function, index, flags, eax, ebx, ecx, edx, padding."""

CpuidEntries = dict[tuple[int, int], tuple[int, int, int, int]]
"""(function, index) → (eax, ebx, ecx, edx)."""


def encode_cpuid(entries: CpuidEntries) -> bytes:
    """``struct kvm_cpuid2``: nent, padding, entries."""
    body = b"".join(CPUID_ENTRY.pack(f, i, 0, *regs) for (f, i), regs in entries.items())
    return U32.pack(len(entries)) + b"\0\0\0\0" + body


def decode_cpuid(data: bytes) -> CpuidEntries:
    if len(data) < 8:
        raise ProtocolError("kvm_cpuid2: truncated")
    (n,) = U32.unpack_from(data)
    # SECURITY: the count is peer-controlled; KVM caps it at KVM_MAX_CPUID_ENTRIES (256).
    if n > 256:
        raise ProtocolError(f"kvm_cpuid2: {n} entries exceeds 256")
    _check_len("kvm_cpuid2", data, 8 + n * CPUID_ENTRY.size)
    out: CpuidEntries = {}
    for k in range(n):
        f, i, _flags, a, b, c, d = CPUID_ENTRY.unpack_from(data, 8 + k * CPUID_ENTRY.size)
        out[(f, i)] = (a, b, c, d)
    return out


def encode_msr_filter(write_exits: list[int]) -> bytes:
    """Our stand-in for ``struct kvm_msr_filter``: the MSRs whose *writes* the filter
    denies, so they exit to the VMM (``KVM_MSR_EXIT_REASON_FILTER``). Real KVM takes
    ranges with bitmaps; a list says the same for the few MSRs a VMM filters."""
    return U32.pack(len(write_exits)) + b"".join(U32.pack(m) for m in write_exits)


def decode_msr_filter(data: bytes) -> list[int]:
    if len(data) < 4:
        raise ProtocolError("kvm_msr_filter: truncated")
    (n,) = U32.unpack_from(data)
    if n > 64:
        raise ProtocolError(f"kvm_msr_filter: {n} MSRs exceeds 64")
    _check_len("kvm_msr_filter", data, 4 + 4 * n)
    return [U32.unpack_from(data, 4 + 4 * k)[0] for k in range(n)]


def encode_msrs(entries: dict[int, int]) -> bytes:
    out = U32.pack(len(entries)) + b"\0\0\0\0"
    return out + b"".join(MSR_ENTRY.pack(i, 0, v) for i, v in entries.items())


def decode_msrs(data: bytes) -> dict[int, int]:
    if len(data) < 8:
        raise ProtocolError("kvm_msrs: truncated")
    (n,) = U32.unpack_from(data)
    # SECURITY: the count is peer-controlled.
    _check_len("kvm_msrs", data, 8 + n * MSR_ENTRY.size)
    return {
        idx: val for idx, _r, val in (MSR_ENTRY.unpack_from(data, 8 + i * MSR_ENTRY.size) for i in range(n))
    }


def _check_len(what: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise ProtocolError(f"{what}: {len(data)} bytes, expected {expected}")


# --- KVM_RUN ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRequest:
    """What the VMM writes into ``struct kvm_run`` before ``KVM_RUN``: the
    completion of the previous exit and ``immediate_exit``."""

    immediate_exit: bool = False
    completion: bytes = b""

    def encode(self) -> bytes:
        return bytes([self.immediate_exit]) + self.completion

    @classmethod
    def decode(cls, data: bytes) -> RunRequest:
        if not data:
            raise ProtocolError("KVM_RUN: empty request")
        return cls(immediate_exit=bool(data[0]), completion=bytes(data[1:]))


@dataclass(frozen=True, slots=True)
class ExitIo:
    direction: int
    size: int
    port: int
    count: int
    data: bytes = b""
    reason = KVM_EXIT_IO


@dataclass(frozen=True, slots=True)
class ExitMmio:
    phys_addr: int
    length: int
    is_write: bool
    data: bytes = b""
    reason = KVM_EXIT_MMIO


@dataclass(frozen=True, slots=True)
class ExitHypercall:
    nr: int
    args: tuple[int, ...]
    reason = KVM_EXIT_HYPERCALL


@dataclass(frozen=True, slots=True)
class ExitMsr:
    """``KVM_EXIT_X86_RDMSR`` / ``KVM_EXIT_X86_WRMSR``."""

    write: bool
    index: int
    data: int = 0

    @property
    def reason(self) -> int:
        return KVM_EXIT_X86_WRMSR if self.write else KVM_EXIT_X86_RDMSR


@dataclass(frozen=True, slots=True)
class ExitHlt:
    reason = KVM_EXIT_HLT


@dataclass(frozen=True, slots=True)
class ExitShutdown:
    reason = KVM_EXIT_SHUTDOWN


@dataclass(frozen=True, slots=True)
class ExitIntr:
    """``KVM_RUN`` returned ``-EINTR``: kicked, or ``immediate_exit`` was set."""

    reason = KVM_EXIT_INTR


@dataclass(frozen=True, slots=True)
class ExitFailEntry:
    """``KVM_EXIT_FAIL_ENTRY``: VMRUN refused the guest (on SVM the reason is the VMCB's exit
    code, ``SVM_EXIT_ERR``); the guest did not run."""

    hardware_entry_failure_reason: int
    cpu: int = 0
    reason = KVM_EXIT_FAIL_ENTRY


@dataclass(frozen=True, slots=True)
class ExitInternalError:
    message: str
    reason = KVM_EXIT_INTERNAL_ERROR


VcpuExit = (
    ExitIo | ExitMmio | ExitHypercall | ExitMsr | ExitHlt | ExitShutdown | ExitIntr | ExitFailEntry
    | ExitInternalError
)

_IO = struct.Struct("<BBHI")
_MMIO = struct.Struct("<QIB")
_MSR = struct.Struct("<BIQ")
_FAIL_ENTRY = struct.Struct("<QI")
"""``kvm_run.fail_entry``: hardware_entry_failure_reason, cpu."""


def encode_exit(ex: VcpuExit) -> bytes:
    head = U32.pack(ex.reason)
    match ex:
        case ExitIo():
            return head + _IO.pack(ex.direction, ex.size, ex.port, ex.count) + ex.data
        case ExitMmio():
            return head + _MMIO.pack(ex.phys_addr, ex.length, ex.is_write) + ex.data
        case ExitHypercall():
            return head + struct.pack("<Q6Q", ex.nr, *(list(ex.args) + [0] * 6)[:6])
        case ExitMsr():
            return head + _MSR.pack(ex.write, ex.index, ex.data)
        case ExitFailEntry():
            return head + _FAIL_ENTRY.pack(ex.hardware_entry_failure_reason, ex.cpu)
        case ExitInternalError():
            return head + ex.message.encode()[:1024]
        case _:
            return head


def decode_exit(data: bytes) -> VcpuExit:
    if len(data) < 4:
        raise ProtocolError("kvm_run: truncated exit")
    (reason,) = U32.unpack_from(data)
    body = data[4:]
    try:
        if reason == KVM_EXIT_IO:
            d, size, port, count = _IO.unpack_from(body)
            return ExitIo(d, size, port, count, bytes(body[_IO.size :]))
        if reason == KVM_EXIT_MMIO:
            addr, length, w = _MMIO.unpack_from(body)
            return ExitMmio(addr, length, bool(w), bytes(body[_MMIO.size :]))
        if reason == KVM_EXIT_HYPERCALL:
            nr, *args = struct.unpack_from("<Q6Q", body)
            return ExitHypercall(nr, tuple(args))
        if reason in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            w, index, val = _MSR.unpack_from(body)
            return ExitMsr(bool(w), index, val)
        if reason == KVM_EXIT_FAIL_ENTRY:
            return ExitFailEntry(*_FAIL_ENTRY.unpack_from(body))
    except struct.error as exc:
        raise ProtocolError(f"kvm_run: truncated exit {reason}") from exc
    simple: dict[int, VcpuExit] = {
        KVM_EXIT_HLT: ExitHlt(), KVM_EXIT_SHUTDOWN: ExitShutdown(), KVM_EXIT_INTR: ExitIntr(),
    }
    if reason in simple:
        return simple[reason]
    if reason == KVM_EXIT_INTERNAL_ERROR:
        return ExitInternalError(body.decode(errors="replace"))
    raise ProtocolError(f"kvm_run: unknown exit reason {reason}")
