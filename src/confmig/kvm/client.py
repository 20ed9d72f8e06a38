"""The VMM's side of KVM: ``/dev/kvm`` → VM fd → vCPU fd, as rust-vmm's kvm-ioctls.

Every method is one ioctl; failures raise :class:`KvmError` with the errno the
emulated kernel returned.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import numpy as np
import numpy.typing as npt

from confmig.common import bitmap
from confmig.common.errors import ConfigError, KvmError
from confmig.kvm import channel
from confmig.kvm.sev import SEV_CMD, SEV_ISSUE_CMD, fw_error_name, sev_cmd_name
from confmig.proto import ioctl


class SevCommandError(KvmError):
    """A ``KVM_MEMORY_ENCRYPT_OP`` failed; ``fw_error`` is the PSP status (0xFFFFFFFF:
    the firmware was not called), ``output`` what KVM still returned (length queries)."""

    def __init__(self, cmd_id: int, err: int, fw_error: int, output: bytes) -> None:
        super().__init__(f"KVM_MEMORY_ENCRYPT_OP({sev_cmd_name(cmd_id)})", err,
                         f"firmware error {fw_error:#x} ({fw_error_name(fw_error)})")
        self.fw_error = fw_error
        self.output = output


class _Fd:
    """One emulated file descriptor: a socket and an ioctl call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._seq = 0
        self._call = threading.Lock()
        self._send = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def ioctl(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
              *, check: bool = True) -> tuple[int, bytes, list[int]]:
        with self._call:
            self._seq = (self._seq + 1) & 0xFFFF_FFFF
            req = ioctl.Request(request, self._seq, payload, len(fds or ()))
            with self._send:
                channel.send_request(self.sock, req, fds)
            try:
                rep, rfds = channel.recv_reply(self.sock)
            except channel.ChannelClosed:
                raise KvmError(ioctl.name(request), errno.EIO, "host went away") from None
        if rep.seq != req.seq or rep.request != request:
            raise KvmError(ioctl.name(request), errno.EPROTO, "reply out of order")
        if check and rep.result < 0:
            for fd in rfds:
                os.close(fd)
            raise KvmError(ioctl.name(request), -rep.result)
        return rep.result, rep.payload, rfds

    def signal(self, request: int, payload: bytes = b"") -> None:
        """Send an asynchronous request (no reply), safe while another thread is in an ioctl."""
        with self._send:
            channel.send_request(self.sock, ioctl.Request(request, 0, payload))

    def close(self) -> None:
        self.sock.close()


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


