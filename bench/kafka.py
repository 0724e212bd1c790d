"""Throughput of the Kafka delivery target from a pre-filled outbox.

    python bench/kafka.py                      # starts a throw-away tansu broker (../shared/kafka)
    python bench/kafka.py --bootstrap HOST:PORT --events 300000 --runs 3

Fills a RocksDB outbox (a temp data dir, not timed) with synthetic record events (90%
creates of ~150-byte posts, 5% updates, 5% deletes, a few identity events) spread over
many DIDs and shards, then times, per configuration: reading the outbox in key order,
``KafkaTarget.offer`` of every event, until ``on_taken`` was called for all of them (broker
acks for both messages of each record event: ``<prefix>events`` + ``<prefix>records``).
At most ``--window`` events are unacked at once, as the delivery child does (outbox capacity).

Prints a table and, last, ``kafka_records_per_s=N``: events/s of the default configuration
(best run), one record event = 2 Kafka messages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402
from connectors.kafka import KafkaTarget  # noqa: E402
from operators.events import identity_body, record_body, with_id  # noqa: E402
from store.db import close_all, open_flow_db  # noqa: E402
from store.layout import FLAG_LIVE, encode_outbox_row, outbox_key, shard_of  # noqa: E402
from store.outbox import OutboxEvent  # noqa: E402

SHARED_KAFKA = Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared")) / "kafka"
WORDS = ("the quick brown fox jumps over a lazy dog while atproto repos sync through kafka "
         "topics with ordered partitions and compacted records").split()


def fill_outbox(data_dir: Path, n: int, shards: int, dids: int, seed: int = 7) -> int:
    """Write n synthetic events into data_dir's flow outbox; returns the payload bytes."""
    rnd = random.Random(seed)
    db = open_flow_db(data_dir)
    cf, h = db.cf("outbox"), db.handle("outbox")
    did_list = [f"did:plc:{uuid.UUID(int=rnd.getrandbits(128)).hex[:24]}" for _ in range(dids)]
    next_id = [0] * shards
    rkeys: dict[str, list[str]] = {}
    total = 0
    batch = db.batch()
    for i in range(n):
        did = did_list[rnd.randrange(dids)]
        shard = shard_of(did, shards)
        next_id[shard] += 1
        eid = i + 1  # global, strictly increasing; per shard in id order
        r = rnd.random()
        mine = rkeys.setdefault(did, [])
        if r < 0.002:
            payload = with_id(eid, "identity", identity_body(did=did, handle=f"u{i}.test", is_active=True,
                                                               status="active"))
        else:
            if r < 0.90 or not mine:
                action, rkey = "create", f"3l{i:011d}"
                mine.append(rkey)
            elif r < 0.95:
                action, rkey = "update", rnd.choice(mine)
            else:
                action, rkey = "delete", mine.pop(rnd.randrange(len(mine)))
            text = " ".join(rnd.choice(WORDS) for _ in range(18))
            rec = (b'{"$type":"app.bsky.feed.post","createdAt":"2025-01-01T00:00:00.000Z","langs":["en"],"text":"'
                   + text.encode() + b'"}')
            cid = "bafyrei" + uuid.UUID(int=rnd.getrandbits(128)).hex + "abcdefghijklmnopqrs"
            body = record_body(live=r < 0.5, did=did, rev=f"3l{eid:011d}", collection="app.bsky.feed.post",
                               rkey=rkey, action=action, cid=cid, record_json=rec)
            payload = with_id(eid, "record", body)
        total += len(payload)
        batch.put(outbox_key(shard, eid), encode_outbox_row(did, FLAG_LIVE, payload), h)
        if i % 10000 == 9999:
            db.write(batch)
            batch = db.batch()
    db.write(batch)
    return total


def read_outbox(data_dir: Path) -> list[OutboxEvent]:
    db = open_flow_db(data_dir)
    return [OutboxEvent.from_row(k, v) for k, v in db.cf("outbox").items()]


