"""Kafka delivery target: message mapping (unit) and behaviour against a real broker.

The broker tests run against tansu (tests/kafka_broker.py starts it from ../shared/kafka).
Tansu keeps everything in memory and never compacts, so the records topic is checked by the
LAST value per key over all messages, and a restarted tansu starts empty.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from config import Config, load_config
from connectors import kafka as ck
from connectors.kafka import KafkaSetupError, KafkaTarget, _build_general, build_messages, ensure_topics
from operators.events import identity_body, record_body, with_id
from store.layout import FLAG_INTERNAL, FLAG_LIVE, outbox_key, shard_of
from store.outbox import OutboxEvent
from tests.kafka_broker import broker_factory, free_port, kafka_broker  # noqa: F401  (fixtures)

ET, RT = "tap.events", "tap.records"
SHARDS = 16


# --- helpers ------------------------------------------------------------------------------

class Outbox:
    """Makes outbox events as RepoLogic would: ids strictly increasing, per shard in id order."""

    def __init__(self):
        self.next_id = 0

    def _ev(self, did: str, flags: int, payload_of) -> OutboxEvent:
        self.next_id += 1
        shard = shard_of(did, SHARDS)
        return OutboxEvent(outbox_key(shard, self.next_id), shard, self.next_id, did, flags, payload_of(self.next_id))

    def record(self, did, action, rkey, *, coll="app.bsky.feed.post", text="hi", live=True, rev=None):
        rec = orjson.dumps({"$type": coll, "text": text, "createdAt": "2025-01-01T00:00:00.000Z"})
        cid = None if action == "delete" else "bafyrei" + uuid.uuid4().hex + "aaaaaaaaaaaaaaaaaaa"

        def payload(i):
            body = record_body(live=live, did=did, rev=rev or f"3l{i:011d}", collection=coll, rkey=rkey,
                               action=action, cid=cid, record_json=None if action == "delete" else rec)
            return with_id(i, "record", body)
        return self._ev(did, FLAG_LIVE if live else 0, payload)

    def identity(self, did, handle="alice.test"):
        return self._ev(did, 0, lambda i: with_id(i, "identity", identity_body(did=did, handle=handle, is_active=True,
                                                                                 status="active")))

    def account_deleted(self, did, paths):
        return self._ev(did, FLAG_INTERNAL, lambda i: orjson.dumps({"did": did, "deleted_paths": paths}))


def cfg_for(bootstrap: str, **kw) -> Config:
    return Config(kafka_bootstrap=bootstrap, kafka_topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
                  kafka_partitions=kw.pop("kafka_partitions", 4), **kw)


async def wait_for(cond, timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list:
    """Every message of every partition, from the beginning to the end (assign, no group join)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    parts = sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, eof = [], set()
    deadline = time.monotonic() + timeout
    try:
        while len(eof) < len(parts):
            assert time.monotonic() < deadline, f"reading {topic} timed out ({len(eof)}/{len(parts)} partitions)"
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise AssertionError(m.error())
            out.append(m)
    finally:
        c.close()
    return out


def last_values(msgs) -> dict:
    """Key -> last value over all messages (what compaction would keep), by partition offset order."""
    state = {}
    for m in sorted(msgs, key=lambda m: (m.partition(), m.offset())):
        state[m.key().decode()] = m.value()
    return state


# --- unit: event -> messages ------------------------------------------------------------------

def test_record_create_maps_to_event_and_record():
    ob = Outbox()
    ev = ob.record("did:plc:aaa", "create", "3k1", text="héllo \"quoted\" \\ \n")
    msgs = build_messages(ev, ET, RT)
    assert [m[0] for m in msgs] == [ET, RT]
    topic, key, value, headers = msgs[0]
    assert key == b"did:plc:aaa" and value == ev.payload
    body = orjson.loads(ev.payload)["record"]
    assert headers == [("type", b"record"), ("live", b"true"), ("did", b"did:plc:aaa"),
                       ("collection", b"app.bsky.feed.post"), ("action", b"create"), ("rev", body["rev"].encode())]
    _, rkey, rval, rh = msgs[1]
    assert rkey == b"at://did:plc:aaa/app.bsky.feed.post/3k1" and rh is None
    assert orjson.loads(rval) == {"cid": body["cid"], "rev": body["rev"], "record": body["record"]}
    assert msgs == _build_general(ev, ET, RT)


