"""The firehose client's CPU per frame: tapflow's reader, and the two WebSocket libraries alone.

    python -m bench.firehose_client                 # 30,000 frames of ~4.8 kB, 2 runs
    python -m bench.firehose_client --frames 50000 --runs 3

The firehose thread shares the flow process with RepoLogic (one GIL), so its CPU per frame
comes straight off the live rate. A server process (aiohttp) sends ``--frames`` binary frames of
``#commit`` size as fast as the client reads; measured in this process:

- ``websockets`` / ``aiohttp``: a bare client of each library receiving every frame (the CPU of
  the whole process per frame): what the choice of library costs.
- ``tapflow``: ``connectors.firehose.FirehoseClient`` (frame decode, cursor, queue), the CPU of
  its loop thread alone (``pthread_getcpuclockid``) per frame, the bytewax side draining the
  queue. Its frames are valid ``#commit`` frames (``bench.gen``), their verification off (no
  pool: verification is measured by ``bench/protocol.py``).

Last line: ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port  # noqa: E402

_SERVER = r"""
import asyncio, pickle, sys
from aiohttp import web
frames = pickle.load(open(sys.argv[2], "rb"))
async def h(req):
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(req)
    for f in frames:
        await ws.send_bytes(f)
    await asyncio.sleep(3600)
    return ws
app = web.Application()
app.router.add_get("/xrpc/com.atproto.sync.subscribeRepos", h)
app.router.add_get("/", h)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _frames(n: int) -> list[bytes]:
    import random

    from bench.gen import RepoSim, random_writes

    sim = RepoSim.create(n_records=2000, seed=1)
    rng = random.Random(2)
    base = [sim.commit(random_writes(sim, rng)) for _ in range(min(n, 2000))]
    return [base[i % len(base)].frame(seq=i + 1) for i in range(n)]


class _Server:
    def __init__(self, frames_file: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(self.port), frames_file])
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("frame server did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def _bare_websockets(port: int, n: int) -> float:
    from websockets.asyncio.client import connect

    ws = await connect(f"ws://127.0.0.1:{port}/", max_size=5 << 20, compression=None, max_queue=64)
    t0 = time.process_time()
    for _ in range(n):
        await ws.recv()
    cpu = time.process_time() - t0
    ws.transport.abort()
    return cpu


async def _bare_aiohttp(port: int, n: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://127.0.0.1:{port}/", max_msg_size=(5 << 20) + 1, compress=0)
        t0 = time.process_time()
        for _ in range(n):
            (await ws.receive()).data
        return time.process_time() - t0


def _tapflow(port: int, n: int, data_dir: str) -> float:
    from dataclasses import replace

    from config import Config
    from connectors.firehose import FirehoseClient

    cfg = replace(Config(relay_url=f"http://127.0.0.1:{port}", data_dir=data_dir, outbox_capacity=10**9))
    c = FirehoseClient(cfg, depth=lambda: 0, queue_max=100_000)
    c.start()
    try:
        while c._thread._thread is None or c._thread._thread.ident is None:
            time.sleep(0.001)
        clock = time.pthread_getcpuclockid(c._thread._thread.ident)
        got, t0 = 0, None
        deadline = time.monotonic() + 300
        while got < n and time.monotonic() < deadline:
            batch = c.drain(10_000)
            if batch and t0 is None:
                t0 = time.clock_gettime(clock)  # from the first frame: the dial is not per frame
            got += len(batch)
            if not batch:
                time.sleep(0.0005)
        return (time.clock_gettime(clock) - (t0 or 0.0)) * n / max(got - 1, 1)
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=30_000)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    frames = _frames(args.frames)
    print(f"{len(frames)} frames, {sum(map(len, frames)) / len(frames):.0f} B each on average")
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tapflow-fhbench-") as tmp:
        path = os.path.join(tmp, "frames.pkl")
        with open(path, "wb") as f:
            pickle.dump(frames, f)
        for r in range(args.runs):
            for name in ("websockets", "aiohttp", "tapflow"):
                srv = _Server(path)
                try:
                    if name == "tapflow":
                        cpu = _tapflow(srv.port, len(frames), str(Path(tmp) / f"data{r}"))
                    else:
                        fn = _bare_websockets if name == "websockets" else _bare_aiohttp
                        cpu = asyncio.run(fn(srv.port, len(frames)))
                finally:
                    srv.close()
                us = cpu / len(frames) * 1e6
                best[name] = min(best.get(name, us), us)
                print(f"run {r + 1}: {name:<10} {us:6.1f} us CPU per frame")
    print(f"best: websockets {best['websockets']:.1f}, aiohttp {best['aiohttp']:.1f} "
          f"({best['websockets'] / best['aiohttp']:.1f}x), tapflow's reader (aiohttp + decode + queue) "
          f"{best['tapflow']:.1f} us per frame")
    print(" ".join(f"{k}_us_per_frame={v:.1f}" for k, v in best.items()))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
