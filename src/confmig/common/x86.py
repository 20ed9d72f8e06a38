"""Architectural numbers both sides of the guest/host boundary use: MSRs, ports, vectors,
and KVM's paravirtual interface.

The guest ABI (:mod:`confmig.platform.cpu.abi`) re-exports them for guest code;
the VMM and KVM import them from here, so neither reaches into the platform.
Each number is defined here once (``tests/style`` checks it).
"""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

# KVM's paravirtual interface, with Linux's names and values (arch/x86/include/uapi/asm/kvm_para.h,
# include/uapi/linux/kvm_para.h). As in Linux, a KVM_FEATURE_* is a bit number in
# KVM_CPUID_FEATURES EAX; its mask is ``1 << KVM_FEATURE_...``.
KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
"""What leaf KVM_CPUID_SIGNATURE answers in EBX, ECX, EDX."""
KVM_CPUID_FEATURES = 0x4000_0001
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17
MSR_KVM_MIGRATION_CONTROL = 0x4B56_4D08
KVM_MIGRATION_READY = 1 << 0
KVM_HC_MAP_GPA_RANGE = 12
"""Hypercall: ``(gpa, npages, attrs)``; tells the host a range changed encryption status."""
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
"""``KVM_HC_MAP_GPA_RANGE`` attribute: the range became private (0: shared), 4 KiB pages."""
KVM_ENOSYS = 1000
"""A hypercall the host does not implement returns ``-KVM_ENOSYS`` in rax."""

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