def test_record_delete_maps_to_tombstone_and_historical_live_header():
    ob = Outbox()
    ev = ob.record("did:plc:aaa", "delete", "3k1", live=False)
    msgs = build_messages(ev, ET, RT)
    assert msgs[1] == (RT, b"at://did:plc:aaa/app.bsky.feed.post/3k1", None, None)
    assert ("live", b"false") in msgs[0][3] and ("action", b"delete") in msgs[0][3]
    assert msgs == _build_general(ev, ET, RT)


def test_fast_path_equals_general_path_on_odd_records():
    ob = Outbox()
    odd = [
        {"$type": "x.y.z", "cid": "bafyfake"},                          # a record whose last key is "cid"
        {"a": {"b": {"c": ',"cid":"abc"}}'}}, "cid": "zz"},
        {"text": "\u2028\u0000\t", "n": -5, "l": [1, {"$link": "bafy"}], "e": {}},
        {"$bytes": "aGk="},
    ]
    for i, rec in enumerate(odd):
        for action in ("create", "update"):
            body = record_body(live=bool(i % 2), did="did:web:example.com", rev="3l2", collection="a.b.c",
                               rkey=f"k:{i}~x.y-z_", action=action, cid="bafyreiabc123", record_json=orjson.dumps(rec))
            ev = OutboxEvent(outbox_key(0, i + 1), 0, i + 1, "did:web:example.com", 0, with_id(i + 1, "record", body))
            fast = build_messages(ev, ET, RT)
            assert fast == _build_general(ev, ET, RT), rec
            assert orjson.loads(fast[1][2])["record"] == rec
    # a record event without cid or record takes the general path and still maps
    body = record_body(live=True, did="did:plc:q", rev="3l", collection="a.b.c", rkey="k", action="create")
    ev = OutboxEvent(outbox_key(0, 9), 0, 9, "did:plc:q", 0, with_id(9, "record", body))
    assert build_messages(ev, ET, RT)[1] == (RT, b"at://did:plc:q/a.b.c/k", b'{"rev":"3l"}', None)


def test_identity_goes_to_events_only():
    ob = Outbox()
    ev = ob.identity("did:plc:bbb")
    msgs = build_messages(ev, ET, RT)
    assert msgs == [(ET, b"did:plc:bbb", ev.payload, [("type", b"identity"), ("did", b"did:plc:bbb")])]


def test_internal_row_gives_tombstones_only():
    ob = Outbox()
    ev = ob.account_deleted("did:plc:ccc", ["app.bsky.feed.post/1", "app.bsky.feed.like/2"])
    assert build_messages(ev, ET, RT) == [
        (RT, b"at://did:plc:ccc/app.bsky.feed.post/1", None, None),
        (RT, b"at://did:plc:ccc/app.bsky.feed.like/2", None, None)]
    assert build_messages(ob.account_deleted("did:plc:ccc", []), ET, RT) == []


def test_unparseable_payload_is_produced_as_is():
    ev = OutboxEvent(outbox_key(0, 1), 0, 1, "did:plc:x", 0, b"not json")
    assert build_messages(ev, ET, RT) == [(ET, b"did:plc:x", b"not json", [("did", b"did:plc:x")])]


