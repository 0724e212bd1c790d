"""The delivery child alone on live events: CPU per event and latency at a fixed rate.

    python -m bench.delivery_live --rate 2500 --seconds 4 --runs 2
    python -m bench.delivery_live --rate 1000,2500 --profile /tmp/dl-prof

The end-to-end ``live`` measure (``bench.pipeline``) ties the delivery child's CPU per commit to
the rate the flow reaches, which on this shared machine moves with everyone else's load; a
fixed-rate figure for the child is what before/after comparisons of its code need. This bench
plays the flow's part itself: it owns ``data/flow`` (primary), writes one WriteBatch per live
commit exactly as RepoLogic does (a repo row, one ``FLAG_LIVE`` outbox row, the shard's outbox
counter and the counters' one-key copy), at ``--rate`` commits/s over 200 DIDs, and applies the child's ack batches like
ControlSource (``connectors.acks.AckApplier`` every 20 ms). The child is
``python -m connectors.delivery_main`` (``/channel`` in ack mode), the client
``bench.consumers channel`` (acks every event). Figures: the child's CPU µs per event
(``/proc``), and write → client receive latency p50/p99/max (``time.monotonic()``, system-wide).
Last line: ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.harness import PY, Consumer, cpu_s, free_port, http_json, loadavg, runq_wait_s  # noqa: E402
from connectors.acks import AckApplier  # noqa: E402
from operators.events import ID_HEAD, kind_mid, record_body  # noqa: E402
from store.db import close_all, open_delivery_db, open_flow_db  # noqa: E402
from store.layout import (FLAG_LIVE, META_OUTBOX_COUNTS, meta_counter, outbox_key, outbox_row_head,  # noqa: E402
                          pack_counts, pack_u64, shard_of)

SHARDS = 64
DIDS = [f"did:plc:bench{i:019d}" for i in range(200)]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def _health(port: int) -> int:
    try:
        return http_json("GET", f"http://127.0.0.1:{port}/health", timeout=5)[0]
    except OSError:
        return 0


def run_once(rate: float, seconds: float, tmp: Path, profile: Path | None, cprofile: Path | None = None) -> dict:
    data = tmp / "data"
    flow = open_flow_db(data)
    port = free_port()
    env = {**os.environ, "TAP_DATA_DIR": str(data), "TAP_BIND": f"127.0.0.1:{port}", "TAP_LOG_LEVEL": "warn",
           "TAP_SHARDS": str(SHARDS), "TAP_RETRY_TIMEOUT": "60s", "PYTHONPATH": str(ROOT)}
    env.pop("TAPFLOW_PARENT_PID", None)
    cmd = [PY, "-m", "connectors.delivery_main"]
    if cprofile is not None:  # deterministic call counts (slower: compare within cProfile runs only)
        cmd = [PY, "-c", "import cProfile, runpy, time; p = cProfile.Profile(time.process_time)\ntry:\n"
               " p.runcall(runpy.run_module, 'connectors.delivery_main', run_name='__main__')\n"
               f"except SystemExit:\n pass\np.dump_stats({str(cprofile)!r})"]
    child = subprocess.Popen(cmd, cwd=str(ROOT), env=env,
                             stdout=open(tmp / "delivery.log", "wb"), stderr=subprocess.STDOUT)
    cons = None
    spy = None
    try:
        deadline = time.monotonic() + 60
        while _health(port) != 200:
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("delivery child did not start: " + (tmp / "delivery.log").read_text()[-2000:])
            time.sleep(0.1)
        cons = Consumer("channel", "--url", f"ws://127.0.0.1:{port}/channel", out=tmp / "cons.json", keep_live=True)
        time.sleep(1.0)  # child up, client connected
        applier = AckApplier(flow)
        delivery = None
        n = int(rate * seconds)
        h_out, h_meta, h_repos = flow.handle("outbox"), flow.handle("meta"), flow.handle("repos")
        counts = [0] * SHARDS
        sent: dict[tuple[str, str], float] = {}
        mid = kind_mid("record")
        state = orjson.dumps({"state": "active", "rev": "x" * 13, "prev_data": "b" * 59, "handle": "h.test"})
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "--pid", str(child.pid), "--format", "raw",
                                    "--rate", "250", "--nonblocking", "--output",
                                    str(profile / f"delivery-{rate:.0f}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        cpu0, wait0 = cpu_s(child.pid), runq_wait_s(child.pid)
        t0 = time.monotonic()
        next_apply = t0
        eid = 1
        for i in range(n):
            due = t0 + i / rate
            while True:
                now = time.monotonic()
                if now >= next_apply:
                    if delivery is None:
                        try:
                            delivery = open_delivery_db(data, secondary=True)
                        except Exception:
                            delivery = None
                    if delivery is not None:
                        delivery.catch_up()
                        applier.apply(delivery)
                    next_apply = now + 0.020
                if now >= due:
                    break
                time.sleep(min(due - now, max(0.0, next_apply - now), 0.001))
            did = DIDS[i % len(DIDS)]
            rev = f"3l{i:011d}"
            s = shard_of(did, SHARDS)
            body = record_body(live=True, did=did, rev=rev, collection="app.bsky.feed.post", rkey=f"r{i}",
                               action="create", cid="bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
                               record_json=b'{"$type":"app.bsky.feed.post","text":"hello world","createdAt":'
                                           b'"2024-01-01T00:00:00.000Z"}')
            wb = flow.batch()
            wb.put(did.encode(), state, h_repos)
            wb.put(outbox_key(s, eid), b"%b%d%b%b}" % (outbox_row_head(did, FLAG_LIVE) + ID_HEAD, eid, mid, body), h_out)
            counts[s] += 1
            wb.put(meta_counter("outbox", s), pack_u64(counts[s]), h_meta)
            wb.put(META_OUTBOX_COUNTS, pack_counts(counts), h_meta)
            sent[(did, rev)] = time.monotonic()
            flow.write(wb)
            eid += 1
        t_written = time.monotonic()
        ok = cons.wait(lambda st: st["live"] >= n, timeout=60)
        t_end = cons.status["t_last"]
        cpu = cpu_s(child.pid) - cpu0
        wait = runq_wait_s(child.pid) - wait0
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
            spy = None
        result = cons.stop()
        cons = None
        lat = [(t - sent[(d, r)]) * 1e3 for d, r, t in result.get("live_events", []) if (d, r) in sent]
        return {"rate": rate, "events": n, "ok": ok, "write_rate": n / (t_written - t0), "elapsed_s": t_end - t0,
                "delivery_cpu_s": cpu, "delivery_us_per_event": cpu / n * 1e6, "delivery_runq_wait_s": wait,
                "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99), "max_ms": max(lat) if lat else float("nan"),
                "samples": len(lat)}
    finally:
        if spy is not None:
            spy.kill()
        if cons is not None:
            cons.stop()
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
        close_all()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="2500", help="commits/s, comma list")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy raw profile of the child into DIR")
    ap.add_argument("--cprofile", type=Path, default=None, help="run the child under cProfile, stats into FILE")
    args = ap.parse_args(argv)
    figs: dict[str, float] = {}
    for rate in [float(r) for r in args.rate.split(",")]:
        rs = []
        for k in range(args.runs):
            tmp = Path(tempfile.mkdtemp(prefix="tapflow-dl-"))
            try:
                r = run_once(rate, args.seconds, tmp, args.profile if k == 0 else None, args.cprofile)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            rs.append(r)
            print(f"rate {rate:.0f}/s (written at {r['write_rate']:.0f}/s): delivery {r['delivery_us_per_event']:.1f} µs CPU"
                  f"/event (waited for a CPU {r['delivery_runq_wait_s']:.2f}s), latency p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms ({r['samples']}/{r['events']} events"
                  f"{'' if r['ok'] else ', INCOMPLETE'}); load {loadavg():.1f}", flush=True)
        tag = f"{rate:.0f}"
        figs[f"delivery_us_per_event@{tag}"] = round(min(r["delivery_us_per_event"] for r in rs), 1)
        figs[f"p99_ms@{tag}"] = round(min(r["p99_ms"] for r in rs), 1)
    print(" ".join(f"{k}={v}" for k, v in figs.items()))


if __name__ == "__main__":
    main()
