"""The benchmark upstream: ``bench.replay``'s server on a data file, with a send log.

    python -m bench.upstream --data ~/.cache/tapflow-bench/synth-....pkl [--rate 1000] [--hold]

Serves a :class:`bench.replay.ReplayData` pickle (synthetic, from :func:`generate_mixed`, or
captured from the reference PDS by ``bench/capture.py``) as relay, PDS, PLC and handle
resolver, in a process of its own so that its CPU is not the benchmark's. Prints its URLs
as one JSON line. What it adds to ``bench.replay.ReplayServer``:

- **send log**: every socket write of the firehose is logged as ``(time.monotonic(), first
  stream position written)``; ``GET /_bench/sendlog?conn=K`` returns it for the K-th
  subscription. The send time of frame ``p`` is that of the last write whose first position
  is ``<= p`` (latency = client receive time - send time; ``time.monotonic()`` is
  system-wide).
- **rate from the release**: with ``--rate`` and ``--hold``, the rate clock starts at the
  release, not at the connection (otherwise a held stream bursts everything it "owes").
- **captured DID documents**: when the data's ``params`` hold ``docs`` (``{did: JSON bytes}``
  as the reference PLC served them), ``GET /{did}`` serves them with only the
  ``#atproto_pds`` service endpoint pointed at this server.
- ``GET /_bench/frames`` = ``[[did, rev], ...]`` of every base frame (latency join).
- ``hang_unknown``: PLC requests for DIDs the data does not hold wait forever instead of a
  404 (memory benchmark: a million added repos stay pending, none errors).

:func:`generate_mixed` builds the scale data set: many small repos and a few huge ones
(``bench.gen.RepoSim``), then live commits spread uniformly over all repos.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from array import array
from pathlib import Path

from aiohttp import web

from bench.gen import RepoSim, make_did, random_writes
from bench.replay import (DEFAULT_CACHE_DIR, ReplayData, ReplayServer, serve_until_signalled, RepoInfo, _SEQ_PATTERN, _SEQ_SENTINEL,
                          handle_for)
from protocol import cbor
from protocol.car import read_car
from protocol.keys import K256, PrivateKey

__all__ = ["generate_mixed", "mixed_path", "load_mixed", "BenchServer", "frame_index"]


# ----------------------------------------------------------------------------- data


def mixed_path(cache_dir: str | Path, small: int, small_records: int, huge: int, huge_records: int,
               commits: int, seed: int = 0) -> Path:
    if huge == 0:
        huge_records = 0  # one name for "no huge repo"
    return Path(cache_dir) / f"synth-v2-s{small}x{small_records}-h{huge}x{huge_records}-c{commits}-s{seed}.pkl"


def _make_repo(job: tuple) -> tuple:
    """One repo of the mixed data set and its live commits (worker process)."""
    i, n, n_commits, seed, curve, secret = job
    sim = RepoSim.create(n_records=n, seed=seed * 1_000_003 + i, did=make_did(seed * 1_000_003 + i),
                         key=PrivateKey.from_bytes(curve, secret))
    car0 = sim.get_repo_car()
    info = RepoInfo(sim.did, handle_for(i), curve, secret, car0, sim.rev, sim.commit_cid)
    avail = set(read_car(car0).blocks)
    rng = random.Random(seed * 7_000_003 + i)
    frames = []
    for _ in range(n_commits):
        ev = sim.commit(random_writes(sim, rng))
        for op in ev.body["ops"]:
            if op.get("prev", 0) is None:
                del op["prev"]  # as the PDS sends a create: no "prev" (the lexicon has no null there)
        f = ev.frame(_SEQ_SENTINEL)
        frames.append((f, f.index(_SEQ_PATTERN) + 4))
        avail.update(read_car(ev.body["blocks"]).blocks)
    info.extra_blocks = {c: b for c, b in sim.blocks.items() if c not in avail}
    return info, frames


def generate_mixed(small: int, small_records: int, huge: int, huge_records: int, commits: int,
                   seed: int = 0, curve: str = K256, progress=None, procs: int | None = None) -> ReplayData:
    """``small`` repos of about ``small_records`` records (drawn 0.5-1.5x, so MST depths vary) and
    ``huge`` repos of ``huge_records``; then ``commits`` live commits on repos drawn uniformly
    (each repo's commits chain; the stream interleaves repos at random). Built on all cores."""
    import multiprocessing as mp

    rng = random.Random(seed)
    sizes = [huge_records] * huge + [max(1, int(small_records * rng.uniform(0.5, 1.5))) for _ in range(small)]
    secrets = [rng.randbytes(31) + b"\x01" for _ in sizes]
    crng = random.Random(seed + 1)
    order = [crng.randrange(len(sizes)) for _ in range(commits)]
    per = [0] * len(sizes)
    for i in order:
        per[i] += 1
    jobs = [(i, n, per[i], seed, curve, secrets[i]) for i, n in enumerate(sizes)]
    # huge repos first (longest jobs), then the rest in order
    t0 = time.time()
    infos: list = [None] * len(sizes)
    repo_frames: list = [None] * len(sizes)
    done = 0
    with mp.get_context("fork").Pool(procs or os.cpu_count() or 1) as pool:
        for k, (info, frames) in enumerate(pool.imap(_make_repo, jobs, chunksize=8)):
            infos[k] = info
            repo_frames[k] = frames
            done += sizes[k]
            if progress and (k + 1) % 500 == 0:
                progress(f"{k + 1}/{len(sizes)} repos, {done:,} records ({time.time() - t0:.0f}s)")
    frames: list[bytes] = []
    seq_at = array("I")
    frame_repo = array("I")
    nxt = [0] * len(sizes)
    for i in order:
        f, p = repo_frames[i][nxt[i]]
        nxt[i] += 1
        frames.append(f)
        seq_at.append(p)
        frame_repo.append(i)
    params = {"repos": len(sizes), "records": sum(sizes), "commits": commits, "seed": seed, "curve": curve,
              "small": small, "small_records": small_records, "huge": huge, "huge_records": huge_records,
              "kind": "synthetic"}
    return ReplayData(params, infos, frames, seq_at, frame_repo)


def load_mixed(small: int, small_records: int, huge: int, huge_records: int, commits: int, seed: int = 0,
               cache_dir: str | Path = DEFAULT_CACHE_DIR, progress=None) -> tuple[ReplayData, Path]:
    path = mixed_path(cache_dir, small, small_records, huge, huge_records, commits, seed)
    if path.exists():
        return ReplayData.load(path), path
    data = generate_mixed(small, small_records, huge, huge_records, commits, seed, progress=progress)
    data.save(path)
    return data, path


def frame_index(data: ReplayData) -> list[tuple[str, str, int]]:
    """``(did, rev, ops)`` of every base frame."""
    out = []
    for i, f in enumerate(data.frames):
        body = cbor.decode_multi(f)[1]
        out.append((data.repos[data.frame_repo[i]].did, body["rev"], len(body["ops"])))
    return out


# ----------------------------------------------------------------------------- server


class _RecTransport:
    """A transport that logs (time, first position) of every write."""

    __slots__ = ("_t", "_conn", "_log")

    def __init__(self, t, conn, log: list) -> None:
        self._t = t
        self._conn = conn
        self._log = log

    def write(self, data) -> None:
        self._log.append((time.monotonic(), self._conn.pos))
        self._t.write(data)

    def __getattr__(self, name):
        return getattr(self._t, name)


class BenchServer(ReplayServer):
    def __init__(self, data: ReplayData, *, hang_unknown: bool = False, **kw) -> None:
        self.send_logs: list[list] = []
        self.hang_unknown = hang_unknown
        self._captured_docs: dict | None = data.params.get("docs")
        super().__init__(data, **kw)

    async def _pump(self, conn, protocol, reader) -> None:
        log: list = []
        self.send_logs.append(log)
        conn.transport = _RecTransport(conn.transport, conn, log)
        await super()._pump(conn, protocol, reader)

    def release(self, upto: int | None = None) -> None:
        now = time.monotonic()
        for c in list(self._conns):  # the rate clock starts now
            c.t0 = now
            c.sent = 0
        super().release(upto)

    def did_doc(self, did: str) -> dict:
        docs = self._captured_docs
        if not docs:
            return super().did_doc(did)
        doc = json.loads(docs[did])
        for s in doc.get("service", []):
            if str(s.get("id", "")).endswith("#atproto_pds"):
                s["serviceEndpoint"] = self.pds_url_of(did)
        return doc

    async def _plc(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        if self.hang_unknown and did not in self._did_index and did.startswith("did:"):
            await asyncio.sleep(3600)
        return await super()._plc(request)

    def _app(self) -> web.Application:
        # our routes first: after the PLC catch-all "/{did}" they would never match
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/_bench/sendlog", self._http_sendlog)
        app.router.add_get("/_bench/frames", self._http_frames)
        base = super()._app()
        for route in base.router.routes():
            if route.method == "HEAD":
                continue
            app.router.add_route(route.method, route.resource.canonical, route.handler)
        return app

    async def _http_sendlog(self, request: web.Request) -> web.Response:
        k = int(request.query.get("conn", "-1"))
        logs = self.send_logs
        return web.json_response(logs[k] if logs and -len(logs) <= k < len(logs) else [])

    async def _http_frames(self, request: web.Request) -> web.Response:
        return web.json_response([[d, r] for d, r, _ in frame_index(self.data)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="ReplayData pickle")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--hang-unknown", action="store_true")
    ap.add_argument("--repo-state", default="head", choices=("head", "initial", "final"))
    args = ap.parse_args(argv)
    t0 = time.time()
    data = ReplayData.load(args.data)
    load_s = time.time() - t0
    srv = BenchServer(data, host=args.host, port=args.port, rate=args.rate, hold=args.hold,
                      repo_state=args.repo_state, hang_unknown=args.hang_unknown)
    serve_until_signalled(srv, load_s)


if __name__ == "__main__":
    main()
