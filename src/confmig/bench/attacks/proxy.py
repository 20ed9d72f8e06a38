"""A record-aware man in the middle of a migration: it parses the stream as it passes and
rewrites whole page records (swaps, replays, reorders, drops, duplicates, forges, flips,
truncates, cuts), as a hostile host between the two VMMs could.

Two layers, after :mod:`confmig.proto.stream.decoder`:

* :class:`StreamProxy`, sans-IO: bytes from the source in (``receive_data``, ``feed_eof``),
  bytes for the target out (``data_to_send``). It decodes the stream with our own
  :class:`~confmig.proto.stream.decoder.StreamDecoder`; everything but a page record of its
  :class:`~confmig.bench.attacks.records.Kind` passes as the very bytes the source sent, and
  every such record goes out re-encoded (:meth:`PageRecord.wire`: the stream's framing carries
  each record's length, so a record can only be moved, dropped or changed whole by
  re-framing it). One :class:`~confmig.bench.attacks.edits.Attack` acts once;
  :class:`Tally` says what passed and what was done, so that a test cannot pass vacuously.
* :class:`ProxyServer`, a thin socket loop (a :class:`~confmig.bench.forward.Forwarder`): one
  TCP listener in front of the target, a thread per direction. The return path (target ->
  source: the target's verdict, an MH abort token) passes untouched.

An attack only permutes, removes, adds or changes records in record positions: the stream's
framing (sections, EOS, footers) stays valid, so what the target refuses is the records.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from confmig.bench.attacks.edits import FINAL, LAST, Attack, Cut, Edit
from confmig.bench.attacks.records import (
    PLAIN_HEADER_SIZE,
    Kind,
    PageRecord,
    RecordId,
    mh_record,
    plain_record,
    psp_record,
)
from confmig.bench.forward import Direction, Forwarder
from confmig.common.errors import StreamError
from confmig.common.units import PAGE_SHIFT, PAGE_SIZE, MiB
from confmig.proto import mailbox as mb
from confmig.proto.stream.decoder import (
    NEED_DATA,
    Confidential,
    End,
    RamEos,
    RamPages,
    SectionEnd,
    StreamDecoder,
)
from confmig.proto.stream.format import PAGE_RECORD_SIZE, ConfidentialSubtype

DECODER_BUFFER: Final = 1 * MiB
"""About two full MH records (513 KiB each); the decoder grows it for a larger record, up to
its MAX_BLOB."""
RECV_SIZE: Final = 256 * 1024
"""Bytes read from a socket at once."""

GpaRanges = Sequence[tuple[int, int]]
"""``[start, end)`` guest addresses."""
Unit = bytes | PageRecord
"""What the core queues: stream bytes passed as they came, or a record to re-encode."""


@dataclass(slots=True, kw_only=True)
class Tally:
    """What passed through and what the attack did (read it once the connection ended)."""

    received: list[RecordId] = field(default_factory=list)
    """Every page record of the proxy's kind from the source, in order."""
    forwarded: list[RecordId] = field(default_factory=list)
    """Every such record handed on to the target, in order (by the source's header)."""
    done: list[str] = field(default_factory=list)
    """What the attack did, in words (empty: it never acted)."""
    window: list[RecordId] = field(default_factory=list)
    """The records the attack rewrote."""
    window_gpas: list[int] = field(default_factory=list)
    """Their first GPAs."""
    window_epochs: list[int] = field(default_factory=list)
    """Their epochs (0 while the guest runs, 1 after switch-over)."""
    changed: int = 0
    """Records the attack sent with other bytes than the source's (flipped, forged, cut down,
    moved to another address)."""
    completion: bool = False
    """The end of the page records passed by (an MH stream's completion record, the others'
    stop-and-copy part's EOS)."""
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
    """The source -> target direction of one migration, sans-IO.

    ``kind``: whose page records to parse (the backend of the migration). ``pages``: the guest
    addresses an attack may act on (those the guest's self-check covers; None: any), and whose
    earlier versions it keeps for :class:`~confmig.bench.attacks.edits.StaleReplay`.
    """

    def __init__(self, attack: Attack | None = None, *, kind: Kind = Kind.MH, pages: GpaRanges | None = None,
                 buffer_size: int = DECODER_BUFFER) -> None:
        self.attack = attack
        self.kind = kind
        self.pages = tuple(pages) if pages is not None else None
        self.tally = Tally()
        self._decoder = StreamDecoder(buffer_size)
        self._raw = bytearray()
        """Bytes the decoder holds but has not yet made an event of: each event's own bytes
        are taken from its front."""
        self._out = bytearray()
        self._mode = _Mode.WATCH if attack is not None else _Mode.DONE
        self._held: list[Unit] = []
        self._window: list[PageRecord] = []
        self._earlier: dict[int, PageRecord] = {}
        self._pages = 0
        self._final = False
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

    # --- decoding -----------------------------------------------------------------------

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
            try:
                records = self._records(event, n)
            except (StreamError, mb.MailboxError) as exc:
                self._fail_open(f"a page record that does not parse: {exc}")
                return
            if records is not None:
                del self._raw[:n]  # re-encoded from the records when they go out
                for rec in records:
                    self._unit(rec, ends=rec.is_completion)
            elif n:
                raw = bytes(self._raw[:n])
                del self._raw[:n]
                self._unit(raw, ends=isinstance(event, RamEos) and self._final and self.kind is not Kind.MH)
            if isinstance(event, SectionEnd):
                self._final = True
            if isinstance(event, End):
                self._release()
                return

    def _records(self, event: object, n: int) -> list[PageRecord] | None:
        """The page records of this kind in ``event`` (whose bytes are the first ``n`` of
        ``_raw``), or None: the event passes as bytes."""
        if isinstance(event, Confidential):
            if self.kind is Kind.MH and event.subtype == ConfidentialSubtype.MH_RECORD:
                rec = mh_record(event.payload, index=self._pages)
                if rec.is_page:
                    self._count(rec)
                return [rec]
            if self.kind is Kind.PSP and event.subtype == ConfidentialSubtype.PSP_PACKET:
                psp = psp_record(event.payload, index=self._pages, epoch=int(self._final))
                if psp is None:
                    return None
                self._count(psp)
                return [psp]
            return None
        if self.kind is Kind.PLAIN and isinstance(event, RamPages):
            return self._plain_pages(event, n)
        return None

    def _plain_pages(self, event: RamPages, n: int) -> list[PageRecord] | None:
        """One record per page; a run of them passes as bytes once the attack is done."""
        count = len(event.indices)
        if self._mode is _Mode.DONE:
            ids = [RecordId(0, self._pages + i) for i in range(count)]
            self._pages += count
            self.tally.received += ids
            self.tally.forwarded += ids
            return None
        raw = bytes(self._raw[:n])
        run = n == count * PAGE_RECORD_SIZE  # PAGE|CONTINUE records; else one standalone record
        out = []
        for i, index in enumerate(event.indices):
            start = i * PAGE_RECORD_SIZE + PLAIN_HEADER_SIZE
            page = raw[start : start + PAGE_SIZE] if run else raw[-PAGE_SIZE:]
            rec = plain_record(event.block, int(index) << PAGE_SHIFT, page, index=self._pages,
                               epoch=int(self._final))
            self._count(rec)
            out.append(rec)
        return out

    def _count(self, rec: PageRecord) -> None:
        self._pages += 1
        self.tally.received.append(rec.id)

    def _covers(self, rec: PageRecord) -> bool:
        if self.pages is None:
            return True
        return any(lo <= gpa < hi for gpa in rec.gpas for lo, hi in self.pages)

    # --- the attack's window ------------------------------------------------------------

    def _unit(self, unit: Unit, *, ends: bool = False) -> None:
        self.tally.completion |= ends
        if self._mode is _Mode.ENDED:  # a Cut went out (the rest of a run of plain pages comes here)
            return
        attack = self.attack
        if self._mode is _Mode.DONE or attack is None:
            self._emit(unit)
            return
        page = isinstance(unit, PageRecord) and unit.is_page
        if self._mode is _Mode.WATCH:
            if isinstance(unit, PageRecord) and page and self._selects(attack, unit):
                self._mode = _Mode.CAPTURE
                self._held, self._window = [unit], [unit]
                self._maybe_act(attack)
            else:
                self._emit(unit)
            self._remember(unit)
            return
        # CAPTURE: hold everything, in order, until the window is whole.
        assert self._window
        if isinstance(unit, PageRecord) and page and unit.stream == self._window[0].stream:
            covered = self._covers(unit)
            if attack.at == LAST:
                if covered:  # a later candidate: the held one was not the last
                    self._release()
                    self._mode = _Mode.CAPTURE
                    self._held, self._window = [unit], [unit]
                else:
                    self._held.append(unit)
                self._remember(unit)
                return
            if not covered:  # the window must be pages the guest checks: start again later
                self._release()
                self._emit(unit)
                return
            self._held.append(unit)
            self._window.append(unit)
            self._maybe_act(attack)
            self._remember(unit)
            return
        self._held.append(unit)
        if ends:
            if attack.at == LAST:
                self._act(attack)
            else:
                self._release()  # the stream ran out of records before the window did

    def _remember(self, unit: Unit) -> None:
        """Keep the version of a watched page the source just sent (for a later replay)."""
        if (self.pages is not None and isinstance(unit, PageRecord) and unit.kind is not Kind.MH
                and self._mode is not _Mode.DONE and self._covers(unit)):
            self._earlier[unit.gpa] = unit

    def _selects(self, attack: Attack, rec: PageRecord) -> bool:
        if not self._covers(rec):
            return False
        if attack.at == LAST:
            return True
        if attack.at == FINAL:
            return rec.epoch > 0 and attack.wants(rec, self._earlier)
        return rec.index >= attack.at and attack.wants(rec, self._earlier)

    def _maybe_act(self, attack: Attack) -> None:
        if attack.at != LAST and len(self._window) == attack.span:
            self._act(attack)

    def _act(self, attack: Attack) -> None:
        """Put the rewritten records into the window's record positions, in order; more of
        them than positions go after the last one, fewer leave positions out."""
        edits = attack.rewrite(self._window, self._earlier)
        self.tally.window = [r.id for r in self._window]
        self.tally.window_gpas = [r.gpa for r in self._window]
        self.tally.window_epochs = [r.epoch for r in self._window]
        self.tally.changed = sum(1 for e in edits if not self._genuine(e))
        self.tally.done.append(f"{attack.name}: {self._describe(edits)}")
        slots = [i for i, u in enumerate(self._held) if any(u is r for r in self._window)]
        held, self._held, self._window = self._held, [], []
        self._mode = _Mode.DONE
        self._earlier.clear()
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
        def name(r: PageRecord) -> str:
            if r.kind is Kind.MH:
                return f"{r.stream}.{r.seq}"
            return f"#{r.index}@{r.gpa:#x}"

        def one(e: Edit) -> str:
            if isinstance(e, Cut):
                return f"cut after {len(e.wire)} bytes"
            return name(e) + ("" if self._genuine(e) else "*")

        was = " ".join(name(r) for r in self._window)
        return f"[{was}] -> [{' '.join(one(e) for e in edits)}] (* changed)"

    def _genuine(self, edit: Edit) -> bool:
        """``edit`` is one of the window's records, or an earlier one, as the source sent it."""
        return any(edit is r for r in self._window) or any(edit is r for r in self._earlier.values())

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
        if isinstance(unit, PageRecord):
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
    main channel) goes through a :class:`StreamProxy`, any other passes untouched.
    ``record``: keep the bytes forwarded on the main channel (:attr:`sent`)."""

    def __init__(self, target: tuple[str, int], attack: Attack | None = None, *, kind: Kind = Kind.MH,
                 pages: GpaRanges | None = None, record: bool = False) -> None:
        self.target = target
        self.proxy = StreamProxy(attack, kind=kind, pages=pages)
        self.record = record
        self.sent = bytearray()
        self.finished = threading.Event()
        """The main channel's forwarding ended (the source closed, the target went, or a Cut)."""
        self._forwarder = Forwarder(("127.0.0.1", 0), target, self._directions, recv_size=RECV_SIZE,
                                    name="stream-proxy")

    @property
    def tally(self) -> Tally:
        return self.proxy.tally

    @property
    def uri(self) -> str:
        return self._forwarder.address

    @property
    def connections(self) -> int:
        return self._forwarder.connections

    def close(self) -> None:
        """Accept no more connections (those under way end on their own)."""
        self._forwarder.close()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _directions(self, n: int) -> tuple[Direction, Direction]:
        """Connection ``n``'s. The forward one ends with a half-close, even on an error, so that
        the target's verdict (and an abort token) still comes back; a Cut ends both ways, and
        so does the return one."""
        main = n == 1
        proxy = self.proxy if main else StreamProxy()

        def out() -> bytes:
            data = proxy.data_to_send()
            if main and self.record:
                self.sent += data
            return data

        def chunk(data: bytes) -> tuple[bytes, bool]:
            proxy.receive_data(data)
            return out(), not proxy.ended

        def end() -> bytes:
            proxy.feed_eof()
            return out()

        def done() -> None:
            if main:
                self.finished.set()

        return Direction(chunk=chunk, end=end, done=done, error_resets=False), Direction(half_close=False)
