"""Peers on the same replayed firehose: the official TypeScript consumer and the Python SDK.

    /root/.venvs/tapflow/bin/python -m bench.peers [--data synthetic|captured|PATH] [--commits N]

- ``atproto_sync``: ``@atproto/sync`` ``Firehose`` with authenticated commits (signature, CAR
  hashes, MST proof of every op; see ``bench/peer_atproto_sync.mjs``), on the harness's Node 22
  (``$HOME/.cache/tapflow-harness/pds/node-*/bin/node``); installed from npm into
  ``$HOME/.cache/tapflow-bench/peer-ts`` on first use.
- ``atproto_py``: the Python ``atproto`` SDK's firehose parsing, no verification
  (``bench/peer_atproto_py.py``), in ``$HOME/.cache/tapflow-bench/venv-atproto``.
- ``tapflow_verify``: tapflow's own per-commit work without the service around it, one core,
  same frames: ``protocol.cbor.decode_multi`` + ``operators.verify.default_verify_commit``
  (CAR hashes, signature, MST proofs, Sync 1.1 inversion, records to JSON).

Each reads the first ``--commits`` frames of one upstream (``bench/upstream.py``, its own
process), from the oldest frame. Rates are commits/s from the first to the last commit
(wall) and CPU per commit. ``bench/pipeline.py`` runs the same against the upstream of its
live measure, so the end-to-end service figure stands next to them in one run.
The last line: ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Upstream  # noqa: E402
from bench.replay import DEFAULT_CACHE_DIR, ReplayData  # noqa: E402

CACHE = DEFAULT_CACHE_DIR
HARNESS_HOME = Path(os.environ.get("TAPFLOW_HARNESS_HOME", Path.home() / ".cache" / "tapflow-harness"))
TS_DIR = CACHE / "peer-ts"
PY_VENV = CACHE / "venv-atproto"


def node22() -> str:
    for p in sorted((HARNESS_HOME / "pds").glob("node-*/bin/node")):
        return str(p)
    raise RuntimeError("Node 22 of the PDS harness not found: run ../shared/harness/pds/setup.sh")


def ensure_ts() -> Path:
    """``@atproto/sync`` + ``@atproto/identity`` from npm into the cache (once)."""
    if (TS_DIR / "node_modules" / "@atproto" / "sync" / "package.json").exists():
        return TS_DIR
    TS_DIR.mkdir(parents=True, exist_ok=True)
    pkg = TS_DIR / "package.json"
    if not pkg.exists():
        pkg.write_text('{"name":"tapflow-bench-peer","private":true,"type":"module"}\n')
    env = dict(os.environ)
    env["PATH"] = str(Path(node22()).parent) + os.pathsep + env.get("PATH", "")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "@atproto/sync", "@atproto/identity"],
                   cwd=TS_DIR, env=env, check=True, timeout=600)
    return TS_DIR


def ensure_py() -> Path:
    """A venv with PyPI ``atproto`` in the cache (once)."""
    py = PY_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import atproto"], capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-c", "import venv; venv.create(%r, with_pip=True)" % str(PY_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "atproto"], check=True, timeout=600)
    return py


def versions() -> dict:
    out = {}
    try:
        out["@atproto/sync"] = json.loads((TS_DIR / "node_modules/@atproto/sync/package.json").read_text())["version"]
    except OSError:
        pass
    try:
        r = subprocess.run([str(PY_VENV / "bin/python"), "-c", "import importlib.metadata as m; print(m.version('atproto'))"],
                           capture_output=True, text=True)
        out["atproto (PyPI)"] = r.stdout.strip()
    except OSError:
        pass
    return out


def run_atproto_sync(url: str, n: int, timeout: float = 900) -> dict:
    ensure_ts()
    ws = url.replace("http://", "ws://")
    env = {**os.environ, "NODE_PATH": str(TS_DIR / "node_modules"), "PEER_TIMEOUT_MS": str(int(timeout * 1000))}
    t0 = time.monotonic()
    out = subprocess.run([node22(), str(ROOT / "bench" / "peer_atproto_sync.mjs"), ws, url, str(n)],
                         env=env, capture_output=True, text=True, timeout=timeout + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"@atproto/sync peer: rc={out.returncode} {out.stderr[-1500:]}")
    r = json.loads(lines[-1])
    span = (r["t_last_ms"] - r["t_first_ms"]) / 1e3
    half = (r["t_last_ms"] - r["t_half_ms"]) / 1e3 if r.get("commits_half") else 0
    return {"peer": "@atproto/sync", "commits": r["commits"], "errors": r["errors"], "wall_s": time.monotonic() - t0,
            "commits_per_s": r["commits"] / span if span > 0 else 0.0,
            "commits_per_s_2nd_half": (r["commits"] - r["commits_half"]) / half if half > 0 else 0.0,
            "cpu_us_per_commit": r["cpu_s"] / max(1, r["commits"]) * 1e6, "rss_mb": r.get("rss_mb")}


def run_atproto_py(url: str, n: int, timeout: float = 900) -> dict:
    py = ensure_py()
    ws = url.replace("http://", "ws://") + "/xrpc"
    t0 = time.monotonic()
    out = subprocess.run([str(py), str(ROOT / "bench" / "peer_atproto_py.py"), ws, str(n), str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"atproto SDK peer: rc={out.returncode} {out.stderr[-1500:]}")
    r = json.loads(lines[-1])
    span = r["t_last_s"] - (r["t_first_s"] or 0)
    half = r["t_last_s"] - r["t_half_s"] if r.get("t_half_s") else 0
    return {"peer": "atproto (Python SDK)", "commits": r["commits"], "errors": r["errors"],
            "wall_s": time.monotonic() - t0, "commits_per_s": r["commits"] / span if span > 0 else 0.0,
            "commits_per_s_2nd_half": (r["commits"] - r["commits"] // 2) / half if half > 0 else 0.0,
            "cpu_us_per_commit": r["cpu_s"] / max(1, r["commits"]) * 1e6}


def signing_keys(data: ReplayData) -> dict[str, str]:
    """DID -> multibase signing key (synthetic: from the secret; captured: from the DID doc)."""
    docs = data.params.get("docs")
    out = {}
    for r in data.repos:
        if docs:
            out[r.did] = _doc_key(json.loads(docs[r.did]), r.did)
        else:
            out[r.did] = r.key.public_key.multibase()
    return out


def _doc_key(doc: dict, did: str) -> str:
    """The ``#atproto`` key of a DID document as a Multikey string (both PLC formats)."""
    from protocol.identity import parse_did_doc

    return parse_did_doc(doc, did).signing_key_multibase()


