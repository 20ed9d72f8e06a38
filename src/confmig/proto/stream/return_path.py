"""The return path: messages from the target back to the source, sans-IO.

QEMU's ``mig_rp_message_type`` framing (migration.c): u16 type, u16 length, then the
body, big-endian. We speak the messages a precopy migration needs: SHUT (the target
is done; u32 0 on success) and PONG (an answer to a PING, u32 echoed); and one of
ours, X_CONFIDENTIAL (an opaque payload for the source's confidential backend, e.g. a
Migration Handler's abort token, sent before SHUT). Every other type is known by name
so that an error can say what a peer sent, and refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from confmig.proto.stream.decoder import NeedData, ReceiveBuffer


class RpMessage(IntEnum):
    """``enum mig_rp_message_type``."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7
    X_CONFIDENTIAL = 0x7F01
    """Ours, far from QEMU's numbers: a payload for the source's confidential backend."""


BODY_SIZE: Final = {RpMessage.SHUT: 4, RpMessage.PONG: 4}
"""The messages we accept and their fixed body sizes (QEMU's ``rp_cmd_args``)."""
CONFIDENTIAL_MAX: Final = 4096
"""Most bytes of an X_CONFIDENTIAL body (an abort token is under 200)."""
HEADER: Final = struct.Struct(">HH")
_U32: Final = struct.Struct(">I")


@dataclass(frozen=True, slots=True, kw_only=True)
class Shut:
    """The target finished: ``status`` 0 means it loaded the stream and its guest runs."""

    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Confidential:
    """A payload for the source's confidential backend (opaque to the engine)."""

    payload: bytes


ReturnPathEvent = Shut | Pong | Confidential


def encode(message: ReturnPathEvent) -> bytes:
    if isinstance(message, Confidential):
        if not 0 < len(message.payload) <= CONFIDENTIAL_MAX:
            raise ValueError(f"X_CONFIDENTIAL body of {len(message.payload)} bytes "
                             f"(1 to {CONFIDENTIAL_MAX})")
        return HEADER.pack(RpMessage.X_CONFIDENTIAL, len(message.payload)) + message.payload
    kind = RpMessage.SHUT if isinstance(message, Shut) else RpMessage.PONG
    value = message.status if isinstance(message, Shut) else message.value
    return HEADER.pack(kind, BODY_SIZE[kind]) + _U32.pack(value)


class ReturnPathDecoder(ReceiveBuffer[ReturnPathEvent]):
    """Bytes from the target to :data:`ReturnPathEvent` values (``NEED_DATA`` until complete)."""

    def __init__(self) -> None:
        super().__init__(HEADER.size + CONFIDENTIAL_MAX)

    def _step(self) -> ReturnPathEvent | NeedData:
        p, avail = self._start, self._end - self._start
        if avail < HEADER.size:
            return self._wait(HEADER.size, "return-path header")
        kind, length = HEADER.unpack_from(self._buf, p)
        # SECURITY: peer-controlled; the header is checked before waiting for the body it
        # announces (garbage would otherwise stall the source until its deadline).
        try:
            name = RpMessage(kind).name
        except ValueError:
            self._fail(f"unknown return-path message {kind:#06x}", p)
        if kind == RpMessage.X_CONFIDENTIAL:
            if not 0 < length <= CONFIDENTIAL_MAX:
                self._fail(f"return-path message X_CONFIDENTIAL of {length} bytes "
                           f"(1 to {CONFIDENTIAL_MAX})", p + 2)
            if avail < HEADER.size + length:
                return self._wait(HEADER.size + length, "return-path message X_CONFIDENTIAL")
            self._start = p + HEADER.size + length
            return Confidential(payload=bytes(self._buf[p + HEADER.size : p + HEADER.size + length]))
        if kind not in BODY_SIZE:
            self._fail(f"return-path message {name} is not used by a precopy migration", p)
        if length != BODY_SIZE[RpMessage(kind)]:
            self._fail(f"return-path message {name} of {length} bytes "
                       f"(expected {BODY_SIZE[RpMessage(kind)]})", p + 2)
        if avail < HEADER.size + length:
            return self._wait(HEADER.size + length, f"return-path message {name}")
        (value,) = _U32.unpack_from(self._buf, p + HEADER.size)
        self._start = p + HEADER.size + length
        return Shut(status=value) if kind == RpMessage.SHUT else Pong(value=value)
