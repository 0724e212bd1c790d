"""End-to-end throughput, latency and memory of the whole service, against the replay upstream.

    /root/.venvs/tapflow/bin/python -m bench.pipeline                        # everything, synthetic data
    python -m bench.pipeline --data captured                                 # PDS-captured data (bench/capture.py)
    python -m bench.pipeline --only backfill-channel,live --runs 3
    python -m bench.pipeline --small 5000 --small-records 150 --huge 5 --huge-records 50000 --commits 50000

Every measure starts ``python -m bytewax.run flows.tap`` with a fresh data dir against
``bench/upstream.py`` (relay + PDS + PLC + resolveHandle on loopback, its own process), and a
consumer process from ``bench/consumers.py``. Measures (each also prints the CPU seconds each
process used, so you can see who was the bottleneck on this 2-core machine):

- ``backfill-channel`` / ``backfill-webhook`` / ``backfill-kafka``: every repo of the data set
  is added in one ``/repos/add`` (the firehose held); records/s from the add until the last
  record event reached the acking ``/channel`` client / the webhook receiver / Kafka
  (``TAP_KAFKA_ONLY``; a consumer reads ``<prefix>events`` back).
- ``live``: after the backfill, the firehose is released at full speed; verified commits/s
  from the release until the last live record event reached the acking client.
- ``latency``: the same at a steady ``--rate`` (1,000) commits/s (``latency@250``: at 250/s); per event, client receive
  time minus the time the upstream wrote the frame to its socket; p50/p99/max.
- ``rss``: peak RSS (flow + delivery child) while tracking ``--rss-repos`` (1M) repos: a
  fully synced data set first, then 1M DIDs that stay pending (their PLC lookups hang),
  RSS after every batch of adds; then the 1M are removed and another 1M added: memory must
  not grow with repos ever seen.
- ``<measure>:1p``: the same measure with verification inside the flow process
  (``TAP_VERIFY_WORKERS=0``: one process does everything but delivery); without the suffix the
  flow runs with its verification pool (``TAP_VERIFY_WORKERS``, default 2 processes, repo CARs;
  live commits too with 2+ CPUs); ``<measure>:pool`` forces live commits into the pool
  (``TAP_LIVE_VERIFY=pool``), ``<measure>:inline`` keeps them in the flow process with the pool
  running for repo CARs (``TAP_LIVE_VERIFY=inline``). bytewax's own ``-w``/``-i/-a`` are refused
  by the service (``runtime/topology.py``).

Per-core limits of the same run come from ``bench/protocol.py`` (imported), printed next to each
figure. Data sets are cached under ``$HOME/.cache/tapflow-bench``. The last line holds the figures
as ``name=value`` pairs (best run; the table shows best and median).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Consumer, KafkaBroker, ProcWatch, Service, Upstream, hwm_mb, loadavg  # noqa: E402
from bench.replay import DEFAULT_CACHE_DIR, ReplayData  # noqa: E402

CACHE = DEFAULT_CACHE_DIR
TARGETS = {
    "backfill_channel_records_per_s": (">=", 50_000),
    "backfill_kafka_records_per_s": (">=", 50_000),
    "live_commits_per_s": (">=", 8_000),
    "p99_ms": ("<", 50),
    "rss_1m_repos_mb": ("<", 1000),
}


#: ``<measure>:<variant>``: the settings a variant runs with
VARIANTS = {
    "1p": {"TAP_VERIFY_WORKERS": "0"},  # everything in the flow process (plus the delivery child)
    "pool": {"TAP_LIVE_VERIFY": "pool"},  # live #commit frames verified in the pool's lanes too
    "inline": {"TAP_LIVE_VERIFY": "inline"},  # live #commit frames verified by RepoLogic, repo CARs in the pool
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def summary(path: Path) -> dict:
    """Counts the measures need, cached next to the data file: DIDs, records per repo,
    per frame (did, rev, ops)."""
    side = path.with_suffix(".summary.json")
    if side.exists() and side.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(side.read_text())
    from bench.upstream import frame_index
    from protocol.car import read_car
    from protocol.cbor import decode

    data = ReplayData.load(path)
    recs = []
    for r in data.repos:
        car = read_car(r.car0)
        commit = decode(car.blocks[car.roots[0]])
        # count leaves of the MST (no verification needed: the service verifies)
        n, stack = 0, [commit["data"]]
        while stack:
            node = decode(car.blocks[stack.pop()])
            if node.get("l"):
                stack.append(node["l"])
            for e in node["e"]:
                n += 1
                if e.get("t"):
                    stack.append(e["t"])
        recs.append(n)
    frames = frame_index(data)
    s = {"path": str(path), "params": {k: v for k, v in data.params.items() if k != "docs"},
         "dids": data.dids, "records": recs, "frames": frames, "car_bytes": sum(len(r.car0) for r in data.repos)}
    side.write_text(json.dumps(s))
    return s


def synthetic(args) -> Path:
    from bench.upstream import load_mixed

    t = time.time()
    _, path = load_mixed(args.small, args.small_records, args.huge, args.huge_records, args.commits,
                         seed=args.seed, cache_dir=CACHE, progress=log)
    log(f"synthetic data {path.name} ready in {time.time() - t:.0f}s")
    return path


def captured(args) -> Path:
    paths = sorted(CACHE.glob("captured-*.pkl"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise SystemExit("no captured data: run  python -m bench.capture  first")
    return paths[-1]


# ----------------------------------------------------------------------------- per-core limits


def protocol_limits(runs: int = 3) -> dict:
    """``bench/protocol.py`` run in this process; its ``name=value`` line as floats, plus
    ``commit_per_s`` (#commit verification), ``backfill_per_s`` (repo verification + records
    to JSON, per record), ``sig_us`` (the secp256k1 yardstick) whatever the version prints."""
    import re

    import bench.protocol as bp

    buf = io.StringIO()
    argv = sys.argv
    sys.argv = ["bench/protocol.py", "--runs", str(runs)]
    try:
        with contextlib.redirect_stdout(buf):
            bp.main()
    finally:
        sys.argv = argv
    lines = buf.getvalue().strip().splitlines()
    kv_lines = [ln for ln in lines if ln.strip() and all("=" in tok for tok in ln.split())]
    res: dict = {}
    if kv_lines:
        for tok in kv_lines[-1].split():
            k, _, v = tok.partition("=")
            try:
                res[k] = float(v)
            except ValueError:
                pass
    text = "\n".join(ln for ln in lines if ln not in kv_lines[-1:])
    if "sig_us" not in res:
        m = re.search(r"(?:secp256k1|signature) verify[^0-9]*([0-9.]+) us", text)
        if m:
            res["sig_us"] = float(m.group(1))
    res["commit_per_s"] = res.get("commit_verify_per_s", 0.0)
    res["backfill_per_s"] = res.get("repo_json_records_per_s", res.get("repo_verify_records_per_s", 0.0))
    res["_text"] = text
    return res


# ----------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy record (raw collapsed stacks) of the flow and delivery processes."""

    def __init__(self, out_dir: Path | None, name: str) -> None:
        self.out_dir = out_dir
        self.name = name
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, pids: dict[str, int]) -> None:
        if self.out_dir is None:
            return
        spy = Path(sys.executable).parent / "py-spy"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pid in pids.items():
            out = self.out_dir / f"{self.name}-{role}.txt"
            p = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                                  "--nonblocking", "--threads", "--output", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((role, p, out))

    def stop(self) -> list[Path]:
        outs = []
        for role, p, out in self.procs:
            p.send_signal(2)  # py-spy writes its output on SIGINT
        for role, p, out in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            outs.append(out)
        return outs


