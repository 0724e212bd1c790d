"""Kafka delivery target: the outbox into two topics, acked by the broker.

With ``TAP_KAFKA_BOOTSTRAP`` set, the delivery child gives every outbox event to a
``KafkaTarget``, which produces:

``<prefix>events``  (``cleanup.policy=delete``)
    one message per Tap event: key = DID, value = exactly the JSON that /channel sends,
    headers ``type``, ``live``, ``did``, ``collection``, ``action``, ``rev`` (those the
    event has). Keyed by DID, so one repo's events stay in one partition, in order.
``<prefix>records`` (``cleanup.policy=compact``)
    the current state of every record: key = ``at://DID/collection/rkey``, value =
    ``{"cid","rev","record"}`` JSON, a tombstone (null value) on delete. A deleted
    account's records are tombstoned from the internal outbox row RepoLogic writes
    (``FLAG_INTERNAL``, payload ``{"did":..., "deleted_paths":[...]}``); internal rows go
    to the records topic only.

An event is *taken* (``on_taken(key)``, on the event loop thread) only when the broker
acked every message produced for it (acks=all, idempotent producer). Until then it stays
in the outbox, so a crash at any point loses nothing (at-least-once: after a crash or a
producer reset a message can appear twice, never out of order relative to the ones before
it for the same key, apart from the rare case described at ``_block``).

Runnable example (a broker on 127.0.0.1:19092)::

    import asyncio
    from config import Config
    from connectors.kafka import KafkaTarget
    from store.outbox import OutboxEvent
    from store.layout import outbox_key
    from operators.events import record_body, with_id

    async def main():
        taken = []
        t = KafkaTarget(Config(kafka_bootstrap="127.0.0.1:19092"), taken.append)
        await t.start()                       # creates tap.events / tap.records if missing
        body = record_body(live=True, did="did:plc:abc", rev="3l", collection="app.bsky.feed.post",
                           rkey="3k", action="create", cid="bafy...", record_json=b'{"text":"hi"}')
        t.offer(OutboxEvent(outbox_key(0, 1), 0, 1, "did:plc:abc", 1, with_id(1, "record", body)))
        while not taken:
            await asyncio.sleep(0.01)
        await t.stop()

    asyncio.run(main())

Threading: everything runs on the event loop thread. ``offer`` (``offer_many`` for the
outbox follower's runs of rows) hands messages to librdkafka's queue (``produce`` never
blocks; when the queue is full the event waits in a local backlog, in order); a periodic
task calls ``poll(0)``, which runs the delivery callbacks on the loop thread, and then
calls ``on_taken`` for finished events (in one call, the batch form when it has one).

Errors: librdkafka retries by itself. ``message.timeout.ms`` defaults to 0 (infinite) here,
so while the broker is away messages wait in the producer and nothing is taken. A fatal
producer error (idempotence state lost), a timed-out message or any other error that is not
about one message resets the producer: a new producer re-produces every unacked event in
offer order, after creating any topic the cluster lost. The producer never auto-creates a
topic (``allow.auto.create.topics=false``: a metadata request would otherwise create ours
with the broker's defaults). When nothing is acked for ``stall_timeout / 4`` s (at most 2 s)
while events wait, a metadata request checks that both topics exist, and a missing one
(a broker that came back empty) resets at once; when a connected broker acks nothing for
``stall_timeout`` s (``TAP_KAFKA_STALL_TIMEOUT``, 10 s: a replaced cluster that does not
know our producer id, where librdkafka bumps its epoch forever without reporting), the
watchdog resets. A message refused for good (e.g. too large) is counted, logged, and retried
with backoff; it is never taken, and newer events of its DID wait behind it (``_block``),
so per-key order holds.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from prometheus_client import Counter, Gauge

from config import Config
from connectors.targets import taken_many
from store.layout import FLAG_INTERNAL
from store.outbox import OutboxEvent

log = logging.getLogger("tapflow.kafka")

EVENTS = "events"
RECORDS = "records"
# Largest message produced, and max.message.bytes of the topics we create: a Tap event carries
# a whole record as JSON (atproto records stay well below; the firehose frame limit is 5 MiB).
MAX_MESSAGE_BYTES = 10 << 20
HEADER_FIELDS = ("live", "did", "collection", "action", "rev")

# Our defaults; TAP_KAFKA_* settings (cfg.kafka_extra) override them (acks must stay "all":
# see producer_config).
PRODUCER_DEFAULTS: dict[str, object] = {
    "acks": "all",
    "enable.idempotence": True,
    "max.in.flight.requests.per.connection": 5,
    "message.timeout.ms": 0,            # infinite: wait for the broker instead of failing
    "linger.ms": 20,
    "batch.num.messages": 10000,
    "batch.size": 1000000,
    "compression.type": "lz4",
    # room for every message of TAP_OUTBOX_CAPACITY (100k) record events in flight (2 each, counted
    # until their reports are served) and more: past the limit, events take the slower backlog way
    "queue.buffering.max.messages": 500000,
    "queue.buffering.max.kbytes": 262144,
    "partitioner": "murmur2_random",    # Java clients' partitioner: key -> partition is stable and shared
    "statistics.interval.ms": 5000,     # broker states for the stall watchdog
    "message.max.bytes": MAX_MESSAGE_BYTES,
    # never let a metadata request create our topics with the broker's defaults (wrong partition
    # count, a records topic that is not compacted): a missing topic is recreated by us (_reset)
    "allow.auto.create.topics": False,
}
PERMANENT_HINT = {
    KafkaError.MSG_SIZE_TOO_LARGE: "raise the broker's/topic's max.message.bytes or TAP_KAFKA_MESSAGE_MAX_BYTES",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "grant WRITE on the topic to this principal",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "grant IDEMPOTENT_WRITE on the cluster to this principal",
}
# Errors that concern one message only (retried alone, with backoff). Every other error
# resets the producer: the only way to keep per-key order is to re-produce all unacked.
_PER_MESSAGE = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
                KafkaError.INVALID_MSG_SIZE, KafkaError._INVALID_ARG, KafkaError._BAD_MSG,
                KafkaError.INVALID_TIMESTAMP, KafkaError.RECORD_LIST_TOO_LARGE}
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
_AUTH_CODES = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL,
               KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED}

PRODUCED = Counter("tapflow_kafka_produced_messages", "Messages handed to the Kafka producer", ["topic"])
ACKED = Counter("tapflow_kafka_acked_messages", "Messages acked by the Kafka broker (counted when their whole "
                "event is acked)", ["topic"])
FAILED = Counter("tapflow_kafka_failed_messages", "Messages the producer or broker failed (retried)", ["topic"])
BACKLOG = Gauge("tapflow_kafka_backlog_events", "Events waiting for room in the producer queue",
                multiprocess_mode="livesum")
UNACKED = Gauge("tapflow_kafka_unacked_events", "Events offered to Kafka and not yet acked", multiprocess_mode="livesum")


_IDLE_POLL = 0.032  # longest poll interval while events wait for reports


class KafkaSetupError(RuntimeError):
    """Kafka is unusable at start: broker unreachable, topic creation refused, bad settings."""


# --- event -> messages ---------------------------------------------------------------

Msg = tuple  # (topic, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]] | None)

# The hot path: record events as operators.events writes them (orjson, fixed field order), in
# one regex match up to the end of the event. Anything else takes the general path (full JSON
# parse); both give the same messages (tests/test_kafka.py checks odd records on both).
# ``.*,"cid":"`` is greedy: it takes the last ``,"cid":"`` of the payload, the event's own one
# iff the record's keys sit deeper (they would end in ``}}}``); a CID is plain base32/base58.
# The record itself is sliced by position: a group around ``.*`` costs ~1 us per event (it
# stops the regex engine from skipping back to the ``,`` in one go).
_REC = re.compile(rb'\{"id":\d+,"type":"record","record":\{"live":(true|false),"did":"([^"\\]*)",'
                  rb'"rev":"([^"\\]*)","collection":"([^"\\]*)","rkey":"([^"\\]*)",'
                  rb'"action":"(?:(delete)"\}\}|(create|update)","record":.*,"cid":"([A-Za-z0-9]+)"\}\})\Z',
                  re.S)
_H_TYPE_RECORD = ("type", b"record")
_H_LIVE = {b"true": ("live", b"true"), b"false": ("live", b"false")}
_H_ACTION = {a: ("action", a) for a in (b"create", b"update", b"delete")}
_H_DELETE = _H_ACTION[b"delete"]


def _hval(v: object) -> bytes:
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    return str(v).encode()


def map_record(payload: bytes) -> tuple[bytes, list[tuple[str, bytes]], bytes, bytes | None] | None:
    """The fast path of ``build_messages``: (DID, events headers, records key, records value or
    None for a tombstone) of a record event in operators.events' layout, else None."""
    m = _REC.match(payload)
    if m is None:
        return None
    live, did_b, rev, coll, rkey, delete, action, cid = m.groups()
    rk = b"at://%b/%b/%b" % (did_b, coll, rkey)
    if delete is not None:
        return did_b, [_H_TYPE_RECORD, _H_LIVE[live], ("did", did_b), ("collection", coll), _H_DELETE,
                       ("rev", rev)], rk, None
    rec = payload[m.end(7) + 11:m.start(8) - 8]  # between '","record":' and ',"cid":"'
    return (did_b, [_H_TYPE_RECORD, _H_LIVE[live], ("did", did_b), ("collection", coll), _H_ACTION[action],
                    ("rev", rev)], rk, b'{"cid":"%b","rev":"%b","record":%b}' % (cid, rev, rec))


