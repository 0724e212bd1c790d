"""The backfill's spooled path for huge CARs (``connectors.repospool``): a CAR above the spool
threshold is streamed to a file, verified from a mapping of it and its records packed to a
second file that the flow reads chunk by chunk. The threshold is lowered here so small test
repos take that path; what comes out must be what the in-memory path gives, every failure must
keep its verdict and text, and no file may be left behind."""

from __future__ import annotations

import os
import time

import cbrrr
import pytest

from connectors.repospool import SPOOL_DIR, Spool, pack_snapshot_file, read_chunk
from operators.items import FetchFailed, SnapshotChunk
from protocol.car import write_car
from protocol.keys import PrivateKey
from protocol.snapshot import SnapshotFailed, pack_snapshot
from tests.test_backfill_source import Env, collect, has_last, make_repo, pds_loop, post  # noqa: F401

DID = "did:plc:spoolme"
MANY = {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(700)}


def _spool_files(env: Env) -> list[str]:
    d = os.path.join(env.cfg.data_dir, SPOOL_DIR)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _as_tuples(chunks) -> list[tuple]:
    return [(c.count, c.keys, c.cids, c.bodies, c.last_path) for c in chunks]


def _file_pack(tmp_path, car: bytes, key: str, did: str = DID, **kw):
    p = tmp_path / "x.car"
    p.write_bytes(car)
    kw.setdefault("allow_partial", False)
    kw.setdefault("max_car_size", 1 << 30)
    snap = pack_snapshot_file(str(p), str(tmp_path / "x.rec"), key, did, **kw)
    fd = os.open(str(tmp_path / "x.rec"), os.O_RDONLY)
    try:
        return snap, [read_chunk(fd, r) for r in snap.chunks]
    finally:
        os.close(fd)


