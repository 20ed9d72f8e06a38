"""The host kernel's KVM, emulated: system → VM → vCPU handles over the ioctl channel.

Untrusted: its code handles memory slots, dirty logs, exits and opaque blobs, never
keys or plaintext of private pages (though the PSP shares the host daemon's process).
It reaches the emulated silicon only through the ports in :mod:`confmig.kvm.ports`,
wired by :mod:`confmig.hostd`.
"""
