"""The verification process pool: CPU-bound checks run beside the bytewax worker.

Commit proofs (signature, MST inversion) and repo CARs (block hashes, MST, records to
JSON) are pure functions of bytes, and on a single bytewax worker they hold the GIL the
worker needs for state, storage and delivery. This pool runs them in ``TAP_VERIFY_WORKERS``
processes, started with ``spawn`` (never ``fork`` after RocksDB opened: DESIGN.md), each
dying with the flow process (PR_SET_PDEATHSIG) and ignoring SIGINT (the flow handles the
terminal's Ctrl-C and stops them itself).

    from runtime.procpool import start_pool, pool
    start_pool(cfg.verify_workers)          # in flows/tap.py, before any database opens
    fut = pool().submit(fn, *args)           # fn and args must pickle; None pool = run inline

``pool()`` is ``None`` when the pool is off (``TAP_VERIFY_WORKERS=0``) or not started
(unit tests): callers then call the function themselves.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)

_POOL: ProcessPoolExecutor | None = None


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from runtime.supervisor import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


def _warm() -> None:
    import operators.verify  # noqa: F401  (the modules every task needs)
    import protocol.atjson  # noqa: F401
    import protocol.commit  # noqa: F401


def start_pool(workers: int) -> ProcessPoolExecutor | None:
    """Start the pool once (idempotent); ``workers <= 0`` leaves it off."""
    global _POOL
    if _POOL is not None or workers <= 0:
        return _POOL
    ctx = multiprocessing.get_context("spawn")
    _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
    # Spawn every worker now, from this thread: otherwise the first submit (the firehose
    # thread) spawns them, they become that thread's children (invisible in
    # /proc/<pid>/task/<pid>/children, so CPU accounting misses them), and the first frames
    # wait for the spawn and the imports.
    for _ in range(workers):
        _POOL.submit(_warm)
    atexit.register(stop_pool)
    log.info("verification pool started", extra={"workers": workers})
    return _POOL


def pool() -> ProcessPoolExecutor | None:
    """The running pool, or ``None`` (verify inline)."""
    return _POOL


def workers() -> int:
    """Processes in the running pool (0 when off: work runs inline)."""
    p = _POOL
    return p._max_workers if p is not None else 0  # type: ignore[attr-defined]


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` in the pool, or inline (a completed future) when there is none."""
    p = _POOL
    if p is not None:
        return p.submit(fn, *args)
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # the caller sees it through the future, as from the pool
        fut.set_exception(e)
    return fut


def stop_pool() -> None:
    """Stop the workers (pending work is cancelled: the flow redoes it after a restart)."""
    global _POOL
    p, _POOL = _POOL, None
    if p is not None:
        p.shutdown(wait=False, cancel_futures=True)
