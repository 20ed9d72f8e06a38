"""One SEV guest's Migration Handler on an emulated host: real cores, a real engine.

Each :class:`Guest` has its RAM at a system-physical base of its own and a VEK
of its own in its own engine's key slots, so ciphertext means nothing on
another host. It is prepared as its firmware prepares an SEV guest (boot info,
launch secret, run gate, page-state list, shared mailboxes, MH state; target
mode on request), with the firmware's own functions. The test is the VMM: it
writes commands into a mailbox (shared pages: plain bytes in the host's RAM),
enters an MH vCPU (one core step, which must end in HLT) and reads the answer.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confmig.common.svm import SvmExitCode
from confmig.common.units import PAGE_SIZE, MiB
from confmig.guest import gate, mem_encrypt
from confmig.guest.firmware import bootinfo, mh, secret
from confmig.guest.image import rom
from confmig.guest.layout import (
    FW_CFG_BOUNCE_GPA,
    MH_AREA_GPA,
    MH_AREA_SIZE,
    MH_ENTRY,
    MH_MAILBOX_GPA,
    MH_MAILBOX_SIZE,
    SECRET_AREA_GPA,
    SECRET_AREA_SIZE,
)
from confmig.owner.arbiter import Arbiter
from confmig.platform.cpu.abi import C_BIT
from confmig.platform.cpu.core import CpuCore
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.proto import mailbox as mb
from confmig.proto.keybroker import DecisionRequest

ASID = 5
RAM_SIZE = 20 * MiB
ROM = rom()
GUEST_VIEW = 0xFF
TICKET = bytes.fromhex("7469636b65742d6f662d746865746573")
"""The owner's ticket every test target is launched with (and every test source INITs with)."""
"""The vCPU id of the core the test reads and writes the guest's private memory with."""


class FlatRam:
    """Guest RAM at GPA 0, at ``spa`` in the host's physical memory."""

    def __init__(self, size: int, spa: int) -> None:
        self.bytes = np.zeros(size, np.uint8)
        self.spa_base = spa

    def backed(self, gpa: int, size: int) -> bool:
        return gpa >= 0 and gpa + size <= len(self.bytes)

    def spa(self, gpa: int) -> int:
        return self.spa_base + gpa

    def load(self, gpa: int, size: int) -> bytes:
        return self.bytes[gpa : gpa + size].tobytes()

    def store(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.bytes[gpa : gpa + len(data)] = np.frombuffer(data, np.uint8)

    def view_pages(self, gpa: int, n: int) -> npt.NDArray[np.uint8]:
        return self.bytes[gpa : gpa + n * PAGE_SIZE].reshape(n, PAGE_SIZE)

    def store_pages(self, gpa: int, data: npt.NDArray[np.uint8]) -> None:
        self.bytes[gpa : gpa + data.size] = data.reshape(-1)

    def update_pages(self, gpa: int, n: int, fill: Callable[[npt.NDArray[np.uint8]], object]) -> None:
        fill(self.view_pages(gpa, n))


def secret_table(*entries: tuple[uuid.UUID, bytes]) -> bytes:
    """The launch secret as the owner builds it."""
    body = b"".join(guid.bytes_le + struct.pack("<I", 20 + len(data)) + data for guid, data in entries)
    return secret.SECRET_TABLE_HEADER_GUID.bytes_le + struct.pack("<I", 20 + len(body)) + body


def launch_secret(master: bytes, *, target: bool = False, v1: bool = False,
                  ticket: bytes = TICKET) -> bytes:
    """The secret table the owner's broker releases: to a guest, its transport key; to a
    migration target, a ticket and the ticket's key (with the guest's key where the owner allows
    version 1, as ``owner.profile`` does)."""
    entries = [] if target else [(secret.MIGRATION_TRANSPORT_KEY_GUID, master)]
    if target:
        entries += [(secret.MIGRATION_TICKET_GUID, ticket),
                    (secret.MIGRATION_TARGET_KEY_GUID, mh.ticket_key(master, ticket))]
    if v1:  # the owner accepts version 1's missing guarantees
        entries += [(secret.MIGRATION_TRANSPORT_KEY_GUID, master)] * target
        entries.append((secret.MIGRATION_V1_ALLOWED_GUID, b"\x01"))
    return secret_table(*entries)


def transport_key_bytes(master: bytes, migration_id: bytes, ticket: bytes | None = TICKET) -> bytes:
    """The key both MHs derive (the test's own copy of the rule, to forge with): from the
    ticket's key (version 1, ``ticket`` None: from the guest's own)."""
    base = master
    if ticket is not None:
        base = HKDF(algorithm=hashes.SHA256(), length=32, salt=ticket,
                    info=b"confmig mh ticket v1").derive(master)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id, info=b"confmig mh transport v2")
    return hkdf.derive(base)


