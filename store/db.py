"""Opening tapflow's RocksDB databases (raw bytes keys and values, named column families).

One primary handle per database per process (RocksDB allows one writer process), shared by
all bytewax worker threads; other processes open it as a *secondary* and call
``catch_up()`` to see new writes. Never fork after opening (see DESIGN.md traps).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rocksdict import AccessType, BlockBasedOptions, ColumnFamily, Options, Rdict, WriteBatch, WriteOptions

from store.layout import DELIVERY_CFS, FLOW_CFS, OUTBOX_ACKED, decode_counter, meta_counter_prefix


class StoreError(RuntimeError):
    """The data dir cannot be opened or written (permissions, full disk, corruption)."""


def _options(secondary: bool) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(not secondary)
    opts.create_missing_column_families(not secondary)
    if secondary:
        # A catch-up opens new files; with many opener threads each catch-up costs 4-6 ms.
        opts.set_max_file_opening_threads(1)
        opts.set_max_open_files(-1)
    opts.increase_parallelism(2)
    return opts


#: Column families read by point lookups on the live path (a repo's state per commit, the
#: record index per op; on the firehose most DIDs are not tracked, so most state reads miss):
#: a bloom filter (10 bits a key, ~1% false positives) answers a miss without touching the
#: SST blocks. Measured on 300k index rows in two SSTs: a miss 5.3 -> 1.2 µs, a hit 4.8 ->
#: 3.6 µs. Memory: ~1.25 bytes per key, held with each open SST.
BLOOM_CFS = frozenset({"repos", "records"})


def _cf_options(name: str) -> Options:
    opts = Options(raw_mode=True)
    if name in BLOOM_CFS:
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
    return opts


@dataclass
class Database:
    """A RocksDB database and its column families, by name."""

    db: Rdict
    cfs: dict[str, Rdict]
    handles: dict[str, ColumnFamily]
    path: Path
    secondary: bool

    def cf(self, name: str) -> Rdict:
        """The column family as a dict-like view (get, iter, put)."""
        return self.cfs[name]

    def handle(self, name: str) -> ColumnFamily:
        """The column family handle that ``WriteBatch.put(k, v, handle)`` takes."""
        return self.handles[name]

    def batch(self) -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def write(self, batch: WriteBatch, sync: bool = False) -> None:
        """Apply a WriteBatch atomically; ``sync`` fsyncs the WAL first (API commands)."""
        try:
            if sync:
                wo = WriteOptions()
                wo.sync = True  # a property in rocksdict (there is no set_sync)
                self.db.write(batch, wo)
            else:
                self.db.write(batch)
        except Exception as e:  # rocksdict raises plain Exception with RocksDB's message
            raise StoreError(f"RocksDB write failed in {self.path}: {e}") from e

    def catch_up(self) -> None:
        """Secondary only: make writes of the primary visible."""
        self.db.try_catch_up_with_primary()

    def close(self) -> None:
        for cf in self.cfs.values():
            try:
                cf.close()
            except Exception:
                pass
        self.db.close()
        # Column-family objects keep the DB (and its LOCK) alive until dropped: without this a
        # closed Database that is still referenced blocks reopening the path in this process.
        self.cfs.clear()
        self.handles.clear()


class ChangeWatch:
    """Tells a secondary cheaply whether the primary may have written since the last look.

    A secondary catch-up lists and opens files of the database directory (0.1-0.3 ms); two
    ``stat`` calls (a few µs) say whether it can have anything to show: every write appends to
    the newest WAL (``NNNNNN.log``; its size grows) and every new file (WAL, SST, MANIFEST)
    changes the directory's mtime. File times come from a coarse clock, so a directory that
    changed less than ``settle`` seconds ago is listed again on the next look. ``changed``
    errs towards True; callers still catch up every ``max_quiet`` seconds as a safety net.
    """

    def __init__(self, path: Path, *, max_quiet: float = 1.0, settle: float = 0.05) -> None:
        self._path = str(path)
        self._max_quiet = max_quiet
        self._settle_ns = int(settle * 1e9)
        self._dir_mtime = -1
        self._wal: str | None = None
        self._wal_size = -1
        self._last_true = 0.0

    def changed(self) -> bool:
        """True if the primary may have written since the last call that returned True."""
        now = time.monotonic()
        try:
            if self._look() or now - self._last_true >= self._max_quiet:
                self._last_true = now
                return True
        except OSError:  # e.g. a WAL deleted between the listing and the stat: list again
            self._dir_mtime = -1
            self._last_true = now
            return True
        return False

    def reset(self) -> None:
        """The next ``changed`` answers True (e.g. the catch-up it asked for failed)."""
        self._last_true = float("-inf")

    def _look(self) -> bool:
        mtime = os.stat(self._path).st_mtime_ns
        changed = False
        if mtime != self._dir_mtime:
            logs = [e.name for e in os.scandir(self._path) if e.name.endswith(".log") and e.name[:-4].isdigit()]
            self._wal = os.path.join(self._path, max(logs, key=lambda n: int(n[:-4]))) if logs else None
            # a change within the clock's granularity could hide the next one: look again then
            self._dir_mtime = mtime if time.time_ns() - mtime > self._settle_ns else -1
            changed = True
        size = os.stat(self._wal).st_size if self._wal else -1
        if size != self._wal_size:
            self._wal_size = size
            changed = True
        return changed


_lock = threading.Lock()
_open: dict[tuple[str, bool], Database] = {}


def _open_db(path: Path, names: tuple[str, ...], secondary_dir: Path | None) -> Database:
    secondary = secondary_dir is not None
    opts = _options(secondary)
    kwargs = {}
    if secondary:
        secondary_dir.mkdir(parents=True, exist_ok=True)
        kwargs["access_type"] = AccessType.secondary(str(secondary_dir))
    else:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    cf_opts = {n: _cf_options(n) for n in names}
    try:
        db = Rdict(str(path), options=opts, column_families=cf_opts, **kwargs)
    except Exception as e:
        raise StoreError(f"cannot open RocksDB at {path}: {e}") from e
    cfs = {n: db.get_column_family(n) for n in names}
    handles = {n: db.get_column_family_handle(n) for n in names}
    return Database(db=db, cfs=cfs, handles=handles, path=path, secondary=secondary)


def open_flow_db(data_dir: str | Path, secondary: bool = False) -> Database:
    """The dataflow's database (primary in the flow process, secondary elsewhere)."""
    return _shared(Path(data_dir) / "flow", FLOW_CFS, secondary, Path(data_dir))


