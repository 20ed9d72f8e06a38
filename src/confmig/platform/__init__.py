"""Emulated silicon: the CPU cores that run guest code (and, later, the PSP and MEE).

Trusted. Imports nothing above itself; the host kernel reaches it only through
the ports in :mod:`confmig.kvm.ports`, wired in :mod:`confmig.hostd`.
"""
