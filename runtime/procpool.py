"""The verification process pool: CPU-bound checks run beside the bytewax worker.

Commit proofs (signature, MST inversion) and repo CARs (block hashes, MST, records to
JSON) are pure functions of bytes, and on a single bytewax worker they hold the GIL the
worker needs for state, storage and delivery. This pool runs them in ``TAP_VERIFY_WORKERS``
processes, started with ``spawn`` (never ``fork`` after RocksDB opened: DESIGN.md), each
dying with the flow process (PR_SET_PDEATHSIG) and ignoring SIGINT (the flow handles the
terminal's Ctrl-C and stops them itself).

    from runtime.procpool import start_pool, lanes, submit
    start_pool(cfg.verify_workers, lanes)   # in flows/tap.py, before any database opens
    fut = submit(fn, *args)                  # fn and args must pickle; no pool = run inline

Two ways in:

- ``lanes()``: one ``Lane`` per worker process, a duplex pipe serving one request at a time.
  The firehose drives them from its event loop (``Lane.send`` / ``loop.add_reader`` on
  ``Lane.fileno()`` / ``Lane.receive``): one pipe write and one read per batch, no helper
  threads. ``concurrent.futures.ProcessPoolExecutor`` costs ~300 us of the flow's CPU per
  task (a manager and a feeder thread, wake-ups, GIL hand-offs), as much as verifying a
  commit, which matters whenever batches are small (any rate below saturation).
  Only when live verification goes to the pool (``TAP_LIVE_VERIFY``; ``auto`` = 2+ CPUs:
  measured on 2 cores, docs/performance.md).
- ``submit(fn, *args)`` / ``pool()``: an executor of ``TAP_VERIFY_WORKERS`` processes (repo CARs
  from the backfill, whose tasks are large), or run inline when the pool is off.

``pool_running()`` is False when there are no lanes (pool off, ``TAP_LIVE_VERIFY`` inline, or
unit tests): the firehose then leaves verification to RepoLogic.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import pickle
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)

_POOL: ProcessPoolExecutor | None = None
_RENEW = threading.Lock()
_SPAWNER: ThreadPoolExecutor | None = None
_LANES: list["Lane"] = []
_WORKERS = 0


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from runtime.supervisor import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


def _warm() -> None:
    """Import what every task needs (commit frames, repo CARs), once per worker at start."""
    import operators.verify  # noqa: F401
    import protocol.commit  # noqa: F401
    import protocol.keys  # noqa: F401
    import protocol.snapshot  # noqa: F401


def _serve(conn: Any) -> None:
    """A lane's process: answer ``(fn, args)`` requests with ``(True, result)`` or
    ``(False, "error text")`` until the pipe closes."""
    _init_worker()
    _warm()
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(msg)
            out = (True, fn(*args))
        except BaseException as e:  # reported to the caller, the lane keeps serving
            out = (False, f"{type(e).__name__}: {e}")
        try:
            conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, pickle.PicklingError, TypeError) as e:
            try:
                conn.send_bytes(pickle.dumps((False, f"result not sent: {e}")))
            except OSError:
                return


class Lane:
    """One worker process and its pipe; one request at a time (the caller keeps track)."""

    def __init__(self, ctx: Any, n: int) -> None:
        here, there = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(there,), name=f"tapflow-verify-{n}", daemon=True)
        self.proc.start()
        there.close()
        self.conn = here
        self.dead = False

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send one request (blocks only while the worker reads it: call when it is idle)."""
        self.conn.send_bytes(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self) -> Any:
        """The answer to the request sent; raises ``RuntimeError`` if it failed or the worker died."""
        try:
            ok, val = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as e:
            self.dead = True
            raise RuntimeError(f"verification worker {self.proc.name} is gone: {e!r}") from None
        if not ok:
            raise RuntimeError(val)
        return val

    def close(self) -> None:
        self.dead = True
        try:
            self.conn.close()
        except OSError:
            pass


