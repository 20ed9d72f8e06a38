"""A record-aware man in the middle of a migration: it parses the stream as it passes and
rewrites whole Migration Handler records (swaps, replays, reorders, drops, duplicates, forges,
flips, truncates, cuts), as a hostile host between the two VMMs could.

Two layers, after :mod:`confmig.proto.stream.decoder`:

* :class:`StreamProxy`, sans-IO: bytes from the source in (``receive_data``, ``feed_eof``),
  bytes for the target out (``data_to_send``). It decodes the stream with our own
  :class:`~confmig.proto.stream.decoder.StreamDecoder`; everything but an MH record passes as
  the very bytes the source sent, and every MH record is re-encoded with
  :func:`~confmig.proto.stream.encoder.confidential_record` (the stream's framing carries each
  record's length, so a record can only be moved, dropped or changed whole by re-framing it).
  One :class:`Attack` acts once, on a window of consecutive page records of one MH stream;
  :class:`Tally` says what passed and what was done, so that a test cannot pass vacuously.
* :class:`ProxyServer`, a thin socket loop: one TCP listener in front of the target, a thread
  per direction. The return path (target -> source: the target's verdict, an MH abort token)
  passes untouched.

An attack only permutes, removes, adds or changes records in record positions: the stream's
framing (sections, EOS, footers) stays valid, so what the target refuses is the records.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import ClassVar, Final, Literal, NamedTuple

from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SIZE, MiB
from confmig.proto import mailbox as mb
from confmig.proto.stream.decoder import NEED_DATA, Confidential, End, StreamDecoder
from confmig.proto.stream.encoder import confidential_record
from confmig.proto.stream.format import ConfidentialSubtype

SUBTYPE: Final = ConfidentialSubtype.MH_RECORD
DECODER_BUFFER: Final = 1 * MiB
"""About two full MH records (513 KiB each); the decoder grows it for a larger record, up to
its MAX_BLOB."""
RECV_SIZE: Final = 256 * 1024
"""Bytes read from a socket at once."""
LAST: Final = "last"
"""``Attack.at``: the last page record of a stream before the completion record (of the
stop-and-copy part, unless it had none)."""
FIRST_ROUND: Final = 30
"""``Attack.at`` by default: well inside the first precopy round (of a 64 MiB guest, about 110
records), once the target's MH has taken records of every stream."""


class RecordId(NamedTuple):
    """A page record's place in its MH stream, as the source's header says."""

    stream: int
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MhRecord:
    """One MH record (the payload of a CONFIDENTIAL record of subtype MH_RECORD)."""

    index: int
    """Position among the page records the source sent, all streams (0-based); -1: the completion."""
    header: mb.RecordHeader
    """The header as the source sent it (an edited payload may say otherwise)."""
    payload: bytes

    @property
    def id(self) -> RecordId:
        return RecordId(self.header.stream, self.header.seq)

    @property
    def is_page(self) -> bool:
        return self.header.kind == mb.RecordKind.PAGES

    def wire(self) -> bytes:
        return confidential_record(SUBTYPE, self.payload)

    def edited(self, payload: bytes) -> MhRecord:
        return replace(self, payload=payload)


@dataclass(frozen=True, slots=True)
class Cut:
    """Send these bytes, then end the stream: a connection cut in the middle of a record."""

    wire: bytes


Edit = MhRecord | Cut
Unit = bytes | MhRecord
"""What the core queues: stream bytes passed as they came, or an MH record to re-encode."""