def build_messages(ev: OutboxEvent, events_topic: str, records_topic: str) -> list[Msg]:
    """The Kafka messages for one outbox event, in produce order (the events message first).

    A record event gives 2 (events + records), an identity event 1, an internal row one
    tombstone per deleted path, an unparseable payload 1 (events only, header ``did``).
    """
    if not ev.flags & FLAG_INTERNAL:
        r = map_record(ev.payload)
        if r is not None:
            did_b, headers, rk, value = r
            return [(events_topic, did_b, ev.payload, headers), (records_topic, rk, value, None)]
    return _build_general(ev, events_topic, records_topic)


def _build_general(ev: OutboxEvent, events_topic: str, records_topic: str) -> list[Msg]:
    did = ev.did
    if ev.internal:
        try:
            obj = orjson.loads(ev.payload)
        except orjson.JSONDecodeError:
            log.error("internal outbox row %s of %s is not JSON; skipped", ev.id, did)
            return []
        paths = (obj.get("deleted_paths") or ()) if isinstance(obj, dict) else ()
        pre = f"at://{did}/"
        return [(records_topic, (pre + p).encode(), None, None) for p in paths if isinstance(p, str)]
    try:
        obj = orjson.loads(ev.payload)
    except orjson.JSONDecodeError:
        log.error("outbox event %s of %s is not JSON; produced as is", ev.id, did)
        return [(events_topic, did.encode(), ev.payload, [("did", did.encode())])]
    typ = obj.get("type") if isinstance(obj, dict) else None
    body = obj.get(typ) if isinstance(typ, str) else None
    headers: list[tuple[str, bytes]] = [("type", typ.encode())] if isinstance(typ, str) else []
    if isinstance(body, dict):
        for h in HEADER_FIELDS:
            v = body.get(h)
            if v is not None:
                headers.append((h, _hval(v)))
    if not any(h == "did" for h, _ in headers):
        headers.append(("did", did.encode()))
    msgs: list[Msg] = [(events_topic, did.encode(), ev.payload, headers)]
    if typ == "record" and isinstance(body, dict):
        coll, rkey = body.get("collection"), body.get("rkey")
        if coll and rkey:
            rkey_b = f"at://{did}/{coll}/{rkey}".encode()
            if body.get("action") == "delete":
                msgs.append((records_topic, rkey_b, None, None))
            else:
                val: dict = {}
                if "cid" in body:
                    val["cid"] = body["cid"]
                val["rev"] = body.get("rev")
                if "record" in body:
                    val["record"] = body["record"]
                msgs.append((records_topic, rkey_b, orjson.dumps(val), None))
    return msgs


