"""The outbox follower: reads the flow's outbox (a RocksDB secondary) and feeds the targets.

Runs in the delivery child (``connectors.delivery_main``) on its event loop::

    follower = OutboxFollower(cfg, open_flow_db(d, secondary=True), open_delivery_db(d),
                              [lambda on_taken: ChannelTarget(cfg, on_taken)])
    await follower.start(); task = asyncio.create_task(follower.run())

What it does, every few milliseconds:

1. ``catch_up`` with the flow's primary; nothing more if the flow wrote nothing.
2. Per shard, read the rows after that shard's cursor, in id order (one writer per shard
   commits in id order, so a cursor per shard never misses a row), and offer each event to
   every target. The shard's ``count/outbox/<shard>`` counter (written in the same batch as
   the rows) says how many rows are new, so a read never walks into the tombstones that acked
   and deleted rows leave behind; a bounded scan of every shard each second is the safety
   net. After a restart every row is read again: redelivery (invariant 2).
3. Stop reading while ``cfg.outbox_capacity`` events are offered and not yet taken by every
   target, or as many acked rows wait for the flow to delete them: memory stays bounded.
4. Events taken by every target are written to ``acks`` in ``data/delivery`` (batched every
   10 ms or 1000 keys). The flow's ControlSource deletes their outbox rows; once a row is gone
   (seen through the secondary) its ack row is deleted and nothing of the event is kept.

Knowing when the flow is done with an ack row, cheapest first:

- ``meta[control/acks_seqno]`` (u64), if the flow's ControlSource publishes it: the
  ``data/delivery`` sequence number up to which it has processed *every* ack row (written with
  its deletions, after a complete pass over a caught-up snapshot). Whole ack batches are then
  released at once: each batch remembers the delivery sequence number right after its write.
- Counting: ``count/outbox_acked/0`` grows by exactly the outbox rows ControlSource deleted,
  and it deletes only rows named by our ack rows, each once. Its growth since this process
  started, minus the ack rows already released, is the number of waiting keys that are done
  with; when that is all of them (the usual case: ControlSource keeps up), all are released
  without a lookup.
- Otherwise waiting keys are looked up in the outbox, oldest first (a point lookup per event:
  the slow path): when the waiting acks reach half the capacity, until as many gone rows as
  counted are found; and once a second while the count does not move at all (a flow that
  keeps no count).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable, Sequence

from rocksdict import ReadOptions

from config import Config
from connectors.targets import AckTracker, DeliveryTarget, TakenCallback, metrics
from store.db import Database
from store.layout import meta_counter, shard_prefix, unpack_i64, unpack_u64
from store.outbox import OutboxEvent

log = logging.getLogger(__name__)

TargetFactory = Callable[[TakenCallback], DeliveryTarget]

ACK_FLUSH_INTERVAL = 0.010
ACK_FLUSH_KEYS = 1000
GC_INTERVAL = 0.005
GC_FULL_INTERVAL = 1.0
GC_BUDGET = 20_000
SAFETY_SCAN_INTERVAL = 1.0
POLL_BUSY = 0.002
POLL_IDLE_MAX = 0.005
READ_CHUNK = 5000  # rows per pass before yielding to the sockets
META_ACKS_SEQNO = b"control/acks_seqno"


# OutboxEvent is a frozen slots dataclass; filling its slots directly skips the frozen
# __init__ and halves the cost of ``OutboxEvent.from_row`` (same result, see the tests).
_new_event = object.__new__
_set_key, _set_shard, _set_id, _set_did, _set_flags, _set_payload = (
    OutboxEvent.__dict__[f].__set__ for f in ("key", "shard", "id", "did", "flags", "payload"))
_from_bytes = int.from_bytes


def event_from_row(key: bytes, row: bytes, shard: int) -> OutboxEvent:
    """``OutboxEvent.from_row`` for a row of a known shard, faster."""
    i = row.index(0, 1)
    ev = _new_event(OutboxEvent)
    _set_key(ev, key)
    _set_shard(ev, shard)
    _set_id(ev, _from_bytes(key[2:10], "big"))
    _set_did(ev, row[1:i].decode())
    _set_flags(ev, row[0])
    _set_payload(ev, row[i + 1:])
    return ev


def _counter(raw: bytes | None) -> int | None:
    return None if raw is None else unpack_i64(raw)


class OutboxFollower:
    def __init__(self, cfg: Config, flow: Database, delivery: Database, targets: Sequence[TargetFactory],
                 *, safety_scan_interval: float = SAFETY_SCAN_INTERVAL) -> None:
        if not targets:
            raise ValueError("at least one delivery target")
        self._cfg = cfg
        self._flow = flow
        self._delivery = delivery
        self._outbox = flow.cf("outbox")
        self._meta = flow.cf("meta")
        self._acks = delivery.cf("acks")
        self._acks_h = delivery.handle("acks")
        self._capacity = cfg.outbox_capacity
        self._shards = cfg.shards
        self.tracker = AckTracker(len(targets), self._completed)
        self.targets: list[DeliveryTarget] = [make(self.tracker.callback(i)) for i, make in enumerate(targets)]
        # per shard: last key read, and the value of its outbox counter that those reads cover
        self._cursor: list[bytes | None] = [None] * self._shards
        self._seen: list[int | None] = [None] * self._shards
        self._scan: set[int] = set(range(self._shards))  # shards to read with a bounded scan
        self._counter_keys = [meta_counter("outbox", s) for s in range(self._shards)]
        self._bounds = [shard_prefix(s + 1) if s + 1 < 65536 else b"\xff\xff\xff" for s in range(self._shards)]
        self._rotate = 0
        self._last_seq = -1
        self._more = True  # rows may be left unread (capacity, chunk) at the last catch-up
        self._ack_buf: list[bytes] = []
        self._awaiting: dict[bytes, None] = {}  # acked, outbox row not yet seen gone
        self._batches: collections.deque[tuple[int, list[bytes]]] = collections.deque()  # (delivery seqno, keys)
        self._acked_base = 0  # count/outbox_acked/0 at start
        self._released = 0  # ack rows deleted since start (their outbox rows were seen gone)
        self._acked_last = -1
        self._acked_moved = time.monotonic()
        self._last_flush = self._last_gc = self._last_full_gc = self._last_scan = time.monotonic()
        self._stopping = False
        self._waiter: asyncio.Future | None = None
        self._safety_interval = safety_scan_interval
        self.offered = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the targets and pick up ack rows left by a previous run."""
        self.tracker.bind_loop(asyncio.get_running_loop())
        self._flow.catch_up()
        self._acked_base = _counter(self._meta.get(meta_counter("outbox_acked", 0))) or 0
        stale = []
        for k in self._acks.keys():
            if self._outbox.get(k) is None:
                stale.append(k)
            else:
                self._awaiting[k] = None  # acked before the restart: do not deliver again
        if stale:
            b = self._delivery.batch()
            for k in stale:
                b.delete(k, self._acks_h)
            self._delivery.write(b)
        if self._awaiting:
            self._batches.append((self._delivery.db.latest_sequence_number(), list(self._awaiting)))
        if self._awaiting or stale:
            log.info("acks from the previous run", extra={"awaiting_delete": len(self._awaiting), "cleared": len(stale)})
        for t in self.targets:
            await t.start()

    async def run(self) -> None:
        """Follow the outbox until ``stop``."""
        idle = POLL_BUSY
        while not self._stopping:
            try:
                n = self.step()
            except Exception:  # StoreError, or RocksDB's own errors from catch-up and reads
                log.exception("outbox follower step failed; retrying in 0.5 s")
                n = 0
                idle = 0.5
            if n:
                idle = POLL_BUSY
                await asyncio.sleep(0) if n >= READ_CHUNK else await self._sleep(POLL_BUSY)
            else:
                await self._sleep(idle)
                idle = min(idle * 2, POLL_IDLE_MAX)

    async def stop(self) -> None:
        self._stopping = True
        self._wake()
        for t in self.targets:
            try:
                await t.stop()
            except Exception:
                log.exception("stopping target failed", extra={"target": getattr(t, "name", "?")})
        self.flush_acks()

    # --- one step ------------------------------------------------------------------------

    def step(self) -> int:
        """Catch up, offer new rows, write acks, forget deleted rows. Returns rows offered.

        A catch-up costs 0.1-0.3 ms, so it is skipped when there is neither room to read
        nor ack rows to release.
        """
        now = time.monotonic()
        can_read = self._room() > 0
        gc_due = bool(self._awaiting) and now - self._last_gc >= GC_INTERVAL
        n = 0
        if can_read or gc_due:
            self._flow.catch_up()
        if can_read:
            if now - self._last_scan >= self._safety_interval:
                self._scan.update(range(self._shards))
                self._last_scan = now
            seq = self._flow.db.latest_sequence_number()
            if seq != self._last_seq or self._more or self._scan:
                self._last_seq = seq
                n = self._read()
        else:
            self._more = True
        if self._ack_buf and (len(self._ack_buf) >= ACK_FLUSH_KEYS or now - self._last_flush >= ACK_FLUSH_INTERVAL):
            self.flush_acks()
        if gc_due:
            self._gc(now)
        return n

    def _room(self) -> int:
        return min(self._capacity - self.tracker.in_flight, self._capacity - len(self._awaiting), READ_CHUNK)

    def _read(self) -> int:
        room = self._room()
        if room <= 0:
            self._more = True
            return 0
        # A shard without a counter has never had a row (RepoLogic writes both in one batch);
        # should that ever not hold, the bounded scan every second still finds the rows.
        counts = [_counter(v) or 0 for v in self._meta.get(self._counter_keys)]
        shared_it = None
        total = 0
        self._more = False
        start = self._rotate
        self._rotate = (self._rotate + 1) % self._shards
        for j in range(self._shards):
            s = (start + j) % self._shards
            if room <= 0:
                self._more = True
                break
            c = counts[s]
            if s in self._scan or self._seen[s] is None:
                ro = ReadOptions()
                ro.set_iterate_upper_bound(self._bounds[s])
                n, at_end = self._read_shard(s, self._outbox.iter(ro), room)
                if at_end:
                    self._scan.discard(s)
                    self._seen[s] = c
                else:
                    self._more = True
            else:
                want = c - self._seen[s]
                if want <= 0:
                    continue
                if shared_it is None:
                    shared_it = self._outbox.iter()
                n, at_end = self._read_shard(s, shared_it, min(want, room))
                self._seen[s] += n
                if n < want:
                    if at_end:  # the counter counted rows we cannot see: trust the rows
                        self._seen[s] = c
                    else:
                        self._more = True
            total += n
            room -= n
        self.offered += total
        return total

    def _read_shard(self, s: int, it, limit: int) -> tuple[int, bool]:
        """Offer up to ``limit`` rows of shard ``s`` after its cursor.

        Returns (rows, reached the shard's end). Never steps past the ``limit``-th row, so
        an exact read stops on the last new row instead of walking into what follows.
        """
        prefix = shard_prefix(s)
        cur = self._cursor[s]
        it.seek(cur + b"\x00" if cur is not None else prefix)
        awaiting = self._awaiting
        register = self.tracker.register
        targets = self.targets
        n = 0
        while n < limit and it.valid():
            k = it.key()
            if not k.startswith(prefix):
                return n, True
            n += 1
            self._cursor[s] = k
            if k not in awaiting:  # (in awaiting: acked before a restart, row not deleted yet)
                ev = event_from_row(k, it.value(), s)
                register(k)
                for t in targets:
                    t.offer(ev)
            if n < limit:
                it.next()
        return n, n < limit

    # --- acks ------------------------------------------------------------------------------

    def _completed(self, key: bytes) -> None:
        self._ack_buf.append(key)
        if len(self._ack_buf) >= ACK_FLUSH_KEYS or self._more:
            self._wake()

    def flush_acks(self) -> None:
        """Write completed keys to ``acks`` (the flow deletes their outbox rows)."""
        if not self._ack_buf:
            return
        keys, self._ack_buf = self._ack_buf, []
        b = self._delivery.batch()
        for k in keys:
            b.put(k, b"", self._acks_h)
        self._delivery.write(b)
        self._batches.append((self._delivery.db.latest_sequence_number(), keys))
        for k in keys:
            self._awaiting[k] = None
        metrics().events_acked.inc(len(keys))
        self._last_flush = time.monotonic()

    def _gc(self, now: float) -> None:
        """Delete ack rows the flow is done with (outbox rows deleted); forget those events."""
        self._last_gc = now
        raw = self._meta.get(META_ACKS_SEQNO)
        if raw is not None:
            gone = self._gc_batches(unpack_u64(raw))
        else:
            acked = _counter(self._meta.get(meta_counter("outbox_acked", 0))) or 0
            done = acked - self._acked_base - self._released  # deleted by the flow, not released yet
            if acked != self._acked_last:
                self._acked_last, self._acked_moved = acked, now
            if done >= len(self._awaiting):  # every ack row we wrote has been processed
                gone = list(self._awaiting)
                self._awaiting.clear()
                self._batches.clear()
            elif done > 0 and len(self._awaiting) >= self._capacity // 2:
                gone = self._gc_lookup(now, done)  # the flow lags: find the rows it has done
            elif now - self._acked_moved >= GC_FULL_INTERVAL and now - self._last_full_gc >= GC_FULL_INTERVAL:
                gone = self._gc_lookup(now, GC_BUDGET)  # no count kept (or it stalled): look
            else:
                gone = []  # the rest follows in a moment: wait rather than look up
        if gone:
            self._released += len(gone)
            b = self._delivery.batch()
            for k in gone:
                b.delete(k, self._acks_h)
            self._delivery.write(b)
            if self._more:
                self._wake()

    def _gc_batches(self, done_seqno: int) -> list[bytes]:
        """Every ack batch written at or before ``done_seqno`` has been processed by the flow."""
        gone: list[bytes] = []
        batches = self._batches
        while batches and batches[0][0] <= done_seqno:
            for k in batches.popleft()[1]:
                if k in self._awaiting:
                    del self._awaiting[k]
                    gone.append(k)
        return gone

    def _gc_lookup(self, now: float, done: int) -> list[bytes]:
        """Slow path: look waiting keys up in the outbox, oldest first, until the ``done``
        rows the flow deleted are found (bounded)."""
        self._last_full_gc = now
        gone: list[bytes] = []
        still: list[bytes] = []
        get = self._outbox.get
        for i, k in enumerate(self._awaiting):
            if i >= GC_BUDGET or len(gone) >= done:
                break
            (gone if get(k) is None else still).append(k)
        for k in gone:
            del self._awaiting[k]
        for k in still:  # checked and still there: to the back of the line
            del self._awaiting[k]
            self._awaiting[k] = None
        batches = self._batches
        while batches and not any(k in self._awaiting for k in batches[0][1]):
            batches.popleft()
        return gone

    # --- sleeping -------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiter = fut
        h = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            h.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    # --- numbers for /stats and metrics ---------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.tracker.in_flight

    @property
    def awaiting_delete(self) -> int:
        return len(self._awaiting)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
