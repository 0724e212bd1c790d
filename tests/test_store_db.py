"""store.db: how the databases are opened (bounds on what RocksDB keeps)."""

from __future__ import annotations

import os
import time

from store.db import BLOCK_CACHE_BYTES, MAX_TOTAL_WAL_BYTES, close_all, open_flow_db


def _wal_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".log"))


def test_a_rarely_written_family_does_not_keep_every_wal(tmp_path):
    """One early write to ``meta`` (never enough to fill its memtable) used to pin every WAL
    after it: ~3x the limit here, 1.2 GB after 1M repos added and removed, all of it replayed
    into each secondary's memory. Past the limit RocksDB flushes the families pinning it."""
    db = open_flow_db(tmp_path)
    try:
        db.cf("meta")[b"early"] = b"1"
        h = db.handle("repos")
        written = 0
        for r in range(60):
            b = db.batch()
            for i in range(1_000):
                b.put(b"did:plc:%07d:%03d" % (i, r), b"v" * 3200, h)
                written += 3220
            db.write(b)
        assert written > 2.5 * MAX_TOTAL_WAL_BYTES
        deadline = time.monotonic() + 30  # the flushes it triggers run in the background
        while _wal_bytes(str(tmp_path / "flow")) >= 1.5 * MAX_TOTAL_WAL_BYTES and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _wal_bytes(str(tmp_path / "flow")) < 1.5 * MAX_TOTAL_WAL_BYTES
        assert db.cf("meta")[b"early"] == b"1" and db.cf("repos")[b"did:plc:0000000:059"] == b"v" * 3200
    finally:
        close_all()


def test_one_bounded_block_cache_for_all_families(tmp_path):
    """Each family's own default cache would fill separately as more data is read."""
    db = open_flow_db(tmp_path)
    try:
        caps = {n: db.cf(n).property_int_value("rocksdb.block-cache-capacity") for n in db.cfs}
        assert set(caps.values()) == {BLOCK_CACHE_BYTES}, caps
        for i in range(200):
            db.cf("repos")[b"did:plc:%05d" % i] = b"x" * 5000
        db.cf("repos").flush()  # to a table file: reads now go through the block cache
        assert all(db.cf("repos")[b"did:plc:%05d" % i] == b"x" * 5000 for i in range(200))
        usage = {n: db.cf(n).property_int_value("rocksdb.block-cache-usage") for n in db.cfs}
        assert usage["repos"] > 500_000 and len(set(usage.values())) == 1, usage  # one cache, seen by all
    finally:
        close_all()