def test_producer_config_defaults_passthrough_and_guards():
    cfg = load_config({"TAP_KAFKA_BOOTSTRAP": "h:1", "TAP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                       "TAP_KAFKA_SASL_MECHANISM": "PLAIN", "TAP_KAFKA_LINGER_MS": "50"}, dotenv=None)
    conf = ck.producer_config(cfg)
    assert conf["bootstrap.servers"] == "h:1" and conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "PLAIN" and conf["linger.ms"] == "50"
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    admin = ck._admin_config(cfg)
    assert admin["security.protocol"] == "SASL_SSL" and "linger.ms" not in admin and "acks" not in admin
    with pytest.raises(KafkaSetupError, match="acks=all"):
        ck.producer_config(load_config({"TAP_KAFKA_BOOTSTRAP": "h:1", "TAP_KAFKA_ACKS": "1"}, dotenv=None))
    conf = ck.producer_config(load_config({"TAP_KAFKA_BOOTSTRAP": "h:1", "TAP_KAFKA_ENABLE_IDEMPOTENCE": "false"},
                                          dotenv=None))
    assert conf["max.in.flight.requests.per.connection"] == 1
    # the stall timeout is ours, not librdkafka's; metadata requests never create topics
    cfg = load_config({"TAP_KAFKA_BOOTSTRAP": "h:1", "TAP_KAFKA_STALL_TIMEOUT": "3s"}, dotenv=None)
    assert cfg.kafka_stall_timeout == 3.0 and not any("stall" in k for k, _ in cfg.kafka_extra)
    assert ck.producer_config(cfg)["allow.auto.create.topics"] is False
    assert "allow.auto.create.topics" not in ck._admin_config(cfg)
    assert KafkaTarget(cfg, lambda k: None)._stall_timeout == 3.0
    assert load_config({}, dotenv=None).kafka_stall_timeout < 60
    with pytest.raises(Exception, match="TAP_KAFKA_STALL_TIMEOUT"):
        load_config({"TAP_KAFKA_BOOTSTRAP": "h:1", "TAP_KAFKA_STALL_TIMEOUT": "0s"}, dotenv=None)


def test_bad_passthrough_setting_is_a_clear_error():
    cfg = Config(kafka_bootstrap="127.0.0.1:1", kafka_extra=(("no.such.setting", "1"),))
    with pytest.raises(KafkaSetupError, match="TAP_KAFKA_"):
        KafkaTarget(cfg, lambda k: None)._new_producer()


# --- against the broker ----------------------------------------------------------------------

@pytest.mark.kafka
async def test_unreachable_broker_fails_start_clearly():
    port = free_port()
    t = KafkaTarget(cfg_for(f"127.0.0.1:{port}"), lambda k: None, setup_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(KafkaSetupError, match="unreachable: no answer within 2s .*Connection refused"):
        await t.start()
    assert time.monotonic() - t0 < 10


@pytest.mark.kafka
def test_failed_authentication_is_a_clear_error(kafka_broker):
    # tansu refuses this SASL handshake: the error names the cause, not "transport failure"
    cfg = cfg_for(kafka_broker.bootstrap, kafka_extra=(
        ("security.protocol", "sasl_plaintext"), ("sasl.mechanism", "PLAIN"),
        ("sasl.username", "u"), ("sasl.password", "p")))
    with pytest.raises(KafkaSetupError, match=r"refused the connection \(_AUTHENTICATION: .*TAP_KAFKA_SASL"):
        ensure_topics(cfg, timeout=3)


@pytest.mark.kafka
def test_topics_created_with_partitions_and_policies(kafka_broker):
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=3)
    ev, rec = cfg.kafka_topic_prefix + "events", cfg.kafka_topic_prefix + "records"
    assert ensure_topics(cfg) == {ev: "created", rec: "created"}
    assert ensure_topics(cfg) == {ev: "exists", rec: "exists"}
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    md = admin.list_topics(timeout=10).topics
    assert len(md[ev].partitions) == 3 and len(md[rec].partitions) == 3
    res = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in (ev, rec)]
    got = {r.name: f.result(10)["cleanup.policy"].value for r, f in admin.describe_configs(res).items()}
    assert got == {ev: "delete", rec: "compact"}


@pytest.mark.kafka
async def test_refused_topic_creation_is_a_clear_error(broker_factory):
    # tansu creates any topic it is asked for; noida refuses like Kafka does
    broker = broker_factory("noida")
    cfg = cfg_for(broker.bootstrap, kafka_replication=3)  # one broker cannot hold 3 replicas
    t = KafkaTarget(cfg, lambda k: None, setup_timeout=10)
    with pytest.raises(KafkaSetupError, match=r"refused to create topic .*replication=3.*INVALID_REPLICATION_FACTOR|"
                                              r"refused to create topic .*replication=3.*replicate"):
        await t.start()


def offer_all(t: KafkaTarget, evs, batched: bool) -> None:
    """Offer ``evs`` one by one (``offer``), or as one run (``offer_many``, as the follower does)."""
    if batched:
        t.offer_many(evs)
    else:
        for ev in evs:
            t.offer(ev)


BATCHED = pytest.mark.parametrize("batched", [False, True], ids=["offer", "offer_many"])


async def _started_target(cfg) -> tuple[KafkaTarget, list[bytes], "Outbox"]:
    """A started KafkaTarget, the list its taken keys go to, and an Outbox to make events."""
    taken: list[bytes] = []
    t = KafkaTarget(cfg, taken.append)
    await t.start()
    return t, taken, Outbox()


@pytest.mark.kafka
async def test_events_topic_keys_headers_values_and_order(kafka_broker):
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=4)
    t, taken, ob = await _started_target(cfg)
    dids = [f"did:plc:u{i:03d}" for i in range(25)]
    offered = []
    for n in range(40):
        for j, did in enumerate(dids):
            if (n + j) % 13 == 0:
                ev = ob.identity(did, handle=f"h{n}.test")
            else:
                ev = ob.record(did, "create", f"r{n}", live=n % 2 == 0)
            offered.append(ev)
            t.offer(ev)
        await asyncio.sleep(0)
    await wait_for(lambda: len(taken) == len(offered), 60, "all events taken")
    st = t.stats()
    await t.stop()
    assert sorted(taken) == sorted(e.key for e in offered)
    assert st.failed == {cfg.kafka_topic_prefix + "events": 0, cfg.kafka_topic_prefix + "records": 0}

    msgs = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "events")
    assert len(msgs) == len(offered)  # one message per event, no internal rows, no duplicates
    by_payload = {e.payload: e for e in offered}
    per_did: dict[str, list[tuple[int, int, int]]] = {}
    for m in msgs:
        ev = by_payload[m.value()]
        assert m.key() == ev.did.encode()
        obj = orjson.loads(m.value())
        body = obj[obj["type"]]
        want = [("type", obj["type"].encode())] + [
            (h, (str(body[h]).lower() if isinstance(body[h], bool) else str(body[h])).encode())
            for h in ("live", "did", "collection", "action", "rev") if h in body]
        assert m.headers() == want
        per_did.setdefault(ev.did, []).append((m.partition(), m.offset(), ev.id))
    for did, rows in per_did.items():
        assert len({p for p, _, _ in rows}) == 1, f"{did} spread over partitions"
        ids_in_log_order = [i for _, _, i in sorted(rows)]
        assert ids_in_log_order == sorted(ids_in_log_order), f"{did} out of order"
        assert len(rows) == 40