class Kvm(_Fd):
    """An open ``/dev/kvm`` of the host serving ``path``."""

    def __init__(self, path: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            s.close()
            raise ConfigError(f"cannot reach the host at {path}: {exc.strerror or exc}") from exc
        super().__init__(s)
        version = self.ioctl(ioctl.KVM_GET_API_VERSION)[0]
        if version != ioctl.KVM_API_VERSION:
            raise ConfigError(f"host at {path} speaks KVM API {version}, expected 12")

    def check_extension(self, cap: int) -> int:
        return self.ioctl(ioctl.KVM_CHECK_EXTENSION, _u64(cap))[0]

    def sev_issue_cmd(self, cmd: int, data: bytes = b"") -> tuple[int, bytes]:
        """``/dev/sev`` SEV_ISSUE_CMD: (firmware status, outputs). Raises on a refused call."""
        result, payload, _ = self.ioctl(SEV_ISSUE_CMD, struct.pack("<I", cmd) + data, check=False)
        status = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0xFFFF_FFFF
        if result < 0:
            raise KvmError("SEV_ISSUE_CMD", -result, f"firmware status {status:#x}")
        return status, payload[4:]

    def create_vm(self, vm_type: int = 0) -> VmFd:
        _, _, fds = self.ioctl(ioctl.KVM_CREATE_VM, _u64(vm_type))
        return VmFd(socket.socket(fileno=fds[0]))


class VmFd(_Fd):
    def check_extension(self, cap: int) -> int:
        return self.ioctl(ioctl.KVM_CHECK_EXTENSION, _u64(cap))[0]

    def set_user_memory_region(self, region: ioctl.UserspaceMemoryRegion, memfd: int | None) -> None:
        self.ioctl(ioctl.KVM_SET_USER_MEMORY_REGION, region.encode(),
                   [memfd] if memfd is not None else None)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        _, _, fds = self.ioctl(ioctl.KVM_CREATE_VCPU, _u64(vcpu_id))
        return VcpuFd(socket.socket(fileno=fds[0]), vcpu_id)

    def enable_cap(self, cap: int, *args: int) -> None:
        self._enable_cap(cap, args, None)

    def enable_cap_fd(self, cap: int, fd: int, *args: int) -> None:
        """``KVM_ENABLE_CAP`` of a cap whose ``args[0]`` is a file descriptor: for
        ``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``, on the mirror VM, and for
        ``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``, on the destination VM, the source VM's fd
        (``source.fileno()``). The descriptor goes with the request (a number means nothing
        in the host's process); ``args[0]`` still carries it, as in Linux."""
        self._enable_cap(cap, (fd, *args), [fd])

    def _enable_cap(self, cap: int, args: tuple[int, ...], fds: list[int] | None) -> None:
        if len(args) > 4:
            raise ValueError(f"struct kvm_enable_cap has 4 args, got {len(args)}")
        a0, a1, a2, a3 = (*args, 0, 0, 0, 0)[:4]
        payload = ioctl.EnableCap(cap=cap, args=(a0, a1, a2, a3)).encode()
        result, _, _ = self.ioctl(ioctl.KVM_ENABLE_CAP, payload, fds, check=False)
        if result < 0:
            raise KvmError(f"KVM_ENABLE_CAP({ioctl.cap_name(cap)})", -result)

    def get_dirty_log(self, slot: int, npages: int) -> npt.NDArray[np.bool_]:
        _, payload, _ = self.ioctl(ioctl.KVM_GET_DIRTY_LOG, ioctl.DIRTY_LOG.pack(slot, 0))
        return bitmap.unpack(np.frombuffer(payload, dtype=np.uint8), npages)

    def memory_encrypt_op(self, cmd_id: int, data: bytes = b"") -> tuple[int, bytes]:
        """``KVM_MEMORY_ENCRYPT_OP``: returns (firmware ``error``, outputs); raises
        :class:`KvmError` (with the firmware status in its text) when KVM fails."""
        payload = SEV_CMD.pack(cmd_id, 0, 0, 0, 0) + data
        result, reply, _ = self.ioctl(ioctl.KVM_MEMORY_ENCRYPT_OP, payload, check=False)
        error = SEV_CMD.unpack_from(reply)[3] if len(reply) >= SEV_CMD.size else 0xFFFF_FFFF
        out = reply[SEV_CMD.size :]
        if result < 0:
            raise SevCommandError(cmd_id, -result, error, out)
        return error, out

    def set_msr_filter(self, write_exits: list[int]) -> None:
        self.ioctl(ioctl.KVM_X86_SET_MSR_FILTER, ioctl.encode_msr_filter(write_exits))

    def clear_dirty_log(self, slot: int, first_page: int, flags: npt.NDArray[np.bool_]) -> None:
        head = ioctl.CLEAR_DIRTY_LOG.pack(slot, len(flags), first_page)
        self.ioctl(ioctl.KVM_CLEAR_DIRTY_LOG, head + bitmap.pack(flags).tobytes())


class VcpuFd(_Fd):
    def __init__(self, sock: socket.socket, vcpu_id: int) -> None:
        super().__init__(sock)
        self.vcpu_id = vcpu_id

    def run(self, completion: bytes = b"", *, immediate_exit: bool = False) -> ioctl.VcpuExit:
        """``KVM_RUN``: the exit (``-EINTR`` still carries one). Raises :class:`KvmError` for a
        run that has none: ``EIO`` once the VM is dead (its encryption context moved away)."""
        req = ioctl.RunRequest(immediate_exit=immediate_exit, completion=completion)
        result, payload, _ = self.ioctl(ioctl.KVM_RUN, req.encode(), check=False)
        if result < 0 and result != -errno.EINTR:
            raise KvmError(ioctl.name(ioctl.KVM_RUN), -result)
        return ioctl.decode_exit(payload)

    def get_regs(self) -> tuple[int, ...]:
        return ioctl.REGS.unpack(self.ioctl(ioctl.KVM_GET_REGS)[1])

    def set_regs(self, regs: tuple[int, ...]) -> None:
        self.ioctl(ioctl.KVM_SET_REGS, ioctl.REGS.pack(*regs))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        _n, payload, _ = self.ioctl(ioctl.KVM_GET_MSRS, ioctl.encode_msrs(dict.fromkeys(indices, 0)))
        return ioctl.decode_msrs(payload)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        return self.ioctl(ioctl.KVM_SET_MSRS, ioctl.encode_msrs(msrs))[0]

    def set_cpuid(self, entries: ioctl.CpuidEntries) -> None:
        self.ioctl(ioctl.KVM_SET_CPUID2, ioctl.encode_cpuid(entries))

    def get_mp_state(self) -> int:
        return int(struct.unpack("<I", self.ioctl(ioctl.KVM_GET_MP_STATE)[1])[0])

    def set_mp_state(self, state: int) -> None:
        self.ioctl(ioctl.KVM_SET_MP_STATE, struct.pack("<I", state))

    def kick(self) -> None:
        """Make a running ``KVM_RUN`` return ``-EINTR`` (QEMU's SIG_IPI)."""
        self.signal(ioctl.VCPU_SIG_IPI)

    def nmi(self) -> None:
        self.signal(ioctl.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        self.signal(ioctl.KVM_INTERRUPT, struct.pack("<I", vector))
