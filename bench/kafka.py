"""Throughput of the Kafka delivery target: verified backfill into Kafka, and the target alone.

    python -m bench.kafka                      # starts a throw-away tansu broker (../shared/kafka)
    python -m bench.kafka --bootstrap HOST:PORT --events 300000 --runs 3 --all
    python -m bench.kafka --no-verified        # the target only (no service run)

**Verified backfill** (``--verified``, on by default): the whole service (flow + delivery child
with ``TAP_KAFKA_ONLY``) backfills the captured data set (bench.pipeline's ``backfill-kafka``:
every repo fetched, verified, its records produced to ``<prefix>events`` + ``<prefix>records``)
while a Kafka consumer counts the records; records/s until the consumer has them all, and the
CPU per record of the flow and of the delivery child.

**Target only**: 
Fills a RocksDB outbox (a temp data dir, not timed) with synthetic record events (90%
creates of ~150-byte posts, 5% updates, 5% deletes, a few identity events) spread over
many DIDs and shards, then times, per configuration, two paths until ``on_taken`` was called
for every event (the broker acked both messages of each record event: ``<prefix>events`` +
``<prefix>records``):

- ``outbox``: read the outbox from RocksDB in key order, ``OutboxEvent.from_row``, ``offer_many`` in runs of 500;
- ``target``: ``offer_many`` in runs of 500 of events already read into memory (the target's own cost).

At most ``--window`` events are unacked at once, as the delivery child does (outbox capacity).
Prints a table with the event-loop thread's CPU per event and the process's (librdkafka's
threads included), then ``kafka_target_records_per_s=N`` and ``kafka_records_per_s=N``: record
events/s of the default configuration on the target and outbox paths (best run; one record
event = 2 Kafka messages), and, last, ``kafka_verified_backfill_records_per_s=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402
from tests.e2e_support import free_port  # noqa: E402
from connectors.kafka import KafkaTarget  # noqa: E402
from operators.events import identity_body, record_body, with_id  # noqa: E402
from store.db import close_all, open_flow_db  # noqa: E402
from store.layout import FLAG_IDENTITY, FLAG_LIVE, encode_outbox_row, outbox_key, shard_of  # noqa: E402
from store.outbox import OutboxEvent  # noqa: E402

SHARED_KAFKA = Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared")) / "kafka"
WORDS = ("the quick brown fox jumps over a lazy dog while atproto repos sync through kafka "
         "topics with ordered partitions and compacted records").split()


def fill_outbox(data_dir: Path, n: int, shards: int, dids: int, seed: int = 7) -> int:
    """Write n synthetic events into data_dir's flow outbox; returns the payload bytes."""
    rnd = random.Random(seed)
    db = open_flow_db(data_dir)
    h = db.handle("outbox")
    did_list = [f"did:plc:{uuid.UUID(int=rnd.getrandbits(128)).hex[:24]}" for _ in range(dids)]
    rkeys: dict[str, list[str]] = {}
    total = 0
    batch = db.batch()
    for i in range(n):
        did = did_list[rnd.randrange(dids)]
        shard = shard_of(did, shards)
        eid = i + 1  # global, strictly increasing; per shard in id order
        r = rnd.random()
        mine = rkeys.setdefault(did, [])
        flags = FLAG_LIVE if r < 0.5 else 0
        if r < 0.002:
            flags |= FLAG_IDENTITY
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
        batch.put(outbox_key(shard, eid), encode_outbox_row(did, flags, payload), h)
        if i % 10000 == 9999:
            db.write(batch)
            batch = db.batch()
    db.write(batch)
    return total


