"""COM1, a 16550 UART reduced to what a console needs.

The guest writes console bytes to the data register (``outs``, one exit per
message); every byte goes to ``sink``. Reads of the line status register say
"transmitter empty", so a guest that polls before writing never waits. The
other registers read as zero and ignore writes: the guest neither programs a
baud rate nor receives input.
"""

from __future__ import annotations

from collections.abc import Callable

from confmig.common.errors import ProtocolError

COM1_BASE = 0x3F8
UART_RBR_THR = 0
"""Offset of the data register: receive buffer (read) / transmit holding (write)."""
UART_LSR = 5
"""Offset of the line status register."""
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40


class Serial:
    """The console UART; ``sink`` receives every byte the guest transmits."""

    vmsd_name = "serial"
    ports = range(COM1_BASE, COM1_BASE + 8)

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink

    def io_out(self, port: int, data: bytes) -> None:
        if port - COM1_BASE == UART_RBR_THR:
            self._sink(bytes(data))

    def io_in(self, port: int, size: int) -> bytes:
        value = UART_LSR_THRE | UART_LSR_TEMT if port - COM1_BASE == UART_LSR else 0
        return value.to_bytes(size, "little")

    def save_state(self) -> bytes:
        """Nothing to migrate: the transmitter is always empty."""
        return b""

    def load_state(self, data: bytes) -> None:
        if data:
            raise ProtocolError(f"serial: unexpected {len(data)} bytes of device state")
