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

from dataclasses import dataclass, field
from typing import Callable

import orjson

from protocol.atjson import event_record_json
from protocol.cid import cid_to_str

__all__ = ["CID_LEN", "PackedChunk", "PackedSnapshot", "SnapshotFailed", "pack_snapshot", "split_cids",
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
class PackedSnapshot:
    """A verified repo: commit facts, verification counters and its records in chunks."""

    did: str
    rev: str
    data_cid: str
    records: int
    chunks: list[PackedChunk] = field(repr=False)
    missing_nodes: int = 0
    invalid_paths: int = 0
    missing_blocks: int = 0
    verify_seconds: float = 0.0


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
    import time

    from protocol.commit import BadSignature, verify_repo
    from protocol.keys import parse_multikey

    t0 = time.perf_counter()
    try:
        key = parse_multikey(signing_key)
    except Exception as e:
        raise SnapshotFailed("key", str(e)) from None
    try:
        repo = verify_repo(car, key, did, allow_partial=allow_partial, max_car_size=max_car_size)
    except BadSignature as e:
        raise SnapshotFailed("signature", str(e)) from None
    except Exception as e:
        raise SnapshotFailed("car", str(e)) from None
    secs = time.perf_counter() - t0
    del car
    try:
        return _pack(repo, keep, max(1, chunk_size), secs)
    except SnapshotFailed:
        raise
    except Exception as e:  # verify_repo checked everything; a bug guard
        raise SnapshotFailed("car", f"{type(e).__name__}: {e}") from None


def _pack(repo, keep: Callable[[str], bool] | None, chunk_size: int, secs: float) -> PackedSnapshot:
    head = body_head(repo.did, repo.rev)
    prefix = repo.did.encode() + b"\x00"
    chunks: list[PackedChunk] = []
    keys: list[bytes] = []
    cids: list[bytes] = []
    bodies: list[bytes] = []
    last = ""
    total = 0
    tostr = cid_to_str
    conv = record_json
    coll_head: dict[str, bytes] = {}
    for coll, rkey, cid, block in repo.records():
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
            chunks.append(_chunk(keys, cids, bodies, last))
            total += len(keys)
            keys, cids, bodies = [], [], []
    if keys:
        chunks.append(_chunk(keys, cids, bodies, last))
        total += len(keys)
    return PackedSnapshot(repo.did, repo.rev, cid_to_str(repo.data_cid), total, chunks,
                          repo.missing_nodes, repo.invalid_paths, repo.missing_blocks, secs)


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
