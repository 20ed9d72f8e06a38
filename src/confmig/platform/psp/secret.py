"""The discipline every key-holding class of the PSP follows.

Key material must never leak through a log line, a traceback, a debugger
printout or a pickle sent to another process. A class that holds keys derives
from :class:`Secret`: its ``repr`` names the class only, and pickling (and
therefore ``copy``) is refused. Dataclasses deriving from it pass
``repr=False`` so that the redacted ``__repr__`` survives.
"""

from __future__ import annotations

from typing import NoReturn


class Secret:
    """Mixin: redacted ``repr``, no pickling, no copying."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (redacted)>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be pickled")