async def run_once(bootstrap: str, data_dir: Path, window: int, overrides: dict, partitions: int,
                   events: list[OutboxEvent] | None = None) -> dict:
    """Offer every outbox event (read from RocksDB, or the pre-read ``events``) and wait until
    all are taken. At most ``window`` events unacked at once."""
    cfg = Config(kafka_bootstrap=bootstrap, kafka_topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
                 kafka_partitions=partitions)
    done = 0
    waiting = False
    wake = asyncio.Event()

    def taken(_key: bytes) -> None:
        nonlocal done
        done += 1
        if waiting:
            wake.set()

    t = KafkaTarget(cfg, taken, producer_overrides=overrides)
    await t.start()
    source = events if events is not None else (
        OutboxEvent.from_row(k, v) for k, v in open_flow_db(data_dir).cf("outbox").items())
    t0 = time.perf_counter()
    c0 = time.thread_time()
    p0 = time.process_time()
    offered = 0
    run: list[OutboxEvent] = []
    for ev in source:  # in runs of 500, as the outbox follower offers a shard's new rows
        run.append(ev)
        if len(run) < 500:
            continue
        t.offer_many(run)
        offered += len(run)
        run = []
        await asyncio.sleep(0)
        while offered - done >= window:
            waiting = True
            wake.clear()
            await wait_any(wake, 1.0)
    if run:
        t.offer_many(run)
        offered += len(run)
    waiting = True
    while done < offered:
        wake.clear()
        await wait_any(wake, 0.5)
    dt = time.perf_counter() - t0
    cpu = time.thread_time() - c0
    pcpu = time.process_time() - p0
    st = t.stats()
    await t.stop()
    msgs = sum(st.acked.values())
    return {"events": offered, "messages": msgs, "seconds": dt, "cpu": cpu, "pcpu": pcpu,
            "failed": sum(st.failed.values()),
            "resets": st.resets}


