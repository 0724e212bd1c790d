"""Peak memory of verifying and packing one huge repo CAR, in-memory path vs spooled path.

    /root/.venvs/tapflow/bin/python -m bench.repo_memory --huge-records 400000

Takes the largest repo of a synthetic data set (``bench.pipeline``'s, cached), writes its CAR to
a temp file, then runs in a fresh process each: ``pack_snapshot`` (what a pool worker does
with a CAR below ``SPOOL_CAR_BYTES``: the CAR's bytes arrive pickled) and
``pack_snapshot_file`` (the spooled path: the CAR mapped, the records written to a file).
Prints each process's peak RSS (VmHWM), its anonymous part at the end (RssAnon: what mapped
file pages, which the kernel can drop, do not count in) and the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1e3
    return out


def child(mode: str, car_path: str, key: str, did: str) -> None:
    from protocol.snapshot import pack_snapshot
    from connectors.repospool import pack_snapshot_file

    base = _status()
    t = time.process_time()
    if mode == "memory":
        with open(car_path, "rb") as f:
            car = f.read()
        snap = pack_snapshot(car, key, did, allow_partial=True, max_car_size=1 << 30)
        n = snap.records
        del car
    else:
        snap = pack_snapshot_file(car_path, car_path + ".rec", key, did, allow_partial=True, max_car_size=1 << 30)
        n = snap.records
        os.unlink(car_path + ".rec")
    cpu = time.process_time() - t
    end = _status()
    print(json.dumps({"mode": mode, "records": n, "cpu_s": cpu, "base_mb": base["VmHWM"], "peak_mb": end["VmHWM"],
                      "anon_end_mb": end["RssAnon"], "file_end_mb": end["RssFile"],
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--huge-records", type=int, default=400_000)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "CAR", "KEY", "DID"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from bench.pipeline import synthetic
    from bench.replay import ReplayData

    ns = argparse.Namespace(small=10, small_records=30, huge=1, huge_records=args.huge_records, commits=100, seed=0)
    data = ReplayData.load(synthetic(ns))
    repo = max(data.repos, key=lambda r: len(r.car0))
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-repomem-"))
    car = tmp / "huge.car"
    car.write_bytes(repo.car0)
    key = repo.key.public_key.multibase()
    did = repo.did
    print(f"CAR {len(repo.car0) / 1e6:.0f} MB, {did}", file=sys.stderr)
    del data, repo
    for mode in ("memory", "file"):
        out = subprocess.run([sys.executable, "-m", "bench.repo_memory", "--child", mode, str(car), key, did],
                             cwd=ROOT, capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:])
    car.unlink()


if __name__ == "__main__":
    main()
