"""Acks between the two processes: the delivery child writes ack batches, the flow deletes rows.

The delivery child (``AckLog``, driven by ``OutboxFollower``) writes each flush of events that
every target has taken as ONE row of ``data/delivery`` ``acks``: ``ackbatch/<n>`` -> the
10-byte outbox keys (``shard u16 | id u64``) concatenated, ``n`` increasing across restarts
(``dmeta`` ``acks/batch``, written in the same WriteBatch). The flow's ControlSource
(``AckApplier``) reads only the batches after its cursor, deletes their outbox rows, adds the
rows that were actually there to ``count/outbox_acked/0`` and moves its cursor
``control/ackbatch``, all in one WriteBatch of ``data/flow``: a batch seen again after a crash
is either already applied (cursor past it) or not at all, and only rows present are counted.
That cursor is also the answer to the child, which follows ``data/flow`` as a secondary: it
deletes its batch rows up to it and forgets those events (``AckLog.release``)::

    delivery child                              flow (ControlSource, single writer)
    AckLog.write([k1, k2, ...]) -> ackbatch/7 ->  AckApplier.apply(): rows deleted,
                                                  count/outbox_acked/0 += present, cursor = 7
    AckLog.release(): ackbatch/<=7 deleted   <-  meta control/ackbatch = 7

Deletions: a ``delete_range`` per run of consecutive ids of one shard (backfill writes a
repo's events under consecutive ids), a point delete for a key alone. Measured here on
200k-400k rows acked 1,000 at a time: range deletes cost the flow 0.15 µs a key against 1.8
for point deletes; the delivery child's secondary catch-up got cheaper (1.6 vs 2.9 µs a row,
fewer WAL entries to replay) while its reads of new rows got slightly dearer (1.7-2.0 vs 1.5
µs a row); a full scan of the outbox over the deleted region took 13 ms instead of 100 ms.
Counting without reading: the child acks only rows it read, each once (``AckTracker`` completes a
registered key once; keys of batches not yet applied when it starts are skipped, not acked
again), and only the flow's ControlSource deletes outbox rows, in the WriteBatch that moves the
cursor past the batch: so a batch written while this flow process runs names rows that are
all there, and its keys are counted as they are (a live ack cost the flow ~8 µs a key with
the presence read, ~4 without). The presence of each row is read only for the batches that
may name rows already gone: those that existed when this process first looked (written
before a crash or a power loss that may have taken the rows' WAL tail with it, or seen again
after a lost cursor) and those converted from an older version's per-event rows (marked by a
trailing byte, ``LEGACY_MARK``: that version may have deleted the rows). Presence is counted with
a bounded iterator per run (0.6 µs a key, no values copied) and a multi-get for short runs
(1.6 µs a key).

An older version wrote one ``acks`` row per event (the outbox key, 10 bytes): ``AckLog.load``
turns such rows into batches once at start (redelivery is avoided as before; rows the old
flow had already deleted are simply not counted again).
"""

from __future__ import annotations

import collections
import logging

from prometheus_client import Counter
from rocksdict import ReadOptions

from store.db import Database
from store.layout import (
    OUTBOX_ACKED,
    ACKBATCH_PREFIX,
    DMETA_ACK_BATCH,
    META_ACKS_DONE,
    OUTBOX_KEY_LEN,
    ackbatch_key,
    decode_counter,
    meta_counter,
    outbox_key_runs,
    pack_u64,
    parse_ackbatch_key,
    split_outbox_keys,
)

__all__ = ["AckLog", "AckApplier"]

log = logging.getLogger(__name__)

#: Runs shorter than this are checked with point lookups, longer ones with an iterator.
RUN_SCAN_MIN = 4
#: Keys per batch when converting the per-event rows of an older version.
LEGACY_BATCH_KEYS = 10_000
_BATCH_KEY_LEN = len(ACKBATCH_PREFIX) + 8
#: Appended to a batch converted from an older version's per-event rows: its rows may be gone.
LEGACY_MARK = b"\x01"

ACKED_DELETED = Counter("tapflow_outbox_acked_deleted", "outbox rows deleted after every delivery target acked them")


