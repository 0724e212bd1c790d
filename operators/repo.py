"""RepoLogic: the one stateful operator (spec/tap-behavior.md §7, §8.4-§8.6, §9.3, §9.4).

Per repo it keeps a ``RepoState`` (orjson, ``repos`` CF) and the record index (``records``
CF, path -> binary CID); it drops replays, checks continuity, asks BackfillSource for
snapshots through the durable ``fetch_q``, diffs snapshots against the index, buffers live
commits while a snapshot is outstanding, drains them afterwards, and writes Tap events to
the ``outbox``. Every call of ``process(items)`` writes exactly ONE RocksDB ``WriteBatch``
holding every state change of the batch together with the events it caused (DESIGN.md
invariant 1); event ids are taken from the process's ``IdAllocator`` at write time, so
within a shard outbox keys grow in commit order.

Use directly (tests, tools)::

    from operators.repo import RepoLogic
    logic = RepoLogic(db, cfg, ids)               # store.db.Database, config.Config, store.ids.IdAllocator
    rejected = logic.process([AddRepo("did:plc:abc", seq=1)])

or from bytewax 0.21: ``op.stateful_batch("repo_logic", keyed, repo_logic_builder(cfg))``
(``flows.dataflow`` puts every item under one key, so one ``process`` call takes an
activation's items of every shard; bytewax passes no key, each item carries its DID). What
flows out is only ``Rejected`` items: bad input never raises out of ``process()``; it is
counted and logged downstream. A RocksDB read or write failure
(``StoreError``) does raise: without durability the flow must stop, and everything it was
processing is still in the durable queues it came from.

Per-shard counters ``count/<name>/<shard>`` (u64 BE, ``store.layout.pack_u64``) for
``repos``, ``records``, ``resync_buf`` and ``outbox`` (events added) are updated in the same
WriteBatch. ``FETCH_WAKEUP`` / ``OUTBOX_WAKEUP`` (``threading.Event``) are set after a batch
that queued a fetch / wrote events, for in-process waiters.

Within one ``process()`` call an overlay holds every state, record, buffer and queue row the
batch touched, so several items of one DID in one batch see each other's effects. Each item
is applied under an undo mark: an item that fails half-way is rolled back and rejected, so
no item is ever half applied.

State machine (tapflow decisions, where Tap differs or is silent):

- A repo needs a snapshot when it is added (``pending``), desynchronized, or failed
  (``error``/``desynchronized`` after a rate limit). RepoLogic then writes one ``fetch_q``
  row (priority 1 pending, 2 desynchronized, 3 error; ``not_before`` = now or the backoff
  time) in the same WriteBatch; key order is the claim order (Tap §14 tests 36-38). At most
  one repo fetch per DID is outstanding (``RepoState.fetch_key``); ``active`` <=> none.
- Claim (Tap sets ``resyncing`` when a worker takes the repo): BackfillSource, after
  resolving the identity and right before calling getRepo, emits ``FetchStarted``; if its
  ``fetch_key`` is still the repo's outstanding fetch, the repo becomes ``resyncing`` and the
  identity is applied (signing key and PDS stored, identity event if the handle changed, as
  Tap's RefreshIdentity does before the download). BackfillSource waits (bounded) until the
  repo shows ``resyncing`` before it sends getRepo, so a commit RepoLogic ignored while the
  repo was ``pending`` reached tapflow before the request and is in the snapshot, and every
  later one is buffered and drained onto it: a repo added while the firehose is live is
  downloaded once (an ignored commit newer than the snapshot cost a second download at the
  repo's next commit, and left the repo stale until then). A stale ``FetchStarted`` (repo removed, or another fetch outstanding) is
  ignored; its answer is dropped as stale too. Queued repos stay ``pending``/
  ``desynchronized``/``error`` until claimed; the first ``SnapshotChunk`` also sets
  ``resyncing`` (chunks without a claim, e.g. from an older BackfillSource).
- Tap's startup reset of ``resyncing`` is not needed: the ``fetch_q`` row survives a crash,
  BackfillSource fetches again (a new ``FetchStarted`` re-claims it; the stored identity
  keeps commits buffering meanwhile), and the new first chunk restarts the merge (the
  record index makes re-applied chunks emit nothing).
- Live commits: ``pending`` repos IGNORE commits (Tap; spec test 19; they have no signing
  key yet and the snapshot, requested after them, supersedes them). ``resyncing``,
  ``desynchronized`` and ``error`` repos BUFFER verified commits (Tap buffers only in
  ``resyncing``; a snapshot taken before a commit ignored meanwhile would lose that commit
  until the next prevData mismatch). A commit whose prevData mismatches marks the repo
  desynchronized AND is buffered. A repo that was never claimed has no signing key and
  ignores commits like a pending one; at most ``max_buffered`` rows per repo. Replays (rev
  at or below the stored rev, or the newest buffered rev) are skipped before verification.
- Commit verification failure: Tap drops the commit and keeps the state. tapflow rejects it
  (counted, logged) and, for an ``active`` repo, marks it ``desynchronized``: the resync
  re-resolves the identity, which heals key rotations without a preceding ``#identity``
  (spec §15.3). Same for a ``#sync`` that fails verification.
- Drain after a snapshot (§9.4): buffered commits at or below the snapshot rev are deleted
  (Tap leaves them, §15.10); chaining commits (prevData = current root, or legacy without
  prevData and newer than the current rev) are applied as live events and deleted, zero-op
  ones included; the first newer commit that does not chain means a gap: the rest stay
  buffered and the repo goes straight back to ``desynchronized`` with a fetch (the next
  snapshot covers the gap; Tap would only notice at the next live commit).
- Snapshot chunks are merged against the index over (previous chunk's last path, this
  chunk's last path] (the whole tail for the last chunk): unknown path -> ``create``,
  different CID -> ``update``, same -> nothing; index rows absent from the snapshot ->
  ``delete`` events (``live:false``) when ``TAP_RESYNC_DELETES`` (default), else left as
  Tap does. Index rows of collections the filters now exclude are never reported; they
  are dropped silently when absent from the snapshot. The first chunk carries the same
  identity as the claim and applies it again: an identity event only when the handle
  differs from the stored one (first sync: stored ``""``; normally the claim already
  emitted it, so a first sync has exactly one identity event), signing key and PDS stored.
- Fetch failure: ``rate_limited`` -> ``desynchronized`` (error text cleared), else ``error``
  with the text; ``retries += 1``; ``retry_after = now + 60 * (min(2**c, 60) + U[0,1))`` s
  with ``c`` the retries before, the exponent capped (no overflow, §15.8); the fetch is
  re-queued with ``not_before = retry_after``. A failure for a repo removed meanwhile is
  ignored (Tap crashes there, §15.9).
- ``#identity`` -> an identity-refresh row (priority 0) replacing any older one;
  ``IdentityRefreshed`` -> identity event when the handle changed (never an empty handle:
  ``handle.invalid``), signing key and PDS updated.
- ``#account`` -> §8.5; ``deleted`` emits the identity event, then (if the repo had records)
  ``FLAG_INTERNAL`` rows ``{"did":..,"deleted_paths":[...]}`` (at most 10,000 paths each) so
  Kafka can tombstone the records, and removes the repo.
- ``RemoveRepo`` deletes the repo row, its records, buffered commits and queued fetches;
  queued outbox events stay. Control items record ``cmdapplied/<shard>``.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import weakref
from collections import Counter, deque
from bisect import bisect_right
from dataclasses import dataclass, fields
from itertools import count, islice, repeat
from typing import Any, Callable, Iterable, Optional

import orjson
from bytewax.operators import StatefulBatchLogic

from config import Config
from operators.events import ID_HEAD, INVALID_HANDLE, identity_body, kind_mid, record_body
from operators.filters import CollectionFilter
from operators.items import (
    FIREHOSE_ITEMS,
    AddRepo,
    FetchFailed,
    FetchStarted,
    FirehoseAccount,
    FirehoseCommit,
    FirehoseIdentity,
    FirehoseSync,
    IdentityRefreshed,
    Item,
    Rejected,
    RemoveRepo,
    ResolvedIdentity,
    SnapshotChunk,
)
from operators.verify import (
    CheckedCommit,
    CommitOp,
    VerifyCommit,
    SIGNING_KEYS,
    VerifyError,
    VerifySync,
    checked_from_result,
    default_verify_commit,
    default_verify_sync,
    op_collections,
)
from protocol.cid import cid_from_str
from protocol.snapshot import CREATE_ACTION, UPDATE_ACTION
from store.db import Database, StoreError
from store.ids import IdAllocator
from store.layout import (
    FLAG_IDENTITY,
    FLAG_INTERNAL,
    FLAG_LIVE,
    PRIO_DESYNC,
    PRIO_ERROR,
    PRIO_IDENTITY,
    PRIO_PENDING,
    decode_counter,
    did_prefix,
    encode_outbox_row,
    fetch_key,
    meta_cmd_applied,
    meta_firehose_applied,
    META_OUTBOX_COUNTS,
    meta_counter,
    outbox_key,
    pack_counts,
    outbox_row_head,
    pack_u64,
    record_key,
    record_path,
    resync_buf_key,
    shard_of,
    unpack_u64,
)

log = logging.getLogger("tapflow.repo")

PENDING = "pending"
RESYNCING = "resyncing"
ACTIVE = "active"
DESYNCHRONIZED = "desynchronized"
ERROR = "error"
REPO_STATES = (PENDING, RESYNCING, ACTIVE, DESYNCHRONIZED, ERROR)

ACCOUNT_STATUS_CHANGES = frozenset({"deactivated", "takendown", "suspended", "deleted"})

MAX_BUFFERED = 10_000  # buffered live commits per repo while a snapshot is outstanding
DELETED_PATHS_PER_ROW = 10_000

# Woken after a WriteBatch that queued a fetch / wrote events (same process): BackfillSource
# and an in-process outbox follower may wait on these instead of polling.
FETCH_WAKEUP = threading.Event()
OUTBOX_WAKEUP = threading.Event()

_DID_RE = re.compile(r"^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$")


def valid_did(did: Any) -> bool:
    """atproto DID syntax (and therefore safe in ``did \\0 ...`` keys)."""
    return isinstance(did, str) and len(did) <= 2048 and _DID_RE.match(did) is not None


def _increasing(keys: list[bytes]) -> bool:
    """Strictly increasing (C-speed pairwise compare)."""
    return all(map(_LT, keys, islice(keys, 1, None)))


_LT = bytes.__lt__
_drain = deque(maxlen=0).extend  # run an iterator at C speed, keeping nothing


def retry_backoff(retries_before: int, rand: float) -> float:
    """Seconds to wait after a failed fetch: ``60 * (min(2**c, 60) + rand)``, ``c`` capped."""
    c = min(max(int(retries_before), 0), 6)
    return 60.0 * (min(2 ** c, 60) + rand)


# --- per-repo state ---------------------------------------------------------------------

@dataclass(slots=True)
class RepoState:
    """One tracked repo (``repos`` CF value, orjson). ``/info`` reads ``state``, ``handle``,
    ``rev``, ``records``, ``error``, ``retries``; the rest is RepoLogic's bookkeeping."""

    state: str = PENDING
    status: str = "active"  # account status: active | takendown | suspended | deactivated
    handle: str = ""
    rev: str = ""
    prev_data: str = ""  # MST root CID of the applied state
    error: str = ""
    retries: int = 0
    retry_after: int = 0  # unix seconds; 0 = none
    records: int = 0  # rows in the record index
    signing_key: str = ""  # multibase (Multikey) of the #atproto key
    pds: str = ""
    fetch_key: str = ""  # hex of the outstanding repo fetch in fetch_q ("" = none)
    ident_key: str = ""  # hex of the outstanding identity refresh in fetch_q
    buffered: int = 0  # rows in resync_buf
    buf_next: int = 0  # next resync_buf sequence number
    buf_rev: str = ""  # rev of the newest buffered commit (replay skip while buffering)
    snap_pos: str = ""  # snapshot in progress: last record path merged so far

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes) -> "RepoState":
        d = orjson.loads(raw)
        if tuple(d) == _FIELD_ORDER:  # as to_json writes it: positional, 4-5x cheaper than **d
            return cls(*d.values())
        try:
            return cls(**d)
        except TypeError:  # written by a newer version: ignore fields we do not know
            return cls(**{k: v for k, v in d.items() if k in _STATE_FIELDS})

    def clone(self) -> "RepoState":
        return RepoState(self.state, self.status, self.handle, self.rev, self.prev_data, self.error,
                         self.retries, self.retry_after, self.records, self.signing_key, self.pds,
                         self.fetch_key, self.ident_key, self.buffered, self.buf_next, self.buf_rev,
                         self.snap_pos)


