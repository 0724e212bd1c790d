"""A verified ``getRepo`` CAR packed for RepoLogic: the backfill's process-pool task.

``pack_snapshot`` runs in a verification worker process (``runtime.procpool``): it verifies
the CAR (``protocol.commit.verify_repo``: every block hash, the commit signature, the commit
DID, the whole MST), converts every kept record to the JSON Tap puts in an event
(``protocol.atjson.event_record_json``) and returns the records in chunks of a few large
``bytes`` objects. Returning 100k small tuples instead would cost the flow process more to
unpickle than it saves (measured: 3x), and the flow process is the bottleneck.

A chunk holds, for ``count`` records in strictly increasing key order:

- ``keys``: the ``records`` CF keys (``did \\0 collection/rkey``) joined by ``\\n`` (neither a
  DID nor a valid repo path contains one);
- ``cids``: the binary record CIDs, concatenated (MST values are always 36 bytes);
- ``bodies``: each record's ``record`` event body with ``"action":"create"`` (RepoLogic
  rewrites the action of an update in place), joined by ``\\n`` (compact JSON has none);
- ``last_path``: the last ``collection/rkey`` (the next chunk's ``after``).

The body is byte for byte ``operators.events.record_body(live=False, ...)`` (tests hold the
two together), built from one template per repo. Pure code: no I/O; the caller handles
errors by class (``SnapshotFailed.kind``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import orjson

from protocol.atjson import event_record_json
from protocol.cid import cid_to_str

__all__ = ["CID_LEN", "PackedChunk", "PackedSnapshot", "ChunkRef", "SnapshotFailed", "pack_snapshot", "Packer",
           "verdicts", "signing_key_of", "split_cids",
           "body_head", "record_tail", "record_json", "UPDATE_ACTION", "CREATE_ACTION"]

CID_LEN = 36
CREATE_ACTION = b'"action":"create"'
UPDATE_ACTION = b'"action":"update"'


@dataclass(slots=True)
class PackedChunk:
    count: int
    keys: bytes
    cids: bytes
    bodies: bytes
    last_path: str


@dataclass(slots=True)
class ChunkRef:
    """Where ``connectors.repospool.pack_snapshot_file`` wrote a chunk: ``keys``, ``cids`` and
    ``bodies`` back to back."""

    offset: int
    count: int
    keys_len: int
    cids_len: int
    bodies_len: int
    last_path: str


@dataclass(slots=True)
class PackedSnapshot:
    """A verified repo: commit facts, verification counters and its records in chunks."""

    did: str
    rev: str
    data_cid: str
    records: int
    chunks: list = field(repr=False)  # PackedChunk, or ChunkRef into ``spool``
    missing_nodes: int = 0
    invalid_paths: int = 0
    missing_blocks: int = 0
    verify_seconds: float = 0.0
    spool: str | None = None  # the file of the ``ChunkRef`` chunks (connectors.repospool), else None


class SnapshotFailed(Exception):
    """Verification failed. ``kind``: ``signature`` (bad signature) or ``car`` (anything else)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message


def body_head(did: str, rev: str) -> bytes:
    """What every snapshot record body of one repo starts with, up to the collection's text."""
    return b'{"live":false,"did":' + orjson.dumps(did) + b',"rev":' + orjson.dumps(rev) + b',"collection":"'


def record_tail(rkey: str, cid: str, record_json: bytes | None) -> bytes:
    """The body after the collection (which needs no escaping, nor does ``rkey``: both are checked syntax)."""
    if record_json is None:
        return _TAIL_NO_RECORD % (rkey.encode(), cid.encode())
    return _TAIL % (rkey.encode(), record_json, cid.encode())


_TAIL = b'","rkey":"%b",' + CREATE_ACTION + b',"record":%b,"cid":"%b"}'
_TAIL_NO_RECORD = b'","rkey":"%b",' + CREATE_ACTION + b',"cid":"%b"}'
# the same with the head (up to and including the collection) in front: one format op per record
_BODY = b"%b" + _TAIL
_BODY_NO_RECORD = b"%b" + _TAIL_NO_RECORD


def record_json(block: bytes | None) -> bytes | None:
    """Record block -> the JSON of an event's ``record`` field, or None (missing, not atproto data, unsafe)."""
    if block is None:
        return None
    try:
        return event_record_json(block)
    except Exception:  # a converter bug must not fail the repo: the event goes out without record
        return None