# --- attacks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """Rewrites a window of ``span`` consecutive page records of one MH stream, once.

    The window starts at page record number ``at`` (or the first one after it that the
    attack :meth:`wants`), or at the last page record before the completion record
    (``at=LAST``). :meth:`rewrite` returns what goes out in the window's record positions.
    """

    name: ClassVar[str]
    at: int | Literal["last"] = FIRST_ROUND

    @property
    def span(self) -> int:
        return 1

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        raise NotImplementedError

    def wants(self, record: MhRecord) -> bool:
        """Whether the window may start at ``record``."""
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Swap(Attack):
    """Records ``at`` and ``at + distance`` of one stream exchange places."""

    name = "swap"
    distance: int = 3

    @property
    def span(self) -> int:
        return self.distance + 1

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        return [records[-1], *records[1:-1], records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay(Attack):
    """Record ``at`` goes through, and again after ``later`` more records of its stream."""

    name = "replay"
    later: int = 3

    @property
    def span(self) -> int:
        return self.later + 1

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        return [*records, records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reorder(Attack):
    """Two consecutive records of one stream go in the opposite order."""

    name = "reorder"

    @property
    def span(self) -> int:
        return 2

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        return [records[1], records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Drop(Attack):
    """One record never arrives (``at=LAST``: the final epoch's last, which only the
    completion record can miss)."""

    name = "drop"

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate(Attack):
    """One record arrives twice in a row."""

    name = "duplicate"

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        return [records[0], records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Inject(Attack):
    """A forged record goes in first, in the place the genuine one expects: the genuine
    header and GPA list (all the checks a host can see pass), random ciphertext and tag."""

    name = "inject"
    seed: int = 11

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        genuine = records[0]
        head = mb.RECORD_HEADER.size + 8 * genuine.header.npages
        noise = random.Random(self.seed).randbytes(len(genuine.payload) - head)
        return [genuine.edited(genuine.payload[:head] + noise), genuine]


class Part(Enum):
    """Where in a sealed record a bit flips."""

    HEADER = "header"
    """The epoch (offset 16): still a well-formed header, so only the tag can tell."""
    GPA_LIST = "gpa-list"
    """Bit 12 of the first GPA: the page one page further."""
    CIPHERTEXT = "ciphertext"
    """The first page's data, 100 bytes in."""
    TAG = "tag"
    """The last byte."""