def transport_key(master: bytes, migration_id: bytes, ticket: bytes | None = TICKET) -> AESGCM:
    return AESGCM(transport_key_bytes(master, migration_id, ticket))


def seal(master: bytes, migration_id: bytes, *, stream: int, seq: int, gpas: Iterable[int],
         pages: npt.NDArray[np.uint8] | None = None, epoch: int = 0, nstreams: int = 1) -> bytes:
    """A page record sealed with the real key, as only an MH could make one."""
    entries = list(gpas)
    data = pages if pages is not None else np.ones((len(entries), PAGE_SIZE), np.uint8)
    h = mb.RecordHeader(mb.RECORD_VERSION, mb.ALG_AES_256_GCM, mb.RecordKind.PAGES, stream, seq, epoch,
                        len(entries), 0, 0, nstreams, migration_id)
    head = h.pack() + struct.pack(f"<{len(entries)}Q", *entries)
    return head + transport_key(master, migration_id).encrypt(mb.nonce(stream, seq), data.tobytes(), head)


def commit_grant(master: bytes, completion: bytes, challenge: bytes, ticket: bytes = TICKET) -> bytes:
    """The guest owner's commit grant for the migration ``completion`` closes, as its broker
    makes it (:mod:`confmig.owner.arbiter`, the real code)."""
    arbiter = Arbiter()
    arbiter.issued(ticket, mh.ticket_key(master, ticket))
    migration_id = mb.RecordHeader(*mb.RECORD_HEADER.unpack_from(completion)).migration_id
    return arbiter.decide(DecisionRequest(ticket=ticket, migration_id=migration_id,
                                          challenge=challenge, outcome="commit"))[0].token