@pytest.mark.kafka
@BATCHED
async def test_records_topic_holds_current_state(kafka_broker, batched):
    cfg = cfg_for(kafka_broker.bootstrap)
    t, taken, ob = await _started_target(cfg)
    a, b, c = "did:plc:alice", "did:plc:bob", "did:plc:carol"
    evs = [
        ob.record(a, "create", "p1", text="a1"), ob.record(a, "create", "p2", text="a2"),
        ob.record(b, "create", "p1", text="b1"), ob.record(c, "create", "p1", text="c1"),
        ob.record(c, "create", "l1", coll="app.bsky.feed.like", text="c-like"),
        ob.record(a, "update", "p1", text="a1-v2"), ob.record(a, "delete", "p2"),
        ob.record(b, "update", "p1", text="b1-v2", live=False), ob.record(a, "update", "p1", text="a1-v3"),
        ob.identity(c),
        ob.account_deleted(c, ["app.bsky.feed.post/p1", "app.bsky.feed.like/l1"]),
        ob.record(b, "create", "p9", text="b9"),
    ]
    offer_all(t, evs, batched)  # records, an identity and an internal row in one run
    await wait_for(lambda: len(taken) == len(evs), 30, "all events taken")
    st = t.stats()
    await t.stop()
    assert st.acked == {cfg.kafka_topic_prefix + "events": 11, cfg.kafka_topic_prefix + "records": 12}

    recs = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "records")
    state = last_values(recs)
    post = "app.bsky.feed.post"

    def current(ev):
        body = orjson.loads(ev.payload)["record"]
        return {"cid": body["cid"], "rev": body["rev"], "record": body["record"]}
    assert orjson.loads(state[f"at://{a}/{post}/p1"]) == current(evs[8])
    assert orjson.loads(state[f"at://{a}/{post}/p1"])["record"]["text"] == "a1-v3"
    assert state[f"at://{a}/{post}/p2"] is None
    assert orjson.loads(state[f"at://{b}/{post}/p1"]) == current(evs[7])
    assert orjson.loads(state[f"at://{b}/{post}/p9"]) == current(evs[11])
    assert state[f"at://{c}/{post}/p1"] is None and state[f"at://{c}/app.bsky.feed.like/l1"] is None
    assert len(recs) == 12
    live = {k for k, v in state.items() if v is not None}
    assert live == {f"at://{a}/{post}/p1", f"at://{b}/{post}/p1", f"at://{b}/{post}/p9"}
    # the internal row reached no client topic
    events = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "events")
    assert len(events) == 11 and all(b"deleted_paths" not in m.value() for m in events)


