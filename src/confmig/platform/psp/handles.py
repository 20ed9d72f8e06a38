"""Vocabulary types of the firmware: the guest handle and the ASID.

A guest handle names a guest context inside the PSP (1..1024, 0 means "none"
or "allocate a new one" depending on the command). An ASID names a slot of the
memory controller's key table and a TLB tag on the cores; binding the two is
what ACTIVATE does.
"""

from __future__ import annotations

from typing import NewType

GuestHandle = NewType("GuestHandle", int)
"""A guest context in the PSP."""
Asid = NewType("Asid", int)
"""An address-space id: a key slot in the memory controller."""

GUEST_HANDLE_MIN = 1
GUEST_COUNT_MAX = 1024  # firmware SEV_GUEST_COUNT_MAX
GUEST_HANDLE_MAX = GUEST_HANDLE_MIN + GUEST_COUNT_MAX - 1
