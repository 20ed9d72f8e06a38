"""The main channel's records in QEMU's order, sans-IO: no backend can emit a malformed stream.

QEMU's order (``qemu_savevm_state_*``)::

    header                file magic, version, CONFIGURATION
    ram SECTION_START     MEM_SIZE, EOS, footer                 (setup)
    ram SECTION_PART *    records, EOS, footer                  (one per precopy round)
    ram SECTION_END       records, EOS, footer                  (the stop-and-copy part)
    SECTION_FULL *        one per device, in order
    EOF, VMDESCRIPTION

:class:`StreamWriter` returns the bytes of each step and refuses a step out of this order
with a :class:`StateError`; RAM records (pages, zero pages, confidential records) are only
accepted inside a ``ram`` part. It does no I/O: the caller sends what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from confmig.common.errors import StateError
from confmig.proto.stream import encoder as enc
from confmig.proto.stream.format import ConfidentialSubtype, IndexArray, PageArray

RAM_SECTION_ID = 0
"""The ``ram`` section opens the stream, so it gets the first id; devices follow."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSection:
    """One SECTION_FULL: a vCPU's or a device's saved state, opaque to the stream."""

    idstr: str
    instance_id: int
    version_id: int
    state: bytes


class WriterState(Enum):
    START = "start"
    SETUP = "setup"  # header and the ram SECTION_START written; rounds may begin
    ROUND = "round"  # inside a ram SECTION_PART
    FINAL = "final"  # inside the ram SECTION_END
    DEVICES = "devices"  # the ram section ended: device sections, then EOF
    DONE = "done"


_RAM_RECORDS = (WriterState.ROUND, WriterState.FINAL)


class StreamWriter:
    """One outgoing stream's main channel, as bytes, in order."""

    def __init__(self, machine_type: str, *, batch_pages: int = enc.DEFAULT_BATCH_PAGES) -> None:
        self.machine_type = machine_type
        self.state = WriterState.START
        self._pages = enc.PageBatchEncoder(batch_pages)
        self._next_section = RAM_SECTION_ID + 1
        self._described: list[enc.DeviceDescription] = []

    def _step(self, operation: str, allowed: tuple[WriterState, ...], new: WriterState | None = None) -> None:
        if self.state not in allowed:
            raise StateError(f"stream {operation}", self.state.value, " or ".join(s.value for s in allowed))
        if new is not None:
            self.state = new

    # --- sections -------------------------------------------------------------------

    def setup(self, blocks: Sequence[tuple[str, int]]) -> bytes:
        """The file header and the ``ram`` section's start, listing ``(idstr, size)`` of every block."""
        self._step("setup", (WriterState.START,), WriterState.SETUP)
        return enc.header(self.machine_type) + enc.ram_setup(RAM_SECTION_ID, blocks)

    def begin_round(self) -> bytes:
        """Open one precopy round (a ``ram`` SECTION_PART)."""
        self._step("round", (WriterState.SETUP,), WriterState.ROUND)
        return enc.ram_part_begin(RAM_SECTION_ID)

    def begin_final(self) -> bytes:
        """Open the stop-and-copy part (the ``ram`` SECTION_END)."""
        self._step("final part", (WriterState.SETUP,), WriterState.FINAL)
        return enc.ram_end_begin(RAM_SECTION_ID)

    def end_part(self) -> bytes:
        """Close the open ``ram`` part: EOS and the footer."""
        self._step("end of part", _RAM_RECORDS)
        self.state = WriterState.SETUP if self.state is WriterState.ROUND else WriterState.DEVICES
        return enc.eos_and_footer(RAM_SECTION_ID)

    def device(self, section: DeviceSection) -> bytes:
        """One device's SECTION_FULL, after the ``ram`` section has ended."""
        self._step("device section", (WriterState.DEVICES,))
        section_id = self._next_section
        self._next_section += 1
        self._described.append(enc.DeviceDescription(
            idstr=section.idstr, instance_id=section.instance_id, version_id=section.version_id,
            state_size=len(section.state)))
        return enc.device_section(section_id, section.idstr, section.instance_id, section.version_id,
                                  section.state)

    def eof(self) -> bytes:
        """EOF and the vmdescription of every device section written."""
        self._step("EOF", (WriterState.DEVICES,), WriterState.DONE)
        return enc.eof() + enc.vmdescription(self._described)

    # --- records inside a ram part ----------------------------------------------------

    def pages(self, block: str, pages: PageArray, indices: IndexArray) -> enc.PageBatch:
        """PAGE records for ``pages[indices]`` (at most :attr:`batch_pages`); zero pages are
        left out and returned in ``zero``. The batch (its iovec) is valid until the next call."""
        self._step("pages", _RAM_RECORDS)
        return self._pages.encode(block, pages, indices)

    def zero_pages(self, block: str, indices: IndexArray) -> bytes:
        self._step("zero pages", _RAM_RECORDS)
        return enc.encode_zero_pages(block, indices)

    def confidential(self, subtype: ConfidentialSubtype, payload: bytes) -> bytes:
        self._step("confidential record", _RAM_RECORDS)
        return enc.confidential_record(subtype, payload)

    def confidential_header(self, subtype: ConfidentialSubtype, length: int) -> bytes:
        """:meth:`confidential` without its payload: the caller sends the payload next."""
        self._step("confidential record", _RAM_RECORDS)
        return enc.confidential_header(subtype, length)