_FIELD_ORDER = tuple(f.name for f in fields(RepoState))
_STATE_FIELDS = frozenset(_FIELD_ORDER)


def load_repo_state(raw: bytes | None) -> Optional[RepoState]:
    """Parse a ``repos`` CF value (None stays None)."""
    return RepoState.from_json(raw) if raw else None


# --- the per-batch overlay ----------------------------------------------------------------

_MISSING = object()
_KV_CFS = ("records", "resync_buf", "fetch_q")
_NOPREFIX = b""


class _Bucket(dict):
    """The overlay rows of one DID prefix; ``hi`` bounds every key ever put in it (a chunk's
    range scan skips the bucket when it lies below the range: no quadratic rescans)."""

    __slots__ = ("hi",)

    def __init__(self) -> None:
        self.hi = b""


def _prefix_end(prefix: bytes) -> bytes:
    """Smallest key above every key starting with ``prefix`` (prefixes end in \\0 here)."""
    return prefix[:-1] + bytes((prefix[-1] + 1,))


#: A cleared prefix with up to this many rows is deleted row by row; above, by one range deletion.
CLEAR_POINT_DELETES = 1024


def _clear_prefix(wb: Any, rows: Any, prefix: bytes, handle: Any) -> None:
    """Delete every stored row under ``prefix`` in ``wb``.

    A range deletion per repo looked cheap, but RocksDB keeps every range tombstone in memory
    (each table file's list is loaded whole) until compaction reaches the last level, and
    every read of the family pays for them: removing 1M repos, most of them never synced
    (no rows at all), cost the flow 350 MB and the delivery child's replay as much. So the
    rows are looked up (one seek: nothing for a repo that never synced) and deleted one by
    one; only a large repo gets a range deletion.
    """
    end = _prefix_end(prefix)
    it = rows.iter()
    it.seek(prefix)
    keys = []
    while it.valid():
        k = it.key()
        if k >= end:
            break
        if len(keys) == CLEAR_POINT_DELETES:
            wb.delete_range(prefix, end, handle)
            return
        keys.append(k)
        it.next()
    for k in keys:
        wb.delete(k, handle)


