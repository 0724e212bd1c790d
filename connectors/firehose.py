"""FirehoseSource: the relay's ``com.atproto.sync.subscribeRepos`` as flow items.

A daemon thread runs an asyncio loop that holds the WebSocket (aiohttp), decodes
each binary frame (DAG-CBOR header ``{op, t}`` + body, ``protocol.cbor.decode_multi``)
and appends ``(seq, item)`` to a deque; bytewax drains the deque in ``next_batch`` and
never waits. Items: ``FirehoseCommit``, ``FirehoseSync``, ``FirehoseIdentity``,
``FirehoseAccount`` (``operators.items``).

Behaviour (spec/tap-behavior.md §8.1-8.3, plus tapflow's fixes):

- Cursor: ``meta[cursor/firehose/<relay url>]`` = the seq up to which every emitted item
  has been *applied* by RepoLogic (``fhapplied/<shard>``, written in the item's WriteBatch;
  frames without an item just move it on), saved every ``TAP_CURSOR_SAVE_INTERVAL`` and on
  close, so a crash never skips an event; ``?cursor=`` only when > 0;
  ``TAP_NO_REPLAY`` always connects at the live head. A reconnect within the process
  resumes after the last frame received (frames already queued will still be emitted).
- Reconnect at once after a dropped connection; dial failures (and connections that die
  before their first frame) back off ``min(2^n, 10) s + U[0,1) s`` with a capped exponent.
- ``#info`` (``OutdatedCursor``) is logged; ``#labels`` and unknown types are counted and
  skipped. Error frames (op -1) are logged and counted, then the connection is dropped
  and redialled; after ``FutureCursor`` (the relay's sequence is behind our cursor) the
  redial starts at the live head instead of looping forever as Tap does (the gap heals
  through the continuity check, invariant 4).
- Malformed frames (bad CBOR, wrong types, text frames, frames over
  ``TAP_MAX_FRAME_SIZE``) are counted as rejections and skipped; the stream continues.
  A frame over the size limit makes the WebSocket client (aiohttp, which refuses it from
  its header, before reading it) drop the connection; the redial then reads with
  ``SKIP_READ_FACTOR`` times the limit and rejects every frame over the limit (their seqs
  still advance the cursor), so one huge frame cannot wedge the stream. A frame larger
  still is never read: the redial after it starts at the live head, as after
  ``FutureCursor`` (counted and logged; the gap heals, invariant 4). Memory per frame stays
  bounded by ``SKIP_READ_FACTOR * TAP_MAX_FRAME_SIZE``.
- Back-pressure: no socket reads (and no dial) while the outbox holds
  ``>= TAP_OUTBOX_CAPACITY`` events (re-checked every 100 ms) or while the local queue
  is full. Tap does not hold its firehose (§15.15); tapflow does.
- ``meta[stats/firehose_seq]`` = last seq received, for ``/stats/cursors``.
- Pre-verification (when ``runtime.procpool`` runs): each ``#commit`` frame of a DID whose
  signing key RepoLogic has published (``operators.verify.SIGNING_KEYS``; a miss reads the
  stored repo state) goes to the pool with that key, in batches (at most one per worker plus
  one queued; frames arriving meanwhile join the next; at most ``max_inflight`` frames out).
  The item carries the verdict (``FirehoseCommit.pre``); ``drain`` hands items out in firehose
  order and stops at a commit still in the pool, so the cursor never passes it. RepoLogic uses
  a verdict only if its key is still the repo's, else verifies inline. A lane whose worker died
  is replaced by a new process (at once, then after a growing pause if lanes keep dying); its
  frames meanwhile get no verdict (RepoLogic verifies them). While the pool is behind
  by ``drain_min`` (512) frames or more, ``drain`` waits up to ``drain_hold`` (200 ms) for that
  many verdicts: RepoLogic pays ~100 us per shard activation, so verdicts applied as each lane
  answer comes (a few commits per shard) cost the flow twice the CPU per commit.

Example::

    from bytewax.dataflow import Dataflow
    import bytewax.operators as op
    from config import load_config
    from connectors.firehose import FirehoseSource

    flow = Dataflow("firehose")
    frames = op.input("firehose", flow, FirehoseSource(load_config()))
    op.inspect("frame", frames)

``FirehoseClient`` is the same without bytewax (``start()``, ``drain()``, ``stop()``);
``decode_frame`` is the pure frame decoder.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

import aiohttp
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import Counter, Gauge

from runtime.shutdown import cap_awake, check_stop
from config import USER_AGENT, Config
from connectors.control import DepthGauge
from connectors.http import LoopThread
from operators.filters import CollectionFilter
from operators.items import FIREHOSE_ITEMS, FirehoseAccount, FirehoseCommit, FirehoseIdentity, FirehoseSync, Item, Rejected
from operators.verify import SIGNING_KEYS, KeyCache, PreVerified, verify_commit_frames
from runtime import procpool
from protocol.cbor import CBORError, decode_multi
from store.db import Database, open_flow_db
from store.layout import decode_counter, meta_cursor_firehose, meta_firehose_applied, pack_u64, shard_of, unpack_u64

__all__ = ["FirehoseSource", "FirehoseClient", "Frame", "decode_frame", "META_STATS_SEQ", "dial_backoff"]

_log = logging.getLogger(__name__)

#: Last seq received from the relay (for ``/stats/cursors``), u64 big-endian.
META_STATS_SEQ = b"stats/firehose_seq"

FRAMES = Counter("tapflow_firehose_frames", "firehose frames received, by type", ["type"])
REJECTED = Counter("tapflow_firehose_frames_rejected", "firehose frames rejected as malformed, by reason", ["reason"])
ERROR_FRAMES = Counter("tapflow_firehose_error_frames", "firehose error frames (op -1), by error name", ["error"])
EVENTS_RECEIVED = Counter("tap_firehose_events_received", "firehose #commit/#sync/#identity/#account events received")
CONNECTS = Counter("tapflow_firehose_connects", "firehose dial attempts, by outcome", ["outcome"])
METRICS_FLUSH = 0.1  # seconds between Prometheus updates of the frame counts (see _handle)
LAST_SEQ = Gauge("tap_firehose_last_seq", "seq of the last firehose event received", multiprocess_mode="livemax")
HELD = Gauge("tapflow_firehose_held", "1 while reading the firehose is held back by outbox depth", multiprocess_mode="livemax")
PREVERIFY = Counter("tapflow_firehose_preverify", "#commit frames sent to the verification pool, by outcome",
                    ["outcome"])
LANES_RESPAWNED = Counter("tapflow_verify_lanes_respawned", "live verification workers started anew after one died")
LANE_DEATH_WINDOW = 600.0  # s: lane deaths counted for the pause before the next replacement
LANE_RESPAWN_DELAYS = (0.0, 1.0, 5.0, 30.0, 120.0)  # s, by the deaths in that window
_VERDICT = PREVERIFY.labels("verdict")  # labels() per frame is not free
_NO_VERDICT = PREVERIFY.labels("none")

_MAX_DID = 2048
#: The redial that skips an oversized frame reads it with this many times TAP_MAX_FRAME_SIZE
#: (to learn its seq and reject it), never unbounded: a relay cannot make us buffer more.
SKIP_READ_FACTOR = 16
PING_INTERVAL = 30.0  # s between pings; the relay must answer within half of it
CLOSE_TIMEOUT = 2.0

_BINARY = aiohttp.WSMsgType.BINARY
_TEXT = aiohttp.WSMsgType.TEXT
_ERROR = aiohttp.WSMsgType.ERROR
_CLOSING = frozenset((aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED))


class _Oversized(Exception):
    """A frame over the connection's size limit (aiohttp refused it before reading it)."""


