"""A network link between two VMMs that faults are injected into: cut, throttled, stalled.

One connection (a migration's main channel), TCP or UNIX, a thread per direction. The
link reads the stream going to the target with the engine's own sans-IO decoder, so
it knows how far the migration came in the target's terms (the stream's opening, the
first precopy round, a later one, the device state, the end) and can *hold* the
stream before it forwards the chunk that reaches a given point: whoever injects a
fault then knows exactly what the target has. The return path (the target's verdict)
can be held too: the source then waits for a verdict while the target already runs.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import threading
import time
from functools import partial
from pathlib import Path

from confmig.bench.forward import Direction, Forwarder
from confmig.common.errors import StreamError
from confmig.common.units import KiB
from confmig.proto.stream import decoder as dec

RECV_SIZE = 64 * KiB
"""Bytes read at once: the granularity at which the link can hold or throttle."""
ROUND_DEPTH = 256 * KiB
"""How deep into a precopy round the link holds for that round (or at its end, if shorter)."""
UPSTREAM_TIMEOUT = 10.0
"""Seconds to keep trying to reach the target (a new VMM listens only after its cpr channel)."""


class StreamPoint(enum.Enum):
    """How far the stream to the target came: where the link can hold it."""

    OPENING = "opening"
    """The first bytes: the stream's header and RAM block list (the source's setup)."""
    FIRST_ROUND = "first round"
    """``ROUND_DEPTH`` into the first precopy round, or its end if it is shorter."""
    LATER_ROUND = "later round"
    """``ROUND_DEPTH`` into the second round, or its end."""
    DEVICE_STATE = "device state"
    """The first device-state section: the guest stopped, its final RAM went (part of it)."""


class Link:
    """Listens on ``listen`` (a ``(host, port)``, or a UNIX socket path) and forwards the one
    connection it takes to ``upstream``; ``rate`` bytes/s at most each way (None: no limit).
    ``hold_at``: stop forwarding to the target where the stream reaches that point
    (``reached`` is set; :meth:`release` goes on). ``hold_return``: hold the target's replies
    from the start."""

    def __init__(self, listen: tuple[str, int] | Path, upstream: tuple[str, int] | Path, *,
                 rate: int | None = None, hold_at: StreamPoint | None = None,
                 hold_return: bool = False) -> None:
        self.upstream = upstream
        self.rate = rate
        self.hold_at = hold_at
        self.reached = threading.Event()
        """The stream reached ``hold_at``; forwarding to the target is held."""
        self.stream_end = threading.Event()
        """The whole stream went to the target."""
        self.forwarded = 0
        self.returned = 0
        self._cond = threading.Condition()
        self._hold_forward = False
        self._hold_return = hold_return
        self._cut_forward = False
        self._cut_return = False
        self._decoder: dec.StreamDecoder | None = dec.StreamDecoder()
        self._eos = 0
        self._eos_offset = 0
        self._ended = False
        ways = (Direction(chunk=partial(self._pass, True), sent=partial(self._count, True)),
                Direction(chunk=partial(self._pass, False), sent=partial(self._count, False)))
        self._forwarder = Forwarder(listen, upstream, lambda _n: ways, recv_size=RECV_SIZE, once=True,
                                    connect_timeout=UPSTREAM_TIMEOUT, name="link")
        self.address = self._forwarder.address
        self.path = self._forwarder.path

    @property
    def error(self) -> str | None:
        """The target was unreachable."""
        return self._forwarder.error

    # --- faults ------------------------------------------------------------------------

    def release(self) -> None:
        """Forward both ways again (after a hold or a stall)."""
        with self._cond:
            self._hold_forward = self._hold_return = False
            self.hold_at = None
            self._cond.notify_all()

    def stall(self) -> None:
        """Forward nothing either way; the connection stays up (a stalled network)."""
        with self._cond:
            self._hold_forward = self._hold_return = True

    def throttle(self, rate: int | None) -> None:
        self.rate = rate

    def cut(self, *, forward: bool = True, back: bool = True) -> None:
        """Cut the connection: both ways, as a broken network (both ends see it close); or the
        source-to-target direction only (``back=False``: the target sees the stream end, what
        the source still sends is lost, the target's replies still reach the source)."""
        with self._cond:
            self._cut_forward |= forward
            self._cut_return |= back
            self._cond.notify_all()
        if not forward:
            return
        for client, target in self._forwarder.under_way():
            for s in (client, target) if back else (target,):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR if back else socket.SHUT_WR)

    def close(self) -> None:
        self.cut()
        self._forwarder.close()

    # --- the connection ------------------------------------------------------------------

    def _pass(self, forward: bool, data: bytes) -> tuple[bytes, bool]:
        if forward:
            self._observe(data)
        if not self._wait_open(forward):
            return b"", forward and not self._cut_return  # cut this way only: what the source sends is lost
        self._pace(len(data))
        return data, True

    def _count(self, forward: bool, data: bytes) -> None:
        with self._cond:
            if forward:
                self.forwarded += len(data)
            else:
                self.returned += len(data)
        if forward and self._decoder is not None and self._ended:
            self.stream_end.set()

    def _wait_open(self, forward: bool) -> bool:
        """Block while this direction is held; False if it was cut."""
        with self._cond:
            while True:
                if self._cut_forward if forward else self._cut_return:
                    return False
                if not (self._hold_forward if forward else self._hold_return):
                    return True
                self._cond.wait(0.1)

    def _pace(self, n: int) -> None:
        rate = self.rate
        if rate:
            time.sleep(n / rate)

    # --- where the stream is ---------------------------------------------------------------

    def _observe(self, data: bytes) -> None:
        """Decode ``data`` (not yet forwarded) and hold the link if it reaches ``hold_at``."""
        point = self.hold_at
        first = self.forwarded == 0 and not self.reached.is_set()
        device = False
        eos_before = self._eos
        if self._decoder is not None and not self._ended:
            try:
                self._decoder.receive_data(data)
                while (ev := self._decoder.next_event()) is not dec.NEED_DATA:
                    if isinstance(ev, dec.RamEos):
                        self._eos += 1
                        self._eos_offset = self._decoder.offset
                    elif isinstance(ev, dec.DeviceState):
                        device = True
                    elif isinstance(ev, dec.Eof | dec.VmDescription | dec.End):
                        self._ended = True  # what follows is the vmdescription at most
                        break
            except StreamError:
                self._decoder = None  # not a stream this link understands: no more holds
        depth = self._decoder.offset - self._eos_offset if self._decoder is not None else 0
        hit = {
            StreamPoint.OPENING: first,
            StreamPoint.FIRST_ROUND: self._in_round(1, depth, eos_before),
            StreamPoint.LATER_ROUND: self._in_round(2, depth, eos_before),
            StreamPoint.DEVICE_STATE: device,
            None: False,
        }[point]
        if hit and not self.reached.is_set():
            with self._cond:
                self._hold_forward = True
            self.reached.set()

    def _in_round(self, round_: int, depth: int, eos_before: int) -> bool:
        """``ROUND_DEPTH`` into precopy round ``round_`` (ended by end-of-section marker
        ``round_ + 1``; the first ends the setup), or the chunk that ends the round."""
        return (self._eos == round_ and depth >= ROUND_DEPTH) or eos_before <= round_ < self._eos