async def run_once(bootstrap: str, data_dir: Path, window: int, overrides: dict, partitions: int) -> dict:
    cfg = Config(kafka_bootstrap=bootstrap, kafka_topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
                 kafka_partitions=partitions)
    done = 0
    wake = asyncio.Event()

    def taken(_key: bytes) -> None:
        nonlocal done
        done += 1
        if done % 1000 == 0 or inflight_limit_hit[0]:
            wake.set()

    inflight_limit_hit = [False]
    t = KafkaTarget(cfg, taken, producer_overrides=overrides)
    await t.start()
    db = open_flow_db(data_dir)
    t0 = time.perf_counter()
    offered = 0
    it = db.cf("outbox").iter()
    it.seek_to_first()
    while it.valid():
        ev = OutboxEvent.from_row(it.key(), it.value())
        t.offer(ev)
        offered += 1
        it.next()
        if offered % 500 == 0:
            await asyncio.sleep(0)
        while offered - done >= window:
            inflight_limit_hit[0] = True
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    inflight_limit_hit[0] = True
    while done < offered:
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    dt = time.perf_counter() - t0
    st = t.stats()
    await t.stop()
    msgs = sum(st.acked.values())
    return {"events": offered, "messages": msgs, "seconds": dt, "failed": sum(st.failed.values()),
            "resets": st.resets}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(kind: str) -> tuple[str, int]:
    port = free_port()
    env = dict(os.environ, KAFKA_VENV=sys.prefix)
    out = subprocess.run(["bash", str(SHARED_KAFKA / "start-broker.sh"), kind, str(port)], env=env,
                         capture_output=True, text=True, check=True).stdout
    vals = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return vals["BOOTSTRAP"], port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="existing broker (default: start tansu on a free port)")
    ap.add_argument("--broker", default="tansu", choices=("tansu", "noida"))
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--dids", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--window", type=int, default=100_000, help="most unacked events at once")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="also compare compression and linger settings")
    a = ap.parse_args()

    port = None
    bootstrap = a.bootstrap
    if not bootstrap:
        bootstrap, port = start_broker(a.broker)
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-bench-kafka-"))
    try:
        t0 = time.perf_counter()
        nbytes = fill_outbox(tmp, a.events, a.shards, a.dids)
        print(f"outbox: {a.events} events, {nbytes / 1e6:.1f} MB payload, filled in {time.perf_counter() - t0:.1f}s; "
              f"broker {bootstrap} ({a.broker if port else 'given'}), {a.partitions} partitions, "
              f"window {a.window}", flush=True)
        configs = [("default (lz4, linger 20ms)", {})]
        if a.all:
            configs += [("no compression", {"compression.type": "none"}),
                        ("linger 5ms", {"linger.ms": 5}),
                        ("zstd", {"compression.type": "zstd"})]
        rows = []
        best_default = 0.0
        for name, over in configs:
            for r in range(a.runs):
                res = asyncio.run(run_once(bootstrap, tmp, a.window, over, a.partitions))
                eps = res["events"] / res["seconds"]
                rows.append((name, r + 1, res["events"], res["messages"], res["seconds"], eps,
                             res["messages"] / res["seconds"], nbytes / res["seconds"] / 1e6, res["failed"]))
                if not over:
                    best_default = max(best_default, eps)
        hdr = f"{'config':28} {'run':>3} {'events':>8} {'messages':>9} {'seconds':>8} {'events/s':>9} {'msgs/s':>9} {'MB/s':>6} {'failed':>6}"
        print(hdr)
        print("-" * len(hdr))
        for name, r, ev, ms, s, eps, mps, mbs, f in rows:
            print(f"{name:28} {r:>3} {ev:>8} {ms:>9} {s:>8.2f} {eps:>9.0f} {mps:>9.0f} {mbs:>6.1f} {f:>6}")
        print(f"kafka_records_per_s={best_default:.0f}")
    finally:
        close_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if port:
            subprocess.run(["bash", str(SHARED_KAFKA / "stop-broker.sh"), str(port)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