@pytest.mark.kafka
@BATCHED
async def test_full_producer_queue_keeps_a_backlog_in_order(kafka_broker, batched):
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=2)
    taken: list[bytes] = []
    t = KafkaTarget(cfg, taken.append, producer_overrides={"queue.buffering.max.messages": 7, "linger.ms": 1})
    await t.start()
    ob = Outbox()
    evs = [ob.record(f"did:plc:q{i % 3}", "create", f"k{i}") for i in range(300)]
    offer_all(t, evs, batched)  # never blocks, never raises; the queue fills in the middle of the run
    assert t.stats().backlog > 0
    await wait_for(lambda: len(taken) == len(evs), 60, "backlog drained")
    await t.stop()
    msgs = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "events")
    assert len(msgs) == 300 and sorted(taken) == sorted(e.key for e in evs)
    for d in range(3):
        ids = [orjson.loads(m.value())["id"] for m in sorted(msgs, key=lambda m: m.offset())
               if m.key() == f"did:plc:q{d}".encode()]
        assert ids == sorted(ids) and len(ids) == 100


@pytest.mark.kafka
async def test_message_refused_for_good_is_never_taken(kafka_broker):
    cfg = cfg_for(kafka_broker.bootstrap)
    taken: list[bytes] = []
    t = KafkaTarget(cfg, taken.append, producer_overrides={"message.max.bytes": 2000}, stop_timeout=1)
    await t.start()
    ob = Outbox()
    small = ob.record("did:plc:s", "create", "a")
    big = ob.record("did:plc:s", "create", "b", text="x" * 5000)
    small2 = ob.record("did:plc:t", "create", "c")
    for ev in (small, big, small2):
        t.offer(ev)
    await wait_for(lambda: len(taken) == 2, 30, "small events taken")
    await asyncio.sleep(1.5)  # at least one retry of the big one
    st = t.stats()
    await t.stop()
    assert set(taken) == {small.key, small2.key}
    assert st.failed[cfg.kafka_topic_prefix + "events"] >= 2 and st.unacked == 1


@pytest.mark.kafka
@BATCHED
async def test_refused_event_holds_back_newer_events_of_its_did(kafka_broker, batched):
    """A message refused for good must not be overtaken by newer events of its DID: they wait
    (not produced, not taken) until it is in; other DIDs go on. Once the limit is raised (a new
    producer with a higher message.max.bytes), the DID's events land in id order."""
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=2)
    taken: list[bytes] = []
    # a short stall timeout: the watchdog must leave alone a target that only waits for a refused event
    t = KafkaTarget(cfg, taken.append, stall_timeout=1,
                    producer_overrides={"message.max.bytes": 2000, "statistics.interval.ms": 200})
    await t.start()
    ob = Outbox()
    first = ob.record("did:plc:s", "create", "a")
    big = ob.record("did:plc:s", "create", "b", text="x" * 5000)
    newer = [ob.record("did:plc:s", "create", f"c{i}") for i in range(3)]
    other = ob.record("did:plc:t", "create", "d")
    offer_all(t, [first, big, newer[0], other, newer[1], newer[2]], batched)  # refused in the middle of the run
    await wait_for(lambda: len(taken) == 2, 30, "the events that are not behind the refused one")
    await asyncio.sleep(2.5)  # at least one retry of the big one, and past the stall timeout
    st = t.stats()
    assert set(taken) == {first.key, other.key}
    assert st.blocked_dids == 1 and st.held == 3 and st.unacked == 4
    assert t.resets == 0
    assert st.produced[cfg.kafka_topic_prefix + "events"] == 2, "newer events of did:plc:s must not be produced"

    t._conf["message.max.bytes"] = 1_000_000  # the operator raises the limit; a new producer takes it
    t._start_reset("test: limit raised")
    await wait_for(lambda: len(set(taken)) == 6, 30, "everything after the limit was raised")
    st = t.stats()
    await t.stop()
    assert st.blocked_dids == 0 and st.held == 0
    msgs = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "events")
    ids = [orjson.loads(m.value())["id"] for m in sorted(msgs, key=lambda m: m.offset()) if m.key() == b"did:plc:s"]
    assert ids == [first.id, big.id] + [e.id for e in newer]


