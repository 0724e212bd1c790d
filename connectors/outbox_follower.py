"""The outbox follower: reads the flow's outbox (a RocksDB secondary) and feeds the targets.

Runs in the delivery child (``connectors.delivery_main``) on its event loop::

    follower = OutboxFollower(cfg, open_flow_db(d, secondary=True), open_delivery_db(d),
                              [lambda on_taken: ChannelTarget(cfg, on_taken)])
    await follower.start(); task = asyncio.create_task(follower.run())

What it does, every few milliseconds:

1. Look whether ``data/flow``'s files changed (``store.db.ChangeWatch``: two ``stat`` calls)
   and ``catch_up`` with the flow's primary only then (or once a second). Rounds follow each
   other every 5 ms while rows come (``STEP_INTERVAL``; the inotify watch is paused then, so a
   busy flow's writes cost no wake-up each); when idle the follower sleeps up to 100 ms and the
   flow's next write wakes it at once (``runtime.dirnotify``, inotify on ``data/flow``), or,
   without inotify, polls every 2-5 ms (an idle round then costs a few µs, not a catch-up).
2. Per shard, read the rows after that shard's cursor, in id order (one writer per shard
   commits in id order, so a cursor per shard never misses a row), and offer the events of
   every shard read in the round to every target in one call. The shard's
   ``count/outbox/<shard>`` counter (written in the same batch as the rows; read all at once
   from RepoLogic's copy ``countvec/outbox`` when present) says how many rows are new, so a
   read never walks into the tombstones that acked and deleted rows leave behind; a bounded
   scan of every shard each second is the safety net. After a restart every row is read
   again: redelivery (invariant 2).
3. Stop reading while ``cfg.outbox_capacity`` events are offered and not yet taken by every
   target, or as many acked events wait for the flow to delete them: memory stays bounded.
4. Events taken by every target are written as one ack batch per flush (every 10 ms or 1000
   keys) into ``acks`` of ``data/delivery`` (``connectors.acks.AckLog``). The flow's
   ControlSource deletes their outbox rows and publishes the number of the last batch it
   applied (``meta`` ``control/ackbatch``); once that is visible here the batch rows are
   deleted and the events forgotten. Keys acked by a previous process whose batches are not
   applied yet are skipped when read again (acked: not delivered twice).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Callable, Sequence

from rocksdict import ReadOptions

from config import Config
from connectors.acks import AckLog
from connectors.targets import AckTracker, DeliveryTarget, TakenCallback, metrics
from store.db import ChangeWatch, Database
from store.layout import (META_OUTBOX_COUNTS, decode_counter, meta_counter, shard_prefix, unpack_counts,
                          unpack_i64s)
from runtime.dirnotify import DirNotify
from store.outbox import OutboxEvent

log = logging.getLogger(__name__)

TargetFactory = Callable[[TakenCallback], DeliveryTarget]

ACK_FLUSH_INTERVAL = 0.010
ACK_FLUSH_KEYS = 1000
SAFETY_SCAN_INTERVAL = 1.0
CATCH_UP_MAX_QUIET = 1.0  # catch up at least this often even if the files look unchanged
POLL_BUSY = 0.002  # first idle sleep without inotify
# At most one step per STEP_INTERVAL: a step's fixed cost (catch-up 0.1-0.3 ms, the shard
# counters, a socket write, the client's ack read) is shared by the rows of 5 ms instead of
# 2 ms; live delivery then adds at most ~5 ms to an event's latency.
STEP_INTERVAL = 0.005
POLL_IDLE_MAX = 0.005  # idle polling without inotify
POLL_IDLE_NOTIFIED = 0.1  # idle sleep when the flow's writes wake the follower
READ_CHUNK = 5000  # rows per pass before yielding to the sockets
# A shard with at least this many new rows is read with an iteration of its own bounded to the
# shard (``Rdict.items``: ~1 us a row less than valid/key/value/next, ~2.4 us more to start),
# fewer with the round's one shared iterator (live: a row or two per shard).
ITEMS_MIN = 8


_from_bytes = int.from_bytes


def event_from_row(key: bytes, row: bytes, shard: int) -> OutboxEvent:
    """``OutboxEvent.from_row`` for a row of a known shard, faster (``_read_shard`` inlines it)."""
    i = row.index(0, 1)
    return OutboxEvent(key, shard, _from_bytes(key[2:10], "big"), row[1:i].decode(), row[0], row[i + 1:])


class OutboxFollower:
    def __init__(self, cfg: Config, flow: Database, delivery: Database, targets: Sequence[TargetFactory],
                 *, safety_scan_interval: float = SAFETY_SCAN_INTERVAL, step_interval: float = STEP_INTERVAL) -> None:
        if not targets:
            raise ValueError("at least one delivery target")
        self._cfg = cfg
        self._flow = flow
        self._delivery = delivery
        self._outbox = flow.cf("outbox")
        self._meta = flow.cf("meta")
        self._acks = AckLog(delivery, flow)
        self._watch = ChangeWatch(flow.path, max_quiet=CATCH_UP_MAX_QUIET)
        self._capacity = cfg.outbox_capacity
        self._shards = cfg.shards
        self.tracker = AckTracker(len(targets), self._completed, self._completed_many)
        self.targets: list[DeliveryTarget] = [make(self.tracker.callback(i)) for i, make in enumerate(targets)]
        # a run of rows goes to a target in one call where it can take one (``offer_many``)
        self._offers = [getattr(t, "offer_many", None) or _offer_each(t) for t in self.targets]
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
        self._last_flush = self._last_scan = self._last_step = time.monotonic()
        self._stopping = False
        self._waiter: asyncio.Future | None = None
        self._idle = False  # sleeping with nothing to do: a flow write or an ack wakes it
        self._notify = DirNotify(flow.path, self._on_flow_write)
        self._idle_max = POLL_IDLE_MAX
        self._safety_interval = safety_scan_interval
        self._busy = step_interval
        self.offered = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the targets and pick up the ack batches left by a previous run."""
        self.tracker.bind_loop(asyncio.get_running_loop())
        if self._notify.start(asyncio.get_running_loop()):
            self._idle_max = POLL_IDLE_NOTIFIED
        self._flow.catch_up()
        self._acks.load()
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
                self._watch.reset()  # the catch-up may not have happened
                n = 0
                idle = 0.5
            if n:
                idle = POLL_BUSY
                self._notify.pause()  # busy: the timer steps, no wake-up per flow write
                await asyncio.sleep(0) if n >= READ_CHUNK else await self._sleep(self._busy)
            else:
                self._idle = True
                self._notify.resume()
                try:  # acks waiting for their flush cap the sleep
                    await self._sleep(min(idle, ACK_FLUSH_INTERVAL) if self._ack_buf else idle)
                finally:
                    self._idle = False
                idle = min(idle * 2, self._idle_max)
                gap = self._busy - (time.monotonic() - self._last_step)
                if gap > 0 and not self._stopping:  # woken early: at most a step per interval, so
                    await asyncio.sleep(gap)  # the flow's writes of the next ms are read together

    async def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._notify.close()
        for t in self.targets:
            try:
                await t.stop()
            except Exception:
                log.exception("stopping target failed", extra={"target": getattr(t, "name", "?")})
        self.flush_acks()

    # --- one step ------------------------------------------------------------------------

    def step(self) -> int:
        """Catch up if the flow wrote, offer new rows, write acks, release ack batches the
        flow has applied. Returns rows offered.

        A catch-up costs 0.1-0.3 ms, so it is skipped when the flow's files did not change, or
        when there is neither room to read nor an ack batch waiting for the flow.
        """
        now = self._last_step = time.monotonic()
        can_read = self._room() > 0
        caught_up = False
        n = 0
        if (can_read or self._acks.waiting) and self._watch.changed():
            self._flow.catch_up()
            caught_up = True
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
        if caught_up and self._acks.waiting and self._acks.release() and self._more:
            self._wake()
        return n

    def _room(self) -> int:
        return min(self._capacity - self.tracker.in_flight, self._capacity - self._acks.waiting, READ_CHUNK)

    def _read(self) -> int:
        room = self._room()
        if room <= 0:
            self._more = True
            return 0
        # A shard without a counter has never had a row (RepoLogic writes both in one batch);
        # should that ever not hold, the bounded scan every second still finds the rows.
        counts = self._counts()
        keys: list[bytes] = []
        events: list[OutboxEvent] = []
        self._more = False
        start = self._rotate
        self._rotate = (self._rotate + 1) % self._shards
        try:
            total = self._read_shards(counts, start, room, keys, events)
        finally:  # rows of shards whose cursor moved are offered even if a later shard failed
            if events:  # every shard's run at once: one call per target, not one per shard
                self.tracker.register_many(keys)
                for offer in self._offers:
                    offer(events)
        self.offered += total
        return total

    def _read_shards(self, counts, start: int, room: int, keys: list[bytes], events: list[OutboxEvent]) -> int:
        total = 0
        shared_it = None
        for j in range(self._shards):
            s = (start + j) % self._shards
            if room <= 0:
                self._more = True
                break
            c = counts[s]
            if s in self._scan or self._seen[s] is None:
                n, at_end = self._read_shard(s, None, room, keys, events)
                if at_end:
                    self._scan.discard(s)
                    self._seen[s] = c
                else:
                    self._more = True
            else:
                want = c - self._seen[s]
                if want <= 0:
                    continue
                if want >= ITEMS_MIN:  # a run: a bounded iteration of its own (see ITEMS_MIN)
                    it = None
                elif shared_it is None:
                    it = shared_it = self._outbox.iter()
                else:
                    it = shared_it
                n, at_end = self._read_shard(s, it, min(want, room), keys, events)
                self._seen[s] += n
                if n < want:
                    if at_end:  # the counter counted rows we cannot see: trust the rows
                        self._seen[s] = c
                    else:
                        self._more = True
            total += n
            room -= n
        return total

    def _counts(self) -> list[int] | tuple[int, ...]:
        """Every shard's ``count/outbox/<shard>`` (0 for a shard that never had a row): from
        RepoLogic's one-key copy of them when it is there, else key by key."""
        vec = self._meta.get(META_OUTBOX_COUNTS)
        if vec is not None and len(vec) == 8 * self._shards:
            return unpack_counts(vec, self._shards)
        raw = self._meta.get(self._counter_keys)
        try:  # the usual case, every counter present: one unpack instead of one call per shard
            return unpack_i64s(b"".join(raw), self._shards)
        except (TypeError, struct.error):
            return [decode_counter(v) for v in raw]

    def _read_shard(self, s: int, it, limit: int, keys: list[bytes], events: list[OutboxEvent]) -> tuple[int, bool]:
        """Append up to ``limit`` rows of shard ``s`` after its cursor to ``keys``/``events``.

        ``it``: the round's shared iterator, or None for an iteration bounded to the shard.
        Returns (rows, reached the shard's end). The shared iterator never steps past the
        ``limit``-th row, so an exact read stops on the last new row instead of walking into
        what follows (the next shards); a bounded iteration steps at most to the shard's end
        (rows after the counted ones are not there yet: deleted rows lie before the cursor). A shard's
        rows come in id order and a DID lives in one shard, so appending shard after shard
        keeps every DID's order; ``_read`` offers the lot together.
        """
        if limit <= 0:
            return 0, False
        prefix = shard_prefix(s)
        cur = self._cursor[s]
        start = cur + b"\x00" if cur is not None else prefix
        first = len(events)
        try:
            if it is None:
                ro = ReadOptions()
                ro.set_iterate_upper_bound(self._bounds[s])
                rows = self._outbox.items(from_key=start, read_opt=ro)
                n, k, at_end = self._scan_items(s, rows, limit, self._acks.skip, keys, events)
            else:
                it.seek(start)
                n, k, at_end = self._scan_rows(s, it, limit, prefix, self._acks.skip, keys, events)
        except BaseException:  # the cursor stays: this shard's rows are read again, offered once
            del keys[first:], events[first:]
            raise
        if n:
            self._cursor[s] = k
        return n, at_end

    @staticmethod
    def _scan_rows(s: int, it, limit: int, prefix: bytes, skip: set, keys: list[bytes],
                   events: list[OutboxEvent]) -> tuple[int, bytes | None, bool]:
        """The row loop of ``_read_shard``: (rows stepped over, last key, reached the end)."""
        n = 0
        k = None
        at_end = True
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            n += 1
            if not skip or k not in skip:  # (in skip: acked before a restart, row not deleted yet)
                row = it.value()  # (event_from_row, inlined: this loop runs once per row)
                i = row.index(0, 1)
                keys.append(k)
                events.append(OutboxEvent(k, s, _from_bytes(k[2:10], "big"), row[1:i].decode(), row[0], row[i + 1:]))
            if n >= limit:
                at_end = False
                break
            it.next()
        return n, k, at_end

    @staticmethod
    def _scan_items(s: int, rows, limit: int, skip: set, keys: list[bytes],
                    events: list[OutboxEvent]) -> tuple[int, bytes | None, bool]:
        """``_scan_rows`` over ``Rdict.items`` bounded to the shard (one call per row, not four)."""
        n = 0
        k = None
        for k, row in rows:
            n += 1
            if not skip or k not in skip:  # (in skip: acked before a restart, row not deleted yet)
                i = row.index(0, 1)
                keys.append(k)
                events.append(OutboxEvent(k, s, _from_bytes(k[2:10], "big"), row[1:i].decode(), row[0], row[i + 1:]))
            if n >= limit:
                return n, k, False
        return n, k, True

    # --- acks ------------------------------------------------------------------------------

    def _completed(self, key: bytes) -> None:
        self._ack_buf.append(key)
        if len(self._ack_buf) >= ACK_FLUSH_KEYS or self._more or self._idle:
            self._wake()

    def _completed_many(self, keys: list[bytes]) -> None:
        self._ack_buf += keys
        if len(self._ack_buf) >= ACK_FLUSH_KEYS or self._more or self._idle:
            self._wake()

    def _on_flow_write(self) -> None:
        if self._idle:
            self._wake()

    def flush_acks(self) -> None:
        """Write completed keys as one ack batch (the flow deletes their outbox rows)."""
        if not self._ack_buf:
            return
        keys, self._ack_buf = self._ack_buf, []
        self._acks.write(keys)
        metrics().events_acked.inc(len(keys))
        self._last_flush = time.monotonic()

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
        """Acked events whose ack batch the flow has not applied yet."""
        return self._acks.waiting


def _offer_each(target: DeliveryTarget) -> Callable[[list[OutboxEvent]], None]:
    offer = target.offer

    def offer_each(events: list[OutboxEvent]) -> None:
        for ev in events:
            offer(ev)

    return offer_each


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