async def wait_any(ev: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(ev.wait(), timeout)
    except asyncio.TimeoutError:
        pass


def verified_backfill(bootstrap: str, a: argparse.Namespace) -> dict:
    """bench.pipeline's backfill-kafka (the whole service, TAP_KAFKA_ONLY) against ``bootstrap``."""
    from bench import pipeline

    ns = argparse.Namespace(data=a.data, resync_parallelism=8, env={}, profile=a.profile, timeout=900,
                            small=5000, small_records=150, huge=5, huge_records=50_000, commits=60_000, seed=0)
    path = pipeline.captured(ns) if a.data == "captured" else (
        pipeline.synthetic(ns) if a.data == "synthetic" else Path(a.data))
    s = pipeline.summary(path)
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-bench-kafka-verified-"))
    try:
        return pipeline.measure_backfill(path, s, "kafka", tmp, ns, argparse.Namespace(bootstrap=bootstrap))
    except Exception as e:  # report it in the table, keep the other figures
        print(f"verified backfill failed: {e!r}", flush=True)
        return {"ok": False}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def proc_cpu(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (the broker), 0 if unknown."""
    if not pid:
        return 0.0
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def start_broker(kind: str) -> tuple[str, int, int | None]:
    port = free_port()
    env = dict(os.environ, KAFKA_VENV=sys.prefix)
    out = subprocess.run(["bash", str(SHARED_KAFKA / "start-broker.sh"), kind, str(port)], env=env,
                         capture_output=True, text=True, check=True).stdout
    vals = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return vals["BOOTSTRAP"], port, int(vals["PID"]) if vals.get("PID", "").isdigit() else None


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
    ap.add_argument("--no-verified", dest="verified", action="store_false",
                    help="skip the verified backfill through the whole service")
    ap.add_argument("--data", default="captured", help="verified backfill: bench.pipeline's --data")
    ap.add_argument("--profile", type=Path, default=None, help="verified backfill: py-spy profiles into DIR")
    a = ap.parse_args()

    port = pid = None
    bootstrap = a.bootstrap
    if not bootstrap:
        bootstrap, port, pid = start_broker(a.broker)
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-bench-kafka-"))
    try:
        t0 = time.perf_counter()
        nbytes = fill_outbox(tmp, a.events, a.shards, a.dids)
        print(f"outbox: {a.events} synthetic events ({nbytes / 1e6:.1f} MB of JSON) filled in "
              f"{time.perf_counter() - t0:.1f}s; broker {bootstrap} ({a.broker if port else 'given'}), "
              f"{a.partitions} partitions, window {a.window}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cpus", flush=True)
        events = [OutboxEvent.from_row(k, v) for k, v in open_flow_db(tmp).cf("outbox").items()]
        configs = [("default (lz4, linger 20ms)", {})]
        if a.all:
            configs += [("no compression", {"compression.type": "none"}),
                        ("zstd", {"compression.type": "zstd"}),
                        ("linger 5ms", {"linger.ms": 5})]
        rows = []
        best = best_target = 0.0
        for name, over in configs:
            for mode in ("outbox", "target"):
                for r in range(a.runs):
                    b0 = proc_cpu(pid)
                    res = asyncio.run(run_once(bootstrap, tmp, a.window, over, a.partitions,
                                               events if mode == "target" else None))
                    eps = res["events"] / res["seconds"]
                    rows.append((name, mode, r + 1, res, eps, proc_cpu(pid) - b0))
                    if not over and mode == "outbox":
                        best = max(best, eps)
                    if not over and mode == "target":
                        best_target = max(best_target, eps)
        verified = verified_backfill(bootstrap, a) if a.verified else None
        hdr = (f"{'config':27} {'path':8} {'run':>3} {'events':>7} {'msgs':>7} {'seconds':>7} {'events/s':>8} "
               f"{'msgs/s':>8} {'MB/s':>5} {'cpu us/ev':>9} {'proc us/ev':>10} {'cpu-bound ev/s':>14} "
               f"{'broker cpu s':>12} {'failed':>6}")
        print(hdr)
        print("-" * len(hdr))
        for name, mode, r, res, eps, bcpu in rows:
            us = res["cpu"] / res["events"] * 1e6
            print(f"{name:27} {mode:8} {r:>3} {res['events']:>7} {res['messages']:>7} {res['seconds']:>7.2f} "
                  f"{eps:>8.0f} {res['messages'] / res['seconds']:>8.0f} {nbytes / res['seconds'] / 1e6:>5.1f} "
                  f"{us:>9.1f} {res['pcpu'] / res['events'] * 1e6:>10.1f} {1e6 / us:>14.0f} {bcpu:>12.1f} "
                  f"{res['failed']:>6}")
        if verified is not None:
            v = verified
            cpu = v.get("watch", {}).get("cpu_s", {})
            n = v.get("expected") or 1
            print(f"{'verified backfill (service)':27} {'verified':8} {1:>3} {v.get('records', 0):>7} {'':>7} "
                  f"{v.get('elapsed_s', float('nan')):>7.2f} {v.get('records_per_s', 0):>8.0f} {'':>8} {'':>5} "
                  f"{'':>9} {cpu.get('delivery', 0) / n * 1e6:>10.1f} {'':>14} {'':>12} "
                  f"{'' if v.get('ok') else 'FAIL':>6}")
        print("path: outbox = RocksDB outbox read + OutboxEvent.from_row + offer; target = offer of pre-read events;")
        print("verified = the whole service backfilling the captured repos (fetch, verify, produce), records/s until")
        print("a consumer read them all; its proc us/ev is the delivery child's CPU per record (flow: below).")
        print("cpu us/ev = CPU of the event-loop thread per event (offer, delivery reports, on_taken, reading);")
        print("proc us/ev = CPU of the whole process per event (librdkafka's threads included);")
        print("cpu-bound ev/s = what the event-loop thread could do on a core of its own. One event = 2 Kafka")
        print(f"messages (events + records topics). Load average now {os.getloadavg()[0]:.1f}.")
        if verified is not None and verified.get("ok"):
            cpu = verified["watch"]["cpu_s"]
            n = verified["expected"]
            print(f"verified backfill: flow {cpu.get('flow', 0) / n * 1e6:.0f} us/record, delivery "
                  f"{cpu.get('delivery', 0) / n * 1e6:.0f} us/record (CPU); machine busy "
                  f"{verified['watch']['machine_busy_cores']:.2f} of {verified['watch']['machine_cores']:.1f} cores")
        print(f"kafka_target_records_per_s={best_target:.0f}")
        print(f"kafka_records_per_s={best:.0f}")
        vps = verified["records_per_s"] if verified and verified.get("ok") else 0.0
        print(f"kafka_verified_backfill_records_per_s={vps:.0f}")
    finally:
        close_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if port:
            subprocess.run(["bash", str(SHARED_KAFKA / "stop-broker.sh"), str(port)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
