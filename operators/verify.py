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
    cid_raw: Optional[bytes] = None  # ``cid`` in binary, when the verifier had it (saves a parse)

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


_proto: Optional[tuple] = None  # (protocol.commit, parse_multikey, cid_to_str), imported on first use


def _protocol() -> tuple:
    """The protocol functions, imported once (an import statement per call costs ~2 µs each)."""
    global _proto
    if _proto is None:
        from protocol import commit
        from protocol.cid import cid_to_str
        from protocol.keys import parse_multikey

        _proto = (commit, parse_multikey, cid_to_str)
    return _proto


def _public_key(signing_key: str):
    parse_multikey = (_proto or _protocol())[1]
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
    if cid.__class__ is str:
        return cid
    return (_proto or _protocol())[2](bytes(cid) if cid.__class__ is not bytes else cid)


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
    pc = (_proto or _protocol())[0]
    key = _public_key(signing_key)
    try:
        vc = pc.verify_commit(body, key)
    except ValueError as e:  # protocol.commit.VerificationError (CAR, CBOR, MST, signature, ...)
        raise _fail(e) from None
    cid_str = _proto[2]  # type: ignore[index]  # op and root CIDs: binary, checked by verify_commit
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
        ops.append(CommitOp(op.action, op.collection, op.rkey, cid_str(op.cid), rec, op.cid))
    return CheckedCommit(vc.did, vc.rev, cid_str(vc.data_cid), _cid_str(vc.prev_data), ops)


def default_verify_sync(body: dict, signing_key: str) -> CheckedSync:
    """``protocol.commit.verify_sync`` of a ``#sync`` body's ``blocks``, shaped for RepoLogic."""
    pc = (_proto or _protocol())[0]

    key = _public_key(signing_key)
    blocks = body.get("blocks")
    if not isinstance(blocks, (bytes, bytearray, memoryview)):
        raise VerifyError("#sync without blocks")
    try:
        res = pc.verify_sync(bytes(blocks), key)
    except ValueError as e:
        raise _fail(e) from None
    return CheckedSync(res.did, res.rev, _cid_str(res.data_cid))


# --- pre-verification in the process pool ----------------------------------------------------
#
# The firehose side verifies ``#commit`` frames in ``runtime.procpool`` with the key RepoLogic
# last published for the DID; RepoLogic takes the verdict only if that key is still the repo's
# (and the collection filter is the same), else verifies inline. State checks stay in RepoLogic.


class KeyCache:
    """DID -> signing key (Multikey) RepoLogic holds, readable from the firehose thread.

    A bounded dict (oldest entry out first); ``""`` = no key (untracked or not yet claimed).
    Staleness costs only speed: RepoLogic re-verifies when the key used is not its own.
    """

    __slots__ = ("_d", "_max", "_lock")

    def __init__(self, maxsize: int = 65_536) -> None:
        import threading

        self._d: dict[str, str] = {}
        self._max = maxsize
        self._lock = threading.Lock()

    def get(self, did: str, loader: Optional[Callable[[str], str]] = None) -> str:
        """The cached key of ``did``, ``loader(did)`` on a miss (cached too); ``""`` when unknown."""
        k = self._d.get(did)
        if k is not None:
            return k
        if loader is None:
            return ""
        try:
            k = loader(did) or ""
        except Exception:  # a read failure: verify inline in RepoLogic, which will report it
            return ""
        self.note(did, k)
        return k

    def note(self, did: str, key: str) -> None:
        """Publish ``did``'s current key (RepoLogic, on every live commit it sees)."""
        d = self._d
        if d.get(did) == key:
            return
        with self._lock:
            if did not in d and len(d) >= self._max:
                try:
                    del d[next(iter(d))]
                except (StopIteration, KeyError, RuntimeError):
                    pass
            d[did] = key

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


#: The process's DID -> key cache (RepoLogic publishes, FirehoseClient reads).
SIGNING_KEYS = KeyCache()


@dataclass(slots=True)
class PreVerified:
    """The pool's verdict on a ``#commit``: made with ``key`` and filter ``patterns``.

    ``result`` is ``verify_commit_frames``' encoding (see there), or None when the pool could
    not give a verdict (RepoLogic then verifies inline)."""

    key: str
    patterns: tuple
    result: Optional[tuple]


_filters: dict[tuple, Callable[[str], bool]] = {}


def _filter_for(patterns: tuple) -> Callable[[str], bool]:
    f = _filters.get(patterns)
    if f is None:
        from operators.filters import CollectionFilter

        f = _filters[patterns] = CollectionFilter(patterns)
    return f


def verify_commit_frames(frames: list[tuple[bytes, str]], patterns: tuple) -> list[Optional[tuple]]:
    """Pool side: verify raw ``#commit`` frames, each with the signing key to use.

    One result per frame, small and cheap to pickle: ``(True, did, rev, data_cid, prev_data,
    [(action, collection, rkey, cid, record_json, cid_raw), ...])``, ``(False, reason, message)`` for a
    ``VerifyError``, or None when anything else went wrong (RepoLogic verifies inline and sees
    the same thing itself).
    """
    from protocol.cbor import decode_multi

    keep = _filter_for(patterns)
    out: list[Optional[tuple]] = []
    for data, key in frames:
        try:
            body = decode_multi(data)[1]
            cc = default_verify_commit(body, key, keep)
            out.append((True, cc.did, cc.rev, cc.data_cid, cc.prev_data,
                        [(o.action, o.collection, o.rkey, o.cid, o.record_json, o.cid_raw) for o in cc.ops]))
        except VerifyError as e:
            out.append((False, e.reason, str(e)))
        except Exception:
            out.append(None)
    return out


def checked_from_result(res: tuple) -> CheckedCommit:
    """``verify_commit_frames``' result as ``default_verify_commit`` would have returned it
    (or raised: ``VerifyError`` with the same message and reason)."""
    if res[0]:
        _, did, rev, data_cid, prev_data, ops = res
        return CheckedCommit(did, rev, data_cid, prev_data, [CommitOp(*o) for o in ops])
    err = VerifyError(res[2])
    err.reason = res[1]
    raise err