# --- frames ----------------------------------------------------------------------------

@dataclass(slots=True)
class Frame:
    """One decoded frame. ``kind``: ``event`` (``item`` set), ``info``, ``error``, ``skip``, ``rejected``."""

    kind: str
    type: str
    seq: int | None = None
    item: Any = None
    name: str = ""  # error/info name, or rejection reason
    message: str = ""
    did: str = ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _did(v: Any) -> str | None:
    if isinstance(v, str) and v.startswith("did:") and len(v) <= _MAX_DID:
        return v
    return None


def _reject(t: str, reason: str, seq: Any = None, did: Any = "", message: str = "") -> Frame:
    return Frame("rejected", t, seq if _is_int(seq) and seq >= 0 else None, None, reason, message,
                 did if isinstance(did, str) else "")


def decode_frame(data: bytes) -> Frame:
    """Decode one binary firehose frame; never raises (bad input is a ``rejected`` Frame)."""
    try:
        return _decode_frame(data)
    except Exception as e:  # a bug guard: one odd frame must not wedge the stream
        return _reject("", "decode_error", message=f"{type(e).__name__}: {e}")


def _decode_frame(data: bytes) -> Frame:
    try:
        parts = decode_multi(data)
    except CBORError as e:
        return _reject("", "bad_cbor", message=str(e))
    if len(parts) != 2 or type(parts[0]) is not dict or type(parts[1]) is not dict:
        return _reject("", "bad_frame_shape", message=f"{len(parts)} objects")
    header, body = parts
    op = header.get("op")
    if op != 1:
        if op == -1:
            name = body.get("error")
            msg = body.get("message")
            return Frame("error", "error", None, None, name if isinstance(name, str) else "",
                         msg if isinstance(msg, str) else "")
        return _reject("", "bad_op", message=repr(op)[:50])
    t = header.get("t")
    seq = body.get("seq")
    # hot path first: one type() test per field (bool is not int for type())
    if t == "#commit":
        if type(seq) is not int or seq < 0:
            return _reject(t, "bad_seq", did=body.get("repo") or "")
        did = body.get("repo")
        if type(did) is not str or not did.startswith("did:") or len(did) > _MAX_DID:
            return _reject(t, "bad_did", seq, did)
        if type(body.get("rev")) is not str:
            return _reject(t, "bad_rev", seq, did)
        if type(body.get("blocks")) is not bytes:
            return _reject(t, "bad_blocks", seq, did)
        ops = body.get("ops")
        if type(ops) is not list:
            return _reject(t, "bad_ops", seq, did)
        for o in ops:
            if type(o) is not dict:
                return _reject(t, "bad_ops", seq, did)
        return Frame("event", t, seq, FirehoseCommit(seq, did, body), "", "", did)
    if t not in _OTHER_EVENTS:
        if t == "#info":
            name = body.get("name")
            msg = body.get("message")
            return Frame("info", t, None, None, name if isinstance(name, str) else "",
                         msg if isinstance(msg, str) else "")
        if not isinstance(t, str):
            return _reject("", "bad_type", message=repr(t)[:50])
        return Frame("skip", t, seq if type(seq) is int and seq >= 0 else None)
    if type(seq) is not int or seq < 0:
        return _reject(t, "bad_seq", did=body.get("did") or "")
    did = _did(body.get("did"))
    if did is None:
        return _reject(t, "bad_did", seq, body.get("did"))
    if t == "#sync":
        if not isinstance(body.get("rev"), str):
            return _reject(t, "bad_rev", seq, did)
        if not isinstance(body.get("blocks"), bytes):
            return _reject(t, "bad_blocks", seq, did)
        return Frame("event", t, seq, FirehoseSync(seq=seq, did=did, body=body), did=did)
    if t == "#identity":
        handle = body.get("handle")
        if handle is not None and not isinstance(handle, str):
            return _reject(t, "bad_handle", seq, did)
        return Frame("event", t, seq, FirehoseIdentity(seq=seq, did=did, handle=handle), did=did)
    # #account
    active = body.get("active")
    status = body.get("status")
    if not isinstance(active, bool):
        return _reject(t, "bad_active", seq, did)
    if status is not None and not isinstance(status, str):
        return _reject(t, "bad_status", seq, did)
    return Frame("event", t, seq, FirehoseAccount(seq=seq, did=did, active=active, status=status), did=did)