def run_tapflow_verify(data: ReplayData, n: int) -> dict:
    """decode + verify + records to JSON of the first ``n`` frames, in this process (one core)."""
    from operators.verify import default_verify_commit
    from protocol.cbor import decode_multi

    keys = signing_keys(data)
    frames = [data.frame(i, i + 1) for i in range(min(n, len(data.frames)))]
    dids = [data.repos[data.frame_repo[i]].did for i in range(len(frames))]
    keep = lambda c: True  # noqa: E731
    best = None
    for _ in range(3):
        c0 = time.process_time()
        t0 = time.perf_counter()
        errors = 0
        for f, did in zip(frames, dids):
            try:
                default_verify_commit(decode_multi(f)[1], keys[did], keep)
            except ValueError:
                errors += 1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if best is None or cpu < best[1]:
            best = (wall, cpu, errors)
    wall, cpu, errors = best
    return {"peer": "tapflow verify only (1 core, in-process)", "commits": len(frames), "errors": errors,
            "commits_per_s": len(frames) / wall, "cpu_us_per_commit": cpu / len(frames) * 1e6}


def run_all(url: str, data: ReplayData, n_ts: int, n_py: int, log=print) -> list[dict]:
    # a peer waits for as many frames as it is told: never more than the data set holds
    n_ts, n_py = min(n_ts, len(data.frames)), min(n_py, len(data.frames))
    out = []
    for name, fn in (("tapflow_verify", lambda: run_tapflow_verify(data, n_py)),
                     ("atproto_py", lambda: run_atproto_py(url, n_py)),
                     ("atproto_sync", lambda: run_atproto_sync(url, n_ts))):
        try:
            r = fn()
        except Exception as e:  # one failing peer does not hide the others
            r = {"peer": name, "error": repr(e), "commits_per_s": 0.0}
        r["name"] = name
        log(f"peer {r.get('peer')}: {r.get('commits_per_s', 0):,.0f} commits/s, "
            f"{r.get('cpu_us_per_commit', 0):,.0f} us CPU/commit ({r.get('commits', 0)} commits, "
            f"{r.get('errors', '?')} errors){' ' + r['error'] if 'error' in r else ''}")
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    from bench.pipeline import captured, log, synthetic

    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--commits", type=int, default=20_000, help="frames read by the Python SDK and tapflow verify")
    ap.add_argument("--ts-commits", type=int, default=3_000, help="frames read by @atproto/sync (it is slow)")
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--small-records", type=int, default=150)
    ap.add_argument("--huge", type=int, default=5)
    ap.add_argument("--huge-records", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args(argv)
    args.commits_total = 60_000
    if args.data == "synthetic":
        args.commits = min(args.commits, 60_000)
        ns = argparse.Namespace(small=args.small, small_records=args.small_records, huge=args.huge,
                                huge_records=args.huge_records, commits=60_000, seed=args.seed)
        path = synthetic(ns)
    elif args.data == "captured":
        path = captured(args)
    else:
        path = Path(args.data)
    data = ReplayData.load(path)
    log(f"peers on {path.name}: {versions()}")
    rows: dict[str, list[dict]] = {}
    for run in range(args.runs):
        up = Upstream(path, hold=False)
        try:
            for r in run_all(up.url, data, args.ts_commits, args.commits, log):
                rows.setdefault(r["name"], []).append(r)
        finally:
            up.stop()
    print(f"{'peer':45s} {'commits/s best':>15s} {'median':>10s} {'us CPU/commit':>14s}")
    figures = {}
    for name, rs in rows.items():
        rates = sorted(r.get("commits_per_s", 0) for r in rs)
        cpu = min(r.get("cpu_us_per_commit", float("inf")) for r in rs)
        print(f"{rs[0].get('peer', name):45s} {rates[-1]:15,.0f} {rates[len(rates) // 2]:10,.0f} {cpu:14,.0f}")
        figures[f"{name}_commits_per_s"] = round(rates[-1])
    tv = figures.get("tapflow_verify_commits_per_s", 0)
    for name in ("atproto_sync", "atproto_py"):
        if figures.get(f"{name}_commits_per_s"):
            figures[f"tapflow_verify_vs_{name}"] = round(tv / figures[f"{name}_commits_per_s"], 2)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