def acks_done(flow: Database) -> int:
    """The highest ack batch the flow has applied (``meta`` ``control/ackbatch``)."""
    return decode_counter(flow.cf("meta").get(META_ACKS_DONE))


class AckLog:
    """The delivery child's side: ack batches written, kept until the flow has applied them.

    ``waiting`` counts the keys of batches the flow has not applied yet (the follower's
    capacity bound counts them); ``skip`` holds the keys a previous process acked whose rows
    may still be in the outbox (not to be delivered again), until their batches are released.
    """

    def __init__(self, delivery: Database, flow: Database) -> None:
        self._db = delivery
        self._flow = flow
        self._cf = delivery.cf("acks")
        self._h = delivery.handle("acks")
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (batch no, keys)
        self._skip_until = 0
        self.waiting = 0
        self.skip: set[bytes] = set()
        self.last = 0

    def load(self) -> int:
        """At start, with ``data/flow`` caught up: pick up the batches the flow has not applied,
        delete those it has, convert per-event rows of an older version. Returns keys waiting."""
        done = acks_done(self._flow)
        last = max(decode_counter(self._db.cf("dmeta").get(DMETA_ACK_BATCH)), done)
        b = self._db.batch()
        legacy: list[bytes] = []
        cleared = 0
        it = self._cf.iter()
        it.seek_to_first()
        while it.valid():
            k = it.key()
            if k.startswith(ACKBATCH_PREFIX) and len(k) == _BATCH_KEY_LEN:
                n = parse_ackbatch_key(k)
                last = max(last, n)
                if n <= done:
                    b.delete(k, self._h)
                    cleared += 1
                else:
                    keys = split_outbox_keys(it.value())
                    self.skip.update(keys)
                    self._pending.append((n, len(keys)))
                    self.waiting += len(keys)
            else:
                if len(k) == OUTBOX_KEY_LEN:
                    legacy.append(k)
                b.delete(k, self._h)
                cleared += 1
            it.next()
        for i in range(0, len(legacy), LEGACY_BATCH_KEYS):
            chunk = legacy[i:i + LEGACY_BATCH_KEYS]
            last += 1
            b.put(ackbatch_key(last), b"".join(chunk) + LEGACY_MARK, self._h)
            self.skip.update(chunk)
            self._pending.append((last, len(chunk)))
            self.waiting += len(chunk)
        b.put(DMETA_ACK_BATCH, pack_u64(last), self._db.handle("dmeta"))
        self._db.write(b)  # conversion and cleanup at once: a crash here leaves the old rows
        self.last = self._skip_until = last
        if self.waiting or cleared:
            log.info("acks from the previous run", extra={"awaiting_delete": self.waiting, "batches": len(self._pending),
                                                          "converted_per_event_rows": len(legacy), "cleared": cleared})
        return self.waiting

    def write(self, keys: list[bytes]) -> int:
        """One batch row for ``keys`` (events every target took); returns its number."""
        n = self.last + 1
        b = self._db.batch()
        b.put(ackbatch_key(n), b"".join(keys), self._h)
        b.put(DMETA_ACK_BATCH, pack_u64(n), self._db.handle("dmeta"))
        self._db.write(b)
        self.last = n
        self._pending.append((n, len(keys)))
        self.waiting += len(keys)
        return n

    def release(self) -> int:
        """Delete the batch rows the flow has applied (call after a catch-up of ``data/flow``);
        returns how many keys were released."""
        if not self._pending:
            return 0
        done = acks_done(self._flow)
        if self._pending[0][0] > done:
            return 0
        b = self._db.batch()
        released = 0
        while self._pending and self._pending[0][0] <= done:
            n, count = self._pending.popleft()
            b.delete(ackbatch_key(n), self._h)
            released += count
        self._db.write(b)
        self.waiting -= released
        if self.skip and (not self._pending or self._pending[0][0] > self._skip_until):
            self.skip.clear()
        return released


def _last_batch(delivery: Database) -> int:
    """The highest ack batch number written so far (row or ``dmeta`` counter)."""
    it = delivery.cf("acks").iter()
    it.seek_for_prev(ACKBATCH_PREFIX + b"\xff" * 8)
    n = parse_ackbatch_key(it.key()) if it.valid() and it.key().startswith(ACKBATCH_PREFIX) \
        and len(it.key()) == _BATCH_KEY_LEN else 0
    return max(n, decode_counter(delivery.cf("dmeta").get(DMETA_ACK_BATCH)))


