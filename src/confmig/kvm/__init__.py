"""The host kernel's KVM, emulated: system → VM → vCPU handles over the ioctl channel.

Untrusted: it handles memory slots, dirty logs, exits and opaque blobs, never keys
or plaintext of private pages. It reaches the emulated silicon only through the
ports in :mod:`confmig.kvm.ports`, wired by :mod:`confmig.hostd`.
"""