def test_file_pack_equals_memory_pack(tmp_path):
    """Same chunks, byte for byte, and the same repo facts as ``pack_snapshot``; the records cross
    several of the MST walk's drained batches (700 records > none, 5,000 with a small chunk)."""
    k = PrivateKey.generate()
    recs = {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(5000)}
    recs["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "x&y"}
    car, _ = make_repo(DID, k, recs)
    mem = pack_snapshot(car, k.public_key.multibase(), DID, allow_partial=False, max_car_size=1 << 30, chunk_size=333)
    snap, chunks = _file_pack(tmp_path, car, k.public_key.multibase(), chunk_size=333)
    assert _as_tuples(chunks) == _as_tuples(mem.chunks) and len(chunks) == 16
    assert (snap.rev, snap.data_cid, snap.records, snap.missing_nodes) == (mem.rev, mem.data_cid, 5001, 0)
    assert snap.spool == str(tmp_path / "x.rec")


def _corruptions(k: PrivateKey) -> dict[str, bytes]:
    car, _ = make_repo(DID, k, MANY)
    flipped = bytearray(car)
    flipped[-3] ^= 0xFF  # inside the last block: its hash no longer matches
    other, _ = make_repo("did:plc:someoneelse", k, MANY)
    forged, _ = make_repo(DID, PrivateKey.generate(), MANY)
    from protocol.car import read_car

    c = read_car(car)
    blocks = list(c.blocks.items())
    nodes = [i for i, (cid, b) in enumerate(blocks)
             if cid != c.root and isinstance(cbrrr.decode_dag_cbor(b), dict) and "e" in cbrrr.decode_dag_cbor(b)]
    gone = nodes[len(nodes) // 2]  # an MST node below the root
    return {
        "flipped": bytes(flipped),
        "truncated": car[: len(car) // 2],
        "other did": other,
        "bad signature": forged,
        "missing node": write_car(c.roots, blocks[:gone] + blocks[gone + 1:]),
        "garbage": b"\x0a" + os.urandom(5000),
    }


def test_file_pack_failures_keep_verdict_and_text(tmp_path):
    """Every bad CAR fails the file path with the kind and message the memory path gives."""
    k = PrivateKey.generate()
    mb = k.public_key.multibase()
    for name, car in _corruptions(k).items():
        with pytest.raises(SnapshotFailed) as mem:
            pack_snapshot(car, mb, DID, allow_partial=False, max_car_size=1 << 30)
        with pytest.raises(SnapshotFailed) as fil:
            _file_pack(tmp_path, car, mb)
        assert (fil.value.kind, str(fil.value)) == (mem.value.kind, str(mem.value)), name
    with pytest.raises(SnapshotFailed) as bad_key:
        _file_pack(tmp_path, make_repo(DID, k, {})[0], "zNotAKey")
    assert bad_key.value.kind == "key"


def test_backfill_spools_huge_cars(tmp_path, pds_loop):
    """Through the Backfiller and a real HTTP server: a CAR above the (lowered) threshold takes
    the spooled path and yields the same chunks as the in-memory path; a corrupted CAR, a bad
    signature and a download cut short fail as they do there; no spool file is left behind."""
    from runtime import procpool

    env = Env(tmp_path, pds_loop, resync_parallelism=4)
    ok, flipped, forged, cut = "did:plc:spoolok", "did:plc:spoolflip", "did:plc:spoolforged", "did:plc:spoolcut"
    cids = env.account(ok, MANY)
    env.account(flipped, MANY)
    car = bytearray(pds_loop.cars[flipped])
    car[-3] ^= 0xFF
    pds_loop.cars[flipped] = bytes(car)
    env.account(forged, MANY, signer=PrivateKey.generate())
    env.account(cut, MANY)
    pds_loop.behaviour[cut] = "truncated_late"  # Content-Length promised, the connection drops past the threshold
    over = 64 << 10
    assert min(len(c) for c in pds_loop.cars.values()) > over
    for d in (ok, flipped, forged, cut):
        env.request(d)
    assert procpool.start_pool(1) is not None
    b = env.backfiller(chunk_size=150, spool_over=over)
    b.start()
    try:
        out = collect(b, lambda o: all(has_last(d)(o) for d in (ok, flipped, forged, cut)), timeout=60)
        assert b.stats["spooled"] >= 3  # the cut one may fail before or after its file was opened
    finally:
        b.stop()
        procpool.stop_pool()
    chunks = [c for c in out if isinstance(c, SnapshotChunk)]
    assert [c.count for c in chunks] == [150] * 4 + [100] and chunks[-1].last and chunks[0].first
    assert {r.path: r.cid for c in chunks for r in c.records} == cids
    mem = pack_snapshot(pds_loop.cars[ok], env.dir.idents[ok].signing_key.multibase(), ok, allow_partial=True,
                        max_car_size=1 << 30, chunk_size=150)
    assert [(c.count, c.keys, c.cids, c.bodies) for c in chunks] == [(c.count, c.keys, c.cids, c.bodies)
                                                                     for c in mem.chunks]
    fails = {f.did: f.error for f in out if isinstance(f, FetchFailed)}
    assert fails[flipped].startswith("failed to read repo from CAR: bad CAR: block hash does not match")
    assert fails[forged].startswith("failed to verify signature: ")
    assert fails[cut].startswith("failed to get repo: ")
    assert _spool_files(env) == []


def test_small_cars_stay_in_memory_and_leftovers_go_at_start(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    cids = env.account(DID, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(5)})
    spool = Spool(env.cfg.data_dir)
    spool.clear()
    left = spool.dir / "123-4.rec"
    left.write_bytes(b"from a crash")
    env.request(DID)
    b = env.backfiller()
    b.start()
    try:
        assert not left.exists()
        out = collect(b, has_last(DID))
    finally:
        b.stop()
    assert {r.path: r.cid for c in out for r in c.records} == cids
    assert b.stats["spooled"] == 0 and _spool_files(env) == []


def test_stop_mid_repo_deletes_its_spool_file(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    env.account(DID, MANY)
    env.request(DID)
    b = env.backfiller(chunk_size=100, spool_over=1024)
    b.start()
    try:
        got: list = []
        deadline = time.monotonic() + 30
        while not any(isinstance(x, SnapshotChunk) for x in got):
            assert time.monotonic() < deadline
            got += b.poll(max_chunks=1)
            time.sleep(0.005)
        assert b._job is not None and [f[-4:] for f in _spool_files(env)] == [".rec"]  # the CAR file went once verified
    finally:
        b.stop()
    assert _spool_files(env) == []


def _huge_repo_backfill(tmp_path, pds_loop, also: dict | None = None):
    """A running Backfiller (spooling above 64 KiB, a pool of one worker) asked for a 20,000-record
    repo; ``also``: more accounts, created but not requested. Returns (env, the fetch key, the
    backfiller, the record CIDs of each account of ``also``)."""
    from runtime import procpool

    env = Env(tmp_path, pds_loop)
    env.account(DID, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(20000)})
    cids = {d: env.account(d, recs) for d, recs in (also or {}).items()}
    key = env.request(DID)
    assert procpool.start_pool(1) is not None
    b = env.backfiller(chunk_size=1000, spool_over=64 << 10)
    b.start()
    return env, key, b, cids


def _kill_the_pool_once_packing(env: Env) -> None:
    """SIGKILL every pool worker as soon as one has begun writing a repo's packed records."""
    import signal

    from runtime import procpool

    deadline = time.monotonic() + 30
    while not any(f.endswith(".rec") for f in _spool_files(env)):  # the worker has begun
        assert time.monotonic() < deadline
        time.sleep(0.002)
    for proc in list(procpool.pool()._processes.values()):
        os.kill(proc.pid, signal.SIGKILL)


def test_worker_killed_mid_repo_fails_the_fetch_and_leaves_no_file(tmp_path, pds_loop):
    """A pool worker that dies while packing a spooled repo: as for an in-memory CAR, the fetch
    is answered with a failure (RepoLogic retries it later) and both files are gone."""
    from runtime import procpool

    env, key, b, _ = _huge_repo_backfill(tmp_path, pds_loop)
    try:
        _kill_the_pool_once_packing(env)
        (f,) = collect(b, has_last(DID), timeout=60)
    finally:
        b.stop()
        procpool.stop_pool()
    assert isinstance(f, FetchFailed) and f.fetch_key == key
    assert f.error.startswith("failed to read repo from CAR: BrokenProcessPool"), f.error
    assert _spool_files(env) == []


def test_a_dead_worker_does_not_break_later_repos(tmp_path, pds_loop):
    """After a pool worker died (here killed mid-repo; in life the OOM killer), the executor
    refuses every later task. The pool is started anew, so the next repos verify: before, every
    later CAR failed with ``BrokenProcessPool`` until the flow restarted."""
    from prometheus_client import REGISTRY

    from runtime import procpool

    renewed = ("tapflow_verify_pool_renewed_total", {})
    n0 = REGISTRY.get_sample_value(*renewed) or 0.0
    later = "did:plc:afterdeath"
    env, _, b, accounts = _huge_repo_backfill(tmp_path, pds_loop, also={later: MANY})
    cids = accounts[later]
    try:
        _kill_the_pool_once_packing(env)
        (f,) = collect(b, has_last(DID), timeout=60)
        assert isinstance(f, FetchFailed) and "BrokenProcessPool" in f.error
        env.request(later)
        out = collect(b, has_last(later), timeout=60)
    finally:
        b.stop()
        procpool.stop_pool()
    assert [x for x in out if isinstance(x, FetchFailed)] == []
    assert {r.path: r.cid for c in out if isinstance(c, SnapshotChunk) for r in c.records} == cids
    assert REGISTRY.get_sample_value(*renewed) == n0 + 1