# ----------------------------------------------------------------------------- measures


def _service_env(kind: str, extra: dict) -> dict:
    env = {"TAP_RESYNC_PARALLELISM": "8"}
    env.update(extra)
    return env


def _cpu_line(w: dict, n: int, unit: str) -> str:
    wait = w.get("runq_wait_s", {})
    own = w.get("own_cpu_s", {})
    parts = [f"{k} {v:.1f}s ({v / n * 1e6:.0f} us/{unit}"
             + (f", of which the process itself {own[k] / n * 1e6:.0f} and its workers "
                f"{(v - own[k]) / n * 1e6:.0f}" if k in own and v - own[k] > 0.05 * v else "")
             + f"; waited for a CPU {wait.get(k, 0):.1f}s)"
             for k, v in w["cpu_s"].items() if n]
    return ", ".join(parts) + (f"; machine busy {w['machine_busy_cores']:.2f} of {w['machine_cores']:.1f} cores, "
                               f"others {w['other_cpu_s']:.1f}s")


def measure_backfill(path: Path, s: dict, target: str, tmp: Path, args, broker: KafkaBroker | None = None) -> dict:
    """Add every repo; records/s until the consumer has them all."""
    n_records = sum(s["records"])
    n_repos = len(s["dids"])
    up = Upstream(path, hold=True, log_dir=tmp)
    env = {"TAP_RESYNC_PARALLELISM": str(args.resync_parallelism)}
    cons_args: list[str] = []
    if target == "channel":
        pass
    elif target == "webhook":
        from tests.e2e_support import free_port

        port = free_port()
        env["TAP_WEBHOOK_URL"] = f"http://127.0.0.1:{port}/hook"
        cons_args = ["--port", str(port)]
    elif target == "kafka":
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        env.update(TAP_KAFKA_BOOTSTRAP=broker.bootstrap, TAP_KAFKA_ONLY="true", TAP_KAFKA_TOPIC_PREFIX=prefix)
        cons_args = ["--bootstrap", broker.bootstrap, "--topic", prefix + "events"]
    env.update(args.env)
    svc = Service(up.url, tmp / f"svc-{target}", **env)
    cons = None
    prof = Profiler(args.profile, f"backfill-{target}") if args.profile else None
    try:
        if target == "webhook":
            cons = Consumer("webhook", *cons_args, out=tmp / f"cons-{target}.json")
        svc.start()
        if target == "channel":
            cons = Consumer("channel", "--url", svc.url.replace("http", "ws") + "/channel", out=tmp / "cons-channel.json")
        elif target == "kafka":
            cons = Consumer("kafka", *cons_args, out=tmp / "cons-kafka.json")
        time.sleep(1.0)
        pids = svc.pids()
        w = ProcWatch({**pids, "upstream": up.pid, "consumer": cons.pid}).start()
        if prof:
            prof.start(pids)
        load0 = loadavg()
        t0 = time.monotonic()
        svc.add(s["dids"])
        ok = cons.wait(lambda st: st["records"] >= n_records, timeout=args.timeout)
        t_end = cons.status["t_last"]
        watch = w.stop()
        if prof:
            prof.stop()
        st = cons.status
        if not ok:
            log(f"backfill-{target}: timeout with {st['records']}/{n_records} records; service log:\n{svc.log_tail()}")
        elapsed = (t_end - t0) if ok else float("nan")
        res = {"records": st["records"], "expected": n_records, "repos": n_repos, "identity": st["identity"],
               "elapsed_s": elapsed, "records_per_s": n_records / elapsed if ok else 0.0,
               "first_event_s": st["t_first"] - t0 if st["t_first"] else None, "ok": ok, "watch": watch,
               "load": (load0, loadavg()), "peak_flow_rss_mb": watch["peak_rss_mb"].get("flow", 0.0),
               "peak_flow_anon_mb": watch["peak_anon_mb"].get("flow", 0.0)}
        log(f"backfill-{target}: {res['records_per_s']:,.0f} records/s ({n_records:,} records, {n_repos:,} repos "
            f"in {elapsed:.1f}s; first event after {res['first_event_s'] or 0:.2f}s); "
            f"CPU {_cpu_line(watch, n_records, 'record')}; peak RSS (sampled every {w.interval}s) flow with its "
            f"workers {res['peak_flow_rss_mb']:.0f} MB (not file-backed {res['peak_flow_anon_mb']:.0f} MB; "
            f"{watch['first_rss_mb'].get('flow', 0.0):.0f} and {watch['first_anon_mb'].get('flow', 0.0):.0f} MB "
            f"before the add), "
            f"delivery {watch['peak_rss_mb'].get('delivery', 0.0):.0f} MB")
        return res
    finally:
        if cons:
            cons.stop()
        svc.stop()
        up.stop()
        svc.cleanup()


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def measure_live(path: Path, s: dict, tmp: Path, args, rate: float = 0.0) -> dict:
    """Backfill with the firehose held, then release it (at ``rate`` frames/s, 0 = full speed)."""
    name = "latency" if rate else "live"
    n_records = sum(s["records"])
    frames = s["frames"]
    n_frames = len(frames) if not rate else min(len(frames), int(rate * args.latency_seconds))
    n_ops = sum(f[2] for f in frames[:n_frames])
    up = Upstream(path, hold=True, rate=rate, log_dir=tmp)
    env = {"TAP_RESYNC_PARALLELISM": str(args.resync_parallelism), **args.env}
    svc = Service(up.url, tmp / f"svc-{name}", **env)
    cons = None
    prof = Profiler(args.profile, name) if args.profile else None
    try:
        svc.start()
        cons = Consumer("channel", "--url", svc.url.replace("http", "ws") + "/channel",
                        out=tmp / f"cons-{name}.json", keep_live=bool(rate))
        time.sleep(0.5)
        tb = time.monotonic()
        svc.add(s["dids"])
        if not cons.wait(lambda st: st["records"] >= n_records, timeout=args.timeout):
            raise RuntimeError(f"{name}: backfill incomplete: {cons.status}\n{svc.log_tail()}")
        backfill_s = cons.status["t_last"] - tb
        time.sleep(1.0)  # let the outbox drain and acks settle
        pids = svc.pids()
        w = ProcWatch({**pids, "upstream": up.pid, "consumer": cons.pid}).start()
        if prof:
            prof.start(pids)
        t0 = time.monotonic()
        up.release(n_frames)
        ok = cons.wait(lambda st: st["live"] >= n_ops, timeout=args.timeout)
        t_end = cons.status["t_last"]
        watch = w.stop()
        if prof:
            prof.stop()
        st = cons.status
        if not ok:
            log(f"{name}: timeout with {st['live']}/{n_ops} live events; service log:\n{svc.log_tail()}")
        elapsed = (t_end - t0) if ok else float("nan")
        res = {"commits": n_frames, "ops": n_ops, "live_events": st["live"], "elapsed_s": elapsed,
               "commits_per_s": n_frames / elapsed if ok else 0.0, "ok": ok, "watch": watch,
               "backfill_s": backfill_s, "backfill_records_per_s": n_records / backfill_s}
        if rate:
            result = cons.stop()
            cons = None
            sendlog = up.sendlog(-1)
            starts = [p for _, p in sendlog]
            times = [t for t, _ in sendlog]
            pos_of = {(d, r): i for i, (d, r, _) in enumerate(frames[:n_frames])}
            lat = []
            t_first_send = times[0] if times else t0
            for did, rev, t_recv in result["live_events"]:
                p = pos_of.get((did, rev))
                if p is None:
                    continue
                k = bisect.bisect_right(starts, p) - 1
                if k < 0:
                    continue
                lat.append(((t_recv - times[k]) * 1e3, times[k] - t_first_send))
            steady = [ms for ms, ts in lat if ts >= args.warmup]
            all_ms = [ms for ms, _ in lat]
            res.update(samples=len(lat), p50_ms=_percentile(steady, 50), p99_ms=_percentile(steady, 99),
                       max_ms=max(steady) if steady else float("nan"), p99_all_ms=_percentile(all_ms, 99),
                       sent_rate=(len(frames[:n_frames]) / (times[-1] - times[0])) if len(times) > 1 else 0.0)
            log(f"latency at {rate:.0f}/s: p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max "
                f"{res['max_ms']:.1f} ms ({len(steady)} events after {args.warmup}s warm-up; p99 incl. warm-up "
                f"{res['p99_all_ms']:.1f} ms); CPU {_cpu_line(watch, n_frames, 'commit')}")
        else:
            log(f"live: {res['commits_per_s']:,.0f} commits/s ({n_frames:,} commits, {n_ops:,} ops in {elapsed:.1f}s); "
                f"CPU {_cpu_line(watch, n_frames, 'commit')}")
            if args.peers and not args.env.get("TAP_VERIFY_WORKERS") and not args.env.get("TAP_LIVE_VERIFY"):
                # same upstream, same frames, the service stopped first (once: not for variants)
                from bench import peers

                cons.stop()
                cons = None
                svc.stop()
                data = ReplayData.load(path)
                res["peers"] = peers.run_all(up.url, data, args.peer_ts_commits, args.peer_commits, log)
                res["peer_versions"] = peers.versions()
        return res
    finally:
        if cons:
            cons.stop()
        svc.stop()
        up.stop()
        svc.cleanup()


