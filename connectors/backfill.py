"""BackfillSource: answers the fetch queue with verified repo snapshots and fresh identities.

RepoLogic asks for work by writing ``fetch_q`` rows (``priority | not_before | did`` ->
``{"kind": "repo"|"identity", ...}``) in the WriteBatch of the state change that needs it.
This source scans ``fetch_q`` in key order (identity refreshes, then Tap's claim order:
pending, desynchronized, error), skipping rows whose ``not_before`` is in the future, and
runs at most ``TAP_RESYNC_PARALLELISM`` repo fetches at once (identity refreshes have a
pool of their own, so a slow PDS never delays them). The queue is rescanned every 50 ms, and
within 5 ms when RepoLogic (same process) sets ``operators.repo.FETCH_WAKEUP`` or a fetch
slot frees up. A row stays "in flight" until a scan no
longer finds it (RepoLogic deletes it in the WriteBatch that applies the answer), so a row
is never fetched twice; one DID is never fetched twice at once.

- kind ``identity``: ``Directory.purge`` + ``resolve`` -> ``IdentityRefreshed``.
- kind ``repo``: purge + resolve the identity (handle, PDS, signing key); emit
  ``FetchStarted`` (Tap's claim: RepoLogic marks the repo ``resyncing``, stores the identity
  and buffers live commits from then on) and wait until the repo's row shows ``resyncing``
  under this fetch key (a few ms; at most ``CLAIM_TIMEOUT_S``; not at all when the repo is
  untracked or waiting for another fetch), so a commit that arrives after the download
  began is never ignored (it would cost a second download); then
  ``GET {pds}/xrpc/com.atproto.sync.getRepo?did=`` (``TAP_REPO_FETCH_TIMEOUT``, streamed,
  refused above ``TAP_MAX_CAR_SIZE``), verified with ``protocol.commit.verify_repo`` (every
  block hash, commit signature with the resolved key, commit DID equals the requested DID,
  the whole MST) -> ``SnapshotChunk`` items of ``chunk_size`` records in key order (the
  first carries the ``ResolvedIdentity``; ``after`` = the previous chunk's last path), or
  ``FetchFailed`` with Tap's error text (``failed to get repo: API request failed (HTTP 400):
  RepoDeactivated: ...``). HTTP 429 puts the PDS host in a 10 s backoff; fetches for a host
  in backoff fail fast with ``rate_limited=True``.
- Collection filters (``TAP_COLLECTION_FILTERS``) are applied here: records of other
  collections are left out of the chunks (RepoLogic's record index never holds them), which
  saves their JSON conversion.
- Back-pressure: no new fetch starts while the outbox holds ``>= TAP_OUTBOX_CAPACITY`` events.
  In ``TAP_OUTBOX_ONLY`` mode nothing is fetched.

Threads and processes: the network side (scan, identity, download) runs on an asyncio loop
in a daemon thread; verification AND the conversion of every record to its event body run
in the verification process pool (``runtime.procpool``, ``protocol.snapshot.pack_snapshot``;
a one-thread executor when the pool is off), which returns the records packed in chunks of
a few large ``bytes`` (cheap to unpickle). ``next_batch`` on the bytewax thread only hands
ready chunks out, up to ``POLL_MAX_CHUNKS`` per call; memory holds one packed repo (about
its CAR's size) per fetch slot. A CAR above ``SPOOL_CAR_BYTES`` never sits in memory: the
download streams it to a file under the data dir, the worker verifies it from a mapping of that
file and writes the packed records to a second file, which this side reads a chunk at a time
(``connectors.repospool``); both files go when the repo is answered, and at start-up.

Example::

    from bytewax.dataflow import Dataflow
    import bytewax.operators as op
    from config import load_config
    from connectors.backfill import BackfillSource

    flow = Dataflow("backfill")
    answers = op.input("backfill", flow, BackfillSource(load_config()))
    op.inspect("answer", answers)

``Backfiller`` is the same without bytewax (``start()``, ``poll()``, ``stop()``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import Counter, Gauge, Histogram
from rocksdict import ReadOptions

from runtime.shutdown import cap_awake, check_stop
from config import Config
from connectors import http
from connectors.control import DepthGauge
from connectors.http import LoopThread
from operators.items import (
    FetchFailed,
    FetchStarted,
    IdentityRefreshed,
    ResolvedIdentity,
    SnapshotChunk,
)
from operators.filters import CollectionFilter
from connectors.repospool import Spool, pack_snapshot_file, read_chunk
from protocol.snapshot import ChunkRef, PackedChunk, PackedSnapshot, SnapshotFailed, pack_snapshot
from protocol.snapshot import record_json as _record_json
from runtime import procpool
from store.db import Database, open_flow_db
from store.layout import PRIO_IDENTITY, parse_fetch_key

__all__ = ["BackfillSource", "Backfiller", "record_json", "PDS_BACKOFF_S", "CHUNK_SIZE"]

_log = logging.getLogger(__name__)

CHUNK_SIZE = 500
#: Per ``poll`` (one RepoLogic activation): at most this many chunks, holding at most about
#: this many records (~40 ms of RepoLogic), for at most this long.
POLL_MAX_CHUNKS = 64
POLL_MAX_RECORDS = 8000
POLL_BUDGET_S = 0.05
#: CARs up to this size (a few dozen records: ~1 ms of work) are verified on the fetch loop
#: itself: measured on 30-record repos, a pool task cost the flow process more (hand-off
#: threads, wake-up pipes) than doing the work, and the pool worker twice the work.
INLINE_CAR_BYTES = 16 << 10
#: CARs above this size (``TAP_BACKFILL_SPOOL_SIZE``) are streamed to a file under the data dir
#: and verified and packed from there, the records handed out chunk by chunk from a second file
#: (``connectors.repospool``): a huge repo's backfill then needs memory for its block index and a
#: chunk, not several times its CAR. Smaller ones (nearly all repos) stay in memory, where they
#: are cheapest.
SPOOL_CAR_BYTES = 32 << 20
PDS_BACKOFF_S = 10.0
#: An answered row that RepoLogic has not deleted after this long is fetched again (by kind).
#: RepoLogic applies an answer milliseconds after it is emitted; a row still there much later
#: is either a re-request with the same key and value or a lost answer.
DONE_TIMEOUT_S = {"repo": 30.0, "identity": 10.0}
#: How long a repo fetch waits for RepoLogic to apply its ``FetchStarted`` before calling
#: getRepo anyway (normally a few ms; a late claim only risks one more download).
CLAIM_TIMEOUT_S = 5.0
#: A scan that spends more CPU than this stepping over deleted ``fetch_q`` rows compacts the
#: queue (see ``Backfiller._scan``). A healthy scan costs well under a millisecond.
SCAN_COMPACT_CPU_S = 0.02
#: ... unless it visited this many live rows per millisecond of that CPU (a long live queue).
SCAN_LIVE_ROWS_PER_MS = 50

FETCHES = Counter("tapflow_backfill_fetches", "fetch-queue requests answered, by kind and outcome", ["kind", "outcome"])
FETCH_SECONDS = Histogram("tapflow_backfill_fetch_seconds", "repo fetch: resolve + download + verify",
                          buckets=[0.1 * 2 ** i for i in range(12)])
VERIFY_SECONDS = Histogram("tapflow_backfill_verify_seconds", "verify_repo time per repo",
                           buckets=[0.001 * 4 ** i for i in range(10)])
CAR_BYTES = Counter("tapflow_backfill_car_bytes", "bytes of getRepo CARs downloaded")
POOL_RENEWED = Counter("tapflow_verify_pool_renewed", "times the repo verification pool was started anew "
                       "after one of its workers died")
RECORDS = Counter("tapflow_backfill_records", "snapshot records emitted")
IN_FLIGHT = Gauge("tapflow_backfill_in_flight", "repo fetches in flight", multiprocess_mode="livemax")
QUEUE_COMPACTIONS = Counter("tapflow_backfill_queue_compactions",
                            "fetch_q compactions started because scans stepped over many deleted rows")


def _renew_pool(broken: Any) -> None:
    """Have ``procpool`` replace ``broken`` (a worker of it died), counted once per replacement."""
    if procpool.renew_pool(broken):
        POOL_RENEWED.inc()


def record_json(block: bytes | None) -> bytes | None:
    """Record block -> atproto JSON bytes, or None (block missing or not atproto data)."""
    return _record_json(block)


def _collection_filter(cfg: Config) -> CollectionFilter | None:
    """The filter, or None when it keeps everything (it travels to the pool: it must pickle)."""
    if not cfg.collection_filters:
        return None
    f = CollectionFilter(cfg.collection_filters)
    return None if f.matches_all else f


def _resolved(ident: Any) -> ResolvedIdentity:
    key = getattr(ident, "signing_key", None)
    if key is None:
        mb = ""
    elif isinstance(key, str):
        mb = key
    else:
        mb = key.multibase()
    return ResolvedIdentity(handle=ident.handle, pds=ident.pds_endpoint or "", signing_key=mb)


def _host_of(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}".lower()


@dataclass
class _Job:
    """A verified, packed repo snapshot being handed out chunk by chunk (bytewax thread)."""

    key: bytes
    did: str
    identity: ResolvedIdentity
    rev: str
    data_cid: str
    chunks: deque[PackedChunk | ChunkRef] = field(repr=False)
    after: str = ""
    first: bool = True
    emitted: int = 0
    spool: str | None = None  # the file the ``ChunkRef`` chunks are in (deleted when done)
    fd: int | None = None

    def take(self) -> PackedChunk | None:
        """The next chunk (read from the spool file when it is there), or None."""
        if not self.chunks:
            return None
        c = self.chunks.popleft()
        if isinstance(c, ChunkRef):
            if self.fd is None:
                self.fd = os.open(self.spool, os.O_RDONLY)
            c = read_chunk(self.fd, c)
        return c

    def release(self) -> None:
        """Close and delete the spool file (idempotent)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.spool is not None:
            Spool.remove(self.spool)
            self.spool = None


