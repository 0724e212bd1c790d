"""The items that flow from the sources into RepoLogic, one small dataclass per kind.

Every item names its ``did``; the flow keys it by ``shard_of(did)`` so all items of one repo
reach the same RepoLogic in arrival order. Sources do I/O and decoding only; RepoLogic
decides (tracked? replay? continuity?) and verifies what needs the repo's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


# --- from FirehoseSource -----------------------------------------------------------

@dataclass(slots=True)
class FirehoseCommit:
    """A ``#commit`` frame body as decoded (libipld: links are binary CID bytes, ``blocks`` is the CAR).

    ``pre``: the verification pool's verdict (``operators.verify.PreVerified``), attached by
    FirehoseSource when a pool runs; RepoLogic uses it only if made with the repo's key.
    """

    seq: int
    did: str
    body: dict[str, Any]
    pre: Any = None


@dataclass(slots=True)
class FirehoseSync:
    """A ``#sync`` frame body (``did``, ``rev``, ``blocks`` CAR with the signed commit)."""

    seq: int
    did: str
    body: dict[str, Any]


@dataclass(slots=True)
class FirehoseIdentity:
    """An ``#identity`` frame: the repo's identity may have changed; RepoLogic asks for a refresh."""

    seq: int
    did: str
    handle: str | None


@dataclass(slots=True)
class FirehoseAccount:
    """An ``#account`` frame: hosting status change."""

    seq: int
    did: str
    active: bool
    status: str | None


# --- from BackfillSource (answers to fetch-queue requests) -------------------------------

@dataclass(slots=True)
class ResolvedIdentity:
    """A DID's identity as resolved (handle verified both ways, or ``handle.invalid``)."""

    handle: str
    pds: str
    signing_key: str  # multibase (did:key body) of the #atproto key; "" if none


@dataclass(slots=True)
class FetchStarted:
    """BackfillSource resolved the identity and is about to call ``getRepo`` (Tap's claim).

    RepoLogic marks the repo ``resyncing`` (if ``fetch_key`` is still its outstanding fetch)
    and stores the identity, so live commits from now on are verified and buffered instead
    of ignored: the snapshot may be taken after them. BackfillSource waits (bounded) until
    the repo shows ``resyncing`` before it sends the request.
    """

    did: str
    fetch_key: bytes
    identity: ResolvedIdentity


@dataclass(slots=True)
class SnapshotRecord:
    """One snapshot record as tests and tools write it (``SnapshotChunk.of_records``)."""

    path: str  # collection/rkey
    cid: str
    record_json: bytes | None  # atproto JSON, None when the block is missing or not atproto data


@dataclass(slots=True)
class SnapshotChunk:
    """Part of a verified ``getRepo`` snapshot: ``count`` records in strictly increasing key order.

    ``after`` is the last path of the previous chunk ("" for the first): this chunk covers
    paths in (after, last path of this chunk], or (after, end] when ``last``. RepoLogic
    merges each chunk with its record index over that range, so vanished records are found
    without holding the whole repo in memory.

    The records are packed as ``protocol.snapshot`` builds them in the verification pool
    (``keys``: ``did \\0 path`` joined by ``\\n``; ``cids``: 36-byte binary CIDs back to back;
    ``bodies``: each record's event body, action ``create``, joined by ``\\n``), so the flow
    process neither converts records nor formats CIDs; ``unpack()`` splits them.
    """

    did: str
    fetch_key: bytes
    rev: str
    data_cid: str
    identity: ResolvedIdentity | None  # set on the first chunk
    count: int
    keys: bytes
    cids: bytes
    bodies: bytes
    after: str
    first: bool
    last: bool
    last_path: str = ""  # path of the last record ("" when empty)

    def unpack(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """(record keys, binary CIDs, event bodies), ``count`` each."""
        if not self.count:
            return [], [], []
        from protocol.snapshot import split_cids

        return self.keys.split(b"\n"), split_cids(self.cids, self.count), self.bodies.split(b"\n")

    @property
    def records(self) -> list[SnapshotRecord]:
        """The records as ``SnapshotRecord`` (path, CID string, record JSON bytes): for tests and tools."""
        from protocol.cid import cid_to_str

        keys, cids, bodies = self.unpack()
        out = []
        for k, c, body in zip(keys, cids, bodies):
            path = k[k.index(b"\x00") + 1:].decode()
            end = body.rindex(b',"cid":"')
            i = body.find(b',"record":')
            out.append(SnapshotRecord(path, cid_to_str(c), body[i + 10:end] if 0 <= i < end else None))
        return out

    @classmethod
    def of_records(cls, *, did: str, fetch_key: bytes, rev: str, data_cid: str,
                   identity: ResolvedIdentity | None, records: list[SnapshotRecord], after: str,
                   first: bool, last: bool) -> "SnapshotChunk":
        """Pack ``records`` (sorted and de-duplicated by path here) as the verification pool would."""
        from protocol.cid import cid_from_str
        from protocol.snapshot import body_head, record_tail

        head = body_head(did, rev)
        byp = {r.path: r for r in records if "/" in r.path}
        keys, cids, bodies = [], [], []
        for p in sorted(byp):
            r = byp[p]
            coll, _, rkey = p.partition("/")
            keys.append(did.encode() + b"\x00" + p.encode())
            cids.append(cid_from_str(r.cid))
            bodies.append(head + coll.encode() + record_tail(rkey, r.cid, r.record_json))
        return cls(did=did, fetch_key=fetch_key, rev=rev, data_cid=data_cid, identity=identity,
                   count=len(keys), keys=b"\n".join(keys), cids=b"".join(cids), bodies=b"\n".join(bodies),
                   after=after, first=first, last=last, last_path=max(byp) if byp else "")


@dataclass(slots=True)
class FetchFailed:
    """A repo fetch (or identity refresh) that failed; ``rate_limited`` = PDS 429/backoff."""

    did: str
    fetch_key: bytes
    error: str
    rate_limited: bool = False


@dataclass(slots=True)
class IdentityRefreshed:
    """Answer to an identity-refresh request (``kind: identity`` in the fetch queue)."""

    did: str
    fetch_key: bytes
    identity: ResolvedIdentity | None
    error: str = ""
    not_found: bool = False


# --- from ControlSource and the crawler -------------------------------------------------

@dataclass(slots=True)
class AddRepo:
    """Track a repo (API ``/repos/add`` or crawler discovery); idempotent."""

    did: str
    seq: int = 0  # control command seq; 0 for crawler discoveries


@dataclass(slots=True)
class RemoveRepo:
    did: str
    seq: int = 0


Item = Union[
    FirehoseCommit, FirehoseSync, FirehoseIdentity, FirehoseAccount,
    FetchStarted, SnapshotChunk, FetchFailed, IdentityRefreshed, AddRepo, RemoveRepo,
]

#: Items read from the firehose: their ``seq`` bounds the firehose cursor (see connectors.firehose).
FIREHOSE_ITEMS = frozenset((FirehoseCommit, FirehoseSync, FirehoseIdentity, FirehoseAccount))


@dataclass(slots=True)
class Rejected:
    """A counted, logged rejection (the ``errs`` stream): never an exception that stops the flow."""

    did: str
    source: str
    reason: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