# --- producer configuration ----------------------------------------------------------

def client_config(cfg: Config) -> dict[str, object]:
    """Connection settings shared by producer and admin: bootstrap + TAP_KAFKA_* passthrough."""
    conf: dict[str, object] = {"bootstrap.servers": cfg.kafka_bootstrap}
    conf.update(dict(cfg.kafka_extra))
    return conf


def producer_config(cfg: Config, overrides: Mapping[str, object] | None = None) -> dict[str, object]:
    """Producer settings: our defaults, then TAP_KAFKA_* passthrough, then ``overrides``.

    acks must stay ``all``; turning idempotence off is allowed (for brokers without it) and
    then forces one request in flight, so per-key order still holds.
    """
    conf: dict[str, object] = dict(PRODUCER_DEFAULTS)
    conf.update(client_config(cfg))
    if overrides:
        conf.update(overrides)
    if str(conf.get("acks")).lower() not in ("all", "-1"):
        raise KafkaSetupError(f"TAP_KAFKA_ACKS={conf.get('acks')!r}: tapflow needs acks=all "
                              "(an event leaves the outbox only when the broker has it durably)")
    if str(conf.get("enable.idempotence")).lower() in ("false", "0"):
        log.warning("Kafka idempotence is off: a retried batch can be written twice; "
                    "max.in.flight.requests.per.connection forced to 1 to keep per-key order")
        conf["max.in.flight.requests.per.connection"] = 1
    return conf


def _admin_config(cfg: Config) -> dict[str, object]:
    conf = client_config(cfg)
    for k in list(conf):  # producer-only settings make AdminClient warn or fail
        if k in PRODUCER_DEFAULTS or k.startswith(("linger", "batch.", "queue.buffering", "compression",
                                                   "message.timeout", "delivery.timeout", "retries",
                                                   "retry.", "partitioner", "sticky")):
            conf.pop(k, None)
    return conf


def ensure_topics(cfg: Config, timeout: float = 15.0) -> dict[str, str]:
    """Create ``<prefix>events`` (delete) and ``<prefix>records`` (compact) when missing.

    Returns ``{topic: "created" | "exists"}``. Raises ``KafkaSetupError`` with the reason when
    the broker cannot be reached within ``timeout`` seconds or refuses to create a topic.
    Existing topics are left alone; a records topic that is not compacted is warned about.
    """
    events, records = cfg.kafka_topic_prefix + EVENTS, cfg.kafka_topic_prefix + RECORDS
    errors: list[KafkaError] = []
    try:
        admin = AdminClient({**_admin_config(cfg), "error_cb": errors.append})
    except KafkaException as e:
        raise KafkaSetupError(f"Kafka client settings rejected (check TAP_KAFKA_*): {e.args[0]}") from e
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        admin.poll(0)  # serve error_cb: the reason behind "transport failure"
        errs = [x for x in (*errors, e.args[0]) if isinstance(x, KafkaError)]
        auth = next((x for x in errs if x.code() in _AUTH_CODES), None)
        if auth is not None:
            raise KafkaSetupError(f"Kafka broker {cfg.kafka_bootstrap} refused the connection ({auth.name()}: "
                                  f"{auth.str()}); check TAP_KAFKA_SECURITY_PROTOCOL, TAP_KAFKA_SASL_*, "
                                  f"TAP_KAFKA_SSL_*") from e
        detail = next((x.str() for x in errs if x.code() == KafkaError._TRANSPORT and "/" in x.str()), None)
        raise KafkaSetupError(f"Kafka broker {cfg.kafka_bootstrap} unreachable: no answer within {timeout:g}s "
                              f"({detail or e.args[0]})") from e
    big = str(MAX_MESSAGE_BYTES)
    wanted = {events: {"cleanup.policy": "delete", "max.message.bytes": big},
              records: {"cleanup.policy": "compact", "max.message.bytes": big}}
    result: dict[str, str] = {}
    new = []
    for name, conf in wanted.items():
        t = md.topics.get(name)
        if t is not None and t.error is None:
            result[name] = "exists"
            if len(t.partitions) != cfg.kafka_partitions:
                log.info("Kafka topic %s exists with %d partitions (TAP_KAFKA_PARTITIONS=%d); kept as is",
                         name, len(t.partitions), cfg.kafka_partitions)
        else:
            new.append(NewTopic(name, num_partitions=cfg.kafka_partitions,
                                replication_factor=cfg.kafka_replication, config=conf))
    if new:
        futs = admin.create_topics(new, request_timeout=timeout, operation_timeout=timeout)
        for name, fut in futs.items():
            try:
                fut.result(timeout=timeout + 5)
                result[name] = "created"
                log.info("Kafka topic %s created (%d partitions, replication %d, cleanup.policy=%s)", name,
                         cfg.kafka_partitions, cfg.kafka_replication, wanted[name]["cleanup.policy"])
            except KafkaException as e:
                err = e.args[0]
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    result[name] = "exists"
                    continue
                raise KafkaSetupError(f"Kafka broker {cfg.kafka_bootstrap} refused to create topic {name} "
                                      f"(partitions={cfg.kafka_partitions}, replication={cfg.kafka_replication}): "
                                      f"{f'{err.name()}: {err.str()}' if isinstance(err, KafkaError) else err}") from e
            except Exception as e:  # concurrent.futures.TimeoutError
                raise KafkaSetupError(f"Kafka broker {cfg.kafka_bootstrap}: creating topic {name} "
                                      f"did not finish within {timeout:g}s ({e!r})") from e
    if result.get(records) == "exists":
        _check_compacted(admin, records, timeout)
    return result


