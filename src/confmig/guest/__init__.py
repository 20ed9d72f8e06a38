"""Code that runs inside the VM: firmware, kernel and workloads.

Guest code is step functions over :class:`confmig.platform.cpu.abi.GuestCpu`
and keeps all of its state in guest RAM and registers (the guest-state rule);
``docs/guest.md`` describes the boot sequence, the memory map and the step
discipline. It may import only the CPU ABI, ``confmig.common``, numpy and the
standard library.
"""
