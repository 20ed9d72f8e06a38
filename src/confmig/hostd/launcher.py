"""Starts each vCPU in a process of its own (`python -m confmig.hostd.vcpu_process`)."""

from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_ROM = "confmig.guest.image:rom"


class VcpuSubprocess:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def terminate(self) -> None:
        if self._popen.poll() is None:
            self._popen.terminate()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            return self._popen.wait()


class SubprocessLauncher:
    """A :class:`confmig.kvm.ports.VcpuLauncher` that forks a Python process per vCPU."""

    def __init__(self, rom: str = DEFAULT_ROM, *, key_slots_fd: int | None = None,
                 tmr_fd: int | None = None) -> None:
        self.rom = rom
        self.key_slots_fd = key_slots_fd
        """The memory controller's key slots, shared with every core (platform to platform:
        KVM's code is never given this descriptor, though it shares this process)."""
        self.tmr_fd = tmr_fd
        """The SEV-ES TMR, where the cores keep the VMSA checksums (platform to platform too)."""

    def spawn(self, vcpu_id: int, vcpu_fd: int, control_fd: int) -> VcpuSubprocess:
        argv = [
            sys.executable, "-m", "confmig.hostd.vcpu_process",
            "--vcpu-id", str(vcpu_id), "--fd", str(vcpu_fd), "--control", str(control_fd),
            "--rom", self.rom, "--parent", str(os.getpid()),
        ]
        fds = [vcpu_fd, control_fd]
        if self.key_slots_fd is not None:
            argv += ["--key-slots", str(self.key_slots_fd)]
            fds.append(self.key_slots_fd)
        if self.tmr_fd is not None:
            argv += ["--tmr", str(self.tmr_fd)]
            fds.append(self.tmr_fd)
        return VcpuSubprocess(subprocess.Popen(argv, pass_fds=fds))
