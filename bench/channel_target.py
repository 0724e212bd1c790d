"""The ``/channel`` target alone: CPU per event of ``ChannelTarget`` with one acking client.

    python -m bench.channel_target --events 200000 --runs 3
    python -m bench.channel_target --cprofile /tmp/channel.prof

The delivery child's figure in ``bench.pipeline`` mixes the target with the outbox follower
(RocksDB catch-up and reads) and moves with the machine's load; this measures the target's own
code, in-process: an aiohttp server with ``ChannelTarget.handle`` on ``/channel``, the events
already in memory (record events of ~500 bytes over 200 DIDs), offered in runs of 170 (what the
follower hands over per shard in a backfill) while at most 100,000 are in flight, and
``bench.consumers channel`` (a process of its own) acking every event. Figure: CPU of this
process (``getrusage``: the server's event loop) per event, from the first offer until every
event was taken. Last line: ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from bench.harness import PY, free_port, loadavg  # noqa: E402
from config import Config  # noqa: E402
from connectors.channel import ChannelTarget  # noqa: E402
from connectors.targets import AckTracker  # noqa: E402
from store.outbox import OutboxEvent  # noqa: E402

DIDS = [f"did:plc:bench{i:019d}" for i in range(200)]
RUN = 170  # events per offer_many (a shard's new rows per follower visit in a backfill)
IN_FLIGHT = 100_000  # the default outbox capacity


def make_event(i: int) -> OutboxEvent:
    """A historical record event as operators.events writes it (~500 bytes)."""
    did = DIDS[i % len(DIDS)]
    shard = i % 64
    payload = (b'{"id":%d,"type":"record","record":{"live":false,"did":"%s","rev":"3kb3fge5lm32x",'
               b'"collection":"app.bsky.feed.post","rkey":"3k%d","action":"create","record":{"text":"'
               % (i, did.encode(), i)) + b"x" * 350 + b'"},"cid":"bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5kpqcsgz7soqm4y"}}'
    return OutboxEvent(shard.to_bytes(2, "big") + i.to_bytes(8, "big"), shard, i, did, 0, payload)


async def run_once(n: int, prof: cProfile.Profile | None) -> dict:
    events = [make_event(i) for i in range(1, n + 1)]
    done = 0

    def completed(keys: list[bytes]) -> None:
        nonlocal done
        done += len(keys)

    tracker = AckTracker(1, lambda k: completed([k]), completed)
    tracker.bind_loop(asyncio.get_running_loop())
    ch = ChannelTarget(Config(), tracker.callback(0))
    app = web.Application()
    app.router.add_get("/channel", ch.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await ch.start()
    client = subprocess.Popen([PY, "-m", "bench.consumers", "channel", "--url", f"ws://127.0.0.1:{port}/channel",
                               "--status-every", "5"], cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while not ch.clients:
            await asyncio.sleep(0.01)
        gc.collect()
        gc.freeze()  # as the delivery child does (connectors.delivery_main.tune_gc)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        if prof is not None:
            prof.enable()
        i = 0
        while done < n:
            if i < n and tracker.in_flight < IN_FLIGHT:
                chunk = events[i:i + 5000]
                tracker.register_many([e.key for e in chunk])
                for j in range(0, len(chunk), RUN):
                    ch.offer_many(chunk[j:j + RUN])
                i += len(chunk)
            await asyncio.sleep(0.005)
        if prof is not None:
            prof.disable()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    finally:
        client.stdin.close()
        client.terminate()
        client.wait()
        await ch.stop()
        await runner.cleanup()
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"events": n, "seconds": t1 - t0, "us_per_event": (user + sys_) / n * 1e6,
            "user_us": user / n * 1e6, "sys_us": sys_ / n * 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cprofile", type=Path, default=None, help="cProfile stats of the last run into FILE")
    args = ap.parse_args(argv)
    gc.set_threshold(10_000, 10, 10)  # as the delivery child
    best = float("inf")
    for k in range(args.runs):
        prof = cProfile.Profile() if args.cprofile is not None and k == args.runs - 1 else None
        r = asyncio.run(run_once(args.events, prof))
        if prof is not None:
            prof.dump_stats(str(args.cprofile))
        else:
            best = min(best, r["us_per_event"])
        print(f"run {k + 1}: {r['events'] / r['seconds']:,.0f} events/s, CPU {r['us_per_event']:.2f} µs per event "
              f"(user {r['user_us']:.2f}, system {r['sys_us']:.2f}){' under cProfile' if prof else ''}; "
              f"load {loadavg():.1f}", flush=True)
    print(f"channel_target_us_per_event={best:.2f}")


if __name__ == "__main__":
    main()
