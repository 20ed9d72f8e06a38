"""The kv device's guest-visible specification: port registers, queue layout, request
format, operations and status codes.

Both sides of the device read this one page: the guest driver
(:mod:`confmig.guest.workloads.kv`) and the VMM's device model
(:mod:`confmig.vmm.devices.kv`), as a virtio driver and device share the spec.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from confmig.common.units import PAGE_SIZE
from confmig.common.x86 import INTERRUPT_VECTOR_KV, KV_PORT_BASE, KV_PORT_COUNT

__all__ = ["KV_PORT_BASE", "KV_PORT_COUNT"]

KV_REG_ID_GPA_LO = 0x0
KV_REG_GPA_HI = 0x4
KV_REG_STATUS_CONTROL = 0x8
KV_REG_NOTIFY = 0xC
KV_DEVICE_ID = int.from_bytes(b"CMKV", "little")
KV_CONTROL_ENABLE = 1
KV_IRQ_VECTOR = INTERRUPT_VECTOR_KV
"""The interrupt the device raises when it published requests."""

KV_KEY_MAX = 64
KV_VALUE_MAX = 1024
"""Small values keep one request in one slot and the hash table's slots fixed-size."""
KV_HEADER = struct.Struct("<BBHIQ")
KV_SLOT_KEY = 16
KV_SLOT_VALUE = KV_SLOT_KEY + KV_KEY_MAX
KV_SLOT_SIZE = 2048
"""A power of two that holds header, longest key and longest value."""
KV_RING_SIZE = 64
"""Requests in flight in the guest; beyond that they wait in the device's backlog."""
KV_QUEUE_AVAIL = 0x000
KV_QUEUE_USED = 0x040
KV_QUEUE_RING = PAGE_SIZE
KV_QUEUE_SIZE = KV_QUEUE_RING + KV_RING_SIZE * KV_SLOT_SIZE


class KvOp(IntEnum):
    PUT = 1
    GET = 2
    DEL = 3


class KvStatus(IntEnum):
    OK = 0
    NOT_FOUND = 1
    MALFORMED = 2
    """The request did not parse; nothing reached the guest."""
    FULL = 3
    """The guest's table has no room for another key."""
    BUSY = 4
    """The device's backlog is full; retry later."""
    IO_ERROR = 5
    """The guest answered with a completion that does not parse."""