def _check_compacted(admin: AdminClient, topic: str, timeout: float) -> None:
    try:
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        entries = admin.describe_configs([res], request_timeout=timeout)[res].result(timeout=timeout)
        policy = entries.get("cleanup.policy")
        if policy is not None and "compact" not in str(policy.value):
            log.warning("Kafka topic %s has cleanup.policy=%s; it should be compact to hold current records",
                        topic, policy.value)
    except Exception as e:  # informative only
        log.debug("could not read the config of %s: %r", topic, e)


# --- the target ----------------------------------------------------------------------

class _Pending:
    """An offered event not yet taken. Its bound ``dr`` is the delivery callback of each of
    its messages. A producer reset replaces every _Pending (the old ones turn ``dead``), so a
    late report from a discarded producer can never count for the new one."""

    __slots__ = ("t", "ev", "msgs", "n", "nrec", "left", "sent", "dead", "backoff")

    def __init__(self, t: "KafkaTarget", ev: OutboxEvent, n: int, nrec: int):
        self.t = t
        self.ev = ev
        self.msgs = None     # set only while some are not handed to the producer (backlog)
        self.n = n           # messages of this event
        self.nrec = nrec     # of which to the records topic
        self.left = n        # not acked yet
        self.sent = 0        # messages [0, sent) handed to the producer
        self.dead = False
        self.backoff = 0.0

    def dr(self, err: KafkaError | None, msg) -> None:
        if self.dead:
            return
        if err is None:
            self.left -= 1
            if self.left == 0:
                self.t._done(self)
        else:
            self.t._report_failed(self, err, msg)


@dataclass
class KafkaStats:
    produced: dict[str, int]
    acked: dict[str, int]
    failed: dict[str, int]
    backlog: int
    unacked: int
    taken: int
    resets: int
    broker_up: bool
    blocked_dids: int = 0   # DIDs whose newer events wait for a refused older one
    held: int = 0           # events waiting behind a refused event of their DID