_OTHER_EVENTS = frozenset(("#sync", "#identity", "#account"))
_KNOWN_TYPES = frozenset(("#commit", "#sync", "#identity", "#account", "#info", "#labels", "error", ""))


def dial_backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed dials: min(2^n, 10) + U[0, 1)."""
    return min(2 ** min(failures, 8), 10) + random.random()


# --- pre-verification ------------------------------------------------------------------------

class _Answer:
    """A lane's answer to one request: set on the loop thread, read on the bytewax thread.

    ``concurrent.futures.Future`` takes a lock in every ``done()`` and ``result()``, twice per
    frame; here the result (or error) is stored before ``ready``, and an attribute store is
    atomic under the GIL, so a reader that sees ``ready`` sees the answer."""

    __slots__ = ("ready", "results", "error", "n", "sent", "eta")

    def __init__(self) -> None:
        self.n = 0  # frames asked
        self.sent = 0.0  # time.monotonic() of the request
        self.eta = 0.0  # when the answer is expected (time.monotonic())
        self.ready = False
        self.results: list | None = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.ready

    def result(self) -> list:
        if self.error is not None:
            raise self.error
        return self.results  # type: ignore[return-value]

    def set_result(self, results: list) -> None:
        self.results = results
        self.ready = True

    def set_exception(self, e: BaseException) -> None:
        self.error = e
        self.ready = True


class _Slot:
    """A ``#commit`` waiting for the pool: ``fut`` (set once submitted: an ``_Answer``, or any
    object with ``done()`` / ``result()``) answers for the batch, ``i`` is the frame's place in
    it. Replaced by a ``PreVerified`` when drained."""

    __slots__ = ("key", "fut", "i")

    def __init__(self, key: str) -> None:
        self.key = key
        self.fut: Any = None
        self.i = 0

    def resolve(self, patterns: tuple) -> PreVerified:
        try:
            res = self.fut.result()[self.i]
        except Exception:  # pool broken or stopped: RepoLogic verifies inline
            res = None
        return PreVerified(self.key, patterns, res)


def _stored_key(db: Database) -> Callable[[str], str]:
    """Reads a DID's signing key from its stored repo state (committed, not the running batch)."""
    from operators.repo import load_repo_state

    repos = db.cf("repos")

    def load(did: str) -> str:
        st = load_repo_state(repos.get(did.encode()))
        return st.signing_key if st is not None else ""

    return load


# --- the client ----------------------------------------------------------------------------

