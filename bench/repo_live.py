"""RepoLogic's CPU per live commit beyond verification, one core, in-process.

    python -m bench.repo_live                      # batches of 1, 30, 300 commits
    python -m bench.repo_live --batch 30 --per-shard --profile

The flow process is single-threaded, so every µs RepoLogic spends per commit besides
verification comes straight off the live rate. This bench applies ``--commits`` single-op
live commits (a post create each, ~100-byte record) over 200 active repos in 64 shards to a
real RocksDB, with verification replaced by the tests' ``FakeVerifier`` (it returns the
prepared result: what is left is state read/parse, the record index, the event JSON, the
outbox row, counters and the WriteBatch). ``--per-shard`` calls ``process`` once per shard of
each batch, as a bytewax key per shard did; without it, once per batch (``flows.dataflow``'s
one key). Figures: CPU µs per commit (``time.process_time``); last line ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store.db import close_all  # noqa: E402
from store.layout import shard_of  # noqa: E402
from tests.repo_support import Env, cid, commit_item, did, op, rev  # noqa: E402

SHARDS = 64
REPOS = 200
RECORD = {"$type": "app.bsky.feed.post", "text": "hello world, this is a post", "createdAt": "2024-01-01T00:00:00.000Z"}


def run(batch: int, commits: int, per_shard: bool, profile: bool) -> float:
    """CPU µs per commit of RepoLogic.process for ``commits`` live commits in batches of ``batch``."""
    tmp = Path(tempfile.mkdtemp(prefix="tapflow-repo-live-"))
    try:
        env = Env(tmp / "data", shards=SHARDS)
        roots, revs = {}, {}
        for i in range(REPOS):
            d = did(i)
            roots[d], revs[d] = cid(f"root{i}"), 1
            env.active_repo(d, rev(1), roots[d], {f"app.bsky.feed.post/a{i}": cid(f"r{i}")})
        items = []
        for k in range(commits):
            d = did(k % REPOS)
            revs[d] += 1
            new = cid(f"root{d}{k}")
            items.append(commit_item(d, rev(revs[d]), roots[d], new,
                                     [op("create", f"app.bsky.feed.post/k{k}", cid(f"c{k}"), RECORD)], seq=k + 1))
            roots[d] = new
        batches = [items[i:i + batch] for i in range(0, commits, batch)]
        process = env.logic.process

        def go() -> None:
            for b in batches:
                if per_shard:
                    groups: dict[int, list] = defaultdict(list)
                    for it in b:
                        groups[shard_of(it.did, SHARDS)].append(it)
                    for g in groups.values():
                        process(g)
                else:
                    process(b)

        t0 = time.process_time()
        if profile:
            p = cProfile.Profile(time.process_time)
            p.runcall(go)
            pstats.Stats(p).sort_stats("tottime").print_stats(25)
        else:
            go()
        dt = time.process_time() - t0
        if env.logic.stats["commit_applied"] != commits:
            raise RuntimeError(f"applied {env.logic.stats['commit_applied']} of {commits}")
        return dt / commits * 1e6
    finally:
        close_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,30,300", help="commits per bytewax batch, comma list")
    ap.add_argument("--commits", type=int, default=6000)
    ap.add_argument("--per-shard", action="store_true", help="one process() per shard of a batch (the old keying)")
    ap.add_argument("--profile", action="store_true", help="cProfile (CPU time) of the first batch size")
    args = ap.parse_args(argv)
    figs = {}
    for k, b in enumerate(int(x) for x in args.batch.split(",")):
        us = run(b, args.commits, args.per_shard, args.profile and k == 0)
        print(f"batch {b}{' per shard' if args.per_shard else ''}: {us:.1f} µs CPU per commit (verification faked)",
              flush=True)
        figs[f"repo_us_per_commit@{b}{'_per_shard' if args.per_shard else ''}"] = round(us, 1)
    print(" ".join(f"{k}={v}" for k, v in figs.items()))


if __name__ == "__main__":
    main()
