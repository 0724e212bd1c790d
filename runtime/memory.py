"""Fewer glibc malloc arenas, so memory freed by one thread is reused by the next.

glibc gives threads up to 8 arenas per core; memory freed in one (a removal batch's objects,
a RocksDB flush's buffers) is only reused by threads of that arena, and fragmented arenas are
rarely given back to the system. Measured with ``bench.pipeline --only rss --rss-rounds 3``
(1M repos tracked, removed and replaced by another million, twice): the service's RSS grew
62-77 MB per round with the default arenas, 27 MB in the last round with 2.
"""

from __future__ import annotations

import ctypes
import gc
import os

#: ``mallopt`` parameter number of M_ARENA_MAX in glibc's malloc.h.
_M_ARENA_MAX = -8
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap this process's arenas and, through ``MALLOC_ARENA_MAX``, those of every process it
    starts afterwards. An operator's own ``MALLOC_ARENA_MAX`` wins. True when the cap applies
    here (glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    try:
        return ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):  # not glibc: the variable is harmless there
        return False


#: Allocations between young collections (CPython's default: 700).
GC_GEN0 = 10_000


def tune_gc() -> None:
    """Collect less often than CPython's default, once the process has loaded.

    Both processes churn through short-lived objects: the delivery child keeps up to
    ``TAP_OUTBOX_CAPACITY`` events in flight (the event, the target's bookkeeping, Kafka's
    per-message state), the flow decodes frames and builds items, undo entries and rows by the
    thousand per RepoLogic activation. With the default gen-0 threshold (700 allocations)
    most of them are scanned by a young collection, and again in gen 1, before they die (the
    flow process spent ~8.5 % of its CPU in the collector during live: perf, 30,000 commits).
    With 10,000, most die before the first scan; what the process loaded at start is frozen
    out of every collection."""
    gc.freeze()
    gc.set_threshold(GC_GEN0, 10, 10)