class FirehoseClient:
    """The WebSocket side: dial, read, decode, queue; back-pressure; reconnects.

    ``drain(n)`` (any thread) takes up to ``n`` queued ``(seq, item)`` pairs; ``item`` is
    ``None`` for frames that only move the cursor (rejected or skipped frames with a seq).
    """

    def __init__(self, cfg: Config, db: Database | None = None, *,
                 depth: Callable[[], int] | None = None,
                 queue_max: int = 20_000,
                 emit_rejected: bool = False,
                 open_timeout: float = 10.0,
                 preverify: bool | None = None,
                 keys: KeyCache | None = None,
                 lanes: list | None = None,
                 respawn_lanes: bool | None = None,
                 max_inflight: int = 4096,
                 verify_batch: int = 64,
                 verify_hold: float = 0.008,
                 drain_min: int = 512,
                 drain_hold: float = 0.2) -> None:
        self.cfg = cfg
        self.db = db if db is not None else open_flow_db(cfg.data_dir)
        self.url = cfg.firehose_url
        self._depth = depth if depth is not None else DepthGauge(self.db).value
        self._queue: deque[tuple[int | None, Any]] = deque()
        self._queue_max = queue_max
        self._emit_rejected = emit_rejected
        self._open_timeout = open_timeout
        self._thread = LoopThread("firehose")
        self.received_seq = 0  # last seq read from the socket (this process)
        self.connected = False
        self.held = False
        self._force_head = False
        self._skip_oversized = False
        # plain counters for tests and logs (Prometheus has the same, process-wide)
        self.stats: dict[str, int] = {"connects": 0, "dial_failures": 0, "frames": 0, "events": 0,
                                      "rejected": 0, "error_frames": 0, "info": 0, "skipped": 0,
                                      "preverify_batches": 0, "preverify_frames": 0}
        self.last_error: tuple[str, str] | None = None
        self.cursor_used: list[int] = []  # cursor of every dial (tests)
        self._frame_ctr: dict[str, Any] = {}  # frame type -> its Prometheus child (labels() is not free)
        # Frame/event counts and the last seq go to Prometheus every METRICS_FLUSH s, not per
        # frame: a multiprocess-mode inc/set costs 1.5-3 µs (an mmap write under a lock), three
        # per live commit (see _handle / _flush_metrics)
        self._m_frames: dict[str, int] = {}
        self._m_events = 0
        self._m_seq: int | None = None
        self._m_timer: asyncio.TimerHandle | None = None
        # #commit pre-verification in runtime.procpool's lanes (default: when the pool runs)
        self._lanes = procpool.lanes() if lanes is None else list(lanes)
        self._idle = list(self._lanes)  # lanes with no request out (loop thread)
        self._gone: set = set()  # lanes whose worker died
        self._asked: dict[Any, _Answer] = {}  # lane -> the answer its request will fill (loop thread)
        self._watched: set = set()  # lanes whose pipe the loop watches (registered once, not per request)
        self._watch_loop: Any = None
        self._preverify = procpool.pool_running() if preverify is None else preverify
        # a lane whose worker died is replaced (the pool's own lanes only), after a pause that
        # grows with the deaths of the last 10 minutes: frames that kill a worker cannot make
        # the firehose spawn processes in a loop
        self._respawn = (lanes is None) if respawn_lanes is None else respawn_lanes
        self._lane_deaths: deque[float] = deque()
        self._respawns: set = set()  # the replacement tasks (a reference keeps them alive)
        self._keys = keys if keys is not None else SIGNING_KEYS
        self._load_key = _stored_key(self.db)
        self._patterns = CollectionFilter(cfg.collection_filters).patterns
        self._vbatch: list[tuple[_Slot, bytes]] = []  # waiting for an idle lane
        self._vflush_due = False
        self._submitted = 0  # frames handed to the pool (loop thread)
        self._resolved = 0  # of those, drained (bytewax thread)
        self._max_inflight = max_inflight
        # frames per request: a request costs the flow ~50 us (a pipe write, a wake-up, a read),
        # so frames that arrive while every lane is busy wait and go together
        self._verify_batch = verify_batch
        self._hold = verify_hold if self._lanes else 0.0  # seconds a partial batch waits for company
        # while the lanes are behind by drain_min frames or more, drains wait (up to drain_hold)
        # until drain_min are verified: RepoLogic pays ~100 us per shard activation (a WriteBatch,
        # counters, bytewax's dispatch), so applying a lane's 64 frames at a time spread over 64
        # shards costs the flow ~2x the inline path's CPU per commit (docs/performance.md)
        self._in_lanes = 0  # frames sent to a lane and not answered yet (loop thread)
        self._per_frame = 0.0004  # seconds a frame takes in a lane, request to answer (moving average)
        self._drain_min = drain_min
        self._drain_hold = drain_hold
        self._held_since: float | None = None

    # --- cursor ----------------------------------------------------------------------

    def stored_cursor(self) -> int:
        raw = self.db.cf("meta").get(meta_cursor_firehose(self.cfg.relay_url))
        return unpack_u64(raw) if raw and len(raw) == 8 else 0

    def dial_cursor(self) -> int:
        """The ``?cursor=`` of the next dial (0 = live head)."""
        if self.cfg.no_replay or self._force_head:
            return 0
        if self.received_seq > 0:
            return self.received_seq
        return self.stored_cursor()

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start(self._run)

    def stop(self) -> None:
        self._thread.stop()

    def drain(self, n: int) -> list[tuple[int | None, Any]]:
        """Up to ``n`` queued pairs, in firehose order: stops at a ``#commit`` still in the pool."""
        q = self._queue
        out = []
        patterns = self._patterns
        verdicts = resolved = 0
        while q and len(out) < n:
            pair = q[0]
            item = pair[1]
            if item.__class__ is FirehoseCommit:
                pre = item.pre
                if pre.__class__ is _Slot:
                    fut = pre.fut
                    if fut is None or not fut.done():
                        break
                    item.pre = pre = pre.resolve(patterns)
                    resolved += 1
                    if pre.result is not None:
                        verdicts += 1
            q.popleft()
            out.append(pair)
        if resolved:  # counted once per drain: a Prometheus inc per frame is not free
            self._resolved += resolved
            if verdicts:
                _VERDICT.inc(verdicts)
            if resolved > verdicts:
                _NO_VERDICT.inc(resolved - verdicts)
        return out

    def pending(self) -> int:
        return len(self._queue)

    def head_wait(self, now: float) -> float:
        """Seconds until the verdict on the head of the queue is expected (0: any time now).

        The drain side looks again then instead of every ``_POOL_POLL``: at 1,000 commits/s the
        head waits ~10 ms for the pool (the hold, then the lane), 20 empty bytewax activations."""
        q = self._queue
        if not q:
            return 0.0
        pre = getattr(q[0][1], "pre", None)
        if pre.__class__ is not _Slot:
            return 0.0
        fut = pre.fut
        if fut is None:  # waiting for company (verify_hold) or a free lane
            return _UNSENT_POLL
        return max(0.0, getattr(fut, "eta", 0.0) - now)

    def drain_wait(self, now: float) -> float:
        """Seconds the next ``drain`` should wait for more verdicts (0 = drain now).

        Only while the lanes are behind (``drain_min`` frames or more not verified yet): then
        frames are applied ``drain_min`` at a time, or after ``drain_hold`` seconds, instead of
        one lane answer (a few per shard) at a time. A stream the lanes keep up with (a backlog
        below ``drain_min``, e.g. 1,000 commits/s) never waits."""
        behind = self._in_lanes + len(self._vbatch)
        if behind < self._drain_min or len(self._queue) - behind >= self._drain_min:
            self._held_since = None
            return 0.0
        if self._held_since is None:
            self._held_since = now
        left = self._held_since + self._drain_hold - now
        if left <= 0.0:
            self._held_since = None
            return 0.0
        return left

    def ready(self) -> bool:
        """True when ``drain`` would return something now."""
        q = self._queue
        if not q:
            return False
        item = q[0][1]
        if item.__class__ is FirehoseCommit and item.pre.__class__ is _Slot:
            fut = item.pre.fut
            return fut is not None and fut.done()
        return True

    # --- pre-verification ---------------------------------------------------------------

    def _pre_submit(self, item: FirehoseCommit, data: bytes) -> None:
        """Queue ``item``'s frame for the pool with the key RepoLogic published for its DID
        (none known: RepoLogic decides, and verifies inline if it must)."""
        if not self._preverify:
            return
        key = self._keys.get(item.did, self._load_key)
        if not key:
            return
        slot = _Slot(key)
        item.pre = slot
        self._vbatch.append((slot, data))
        if len(self._vbatch) >= _MIN_BATCH:
            self._pre_flush()  # to an idle lane, if any (else the next answer takes up to verify_batch)
        elif not self._vflush_due:
            # send what we have after a short hold (frames arriving meanwhile go along: see
            # _MIN_BATCH), to an idle lane; with none idle, the next lane to answer takes it
            self._vflush_due = True
            asyncio.get_running_loop().call_later(self._hold, self._pre_flush)

    def _pre_flush(self) -> None:
        """Send waiting frames to idle lanes, ``verify_batch`` at most per request (inline,
        as completed futures, when there are no lanes: unit tests)."""
        self._vflush_due = False
        while self._vbatch:
            if self._lanes and not self._idle:
                if len(self._gone) < len(self._lanes):  # a live lane will take them
                    return  # all busy: the next answer sends the rest
                ans = _Answer()
                ans.set_exception(RuntimeError("no verification worker left"))
                for i, (slot, _) in enumerate(self._vbatch):
                    slot.i = i
                    slot.fut = ans
                self._submitted += len(self._vbatch)
                self._vbatch = []
                return
            batch = self._vbatch[:self._verify_batch]
            del self._vbatch[:self._verify_batch]
            frames = [(data, slot.key) for slot, data in batch]
            if self._lanes:
                lane = self._idle.pop()
                fut: Any = _Answer()
                try:
                    lane.send(verify_commit_frames, frames, self._patterns)
                    fut.n = len(frames)
                    fut.sent = time.monotonic()
                    fut.eta = fut.sent + fut.n * self._per_frame
                    self._in_lanes += fut.n
                    self._asked[lane] = fut
                    self._watch(lane)
                except Exception as e:  # the worker died (EPIPE): these resolve to "verify inline"
                    PREVERIFY.labels("send_failed").inc()
                    _log.warning("verification worker unreachable", extra={"error": f"{type(e).__name__}: {e}"[:200]})
                    fut.set_exception(e)
                    self._lane_gone(lane)
            else:
                fut = procpool.submit(verify_commit_frames, frames, self._patterns)
            for i, (slot, _) in enumerate(batch):
                slot.i = i
                slot.fut = fut  # last: drain() reads fut first
            self._submitted += len(batch)
            self.stats["preverify_batches"] += 1
            self.stats["preverify_frames"] += len(batch)

    def _watch(self, lane: Any) -> None:
        """Have the loop call ``_pre_answer`` whenever ``lane``'s pipe is readable: registered
        once per lane (and loop), not per request (two ``epoll_ctl`` calls per batch saved)."""
        loop = asyncio.get_running_loop()
        if loop is not self._watch_loop:  # a new loop (the client restarted): nothing watched there yet
            self._watch_loop = loop
            self._watched = set()
        if lane not in self._watched:
            loop.add_reader(lane.fileno(), self._pre_answer, lane)
            self._watched.add(lane)

    def _lane_gone(self, lane: Any) -> None:
        """``lane``'s worker died: stop watching it; when it was the last, no verdicts (RepoLogic
        verifies inline) until a replacement is up, which is started here (``_respawn_lane``)."""
        if lane in self._watched:
            self._watched.discard(lane)
            try:
                self._watch_loop.remove_reader(lane.fileno())
            except (OSError, ValueError, RuntimeError):  # pipe closed or loop gone: nothing to undo
                pass
        if lane in self._gone:
            return
        lane.dead = True
        self._gone.add(lane)
        if len(self._gone) >= len(self._lanes) and self._preverify:
            self._preverify = False
            _log.error("every verification worker is gone; verifying in RepoLogic until one is back")
        if self._respawn:
            now = time.monotonic()
            deaths = self._lane_deaths
            deaths.append(now)
            while deaths[0] < now - LANE_DEATH_WINDOW:
                deaths.popleft()
            delay = LANE_RESPAWN_DELAYS[min(len(deaths), len(LANE_RESPAWN_DELAYS)) - 1]
            task = asyncio.get_running_loop().create_task(self._respawn_lane(lane, delay))  # (loop thread)
            self._respawns.add(task)
            task.add_done_callback(self._respawns.discard)

    async def _respawn_lane(self, dead: Any, delay: float) -> None:
        """Start a worker in ``dead``'s place (off the loop: spawning waits for the process) and
        give it work; the first replacement comes at once, later ones after a growing pause."""
        if delay:
            await asyncio.sleep(delay)
        try:
            new = await asyncio.wrap_future(procpool.replace_lane(dead))
        except Exception as e:  # could not start a process (out of memory, of pids): stay inline
            _log.error("could not replace a verification worker", extra={"error": f"{type(e).__name__}: {e}"[:200]})
            return
        if new is None or dead not in self._lanes:
            return  # the pool was stopped meanwhile
        self._lanes[self._lanes.index(dead)] = new
        self._gone.discard(dead)
        self._idle.append(new)
        LANES_RESPAWNED.inc()
        if not self._preverify:
            self._preverify = True
            _log.warning("a verification worker is back; commits are verified beside the flow again")
        if self._vbatch:
            self._pre_flush()

    def _pre_answer(self, lane: Any) -> None:
        """A lane's pipe is readable (loop callback): hand its answer to the drain side, reuse the lane."""
        fut = self._asked.pop(lane, None)
        if fut is not None:
            self._in_lanes -= fut.n
            if fut.n:  # how long a frame takes in a lane, for the drain side's next look (head_wait)
                self._per_frame += 0.2 * ((time.monotonic() - fut.sent) / fut.n - self._per_frame)
        try:
            res = lane.receive()
            if fut is not None:
                fut.set_result(res)
        except Exception as e:  # a failed request or a dead worker: RepoLogic verifies inline
            if fut is not None:
                fut.set_exception(e)
            if not lane.dead:
                _log.warning("verification request failed", extra={"error": str(e)[:200]})
        if lane.dead:
            self._lane_gone(lane)
        elif fut is not None:
            self._idle.append(lane)
        if self._vbatch:
            self._pre_flush()  # to the lane now idle; or, the last one gone, "no verdict" for all

    async def _wait_inflight(self) -> None:
        self._pre_flush()
        while self._submitted + len(self._vbatch) - self._resolved >= self._max_inflight:
            await asyncio.sleep(0.001)

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        # Its own session: no total timeout (the connection lives for days), no shared pool.
        session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT},
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        try:
            await self._dial_loop(session)
        finally:
            await session.close()

    async def _dial_loop(self, session: aiohttp.ClientSession) -> None:
        failures = 0
        while True:
            await self._wait_capacity()
            cursor = self.dial_cursor()
            url = self.url + (f"?cursor={cursor}" if cursor > 0 else "")
            self.cursor_used.append(cursor)
            _log.info("connecting to firehose", extra={"url": url, "cursor": cursor, "retries": failures})
            wide = self._skip_oversized  # this connection reads the oversized frame: a wider limit
            limit = self.cfg.max_frame_size * (SKIP_READ_FACTOR if wide else 1)
            try:
                ws = await asyncio.wait_for(session.ws_connect(
                    url,
                    max_msg_size=limit + 1,  # aiohttp refuses a message of max_msg_size bytes or more
                    compress=0,
                    heartbeat=PING_INTERVAL,  # a pong must come within half of it
                    proxy=None,
                ), self._open_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # OSError, WSServerHandshakeError, InvalidURL, TimeoutError, ...
                CONNECTS.labels("failed").inc()
                self.stats["dial_failures"] += 1
                delay = dial_backoff(failures)
                failures += 1
                _log.warning("firehose dial failed", extra={"url": url, "error": f"{type(e).__name__}: {e}",
                                                            "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
                continue
            CONNECTS.labels("ok").inc()
            self.stats["connects"] += 1
            self._force_head = False
            self.connected = True
            _log.info("connected to firehose", extra={"url": url})
            frames_before = self.stats["frames"]
            error_frame = False
            stopping = False
            try:
                error_frame = await self._read(ws, wide)
            except asyncio.CancelledError:
                stopping = True  # leave without a close handshake: closing the session drops the socket
                raise
            except _Oversized:
                self._on_oversized()
            except Exception as e:
                _log.warning("firehose connection failed", extra={"url": self.url, "error": f"{type(e).__name__}: {e}"})
            finally:
                self.connected = False
                if not stopping:
                    try:
                        await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
                    except BaseException:
                        pass
            got_frames = self.stats["frames"] > frames_before
            if error_frame or not got_frames:
                # first time: redial at once; a relay that keeps answering with errors or
                # hanging up before the first frame is then backed off like a failed dial
                delay = dial_backoff(failures - 1) if failures else 0.0
                failures += 1
                if delay:
                    await asyncio.sleep(delay)
            else:
                failures = 0

    def _on_oversized(self) -> None:
        if self._skip_oversized:
            # even SKIP_READ_FACTOR times the limit was not enough: never read it, go to the head
            self._skip_oversized = False
            self._force_head = True
            REJECTED.labels("frame_too_large").inc()
            self.stats["rejected"] += 1
            _log.error("firehose frame larger than %dx TAP_MAX_FRAME_SIZE; not read, redialling at the live head "
                       "(repos with commits in between resync)", SKIP_READ_FACTOR,
                       extra={"url": self.url, "max_frame_size": self.cfg.max_frame_size, "after_seq": self.received_seq})
            return
        # not counted here: the redial reads the frame again and ``_handle`` rejects (and counts) it
        _log.error("firehose frame larger than TAP_MAX_FRAME_SIZE; redialling to skip it",
                   extra={"url": self.url, "max_frame_size": self.cfg.max_frame_size, "after_seq": self.received_seq})
        self._skip_oversized = True

    async def _wait_capacity(self) -> None:
        cap = self.cfg.outbox_capacity
        while True:
            if len(self._queue) >= self._queue_max:
                await asyncio.sleep(0.002)
                continue
            if self._depth() >= cap:
                if not self.held:
                    self.held = True
                    HELD.set(1)
                    _log.info("firehose held: outbox at capacity", extra={"capacity": cap})
                await asyncio.sleep(0.1)
                continue
            if self.held:
                self.held = False
                HELD.set(0)
                _log.info("firehose resumed")
            return

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, wide: bool) -> bool:
        """Read frames until the connection ends; True if it ended after an error frame.

        ``wide``: the connection reads up to ``SKIP_READ_FACTOR`` times the frame limit (the
        redial after an oversized frame); frames over the limit are then rejected here. Raises
        ``_Oversized`` when a frame is over the connection's limit (never read)."""
        q = self._queue
        cap = self.cfg.outbox_capacity
        qmax = self._queue_max
        depth = self._depth
        last = self.received_seq
        max_size = self.cfg.max_frame_size
        receive = ws.receive
        while True:
            if len(q) >= qmax or depth() >= cap:
                await self._wait_capacity()
            msg = await receive()
            mtype = msg.type
            if mtype is not _BINARY:
                if mtype is _TEXT:
                    self.stats["frames"] += 1
                    REJECTED.labels("text_frame").inc()
                    self.stats["rejected"] += 1
                    _log.warning("firehose sent a text frame; skipped", extra={"url": self.url})
                    continue
                if mtype is _ERROR:
                    err = msg.data
                    if isinstance(err, aiohttp.WebSocketError) and err.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                        raise _Oversized()
                    raise err if isinstance(err, BaseException) else ConnectionError(str(err))
                if mtype in _CLOSING:
                    _log.warning("firehose connection closed",
                                 extra={"url": self.url, "code": ws.close_code, "reason": str(msg.extra or "")})
                    return False
                continue  # ping/pong (answered by aiohttp)
            data = msg.data
            self.stats["frames"] += 1
            if wide:
                self._skip_oversized = False
                if len(data) > max_size:
                    f = decode_frame(data)
                    f = _reject(f.type, "frame_too_large", f.seq, f.did, f"{len(data)} bytes")
                    self._handle(f, q)
                    continue
            f = decode_frame(data)
            if self._preverify and f.type == "#commit" and f.kind == "event":
                if self._submitted + len(self._vbatch) - self._resolved >= self._max_inflight:
                    await self._wait_inflight()
                self._pre_submit(f.item, data)
            if f.seq is not None:
                if f.seq <= last and f.kind != "rejected":
                    _log.warning("firehose seq out of order", extra={"seq": f.seq, "prev": last})
                last = f.seq
            if self._handle(f, q):
                return True

    def _handle(self, f: Frame, q: deque) -> bool:
        """Queue or log one frame; True when the connection should be dropped (error frame)."""
        m = self._m_frames
        m[f.type] = m.get(f.type, 0) + 1
        if self._m_timer is None:
            self._m_timer = asyncio.get_running_loop().call_later(METRICS_FLUSH, self._flush_metrics)
        kind = f.kind
        if kind == "event":
            self._m_events += 1
            self.stats["events"] += 1
            q.append((f.seq, f.item))
        elif kind == "rejected":
            REJECTED.labels(f.name).inc()
            self.stats["rejected"] += 1
            _log.warning("firehose frame rejected", extra={"did": f.did, "type": f.type, "seq": f.seq,
                                                           "reason": f.name, "detail": f.message[:200]})
            if f.seq is not None or self._emit_rejected:
                rej = Rejected(did=f.did, source="firehose", reason=f.name, detail=f.message[:200],
                               extra={"type": f.type, "seq": f.seq}) if self._emit_rejected else None
                q.append((f.seq, rej))
        elif kind == "skip":
            self.stats["skipped"] += 1
            if f.seq is not None:
                q.append((f.seq, None))
        elif kind == "info":
            self.stats["info"] += 1
            _log.warning("firehose info", extra={"url": self.url, "info": f.name, "detail": f.message})
        elif kind == "error":
            ERROR_FRAMES.labels(f.name if f.name in ("FutureCursor", "ConsumerTooSlow") else "other").inc()
            self.stats["error_frames"] += 1
            self.last_error = (f.name, f.message)
            _log.error("firehose error frame", extra={"url": self.url, "error": f.name, "detail": f.message})
            if f.name == "FutureCursor":
                self._force_head = True
            return True
        if f.seq is not None:
            if f.seq > self.received_seq or kind == "event":
                self.received_seq = f.seq
            self._m_seq = f.seq
        return False

    def _flush_metrics(self) -> None:
        """Add the frames counted since the last flush to Prometheus (loop thread)."""
        self._m_timer = None
        for t, n in self._m_frames.items():
            ctr = self._frame_ctr.get(t)
            if ctr is None:
                name = t.lstrip("#") or "invalid"
                ctr = FRAMES.labels(name if t in _KNOWN_TYPES else "other")
                if len(self._frame_ctr) < 64:
                    self._frame_ctr[t] = ctr
            ctr.inc(n)
        self._m_frames.clear()
        if self._m_events:
            EVENTS_RECEIVED.inc(self._m_events)
            self._m_events = 0
        if self._m_seq is not None:
            LAST_SEQ.set(self._m_seq)
            self._m_seq = None


# --- bytewax ----------------------------------------------------------------------------------

#: Frames that make a verification request worth sending at once. Measured per frame, one
#: worker, on the loaded 2-core box: a request of 1 frame costs the worker ~575 us and the flow
#: ~157 us (inline verification: ~357 us); 8 frames ~358 + 29; 16 ~342 + 19; 64 ~308 + 7. Fewer
#: frames wait at most ``verify_hold`` for company.
_MIN_BATCH = 16

#: How soon to look again (seconds) when the next frame waits for the verification pool and its
#: answer is due (or overdue); earlier than that, at its expected time (head_wait), at most
#: _MAX_POOL_WAIT ahead; every _UNSENT_POLL while it waits to be sent.
_POOL_POLL = 0.0005
_MAX_POOL_WAIT = 0.02
_UNSENT_POLL = 0.002

#: How often to look again (seconds) while a drain waits for the lanes to catch up (drain_wait).
_HOLD_POLL = 0.005


class _FirehosePartition(StatefulSourcePartition):
    def __init__(self, client: FirehoseClient, batch: int, idle: float) -> None:
        self._c = client
        self._batch = batch
        self._idle = timedelta(seconds=idle)
        self._emitted_seq = 0
        # (seq, shard) of emitted firehose items not yet known to be applied by RepoLogic
        self._unapplied: deque[tuple[int, int]] = deque()
        self._shards = client.cfg.shards
        self._saved_seq = -1
        self._saved_recv = -1
        self._save_every = client.cfg.cursor_save_interval
        self._next_save = time.monotonic() + self._save_every
        self._off = client.cfg.outbox_only  # TAP_OUTBOX_ONLY: no firehose at all
        if not self._off:
            client.start()

    def next_batch(self) -> Iterable[Item]:
        check_stop()
        pairs = self._c.drain(self._batch) if not self._c.drain_wait(time.monotonic()) else []
        items = []
        unapplied = self._unapplied
        for seq, item in pairs:
            if item is not None:
                items.append(item)
                if seq is not None and type(item) in FIREHOSE_ITEMS and isinstance(item.did, str):
                    try:
                        unapplied.append((seq, shard_of(item.did, self._shards)))
                    except Exception:  # not encodable: RepoLogic rejects it and records nothing
                        pass
            if seq is not None:
                self._emitted_seq = seq
        if time.monotonic() >= self._next_save:
            self.save_cursor()
        return items

    def next_awake(self) -> datetime | None:
        if self._c.ready():
            wait = self._c.drain_wait(time.monotonic())
            if wait > 0.0:  # the lanes are behind: apply their verdicts in larger batches
                return datetime.now(timezone.utc) + timedelta(seconds=min(wait, _HOLD_POLL))
            return None
        if self._c.pending():  # the head is a #commit still in the verification pool
            wait = min(max(self._c.head_wait(time.monotonic()), _POOL_POLL), _MAX_POOL_WAIT)
            return datetime.now(timezone.utc) + timedelta(seconds=wait)
        return cap_awake(datetime.now(timezone.utc) + (timedelta(days=1) if self._off else self._idle))

    def snapshot(self) -> None:
        return None  # the cursor lives in RocksDB meta

    def durable_seq(self) -> int:
        """The cursor that is safe to save: every firehose item at or below it has been applied
        (RepoLogic records ``fhapplied/<shard>`` in the WriteBatch of the item), so a crash
        right after the save loses nothing; frames that carried no item only move it on."""
        pending = self._unapplied
        if pending:
            meta = self._c.db.cf("meta")
            applied: dict[int, int] = {}
            while pending:
                seq, shard = pending[0]
                a = applied.get(shard)
                if a is None:
                    a = applied[shard] = decode_counter(meta.get(meta_firehose_applied(shard)))
                if a < seq:
                    return seq - 1
                pending.popleft()
        return self._emitted_seq

    def save_cursor(self) -> None:
        self._next_save = time.monotonic() + self._save_every
        seq, recv = self.durable_seq(), self._c.received_seq
        if seq == self._saved_seq and recv == self._saved_recv:
            return
        db = self._c.db
        b = db.batch()
        meta = db.handle("meta")
        if seq >= 1 and seq != self._saved_seq:
            b.put(meta_cursor_firehose(self._c.cfg.relay_url), pack_u64(seq), meta)
        if recv >= 1:
            b.put(META_STATS_SEQ, pack_u64(recv), meta)
        try:
            db.write(b)
            self._saved_seq, self._saved_recv = seq, recv
        except Exception:
            _log.exception("saving the firehose cursor failed")

    def close(self) -> None:
        self._c.stop()
        self.save_cursor()


class FirehoseSource(FixedPartitionedSource):
    """One partition reading the relay's firehose (see module doc)."""

    def __init__(self, cfg: Config, db: Database | None = None, *, batch: int = 2000,
                 idle: float = 0.005, emit_rejected: bool = False) -> None:
        self.cfg = cfg
        self._db = db
        self._batch = batch
        self._idle = idle
        self._emit_rejected = emit_rejected

    def list_parts(self) -> list[str]:
        return ["firehose"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _FirehosePartition:
        client = FirehoseClient(self.cfg, self._db, emit_rejected=self._emit_rejected)
        return _FirehosePartition(client, self._batch, self._idle)