def rss_data(args) -> Path:
    """The fully synced part of the memory measure: small repos (cached)."""
    from bench.upstream import load_mixed

    _, path = load_mixed(args.rss_synced, 50, 0, 0, 5000, seed=3, cache_dir=CACHE, progress=log)
    return path


def _fake_dids(start: int, n: int) -> list[str]:
    """Syntactically valid did:plc strings no upstream knows (fast: no RNG per DID)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    out = []
    for i in range(start, start + n):
        x, chars = i * 2654435761 % (1 << 120), []
        for _ in range(24):
            chars.append(alphabet[x & 31])
            x >>= 5
        out.append("did:plc:" + "".join(chars))
    return out


def measure_rss(tmp: Path, args) -> dict:
    """Peak RSS of flow + delivery while tracking ``args.rss_repos`` repos (see module doc)."""
    path = rss_data(args)
    s = summary(path)
    n_records = sum(s["records"])
    up = Upstream(path, hold=True, hang_unknown=True, log_dir=tmp)
    svc = Service(up.url, tmp / "svc-rss", TAP_RESYNC_PARALLELISM=str(args.resync_parallelism), **args.env)
    cons = None
    steps: list[dict] = []
    try:
        svc.start()
        cons = Consumer("channel", "--url", svc.url.replace("http", "ws") + "/channel", out=tmp / "cons-rss.json")
        pids = svc.pids()
        w = ProcWatch(pids, interval=0.5).start()

        def step(name: str, tracked: int, t: float) -> None:
            rss = {k: v for k, v in w.samples[-1][1].items()} if w.samples else {}
            row = {"step": name, "tracked": tracked, "rss_mb": rss, "total_mb": sum(rss.values()),
                   "repo_count": svc.stat("repo-count"), "secs": time.monotonic() - t}
            steps.append(row)
            log(f"rss {name}: tracked {tracked:,} (repo-count {row['repo_count']:,}), "
                + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()) + f", total {row['total_mb']:.0f} MB "
                f"({row['secs']:.1f}s)")

        time.sleep(1.0)
        step("idle", 0, time.monotonic())
        t = time.monotonic()
        svc.add(s["dids"])
        cons.wait(lambda st: st["records"] >= n_records, timeout=args.timeout)
        time.sleep(1.0)
        synced = len(s["dids"])
        step(f"{synced:,} repos synced ({n_records:,} records)", synced, t)
        n, batch = args.rss_repos, args.rss_batch

        def add_pending(first: int, label: str) -> float:
            t = time.monotonic()
            for k in range(0, n, batch):
                svc.add(_fake_dids(first + k, min(batch, n - k)), batch=batch)
                want = synced + k + min(batch, n - k)
                deadline = time.monotonic() + 300
                while svc.stat("repo-count") < want and time.monotonic() < deadline:
                    time.sleep(0.2)
                if (k // batch) % max(1, (n // batch) // 4) == 0 or k + batch >= n:
                    step(f"{label} +{k + min(batch, n - k):,} pending", synced + k + min(batch, n - k), t)
            return time.monotonic() - t

        add_s = add_pending(10_000_000, "A")
        # live commits on the synced repos while 1M are pending
        t = time.monotonic()
        up.release()
        n_ops = sum(f[2] for f in s["frames"])
        cons.wait(lambda st: st["live"] >= n_ops, timeout=120)
        step(f"live: {len(s['frames']):,} commits on the synced repos", synced + n, t)
        # repos ever seen: remove the million, add another million (``--rss-rounds`` in all)
        rounds = [("A", 10_000_000)]
        for r in range(1, max(2, args.rss_rounds)):
            label, first = chr(ord("A") + r), 10_000_000 + 20_000_000 * r
            t = time.monotonic()
            prev_label, prev_first = rounds[-1]
            for k in range(0, n, batch):
                svc.remove(_fake_dids(prev_first + k, min(batch, n - k)), batch=batch)
            deadline = time.monotonic() + 600
            while svc.stat("repo-count") > synced and time.monotonic() < deadline:
                time.sleep(0.5)
            step(f"{prev_label} removed", synced, t)
            add_pending(first, label)
            time.sleep(3.0)
            step(f"{label} settled", synced + n, time.monotonic())
            rounds.append((label, first))
        watch = w.stop()
        hwm = {k: hwm_mb(p) for k, p in pids.items()}
        peak = watch["peak_rss_mb"]
        a_end = next(r for r in steps if r["step"].startswith("A +") and r["tracked"] == synced + n)
        b_end = next(r for r in steps if r["step"] == "B settled")
        settled = [r["total_mb"] for r in steps if r["step"].endswith(" settled")]
        res = {"steps": steps, "peak_rss_mb": peak, "peak_total_mb": max(sum(r["rss_mb"].values()) for r in steps),
               "peak_sampled_total_mb": max(sum(x[1].values()) for x in w.samples), "hwm_mb": hwm,
               "hwm_total_mb": sum(hwm.values()), "adds_per_s": n / add_s, "synced": synced,
               "synced_records": n_records, "tracked": synced + n,
               "growth_b_vs_a_mb": b_end["total_mb"] - a_end["total_mb"],
               "growth_last_round_mb": settled[-1] - (settled[-2] if len(settled) > 1 else a_end["total_mb"]),
               "watch": watch, "ok": True}
        log(f"rss: peak {res['peak_sampled_total_mb']:.0f} MB (flow+delivery, sampled), per-process peak (VmHWM) "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in hwm.items()) + f"; adds {res['adds_per_s']:,.0f}/s; "
            f"after a second million {res['growth_b_vs_a_mb']:+.0f} MB, after the last {res['growth_last_round_mb']:+.0f} MB")
        return res
    finally:
        if cons:
            cons.stop()
        svc.stop()
        up.stop()
        svc.cleanup()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic", help="synthetic | captured | path to a ReplayData pickle")
    ap.add_argument("--small", type=int, default=5000, help="synthetic: small repos")
    ap.add_argument("--small-records", type=int, default=150, help="synthetic: mean records of a small repo")
    ap.add_argument("--huge", type=int, default=5, help="synthetic: huge repos")
    ap.add_argument("--huge-records", type=int, default=50_000)
    ap.add_argument("--commits", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="backfill-channel,backfill-channel:1p,backfill-webhook,backfill-kafka,live,live:1p,"
                                      "latency,rss")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1000.0, help="latency: commits/s")
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=3.0, help="latency: seconds left out at the start")
    ap.add_argument("--resync-parallelism", type=int, default=8)
    ap.add_argument("--rss-repos", type=int, default=1_000_000, help="rss: pending repos added")
    ap.add_argument("--rss-batch", type=int, default=50_000, help="rss: DIDs per /repos/add")
    ap.add_argument("--rss-rounds", type=int, default=2,
                    help="rss: rounds of (remove the last million, add a new one), counting the first add")
    ap.add_argument("--rss-synced", type=int, default=2_000, help="rss: fully synced repos (50 records each)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy raw profiles of flow + delivery into DIR")
    ap.add_argument("--set", action="append", default=[], metavar="TAP_X=V", help="extra service setting")
    ap.add_argument("--no-limits", action="store_true", help="skip bench/protocol.py")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="live: skip the peers")
    ap.add_argument("--peer-commits", type=int, default=20_000, help="frames the Python SDK and tapflow-verify read")
    ap.add_argument("--peer-ts-commits", type=int, default=3_000, help="frames @atproto/sync reads (slow)")
    args = ap.parse_args(argv)
    args.env = dict(kv.split("=", 1) for kv in args.set)
    only = [x.strip() for x in args.only.split(",") if x.strip()]

    if args.data == "synthetic":
        path = synthetic(args)
    elif args.data == "captured":
        path = captured(args)
    else:
        path = Path(args.data)
    s = summary(path)
    log(f"data {path.name}: {len(s['dids']):,} repos, {sum(s['records']):,} records "
        f"(largest {max(s['records']):,}), {len(s['frames']):,} commits, {s['car_bytes'] / 1e6:.0f} MB of CARs")
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-bench-"))
    results: dict[str, list] = {}
    limits = {}
    if not args.no_limits:
        log("per-core limits (bench/protocol.py) ...")
        limits = protocol_limits()
        print(limits["_text"])
    broker = None
    try:
        for run in range(args.runs):
            for m in only:
                log(f"run {run + 1}/{args.runs}: {m}")
                base, _, variant = m.partition(":")
                margs = args
                mtmp = tmp / m.replace(":", "-").replace("@", "-at-")
                mtmp.mkdir(parents=True, exist_ok=True)
                if variant in VARIANTS:
                    margs = argparse.Namespace(**vars(args))
                    margs.env = {**args.env, **VARIANTS[variant]}
                    if args.profile:
                        margs.profile = args.profile / variant
                try:
                    if variant and variant not in VARIANTS:
                        log(f"unknown variant {variant}")
                        continue
                    if base.startswith("backfill-"):
                        target = base.split("-", 1)[1]
                        if target == "kafka" and broker is None:
                            broker = KafkaBroker()
                        r = measure_backfill(path, s, target, mtmp, margs, broker)
                    elif base == "live":
                        r = measure_live(path, s, mtmp, margs)
                    elif base.startswith("latency"):
                        rate = float(base.split("@", 1)[1]) if "@" in base else args.rate
                        r = measure_live(path, s, mtmp, margs, rate=rate)
                    elif base == "rss":
                        r = measure_rss(tmp, margs)
                    else:
                        log(f"unknown measure {m}")
                        continue
                except Exception as e:  # report and go on with the other measures
                    log(f"{m} failed: {e!r}")
                    r = {"ok": False, "error": repr(e)}
                results.setdefault(m, []).append(r)
    finally:
        if broker is not None:
            broker.stop()
    (tmp / "results.json").write_text(json.dumps({"limits": {k: v for k, v in limits.items() if k != "_text"},
                                                  "results": results}, default=str))
    log(f"raw results: {tmp / 'results.json'}")
    report(results, limits, s, args)


def _best_median(rs: list[dict], key: str, lower: bool = False) -> tuple[float, float]:
    xs = sorted(r[key] for r in rs if r.get("ok") and isinstance(r.get(key), (int, float)) and r[key] == r[key])
    if not xs:
        return float("nan"), float("nan")
    return (xs[0] if lower else xs[-1]), xs[len(xs) // 2]


def _cpu_per(rs: list[dict], n_key: str) -> float:
    """Least flow+delivery CPU microseconds per unit over the runs."""
    out = []
    for r in rs:
        w = r.get("watch")
        if r.get("ok") and w and r.get(n_key):
            out.append((w["cpu_s"].get("flow", 0) + w["cpu_s"].get("delivery", 0)) / r[n_key] * 1e6)
    return min(out) if out else float("nan")


def report(results: dict, limits: dict, s: dict, args) -> None:
    """The table, then the figures as name=value pairs (the last line)."""
    lim_c = limits.get("commit_per_s", float("nan"))
    lim_b = limits.get("backfill_per_s", float("nan"))
    rows = []
    fig: dict[str, object] = {}

    def row(name, rs, key, unit, limit=None, limit_name="", lower=False, n_key=None):
        best, med = _best_median(rs, key, lower)
        tgt = TARGETS.get(name)
        status = ""
        if tgt and best == best:
            status = "met" if (best >= tgt[1] if tgt[0] == ">=" else best < tgt[1]) else "MISSED"
        cpu = _cpu_per(rs, n_key) if n_key else float("nan")
        rows.append((name, best, med, unit, f"{limit:,.0f} {limit_name}" if limit else "",
                     f"{best / limit:.2f}" if limit and best == best else "",
                     f"{cpu:,.0f}" if cpu == cpu else "", f"{tgt[0]} {tgt[1]:,}" if tgt else "", status, len(rs)))
        if best == best:
            fig[name] = round(best, 1) if best < 100 else round(best)

    def variant_suffix(m: str) -> str:
        variant = m.partition(":")[2]
        return "_" + variant if variant else ""

    for m in results:
        base = m.partition(":")[0]
        if base in ("backfill-channel", "backfill-webhook", "backfill-kafka"):
            row(base.replace("-", "_") + "_records_per_s" + variant_suffix(m), results[m], "records_per_s", "records/s",
                lim_b, "verify+JSON/core", n_key="expected")
            row(base.replace("-", "_") + "_peak_flow_rss_mb" + variant_suffix(m), results[m], "peak_flow_rss_mb", "MB",
                lower=True)
            row(base.replace("-", "_") + "_peak_flow_anon_mb" + variant_suffix(m), results[m], "peak_flow_anon_mb", "MB",
                lower=True)
        elif base == "live":
            row("live_commits_per_s" + variant_suffix(m), results[m], "commits_per_s", "commits/s", lim_c, "verify/core",
                n_key="commits")
    for m in results:
        if not m.startswith("latency"):
            continue
        base = m.partition(":")[0]
        sfx = ("" if base == "latency" else "_at_" + base.split("@", 1)[1].split(".")[0]) + variant_suffix(m)
        row("p50_ms" + sfx, results[m], "p50_ms", "ms", lower=True)
        row("p99_ms" + sfx, results[m], "p99_ms", "ms", lower=True)
        row("latency_commits_per_s" + sfx, results[m], "commits_per_s", "commits/s", n_key="commits")
    if "rss" in results:
        row("rss_1m_repos_mb", results["rss"], "peak_sampled_total_mb", "MB", lower=True)
        row("rss_growth_second_million_mb", results["rss"], "growth_b_vs_a_mb", "MB", lower=True)
        row("rss_growth_last_million_mb", results["rss"], "growth_last_round_mb", "MB", lower=True)
        row("adds_per_s", results["rss"], "adds_per_s", "repos/s")
    print()
    print(f"{'figure':36s} {'best':>10s} {'median':>10s} {'unit':10s} {'per-core limit (same run)':>28s} "
          f"{'ratio':>6s} {'us CPU/unit':>11s} {'target':>10s} {'':7s} runs")
    for name, best, med, unit, lim, ratio, cpu, tgt, status, n in rows:
        print(f"{name:36s} {best:10,.1f} {med:10,.1f} {unit:10s} {lim:>28s} {ratio:>6s} {cpu:>11s} {tgt:>10s} "
              f"{status:7s} {n}")
    if "live" in results:
        peers = {}
        for r in results["live"]:
            for p in r.get("peers", []):
                if p.get("commits_per_s"):
                    peers[p["name"]] = max(peers.get(p["name"], 0), p["commits_per_s"])
        live = fig.get("live_commits_per_s")
        if peers:
            print()
            print(f"{'same frames, same run':45s} {'commits/s':>10s} {'tapflow service / peer':>24s}")
            print(f"{'tapflow service (verify+store+deliver+ack)':45s} {live or 0:10,.0f}")
            for name, v in peers.items():
                print(f"{name:45s} {v:10,.0f} {(live or 0) / v:24.2f}")
                fig[f"{name}_commits_per_s"] = round(v)
                if live:
                    fig[f"live_vs_{name}"] = round(live / v, 2)
    fig["limit_commit_verify_per_s"] = round(lim_c) if lim_c == lim_c else "nan"
    fig["limit_backfill_records_per_s"] = round(lim_b) if lim_b == lim_b else "nan"
    if limits.get("sig_us"):
        fig["sig_us"] = limits["sig_us"]
    fig["load_avg"] = loadavg()
    print(" ".join(f"{k}={v}" for k, v in fig.items()))


if __name__ == "__main__":
    main()
