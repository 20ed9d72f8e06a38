"""The CPR state: what an old VMM hands a new one on the ``cpr`` channel, sans-IO.

QEMU's ``cpr-transfer`` mode sends, before the migration stream, the file
descriptors the new QEMU must inherit (guest RAM memfds, device fds) on a
second channel, a UNIX socket, with SCM_RIGHTS. Ours carries the same kind of
thing: one entry per descriptor, in the order the descriptors ride in the
message's ancillary data, saying what it is (a RAM block by its idstr and size,
the guest's VM fd, the Migration Handler's mirror VM fd), plus the SEV handle
(QMP ``query-sev`` shows it; the context it names moves inside KVM).

Layout (big-endian, as the migration stream)::

    magic "CPR1" | u16 version | u16 entries | u32 body length | body | u32 CRC-32 of body
    body: u32 sev handle, then per entry: u8 kind | u64 size | u8 name length | name

Sizes are bounded (:data:`MAX_ENTRIES`, :data:`MAX_BODY`): the reader allocates
nothing from a peer's numbers beyond them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from confmig.common.errors import ProtocolError

MAGIC: Final = b"CPR1"
VERSION: Final = 1
HEADER: Final = struct.Struct(">4sHHI")
TRAILER: Final = struct.Struct(">I")
_HANDLE: Final = struct.Struct(">I")
_ENTRY: Final = struct.Struct(">BQB")
MAX_ENTRIES: Final = 16
"""Descriptors one message may carry: a machine has a few RAM blocks and two VMs; the ioctl
channel's own bound on SCM_RIGHTS is of the same order."""
MAX_NAME: Final = 64
MAX_BODY: Final = _HANDLE.size + MAX_ENTRIES * (_ENTRY.size + MAX_NAME)


class CprError(ProtocolError):
    """A CPR state message that does not parse."""


class FdKind(IntEnum):
    RAM = 1
    """A RAM block's memfd; ``name`` is its idstr, ``size`` its length."""
    VM = 2
    """The guest's VM fd (``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`` names the source VM by it)."""
    MIRROR_VM = 3
    """The Migration Handler's mirror VM fd."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CprFd:
    kind: FdKind
    name: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CprState:
    fds: tuple[CprFd, ...]
    """One entry per descriptor of the message, in the order of its SCM_RIGHTS array."""
    sev_handle: int = 0

    def ram(self) -> list[tuple[int, CprFd]]:
        """(index in the fd array, entry) of every RAM block."""
        return [(i, e) for i, e in enumerate(self.fds) if e.kind == FdKind.RAM]

    def index(self, kind: FdKind) -> int | None:
        """The position of the (single) descriptor of ``kind``, or None."""
        found = [i for i, e in enumerate(self.fds) if e.kind == kind]
        if len(found) > 1:
            raise CprError(f"CPR state: {len(found)} descriptors of kind {kind.name}")
        return found[0] if found else None


def encode(state: CprState) -> bytes:
    if len(state.fds) > MAX_ENTRIES:
        raise ValueError(f"CPR state: {len(state.fds)} descriptors (limit {MAX_ENTRIES})")
    body = bytearray(_HANDLE.pack(state.sev_handle))
    for e in state.fds:
        name = e.name.encode()
        if len(name) > MAX_NAME:
            raise ValueError(f"CPR state: name {e.name!r} is longer than {MAX_NAME} bytes")
        body += _ENTRY.pack(int(e.kind), e.size, len(name)) + name
    head = HEADER.pack(MAGIC, VERSION, len(state.fds), len(body))
    return head + bytes(body) + TRAILER.pack(zlib.crc32(body))


def decode_header(head: bytes) -> tuple[int, int]:
    """(entries, bytes still to read: body and CRC) from the first :data:`HEADER` bytes."""
    if len(head) != HEADER.size:
        raise CprError(f"CPR state: a header of {len(head)} bytes, expected {HEADER.size}")
    magic, version, n, length = HEADER.unpack(head)
    # SECURITY: the peer is another VMM process: check every number before using it.
    if magic != MAGIC:
        raise CprError("CPR state: bad magic (is the peer a VMM in cpr-transfer mode?)")
    if version != VERSION:
        raise CprError(f"CPR state: version {version}, this VMM reads {VERSION}")
    if n > MAX_ENTRIES or not _HANDLE.size <= length <= MAX_BODY:
        raise CprError(f"CPR state: {n} entries in {length} bytes exceeds the bounds")
    return n, length + TRAILER.size


def decode(head: bytes, rest: bytes) -> CprState:
    """The state from its header and the remaining bytes :func:`decode_header` announced."""
    n, want = decode_header(head)
    if len(rest) != want:
        raise CprError(f"CPR state: {len(rest)} bytes after the header, expected {want}")
    body, (crc,) = rest[: -TRAILER.size], TRAILER.unpack(rest[-TRAILER.size :])
    if zlib.crc32(body) != crc:
        raise CprError("CPR state: CRC mismatch")
    (handle,) = _HANDLE.unpack_from(body)
    off, fds = _HANDLE.size, []
    for _ in range(n):
        if off + _ENTRY.size > len(body):
            raise CprError("CPR state: truncated entry")
        kind, size, name_len = _ENTRY.unpack_from(body, off)
        off += _ENTRY.size
        if kind not in FdKind._value2member_map_ or name_len > MAX_NAME or off + name_len > len(body):
            raise CprError(f"CPR state: bad entry (kind {kind}, name of {name_len} bytes)")
        try:
            name = body[off : off + name_len].decode()
        except UnicodeDecodeError:
            raise CprError("CPR state: a name is not UTF-8") from None
        off += name_len
        fds.append(CprFd(kind=FdKind(kind), name=name, size=size))
    if off != len(body):
        raise CprError("CPR state: trailing bytes")
    return CprState(fds=tuple(fds), sev_handle=handle)