_EPOCH_OFFSET: Final = 16
"""Of the epoch field in :data:`confmig.proto.mailbox.RECORD_HEADER` (``<BBHIQ`` before it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Flip(Attack):
    """One bit of one record flips on the way."""

    name = "flip"
    part: Part = Part.CIPHERTEXT

    def wants(self, record: MhRecord) -> bool:
        return self.part is not Part.CIPHERTEXT or record.header.data_pages > 0  # a page to flip

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        rec = records[0]
        data = bytearray(rec.payload)
        gpas = mb.RECORD_HEADER.size
        where, bit = {
            Part.HEADER: (_EPOCH_OFFSET, 0),
            Part.GPA_LIST: (gpas + 1, 4),
            Part.CIPHERTEXT: (gpas + 8 * rec.header.npages + 100, 0),
            Part.TAG: (len(data) - 1, 0),
        }[self.part]
        data[where] ^= 1 << bit
        return [rec.edited(bytes(data))]


@dataclass(frozen=True, slots=True, kw_only=True)
class Truncate(Attack):
    """The record loses its last page, and its header and GPA list are made to agree: a
    well-formed, shorter record (the tag is the source's, for the whole one)."""

    name = "truncate"

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        rec = records[0]
        h = rec.header
        gpas = mb.RECORD_HEADER.size
        entries = struct.unpack_from(f"<{h.npages}Q", rec.payload, gpas)
        zero = bool(entries[-1] & mb.ZERO_FLAG)
        shorter = replace(h, npages=h.npages - 1, nzero=h.nzero - zero)
        body = rec.payload[gpas + 8 * h.npages : -mb.TAG_SIZE]
        if not zero:
            body = body[:-PAGE_SIZE]  # the pages' ciphertext is in GPA-list order
        tag = rec.payload[-mb.TAG_SIZE :]
        payload = shorter.pack() + struct.pack(f"<{h.npages - 1}Q", *entries[:-1]) + body + tag
        return [rec.edited(payload)]


@dataclass(frozen=True, slots=True, kw_only=True)
class CutShort(Attack):
    """The connection ends halfway through a record."""

    name = "cut"

    def rewrite(self, records: Sequence[MhRecord]) -> list[Edit]:
        wire = records[0].wire()
        return [Cut(wire[: len(wire) // 2])]


# --- the sans-IO core ----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Tally:
    """What passed through and what the attack did (read it once the connection ended)."""

    received: list[RecordId] = field(default_factory=list)
    """Every page record from the source, in order."""
    forwarded: list[RecordId] = field(default_factory=list)
    """Every page record handed on to the target, in order (by the source's header)."""
    done: list[str] = field(default_factory=list)
    """What the attack did, in words (empty: it never acted)."""
    window: list[RecordId] = field(default_factory=list)
    """The records the attack rewrote."""
    window_epochs: list[int] = field(default_factory=list)
    """Their epochs (0 while the guest runs, 1 after switch-over)."""
    changed: int = 0
    """Records the attack sent with other bytes than the source's (flipped, forged, cut down)."""
    completion: bool = False
    """The source's completion record passed by."""
    error: str | None = None
    """The stream did not decode (from then on it passed untouched)."""
    cut_short: str | None = None
    """The source's side ended in the middle of the stream (the source failed, or the
    connection was torn down once the target went): what the decoder said."""


class _Mode(Enum):
    WATCH = "watch"  # looking for the window's first record
    CAPTURE = "capture"  # holding everything from the window's first record on
    DONE = "done"  # the attack acted (or there is none): pass everything
    PASS = "pass"  # the stream did not decode: raw bytes only
    ENDED = "ended"  # a Cut: nothing more goes out


class StreamProxy:
    """The source -> target direction of one migration, sans-IO."""

    def __init__(self, attack: Attack | None = None, *, buffer_size: int = DECODER_BUFFER) -> None:
        self.attack = attack
        self.tally = Tally()
        self._decoder = StreamDecoder(buffer_size)
        self._raw = bytearray()
        """Bytes the decoder holds but has not yet made an event of: each event's own bytes
        are taken from its front."""
        self._out = bytearray()
        self._mode = _Mode.WATCH if attack is not None else _Mode.DONE
        self._held: list[Unit] = []
        self._window: list[MhRecord] = []
        self._pages = 0
        self._eof = False

    @property
    def ended(self) -> bool:
        """A Cut went out: send what is left and close both ways."""
        return self._mode is _Mode.ENDED

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._mode is _Mode.ENDED:
            return
        if self._mode is _Mode.PASS:
            self._out += data
            return
        self._raw += data
        self._decoder.receive_data(data)
        self._pump()

    def feed_eof(self) -> None:
        """The source closed: what the attack still holds goes out unchanged."""
        if self._mode in (_Mode.ENDED, _Mode.PASS):
            return
        self._decoder.feed_eof()
        self._eof = True
        self._pump()
        self._release()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _pump(self) -> None:
        while self._mode not in (_Mode.PASS, _Mode.ENDED):
            before = self._decoder.offset
            try:
                event = self._decoder.next_event()
            except StreamError as exc:
                if self._eof:  # every whole record was decoded before: this one was cut short
                    self.tally.cut_short = str(exc)
                    self._release()
                    self._out += self._raw
                    self._raw.clear()
                else:
                    self._fail_open(str(exc))
                return
            if event is NEED_DATA:
                return
            n = self._decoder.offset - before
            if isinstance(event, Confidential) and event.subtype == SUBTYPE:
                try:
                    rec = self._record(event.payload)
                except mb.MailboxError as exc:
                    self._fail_open(f"an MH record that does not parse: {exc}")
                    return
                del self._raw[:n]  # re-encoded from the payload when it goes out
                self._unit(rec)
            elif n:
                raw = bytes(self._raw[:n])
                del self._raw[:n]
                self._unit(raw)
            if isinstance(event, End):
                self._release()
                return

    def _record(self, payload: bytes) -> MhRecord:
        header = mb.decode_record_header(payload)
        if header.kind != mb.RecordKind.PAGES:
            self.tally.completion |= header.kind == mb.RecordKind.COMPLETION
            return MhRecord(index=-1, header=header, payload=payload)
        rec = MhRecord(index=self._pages, header=header, payload=payload)
        self._pages += 1
        self.tally.received.append(rec.id)
        return rec

    def _unit(self, unit: Unit) -> None:
        attack = self.attack
        if self._mode is _Mode.DONE or attack is None:
            self._emit(unit)
            return
        page = isinstance(unit, MhRecord) and unit.is_page
        if self._mode is _Mode.WATCH:
            if isinstance(unit, MhRecord) and page and self._selects(attack, unit):
                self._mode = _Mode.CAPTURE
                self._held, self._window = [unit], [unit]
                self._maybe_act(attack)
            else:
                self._emit(unit)
            return
        # CAPTURE: hold everything, in order, until the window is whole.
        assert self._window
        if isinstance(unit, MhRecord) and page and unit.header.stream == self._window[0].header.stream:
            if attack.at == LAST:  # a later record: the held one was not the last
                self._release()
                self._mode = _Mode.CAPTURE
                self._held, self._window = [unit], [unit]
                return
            self._held.append(unit)
            self._window.append(unit)
            self._maybe_act(attack)
            return
        self._held.append(unit)
        if isinstance(unit, MhRecord) and unit.header.kind == mb.RecordKind.COMPLETION:
            if attack.at == LAST:
                self._act(attack)
            else:
                self._release()  # the stream ran out of records before the window did

    def _selects(self, attack: Attack, rec: MhRecord) -> bool:
        return attack.at == LAST or (rec.index >= attack.at and attack.wants(rec))

    def _maybe_act(self, attack: Attack) -> None:
        if attack.at != LAST and len(self._window) == attack.span:
            self._act(attack)

    def _act(self, attack: Attack) -> None:
        """Put the rewritten records into the window's record positions, in order; more of
        them than positions go after the last one, fewer leave positions out."""
        edits = attack.rewrite(self._window)
        self.tally.window = [r.id for r in self._window]
        self.tally.window_epochs = [r.header.epoch for r in self._window]
        self.tally.changed = sum(1 for e in edits if not self._genuine(e))
        self.tally.done.append(f"{attack.name}: {self._describe(edits)}")
        slots = [i for i, u in enumerate(self._held) if any(u is r for r in self._window)]
        held, self._held, self._window = self._held, [], []
        self._mode = _Mode.DONE
        queue = list(edits)
        for i, unit in enumerate(held):
            if i not in slots:
                self._emit(unit)
                continue
            take = len(queue) if i == slots[-1] else min(1, len(queue))
            for edit in queue[:take]:
                self._emit(edit)
            del queue[:take]

    def _describe(self, edits: Sequence[Edit]) -> str:
        def one(e: Edit) -> str:
            if isinstance(e, Cut):
                return f"cut after {len(e.wire)} bytes"
            r = e.id
            return f"{r.stream}.{r.seq}{'' if self._genuine(e) else '*'}"

        was = " ".join(f"{r.id.stream}.{r.id.seq}" for r in self._window)
        return f"[{was}] -> [{' '.join(one(e) for e in edits)}] (* changed)"

    def _genuine(self, edit: Edit) -> bool:
        """``edit`` is one of the window's records as the source sent it."""
        return any(edit is r for r in self._window)

    def _release(self) -> None:
        """Everything held goes out unchanged."""
        held, self._held, self._window = self._held, [], []
        if self._mode is _Mode.CAPTURE:
            self._mode = _Mode.WATCH
        for unit in held:
            self._emit(unit)

    def _emit(self, unit: Unit | Cut) -> None:
        if self._mode is _Mode.ENDED:
            return
        if isinstance(unit, Cut):
            self._out += unit.wire
            self._mode = _Mode.ENDED
            return
        if isinstance(unit, MhRecord):
            if unit.is_page:
                self.tally.forwarded.append(unit.id)
            self._out += unit.wire()
            return
        self._out += unit

    def _fail_open(self, reason: str) -> None:
        """The stream does not decode: say so, and pass everything untouched from here on
        (the target decides what to make of it)."""
        self.tally.error = reason
        self._release()
        self._mode = _Mode.PASS
        self._out += self._raw
        self._raw.clear()


# --- the socket loop -----------------------------------------------------------------------


class ProxyServer:
    """Listens on 127.0.0.1 in front of ``target``; the first connection (the migration's
    main channel) goes through a :class:`StreamProxy`, any other passes untouched."""

    def __init__(self, target: tuple[str, int], attack: Attack | None = None) -> None:
        self.target = target
        self.proxy = StreamProxy(attack)
        self.connections = 0
        self.finished = threading.Event()
        """The main channel's forwarding ended (the source closed, the target went, or a Cut)."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True, name="stream-proxy").start()

    @property
    def tally(self) -> Tally:
        return self.proxy.tally

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        """Accept no more connections (those under way end on their own)."""
        self._listener.close()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the target is gone: so is this connection
                client.close()
                continue
            self.connections += 1
            proxy = self.proxy if self.connections == 1 else StreamProxy()
            for args in ((client, upstream, proxy), (upstream, client, None)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, proxy: StreamProxy | None) -> None:
        """One direction. The forward one ends with a half-close, so that the target's verdict
        (and an abort token) still comes back; the return one closes both."""
        with contextlib.suppress(OSError):
            while data := src.recv(RECV_SIZE):
                if proxy is not None:
                    proxy.receive_data(data)
                    data = proxy.data_to_send()
                dst.sendall(data)
                if proxy is not None and proxy.ended:
                    break
            else:
                if proxy is not None:
                    proxy.feed_eof()
                    dst.sendall(proxy.data_to_send())
        if proxy is not None and not proxy.ended:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        else:  # the target is gone, or the proxy cut the stream: so is the migration
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        if proxy is self.proxy:
            self.finished.set()