class Backfiller:
    """Fetch-queue worker without bytewax: ``start()``, ``poll()`` from one thread, ``stop()``."""

    def __init__(self, cfg: Config, db: Database | None = None, *, directory: Any = None,
                 depth: Callable[[], int] | None = None, chunk_size: int = CHUNK_SIZE,
                 scan_interval: float = 0.05, identity_parallelism: int | None = None,
                 done_timeout: dict[str, float] | None = None, claim_timeout: float = CLAIM_TIMEOUT_S,
                 spool_over: int | None = None) -> None:
        self.cfg = cfg
        self.db = db if db is not None else open_flow_db(cfg.data_dir)
        self._directory = directory
        self._own_directory = directory is None
        self._depth = depth if depth is not None else DepthGauge(self.db).value
        self.chunk_size = chunk_size
        self.scan_interval = scan_interval
        self.repo_slots = cfg.resync_parallelism
        self.identity_slots = identity_parallelism or max(4, cfg.resync_parallelism)
        self.done_timeout = dict(DONE_TIMEOUT_S, **(done_timeout or {}))
        self.claim_timeout = claim_timeout
        self.spool_over = cfg.backfill_spool_size if spool_over is None else spool_over
        self._spool = Spool(cfg.data_dir)
        self._keep = _collection_filter(cfg)
        self._keep_wire = _collection_filter(cfg)  # for pool tasks: never called here, so its memo stays empty
        self._thread = LoopThread("backfill")
        self._verify_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-verify")
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetchq-compact")
        self._compacting: Future | None = None
        self._lock = threading.Lock()
        # fetch key -> [did, kind, value bytes, answered_at or None]; answered rows stay until deleted
        self._inflight: dict[bytes, list] = {}
        self._dids: set[str] = set()  # DIDs with a fetch running (not yet answered)
        self._repo_active = 0  # repo jobs holding a slot (fetching, verifying, or being chunked)
        self._ident_active = 0
        self._out: deque = deque()  # finished small items (FetchFailed, IdentityRefreshed)
        self._ready: deque[_Job] = deque()  # verified repos waiting to be chunked
        self._job: _Job | None = None
        self._kick = False
        self._backoff: dict[str, float] = {}  # PDS host -> monotonic time the backoff ends
        self.stats: dict[str, int] = {"scans": 0, "started": 0, "repos_ok": 0, "failed": 0,
                                      "rate_limited": 0, "identities": 0, "refetched": 0, "held": 0,
                                      "claim_timeouts": 0, "compactions": 0, "spooled": 0}
        self.verify_seconds: list[float] = []

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.cfg.outbox_only:
            return
        self._spool.clear()  # what a previous run left: its requests are still queued
        self._thread.start(self._run)

    def stop(self) -> None:
        self._thread.stop()
        self._verify_pool.shutdown(wait=False, cancel_futures=True)
        self._compactor.shutdown(wait=True)  # a compaction must not outlive the database handle
        for job in [self._job, *self._ready]:
            if job is not None:
                job.release()

    @property
    def directory(self) -> Any:
        if self._directory is None:
            from protocol.identity import Directory

            self._directory = Directory.from_config(self.cfg)
        return self._directory

    # --- bytewax side -----------------------------------------------------------------

    def has_output(self) -> bool:
        return bool(self._out) or self._job is not None or bool(self._ready)

    def poll(self, budget: float = POLL_BUDGET_S, max_chunks: int = POLL_MAX_CHUNKS,
             max_records: int = POLL_MAX_RECORDS) -> list:
        """Items ready now: answers, then snapshot chunks (at most ``max_chunks`` holding at
        most about ``max_records`` records, for at most ``budget`` seconds).

        A chunk is ready-made (the pool packed it), so handing one out costs next to nothing
        here; each call becomes one RepoLogic activation and one WriteBatch, so many small
        repos' chunks travel together. ``max_records`` bounds the activation: RepoLogic
        spends ~5 us per record, and live commits wait while it runs.
        """
        out: list = []
        q = self._out
        while q:
            try:
                out.append(q.popleft())
            except IndexError:
                break
        if self._job is None and self._ready:
            self._job = self._ready.popleft()
        if self._job is None:
            return out
        deadline = time.perf_counter() + budget
        n = records = 0
        while self._job is not None and n < max_chunks and records < max_records:
            item = self._next_chunk(self._job)
            out.append(item)
            n += 1
            failed = isinstance(item, FetchFailed)  # its spool file could not be read
            if not failed:
                records += item.count
            if failed or item.last:
                self._finish(self._job.key, repo=True)
                self._job = self._ready.popleft() if self._ready else None
            if time.perf_counter() >= deadline:
                break
        return out

    def _next_chunk(self, job: _Job) -> SnapshotChunk | FetchFailed:
        try:
            c = job.take()
        except OSError as e:  # the spool file went away under us: answer, the repo is fetched again
            job.release()
            job.chunks.clear()
            _log.error("backfill spool file unreadable", extra={"did": job.did, "error": str(e)})
            self.stats["failed"] += 1
            FETCHES.labels("repo", "failed").inc()
            return FetchFailed(did=job.did, fetch_key=job.key, error=f"failed to read repo from CAR: spool: {e}")
        last = not job.chunks
        if last:
            job.release()
        if c is None:  # an empty repo (or everything filtered out): one empty, first and last chunk
            chunk = SnapshotChunk(did=job.did, fetch_key=job.key, rev=job.rev, data_cid=job.data_cid,
                                  identity=job.identity if job.first else None, count=0, keys=b"",
                                  cids=b"", bodies=b"", after=job.after, first=job.first, last=True)
        else:
            chunk = SnapshotChunk(did=job.did, fetch_key=job.key, rev=job.rev, data_cid=job.data_cid,
                                  identity=job.identity if job.first else None, count=c.count, keys=c.keys,
                                  cids=c.cids, bodies=c.bodies, after=job.after, first=job.first, last=last,
                                  last_path=c.last_path)
            job.after = c.last_path
            job.emitted += c.count
            RECORDS.inc(c.count)
        job.first = False
        if last:
            FETCHES.labels("repo", "ok").inc()
            self.stats["repos_ok"] += 1
            _log.info("repo snapshot emitted", extra={"did": job.did, "rev": job.rev, "records": job.emitted})
        return chunk

    def _finish(self, key: bytes, repo: bool) -> None:
        """An answer for ``key`` was handed out: free the slot, keep the key until RepoLogic deletes it."""
        with self._lock:
            entry = self._inflight.get(key)
            if entry is not None and entry[3] is None:
                entry[3] = time.monotonic()
                self._dids.discard(entry[0])  # the DID may be fetched again (a new row) from now on
                self._kick = True  # a slot is free: scan at the next tick
                if repo:
                    self._repo_active -= 1
                    IN_FLIGHT.set(self._repo_active)
                else:
                    self._ident_active -= 1

    # --- loop side --------------------------------------------------------------------

    async def _run(self) -> None:
        wake = _fetch_wakeup()
        tick = min(0.005, self.scan_interval) if wake is not None else self.scan_interval
        last = 0.0
        try:
            while True:
                now = time.monotonic()
                if self._kick or (wake is not None and wake.is_set()) or now - last >= self.scan_interval:
                    if wake is not None:
                        wake.clear()  # a set() after this is seen by the scan below or the next tick
                    self._kick = False
                    last = now
                    try:
                        self._reap()
                        self._scan()
                    except Exception:
                        _log.exception("fetch queue scan failed")
                await asyncio.sleep(tick)
        finally:
            if self._own_directory and self._directory is not None:
                try:
                    await self._directory.close()
                except Exception:
                    pass

    def _reap(self) -> None:
        """Forget answered keys that RepoLogic has deleted (or that it ignored for too long)."""
        with self._lock:
            done = [(k, e) for k, e in self._inflight.items() if e[3] is not None]
        if not done:
            return
        values = self.db.cf("fetch_q").get([k for k, _ in done])
        now = time.monotonic()
        with self._lock:
            for (k, e), v in zip(done, values):
                stale = now - e[3] > self.done_timeout.get(e[1], 30.0)
                if v is None or v != e[2] or stale:
                    if stale and v == e[2]:
                        self.stats["refetched"] += 1
                        _log.warning("answered fetch request still queued; fetching again",
                                     extra={"did": e[0], "kind": e[1]})
                    del self._inflight[k]

    def _scan(self) -> None:
        self.stats["scans"] += 1
        with self._lock:
            repo_free = self.repo_slots - self._repo_active
            ident_free = self.identity_slots - self._ident_active
        if repo_free <= 0 and ident_free <= 0:
            return
        if self._depth() >= self.cfg.outbox_capacity:
            self.stats["held"] += 1
            return
        now = int(time.time())
        cpu0 = time.thread_time()
        visited = self._scan_rows(now, repo_free, ident_free)
        self._compact_if_slow(time.thread_time() - cpu0, visited)

    def _scan_rows(self, now: int, repo_free: int, ident_free: int) -> int:
        """Launch what the free slots allow, in key order; returns the number of rows visited."""
        visited = 0
        if repo_free > 0:
            it = self.db.cf("fetch_q").iter()
        else:  # only identity rows can start: never step into the repo rows (and their tombstones)
            bound = ReadOptions()
            bound.set_iterate_upper_bound(bytes((PRIO_IDENTITY + 1,)))
            it = self.db.cf("fetch_q").iter(bound)
        it.seek_to_first()
        while it.valid():
            visited += 1
            key = it.key()
            try:
                prio, not_before, did = parse_fetch_key(key)
            except Exception:
                _log.error("unreadable fetch_q key skipped", extra={"key": key[:64].hex()})
                it.next()
                continue
            if not_before > now:
                # keys sort by (priority, not_before): the rest of this priority waits too
                if prio >= 255:
                    break
                it.seek(bytes((prio + 1,)))
                continue
            if key in self._inflight or did in self._dids:
                it.next()
                continue
            value = it.value()
            try:
                kind = orjson.loads(value).get("kind", "repo")
            except Exception:
                kind = "repo"
            if kind == "identity":
                if ident_free > 0:
                    ident_free -= 1
                    self._launch(key, did, kind, value)
            elif repo_free > 0:
                repo_free -= 1
                self._launch(key, did, "repo", value)
            elif ident_free <= 0 or prio > 0:
                break  # repo pool full and no identity rows can follow
            it.next()
        return visited

    def _compact_if_slow(self, cpu_s: float, visited: int) -> None:
        """Compact ``fetch_q`` in the background when a scan paid for its deleted rows.

        ``fetch_q`` is a queue in an LSM tree: every answered or removed request leaves a
        tombstone at the front of the key space until compaction drops it, and each scan steps
        over all of them again (1M removed repos: ~1.4 s of CPU per scan, many scans a second).
        The scan's own CPU time (not wall time: a busy machine or the GIL must not trigger it)
        tells; RocksDB's ``CompactRange`` runs outside the GIL, one at a time.
        """
        if cpu_s < SCAN_COMPACT_CPU_S or visited > cpu_s * 1000 * SCAN_LIVE_ROWS_PER_MS:
            return
        if self._compacting is not None and not self._compacting.done():
            return
        self.stats["compactions"] += 1
        QUEUE_COMPACTIONS.inc()
        _log.info("compacting the fetch queue", extra={"scan_cpu_ms": round(cpu_s * 1000, 1), "rows_visited": visited})
        try:
            self._compacting = self._compactor.submit(self._compact_queue)
        except RuntimeError:  # stopping
            self._compacting = None

    def _compact_queue(self) -> None:
        try:
            self.db.cf("fetch_q").compact_range(None, None)
        except Exception:
            _log.exception("fetch queue compaction failed")

    def _launch(self, key: bytes, did: str, kind: str, value: bytes) -> None:
        with self._lock:
            self._inflight[key] = [did, kind, value, None]
            self._dids.add(did)
            if kind == "identity":
                self._ident_active += 1
            else:
                self._repo_active += 1
                IN_FLIGHT.set(self._repo_active)
        self.stats["started"] += 1
        coro = self._identity(key, did) if kind == "identity" else self._repo(key, did)
        asyncio.get_running_loop().create_task(coro)

    async def _identity(self, key: bytes, did: str) -> None:
        item: IdentityRefreshed
        try:
            d = self.directory
            d.purge(did)
            ident = await d.resolve(did)
            item = IdentityRefreshed(did=did, fetch_key=key, identity=_resolved(ident))
            FETCHES.labels("identity", "ok").inc()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            not_found = type(e).__name__ == "DidNotFound"
            item = IdentityRefreshed(did=did, fetch_key=key, identity=None, error=f"failed to resolve DID: {e}",
                                     not_found=not_found)
            FETCHES.labels("identity", "not_found" if not_found else "failed").inc()
        self.stats["identities"] += 1
        self._out.append(item)
        self._finish(key, repo=False)

    def _fail(self, key: bytes, did: str, error: str, rate_limited: bool = False) -> None:
        self.stats["rate_limited" if rate_limited else "failed"] += 1
        FETCHES.labels("repo", "rate_limited" if rate_limited else "failed").inc()
        _log.info("repo fetch failed", extra={"did": did, "error": error, "rate_limited": rate_limited})
        self._out.append(FetchFailed(did=did, fetch_key=key, error=error, rate_limited=rate_limited))
        self._finish(key, repo=True)

    async def _repo(self, key: bytes, did: str) -> None:
        t0 = time.perf_counter()
        try:
            job = await self._fetch_repo(key, did)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug guard: the request must still be answered
            _log.exception("repo fetch crashed", extra={"did": did})
            self._fail(key, did, f"failed to get repo: {type(e).__name__}: {e}")
            return
        if job is not None:
            FETCH_SECONDS.observe(time.perf_counter() - t0)
            self._ready.append(job)

    async def _fetch_repo(self, key: bytes, did: str) -> _Job | None:
        d = self.directory
        d.purge(did)
        try:
            ident = await d.resolve(did)
        except Exception as e:
            self._fail(key, did, f"failed to resolve DID: {e}")
            return None
        pds = (ident.pds_endpoint or "").rstrip("/")
        if not pds:
            self._fail(key, did, f"no PDS endpoint for DID: {did}")
            return None
        pubkey = ident.signing_key
        if pubkey is None:
            self._fail(key, did, f"failed to get public key: {getattr(ident, 'key_error', '') or 'no #atproto key'}")
            return None
        host = _host_of(pds)
        until = self._backoff.get(host)
        if until is not None:
            if time.monotonic() < until:
                self._fail(key, did, f"PDS {host} is rate limiting (backing off)", rate_limited=True)
                return None
            del self._backoff[host]
        resolved = _resolved(ident)
        self._out.append(FetchStarted(did=did, fetch_key=key, identity=resolved))
        await self._await_claim(key, did)
        _log.info("fetching repo from PDS", extra={"did": did, "pds": pds})
        car_path, rec_path = self._spool.paths()
        try:
            car = await http.get_body(pds + "/xrpc/com.atproto.sync.getRepo", {"did": did},
                                      timeout=self.cfg.repo_fetch_timeout, max_bytes=self.cfg.max_car_size,
                                      public_only=self.cfg.public_only, spool_path=car_path,
                                      spool_over=self.spool_over)
        except http.XrpcError as e:
            if e.rate_limited:
                self._backoff[host] = time.monotonic() + PDS_BACKOFF_S
                self._fail(key, did, f"failed to get repo: {e}", rate_limited=True)
            else:
                self._fail(key, did, f"failed to get repo: {e}")
            return None
        except http.HttpError as e:
            self._fail(key, did, f"failed to get repo: {e}")
            return None
        spooled = isinstance(car, http.SpooledBody)
        if spooled:
            self.stats["spooled"] += 1
            _log.info("repo CAR spooled to disk", extra={"did": did, "bytes": car.size})
        CAR_BYTES.inc(car.size if spooled else len(car))
        snap: PackedSnapshot | None = None
        try:
            snap = await self._verify(car, resolved.signing_key, did, rec_path)
        except SnapshotFailed as e:
            what = {"signature": "failed to verify signature", "key": "failed to get public key"}
            self._fail(key, did, f"{what.get(e.kind, 'failed to read repo from CAR')}: {e}")
            return None
        except Exception as e:  # the pool itself failed (a worker died): answer, retry later
            _log.exception("repo verification failed to run", extra={"did": did})
            self._fail(key, did, f"failed to read repo from CAR: {type(e).__name__}: {e}")
            return None
        finally:
            if spooled:
                Spool.remove(car.path)
                if snap is None:  # failed or cancelled: no records to hand out
                    Spool.remove(rec_path)
        del car
        secs = snap.verify_seconds
        VERIFY_SECONDS.observe(secs)
        self.verify_seconds.append(secs)
        if len(self.verify_seconds) > 1000:
            del self.verify_seconds[:500]
        if snap.missing_nodes:
            _log.warning("repo CAR lacks MST subtrees; their records are skipped",
                         extra={"did": did, "missing_nodes": snap.missing_nodes})
        return _Job(key=key, did=did, identity=resolved, rev=snap.rev, data_cid=snap.data_cid,
                    chunks=deque(snap.chunks), spool=snap.spool)

    async def _verify(self, car: bytes | http.SpooledBody, signing_key: str, did: str,
                      rec_path: str) -> PackedSnapshot:
        """``pack_snapshot`` in the verification pool (a thread when there is none, or it broke;
        inline for a small CAR); ``pack_snapshot_file`` for a spooled one (its records go to
        ``rec_path``: the worker sends back where they are, not the records)."""
        # allow_partial: with resync deletes on, a hole in the MST would read as deletions
        opts = dict(allow_partial=not self.cfg.resync_deletes, max_car_size=self.cfg.max_car_size,
                    chunk_size=self.chunk_size)
        if isinstance(car, http.SpooledBody):
            task = partial(pack_snapshot_file, car.path, rec_path, signing_key, did, keep=self._keep_wire, **opts)
        elif len(car) <= INLINE_CAR_BYTES:  # cheaper here than the pool's per-task cost (hand-offs, wake-ups)
            return pack_snapshot(car, signing_key, did, keep=self._keep, **opts)
        else:
            task = partial(pack_snapshot, car, signing_key, did, keep=self._keep_wire, **opts)
        p = procpool.pool()
        fut = None
        if p is not None:
            try:
                try:
                    fut = p.submit(task)
                except BrokenProcessPool:  # a worker died during an earlier task: a new pool takes this one
                    _renew_pool(p)
                    p = procpool.pool()
                    fut = None if p is None else p.submit(task)
            except RuntimeError as e:  # the pool shut down (the flow is stopping): a thread does it
                if "shutdown" not in str(e):
                    raise
                _log.error("verification pool unusable; verifying on a thread", extra={"error": str(e)})
        if fut is not None:
            try:
                return await asyncio.wrap_future(fut)
            except BrokenProcessPool:
                # a worker died while this CAR was in the pool, maybe because of it (the OOM
                # killer): the fetch fails and is retried later, on a new pool
                _renew_pool(p)
                raise
        return await asyncio.get_running_loop().run_in_executor(self._verify_pool, task)

    async def _await_claim(self, key: bytes, did: str) -> None:
        """Wait until RepoLogic has applied our ``FetchStarted`` (the repo shows ``resyncing``
        with this fetch key), so every commit it handles from then on is buffered, and every
        commit it ignored before reached us before getRepo was sent (it is in the snapshot).

        Returns at once when the repo is not tracked (removed; or no RepoLogic, as in tests)
        or is waiting for another fetch (this answer will be dropped as stale), and after
        ``claim_timeout`` in any case: a late claim costs at most one more download.
        """
        repos = self.db.cf("repos")
        hexkey = key.hex()
        deadline = time.monotonic() + self.claim_timeout
        delay = 0.001
        while True:
            raw = repos.get(did.encode())
            if raw is None:
                return
            try:
                row = orjson.loads(raw)
                state, fk = row.get("state"), row.get("fetch_key")
            except Exception:
                return
            if fk != hexkey or state == "resyncing":
                return
            if time.monotonic() >= deadline:
                self.stats["claim_timeouts"] += 1
                _log.warning("RepoLogic has not applied FetchStarted; fetching anyway",
                             extra={"did": did, "waited_s": self.claim_timeout})
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)