@pytest.mark.kafka
async def test_broker_back_empty_gets_its_topics_back_as_configured(broker_factory):
    """tansu restarted on the same port has no topics. The producer must not auto-create them
    with the broker's defaults (tansu: 4 partitions, delete policy): the target notices the
    missing topics well before the old 60 s watchdog (default TAP_KAFKA_STALL_TIMEOUT), creates
    them as configured and delivers what waited, in order."""
    broker = broker_factory("tansu")
    cfg = cfg_for(broker.bootstrap, kafka_partitions=2)
    assert cfg.kafka_stall_timeout < 60
    t, taken, ob = await _started_target(cfg)
    before = [ob.record(f"did:plc:e{i % 3}", "create", f"a{i}") for i in range(30)]
    for ev in before:
        t.offer(ev)
    await wait_for(lambda: len(taken) == 30, 30, "events before the restart")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, broker.restart)
    after = [ob.record(f"did:plc:e{i % 3}", "create", f"b{i}") for i in range(60)]
    for ev in after:
        t.offer(ev)
    await wait_for(lambda: len(set(taken)) == 90, 40, "events after the restart")
    resets = t.resets
    await t.stop()
    assert resets >= 1
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    md = admin.list_topics(timeout=10)
    et, rt = cfg.kafka_topic_prefix + "events", cfg.kafka_topic_prefix + "records"
    assert len(md.topics[et].partitions) == 2 and len(md.topics[rt].partitions) == 2
    res = ConfigResource(ConfigResource.Type.TOPIC, rt)
    assert admin.describe_configs([res])[res].result(timeout=10)["cleanup.policy"].value == "compact"
    msgs = read_all(broker.bootstrap, et)
    for d in range(3):
        did = f"did:plc:e{d}"
        ids = [orjson.loads(m.value())["id"] for m in sorted(msgs, key=lambda m: m.offset()) if m.key() == did.encode()]
        assert list(dict.fromkeys(ids)) == [e.id for e in after if e.did == did], (d, ids)


@pytest.mark.kafka
async def test_producer_reset_reproduces_everything_unacked_in_order(kafka_broker):
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=2)
    t, taken, ob = await _started_target(cfg)
    evs = [ob.record(f"did:plc:r{i % 5}", "create", f"k{i}") for i in range(2000)]
    for i, ev in enumerate(evs):
        t.offer(ev)
        if i == 1000:
            t._start_reset("test")  # as after a fatal idempotence error
    await wait_for(lambda: len(set(taken)) == len(evs), 60, "all taken after the reset")
    assert len(taken) == len(evs)  # once each
    await t.stop()
    assert t.resets == 1
    msgs = read_all(kafka_broker.bootstrap, cfg.kafka_topic_prefix + "events")
    for d in range(5):
        ids = [orjson.loads(m.value())["id"] for m in sorted(msgs, key=lambda m: m.offset())
               if m.key() == f"did:plc:r{d}".encode()]
        # at-least-once: a message may repeat after the reset, but never goes back in order
        # past one that was acked before it: the first occurrences are in id order, none missing
        first = list(dict.fromkeys(ids))
        assert first == sorted(first) and len(first) == 400


