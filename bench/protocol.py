"""Per-core throughput of the protocol hot paths, on data a PDS would produce.

    /root/.venvs/tapflow/bin/python bench/protocol.py [--records N] [--commits N] [--runs N]

Builds a repo of N records (default 10,000) signed with a generated secp256k1 key, then a stream
of live commits on it (mostly single creates, some deletes/updates/multi-op), each with the CAR a
PDS sends: the commit block, the MST nodes the proof needs and the new record blocks
(``bench/gen.py``). Measures, on one core (CPU time of this process, best of ``--runs``):

- frame decode: ``cbor.decode_multi`` of a ``#commit`` frame (header + body);
- CAR split + hash verify: ``car.read_car`` of the getRepo CAR, per record it holds;
- #commit verification: ``commit.verify_commit`` of a decoded body (CAR, commit, signature,
  MST checks, Sync 1.1 inversion), and its MST share alone (load from the proof, op lookups,
  inversion);
- repo verification: ``commit.verify_repo`` (CAR, signature, full MST structure walk) and
  ``records()``, then with ``atjson.event_record_json`` of every record (what a backfill emits).

The machine is shared and noisy, so every figure is also given as a multiple of one secp256k1
signature verification measured in the same run (interleaved with the others: each round runs
every measurement once, in turn, and each keeps its best round). On a quiet core a verification
costs about 37 us (DESIGN.md). Judge progress by those ratios. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gen import RepoSim, random_writes  # noqa: E402
from protocol import cbor  # noqa: E402
from protocol.car import read_car  # noqa: E402
from protocol.commit import parse_signed_commit, verify_commit, verify_repo  # noqa: E402
from protocol.mst import MST, invert_ops  # noqa: E402

try:
    from protocol.atjson import event_record_json  # noqa: E402
except ImportError:  # pragma: no cover - an older tree: fall back to a plain conversion
    import orjson

    def event_record_json(block: bytes) -> bytes | None:
        return orjson.dumps(cbor.decode_atjson(block))


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--commits", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    t0 = time.perf_counter()
    sim = RepoSim.create(n_records=args.records, seed=1)
    repo_car = sim.get_repo_car()
    n_repo_records = len(sim.records)
    rng = random.Random(2)
    events = [sim.commit(random_writes(sim, rng)) for _ in range(args.commits)]
    frames = [ev.frame(seq=i + 1) for i, ev in enumerate(events)]
    bodies = [cbor.decode_multi(f)[1] for f in frames]
    key = sim.key.public_key
    print(f"data: repo {n_repo_records} records ({len(repo_car) / 1e6:.1f} MB CAR), {len(frames)} commits "
          f"(avg frame {sum(map(len, frames)) / len(frames):.0f} B, "
          f"{sum(len(b['ops']) for b in bodies) / len(bodies):.2f} ops), built in {time.perf_counter() - t0:.1f} s")

    signed = [parse_signed_commit(read_car(b["blocks"])) for b in bodies[:1000]]
    proofs = []
    for b in bodies:
        car = read_car(b["blocks"])
        proofs.append((car.blocks, parse_signed_commit(car).data_cid,
                       [(o["path"].encode(), o["cid"], o["prev"]) for o in b["ops"]]))
    decode = cbor.decode_multi

    def sig():
        for sc in signed:
            key.verify(sc.unsigned, sc.sig)

    def frames_decode():
        for f in frames:
            decode(f)

    def car_split():
        read_car(repo_car)

    def commits():
        for b in bodies:
            verify_commit(b, key)

    def mst_only():  # the MST share of a commit: load from the proof, check values, invert
        for blocks, root, ops in proofs:
            t = MST.load(blocks, root)
            for k, v, _ in ops:
                if v is not None:
                    t.get(k)
            invert_ops(t, ops)

    def repo_only():
        for _ in verify_repo(repo_car, key, sim.did).records():
            pass

    def repo_json():
        n = 0
        for r in verify_repo(repo_car, key, sim.did).records():
            if r.block is not None and event_record_json(r.block) is not None:
                n += 1
        assert n == n_repo_records

    # (name, function, items per call, unit)
    work = [
        ("signature verify (yardstick)", sig, len(signed), "verifies"),
        ("frame decode", frames_decode, len(frames), "frames"),
        ("CAR split + hash verify", car_split, n_repo_records, "records"),
        ("#commit verification", commits, len(bodies), "commits"),
        ("  of which MST load+check+invert", mst_only, len(proofs), "commits"),
        ("repo verification", repo_only, n_repo_records, "records"),
        ("repo verification + JSON", repo_json, n_repo_records, "records"),
    ]
    best = [float("inf")] * len(work)
    for _ in range(args.runs):
        for i, (_, fn, _, _) in enumerate(work):
            best[i] = min(best[i], cpu(fn))
    per = [b / w[2] for b, w in zip(best, work)]  # seconds per item
    sig_s = per[0]
    print(f"{'':34s} {'per second':>12s} {'us each':>9s} {'x sig':>7s}")
    for (name, _, _, unit), s in zip(work, per):
        print(f"{name:34s} {1 / s:12,.0f} {s * 1e6:9.2f} {s / sig_s:7.2f}  {unit}")
    commit_s, frame_s = per[3], per[1]
    both = commit_s + frame_s
    print(f"{'#commit with frame decode':34s} {1 / both:12,.0f} {both * 1e6:9.2f} {both / sig_s:7.2f}  commits")
    quiet = 37e-6 / sig_s  # this run's figures scaled to a 37 us signature verify (a quiet core)
    print(f"signature verify {sig_s * 1e6:.1f} us here (about 37 us on a quiet core); scaled to 37 us: "
          f"#commit {1 / (commit_s * quiet):,.0f}/s, repo + JSON {1 / (per[6] * quiet):,.0f} records/s")
    print(f"sig_us={sig_s * 1e6:.1f} frame_decode_per_s={1 / frame_s:.0f} car_verify_records_per_s={1 / per[2]:.0f} "
          f"commit_verify_per_s={1 / commit_s:.0f} commit_x_sig={commit_s / sig_s:.2f} "
          f"mst_x_sig={per[4] / sig_s:.2f} repo_verify_records_per_s={1 / per[5]:.0f} "
          f"repo_json_records_per_s={1 / per[6]:.0f} repo_json_record_x_sig={per[6] / sig_s:.3f}")


if __name__ == "__main__":
    main()
