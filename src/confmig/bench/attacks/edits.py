"""What a hostile host does to the page records it carries: one :class:`Attack` each.

An attack acts once, on a window of ``span`` consecutive page records of one stream (an MH
stream; for PSP and plain records, the one stream of page records). The window starts at
page record number ``at`` (or the first one after it that the attack :meth:`~Attack.wants`),
at the first record of the stop-and-copy part (``at=FINAL``), or at the last page record
before the end of the pages (``at=LAST``: an MH stream's completion record, the end of the
other kinds' stop-and-copy part). :meth:`~Attack.rewrite` returns what goes out in the
window's record positions: records (genuine, or changed with :class:`PageRecord`'s
operations) and at most one :class:`Cut`.

Windows at ``FINAL`` matter for records whose only protection is that the next round sends
a page again: a record changed in a precopy round is usually overwritten by a later one;
one changed in the stop-and-copy part is what the target's guest runs on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Literal

from confmig.bench.attacks.records import Kind, PageRecord, Part

LAST: Final = "last"
"""``Attack.at``: the last page record before the end of the pages (of the stop-and-copy
part, unless it had none)."""
FINAL: Final = "final"
"""``Attack.at``: the first page record of the stop-and-copy part the attack wants."""
FIRST_ROUND: Final = 30
"""``Attack.at`` by default: well inside the first precopy round (of a 64 MiB guest, about 110
MH records), once the target's MH has taken records of every stream."""

At = int | Literal["last", "final"]
Earlier = Mapping[int, PageRecord]
"""The version of each page sent before the window's (by GPA; PSP and plain records of the
pages a proxy watches, see ``StreamProxy(pages=...)``)."""


@dataclass(frozen=True, slots=True)
class Cut:
    """Send these bytes, then end the stream: a connection cut in the middle of a record."""

    wire: bytes


Edit = PageRecord | Cut


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """Rewrites a window of ``span`` consecutive page records of one stream, once."""

    name: ClassVar[str]
    at: At = FIRST_ROUND

    @property
    def span(self) -> int:
        return 1

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        raise NotImplementedError

    def wants(self, record: PageRecord, earlier: Earlier) -> bool:
        """Whether the window may start at ``record``."""
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Swap(Attack):
    """Records ``at`` and ``at + distance`` exchange places. An MH record carries its address
    inside the seal, so the records move; a PSP or plain record's address is outside it, so
    the two pages' contents exchange addresses (page A's packet lands at B, B's at A)."""

    name = "swap"
    distance: int = 3

    @property
    def span(self) -> int:
        return self.distance + 1

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        first, last = records[0], records[-1]
        if first.kind is Kind.MH:
            return [last, *records[1:-1], first]
        return [last.readdressed(first), *records[1:-1], first.readdressed(last)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay(Attack):
    """Record ``at`` goes through, and again after ``later`` more records of its stream."""

    name = "replay"
    later: int = 3

    @property
    def span(self) -> int:
        return self.later + 1

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [*records, records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleReplay(Attack):
    """A page's newer record goes through, then the record of its previous version, sent in
    an earlier round, again: the old version wins (PSP and plain records; the window is a
    page sent before)."""

    name = "replay"
    at: At = FINAL

    def wants(self, record: PageRecord, earlier: Earlier) -> bool:
        old = earlier.get(record.gpa)
        return old is not None and old.payload != record.payload

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [records[0], earlier[records[0].gpa]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reorder(Attack):
    """Two consecutive records of one stream go in the opposite order."""

    name = "reorder"

    @property
    def span(self) -> int:
        return 2

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [records[1], records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Drop(Attack):
    """One record never arrives (``at=LAST``: the final part's last, which only an MH
    completion record can miss)."""

    name = "drop"

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate(Attack):
    """One record arrives twice in a row."""

    name = "duplicate"

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [records[0], records[0]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Inject(Attack):
    """A forged record in the place the genuine one expects: the genuine addressing (for MH
    its header and GPA list: all the checks a host can see pass), random content and MAC or
    tag. It goes before the genuine record, or after it (``after``: so that the genuine one
    does not overwrite it where nothing refuses it)."""

    name = "inject"
    seed: int = 11
    after: bool = False

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        genuine = records[0]
        forged = genuine.forged(self.seed)
        return [genuine, forged] if self.after else [forged, genuine]


@dataclass(frozen=True, slots=True, kw_only=True)
class Flip(Attack):
    """One bit of one record flips on the way."""

    name = "flip"
    part: Part = Part.CIPHERTEXT

    def wants(self, record: PageRecord, earlier: Earlier) -> bool:
        if self.part is not Part.CIPHERTEXT or record.mh is None:
            return True
        return record.mh.data_pages > 0  # a page to flip

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [records[0].flipped(self.part)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Truncate(Attack):
    """The record loses its last page (MH), 16 bytes of its packet (PSP) or its data (plain),
    and what describes it is made to agree: a well-formed, shorter record."""

    name = "truncate"

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        return [records[0].truncated()]


@dataclass(frozen=True, slots=True, kw_only=True)
class CutShort(Attack):
    """The connection ends halfway through a record."""

    name = "cut"

    def rewrite(self, records: Sequence[PageRecord], earlier: Earlier) -> list[Edit]:
        wire = records[0].wire()
        return [Cut(wire[: len(wire) // 2])]