class KafkaTarget:
    """Delivery target that produces outbox events to Kafka (see the module docstring).

    ``on_taken(key)`` is called on the event loop thread, once per offered event, after the
    broker acked all of the event's messages; never for an event whose messages failed.
    ``producer_overrides`` win over our defaults and TAP_KAFKA_* (tests, benchmarks).
    """

    name = "kafka"

    def __init__(self, cfg: Config, on_taken: Callable[[bytes], None], *,
                 producer_overrides: Mapping[str, object] | None = None,
                 create_topics: bool = True, setup_timeout: float = 15.0,
                 poll_interval: float = 0.01, stop_timeout: float = 10.0, stall_timeout: float | None = None):
        if not cfg.kafka_bootstrap:
            raise KafkaSetupError("TAP_KAFKA_BOOTSTRAP is empty")
        self.cfg = cfg
        self.on_taken = on_taken
        self._on_taken_many = taken_many(on_taken)
        self.events_topic = cfg.kafka_topic_prefix + EVENTS
        self.records_topic = cfg.kafka_topic_prefix + RECORDS
        self._conf = producer_config(cfg, producer_overrides)
        self._create_topics = create_topics
        self._setup_timeout = setup_timeout
        self._poll_interval = poll_interval
        self._stop_timeout = stop_timeout
        self._stall_timeout = cfg.kafka_stall_timeout if stall_timeout is None else stall_timeout
        # no ack for this long while events wait: ask the broker whether our topics still exist
        self._topic_check_after = min(2.0, self._stall_timeout / 4) if self._stall_timeout else 0.0
        self._topic_check: asyncio.Future | None = None
        self._last_topic_check = 0.0
        self._last_progress = time.monotonic()
        self._connected_since: float | None = None  # statistics say a broker is UP, continuously since
        self._epochs = 0                    # idempotent producer epoch bumps (statistics)
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._running = False
        self._gen = 0                               # producer generation (for error_cb)
        self._unacked: dict[bytes, _Pending] = {}   # offer order
        self._backlog: deque[_Pending] = deque()    # not all messages handed to the producer yet
        self._retry: list[tuple[float, int, _Pending, int]] = []  # (due, seq, pend, msg index)
        self._retry_seq = 0
        # DID -> (the refused event that blocks it, its newer events held back in offer order)
        self._blocked: dict[str, tuple[_Pending, deque[_Pending]]] = {}
        self._taken: list[bytes] = []
        self._resetting = False
        self._reset_task: asyncio.Task | None = None
        self._reset_backoff = 0.5
        self._broker_up = True
        self._last_err_log: dict[object, float] = {}
        # counters: [events topic, records topic]
        self._produced = [0, 0]
        self._acked = [0, 0]
        self._failed = [0, 0]
        self._reported = ([0, 0], [0, 0], [0, 0])  # what was pushed to the prometheus counters
        self.taken = 0
        self.resets = 0

    # -- lifecycle --

    async def start(self) -> None:
        """Create missing topics, then the producer and its poll task. Raises ``KafkaSetupError``."""
        self._loop = asyncio.get_running_loop()
        if self._create_topics:
            await self._loop.run_in_executor(None, ensure_topics, self.cfg, self._setup_timeout)
        self._producer = self._new_producer()
        self._running = True
        self._task = asyncio.create_task(self._poll_loop(), name="kafka-poll")

    async def stop(self) -> None:
        """Wait up to ``stop_timeout`` s for in-flight messages, report what was taken, close.

        Events not acked by then stay in the outbox and are delivered again after a restart.
        """
        if not self._running:
            return
        deadline = time.monotonic() + self._stop_timeout
        while (self._unacked or self._backlog) and time.monotonic() < deadline and not self._resetting:
            self._tick()
            await asyncio.sleep(0.01)
        self._running = False
        self._wake.set()
        for task in (self._task, self._reset_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._tick()
        self._gen += 1
        self._running = False
        for pend in self._unacked.values():
            pend.dead = True
        box, self._producer = [self._producer], None
        await self._loop.run_in_executor(None, _dispose, box)
        left = len(self._unacked)
        if left:
            log.info("Kafka target stopped with %d events unacked; they stay in the outbox", left)
        self._unacked.clear()
        self._backlog.clear()
        self._retry.clear()
        self._blocked.clear()
        self._push_metrics()

    # -- offering --

    def offer(self, ev: OutboxEvent) -> None:
        """Queue every message of ``ev`` for the broker. Never blocks."""
        self.offer_many((ev,))

    def offer_many(self, events: Sequence[OutboxEvent]) -> None:
        """``offer`` for a run of events (the outbox follower's batch form), in order.

        The common case, a record event while nothing waits (no backlog, reset or blocked
        DID), goes to the producer right here: two ``produce()`` calls, one ``_Pending``.
        Everything else takes ``_offer_one``, and so does every later event of the run once
        something waits (a full queue, a refused message), so the order stays the offer order.
        """
        if not self._running:
            raise RuntimeError("KafkaTarget.offer before start() or after stop()")
        unacked = self._unacked
        if not unacked:
            self._last_progress = time.monotonic()
        et, rt = self.events_topic, self.records_topic
        plain = not (self._backlog or self._resetting or self._blocked)
        produce = self._producer.produce if plain else None
        sent = 0
        try:
            for ev in events:
                if plain and not ev.flags & FLAG_INTERNAL and ev.key not in unacked:
                    r = map_record(ev.payload)
                    if r is not None:
                        did_b, headers, rk, value = r
                        pend = unacked[ev.key] = _Pending(self, ev, 2, 1)
                        dr = pend.dr
                        i = 0
                        try:
                            produce(et, ev.payload, did_b, -1, dr, None, 0, headers)
                            i = 1
                            produce(rt, value, rk, -1, dr)
                        except (BufferError, KafkaException):
                            self._offer_rest(pend, [(et, did_b, ev.payload, headers), (rt, rk, value, None)], i)
                            plain = False
                            continue
                        pend.sent = 2
                        sent += 1
                        continue
                self._offer_one(ev)
                plain = not (self._backlog or self._resetting or self._blocked)
                if plain:
                    produce = self._producer.produce
        finally:
            c = self._produced
            c[0] += sent
            c[1] += sent

    def _offer_one(self, ev: OutboxEvent) -> None:
        """Offer ``ev`` whatever it is and whatever waits (``offer_many``'s general path)."""
        key = ev.key
        if key in self._unacked:  # offered again (a redelivery): the first offer will be taken
            return
        msgs = build_messages(ev, self.events_topic, self.records_topic)
        n = len(msgs)
        if not n:
            self._taken.append(key)
            self._wake.set()
            return
        nrec = n - 1 if msgs[0][0] is self.events_topic else n
        pend = _Pending(self, ev, n, nrec)
        unacked = self._unacked
        if not unacked:
            self._last_progress = time.monotonic()
        unacked[key] = pend
        pend.msgs = msgs
        if self._blocked and ev.did in self._blocked:
            self._blocked[ev.did][1].append(pend)  # behind the refused event of its DID
            return
        if self._backlog or self._resetting:
            self._backlog.append(pend)
            return
        self._offer_rest(pend, msgs, 0)

    def _offer_rest(self, pend: _Pending, msgs: list[Msg], i: int) -> None:
        """produce() refused message i of pend (queue full, or the message itself): count the
        i handed over, let ``_send`` retry the rest (it deals with a refused message); what
        still does not fit waits in the backlog, in order."""
        pend.msgs = msgs
        pend.sent = i
        n, nrec = pend.n, pend.nrec
        c = self._produced
        c[0] += min(i, n - nrec)
        c[1] += max(0, i - (n - nrec))
        if not self._send(pend):  # raises nothing; queue full: wait in the backlog
            self._backlog.append(pend)
            self._wake.set()

    def _send(self, pend: _Pending) -> bool:
        """Hand pend's remaining messages to the producer; False when its queue is full.
        A message the producer refuses at once (KafkaException) goes to ``_message_failed``."""
        msgs = pend.msgs
        if msgs is None:
            msgs = pend.msgs = build_messages(pend.ev, self.events_topic, self.records_topic)
        produce = self._producer.produce
        dr = pend.dr
        n = pend.n
        rt = self.records_topic
        while pend.sent < n:
            i = pend.sent
            topic, key, value, headers = msgs[i]
            try:
                if headers is None:
                    produce(topic, value, key, -1, dr)
                else:
                    produce(topic, value, key, -1, dr, None, 0, headers)
            except BufferError:
                return False
            except KafkaException as e:
                pend.sent += 1
                self._message_failed(pend, i, e.args[0])
                continue
            self._produced[topic is rt] += 1
            pend.sent += 1
        pend.msgs = None
        return True

    # -- delivery reports (inside producer.poll, on the loop thread) --

    def _done(self, pend: _Pending) -> None:
        key = pend.ev.key
        if self._unacked.pop(key, None) is not None:
            self._taken.append(key)
            self._acked[1] += pend.nrec
            self._acked[0] += pend.n - pend.nrec
            if self._blocked:
                b = self._blocked.get(pend.ev.did)
                if b is not None and b[0] is pend:  # the refused event is in: release its DID, in order
                    del self._blocked[pend.ev.did]
                    self._backlog.extend(b[1])
                    self._wake.set()

    def _report_failed(self, pend: _Pending, err: KafkaError, msg) -> None:
        """A delivery report with an error: find which of pend's messages it was."""
        if err.code() in _PURGED:
            return
        try:
            topic, key = msg.topic(), msg.key()
            msgs = build_messages(pend.ev, self.events_topic, self.records_topic)
            i = next(j for j, m in enumerate(msgs) if m[0] == topic and m[1] == key)
        except Exception:  # cannot tell: re-produce everything, in order
            self._failed[0] += 1
            self._start_reset(f"unattributable delivery error {err}")
            return
        self._message_failed(pend, i, err)

    def _message_failed(self, pend: _Pending, i: int, err: KafkaError) -> None:
        """Message i of pend failed. Errors about this message alone: retry it with backoff,
        and block its DID (``_block``) so that no newer event of that DID overtakes it.
        Anything else (fatal, timeouts, broker/topic level): reset the producer, which
        re-produces every unacked event in offer order, the only way to keep per-key order.
        """
        code = err.code() if isinstance(err, KafkaError) else None
        if code in _PURGED:
            return
        rec = i > 0 or pend.nrec == pend.n
        self._failed[rec] += 1
        if code not in _PER_MESSAGE or (isinstance(err, KafkaError) and err.fatal()):
            self._start_reset(f"{self.records_topic if rec else self.events_topic}: {err}")
            return
        pend.backoff = min(60.0, max(1.0, pend.backoff * 2))
        now = time.monotonic()
        if now - self._last_err_log.get(code, 0.0) > 10.0:
            self._last_err_log[code] = now
            hint = PERMANENT_HINT.get(code, "")
            log.error("Kafka: message %d of event %d (%s) failed: %s%s; retrying in %.0fs; the event stays "
                      "in the outbox", i, pend.ev.id, pend.ev.did, err, f" ({hint})" if hint else "", pend.backoff)
        self._retry_seq += 1
        heapq.heappush(self._retry, (now + pend.backoff, self._retry_seq, pend, i))
        self._block(pend)

    def _block(self, pend: _Pending) -> None:
        """Hold back every newer event of pend's DID until pend is acked (then ``_done`` puts
        them in the backlog, in order). Newer events of the DID already handed to the
        producer are produced again after pend (their old reports are ignored): when the
        refusal came from the producer itself (too large for message.max.bytes, the usual
        case) there are none, as ``offer`` blocks the DID before it takes the next event.
        When the broker refused (a topic limit below ours), a newer message may already be
        in the partition before pend; the repeat after pend keeps the last occurrences, and
        so the compacted records topic, in order."""
        did = pend.ev.did
        b = self._blocked.get(did)
        if b is not None and b[0] is pend:
            return  # refused again
        held: deque[_Pending] = deque()
        unacked = self._unacked
        after = False
        for key, q in list(unacked.items()):  # offer order
            if q is pend:
                after = True
            elif after and q.ev.did == did:
                q.dead = True  # its reports, backlog and retry entries are void
                fresh = unacked[key] = _Pending(self, q.ev, q.n, q.nrec)
                held.append(fresh)
        self._blocked[did] = (pend, held)
        if held:
            log.warning("Kafka: %d newer events of %s wait behind the refused event %d", len(held), did, pend.ev.id)

    def _error_cb(self, gen: int, err: KafkaError) -> None:
        if gen != self._gen:
            return  # a discarded producer (maybe served in another thread while disposed of)
        code = err.code()
        if err.fatal():
            self._start_reset(f"fatal producer error: {err}")
            return
        if code == KafkaError._ALL_BROKERS_DOWN:
            self._connected_since = None
            if self._broker_up:
                log.warning("Kafka: all brokers down (%s); waiting, nothing is taken meanwhile", err)
            self._broker_up = False
            return
        now = time.monotonic()
        if now - self._last_err_log.get(code, 0.0) > 10.0:
            self._last_err_log[code] = now
            log.warning("Kafka: %s", err)

    # -- the poll task --

    async def _poll_loop(self) -> None:
        """Poll every poll_interval while reports come in; back off to at most 32 ms when they
        do not (a trickle of events, or the broker away), and sleep until offer() when idle.
        poll(0) serves every report that is waiting, so polling less often costs nothing per
        report and saves the loop wake-ups (about 1 us per event at 2 ms; only the outbox acks
        wait up to poll_interval longer, the messages are sent by librdkafka's threads)."""
        interval = self._poll_interval
        while self._running:
            try:
                served = self._tick()
            except Exception:
                log.exception("Kafka poll tick failed")
                served = 0
            if self._unacked or self._taken:
                interval = self._poll_interval if served else min(interval * 2, max(self._poll_interval, _IDLE_POLL))
                await asyncio.sleep(interval)
            else:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass

    def _tick(self) -> int:
        """Serve delivery reports, produce what waits, hand taken keys over; returns events served."""
        served = 0
        p = self._producer
        if p is not None and not self._resetting:
            before = self.taken + len(self._taken)
            served = p.poll(0)
            if not self._broker_up and self.taken + len(self._taken) != before:
                self._broker_up = True
                log.info("Kafka: the broker acks again")
            if self._retry:
                self._retry_due(p)
            bl = self._backlog
            while bl and not self._resetting:
                if bl[0].dead:  # replaced by _block
                    bl.popleft()
                    continue
                if not self._send(bl[0]):
                    p.poll(0)  # serve reports so the queue frees up for the next tick
                    break
                bl.popleft()
        if self._taken:
            self._last_progress = time.monotonic()
            taken, self._taken = self._taken, []
            self.taken += len(taken)
            try:
                self._on_taken_many(taken)  # one call for all (AckTracker's batch form)
            except Exception:
                log.exception("on_taken callback failed for a batch of %d; taking them one by one", len(taken))
                for k in taken:  # a second call for a key is harmless (connectors.targets)
                    try:
                        self.on_taken(k)
                    except Exception:
                        log.exception("on_taken callback failed for %r", k)
        elif not self._unacked:
            self._last_progress = time.monotonic()
        elif self._stall_timeout and not self._resetting and self._running:
            idle = time.monotonic() - self._last_progress
            if idle > self._topic_check_after:
                self._maybe_check_topics()
            if idle > self._stall_timeout:
                self._check_stall()
        self._push_metrics()
        return served

    def _check_stall(self) -> None:
        """No ack for stall_timeout s while events wait. If a broker was connected all that
        time, the producer is stuck (e.g. the cluster was replaced and no longer knows our
        producer id: librdkafka then bumps its epoch forever without reporting an error):
        start over with a new producer. While no broker is connected, keep waiting; so while
        every waiting event is a refused one or held behind one (their retries say why)."""
        since = self._connected_since
        if since is None:
            return
        if self._blocked and len(self._unacked) <= sum(1 + len(h) for _, h in self._blocked.values()):
            return
        now = time.monotonic()
        if now - max(since, self._last_progress) > self._stall_timeout:
            self._start_reset(f"no broker ack for {now - self._last_progress:.0f}s while connected "
                              f"({self._epochs} producer epoch bumps)")

    def _maybe_check_topics(self) -> None:
        """No ack for a while: ask the broker (in a thread) whether our topics still exist. A
        broker that came back empty no longer has them, and librdkafka would only fail the
        messages after topic.metadata.propagation.max.ms (30 s), or never (epoch bumps)."""
        now = time.monotonic()
        p = self._producer
        if p is None or self._topic_check is not None or now - self._last_topic_check < self._topic_check_after:
            return
        self._last_topic_check = now
        fut = self._loop.run_in_executor(None, missing_topics, p, (self.events_topic, self.records_topic), 5.0)
        self._topic_check = fut
        fut.add_done_callback(partial(self._topics_checked, self._gen))

    def _topics_checked(self, gen: int, fut: asyncio.Future) -> None:
        self._topic_check = None
        try:
            missing = fut.result()
        except Exception as e:  # advisory; the stall watchdog is the fallback
            log.debug("Kafka topic check failed: %r", e)
            return
        if missing and gen == self._gen and self._running and not self._resetting and self._unacked:
            self._start_reset(f"topic {', '.join(missing)} missing on the broker (did it come back empty?); "
                              "creating it again")

    def _stats_cb(self, gen: int, text: str) -> None:
        if gen != self._gen:
            return
        try:
            st = orjson.loads(text)
            up = any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in st.get("brokers", {}).values())
            self._epochs = int((st.get("eos") or {}).get("epoch_cnt", 0))
            if not up:
                self._connected_since = None
            elif self._connected_since is None:
                self._connected_since = time.monotonic()
                if not self._broker_up and not self._unacked:
                    self._broker_up = True
        except Exception as e:  # statistics are advisory
            log.debug("Kafka statistics not understood: %r", e)

    def _retry_due(self, p: Producer) -> None:
        now = time.monotonic()
        while self._retry and self._retry[0][0] <= now and not self._resetting:
            _, _, pend, i = heapq.heappop(self._retry)
            if pend.dead or pend.ev.key not in self._unacked:
                continue
            topic, key, value, headers = build_messages(pend.ev, self.events_topic, self.records_topic)[i]
            try:
                p.produce(topic, value, key, headers=headers, on_delivery=pend.dr)
                self._produced[topic == self.records_topic] += 1
            except BufferError:
                self._retry_seq += 1
                heapq.heappush(self._retry, (now + 0.05, self._retry_seq, pend, i))
                return
            except KafkaException as e:
                self._message_failed(pend, i, e.args[0])

    def _push_metrics(self) -> None:
        BACKLOG.set(len(self._backlog))
        UNACKED.set(len(self._unacked))
        topics = (self.events_topic, self.records_topic)
        for mine, seen, metric in zip((self._produced, self._acked, self._failed), self._reported,
                                      (PRODUCED, ACKED, FAILED)):
            for j in (0, 1):
                d = mine[j] - seen[j]
                if d:
                    metric.labels(topics[j]).inc(d)
                    seen[j] = mine[j]

    # -- producer reset --

    def _new_producer(self) -> Producer:
        self._connected_since = None
        conf = dict(self._conf)
        conf["error_cb"] = partial(self._error_cb, self._gen)
        conf["logger"] = _RdLog()
        if conf.get("statistics.interval.ms"):
            conf["stats_cb"] = partial(self._stats_cb, self._gen)
        try:
            return Producer(conf)
        except KafkaException as e:
            raise KafkaSetupError(f"Kafka producer settings rejected (check TAP_KAFKA_*): {e.args[0]}") from e

    def _start_reset(self, reason: str) -> None:
        """Discard the producer and re-produce every unacked event, in offer order, on a new one."""
        if self._resetting or not self._running:
            return
        self._resetting = True
        self._gen += 1
        self.resets += 1
        fresh: dict[bytes, _Pending] = {}
        for key, old in self._unacked.items():
            old.dead = True
            fresh[key] = _Pending(self, old.ev, old.n, old.nrec)
        self._unacked = fresh
        self._backlog = deque(fresh.values())
        self._retry.clear()
        self._blocked.clear()  # re-produced in offer order; a refusal blocks its DID again
        log.error("Kafka producer reset (%s): %d unacked events will be produced again, in order, in %.1fs",
                  reason, len(fresh), self._reset_backoff)
        self._reset_task = self._loop.create_task(self._reset(), name="kafka-reset")

    async def _reset(self) -> None:
        try:
            await asyncio.sleep(self._reset_backoff)
            self._reset_backoff = min(30.0, self._reset_backoff * 2)
            box, self._producer = [self._producer], None
            await self._loop.run_in_executor(None, _dispose, box)
            if self._create_topics:  # the cluster may have lost them (replaced, topics deleted)
                try:
                    await self._loop.run_in_executor(None, ensure_topics, self.cfg, self._setup_timeout)
                except KafkaSetupError as e:
                    log.warning("Kafka topics not checked (%s); producing anyway", e)
            while self._running:
                try:
                    self._producer = self._new_producer()
                    break
                except KafkaSetupError:
                    log.exception("Kafka producer could not be created; retrying")
                    await asyncio.sleep(self._reset_backoff)
        finally:
            self._resetting = False
            self._last_progress = time.monotonic()
            self._wake.set()
        self._loop.call_later(60.0, self._calm)

    def _calm(self) -> None:
        if not self._resetting:
            self._reset_backoff = 0.5

    # -- introspection --

    def stats(self) -> KafkaStats:
        """Counters since start (messages per topic; events for the rest)."""
        t = (self.events_topic, self.records_topic)
        return KafkaStats(dict(zip(t, self._produced)), dict(zip(t, self._acked)), dict(zip(t, self._failed)),
                          len(self._backlog), len(self._unacked), self.taken + len(self._taken), self.resets,
                          self._broker_up, len(self._blocked), sum(len(h) for _, h in self._blocked.values()))


