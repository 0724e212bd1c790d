"""The flow's CPU per acked outbox key (``connectors.acks.AckApplier.apply``), in-process.

    python -m bench.acks_apply                       # live-like: lone keys, 50 per batch
    python -m bench.acks_apply --batch 1000 --run 500   # backfill-like: runs of consecutive ids

Writes ``--keys`` outbox rows (~400-byte events) over 64 shards, as RepoLogic does (one id
sequence for all shards: a live ack names lone keys, a backfill ack runs of one repo's ids),
then ack batches through the delivery child's ``AckLog`` after the applier's first look, and
times the applier's rounds of ``--round`` keys (ControlSource's 20 ms at ~5,000 acks/s is ~100).
Figures: CPU µs per key (``time.process_time``); last line ``name=value``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.acks import AckApplier, AckLog  # noqa: E402
from store.db import _open_db  # noqa: E402
from store.layout import DELIVERY_CFS, FLOW_CFS, encode_outbox_row, outbox_key  # noqa: E402

BODY = (b'{"id":1,"type":"record","record":{"live":true,"did":"did:plc:abc","rev":"3k","collection":'
        b'"app.bsky.feed.post","rkey":"x","action":"create","cid":"bafy","record":{"text":"' + b"x" * 200 + b'"}}}')


def run(keys_n: int, batch: int, run_len: int, round_keys: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-acks-"))
    try:
        flow = _open_db(tmp / "flow", FLOW_CFS, None)
        delivery = _open_db(tmp / "delivery", DELIVERY_CFS, None)
        rnd = random.Random(1)
        keys: list[bytes] = []
        h = flow.handle("outbox")
        b = flow.batch()
        shard = 0
        for i in range(1, keys_n + 1):
            if (i - 1) % run_len == 0:
                shard = rnd.randrange(64)
            k = outbox_key(shard, i)
            keys.append(k)
            b.put(k, encode_outbox_row("did:plc:abc", 1, BODY), h)
            if i % 500 == 0:
                flow.write(b)
                b = flow.batch()
        flow.write(b)
        log = AckLog(delivery, flow)
        log.load()
        applier = AckApplier(flow, max_keys=round_keys)
        applier.apply(delivery)  # the first look: no batch yet
        order = keys[:]
        if run_len == 1:
            rnd.shuffle(order)  # live acks come in no particular id order
        for i in range(0, keys_n, batch):
            log.write(order[i:i + batch])
        t0 = time.process_time()
        n = 0
        while (r := applier.apply(delivery)) is not None:
            n += r
        dt = time.process_time() - t0
        if n != keys_n:
            raise RuntimeError(f"deleted {n} of {keys_n}")
        flow.close()
        delivery.close()
        return dt / n * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=50, help="keys per ack batch (one child flush)")
    ap.add_argument("--run", type=int, default=1, help="consecutive ids per shard (1 = live, lone keys)")
    ap.add_argument("--round", type=int, default=100, help="keys per applier round (max_keys)")
    args = ap.parse_args(argv)
    us = run(args.keys, args.batch, args.run, args.round)
    print(f"{us:.2f} µs CPU per acked key (batches of {args.batch}, runs of {args.run}, rounds of {args.round})")
    print(f"acks_us_per_key={us:.2f}")


if __name__ == "__main__":
    main()