def pack_snapshot(car: bytes, signing_key: str, did: str, *, allow_partial: bool, max_car_size: int,
                  keep: Callable[[str], bool] | None = None, chunk_size: int = 500) -> PackedSnapshot:
    """Verify ``car`` for ``did`` with the Multikey ``signing_key``; pack the kept records.

    Raises ``SnapshotFailed`` (never anything else for bad input).
    """
    from protocol.commit import verify_repo

    t0 = time.perf_counter()
    key = signing_key_of(signing_key)
    with verdicts():
        repo = verify_repo(car, key, did, allow_partial=allow_partial, max_car_size=max_car_size)
    secs = time.perf_counter() - t0
    del car
    chunks: list[PackedChunk] = []
    with verdicts(bug_guard=True):  # verify_repo checked everything: only a bug raises here
        packer = Packer(repo, keep, chunk_size, chunks.append)
        packer.feed(repo.records())
        packer.finish()
    return PackedSnapshot(repo.did, repo.rev, cid_to_str(repo.data_cid), packer.total, chunks,
                          repo.missing_nodes, repo.invalid_paths, repo.missing_blocks, secs)


def signing_key_of(signing_key: str):
    """The Multikey parsed, or ``SnapshotFailed("key")``."""
    from protocol.keys import parse_multikey

    try:
        return parse_multikey(signing_key)
    except Exception as e:
        raise SnapshotFailed("key", str(e)) from None


@contextmanager
def verdicts(bug_guard: bool = False):
    """Verification errors -> ``SnapshotFailed`` by kind; with ``bug_guard`` (packing a verified
    repo) anything but a ``SnapshotFailed`` is a bug, reported as a ``car`` failure all the same."""
    from protocol.commit import BadSignature

    try:
        yield
    except SnapshotFailed:
        raise
    except BadSignature as e:
        raise SnapshotFailed("signature", str(e)) from None
    except Exception as e:
        raise SnapshotFailed("car", f"{type(e).__name__}: {e}" if bug_guard else str(e)) from None


class Packer:
    """Records of one repo -> ``PackedChunk``s of ``chunk_size`` records, handed to ``emit``."""

    def __init__(self, repo, keep: Callable[[str], bool] | None, chunk_size: int,
                 emit: Callable[[PackedChunk], None]) -> None:
        self.head = body_head(repo.did, repo.rev)
        self.prefix = repo.did.encode() + b"\x00"
        self.keep = keep
        self.chunk_size = max(1, chunk_size)
        self.emit = emit
        self.keys: list[bytes] = []
        self.cids: list[bytes] = []
        self.bodies: list[bytes] = []
        self.last = ""
        self.total = 0
        self.coll_head: dict[str, bytes] = {}

    def feed(self, records) -> None:
        head, prefix, keep, chunk_size = self.head, self.prefix, self.keep, self.chunk_size
        keys, cids, bodies, last = self.keys, self.cids, self.bodies, self.last
        tostr = cid_to_str
        conv = record_json
        coll_head = self.coll_head
        for coll, rkey, cid, block in records:
            if keep is not None and not keep(coll):
                continue
            h = coll_head.get(coll)
            if h is None:
                h = coll_head[coll] = head + coll.encode()
            path = coll + "/" + rkey
            keys.append(prefix + path.encode())
            cids.append(cid)
            j = conv(block)
            if j is None:
                bodies.append(_BODY_NO_RECORD % (h, rkey.encode(), tostr(cid).encode()))
            else:
                bodies.append(_BODY % (h, rkey.encode(), j, tostr(cid).encode()))
            last = path
            if len(keys) >= chunk_size:
                self.emit(_chunk(keys, cids, bodies, last))
                self.total += len(keys)
                keys, cids, bodies = [], [], []
        self.keys, self.cids, self.bodies, self.last = keys, cids, bodies, last

    def finish(self) -> None:
        if self.keys:
            self.emit(_chunk(self.keys, self.cids, self.bodies, self.last))
            self.total += len(self.keys)
            self.keys, self.cids, self.bodies = [], [], []


def _chunk(keys: list[bytes], cids: list[bytes], bodies: list[bytes], last: str) -> PackedChunk:
    n = len(keys)
    joined = b"\n".join(bodies)
    if joined.count(b"\n") != n - 1:  # impossible for compact JSON; never split a body in two
        raise SnapshotFailed("car", "record JSON with a raw newline")
    cb = b"".join(cids)
    if len(cb) != CID_LEN * n:
        raise SnapshotFailed("car", "record CID of unexpected length")
    return PackedChunk(n, b"\n".join(keys), cb, joined, last)


def split_cids(blob: bytes, n: int) -> list[bytes]:
    """The ``n`` CIDs of a chunk's ``cids``."""
    s = _STRUCTS.get(n)
    if s is None:
        import struct

        s = struct.Struct(f"{CID_LEN}s" * n)
        if len(_STRUCTS) < 64:
            _STRUCTS[n] = s
    return list(s.unpack(blob))


_STRUCTS: dict = {}