class _RdLog:
    """librdkafka's log lines, into ``tapflow.kafka.librdkafka``: its errors are ones it retries
    (connection refused while the broker is away...), so they become warnings, and a facility
    logs at most once every 10 s (debug lines are never held back)."""

    def __init__(self):
        self.log_ = logging.getLogger("tapflow.kafka.librdkafka")
        self.last: dict[str, float] = {}

    def log(self, level: int, fmt: str, *args) -> None:
        if level > logging.WARNING:
            level = logging.WARNING
        if level > logging.DEBUG:
            key = str(args[0]) if args else fmt
            now = time.monotonic()
            if now - self.last.get(key, 0.0) < 10.0:
                return
            self.last[key] = now
        self.log_.log(level, fmt, *args)


def missing_topics(p: Producer, topics: tuple[str, ...], timeout: float) -> list[str]:
    """Those of ``topics`` the cluster says do not exist (UNKNOWN_TOPIC_OR_PART); [] when the
    broker cannot be asked. Never creates a topic (allow.auto.create.topics=false)."""
    out = []
    for t in topics:
        try:
            md = p.list_topics(t, timeout=timeout)
        except KafkaException:
            return []
        tm = md.topics.get(t)
        if tm is None or (tm.error is not None and tm.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            out.append(t)
    return out


def _dispose(box: list) -> None:
    """Drop the producer in ``box`` without waiting for the broker (its unacked events stay in
    the outbox or are produced again). Runs in an executor thread: every _Pending of this
    producer is already dead, so the callbacks served here do nothing; the last reference
    dies here too, so librdkafka's destroy does not block the event loop."""
    p = box.pop()
    if p is None:
        return
    try:
        p.purge(in_queue=True, in_flight=True, blocking=True)
        p.flush(1.0)
    except Exception:
        pass
    del p


__all__ = ["KafkaTarget", "KafkaSetupError", "KafkaStats", "build_messages", "ensure_topics", "missing_topics",
           "producer_config",
           "client_config", "PRODUCER_DEFAULTS"]
