"""Durable, strictly increasing event ids (better than Tap, which reuses ids after restart).

Ids are handed out from blocks reserved in ``meta`` with a synced write *before* any id
of the block is used, so after any crash the next process starts above every id that
may have been written. Gaps are normal (Tap has them too); reuse never happens.
"""

from __future__ import annotations

import threading

from store.db import Database
from store.layout import META_ID_RESERVED, pack_u64, unpack_u64

BLOCK = 100_000


class IdAllocator:
    """Thread-safe event id source for one process's flow database."""

    def __init__(self, db: Database, block: int = BLOCK) -> None:
        self._db = db
        self._block = block
        self._lock = threading.Lock()
        raw = db.cf("meta").get(META_ID_RESERVED)
        self._next = unpack_u64(raw) + 1 if raw else 1
        self._limit = self._next - 1  # nothing reserved by this process yet

    def take(self, n: int = 1) -> int:
        """Reserve ``n`` consecutive ids; returns the first."""
        with self._lock:
            if self._next + n - 1 > self._limit:
                new_limit = self._next + max(n, self._block) - 1
                batch = self._db.batch()
                batch.put(META_ID_RESERVED, pack_u64(new_limit), self._db.handle("meta"))
                self._db.write(batch, sync=True)
                self._limit = new_limit
            first = self._next
            self._next += n
            return first

    @property
    def next_id(self) -> int:
        return self._next
