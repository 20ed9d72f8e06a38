"""What the Migration Handler's cryptography costs per GiB on one core, in this emulation.

Each private page crosses the emulated memory-encryption engine twice (the source's MH
reads it, the target's stores it) and AES-256-GCM twice (sealed, opened). This times those
four steps alone, in this process, as the MH does them: batches of
:data:`~confmig.proto.mailbox.BATCH_PAGES` random pages at their own system-physical
addresses, the engine's bulk path, the record's header and GPA list as associated data.
Nothing else is counted: no mailbox, no copy, no socket, no Python around a command. Timed
in this thread's CPU time (what another process running meanwhile takes is not counted).

The MH path also does the plain path's work (the stream, the sockets, the landing), so a
run's plain CPU seconds per GiB plus this floor is about the least the MH path can cost;
where both keep as many cores busy, MH / plain throughput stays below
``plain / (plain + floor)``. Real SEV hardware does the engine's part inline in the memory
controller, at no CPU cost: the floor is the emulation's, GCM's part of it is not.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confmig.common.units import PAGE_SIZE, GiB, MiB
from confmig.platform.mee import KeySlots, MemoryEncryptionEngine
from confmig.proto import mailbox as mb

STEPS = ("engine read", "GCM seal", "GCM open", "engine write")
_ASID = 1
_SOURCE_SPA = 0x1_0000_0000
_TARGET_SPA = 0x5_0000_0000


def measure(total: int = 128 * MiB, reps: int = 3) -> dict[str, float]:
    """Seconds per GiB of each step (the median of ``reps`` passes over ``total`` bytes),
    and ``total``, their sum."""
    n = mb.BATCH_PAGES
    batches = max(total // (n * PAGE_SIZE), 1)
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, (batches, n, PAGE_SIZE), dtype=np.uint8)
    slots = KeySlots()
    try:
        slots.install(_ASID, os.urandom(16))
        engine = MemoryEncryptionEngine(slots)
        aead = AESGCM(os.urandom(32))
        aad = bytes(mb.RECORD_HEADER.size + 8 * n)
        plain = np.empty((n, PAGE_SIZE), np.uint8)
        sealed = np.empty(n * PAGE_SIZE + mb.TAG_SIZE, np.uint8)
        landed = np.empty((n, PAGE_SIZE), np.uint8)
        spas = [np.arange(n, dtype=np.uint64) * PAGE_SIZE + np.uint64(base + b * n * PAGE_SIZE)
                for b in range(batches) for base in (_SOURCE_SPA, _TARGET_SPA)]
        times: dict[str, list[float]] = {step: [] for step in STEPS}
        for _ in range(reps):
            spent = dict.fromkeys(STEPS, 0.0)
            for b in range(batches):
                nonce = mb.nonce(0, b)
                t0 = time.thread_time()
                engine.decrypt_pages(_ASID, spas[2 * b], pages[b], out=plain)
                t1 = time.thread_time()
                aead.encrypt_into(nonce, plain.data, aad, sealed.data)
                t2 = time.thread_time()
                aead.decrypt_into(nonce, sealed.data, aad, plain.data)
                t3 = time.thread_time()
                engine.encrypt_pages(_ASID, spas[2 * b + 1], plain, out=landed)
                t4 = time.thread_time()
                for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    spent[step] += seconds
            for step in STEPS:
                times[step].append(spent[step] * GiB / (batches * n * PAGE_SIZE))
    finally:
        slots.close()
    per_gib = {step: round(statistics.median(times[step]), 4) for step in STEPS}
    return {**per_gib, "total": round(sum(per_gib.values()), 4)}
