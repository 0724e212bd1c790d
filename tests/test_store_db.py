"""store.db: how the databases are opened (bounds on what RocksDB keeps)."""

from __future__ import annotations

import os

from store.db import MAX_TOTAL_WAL_BYTES, close_all, open_flow_db


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
        assert _wal_bytes(str(tmp_path / "flow")) < 1.5 * MAX_TOTAL_WAL_BYTES
        assert db.cf("meta")[b"early"] == b"1" and db.cf("repos")[b"did:plc:0000000:059"] == b"v" * 3200
    finally:
        close_all()
