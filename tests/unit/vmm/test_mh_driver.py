"""The VMM's side of one MH vCPU's mailbox: publish order, the answer, and every way an MH can
fail to answer (a fake vCPU fd plays the MH)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import pytest

from confmig.guest.layout import MH_MAILBOX_GPA
from confmig.proto import ioctl
from confmig.proto import mailbox as mb
from confmig.vmm import mh
from confmig.vmm.mh import MhError, MhVcpu


class FakeFd:
    """KVM_RUN runs ``behaviour`` on the mailbox and returns its exit."""

    def __init__(self, mailbox: memoryview, behaviour: Callable[[memoryview], ioctl.VcpuExit]) -> None:
        self.mailbox = mailbox
        self.behaviour = behaviour
        self.kicked = threading.Event()

    def run(self) -> ioctl.VcpuExit:
        return self.behaviour(self.mailbox)

    def kick(self) -> None:
        self.kicked.set()


def answering(ret: int, length: int = 0) -> Callable[[memoryview], ioctl.VcpuExit]:
    def serve(box: memoryview) -> ioctl.VcpuExit:
        assert struct.unpack_from("<i", box, mb.GO_OFFSET)[0] == 1  # go was published
        assert struct.unpack_from("<i", box, mb.RET_OFFSET)[0] == -1
        struct.pack_into("<i", box, mb.RET_OFFSET, ret)
        struct.pack_into("<I", box, mb.LENGTH_OFFSET, length)
        struct.pack_into("<ii", box, mb.GO_OFFSET, 0, 1)
        return ioctl.ExitHlt()
    return serve


def vcpu(behaviour: Callable[[memoryview], ioctl.VcpuExit]) -> MhVcpu:
    box = memoryview(bytearray(mb.MAILBOX_STRIDE))
    v = MhVcpu(FakeFd(box, behaviour), 0, box, MH_MAILBOX_GPA)  # type: ignore[arg-type]
    v.entered = True  # MigrationHandler.start's first entry (see the test that needs it)
    return v


def test_an_mh_vcpu_not_started_is_never_entered() -> None:
    """Before start-migration-handler its registers are the reset state's: an entry would run
    the guest's boot code on the mirror (a migration that failed in setup used to RESET it so,
    and broke it for good)."""
    box = memoryview(bytearray(mb.MAILBOX_STRIDE))
    fd = FakeFd(box, answering(0))
    v = MhVcpu(fd, 0, box, MH_MAILBOX_GPA)  # type: ignore[arg-type]
    with pytest.raises(MhError, match="not started"):
        v.command(mb.MhCommand.RESET)
    assert v.broken is None and struct.unpack_from("<i", box, mb.GO_OFFSET)[0] == 0


def test_a_command_is_published_then_answered() -> None:
    v = vcpu(answering(0, length=123))
    answer = v.command(mb.MhCommand.INIT)
    assert (answer.ret, answer.go, answer.done, answer.length) == (0, 0, 1, 123)


def test_an_mh_that_halts_without_done_did_not_answer() -> None:
    v = vcpu(lambda box: ioctl.ExitHlt())
    with pytest.raises(MhError, match="did not complete INIT"):
        v.command(mb.MhCommand.INIT)


@pytest.mark.parametrize(("exit_", "message"), [
    (ioctl.ExitShutdown(), "shut down"),
    (ioctl.ExitFailEntry(hardware_entry_failure_reason=0x2), "entry failed"),
    (ioctl.ExitIntr(), "did not halt within"),
])
def test_an_mh_that_leaves_otherwise_fails_the_command(exit_: ioctl.VcpuExit, message: str) -> None:
    v = vcpu(lambda box: exit_)
    with pytest.raises(MhError, match=message):
        v.command(mb.MhCommand.EXPORT, slot=1)


def test_an_mh_that_never_halts_is_kicked_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mh, "MH_TIMEOUT", 0.05)
    holder: list[MhVcpu] = []

    def spin(box: memoryview) -> ioctl.VcpuExit:
        fd = holder[0].fd
        assert isinstance(fd, FakeFd) and fd.kicked.wait(5)
        return ioctl.ExitIntr()

    holder.append(vcpu(spin))
    with pytest.raises(MhError, match="did not halt within"):
        holder[0].command(mb.MhCommand.RESET)


def test_the_io_header_is_bounded_both_ways() -> None:
    v = vcpu(answering(0))
    with pytest.raises(MhError, match="io header of 1025 bytes"):
        v.io_header(bytes(1025))
    v.io_header(b"abc")
    assert v.read_io_header() == b"abc"
    struct.pack_into("<I", v.mailbox, mb.IO_HDR_OFFSET, 5000)  # what a hostile guest could leave
    with pytest.raises(MhError, match="left an io header of 5000 bytes"):
        v.read_io_header()


def test_after_a_failed_entry_the_command_is_withdrawn_and_the_vcpu_is_not_used_again() -> None:
    """A command the MH did not serve would run at its next entry (a stale EXPORT spends a
    sequence number): its go is cleared, and the MH vCPU takes no further command."""
    v = vcpu(lambda box: ioctl.ExitShutdown())
    with pytest.raises(MhError, match="shut down"):
        v.command(mb.MhCommand.EXPORT, slot=1)
    assert struct.unpack_from("<i", v.mailbox, mb.slot_offset(1) + mb.GO_OFFSET)[0] == 0
    with pytest.raises(MhError, match="failed earlier"):
        v.command(mb.MhCommand.RESET)
