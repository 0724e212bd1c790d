"""Per-core throughput of the protocol hot paths, on data a PDS would produce.

    /root/.venvs/tapflow/bin/python bench/protocol.py [--records N] [--commits N] [--runs N]

Builds a repo of N records (default 10,000) signed with a generated secp256k1 key, then a stream
of live commits on it (mostly single creates, some deletes/updates/multi-op), each with the CAR a
PDS sends: the commit block, the MST nodes the proof needs and the new record blocks
(``bench/gen.py``). Measures, on one core (CPU time of this process, best of ``--runs``):

- frame decode: ``cbor.decode_multi`` of a ``#commit`` frame (header + body);
- CAR split + hash verify: ``car.read_car`` of the getRepo CAR, per record it holds;
- #commit verification: ``commit.verify_commit`` of a decoded body (CAR, commit, signature,
  MST checks, Sync 1.1 inversion);
- repo verification + JSON: ``commit.verify_repo`` (CAR, signature, full MST structure walk)
  and ``atjson.record_to_json_bytes`` of every record.

The secp256k1 verify cost is printed as a yardstick: the machine is shared, and on a quiet
core it costs about 37 us (DESIGN.md); scale the other figures by the same ratio.
The last line is machine-readable.
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
    from protocol.atjson import record_to_json_bytes  # noqa: E402
except ImportError:  # pragma: no cover - written by a colleague; fall back to a plain conversion
    import orjson

    def record_to_json_bytes(block: bytes) -> bytes | None:
        return orjson.dumps(cbor.decode_atjson(block))


def cpu_best(fn, runs: int) -> float:
    """Smallest CPU time (seconds) of ``runs`` calls of ``fn``."""
    best = float("inf")
    for _ in range(runs):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--commits", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=5)
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

    # yardstick: one signature verification
    sc = parse_signed_commit(read_car(bodies[0]["blocks"]))
    sig_us = cpu_best(lambda: [key.verify(sc.unsigned, sc.sig) for _ in range(2000)], args.runs) / 2000 * 1e6

    decode = cbor.decode_multi
    t_frames = cpu_best(lambda: [decode(f) for f in frames], args.runs)
    frame_rate = len(frames) / t_frames

    t_car = cpu_best(lambda: read_car(repo_car), args.runs)
    car_rate = n_repo_records / t_car

    t_commit = cpu_best(lambda: [verify_commit(b, key) for b in bodies], args.runs)
    commit_rate = len(bodies) / t_commit

    # the MST share of a commit: load from the proof, check values, invert, root CID
    proofs = []
    for b in bodies:
        car = read_car(b["blocks"])
        proofs.append((car.blocks, parse_signed_commit(car).data_cid,
                       [(o["path"].encode(), o["cid"], o["prev"]) for o in b["ops"]]))

    def mst_only():
        for blocks, root, ops in proofs:
            t = MST.load(blocks, root)
            for k, v, _ in ops:
                if v is not None:
                    t.get(k)
            invert_ops(t, ops)

    mst_us = cpu_best(mst_only, args.runs) / len(proofs) * 1e6

    def repo_json():
        repo = verify_repo(repo_car, key, sim.did)
        n = 0
        for r in repo.records():
            if r.block is not None and record_to_json_bytes(r.block) is not None:
                n += 1
        assert n == n_repo_records
        return n

    t_repo = cpu_best(repo_json, args.runs)
    repo_rate = n_repo_records / t_repo
    t_repo_only = cpu_best(lambda: list(verify_repo(repo_car, key, sim.did).records()), args.runs)

    print(f"yardstick: secp256k1 verify {sig_us:.1f} us (about 37 us on a quiet core)")
    print(f"frame decode:               {frame_rate:10,.0f} frames/s  ({1e6 / frame_rate:6.1f} us)")
    print(f"CAR split + hash verify:    {car_rate:10,.0f} records/s ({1e6 / car_rate:6.2f} us/record)")
    print(f"#commit verification:       {commit_rate:10,.0f} commits/s ({1e6 / commit_rate:6.1f} us; "
          f"MST load+check+invert {mst_us:.1f} us, signature {sig_us:.1f} us)")
    print(f"  with frame decode:        {1 / (1 / commit_rate + 1 / frame_rate):10,.0f} commits/s")
    print(f"repo verification:          {n_repo_records / t_repo_only:10,.0f} records/s "
          f"({t_repo_only / n_repo_records * 1e6:6.2f} us/record)")
    print(f"repo verification + JSON:   {repo_rate:10,.0f} records/s ({1e6 / repo_rate:6.2f} us/record)")
    print(f"frame_decode_per_s={frame_rate:.0f} car_verify_records_per_s={car_rate:.0f} "
          f"commit_verify_per_s={commit_rate:.0f} repo_verify_records_per_s={repo_rate:.0f}")


if __name__ == "__main__":
    main()
