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
    path: str  # collection/rkey
    cid: str
    record_json: bytes | None  # atproto JSON, None when the block is missing or not atproto data


@dataclass(slots=True)
class SnapshotChunk:
    """Part of a verified ``getRepo`` snapshot, records in key order.

    ``after`` is the last path of the previous chunk ("" for the first): this chunk covers
    paths in (after, last path of this chunk], or (after, end] when ``last``. RepoLogic
    merges each chunk with its record index over that range, so vanished records are found
    without holding the whole repo in memory.
    """

    did: str
    fetch_key: bytes
    rev: str
    data_cid: str
    identity: ResolvedIdentity | None  # set on the first chunk
    records: list[SnapshotRecord]
    after: str
    first: bool
    last: bool


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


@dataclass(slots=True)
class Rejected:
    """A counted, logged rejection (the ``errs`` stream): never an exception that stops the flow."""

    did: str
    source: str
    reason: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
