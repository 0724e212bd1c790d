"""Huge ``getRepo`` CARs on disk instead of in memory (the backfill's spooled path).

A CAR above ``connectors.backfill.SPOOL_CAR_BYTES`` is streamed by the download to a file in
``<TAP_DATA_DIR>/backfill-spool`` (``connectors.http.get_body``), the verification
worker maps that file and writes the packed records to a second file
(``pack_snapshot_file``), and the flow process reads them back one chunk at a time as RepoLogic
asks for them (``read_chunk``). Memory then holds the block index and a chunk or two, not the
CAR, its blocks and every record of the repo at once (a 1 GB repo needed several GB across the
flow process and a worker). The files are deleted when the repo is answered, and all of them
when the flow starts (``Spool.clear``): a crash mid-repo leaves its request in ``fetch_q``, so
the repo is fetched again anyway.

Small CARs never come here: they keep the in-memory path (``protocol.snapshot.pack_snapshot``).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Callable

from protocol.snapshot import ChunkRef, PackedChunk, PackedSnapshot, Packer, signing_key_of, verdicts
from protocol.cid import cid_to_str

__all__ = ["Spool", "pack_snapshot_file", "read_chunk", "SPOOL_DIR"]

_log = logging.getLogger(__name__)

SPOOL_DIR = "backfill-spool"


class Spool:
    """The spool directory of one flow process: fresh file names, removal, clean-up at start."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir) / SPOOL_DIR
        self._n = itertools.count()

    def clear(self) -> int:
        """Create the directory; delete what a previous run left in it. Returns the files deleted."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 0
        for p in self.dir.iterdir():
            try:
                p.unlink()
                n += 1
            except OSError as e:
                _log.warning("could not delete a leftover spool file", extra={"path": str(p), "error": str(e)})
        if n:
            _log.info("deleted leftover backfill spool files", extra={"files": n})
        return n

    def paths(self) -> tuple[str, str]:
        """A new (CAR file, packed records file) pair of names."""
        n = next(self._n)
        base = self.dir / f"{os.getpid()}-{n}"
        return str(base) + ".car", str(base) + ".rec"

    @staticmethod
    def remove(*paths: str | None) -> None:
        for p in paths:
            if p:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    _log.warning("could not delete a spool file", extra={"path": p, "error": str(e)})


def pack_snapshot_file(car_path: str, out_path: str, signing_key: str, did: str, *, allow_partial: bool,
                       max_car_size: int, keep: Callable[[str], bool] | None = None,
                       chunk_size: int = 500) -> PackedSnapshot:
    """``pack_snapshot`` of a huge CAR spooled to ``car_path``, in memory that does not grow with it:
    the CAR is mapped, not read (``protocol.commit.read_repo_car``: blocks found by offset), the
    MST is walked once, and the records are packed while the walk goes on and written to
    ``out_path``; the result's ``chunks`` are ``ChunkRef``s into that file (``read_chunk``).

    The same checks, verdicts and messages as ``pack_snapshot``: nothing in ``out_path`` counts
    unless this returns. The caller owns (and deletes) both files.
    """
    from protocol.commit import read_repo_car, verify_repo_car

    t0 = time.perf_counter()
    key = signing_key_of(signing_key)
    with open(car_path, "rb") as f, open(out_path, "wb") as out:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            with verdicts():
                read_repo_car(b"", max_car_size=max_car_size)  # the empty CAR's verdict
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            chunks: list[ChunkRef] = []
            packer: Packer | None = None  # made at the first entries: it needs the verified repo

            def emit(c: PackedChunk) -> None:
                at = out.tell()
                out.write(c.keys)
                out.write(c.cids)
                out.write(c.bodies)
                chunks.append(ChunkRef(at, c.count, len(c.keys), len(c.cids), len(c.bodies), c.last_path))

            def on_entries(repo, entries: list) -> None:
                nonlocal packer
                if packer is None:
                    packer = Packer(repo, keep, chunk_size, emit)
                with verdicts(bug_guard=True):
                    packer.feed(repo.records_of(entries))

            with verdicts():
                car = read_repo_car(mm, max_car_size=max_car_size)
                repo = verify_repo_car(car, key, did, allow_partial=allow_partial, on_entries=on_entries)
            with verdicts(bug_guard=True):
                if packer is None:  # no entries at all
                    packer = Packer(repo, keep, chunk_size, emit)
                packer.finish()
            del car
        finally:
            try:
                mm.close()
            except BufferError:  # a block view still referenced (an error's traceback): unmapped when freed
                pass
    secs = time.perf_counter() - t0
    return PackedSnapshot(repo.did, repo.rev, cid_to_str(repo.data_cid), packer.total, chunks,
                          repo.missing_nodes, repo.invalid_paths, repo.missing_blocks, secs, spool=out_path)


def read_chunk(fd: int, ref: "ChunkRef") -> PackedChunk:
    """The chunk ``ref`` names in the spool file open as ``fd`` (``pack_snapshot_file``'s output)."""
    at = ref.offset
    keys = os.pread(fd, ref.keys_len, at)
    cids = os.pread(fd, ref.cids_len, at + ref.keys_len)
    bodies = os.pread(fd, ref.bodies_len, at + ref.keys_len + ref.cids_len)
    if len(keys) + len(cids) + len(bodies) != ref.keys_len + ref.cids_len + ref.bodies_len:
        raise OSError(f"spool file ends before the chunk at {at}")
    return PackedChunk(ref.count, keys, cids, bodies, ref.last_path)