class MhDriver:
    """The VMM's side of the mailboxes: commands in, answers and records out. Subclasses say
    how the host reaches guest RAM (:meth:`store`, :meth:`load`) and enters an MH vCPU."""

    owner: tuple[bytes, bytes] | None = None
    """A target's guest owner (its transport key, the target's ticket): COMPLETE goes with its
    commit grant, as a VMM sends it (:meth:`token`)."""

    def store(self, gpa: int, data: bytes) -> None:
        raise NotImplementedError

    def load(self, gpa: int, size: int) -> bytes:
        raise NotImplementedError

    def enter(self, index: int) -> None:
        """KVM_RUN of MH vCPU ``index``: one step, which must end halted."""
        raise NotImplementedError

    def mailbox(self, index: int) -> int:
        return mb.mailbox_base(MH_MAILBOX_GPA, MH_MAILBOX_SIZE, index)

    def data(self, index: int, slot: int) -> int:
        return self.mailbox(index) + mb.slot_offset(slot) + mb.SLOT_HEADER

    def command(self, index: int, cmd: int, *, slot: int | None = None, gpa: int = 0, npages: int = 0,
                length: int = 0, epoch: int = 0) -> mb.Command:
        at = self.mailbox(index) + (mb.CMD_OFFSET if slot is None else mb.slot_offset(slot))
        self.store(at, mb.encode_request(cmd, gpa=gpa, npages=npages, length=length, epoch=epoch))
        self.store(at + mb.GO_OFFSET, struct.pack("<i", 1))
        self.enter(index)
        answer = mb.decode_command(self.load(at, mb.COMMAND.size + mb.V2_FIELDS.size))
        assert answer.go == 0 and answer.done == 1, answer
        return answer

    def io_header(self, index: int, data: bytes) -> None:
        self.store(self.mailbox(index) + mb.IO_HDR_OFFSET, struct.pack("<I", len(data)) + data)

    def read_io_header(self, index: int) -> bytes:
        at = self.mailbox(index) + mb.IO_HDR_OFFSET
        (n,) = struct.unpack("<I", self.load(at, 4))
        return self.load(at + 4, n)

    def init(self, index: int, role: mb.Role, migration_id: bytes | None = None,
             nstreams: int = 1) -> tuple[int, bytes]:
        """INIT; the answer and the migration id the io header holds after it. A source's INIT
        names :data:`TICKET` unless told otherwise."""
        if migration_id is None:
            migration_id = TICKET if role == mb.Role.SOURCE else bytes(mb.MIGRATION_ID_SIZE)
        self.io_header(index, mb.encode_init(role, migration_id, nstreams))
        ret = self.command(index, mb.MhCommand.INIT).ret
        return ret, mb.decode_init(self.read_io_header(index)).migration_id

    def export(self, index: int, gpas: Iterable[int], *, slot: int = 0, epoch: int = 0) -> tuple[int, bytes]:
        entries = list(gpas)
        self.store(self.data(index, slot), struct.pack(f"<{len(entries)}Q", *entries))
        answer = self.command(index, mb.MhCommand.EXPORT, slot=slot, npages=len(entries), epoch=epoch)
        return answer.ret, self.load(self.data(index, slot), answer.length if answer.ret == 0 else 0)

    def put_record(self, index: int, cmd: int, record: bytes, *, slot: int = 0) -> mb.Command:
        self.store(self.data(index, slot), record)
        return self.command(index, cmd, slot=slot, length=len(record))

    def import_(self, index: int, record: bytes, *, slot: int = 0) -> int:
        return self.put_record(index, mb.MhCommand.IMPORT, record, slot=slot).ret

    def token(self, cmd: int, data: bytes = b"") -> tuple[int, bytes]:
        """A control command in MH vCPU 0's slot 0: FINISH (the target's challenge in), ABORT
        (nothing in), COMPLETE, RESUME (a token in). The answer, and the record FINISH or ABORT
        wrote back."""
        if cmd == mb.MhCommand.COMPLETE and self.owner is not None and data:
            data += commit_grant(self.owner[0], data, self.challenge(), self.owner[1])
        answer = self.put_record(0, cmd, data) if data else self.command(0, cmd, slot=0)
        sealed = cmd in (mb.MhCommand.FINISH, mb.MhCommand.ABORT)
        out = self.load(self.data(0, 0), answer.length) if answer.ret == 0 and sealed else b""
        return answer.ret, out

    def challenge(self) -> bytes:
        """What a target MH published in its vCPU 0 mailbox for the source's FINISH."""
        return self.load(self.mailbox(0) + mb.CHALLENGE_OFFSET, mb.CHALLENGE_SIZE)