class StateCache:
    """Repo states as RepoLogic last wrote them, for the repos that had items lately.

    A live commit read its repo's row and parsed it (~1.3 + ~6 µs here) and the next commit
    of that repo, a batch later, did it again. RepoLogic is the only writer of ``repos`` and
    stores every state it wrote here once the WriteBatch is durable (``_write``), so an entry
    is what the row holds; callers get a clone. Bounded: two generations of ``size`` entries,
    the older one dropped whole when the newer fills (no per-hit bookkeeping)."""

    __slots__ = ("size", "young", "old")

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self.young: dict[str, RepoState] = {}
        self.old: dict[str, RepoState] = {}

    def get(self, did: str) -> Optional[RepoState]:
        st = self.young.get(did)
        if st is None:
            st = self.old.get(did)
            if st is not None:
                self._put(did, st)
        return st

    def _put(self, did: str, st: RepoState) -> None:
        young = self.young
        if len(young) >= self.size and did not in young:
            self.old, self.young = young, {}
            young = self.young
        young[did] = st

    def written(self, states: dict[str, Optional[RepoState]]) -> None:
        """``states`` (None: deleted) are durable; they are the rows now."""
        for did, st in states.items():
            if st is None:
                self.young.pop(did, None)
                self.old.pop(did, None)
            else:
                self._put(did, st)

    def clear(self) -> None:
        self.young, self.old = {}, {}


class _Batch:
    """Everything one ``process()`` call will write, readable as if already written."""

    def __init__(self, db: Database, cache: Optional[StateCache] = None) -> None:
        self.db = db
        self._repos = db.cf("repos")
        self._cache = cache
        self._untracked: set[str] = set()  # DIDs read from the DB and not found
        self.states: dict[str, Optional[RepoState]] = {}
        self.kv: dict[str, dict[bytes, dict[bytes, Optional[bytes]]]] = {cf: {} for cf in _KV_CFS}
        self.cleared: dict[str, set[bytes]] = {cf: set() for cf in _KV_CFS}
        self.events: list[tuple[int, str, int, Optional[str], bytes]] = []
        self.counters: dict[tuple[str, int], int] = {}
        self.cmd: dict[int, int] = {}
        self.fh: dict[int, int] = {}  # shard -> highest firehose seq applied in this batch
        self.fetch_queued = False
        self._undo: list[tuple] = []

    # undo marks: one per item
    def mark(self) -> tuple:
        return (len(self._undo), len(self.events), self.fetch_queued)

    def rollback(self, mark: tuple) -> None:
        n_undo, n_events, fetch_queued = mark
        while len(self._undo) > n_undo:
            entry = self._undo.pop()
            if entry[0] == "t" or entry[0] == "s":  # a counter's or a repo state's previous value
                _, k, old = entry
                d = self.counters if entry[0] == "t" else self.states
                if old is _MISSING:
                    d.pop(k, None)
                else:
                    d[k] = old
            elif entry[0] == "k":
                _, cf, prefix, key, old = entry
                bucket = self.kv[cf][prefix]
                if old is _MISSING:
                    bucket.pop(key, None)
                else:
                    bucket[key] = old
            elif entry[0] == "n":  # kv_put_many of keys the bucket did not hold
                _, cf, prefix, keys = entry
                pop = self.kv[cf][prefix].pop
                for key in keys:
                    pop(key, None)
            else:  # "c"
                _, cf, prefix, old_bucket, was_cleared = entry
                if old_bucket is None:
                    self.kv[cf].pop(prefix, None)
                else:
                    self.kv[cf][prefix] = old_bucket
                if not was_cleared:
                    self.cleared[cf].discard(prefix)
        del self.events[n_events:]
        self.fetch_queued = fetch_queued

    # repo states: callers get a private copy and store it back with put_state
    def get_state(self, did: str) -> Optional[RepoState]:
        st = self.states.get(did, _MISSING)
        if st is not _MISSING:
            return st.clone() if st is not None else None
        if did in self._untracked:
            return None
        cache = self._cache
        if cache is not None:
            st = cache.get(did)
            if st is not None:
                return st.clone()  # the cached object is the stored row: never handed out
        raw = self._repos.get(did.encode())
        if raw is None:
            self._untracked.add(did)  # the common case on the firehose: asked again and again
            return None
        return RepoState.from_json(raw)  # a fresh object: private to the caller

    def put_state(self, did: str, st: Optional[RepoState]) -> None:
        self._undo.append(("s", did, self.states.get(did, _MISSING)))
        self.states[did] = st

    # key-value rows of records / resync_buf / fetch_q, bucketed by DID prefix
    def kv_get(self, cf: str, prefix: bytes, key: bytes) -> Optional[bytes]:
        bucket = self.kv[cf].get(prefix)
        if bucket is not None and key in bucket:
            return bucket[key]
        if prefix in self.cleared[cf]:
            return None
        return self.db.cf(cf).get(key)

    def kv_put(self, cf: str, prefix: bytes, key: bytes, value: Optional[bytes]) -> None:
        """Put ``value``, or delete when ``value`` is None."""
        bucket = self.kv[cf].get(prefix)
        if bucket is None:
            bucket = self.kv[cf][prefix] = _Bucket()
            self._undo.append(("c", cf, prefix, None, prefix in self.cleared[cf]))
        self._undo.append(("k", cf, prefix, key, bucket.get(key, _MISSING)))
        bucket[key] = value
        if key > bucket.hi:
            bucket.hi = key

    def kv_put_many(self, cf: str, prefix: bytes, keys: list[bytes], values: list[bytes]) -> None:
        """``kv_put`` of distinct ``keys`` in increasing order (the caller keeps both lists as they are).

        Keys the bucket does not hold yet (a snapshot's chunks cover disjoint ranges, so
        that is every chunk of a repo in practice) take one undo entry for all of them,
        not one tuple each; otherwise this falls back to ``kv_put`` per key.
        """
        if not keys:
            return
        bucket = self.kv[cf].get(prefix)
        if bucket is None:
            bucket = self.kv[cf][prefix] = _Bucket()
            self._undo.append(("c", cf, prefix, None, prefix in self.cleared[cf]))
        elif bucket and not bucket.keys().isdisjoint(keys):
            for k, v in zip(keys, values):
                self.kv_put(cf, prefix, k, v)
            return
        self._undo.append(("n", cf, prefix, keys))
        bucket.update(zip(keys, values))
        if keys[-1] > bucket.hi:
            bucket.hi = keys[-1]

    def kv_clear(self, cf: str, prefix: bytes) -> None:
        """Delete every row starting with ``prefix``."""
        self._undo.append(("c", cf, prefix, self.kv[cf].get(prefix), prefix in self.cleared[cf]))
        self.kv[cf][prefix] = _Bucket()
        self.cleared[cf].add(prefix)

    def kv_scan(self, cf: str, prefix: bytes, lo: Optional[bytes] = None,
                hi: Optional[bytes] = None) -> list[tuple[bytes, bytes]]:
        """Rows with ``prefix`` and ``lo < key <= hi`` (bounds optional), in key order."""
        rows: list[tuple[bytes, bytes]] = []
        if prefix not in self.cleared[cf]:
            it = self.db.cf(cf).iter()
            it.seek(lo if lo is not None else prefix)
            while it.valid():
                k = it.key()
                if not k.startswith(prefix) or (hi is not None and k > hi):
                    break
                if lo is None or k != lo:
                    rows.append((k, it.value()))
                it.next()
        bucket = self.kv[cf].get(prefix)
        if bucket and (lo is None or bucket.hi > lo):
            merged = dict(rows)
            for k, v in bucket.items():
                if (lo is None or k > lo) and (hi is None or k <= hi):
                    if v is None:
                        merged.pop(k, None)
                    else:
                        merged[k] = v
            rows = sorted(merged.items())
        return rows

    def emit(self, shard: int, did: str, flags: int, kind: Optional[str], body: bytes) -> None:
        """Queue an outbox row; ``kind`` None = ``body`` is the whole payload (internal rows)."""
        self.events.append((shard, did, flags, kind, body))

    def emit_many(self, shard: int, did: str, flags: int, kind: str, bodies: list[bytes]) -> None:
        """``emit`` of many bodies of one DID, shard, flags and kind."""
        self.events.extend(zip(repeat(shard), repeat(did), repeat(flags), repeat(kind), bodies))

    def count(self, name: str, shard: int, delta: int) -> None:
        if delta:
            k = (name, shard)
            old = self.counters.get(k, _MISSING)
            self._undo.append(("t", k, old))
            self.counters[k] = (0 if old is _MISSING else old) + delta


