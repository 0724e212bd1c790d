"""The narrow verification interface RepoLogic uses, and its default implementation.

RepoLogic needs two questions answered with the repo's signing key from its state:

- ``verify_commit(body, signing_key, keep) -> CheckedCommit``: a ``#commit`` frame body (as
  decoded by libipld) is a valid, signed Sync 1.1 commit (spec §9.1 steps 1-10); its ops are
  returned with CIDs as strings and records already in atproto JSON, keeping only ops whose
  collection passes ``keep`` (the collection filter: verification uses every op, only the
  result is filtered, and filtered-out records are never converted to JSON). Records go
  through ``protocol.atjson.event_record_json``: Go Tap's bytes, or no ``record`` field
  when Go could not decode it or the official client would reject the event.
- ``verify_sync(body, signing_key) -> CheckedSync``: a ``#sync`` frame's signed commit.

Both raise ``VerifyError`` (a ``ValueError``) with a short reason on any failure. The
default implementations adapt ``protocol.commit`` (imported lazily, so the state machine
and its tests do not depend on it); RepoLogic takes any callables with these signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class VerifyError(ValueError):
    """A commit or sync message that failed verification; ``str()`` says why, ``reason`` is
    a short stable label (``protocol.commit`` reasons, ``no_key``, ...)."""

    reason = "invalid"


@dataclass(slots=True)
class CommitOp:
    """One (filtered) op of a verified commit. Deletes carry neither ``cid`` nor record."""

    action: str  # create | update | delete
    collection: str
    rkey: str
    cid: Optional[str] = None
    record_json: Optional[bytes] = None  # atproto JSON; None if absent or not decodable

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


@dataclass(slots=True)
class CheckedCommit:
    """A verified ``#commit``: ``data_cid`` is the new MST root, ``prev_data`` the event's
    ``prevData`` (None for legacy events without it)."""

    did: str
    rev: str
    data_cid: str
    prev_data: Optional[str]
    ops: list[CommitOp] = field(default_factory=list)


@dataclass(slots=True)
class CheckedSync:
    """A verified ``#sync``: the repo's current rev and MST root."""

    did: str
    rev: str
    data_cid: str


VerifyCommit = Callable[[dict, str, Callable[[str], bool]], CheckedCommit]
VerifySync = Callable[[dict, str], CheckedSync]


def op_collections(body: dict[str, Any]) -> set[str]:
    """Collections named by a ``#commit`` body's ops (unverified; for signal-collection
    auto-tracking, which looks at every op including deletes)."""
    out: set[str] = set()
    ops = body.get("ops") if isinstance(body, dict) else None
    if not isinstance(ops, list):
        return out
    for op in ops:
        path = op.get("path") if isinstance(op, dict) else None
        if isinstance(path, str):
            out.add(path.split("/", 1)[0])
    return out


def _public_key(signing_key: str):
    from protocol.keys import parse_multikey

    if not signing_key:
        err = VerifyError("no signing key known for the repo")
        err.reason = "no_key"
        raise err
    try:
        return parse_multikey(signing_key)
    except ValueError as e:
        err = VerifyError(f"unusable signing key: {e}")
        err.reason = "bad_key"
        raise err from None


def _cid_str(cid: Any) -> Optional[str]:
    if cid is None:
        return None
    if isinstance(cid, str):
        return cid
    from protocol.cid import cid_to_str

    return cid_to_str(bytes(cid))


def _record_to_json() -> Callable[[bytes], Optional[bytes]]:
    try:  # what Go Tap would emit, minus records the official client would reject (§5.1)
        from protocol.atjson import event_record_json as conv
    except ImportError:
        try:
            from protocol.atjson import record_to_json_bytes as conv
        except ImportError:  # until protocol.atjson lands: cbrrr's atjson mode + orjson
            import orjson

            from protocol.cbor import decode_atjson

            def conv(block: bytes) -> Optional[bytes]:
                obj = decode_atjson(block)
                return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) if isinstance(obj, dict) else None

    def to_json(block: bytes) -> Optional[bytes]:
        try:
            return conv(block)
        except Exception:  # not atproto data: the event goes out without ``record``
            return None

    return to_json


_to_json: Optional[Callable[[bytes], Optional[bytes]]] = None


def _fail(e: ValueError) -> VerifyError:
    err = VerifyError(str(e) or type(e).__name__)
    err.reason = getattr(e, "reason", "invalid")
    return err


def default_verify_commit(body: dict, signing_key: str, keep: Callable[[str], bool]) -> CheckedCommit:
    """``protocol.commit.verify_commit``, shaped for RepoLogic."""
    global _to_json
    from protocol import commit as pc

    key = _public_key(signing_key)
    try:
        vc = pc.verify_commit(body, key)
    except ValueError as e:  # protocol.commit.VerificationError (CAR, CBOR, MST, signature, ...)
        raise _fail(e) from None
    ops: list[CommitOp] = []
    for op in vc.ops:
        if not keep(op.collection):
            continue
        if op.action == "delete":
            ops.append(CommitOp("delete", op.collection, op.rkey))
            continue
        rec = None
        if op.record is not None:
            if _to_json is None:
                _to_json = _record_to_json()
            rec = _to_json(op.record)
        ops.append(CommitOp(op.action, op.collection, op.rkey, _cid_str(op.cid), rec))
    return CheckedCommit(vc.did, vc.rev, _cid_str(vc.data_cid), _cid_str(vc.prev_data), ops)


def default_verify_sync(body: dict, signing_key: str) -> CheckedSync:
    """``protocol.commit.verify_sync`` of a ``#sync`` body's ``blocks``, shaped for RepoLogic."""
    from protocol import commit as pc

    key = _public_key(signing_key)
    blocks = body.get("blocks")
    if not isinstance(blocks, (bytes, bytearray, memoryview)):
        raise VerifyError("#sync without blocks")
    try:
        res = pc.verify_sync(bytes(blocks), key)
    except ValueError as e:
        raise _fail(e) from None
    return CheckedSync(res.did, res.rev, _cid_str(res.data_cid))