class Guest(MhDriver):
    """An SEV guest on one host, its firmware's preparation done, its MH vCPUs at hand."""

    def __init__(self, *, spa: int, master: bytes | None, target: bool = False,
                 ram_size: int = RAM_SIZE, seed: int = 0, v1: bool = False, es: bool = False,
                 ticket: bytes = TICKET) -> None:
        self.es = es
        """SEV-ES: every core of this guest (its MH vCPUs too) has its registers protected."""
        self.ram = FlatRam(ram_size, spa)
        self.slots = KeySlots()
        self.slots.install(ASID, os.urandom(16))
        self.slots.set_runnable(ASID, True)
        self.cores: dict[int, CpuCore] = {}
        self.view = self.core(GUEST_VIEW)
        cpu, mask = self.view, C_BIT
        bootinfo.clear(cpu)
        bootinfo.store_e820(cpu, [bootinfo.E820Entry(address=0, length=ram_size, type=bootinfo.E820_RAM)])
        bootinfo.seal(cpu, 1)
        if master is not None:
            area = launch_secret(master, target=target, v1=v1, ticket=ticket)
            if target and not v1:
                self.owner = (master, ticket)
            cpu.write(SECRET_AREA_GPA | mask, area.ljust(SECRET_AREA_SIZE, b"\0"))
        gate.store(cpu, gate.OPEN, mask)
        mem_encrypt.clear_page_state(cpu, mask)
        mem_encrypt.move_to_shared(cpu, FW_CFG_BOUNCE_GPA, 1, mask)
        step = mem_encrypt.PAGE_STATE_BATCH * PAGE_SIZE
        for gpa in range(MH_MAILBOX_GPA, MH_MAILBOX_GPA + MH_MAILBOX_SIZE, step):
            n = min(step, MH_MAILBOX_GPA + MH_MAILBOX_SIZE - gpa) // PAGE_SIZE
            mem_encrypt.move_to_shared(cpu, gpa, n, mask, zero=True)
        mh.prepare(cpu, mask)
        if target:
            mh.await_incoming(cpu, mask)
        rng = np.random.default_rng(seed)
        top = ram_size - (MH_AREA_GPA + MH_AREA_SIZE)
        self.write_pages(MH_AREA_GPA + MH_AREA_SIZE,
                         rng.integers(0, 256, (top // PAGE_SIZE, PAGE_SIZE), np.uint8))

    def close(self) -> None:
        os.close(self.slots.fd)

    def core(self, index: int) -> CpuCore:
        if index not in self.cores:
            core = CpuCore(index, self.ram, ROM, mee=MemoryEncryptionEngine(self.slots))
            core.set_asid(ASID, es=self.es)
            core.regs.rip = MH_ENTRY
            self.cores[index] = core
        return self.cores[index]

    # --- the guest's view (private) --------------------------------------------------------

    def read_pages(self, gpa: int, n: int) -> npt.NDArray[np.uint8]:
        return self.view.read_pages(gpa | C_BIT, n)

    def write_pages(self, gpa: int, pages: npt.NDArray[np.uint8]) -> None:
        self.view.write_pages(gpa | C_BIT, pages)

    def private_gpas(self) -> list[int]:
        """Every page the guest's page-state list calls private, but the MH's area."""
        gfns = np.arange(len(self.ram.bytes) // PAGE_SIZE, dtype=np.int64)
        shared = mem_encrypt.shared_pages(self.view, gfns, C_BIT)
        area = (gfns * PAGE_SIZE >= MH_AREA_GPA) & (gfns * PAGE_SIZE < MH_AREA_GPA + MH_AREA_SIZE)
        return [int(g) * PAGE_SIZE for g in gfns[~shared & ~area]]

    # --- the VMM's side: the mailbox (shared) ------------------------------------------------

    def store(self, gpa: int, data: bytes) -> None:
        self.ram.store(gpa, data)

    def load(self, gpa: int, size: int) -> bytes:
        return self.ram.load(gpa, size)

    def enter(self, index: int) -> None:
        ex = self.core(index).step()
        assert ex is not None and ex.code == SvmExitCode.HLT, ex
        assert self.core(index).regs.rip == MH_ENTRY

    def outside_mailboxes(self) -> bytes:
        """Everything in RAM but the mailboxes (which the VMM itself writes)."""
        return (self.ram.load(0, MH_MAILBOX_GPA)
                + self.ram.load(MH_MAILBOX_GPA + MH_MAILBOX_SIZE,
                                len(self.ram.bytes) - MH_MAILBOX_GPA - MH_MAILBOX_SIZE))
