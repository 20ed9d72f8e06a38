"""Processes that end with their parent: Linux's parent-death signal (``PR_SET_PDEATHSIG``).

A lab starts hosts and VMMs, a host starts one process per vCPU. If the parent dies
without stopping them (SIGKILL, a crash), nothing else would, so each child asks the
kernel for a signal when its parent goes. The kernel ties the request to the parent
*thread* that started the child: a host starts a VM's vCPUs on that VM's thread, whose
end destroys the VM anyway; a lab starts its processes from the thread that runs it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping
from typing import Final

PR_SET_PDEATHSIG: Final = 1
"""From ``<linux/prctl.h>``."""
PARENT_PID_ENV: Final = "CONFMIG_PARENT_PID"
"""Set by a parent in a child's environment: the child ends with that process."""


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when ``parent`` exits.

    SIGKILL by default: when it is sent, the parent is gone and nobody waits for an orderly
    exit; the kernel frees what a child holds (memfds, sockets). A parent that died before
    the request was made goes unsignalled, so that case is checked here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # reparented already: the parent is gone
        os.kill(os.getpid(), sig)


def child_environment(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``base`` plus the marker that makes a confmig child end with this process."""
    return {**base, PARENT_PID_ENV: str(os.getpid())}


def adopt_parent_from_environment() -> None:
    """In a child: end with the parent the environment names, if it names one. The marker
    is removed so that this process's own children (started with their own) never see it."""
    value = os.environ.pop(PARENT_PID_ENV, None)
    if value is not None:
        die_with_parent(int(value))
