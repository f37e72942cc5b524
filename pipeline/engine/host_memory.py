"""Host-memory hygiene for ZeRO-3 engines on CPU ranks (and fp32 runs anywhere).

Two wastes that are not in any plan: DeepSpeed's fp32 master partition duplicated although the
parameters already are fp32 partitions on the same device, and glibc keeping freed heap memory
(load-time temporaries) resident instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Optional

log = logging.getLogger(__name__)


def share_fp32_master(engine: Any) -> int:
    """Let ZeRO-3's fp32 master partitions *be* the parameter partitions when those are fp32 already.

    DeepSpeed 0.19 means to do this itself (``_create_fp32_partitions``: "we don't need another copy
    of the weights") but compares ``tensor.device`` with a device *name* string, which is never equal,
    so an fp32 run keeps a second copy of every partition (4 bytes per parameter over the ranks). The
    optimizer updates the master partition in place and then copies it into the parameter partition;
    when both are one tensor that copy is a no-op, so the arithmetic is unchanged. Returns the bytes
    freed on this rank.
    """
    opt = getattr(engine, "optimizer", None)
    masters = getattr(opt, "fp32_partitioned_groups_flat", None)
    params = getattr(opt, "fp16_partitioned_groups_flat", None)
    if not masters or not params or getattr(opt, "offload_optimizer", False):
        return 0
    freed = 0
    for master, part in zip(masters, params):
        if part is None or master.numel() != part.numel() or master.dtype != part.dtype:
            continue
        if master.device != part.device or master.data_ptr() == part.data_ptr():
            continue
        part.data.copy_(master.data)  # identical values already; keeps any later divergence impossible
        freed += master.numel() * master.element_size()
        master.data = part.data
    if freed:
        log.info("ZeRO-3 fp32 master partitions now share the fp32 parameter partitions (%.1f MiB freed)",
                 freed / 2**20)
    return freed


def trim_host_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); False where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


# Above this many parameters a CPU rank maps medium allocations (activations) instead of taking them
# from the heap: at 134M the heap's freed blocks kept 100-200 MiB resident at the peak, while the page
# faults of fresh mappings were lost in a ~12 s step. On small models the trade reverses: the demo's
# 1M-parameter model ran its training loop 1.7x slower with the 128 KiB threshold (page faults on every
# activation of a ~0.1 s step), for a few MiB of fragmentation.
LARGE_MODEL_PARAMS = 20_000_000
SMALL_MODEL_MMAP_THRESHOLD = 1 << 20
LARGE_MODEL_MMAP_THRESHOLD = 128 << 10


def mmap_threshold_for(n_params: int) -> int:
    """The glibc mmap threshold for a CPU rank holding (a shard of) an ``n_params`` model."""
    return LARGE_MODEL_MMAP_THRESHOLD if n_params >= LARGE_MODEL_PARAMS else SMALL_MODEL_MMAP_THRESHOLD


_LOGGED: Optional[tuple[int, int, bool]] = None


def tune_host_allocator(mmap_threshold: int = SMALL_MODEL_MMAP_THRESHOLD, arenas: int = 2) -> bool:
    """Make freed tensor memory go back to the OS on CPU ranks (glibc only; else a no-op).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the
    load-time temporaries every tensor below 32 MiB comes from the heap, whose freed pages stay
    resident; and each thread that touches malloc may get its own arena (8 x cores by default).
    A fixed threshold and two arenas keep a ZeRO-3 rank's resident set near what it holds. The
    threshold: 1 MiB at start-up; once the model is known, :func:`mmap_threshold_for` (glibc's own
    starting value, 128 KiB, from 20M parameters: activations of a few hundred KiB each — 2 rows x 64
    tokens x 768 fp32 = 384 KiB — are then mapped and unmapped instead of fragmenting the heap, where
    100-200 MiB of freed blocks stayed resident at 134M with 1 MiB; measured with
    benchmarks/bench_memory.py, docs/performance.md). May be called again. ``MALLOC_*`` variables
    set by the user win: then nothing is changed.
    """
    import os

    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    ok &= bool(mallopt(M_TRIM_THRESHOLD, int(mmap_threshold)))
    ok &= bool(mallopt(M_ARENA_MAX, int(arenas)))
    global _LOGGED
    if _LOGGED == (mmap_threshold, arenas, ok):  # called again with the same settings: said already
        return ok
    _LOGGED = (mmap_threshold, arenas, ok)
    log.info("host allocator (CPU ranks): glibc mmap/trim threshold %d KiB, %d arenas%s", mmap_threshold // 1024,
             arenas, "" if ok else " (mallopt refused a setting)")
    return ok