class AckApplier:
    """The flow's side (ControlSource): applies ack batches after its cursor (see module doc)."""

    def __init__(self, flow: Database, *, max_keys: int = 50_000) -> None:
        self._flow = flow
        meta = flow.cf("meta")
        self.done = decode_counter(meta.get(META_ACKS_DONE))
        self.acked_total = decode_counter(meta.get(meta_counter(OUTBOX_ACKED, 0)))
        self._max_keys = max_keys
        self.more = False  # the last ``apply`` stopped at ``max_keys`` with batches left
        self._check_upto: int | None = None  # batches up to this one existed at the first look
        self.checked = 0  # keys whose rows were looked up (batches that may name rows gone)

    def apply(self, delivery: Database) -> int | None:
        """Apply the batches after the cursor (``delivery`` caught up by the caller), whole
        batches up to about ``max_keys`` keys. Returns rows deleted, None if there was no batch."""
        if self._check_upto is None:
            self._check_upto = _last_batch(delivery)
        it = delivery.cf("acks").iter()
        it.seek(ackbatch_key(self.done + 1))
        read: list[bytes] = []  # batch values written while this process runs: rows the child read
        unsure: list[bytes] = []  # keys of batches that may name rows already deleted
        n = 0
        last = self.done
        while it.valid() and n < self._max_keys:
            k = it.key()
            if not k.startswith(ACKBATCH_PREFIX):
                break
            if len(k) == _BATCH_KEY_LEN:
                last = parse_ackbatch_key(k)
                v = it.value()
                n += len(v) // OUTBOX_KEY_LEN
                if last > self._check_upto and len(v) % OUTBOX_KEY_LEN == 0:
                    read.append(v)
                else:
                    unsure += split_outbox_keys(v)
            it.next()
        self.more = it.valid() and it.key().startswith(ACKBATCH_PREFIX)
        if last == self.done:
            return None
        h = self._flow.handle("outbox")
        b = self._flow.batch()
        present = 0
        keys = split_outbox_keys(b"".join(read)) if read else []
        if unsure and keys:
            seen = set(unsure)
            keys = [k for k in keys if k not in seen]
        runs = outbox_key_runs(keys)
        there = [c for _, _, c in runs]  # rows the child read: all of them are there
        if unsure:
            maybe = outbox_key_runs(unsure)
            self.checked += sum(r[2] for r in maybe)
            runs += maybe
            there += self._present(maybe)
        for (lo, hi, c), m in zip(runs, there):
            if m == 0:
                continue  # nothing there (applied before, or never written): no tombstone
            present += m
            if c == 1:
                b.delete(lo, h)
            else:
                b.delete_range(lo, hi, h)
        total = self.acked_total + present
        mh = self._flow.handle("meta")
        b.put(meta_counter(OUTBOX_ACKED, 0), pack_u64(total), mh)
        b.put(META_ACKS_DONE, pack_u64(last), mh)
        self._flow.write(b)
        self.acked_total, self.done = total, last
        ACKED_DELETED.inc(present)
        return present

    def _present(self, runs: list[tuple[bytes, bytes, int]]) -> list[int]:
        """Rows of each run that are in the outbox."""
        outbox = self._flow.cf("outbox")
        counts = [0] * len(runs)
        short: list[tuple[int, bytes]] = []  # (run index, key)
        for i, (lo, hi, n) in enumerate(runs):
            if n == 1:  # live events: mostly lone keys (each DID's own shard and id)
                short.append((i, lo))
                continue
            if n < RUN_SCAN_MIN:
                first = int.from_bytes(lo, "big")
                short += [(i, (first + j).to_bytes(OUTBOX_KEY_LEN, "big")) for j in range(n)]
                continue
            ro = ReadOptions()
            ro.set_iterate_upper_bound(hi)
            it = outbox.iter(ro)
            it.seek(lo)
            c = 0
            while it.valid():
                c += 1
                it.next()
            counts[i] = c
        if short:
            for (i, _), v in zip(short, outbox.get([k for _, k in short])):
                if v is not None:
                    counts[i] += 1
        return counts