@pytest.mark.kafka
async def test_metrics_count_per_topic(kafka_broker):
    from prometheus_client import REGISTRY
    cfg = cfg_for(kafka_broker.bootstrap)
    et, rt = cfg.kafka_topic_prefix + "events", cfg.kafka_topic_prefix + "records"
    t, taken, ob = await _started_target(cfg)
    evs = [ob.record("did:plc:m", "create", f"k{i}") for i in range(10)] + [ob.identity("did:plc:m")]
    for ev in evs:
        t.offer(ev)
    await wait_for(lambda: len(taken) == 11, 30)
    await t.stop()

    def v(name, topic):
        return REGISTRY.get_sample_value(name, {"topic": topic})
    assert v("tapflow_kafka_produced_messages_total", et) == 11
    assert v("tapflow_kafka_produced_messages_total", rt) == 10
    assert v("tapflow_kafka_acked_messages_total", et) == 11
    assert v("tapflow_kafka_acked_messages_total", rt) == 10
    assert v("tapflow_kafka_failed_messages_total", et) is None
    assert REGISTRY.get_sample_value("tapflow_kafka_backlog_events") == 0
    assert REGISTRY.get_sample_value("tapflow_kafka_unacked_events") == 0


@pytest.mark.kafka
async def test_broker_outage_waits_then_delivers(broker_factory):
    """Broker stopped: nothing is taken meanwhile; a broker back on the same port (tansu comes
    back empty, so topics are created again) gets everything that was waiting, in order."""
    broker = broker_factory("tansu")
    await _outage(broker, expect_before=False)


@pytest.mark.kafka
async def test_broker_restart_with_data_kept(broker_factory):
    """noida with NOIDA_KEEP_DATA=1 keeps its log across a restart: after the outage the topic
    holds everything, the events produced before and during it, per DID in order."""
    broker = broker_factory("noida", NOIDA_KEEP_DATA="1")
    await _outage(broker, expect_before=True)


async def _outage(broker, expect_before: bool) -> None:
    cfg = cfg_for(broker.bootstrap, kafka_partitions=2)
    taken: list[bytes] = []
    # a replaced broker forgets our producer id; the watchdog notices in stall_timeout s
    t = KafkaTarget(cfg, taken.append, stall_timeout=3, producer_overrides={"statistics.interval.ms": 1000})
    await t.start()
    ob = Outbox()
    before = [ob.record(f"did:plc:o{i % 4}", "create", f"a{i}") for i in range(50)]
    for ev in before:
        t.offer(ev)
    await wait_for(lambda: len(taken) == 50, 30, "events before the outage")

    await asyncio.get_running_loop().run_in_executor(None, broker.stop)
    during = [ob.record(f"did:plc:o{i % 4}", "create", f"b{i}") for i in range(200)]
    during.append(ob.account_deleted("did:plc:o0", ["app.bsky.feed.post/a0"]))
    for ev in during:
        t.offer(ev)
    await asyncio.sleep(4)
    assert len(taken) == 50, "nothing may be taken while the broker is down"
    assert t.stats().unacked == len(during)
    assert t.resets == 0, "the stall watchdog must not fire while no broker is connected"

    # a new, empty broker (tansu) needs the topics again: the reset creates them (tansu also would, on first use)
    await asyncio.get_running_loop().run_in_executor(None, broker.start)
    await wait_for(lambda: len(set(taken)) == 50 + len(during), 90, "events after the outage")
    await t.stop()
    assert set(taken) == {e.key for e in before + during}
    msgs = read_all(broker.bootstrap, cfg.kafka_topic_prefix + "events")
    for d in range(4):
        did = f"did:plc:o{d}"
        want = [e.id for e in (before if expect_before else []) + during if e.did == did and not e.internal]
        ids = [orjson.loads(m.value())["id"] for m in sorted(msgs, key=lambda m: m.offset()) if m.key() == did.encode()]
        assert list(dict.fromkeys(ids)) == want, (d, ids)  # maybe repeats after a reset; none lost, in order
    state = last_values(read_all(broker.bootstrap, cfg.kafka_topic_prefix + "records"))
    assert state["at://did:plc:o0/app.bsky.feed.post/a0"] is None