def start_pool(workers: int, lanes: bool = True) -> int:
    """Start the worker processes once (idempotent); ``workers <= 0`` leaves the pool off.

    ``workers`` processes serve ``submit`` (repo CARs); with ``lanes`` another ``workers``
    processes serve the firehose's ``#commit`` batches (``TAP_LIVE_VERIFY``). Returns the
    number of workers of each kind."""
    global _WORKERS, _POOL
    if _WORKERS or workers <= 0:
        return _WORKERS
    ctx = multiprocessing.get_context("spawn")
    # spawned from this thread, before any database opens: the processes are this thread's
    # children (visible in /proc/<pid>/task/<pid>/children, for CPU accounting)
    if lanes:
        _LANES.extend(Lane(ctx, i) for i in range(workers))
    _POOL = _started_executor(workers)
    _WORKERS = workers
    atexit.register(stop_pool)
    log.info("verification pool started", extra={"workers": workers, "live_lanes": len(_LANES)})
    return workers


def pool_running() -> bool:
    """True when the firehose can send ``#commit`` batches to worker lanes."""
    return bool(_LANES)


def pool() -> ProcessPoolExecutor | None:
    """The executor for ``submit``-style work (repo CARs), or ``None`` when the pool is off."""
    return _POOL


def _started_executor(workers: int) -> ProcessPoolExecutor:
    """An executor of ``workers`` processes, spawned now by the calling thread (the executor
    would start them lazily, from whichever thread submits: they die with the thread that
    started them)."""
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker)
    for _ in range(workers):
        ex.submit(_warm)
    return ex


def _spawner() -> ThreadPoolExecutor:
    """The thread that starts replacement workers. Workers die with the *thread* that started
    them (PR_SET_PDEATHSIG follows the parent thread), so they must not come from an event loop's
    executor thread, which ends when its loop does: this one lives as long as the process."""
    global _SPAWNER
    with _RENEW:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapflow-spawner")
        return _SPAWNER


def renew_pool(broken: ProcessPoolExecutor) -> bool:
    """Replace ``broken`` (a worker of it died: the OOM killer, a crash) with a new executor of
    the same size, unless that was done already (or the pool was stopped); True if this call
    replaced it. ``pool()`` then gives the executor in use.

    A ``ProcessPoolExecutor`` whose worker died refuses every later task, so without this one
    death would fail every repo CAR until the flow restarts. Spawn starts the new workers
    (exec'd, so safe with RocksDB open)."""
    global _POOL
    spawner = _spawner()
    with _RENEW:
        if _POOL is not broken or _WORKERS <= 0:
            return False
        _POOL = spawner.submit(_started_executor, _WORKERS).result()
    log.error("a verification worker died; the pool was started anew", extra={"workers": _WORKERS})
    broken.shutdown(wait=False, cancel_futures=True)
    return True


def replace_lane(dead: Lane) -> Future:
    """A future of a new worker process in the place of ``dead`` (whose worker died), or of None
    when ``dead`` is no lane of the pool any more (the pool was stopped). Spawned (exec'd: safe
    with RocksDB open) by the spawner thread."""
    return _spawner().submit(_replace_lane, dead)


def _replace_lane(dead: Lane) -> Lane | None:
    with _RENEW:
        try:
            i = _LANES.index(dead)
        except ValueError:
            return None
        new = Lane(multiprocessing.get_context("spawn"), i)
        _LANES[i] = new
    dead.close()
    dead.proc.join(timeout=0.1)  # reap it
    log.warning("a verification lane died; a new one was started", extra={"lane": i})
    return new


def lanes() -> list[Lane]:
    """The worker lanes (empty when the pool is off or live verification stays inline)."""
    return list(_LANES)


def workers() -> int:
    """Processes of the executor (0 when off: work runs inline)."""
    return _WORKERS


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` in the executor of ``TAP_VERIFY_WORKERS`` processes, or inline (a
    completed future) when the pool is off."""
    if _POOL is not None:
        return _POOL.submit(fn, *args)
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # the caller sees it through the future, as from the pool
        fut.set_exception(e)
    return fut


def stop_pool() -> None:
    """Stop the workers (pending work is cancelled: the flow redoes it after a restart)."""
    global _POOL, _WORKERS
    p, _POOL, _WORKERS = _POOL, None, 0
    if p is not None:
        procs = list((getattr(p, "_processes", None) or {}).values())
        p.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # stateless: no need to let a long CAR finish
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=1)
    lanes_, _LANES[:] = list(_LANES), []
    for lane in lanes_:
        lane.close()  # EOF: the worker returns
    for lane in lanes_:
        lane.proc.join(timeout=1)
        if lane.proc.is_alive():
            lane.proc.kill()
