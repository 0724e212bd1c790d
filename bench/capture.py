"""Capture a data set from the reference PDS harness, for the replay upstream.

    /root/.venvs/tapflow/bin/python -m bench.capture [--accounts 200 --records 500 --commits 3000] [--force]

Starts the PDS + PLC harness (``../shared/harness/pds``, on free ports, DID documents in the
current plc.directory "Multikey" format), then:

1. creates ``--accounts`` accounts with ``--records`` posts each (the harness's ``load.mjs``,
   ``applyWrites`` batches of 100);
2. waits for the firehose to go quiet and notes its last seq;
3. downloads what a sync service reads for every account: ``getRepo`` (the CAR), the PLC
   DID document (bytes as served), the handle (``alsoKnownAs``);
4. subscribes to the firehose from that seq and runs ``--commits`` single-op live commits on
   the existing accounts (``bench/capture_live.mjs``: creates of posts/likes/follows,
   updates, deletes), keeping every frame's bytes.

The result is a :class:`bench.replay.ReplayData` (``params["docs"]`` holds the DID documents)
cached as ``$HOME/.cache/tapflow-bench/captured-a{A}-r{R}-c{C}.pkl``; ``bench/upstream.py``
serves it and ``bench/pipeline.py --data captured`` uses the newest one. Frames and CARs are the
PDS's bytes; two things change when they are served: the ``seq`` of each ``#commit`` (renumbered
1..N, so the stream has no gaps; the value is spliced into the same bytes), and the
``#atproto_pds`` endpoint of the DID documents (the replay server's URL instead of the PDS's).
Capture time on this 2-core machine: about 0.3 s per 100 records plus ~0.02 s per live
commit; the table at the end says how long it took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replay import DEFAULT_CACHE_DIR, ReplayData, RepoInfo, _SEQ_SENTINEL, _cbor_uint  # noqa: E402
from protocol import cbor  # noqa: E402
from protocol.car import read_car  # noqa: E402
from tests.e2e_support import HARNESS, node_bin, start_pds  # noqa: E402

CACHE = DEFAULT_CACHE_DIR


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_path(accounts: int, records: int, commits: int) -> Path:
    return CACHE / f"captured-a{accounts}-r{records}-c{commits}.pkl"


class FirehoseTap:
    """Raw frames of ``subscribeRepos?cursor=N`` on a thread (websockets)."""

    def __init__(self, url: str, cursor: int) -> None:
        self.url = f"{url.replace('http', 'ws')}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}"
        self.frames: list[bytes] = []
        self.last_at = time.monotonic()
        self._stop = threading.Event()
        self._t = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import websockets

        async with websockets.connect(self.url, max_size=None, ping_interval=None) as ws:
            while not self._stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.recv(), 0.2)
                except asyncio.TimeoutError:
                    continue
                self.frames.append(bytes(msg))
                self.last_at = time.monotonic()

    def start(self) -> "FirehoseTap":
        self._t.start()
        return self

    def wait_quiet(self, idle: float, timeout: float, min_frames: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.frames) >= min_frames and time.monotonic() - self.last_at > idle:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _get(url: str, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _with_sentinel(frame: bytes, seq: int) -> tuple[bytes, int]:
    """``frame`` with its body's seq replaced by the replay sentinel; (bytes, offset of the int)."""
    want = b"\x63seq" + _cbor_uint(seq)
    header_len = len(cbor.encode(cbor.decode_multi(frame)[0]))
    start = header_len
    while True:
        k = frame.index(want, start)
        p = k + 4
        out = frame[:p] + b"\x1b" + _SEQ_SENTINEL.to_bytes(8, "big") + frame[p + len(_cbor_uint(seq)):]
        hdr, body = cbor.decode_multi(out)
        orig = cbor.decode_multi(frame)[1]
        if body.get("seq") == _SEQ_SENTINEL and {**body, "seq": seq} == orig:
            return out, p
        start = k + 1