# --- the operator ------------------------------------------------------------------------

#: Valid DIDs whose shard RepoLogic remembers (the dict is dropped whole when full).
_SHARDS_KNOWN = 16384
# meta keys by (counter name, shard) / shard, built once
_COUNTER_KEYS: dict[tuple[str, int], bytes] = {}
_CMD_KEYS: dict[int, bytes] = {}
_FH_KEYS: dict[int, bytes] = {}
_OUTBOX_VEC = "outbox counts"  # in _meta_known: every shard's outbox counter, as last written

class RepoLogic:
    """Applies batches of flow items to repo state, the record index and the outbox.

    ``verify_commit`` / ``verify_sync`` default to ``operators.verify``'s adapters of
    ``protocol.commit``; tests inject their own. ``clock`` returns unix seconds, ``rand``
    a float in [0, 1) (backoff jitter). ``on_fetch_queued`` / ``on_events`` are called after
    a WriteBatch that queued a fetch / wrote outbox rows.
    """

    def __init__(
        self,
        db: Database,
        cfg: Config,
        ids: IdAllocator,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        verify_commit: VerifyCommit | None = None,
        verify_sync: VerifySync | None = None,
        on_fetch_queued: Callable[[], None] | None = None,
        on_events: Callable[[], None] | None = None,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.ids = ids
        self.clock = clock
        self.rand = rand
        self.verify_commit = verify_commit or default_verify_commit
        self.verify_sync = verify_sync or default_verify_sync
        # the pool's verdicts come from default_verify_commit: usable only when that is ours
        self._pre_ok = self.verify_commit is default_verify_commit
        self.on_fetch_queued = on_fetch_queued
        self.on_events = on_events
        self.max_buffered = max_buffered
        self.shards = cfg.shards
        self.filter = CollectionFilter(cfg.collection_filters)
        self.full_network = cfg.full_network
        self.signal = cfg.signal_collection
        self.resync_deletes = cfg.resync_deletes
        self.stats: Counter[str] = Counter()
        self._now = 0.0
        # meta values RepoLogic wrote (counters by (name, shard), marks by key); see _write
        self._meta_known = _meta_known(db)
        #: repo states as last written (shared per ``db``); clear it after writing ``repos``
        #: behind RepoLogic's back (tests)
        self.states = _state_cache(db)
        self._shards_of: dict[str, int] = {}  # shards of valid DIDs seen lately (a regex and a crc32 each)
        self._handlers: dict[type, Callable[[_Batch, Any, int], Optional[Rejected]]] = {
            FirehoseCommit: self._on_commit,
            FirehoseSync: self._on_sync,
            FirehoseIdentity: self._on_identity,
            FirehoseAccount: self._on_account,
            FetchStarted: self._on_fetch_started,
            SnapshotChunk: self._on_chunk,
            FetchFailed: self._on_fetch_failed,
            IdentityRefreshed: self._on_identity_refreshed,
            AddRepo: self._on_add,
            RemoveRepo: self._on_remove,
        }

    # --- entry point --------------------------------------------------------------------

    def process(self, items: Iterable[Item]) -> list[Rejected]:
        """Apply ``items`` in order; write one WriteBatch; return the rejections."""
        self._now = self.clock()
        b = _Batch(self.db, self.states)
        rejected: list[Rejected] = []
        shards_of = self._shards_of
        for item in items:
            source = _SOURCES.get(type(item), "unknown")
            did = getattr(item, "did", None)
            handler = self._handlers.get(type(item))
            if handler is None:
                rejected.append(Rejected(str(did or "")[:300], source, "unknown_item", type(item).__name__))
                continue
            shard = shards_of.get(did, -1) if did.__class__ is str else -1
            if shard < 0 and valid_did(did):
                shard = shard_of(did, self.shards)
                if len(shards_of) >= _SHARDS_KNOWN:
                    shards_of.clear()
                shards_of[did] = shard
            if shard < 0:
                rejected.append(Rejected(str(did)[:300], source, "bad_did"))
            else:
                mark = b.mark()
                try:
                    r = handler(b, item, shard)
                except StoreError:
                    raise
                except Exception as e:  # a bug or input we did not foresee: never half-apply
                    if type(e) is Exception:  # rocksdict reports RocksDB failures as bare Exception
                        raise StoreError(f"RocksDB read failed in {self.db.path}: {e}") from e
                    b.rollback(mark)
                    log.exception("item failed; rolled back", extra={"did": did, "source": source})
                    r = Rejected(did, source, "internal_error", f"{type(e).__name__}: {e}")
                if r is not None:
                    rejected.append(r)
            if type(item) in FIREHOSE_ITEMS and isinstance(did, str) and isinstance(item.seq, int):
                s = shard
                if s < 0:  # a bad DID: still done with (the firehose cursor may pass it)
                    try:
                        s = shard_of(did, self.shards)
                    except Exception:  # not encodable: the firehose side skipped it too
                        s = -1
                if s >= 0 and item.seq > b.fh.get(s, 0):
                    b.fh[s] = item.seq
            if isinstance(item, (AddRepo, RemoveRepo)) and isinstance(item.seq, int) and item.seq > 0:
                try:
                    s = shard_of(did, self.shards) if isinstance(did, str) else 0
                except Exception:
                    s = 0
                if item.seq > b.cmd.get(s, 0):
                    b.cmd[s] = item.seq
        self._write(b)
        return rejected

    # --- writing ------------------------------------------------------------------------

    def _write(self, b: _Batch) -> None:
        db = self.db
        wb = db.batch()
        h_repos = db.handle("repos")
        for did, st in b.states.items():
            if st is None:
                wb.delete(did.encode(), h_repos)
            else:
                wb.put(did.encode(), st.to_json(), h_repos)
        for cf in _KV_CFS:
            h = db.handle(cf)
            for prefix in b.cleared[cf]:
                _clear_prefix(wb, db.cf(cf), prefix, h)
            for bucket in b.kv[cf].values():
                if len(bucket) > 8 and None not in bucket.values():  # a snapshot's rows: puts only
                    _drain(map(wb.put, bucket.keys(), bucket.values(), repeat(h)))
                    continue
                for k, v in bucket.items():
                    if v is None:
                        wb.delete(k, h)
                    else:
                        wb.put(k, v, h)
        if b.events:
            h_out = db.handle("outbox")
            eid = self.ids.take(len(b.events))
            put = wb.put
            okey = outbox_key
            ldid, lflags, lkind, head, mid = None, -1, None, b"", b""
            per_shard: dict[int, int] = {}
            for eid, (shard, did, flags, kind, body) in zip(count(eid), b.events):
                if kind is None:
                    row = encode_outbox_row(did, flags, body)
                else:  # one format op per row: flags|did|\0 + {"id":N,"type":kind,kind:body}
                    if did is not ldid or flags != lflags or kind != lkind:
                        ldid, lflags, lkind = did, flags, kind
                        head, mid = outbox_row_head(did, flags) + ID_HEAD, kind_mid(kind)
                    row = b"%b%d%b%b}" % (head, eid, mid, body)
                put(okey(shard, eid), row, h_out)
                per_shard[shard] = per_shard.get(shard, 0) + 1
            for shard, n in per_shard.items():
                b.count("outbox", shard, n)
        meta = db.cf("meta")
        h_meta = db.handle("meta")
        # Counters and marks: RepoLogic is their only writer, so the values it wrote last are
        # remembered (a RocksDB read per shard and counter per activation otherwise).
        known = self._meta_known
        written: dict = {}
        put = wb.put
        for ck, delta in b.counters.items():
            key = _COUNTER_KEYS.get(ck) or _COUNTER_KEYS.setdefault(ck, meta_counter(*ck))
            cur = known.get(ck)
            if cur is None:
                cur = decode_counter(meta.get(key))
            written[ck] = new = max(0, cur + delta)
            put(key, pack_u64(new), h_meta)
        # highest control / firehose seq applied per shard: never moves back
        for marks, keys, key_of in ((b.cmd, _CMD_KEYS, meta_cmd_applied), (b.fh, _FH_KEYS, meta_firehose_applied)):
            for shard, seq in marks.items():
                key = keys.get(shard) or keys.setdefault(shard, key_of(shard))
                cur = known.get(key)
                if cur is None:
                    cur = decode_counter(meta.get(key))
                if cur < seq:
                    put(key, pack_u64(seq), h_meta)
                    cur = seq
                written[key] = cur
        vec = None
        if b.events:  # the outbox counters of its shards changed
            vec = self._outbox_counts(meta, written)
            put(META_OUTBOX_COUNTS, pack_counts(vec), h_meta)
        if wb.len():
            db.write(wb)
        known.update(written)  # only once durable: a failed write leaves them to be read again
        if vec is not None:
            known[_OUTBOX_VEC] = vec
        self.states.written(b.states)
        if b.fetch_queued and self.on_fetch_queued:
            self.on_fetch_queued()
        if b.events and self.on_events:
            self.on_events()

    def _outbox_counts(self, meta: Any, written: dict) -> list[int]:
        """Every shard's outbox counter as this batch leaves it (``META_OUTBOX_COUNTS``): the
        vector written last, with this batch's shards replaced; read once (the shards this
        logic has not written are read from their counters)."""
        known = self._meta_known
        vec = known.get(_OUTBOX_VEC)
        if vec is None or len(vec) != self.shards:
            keys = [("outbox", s) for s in range(self.shards)]
            missing = [k for k in keys if k not in known]
            if missing:
                for k, raw in zip(missing, meta.get([meta_counter(*k) for k in missing])):
                    known[k] = unpack_u64(raw) if raw else 0
            vec = [known[k] for k in keys]
        vec = vec.copy()
        for ck, v in written.items():
            if ck.__class__ is tuple and ck[0] == "outbox":
                vec[ck[1]] = v
        return vec

    # --- shared steps -------------------------------------------------------------------

    def _track(self, b: _Batch, did: str, shard: int) -> None:
        """Start tracking ``did``: pending, with a snapshot request."""
        st = RepoState()
        self._request_snapshot(b, did, st, PRIO_PENDING, self._now)
        b.put_state(did, st)
        b.count("repos", shard, 1)
        self.stats["tracked"] += 1

    def _request_snapshot(self, b: _Batch, did: str, st: RepoState, prio: int, not_before: float) -> None:
        if st.fetch_key:
            return
        key = fetch_key(prio, int(not_before), did)
        b.kv_put("fetch_q", _NOPREFIX, key, orjson.dumps({"kind": "repo", "did": did, "n": time.time_ns()}))
        st.fetch_key = key.hex()
        b.fetch_queued = True

    def _desync(self, b: _Batch, did: str, st: RepoState) -> None:
        st.state = DESYNCHRONIZED
        self._request_snapshot(b, did, st, PRIO_DESYNC, self._now)
        self.stats["desynchronized"] += 1

    def _remove(self, b: _Batch, did: str, shard: int, st: RepoState) -> None:
        prefix = did_prefix(did)
        b.kv_clear("records", prefix)
        b.kv_clear("resync_buf", prefix)
        for hexkey in (st.fetch_key, st.ident_key):
            if hexkey:
                b.kv_put("fetch_q", _NOPREFIX, bytes.fromhex(hexkey), None)
        b.count("records", shard, -st.records)
        b.count("resync_buf", shard, -st.buffered)
        b.count("repos", shard, -1)
        b.put_state(did, None)

    def _apply_identity(self, b: _Batch, did: str, shard: int, st: RepoState, ident: ResolvedIdentity) -> None:
        handle = ident.handle or INVALID_HANDLE
        if handle != st.handle:
            status = st.status if st.status in _STATUSES else "active"
            b.emit(shard, did, FLAG_IDENTITY, "identity",
                   identity_body(did=did, handle=handle, is_active=status == "active", status=status))
            st.handle = handle
        st.signing_key = ident.signing_key or ""
        st.pds = ident.pds or ""

    def _apply_commit(self, b: _Batch, did: str, shard: int, st: RepoState, rev: str, data_cid: str,
                      ops: list[CommitOp]) -> None:
        """Tap's AddCommit: index + one live event per op + rev/prev_data, zero ops included."""
        prefix = did_prefix(did)
        for op in ops:
            key = record_key(did, op.path)
            existed = b.kv_get("records", prefix, key) is not None
            if op.action == "delete":
                if existed:
                    b.kv_put("records", prefix, key, None)
                    st.records -= 1
                    b.count("records", shard, -1)
                body = record_body(live=True, did=did, rev=rev, collection=op.collection, rkey=op.rkey,
                                   action="delete")
            else:
                b.kv_put("records", prefix, key, op.cid_raw or cid_from_str(op.cid or ""))
                if not existed:
                    st.records += 1
                    b.count("records", shard, 1)
                body = record_body(live=True, did=did, rev=rev, collection=op.collection, rkey=op.rkey,
                                   action=op.action, cid=op.cid, record_json=op.record_json)
            b.emit(shard, did, FLAG_LIVE, "record", body)
        st.rev = rev
        st.prev_data = data_cid

    def _buffer(self, b: _Batch, did: str, shard: int, st: RepoState, cc: CheckedCommit) -> Optional[Rejected]:
        if st.buffered >= self.max_buffered:
            return Rejected(did, "commit", "resync_buffer_full", f"{st.buffered} commits buffered")
        ops = []
        for op in cc.ops:
            o: dict[str, Any] = {"collection": op.collection, "rkey": op.rkey, "action": op.action}
            if op.action != "delete":
                if op.cid:
                    o["cid"] = op.cid
                if op.record_json is not None:
                    o["record"] = orjson.Fragment(op.record_json)
            ops.append(o)
        row = orjson.dumps({"did": did, "rev": cc.rev, "data_cid": cc.data_cid,
                            "prev_data": cc.prev_data or "", "ops": ops})
        b.kv_put("resync_buf", did_prefix(did), resync_buf_key(did, st.buf_next), row)
        st.buf_next += 1
        st.buffered += 1
        st.buf_rev = cc.rev
        b.count("resync_buf", shard, 1)
        self.stats["commit_buffered"] += 1
        return None

    def _drain(self, b: _Batch, did: str, shard: int, st: RepoState) -> None:
        """Replay buffered commits that chain onto the snapshot (§9.4, tapflow rules)."""
        prefix = did_prefix(did)
        gap = False
        for key, raw in b.kv_scan("resync_buf", prefix):
            try:
                c = orjson.loads(raw)
                rev, prev, data = c["rev"], c.get("prev_data") or "", c["data_cid"]
                ops = [CommitOp(o["action"], o["collection"], o["rkey"], o.get("cid"),
                                orjson.dumps(o["record"]) if "record" in o else None) for o in c["ops"]]
            except Exception as e:
                log.warning("dropping unreadable buffered commit", extra={"did": did, "error": str(e)})
                ops = None
            if ops is not None and not (st.rev and rev <= st.rev):
                if prev and prev != st.prev_data:
                    gap = True
                    break
                self._apply_commit(b, did, shard, st, rev, data, ops)
                self.stats["commit_drained"] += 1
            b.kv_put("resync_buf", prefix, key, None)
            st.buffered -= 1
            b.count("resync_buf", shard, -1)
        if st.buffered <= 0:
            st.buffered = 0
            st.buf_rev = ""
        if gap:
            self.stats["drain_gap"] += 1
            self._desync(b, did, st)

    # --- handlers -------------------------------------------------------------------------

    def _on_add(self, b: _Batch, item: AddRepo, shard: int) -> Optional[Rejected]:
        if b.get_state(item.did) is None:
            self._track(b, item.did, shard)
        return None

    def _on_remove(self, b: _Batch, item: RemoveRepo, shard: int) -> Optional[Rejected]:
        st = b.get_state(item.did)
        if st is not None:
            self._remove(b, item.did, shard, st)
            self.stats["removed"] += 1
        return None

    def _on_commit(self, b: _Batch, item: FirehoseCommit, shard: int) -> Optional[Rejected]:
        did, body = item.did, item.body
        if not isinstance(body, dict):
            return Rejected(did, "commit", "bad_frame", "body is not a map")
        st = b.get_state(did)
        if st is None:
            SIGNING_KEYS.note(did, "")  # the firehose side stops pre-verifying this DID
            if self.full_network or (self.signal and self.signal in op_collections(body)):
                self._track(b, did, shard)
            self.stats["commit_untracked"] += 1
            return None
        SIGNING_KEYS.note(did, st.signing_key)  # the key the firehose side pre-verifies with
        if st.state == PENDING or (st.state != ACTIVE and not st.signing_key):
            # pending (Tap), or never claimed: nothing to verify with; the snapshot supersedes it
            self.stats["commit_ignored"] += 1
            return None
        rev = body.get("rev")
        if not isinstance(rev, str) or not rev:
            return Rejected(did, "commit", "bad_frame", "missing rev")
        if (st.rev and rev <= st.rev) or (st.state != ACTIVE and st.buf_rev and rev <= st.buf_rev):
            self.stats["commit_replay"] += 1
            return None
        try:
            pre = item.pre
            if (pre is not None and pre.result is not None and self._pre_ok and pre.key == st.signing_key
                    and pre.patterns == self.filter.patterns):
                self.stats["commit_preverified"] += 1
                cc = checked_from_result(pre.result)  # the pool's verdict, with this very key
            else:
                cc = self.verify_commit(body, st.signing_key, self.filter)
            if cc.did != did or cc.rev != rev:
                raise VerifyError(f"commit names {cc.did} rev {cc.rev}, event {did} rev {rev}")
        except ValueError as e:  # VerifyError and the CAR/CBOR/CID errors it may wrap
            if st.state == ACTIVE:
                self._desync(b, did, st)
                b.put_state(did, st)
            return Rejected(did, "commit", "verify_failed", str(e), {"verify": getattr(e, "reason", "invalid")})
        if st.state != ACTIVE:  # resyncing, desynchronized, error: a snapshot is outstanding
            r = self._buffer(b, did, shard, st, cc)
            b.put_state(did, st)
            return r
        if cc.prev_data is not None and cc.prev_data != st.prev_data:
            self._desync(b, did, st)
            r = self._buffer(b, did, shard, st, cc)
            b.put_state(did, st)
            return r
        self._apply_commit(b, did, shard, st, cc.rev, cc.data_cid, cc.ops)
        b.put_state(did, st)
        self.stats["commit_applied"] += 1
        return None

    def _on_sync(self, b: _Batch, item: FirehoseSync, shard: int) -> Optional[Rejected]:
        did, body = item.did, item.body
        if not isinstance(body, dict):
            return Rejected(did, "sync", "bad_frame", "body is not a map")
        st = b.get_state(did)
        if st is None:
            if self.full_network:
                self._track(b, did, shard)
            return None
        if st.state != ACTIVE:
            return None
        rev = body.get("rev")
        if isinstance(rev, str) and st.rev and rev <= st.rev:
            self.stats["sync_replay"] += 1
            return None
        try:
            cs = self.verify_sync(body, st.signing_key)
            if cs.did != did:
                raise VerifyError(f"sync commit names {cs.did}, event {did}")
        except ValueError as e:
            self._desync(b, did, st)
            b.put_state(did, st)
            return Rejected(did, "sync", "verify_failed", str(e), {"verify": getattr(e, "reason", "invalid")})
        if st.rev and cs.rev <= st.rev:
            self.stats["sync_replay"] += 1
            return None
        if cs.data_cid == st.prev_data:
            self.stats["sync_noop"] += 1
            return None
        self._desync(b, did, st)
        b.put_state(did, st)
        return None

    def _on_identity(self, b: _Batch, item: FirehoseIdentity, shard: int) -> Optional[Rejected]:
        did = item.did
        st = b.get_state(did)
        if st is None:
            if self.full_network:
                self._track(b, did, shard)
            return None
        key = fetch_key(PRIO_IDENTITY, int(self._now), did)
        if st.ident_key and st.ident_key != key.hex():
            b.kv_put("fetch_q", _NOPREFIX, bytes.fromhex(st.ident_key), None)
        b.kv_put("fetch_q", _NOPREFIX, key, orjson.dumps({"kind": "identity", "did": did, "n": time.time_ns()}))
        st.ident_key = key.hex()
        b.fetch_queued = True
        b.put_state(did, st)
        return None

    def _on_identity_refreshed(self, b: _Batch, item: IdentityRefreshed, shard: int) -> Optional[Rejected]:
        did = item.did
        fk = bytes(item.fetch_key or b"")
        if fk:
            b.kv_put("fetch_q", _NOPREFIX, fk, None)
        st = b.get_state(did)
        if st is None:
            return None
        if st.ident_key and st.ident_key == fk.hex():
            st.ident_key = ""
        if item.identity is None:
            b.put_state(did, st)
            return Rejected(did, "identity", "not_found" if item.not_found else "resolve_failed", item.error)
        self._apply_identity(b, did, shard, st, item.identity)
        b.put_state(did, st)
        return None

    def _on_account(self, b: _Batch, item: FirehoseAccount, shard: int) -> Optional[Rejected]:
        did = item.did
        st = b.get_state(did)
        if st is None:
            if self.full_network and item.active is True:
                self._track(b, did, shard)
            return None
        if item.active is True:
            new = "active"
        elif item.status in ACCOUNT_STATUS_CHANGES:
            new = item.status
        else:  # throttled, desynchronized, missing: no-op
            return None
        if new == st.status:
            return None
        b.emit(shard, did, FLAG_IDENTITY, "identity",
               identity_body(did=did, handle=st.handle or INVALID_HANDLE, is_active=bool(item.active), status=new))
        if new == "deleted":
            paths = [record_path(k) for k, _ in b.kv_scan("records", did_prefix(did))]
            for i in range(0, len(paths), DELETED_PATHS_PER_ROW):
                payload = orjson.dumps({"did": did, "deleted_paths": paths[i:i + DELETED_PATHS_PER_ROW]})
                b.emit(shard, did, FLAG_INTERNAL, None, payload)
            self._remove(b, did, shard, st)
            self.stats["account_deleted"] += 1
        else:
            st.status = new
            b.put_state(did, st)
        return None

    def _on_fetch_started(self, b: _Batch, item: FetchStarted, shard: int) -> Optional[Rejected]:
        """Tap's claim: the snapshot is being downloaded; buffer live commits from now on."""
        did = item.did
        fk = bytes(item.fetch_key or b"")
        st = b.get_state(did)
        if st is None or not fk or st.fetch_key != fk.hex():
            # removed meanwhile, or an older request: its answer will be dropped as stale too
            self.stats["fetch_started_stale"] += 1
            return None
        st.state = RESYNCING
        st.snap_pos = ""  # a new download: whatever an earlier attempt merged restarts with its first chunk
        if item.identity is not None:
            # Tap refreshes the identity before getRepo: the identity event (if the handle
            # changed) comes now; the first chunk carries the same identity and emits nothing
            self._apply_identity(b, did, shard, st, item.identity)
        b.put_state(did, st)
        self.stats["fetch_started"] += 1
        return None

    def _on_chunk(self, b: _Batch, item: SnapshotChunk, shard: int) -> Optional[Rejected]:
        did = item.did
        fk = bytes(item.fetch_key or b"")
        st = b.get_state(did)
        if st is None:  # removed while the fetch was in flight
            self.stats["snapshot_untracked"] += 1
            return None
        if not fk or st.fetch_key != fk.hex():
            if fk and fk.hex() != st.ident_key:
                b.kv_put("fetch_q", _NOPREFIX, fk, None)  # an orphan request: never fetch it again
            return Rejected(did, "snapshot", "stale_fetch", f"chunk for fetch {fk.hex()}, outstanding {st.fetch_key!r}")
        if item.first:
            st.state = RESYNCING
            st.snap_pos = ""
            if item.identity is not None:
                self._apply_identity(b, did, shard, st, item.identity)
        elif st.state != RESYNCING:
            return Rejected(did, "snapshot", "chunk_out_of_sequence", "a chunk without its first chunk")
        self._merge_chunk(b, did, shard, st, item)
        if item.last:
            st.state = ACTIVE
            st.rev = item.rev
            st.prev_data = item.data_cid
            st.error = ""
            st.retries = 0
            st.retry_after = 0
            st.snap_pos = ""
            st.fetch_key = ""
            b.kv_put("fetch_q", _NOPREFIX, fk, None)
            self.stats["resync_completed"] += 1
            self._drain(b, did, shard, st)
        b.put_state(did, st)
        return None

    def _merge_chunk(self, b: _Batch, did: str, shard: int, st: RepoState, item: SnapshotChunk) -> None:
        """Diff one chunk against the record index over (snap_pos, chunk end].

        Keys, CIDs and event bodies arrive ready (``protocol.snapshot``): a record the index
        lacks costs a dict entry and a list entry, with no per-record Python work; when the
        index has no rows in the chunk's range (a first sync) the whole chunk goes in at once.
        """
        keys, cids, bodies = item.unpack()
        prefix = did_prefix(did)
        plen = len(prefix)
        n = len(keys)
        if n and not (len(cids) == n == len(bodies) and keys[0].startswith(prefix)
                      and keys[-1].startswith(prefix) and _increasing(keys)):
            # sorted keys whose first and last have the prefix all have it
            raise ValueError("malformed snapshot chunk (keys out of order or of another repo)")
        lo = record_key(did, st.snap_pos) if st.snap_pos else None
        if lo is not None and n and keys[0] <= lo:  # merged by earlier chunks
            i = bisect_right(keys, lo)
            keys, cids, bodies = keys[i:], cids[i:], bodies[i:]
            n = len(keys)
        if item.last:
            hi = None
        elif n:
            hi = keys[-1]
        else:
            return
        keep = self.filter
        stored = b.kv_scan("records", prefix, lo, hi)
        if not stored:  # nothing to diff against: every record is a create
            if n and not keep.matches_all:  # BackfillSource filtered already; a cheap guard
                sel = [i for i, k in enumerate(keys) if keep(k[plen:k.index(b"/", plen)].decode())]
                if len(sel) != n:
                    keys, cids, bodies = [keys[i] for i in sel], [cids[i] for i in sel], [bodies[i] for i in sel]
                    n = len(keys)
            b.kv_put_many("records", prefix, keys, cids)
            b.emit_many(shard, did, 0, "record", bodies)
            delta = n
        else:
            delta = self._diff(b, did, shard, prefix, keys, cids, bodies, stored, keep, item.rev)
        st.records += delta
        b.count("records", shard, delta)
        if hi is not None:
            st.snap_pos = hi[plen:].decode()

    def _diff(self, b: _Batch, did: str, shard: int, prefix: bytes, keys: list[bytes], cids: list[bytes],
              bodies: list[bytes], stored: list[tuple[bytes, bytes]], keep: CollectionFilter, rev: str) -> int:
        """Merge sorted snapshot records with sorted index rows; returns the index size change."""
        plen = len(prefix)
        delta = 0
        i = j = 0
        n, m = len(keys), len(stored)
        kv_put, emit = b.kv_put, b.emit
        every = keep.matches_all
        while i < n or j < m:
            k = keys[i] if i < n else None
            sk = stored[j][0] if j < m else None
            if sk is None or (k is not None and k < sk):  # only in the snapshot
                if every or keep(k[plen:k.index(b"/", plen)].decode()):
                    kv_put("records", prefix, k, cids[i])
                    emit(shard, did, 0, "record", bodies[i])
                    delta += 1
                i += 1
            elif k is None or sk < k:  # only in the index: vanished
                delta += self._snap_vanished(b, did, shard, prefix, sk, sk[plen:].decode(), keep, rev)
                j += 1
            else:  # a filtered collection's row stays as it is
                if stored[j][1] != cids[i] and (every or keep(k[plen:k.index(b"/", plen)].decode())):
                    # an unreadable index row differs too: overwritten
                    kv_put("records", prefix, k, cids[i])
                    emit(shard, did, 0, "record", bodies[i].replace(CREATE_ACTION, UPDATE_ACTION, 1))
                i += 1
                j += 1
        return delta

    def _snap_vanished(self, b: _Batch, did: str, shard: int, prefix: bytes, key: bytes, path: str,
                       keep: CollectionFilter, rev: str) -> int:
        """An index row the snapshot no longer has; returns the index size change."""
        if not self.resync_deletes:
            return 0  # Tap: stale rows stay, nobody is told
        collection, _, rkey = path.partition("/")
        b.kv_put("records", prefix, key, None)
        if keep(collection):
            b.emit(shard, did, 0, "record", record_body(live=False, did=did, rev=rev, collection=collection,
                                                       rkey=rkey, action="delete"))
        return -1

    def _on_fetch_failed(self, b: _Batch, item: FetchFailed, shard: int) -> Optional[Rejected]:
        did = item.did
        fk = bytes(item.fetch_key or b"")
        if fk:
            b.kv_put("fetch_q", _NOPREFIX, fk, None)  # this request is answered
        st = b.get_state(did)
        if st is None:  # removed meanwhile (Tap crashes here, §15.9)
            return None
        if fk and fk.hex() == st.ident_key:
            st.ident_key = ""
            b.put_state(did, st)
            return Rejected(did, "identity", "resolve_failed", item.error)
        if not fk or fk.hex() != st.fetch_key:
            return Rejected(did, "fetch", "stale_fetch", f"failure of fetch {fk.hex()}, outstanding {st.fetch_key!r}")
        c = st.retries
        st.retries = c + 1
        st.retry_after = int(self._now + retry_backoff(c, self.rand()))
        if item.rate_limited:
            st.state, st.error, prio = DESYNCHRONIZED, "", PRIO_DESYNC
        else:
            st.state, st.error, prio = ERROR, item.error or "unknown error", PRIO_ERROR
        st.snap_pos = ""
        st.fetch_key = ""
        self._request_snapshot(b, did, st, prio, st.retry_after)
        b.put_state(did, st)
        self.stats["resync_failed"] += 1
        return None


_STATUSES = frozenset({"active", "takendown", "suspended", "deactivated", "deleted"})

_SOURCES = {
    FirehoseCommit: "commit",
    FirehoseSync: "sync",
    FirehoseIdentity: "identity",
    FirehoseAccount: "account",
    FetchStarted: "fetch",
    SnapshotChunk: "snapshot",
    FetchFailed: "fetch",
    IdentityRefreshed: "identity_refresh",
    AddRepo: "control",
    RemoveRepo: "control",
}


# --- bytewax ------------------------------------------------------------------------------

_ids_lock = threading.Lock()
_ids: dict[str, IdAllocator] = {}
_known: dict[int, tuple[weakref.ref, dict, StateCache]] = {}


def _shared(db: Database) -> tuple[weakref.ref, dict, StateCache]:
    with _ids_lock:
        ent = _known.get(id(db))
        if ent is None or ent[0]() is not db:
            ent = _known[id(db)] = (weakref.ref(db), {}, StateCache())
        return ent


def _meta_known(db: Database) -> dict:
    """The counters and marks RepoLogic wrote through ``db``, shared by every RepoLogic on that
    handle (several instances, as a key per shard makes, must see each other's writes: each
    writes every shard's outbox counter again in ``META_OUTBOX_COUNTS``). RepoLogic is the only
    writer of these keys, so what it wrote last is what the database holds."""
    return _shared(db)[1]


def _state_cache(db: Database) -> StateCache:
    """The repo states RepoLogic wrote through ``db``, shared the same way (``StateCache``)."""
    return _shared(db)[2]


def shared_id_allocator(db: Database) -> IdAllocator:
    """The one IdAllocator of this process for ``db`` (two would hand out the same ids)."""
    with _ids_lock:
        key = str(db.path)
        alloc = _ids.get(key)
        if alloc is None:
            alloc = _ids[key] = IdAllocator(db)
        return alloc


#: Items per ``RepoLogic.process`` call (one WriteBatch each). Under one bytewax key an
#: activation holds everything the sources had: a /repos/add of 50,000 DIDs was one call whose
#: pending states, fetch rows and undo log (~5 KB per DID) raised the flow's RSS by 260 MB for
#: good (Python keeps the freed arenas). A call costs ~110 µs: nothing at this size.
MAX_ITEMS_PER_CALL = 2048


class RepoLogicBatch(StatefulBatchLogic):
    """bytewax adapter: one RepoLogic per key (the flow uses one), retained for the life of the flow."""

    def __init__(self, logic: RepoLogic) -> None:
        self.logic = logic

    def on_batch(self, values: list) -> tuple[list[Rejected], bool]:
        if len(values) <= MAX_ITEMS_PER_CALL:
            return self.logic.process(values), StatefulBatchLogic.RETAIN
        out: list[Rejected] = []
        for i in range(0, len(values), MAX_ITEMS_PER_CALL):
            out.extend(self.logic.process(values[i:i + MAX_ITEMS_PER_CALL]))
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> None:
        return None  # all state is in RocksDB; bytewax recovery is not used


def repo_logic_builder(cfg: Config, db: Database | None = None, ids: IdAllocator | None = None,
                       **kwargs: Any) -> Callable[[Any], RepoLogicBatch]:
    """The ``builder`` for ``op.stateful_batch``; opens the flow database lazily (after any fork)."""

    def build(_resume_state: Any) -> RepoLogicBatch:
        from store.db import open_flow_db

        d = db if db is not None else open_flow_db(cfg.data_dir)
        i = ids if ids is not None else shared_id_allocator(d)
        kwargs.setdefault("on_fetch_queued", FETCH_WAKEUP.set)
        kwargs.setdefault("on_events", OUTBOX_WAKEUP.set)
        return RepoLogicBatch(RepoLogic(d, cfg, i, **kwargs))

    return build