def _fetch_wakeup() -> threading.Event | None:
    """RepoLogic's in-process "a fetch was queued" event, when RepoLogic runs in this process."""
    try:
        from operators.repo import FETCH_WAKEUP
    except Exception:
        return None
    return FETCH_WAKEUP


# --- bytewax ----------------------------------------------------------------------------------

class _BackfillPartition(StatefulSourcePartition):
    def __init__(self, b: Backfiller, idle: float) -> None:
        self._b = b
        self._idle = timedelta(seconds=idle)
        b.start()

    def next_batch(self) -> Iterable:
        check_stop()
        if self._b.cfg.outbox_only:
            return []
        return self._b.poll()

    def next_awake(self) -> datetime | None:
        if self._b.has_output():
            return None
        return cap_awake(datetime.now(timezone.utc) + (timedelta(days=1) if self._b.cfg.outbox_only else self._idle))

    def snapshot(self) -> None:
        return None  # requests live in fetch_q

    def close(self) -> None:
        self._b.stop()


class BackfillSource(FixedPartitionedSource):
    """One partition answering ``fetch_q`` (see module doc)."""

    def __init__(self, cfg: Config, db: Database | None = None, *, directory: Any = None,
                 idle: float = 0.01, chunk_size: int = CHUNK_SIZE) -> None:
        self.cfg = cfg
        self._db = db
        self._directory = directory
        self._idle = idle
        self._chunk = chunk_size

    def list_parts(self) -> list[str]:
        return ["backfill"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _BackfillPartition:
        b = Backfiller(self.cfg, self._db, directory=self._directory, chunk_size=self._chunk)
        return _BackfillPartition(b, self._idle)
