"""Reading a process's memory as a debugger (or the host's admin) would: what the canary scans
of the security tests look through."""

from __future__ import annotations

from collections.abc import Iterator


def process_memory(pid: int) -> Iterator[bytes]:
    """Every readable mapping of a process."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            addresses, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith("[vvar]"):
                continue
            start, end = (int(x, 16) for x in addresses.split("-"))
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # e.g. [vsyscall]
