"""The VMM (QEMU's role): machine, devices, QMP, migration. Untrusted: its code gets
only ciphertext of private pages, plaintext of shared pages, and opaque handles."""
