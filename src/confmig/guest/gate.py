"""The run gate: whether this guest may run on this host (a migration's no-fork rule).

One le64 word at ``RUN_GATE_GPA``, in the kernel data page (private). The
Migration Handler closes it; the kernel checks it on every step, with the
kernel data it reads anyway, and the firmware at reset::

    0 (or anything else)  the guest runs
    SAVING                SEV-ES source, from PARK: each vCPU saves its registers
                          (:mod:`confmig.guest.saved_state`) and parks; RESET (the
                          migration did not happen) opens the gate again
    MIGRATED_AWAY         source, after FINISH: the guest's state was sealed for a
                          target; it runs here again only if RESUME opens the
                          target's abort token
    INCOMING              target, while importing: the gate's own page arrived
                          with the migration and is not the guest's until COMPLETE
    ABORTED               target, after ABORT: the guest never runs here

The values are magic numbers, so that whatever a fresh SEV guest reads through
the C-bit before its firmware clears the word (ciphertext of nothing) opens it.

Order, source: FINISH closes the gate after the last EXPORT and refuses every
EXPORT after it, so the copy of this page a target imports predates the close;
a target's COMPLETE opens its gate whatever the imported copy says. A host
that replays the page's old ciphertext reopens the gate: plain SEV keeps no
integrity for guest memory, and this rule does not claim more.
"""

from __future__ import annotations

import struct
from typing import Final

from confmig.guest.layout import RUN_GATE_GPA
from confmig.platform.cpu.abi import GuestCpu

OPEN: Final = 0
MIGRATED_AWAY: Final = int.from_bytes(b"CMGATE\x01\xa5", "little")
INCOMING: Final = int.from_bytes(b"CMGATE\x02\xa5", "little")
ABORTED: Final = int.from_bytes(b"CMGATE\x03\xa5", "little")
SAVING: Final = int.from_bytes(b"CMGATE\x04\xa5", "little")

_WORD: Final = struct.Struct("<Q")
SIZE: Final = _WORD.size
REASONS: Final[dict[int, str]] = {
    MIGRATED_AWAY: "confmig: this guest was migrated away; it will not run here",
    INCOMING: "confmig: this guest's incoming migration is not complete; it will not run here",
    ABORTED: "confmig: this guest's incoming migration was aborted; it will not run here",
    SAVING: "confmig: this vCPU saved its state for a migration and waits",
}
"""The console line of each closed gate."""


def closed(value: int) -> bool:
    return value in REASONS


def decode(word: bytes) -> int:
    (value,) = _WORD.unpack(word)
    return int(value)


def load(cpu: GuestCpu, mask: int) -> int:
    return decode(cpu.read(RUN_GATE_GPA | mask, _WORD.size))


def store(cpu: GuestCpu, value: int, mask: int) -> None:
    cpu.write(RUN_GATE_GPA | mask, _WORD.pack(value))
