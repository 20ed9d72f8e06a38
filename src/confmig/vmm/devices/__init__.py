"""Emulated devices of the model machine (QEMU's pc/q35 subset).

A device answers port I/O exits and carries its own migration state::

    class PortIoDevice(Protocol):
        vmsd_name: str            # stream section idstr, e.g. "serial", "fw_cfg"
        ports: range              # the I/O ports it decodes
        def io_out(self, port, data: bytes) -> None
        def io_in(self, port, size) -> bytes
        def save_state(self) -> bytes
        def load_state(self, data: bytes) -> None
"""

from __future__ import annotations

from typing import Protocol


class PortIoDevice(Protocol):
    vmsd_name: str
    ports: range

    def io_out(self, port: int, data: bytes) -> None: ...

    def io_in(self, port: int, size: int) -> bytes: ...

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes) -> None: ...
