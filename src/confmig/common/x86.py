"""Architectural numbers both sides of the guest/host boundary use: MSRs, ports, vectors.

The guest ABI (:mod:`confmig.platform.cpu.abi`) re-exports them for guest code;
the VMM and KVM import them from here, so neither reaches into the platform.
"""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_MIGRATION_CONTROL = 0x4B56_4D08
KVM_MIGRATION_READY = 1 << 0

NMI_VECTOR = 2
LOCAL_TIMER_VECTOR = 0xEC
"""Linux's LOCAL_TIMER_VECTOR: the TSC-deadline timer fires here."""

# I/O ports of the model machine (QEMU's numbers).
COM1_PORT = 0x3F8
FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_PORT_DMA_HI = 0x514
FW_CFG_PORT_DMA_LO = 0x518
ISA_DEBUG_EXIT_PORT = 0x501
KV_PORT_BASE = 0x600
KV_PORT_COUNT = 0x10
INTERRUPT_VECTOR_KV = 0x30
"""Vector the VMM raises when the kv device has new requests."""