def open_delivery_db(data_dir: str | Path, secondary: bool = False) -> Database:
    """The delivery process's database (commands from the API, acks)."""
    return _shared(Path(data_dir) / "delivery", DELIVERY_CFS, secondary, Path(data_dir))


def _shared(path: Path, names: tuple[str, ...], secondary: bool, data_dir: Path) -> Database:
    key = (str(path.resolve()), secondary)
    with _lock:
        db = _open.get(key)
        if db is None:
            sec_dir = data_dir / "secondary" / f"{path.name}-{os.getpid()}" if secondary else None
            db = _open_db(path, names, sec_dir)
            _open[key] = db
        return db


def close_all() -> None:
    """Close every database this process opened (tests, shutdown)."""
    with _lock:
        for db in _open.values():
            try:
                db.close()
            except Exception:
                pass
        _open.clear()


def read_counter(db: Database, name: str) -> int:
    """Sum of ``count/<name>/<shard>`` over shards."""
    return sum(decode_counter(v) for _, v in prefix_items(db.cf("meta"), meta_counter_prefix(name)))


def outbox_depth(db: Database) -> int:
    """Events written to the outbox and not yet deleted: sum(count/outbox/*) - count/outbox_acked/0."""
    return read_counter(db, "outbox") - read_counter(db, OUTBOX_ACKED)


def prefix_items(cf: Rdict, prefix: bytes, start: bytes | None = None):
    """Iterate (key, value) of ``cf`` whose key starts with ``prefix``, from ``start`` if given."""
    it = cf.iter()
    it.seek(start if start is not None else prefix)
    while it.valid():
        k = it.key()
        if not k.startswith(prefix):
            break
        yield k, it.value()
        it.next()