def capture(accounts: int, records: int, commits: int, concurrency: int = 8) -> tuple[ReplayData, dict]:
    os.environ.setdefault("PLC_DOC_FORMAT", "multikey")
    timings: dict[str, float] = {}
    t = time.monotonic()
    pds = start_pds()
    timings["harness_up_s"] = time.monotonic() - t
    log(f"PDS {pds.url}, PLC {pds.plc_url}")
    try:
        t = time.monotonic()
        load = pds.script("load.mjs", {"ACCOUNTS": str(accounts), "RECORDS": str(records), "MODE": "apply",
                                       "BATCH": "100", "CONCURRENCY": "4", "TAG": "bn"}, timeout=7200)
        timings["load_s"] = time.monotonic() - t
        dids: list[str] = load["dids"]
        log(f"loaded {len(dids)} accounts x {records} records in {timings['load_s']:.0f}s")

        # the firehose position after the load: replay from 0 until quiet
        t = time.monotonic()
        tap = FirehoseTap(pds.url, 0).start()
        tap.wait_quiet(idle=3.0, timeout=600, min_frames=1)
        tap.stop()
        seq0 = max(cbor.decode_multi(f)[1].get("seq", 0) for f in tap.frames)
        log(f"firehose at seq {seq0} ({len(tap.frames)} frames so far)")

        # what a sync service reads per account
        repos: list[RepoInfo] = []
        docs: dict[str, bytes] = {}
        for did in dids:
            car0 = _get(f"{pds.url}/xrpc/com.atproto.sync.getRepo?did={did}")
            doc = _get(f"{pds.plc_url}/{did}")
            docs[did] = doc
            d = json.loads(doc)
            handle = next((a[5:] for a in d.get("alsoKnownAs", []) if a.startswith("at://")), "handle.invalid")
            car = read_car(car0)
            commit = cbor.decode(car.blocks[car.roots[0]])
            repos.append(RepoInfo(did, handle, "k256", b"", car0, commit["rev"], car.roots[0], {}))
        timings["snapshot_s"] = time.monotonic() - t
        log(f"CARs + DID documents of {len(dids)} accounts in {timings['snapshot_s']:.0f}s")

        # live commits on those accounts, frames kept
        t = time.monotonic()
        tap = FirehoseTap(pds.url, seq0).start()
        env = {**os.environ, **pds.env, "PDS": pds.url, "HARNESS_PDS_DIR": str(HARNESS / "pds"),
               "COMMITS": str(commits), "CONCURRENCY": str(concurrency)}
        out = subprocess.run([node_bin(), str(ROOT / "bench" / "capture_live.mjs"), *dids], env=env,
                             capture_output=True, text=True, timeout=7200)
        if out.returncode != 0:
            raise RuntimeError(f"capture_live.mjs: {out.stdout[-1000:]} {out.stderr[-2000:]}")
        live = json.loads(out.stdout.strip().splitlines()[-1])
        tap.wait_quiet(idle=3.0, timeout=600, min_frames=live["commits"])
        tap.stop()
        timings["live_s"] = time.monotonic() - t
        log(f"live: {live} ; {len(tap.frames)} frames in {timings['live_s']:.0f}s")
    finally:
        pds.stop()

    index = {did: i for i, did in enumerate(dids)}
    frames: list[bytes] = []
    seq_at = array("I")
    frame_repo = array("I")
    skipped: dict[str, int] = {}
    for f in tap.frames:
        hdr, body = cbor.decode_multi(f)
        if hdr.get("t") != "#commit" or body.get("repo") not in index:
            skipped[str(hdr.get("t"))] = skipped.get(str(hdr.get("t")), 0) + 1
            continue
        g, p = _with_sentinel(f, body["seq"])
        frames.append(g)
        seq_at.append(p)
        frame_repo.append(index[body["repo"]])
    # The firehose replay from 0 may stop short of the head (it pages), so the live tap can start
    # inside the load: commits at or below a repo's snapshot rev are part of its CAR, not live.
    rev0 = {r.did: r.rev0 for r in repos}
    keep = [k for k in range(len(frames)) if cbor.decode_multi(frames[k])[1]["rev"] > rev0[dids[frame_repo[k]]]]
    skipped["#commit before the snapshot"] = len(frames) - len(keep)
    frames = [frames[k] for k in keep]
    seq_at = array("I", [seq_at[k] for k in keep])
    frame_repo = array("I", [frame_repo[k] for k in keep])
    params = {"kind": "captured", "source": "reference PDS harness (@atproto/pds 0.5.35)",
              "repos": len(dids), "records": records, "commits": len(frames), "seed": 0, "curve": "k256",
              "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timings": timings,
              "live_ops": live.get("ops"), "skipped_frames": skipped, "docs": docs}
    return ReplayData(params, repos, frames, seq_at, frame_repo), timings


def _drop_pre_snapshot(data: ReplayData) -> None:
    """Drop ``#commit`` frames a repo's snapshot (``rev0``) already holds."""
    keep = [k for k in range(len(data.frames))
            if cbor.decode_multi(data.frames[k])[1]["rev"] > data.repos[data.frame_repo[k]].rev0]
    data.params.setdefault("skipped_frames", {})["#commit before the snapshot"] = len(data.frames) - len(keep)
    data.frames = [data.frames[k] for k in keep]
    data.seq_at = array("I", [data.seq_at[k] for k in keep])
    data.frame_repo = array("I", [data.frame_repo[k] for k in keep])
    data.params["commits"] = len(data.frames)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=200)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--force", action="store_true", help="capture again even when cached")
    args = ap.parse_args(argv)
    path = cache_path(args.accounts, args.records, args.commits)
    if path.exists() and not args.force:
        data = ReplayData.load(path)
        log(f"cached: {path}")
        if "#commit before the snapshot" not in data.params.get("skipped_frames", {}):
            _drop_pre_snapshot(data)
            data.save(path)
            log(f"dropped frames at or below the snapshot revs: {data.params['skipped_frames']}")
    else:
        t = time.monotonic()
        data, _ = capture(args.accounts, args.records, args.commits, args.concurrency)
        data.params["timings"]["total_s"] = time.monotonic() - t
        data.save(path)
        log(f"saved {path}")
    p = data.params
    n_ops = sum(len(cbor.decode_multi(f)[1]["ops"]) for f in data.frames)
    car_mb = sum(len(r.car0) for r in data.repos) / 1e6
    print(f"{'captured':24s} {p['captured_at']}  from {p['source']}")
    print(f"{'accounts':24s} {len(data.repos):>10,}")
    print(f"{'records per account':24s} {p['records']:>10,}")
    print(f"{'CAR bytes':24s} {car_mb:>10.1f} MB")
    print(f"{'live #commit frames':24s} {len(data.frames):>10,}  ({n_ops:,} ops: {p.get('live_ops')})")
    for k, v in p.get("timings", {}).items():
        print(f"{k:24s} {v:>10.1f}")
    print(f"capture_accounts={len(data.repos)} capture_records={len(data.repos) * p['records']} "
          f"capture_commits={len(data.frames)} capture_total_s={p.get('timings', {}).get('total_s', 0):.0f}")


if __name__ == "__main__":
    main()
