"""ControlSource: API commands in, acked outbox rows out.

The delivery child owns ``data/delivery``: the HTTP API writes ``/repos/add`` and
``/repos/remove`` into its ``commands`` column family (synced, before answering 200) and
the outbox follower writes ack batches into ``acks`` (``connectors.acks``). This source
follows that database as a RocksDB *secondary* from the flow process and

- emits one ``AddRepo`` / ``RemoveRepo`` per DID of every command after ``control/cursor``
  (the command's ``seq`` carried, so RepoLogic can record ``cmdapplied/<shard>``);
- persists ``control/cursor`` only up to a seq that every shard involved has applied
  (``cmdapplied/<shard> >= seq``), so a crash replays unapplied commands (add is
  idempotent; order per DID is kept because one DID always lands on one shard);
- applies the ack batches after its ack cursor (``connectors.acks.AckApplier``): deletes the
  outbox rows, counts those present in ``count/outbox_acked/0`` and moves ``control/ackbatch``
  in one WriteBatch (single writer); the child reads that cursor to release its batches.

Polling: a catch-up lists and opens files of the delivery DB, so it runs only when
``store.db.ChangeWatch`` sees the delivery DB's files change (or once a second), and the
partition wakes every 5 ms while commands keep coming (20 ms while only ack batches do),
backing off to 50 ms when nothing new arrives (a ``/repos/add`` is picked up within about
50 ms of its write).
A delivery database that does not exist yet (the child starts after the flow) is waited for.

Example (a flow with only this input)::

    from bytewax.dataflow import Dataflow
    import bytewax.operators as op
    from config import load_config
    from connectors.control import ControlSource

    flow = Dataflow("control")
    cmds = op.input("control", flow, ControlSource(load_config()))
    op.inspect("cmd", cmds)

``ControlFollower`` is the same logic without bytewax (``poll()`` returns items).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import Counter, Gauge

from runtime.shutdown import cap_awake, check_stop
from config import Config
from operators.items import AddRepo, RemoveRepo
from connectors.acks import AckApplier
from store.db import ChangeWatch, Database, StoreError, open_delivery_db, open_flow_db, outbox_depth, read_counter
from store.layout import (
    OUTBOX_ACKED,
    decode_counter,
    META_CONTROL_CURSOR,
    command_key,
    meta_cmd_applied,
    pack_u64,
    shard_of,
    unpack_u64,
)

__all__ = ["ControlSource", "ControlFollower", "outbox_depth", "read_counter", "OUTBOX_ACKED"]

_log = logging.getLogger(__name__)

CMD_ITEMS = Counter("tapflow_control_commands", "API repo commands turned into flow items, per DID", ["op"])
#: Seconds between rounds while commands arrive, while only ack batches arrive (no hurry:
#: fewer, larger deletions and bytewax activations), and the most when nothing arrives.
BUSY_INTERVAL = 0.005
ACK_INTERVAL = 0.02
IDLE_MAX = 0.05

CONTROL_CURSOR = Gauge("tapflow_control_cursor", "highest API command seq applied by every shard involved",
                       multiprocess_mode="livemax")


class DepthGauge:
    """``outbox_depth`` re-read at most every ``interval`` seconds (cheap to call per frame)."""

    def __init__(self, db: Database, interval: float = 0.1) -> None:
        self._db = db
        self._interval = interval
        self._at = 0.0
        self._value = 0

    def value(self) -> int:
        now = time.monotonic()
        if now - self._at >= self._interval:
            try:
                self._value = outbox_depth(self._db)
            except Exception:
                _log.exception("reading outbox depth failed")
            self._at = now
        return self._value


class ControlFollower:
    """Commands -> items and acks -> outbox deletions, without bytewax (see module doc)."""

    def __init__(self, cfg: Config, flow_db: Database | None = None, *,
                 max_ack_keys: int = 50_000, max_items: int = 10_000) -> None:
        self.cfg = cfg
        self.flow = flow_db if flow_db is not None else open_flow_db(cfg.data_dir)
        self.delivery: Database | None = None
        meta = self.flow.cf("meta")
        self.cursor = decode_counter(meta.get(META_CONTROL_CURSOR))
        self.emitted = self.cursor  # highest command seq turned into items
        self._pending: deque[tuple[int, frozenset[int]]] = deque()  # (seq, shards) emitted, not all applied
        self.acks = AckApplier(self.flow, max_keys=max_ack_keys)
        self._max_items = max_items
        self._last_open_try = 0.0
        self._watch: ChangeWatch | None = None
        self._seen_seq = -1  # delivery sequence number of the last round that read commands and acks
        self.got_commands = False  # the last round read new commands
        self.got_acks = False  # the last round applied ack batches
        CONTROL_CURSOR.set(self.cursor)

    # --- delivery database -------------------------------------------------------

    def _delivery(self) -> Database | None:
        if self.delivery is not None:
            return self.delivery
        now = time.monotonic()
        if now - self._last_open_try < 0.1:
            return None
        self._last_open_try = now
        if not (Path(self.cfg.data_dir) / "delivery" / "CURRENT").exists():
            return None
        try:
            self.delivery = open_delivery_db(self.cfg.data_dir, secondary=True)
            self._watch = ChangeWatch(self.delivery.path)
            _log.info("following the delivery database", extra={"path": str(self.delivery.path)})
        except StoreError as e:
            _log.debug("delivery database not ready: %s", e)
            return None
        return self.delivery

    # --- one round ------------------------------------------------------------------

    def poll(self) -> list:
        """Catch up (if the delivery DB changed), return new command items, advance the
        command cursor, apply new ack batches. Sets ``got_commands`` and ``got_acks``."""
        self.got_commands = self.got_acks = False
        d = self._delivery()
        if d is None:
            return []
        if self._watch is None or self._watch.changed():
            try:
                d.catch_up()
            except Exception as e:
                _log.warning("delivery catch-up failed: %s", e)
                if self._watch is not None:
                    self._watch.reset()  # try again next round
                return []
        items: list = []
        seq = d.db.latest_sequence_number()
        if seq != self._seen_seq:
            emitted = self.emitted
            items = self._read_commands(d)
            self.got_commands = self.emitted != emitted
            self.got_acks = self.acks.apply(d) is not None
            if len(items) < self._max_items and not self.acks.more:
                self._seen_seq = seq  # everything up to seq is read (else: the rest next round)
        self.advance_cursor()
        return items

    def _read_commands(self, d: Database) -> list:
        items: list = []
        it = d.cf("commands").iter()
        it.seek(command_key(self.emitted + 1))
        while it.valid() and len(items) < self._max_items:
            seq = unpack_u64(it.key())
            shards: set[int] = set()
            try:
                cmd = orjson.loads(it.value())
                op_name = cmd.get("op")
                dids = cmd.get("dids") or []
                if not isinstance(dids, list):
                    raise ValueError("dids is not a list")
            except Exception as e:
                _log.error("unreadable API command skipped", extra={"seq": seq, "error": str(e)})
                op_name, dids = None, []
            cls = AddRepo if op_name == "add" else RemoveRepo if op_name == "remove" else None
            if cls is None and op_name is not None:
                _log.error("unknown API command skipped", extra={"seq": seq, "op": op_name})
            if cls is not None:
                n = 0
                for did in dict.fromkeys(d for d in dids if isinstance(d, str)):  # de-duplicated, order kept
                    if not did:
                        continue
                    items.append(cls(did=did, seq=seq))
                    shards.add(shard_of(did, self.cfg.shards))
                    n += 1
                if n < len(dids):
                    _log.warning("API command entries that are not DIDs (or repeated) skipped",
                                 extra={"seq": seq, "skipped": len(dids) - n})
                CMD_ITEMS.labels(op_name).inc(n)
            self._pending.append((seq, frozenset(shards)))
            self.emitted = seq
            it.next()
        return items

    def advance_cursor(self) -> int:
        """Move ``control/cursor`` over every leading command all of whose shards applied it."""
        if not self._pending:
            return self.cursor
        meta = self.flow.cf("meta")
        applied: dict[int, int] = {}
        new = self.cursor
        while self._pending:
            seq, shards = self._pending[0]
            ok = True
            for s in shards:
                if s not in applied:
                    applied[s] = decode_counter(meta.get(meta_cmd_applied(s)))
                if applied[s] < seq:
                    ok = False
                    break
            if not ok:
                break
            new = seq
            self._pending.popleft()
        if new > self.cursor:
            b = self.flow.batch()
            b.put(META_CONTROL_CURSOR, pack_u64(new), self.flow.handle("meta"))
            self.flow.write(b)
            self.cursor = new
            CONTROL_CURSOR.set(new)
        return self.cursor

    @property
    def pending_commands(self) -> int:
        return len(self._pending)


class _ControlPartition(StatefulSourcePartition):
    """Wakes every ``interval`` while commands come, every ``ack_interval`` while only acks
    come, and backs off (doubling) up to ``idle_max`` while nothing new comes."""

    def __init__(self, follower: ControlFollower, interval: float, idle_max: float | None = None,
                 ack_interval: float | None = None) -> None:
        self._f = follower
        self._busy = interval
        self._idle_max = max(interval, idle_max if idle_max is not None else IDLE_MAX)
        self._acks = min(self._idle_max, max(interval, ack_interval if ack_interval is not None else ACK_INTERVAL))
        self._wait = interval
        self._awake = datetime.now(timezone.utc)

    def next_batch(self) -> Iterable:
        check_stop()
        commands = acks = False
        try:
            items = self._f.poll()
            commands, acks = self._f.got_commands, self._f.got_acks
        except Exception:
            _log.exception("control source round failed; retrying")
            items = []
        if commands:
            self._wait = self._busy
        elif acks:
            self._wait = self._acks
        else:
            self._wait = min(self._wait * 2, self._idle_max)
        self._awake = datetime.now(timezone.utc) + timedelta(seconds=self._wait)
        return items

    def next_awake(self) -> datetime | None:
        return cap_awake(self._awake)

    def snapshot(self) -> None:
        return None  # the cursor lives in RocksDB meta


class ControlSource(FixedPartitionedSource):
    """One partition following ``data/delivery`` (see module doc): a round every ``interval`` s
    while commands arrive (``ACK_INTERVAL`` while only acks do), backing off to ``idle_max`` s
    when nothing new comes."""

    def __init__(self, cfg: Config, interval: float = BUSY_INTERVAL, flow_db: Database | None = None,
                 idle_max: float = IDLE_MAX) -> None:
        self.cfg = cfg
        self.interval = interval
        self.idle_max = idle_max
        self._flow_db = flow_db

    def list_parts(self) -> list[str]:
        return ["control"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _ControlPartition:
        return _ControlPartition(ControlFollower(self.cfg, self._flow_db), self.interval, self.idle_max)