@pytest.mark.kafka
async def test_stop_with_broker_down_takes_nothing_and_returns(broker_factory):
    broker = broker_factory("tansu")
    cfg = cfg_for(broker.bootstrap)
    taken: list[bytes] = []
    t = KafkaTarget(cfg, taken.append, stop_timeout=1)
    await t.start()
    broker.stop()
    ob = Outbox()
    for i in range(20):
        t.offer(ob.record("did:plc:z", "create", f"k{i}"))
    t0 = time.monotonic()
    await t.stop()
    assert time.monotonic() - t0 < 10
    assert taken == []


@pytest.mark.kafka
async def test_consumer_group_reads_the_events_topic(kafka_broker):
    """The docs/kafka.md consumer: a group with session.timeout.ms=6000 (tansu's slow first join)."""
    cfg = cfg_for(kafka_broker.bootstrap, kafka_partitions=2)
    t, taken, ob = await _started_target(cfg)
    evs = [ob.record(f"did:plc:g{i % 3}", "create", f"k{i}") for i in range(30)]
    for ev in evs:
        t.offer(ev)
    await wait_for(lambda: len(taken) == 30, 30)
    await t.stop()
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": f"g-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "session.timeout.ms": 6000})
    c.subscribe([cfg.kafka_topic_prefix + "events"])
    got = []
    deadline = time.monotonic() + 40
    try:
        while len(got) < 30 and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            got.append(orjson.loads(m.value())["id"])
        c.commit(asynchronous=False)
    finally:
        c.close()
    assert sorted(got) == sorted(e.id for e in evs)


@pytest.mark.kafka
def test_delivery_child_kafka_only_end_to_end(kafka_broker, tmp_path):
    """The delivery child (connectors.delivery_main) in kafka-only mode over an outbox written
    here: every event reaches Kafka, the internal row becomes a tombstone, and every outbox key
    is acked in the delivery database."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from store.db import _open_db
    from store.layout import DELIVERY_CFS, FLOW_CFS, encode_outbox_row

    flow = _open_db(tmp_path / "flow", FLOW_CFS, None)  # the flow process's role: primary writer
    try:
        ob = Outbox()
        evs = [ob.record(f"did:plc:e{i % 7}", "create", f"r{i}") for i in range(200)]
        evs += [ob.identity("did:plc:e3"), ob.account_deleted("did:plc:e1", ["app.bsky.feed.post/r1"])]
        b = flow.batch()
        for ev in evs:
            b.put(ev.key, encode_outbox_row(ev.did, ev.flags, ev.payload), flow.handle("outbox"))
        flow.write(b)
        flow.db.flush()
        prefix = f"e2e{uuid.uuid4().hex[:8]}."
        env = dict(os.environ, TAP_DATA_DIR=str(tmp_path), TAP_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
                   TAP_KAFKA_ONLY="true", TAP_BIND=f"127.0.0.1:{free_port()}", TAP_KAFKA_TOPIC_PREFIX=prefix,
                   TAP_KAFKA_PARTITIONS="3", TAP_METRICS_LISTEN="")
        root = Path(__file__).resolve().parent.parent
        child = subprocess.Popen([sys.executable, "-m", "connectors.delivery_main"], env=env, cwd=root,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            events: list = []
            while time.monotonic() < deadline and child.poll() is None:
                time.sleep(1)
                admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
                if prefix + "events" in admin.list_topics(timeout=10).topics:
                    events = read_all(kafka_broker.bootstrap, prefix + "events")
                    if len(events) >= 201:
                        break
            time.sleep(1.0)  # the follower writes acks in batches
        finally:
            child.terminate()
            out = child.communicate(timeout=30)[0]
        assert len(events) == 201, out[-3000:]
        assert {m.value() for m in events} == {e.payload for e in evs if not e.internal}
        state = last_values(read_all(kafka_broker.bootstrap, prefix + "records"))
        assert len(state) == 200 and state["at://did:plc:e1/app.bsky.feed.post/r1"] is None
        delivery = _open_db(tmp_path / "delivery", DELIVERY_CFS, None)
        try:
            from store.layout import split_outbox_keys

            acked = {k for v in delivery.cf("acks").values() for k in split_outbox_keys(v)}
        finally:
            delivery.close()
        assert acked == {e.key for e in evs}, out[-3000:]
    finally:
        flow.close()
