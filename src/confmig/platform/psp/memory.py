"""How the PSP reaches guest memory: the port the host's memory-encryption engine implements.

The PSP does not own guest RAM. Like the real firmware (``copy_from_x86``,
``copy_to_x86_encrypted``), it reads and writes *system physical addresses*
through the memory controller, either raw (C-bit clear: the bytes as stored)
or through the key slot of an ASID (C-bit set: decrypted on read, encrypted
on write with that ASID's VEK, bound to the address). KVM translates guest
addresses to system addresses before issuing a command, as Linux does when it
pins guest pages.

The implementation wraps the memory-encryption engine
(``confmig.platform.mee``), which looks keys up by ASID in its key slots; the
PSP never passes a key through this port. The PSP's private accesses are at
16-byte granularity (addresses and lengths 16-byte aligned, as the firmware
checks), which is the engine's too (one AES block per 16 bytes, each tweaked by
its own address); a port may also read, patch and rewrite whole pages.
"""

from __future__ import annotations

from typing import Protocol

from confmig.common.errors import ConfmigError
from confmig.common.units import Spa
from confmig.platform.psp.handles import Asid


class SpaOutOfRange(ConfmigError):
    """The port has no memory at (part of) the requested system physical range.

    The PSP turns it into ``INVALID_ADDRESS``.
    """


class GuestMemoryPort(Protocol):
    def read(self, spa: Spa, size: int) -> bytes:
        """The bytes stored at ``[spa, spa + size)``, not decrypted (C-bit clear)."""
        ...

    def read_encrypted(self, asid: Asid, spa: Spa, size: int) -> bytes:
        """Plaintext of ``[spa, spa + size)`` decrypted with ``asid``'s VEK (C-bit set)."""
        ...

    def write_encrypted(self, asid: Asid, spa: Spa, data: bytes) -> None:
        """Store ``data`` at ``spa`` encrypted with ``asid``'s VEK (C-bit set)."""
        ...
