"""Verification of signed repo commits: firehose ``#commit`` and ``#sync``, and full-repo CARs.

Pure code: the caller resolves the DID's signing key (anything with ``verify(data, sig) -> bool``)
and passes it in. Every failure raises a :class:`VerificationError` subclass whose ``reason`` is a
short stable label, so callers can count drops by reason and log the message.

``#commit`` (spec §9.1, Sync 1.1), in this order:

1. ``repo`` is a DID, ``rev`` a TID, ``time`` an atproto datetime.
2. ``blocks`` is a CAR v1 whose every block hashes to its CID; its first root is the commit block.
3. The commit is ``{did, version: 3, data, prev, rev, sig}`` with a non-empty ``sig``.
4. ``commit.did == repo`` and ``commit.rev == rev``.
5. ``sig`` verifies over the canonical DAG-CBOR of the commit without ``sig`` (rebuilt from typed
   fields, never by re-encoding decoded data).
6. The MST is loaded from ``commit.data`` (missing subtrees allowed: a proof is a partial tree).
7. Every op path is ``collection/rkey`` with a known action; each create/update has a ``cid``
   equal to the MST value at its path, and its record block is in the CAR.
8. Legacy escape: an update or delete without ``prev`` ends verification here (accepted).
9. Op shapes: create = cid only, update = cid + different prev, delete = prev only; no path twice.
10. The inverse of the ops applied to the MST (deletes first, then by path, stub-root rule) must
    give ``prevData`` when the event carries it.

The continuity check (``prevData`` equals the stored root) needs state and is not done here.

Full repos (``verify_repo``, §9.2) also accept the legacy version-2 commit of old exports,
``{did, version: 2, data, prev, sig}``: signed the same way (everything but ``sig``), ``rev``
absent and reported as ``""``. ``#commit`` and ``#sync`` stay v3-only (Sync 1.1). Signatures are
low-S everywhere; one whose low-S twin would verify is ``HighSSignature`` (its own reason, as real
old repos have them), never accepted.

Deliberate hardenings over Tap:

- an unknown op ``action`` is rejected even when the legacy escape applies (Tap would emit it);
- the legacy escape (step 8) applies only to legacy events, those without ``prevData``. A Sync 1.1
  event (with ``prevData``) whose update or delete lacks ``prev`` is ``BadOp``: Tap accepts it
  uninverted, so an op added to a genuine signed commit (say, a delete of any record) would pass;
- only ``VerificationError`` leaves these functions: an op ``action`` of any type is ``BadOp``, and
  an MST the tree code chokes on (besides ``MSTError``) is ``BadMST``;
- limits (``BadOp``/``BadCar``/``BadMST``): at most ``MAX_COMMIT_OPS`` ops (the relay's and the
  lexicon's limit), at most ``MAX_COMMIT_BLOCKS`` blocks in a ``#commit``/``#sync`` CAR, and an
  MST at most ``MAX_MST_HEIGHT`` layers tall (a root that is a chain of empty nodes could
  otherwise make the edits of the inversion recurse past Python's stack limit).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Protocol

import libipld

from protocol import syntax
from protocol.car import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_CAR_SIZE, Car, CarError, index_car, read_car
from protocol.cid import cid_to_str
from protocol.mst import (
    MST,
    MSTError,
    MSTInversionError,
    MSTPartialError,
    invert_ops,
)

__all__ = [
    "VerificationError",
    "BadSyntax",
    "BadCar",
    "BadCommit",
    "BadSignature",
    "HighSSignature",
    "CommitMismatch",
    "BadOp",
    "OpMismatch",
    "MissingRecord",
    "ProofIncomplete",
    "InversionMismatch",
    "BadMST",
    "SignatureKey",
    "CommitOp",
    "SignedCommit",
    "VerifiedCommit",
    "SyncCommit",
    "VerifiedRepo",
    "RepoRecord",
    "parse_signed_commit",
    "verify_commit",
    "parse_sync",
    "verify_sync",
    "verify_repo",
    "verify_repo_car",
    "read_repo_car",
    "MAX_COMMIT_OPS",
    "MAX_COMMIT_BLOCKS",
    "MAX_MST_HEIGHT",
]

#: Ops in one ``#commit`` (``com.atproto.sync.subscribeRepos#commit`` ops maxLength; relays enforce it).
MAX_COMMIT_OPS = 200
#: Blocks in one ``#commit``/``#sync`` CAR: 200 records plus their MST proof fit many times over;
#: bounds what a frame can cost (hashing) before it is refused.
MAX_COMMIT_BLOCKS = 10_000
#: MST layers: a key's height is at most 128 (2-bit groups of a 256-bit hash).
MAX_MST_HEIGHT = 128

_CBOR_CID_PREFIX = b"\x01\x71\x12\x20"
_RAW_CID_PREFIX = b"\x01\x55\x12\x20"
_CID_PREFIXES = (_CBOR_CID_PREFIX, _RAW_CID_PREFIX)
_decode = libipld.decode_dag_cbor  # links as binary CIDs; typed fields are checked one by one
_encode_links = libipld.encode_dag_cbor  # canonical, any 36-byte sha2-256 CID ``bytes`` as a link


# ----------------------------------------------------------------------------- errors


class VerificationError(ValueError):
    """Input that failed verification; ``reason`` is a stable label for metrics."""

    reason = "invalid"


class BadSyntax(VerificationError):
    """Event fields with the wrong syntax or type (repo DID, rev TID, time, prevData)."""

    reason = "bad_syntax"


class BadCar(VerificationError):
    """The CAR is malformed, a block does not hash to its CID, or the commit block is missing."""

    reason = "bad_car"


class BadCommit(VerificationError):
    """The commit block is not a valid v3 commit object."""

    reason = "bad_commit"


class BadSignature(VerificationError):
    """The commit signature does not verify with the given key (including high-S and DER forms)."""

    reason = "bad_signature"


class HighSSignature(BadSignature):
    """A signature whose S is in the upper half of the curve order: atproto requires low-S.

    Told apart from other bad signatures (a distinct reason) because real, old repos have them
    (P-256 keys of early PDSes signed without normalizing S). Still rejected: a high-S signature
    is the malleated twin of a low-S one. ``PublicKey.verify_lenient`` can tell whether it would
    otherwise verify; that is a diagnostic, never the verification.
    """

    reason = "high_s_signature"


class CommitMismatch(VerificationError):
    """The commit's DID or rev differs from the event's (or from the DID that was asked for)."""

    reason = "commit_mismatch"


class BadOp(VerificationError):
    """An op with a bad path, unknown action, wrong cid/prev shape, or a path given twice."""

    reason = "bad_op"


class OpMismatch(VerificationError):
    """The MST value at an op's path is not the op's cid."""

    reason = "op_mismatch"


class MissingRecord(VerificationError):
    """A created/updated record's block is not in the CAR (e.g. a ``tooBig`` commit)."""

    reason = "missing_record"


class ProofIncomplete(VerificationError):
    """The CAR lacks an MST node the checks or the inversion need (repo must resync)."""

    reason = "proof_incomplete"


class InversionMismatch(VerificationError):
    """Undoing the ops does not give ``prevData``, or the tree contradicts an op."""

    reason = "inversion_mismatch"


class BadMST(VerificationError):
    """The MST is structurally invalid (bad node, wrong layer, order, prefix compression)."""

    reason = "bad_mst"


class SignatureKey(Protocol):
    """What verification needs of a public key (``protocol.keys.PublicKey`` is one)."""

    def verify(self, data: bytes, sig: bytes, /) -> bool: ...


# ----------------------------------------------------------------------------- results


class CommitOp(NamedTuple):
    """One verified op. ``record`` is the record's DAG-CBOR block (create/update), else None."""

    action: str
    collection: str
    rkey: str
    cid: bytes | None
    prev: bytes | None
    record: bytes | None


@dataclass(slots=True)
class SignedCommit:
    """A parsed commit block whose structure is valid (signature not yet checked)."""

    did: str
    rev: str
    data_cid: bytes
    prev: bytes | None
    sig: bytes
    unsigned: bytes  # canonical DAG-CBOR of the commit without ``sig``: the signature input
    commit_cid: bytes
    car: Car
    version: int = 3  # 2 only for a legacy commit accepted by ``parse_signed_commit(allow_v2=True)``

    def check_signature(self, key: SignatureKey) -> None:
        try:
            ok = key.verify(self.unsigned, self.sig)
        except Exception as e:  # a key object may raise on malformed input; treat as bad
            raise BadSignature(f"signature check failed for {self.did}: {e}") from None
        if not ok:
            if _is_high_s(key, self.unsigned, self.sig):
                raise HighSSignature(f"high-S signature for {self.did}: it verifies only with S moved to the "
                                     "lower half of the curve order, and atproto requires low-S")
            raise BadSignature(f"commit signature does not verify for {self.did}")


# curve orders (secp256k1, P-256), to tell a high-S signature apart
_CURVE_ORDER = {
    "k256": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "p256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}


def _is_high_s(key: Any, data: bytes, sig: bytes) -> bool:
    """True when ``sig`` (which failed) is a 64-byte ``r || s`` with S in (n/2, n) whose low-S
    twin ``r || n - s`` verifies: a valid signature that only breaks the low-S rule. A random bad
    signature has a high S half of the time; it is not reported as high-S."""
    n = _CURVE_ORDER.get(getattr(key, "curve", None))
    if n is None or type(sig) is not bytes or len(sig) != 64:
        return False
    s = int.from_bytes(sig[32:], "big")
    if not n >> 1 < s < n:
        return False
    try:
        return key.verify(data, sig[:32] + (n - s).to_bytes(32, "big")) is True
    except Exception:
        return False


@dataclass(slots=True)
class VerifiedCommit:
    """A ``#commit`` that passed verification.

    ``data_cid`` is the new MST root, ``prev_data`` the event's ``prevData`` (None for legacy
    events), ``inverted`` False when the legacy escape skipped the inversion.
    """

    did: str
    rev: str
    data_cid: bytes
    prev_data: bytes | None
    commit_cid: bytes
    ops: list[CommitOp]
    inverted: bool = True


class SyncCommit(NamedTuple):
    """What a verified ``#sync`` says: the repo's current rev and MST root."""

    did: str
    rev: str
    data_cid: bytes


class RepoRecord(NamedTuple):
    """One record of a repo snapshot, in MST key order; ``block`` None when absent from the CAR."""

    collection: str
    rkey: str
    cid: bytes
    block: bytes | None


@dataclass(slots=True)
class VerifiedRepo:
    """A verified ``getRepo`` CAR. ``records()`` yields its records in key order.

    Counters: ``missing_nodes`` (subtrees absent from the CAR, skipped), and, filled while
    ``records()`` runs, ``invalid_paths`` (keys that are not ``collection/rkey``, skipped) and
    ``missing_blocks`` (records whose block is absent, yielded with ``block=None``).
    """

    did: str
    rev: str
    data_cid: bytes
    commit_cid: bytes
    entries: list[tuple[bytes, bytes]] = field(repr=False)
    blocks: dict[bytes, bytes] = field(repr=False)
    missing_nodes: int = 0
    invalid_paths: int = 0
    missing_blocks: int = 0
    version: int = 3  # the commit's: 2 for a legacy repo (then ``rev`` may be "")

    @property
    def record_count(self) -> int:
        """MST entries (including any with invalid paths)."""
        return len(self.entries)

    def records(self) -> Iterator[RepoRecord]:
        return self.records_of(self.entries)

    def records_of(self, entries: Iterable[tuple[bytes, bytes]]) -> Iterator[RepoRecord]:
        """``records()`` of some of the MST entries (a batch of a streamed walk), counted alike."""
        blocks = self.blocks
        ok_coll = _COLLECTION_OK
        new = tuple.__new__
        for key, cid in entries:
            # inlined _split_key: this loop runs once per record of every backfill
            try:
                coll, sep, rkey = key.decode("ascii").partition("/")
            except UnicodeDecodeError:
                sep = ""
            if sep:
                ok = ok_coll.get(coll)
                if ok is None:
                    ok = _collection_ok(coll)
                if ok and 0 < len(rkey) <= 512 and not rkey.strip(_RKEY_CHARS) and rkey != "." and rkey != "..":
                    block = blocks.get(cid)
                    if block is None:
                        self.missing_blocks += 1
                    yield new(RepoRecord, (coll, rkey, cid, block))
                    continue
            self.invalid_paths += 1


# ----------------------------------------------------------------------------- helpers


_COLLECTION_OK: dict[str, bool] = {}
# record key characters (syntax.is_valid_record_key's regex as a set, for a C-speed strip test)
_RKEY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_~.:-"


def _collection_ok(coll: str) -> bool:
    ok = syntax.is_valid_nsid(coll)
    if len(_COLLECTION_OK) < 10000:  # collections are few; bound the cache anyway
        _COLLECTION_OK[coll] = ok
    return ok


def _split_key(key: bytes) -> tuple[str, str] | None:
    """``collection/rkey`` of an MST key, or None when it is not a valid repo path."""
    try:
        path = key.decode("ascii")
    except UnicodeDecodeError:
        return None
    coll, sep, rkey = path.partition("/")
    if not sep:
        return None
    ok = _COLLECTION_OK.get(coll)
    if ok is None:
        ok = _collection_ok(coll)
    if not ok or not (0 < len(rkey) <= 512) or rkey.strip(_RKEY_CHARS) or rkey == "." or rkey == "..":
        return None
    return coll, rkey


def _show(x: Any, n: int = 60) -> str:
    """A short repr of untrusted decoded data for error texts. ``repr`` of a deeply nested value
    (a frame field that is a list 900 levels deep) raised RecursionError out of verification
    (found by tests/test_fuzz.py); ``reprlib`` stops a few levels down."""
    return _REPR.repr(x)[:n]


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 200


def _is_cid(x: Any) -> bool:
    return type(x) is bytes and len(x) == 36 and x.startswith(_CID_PREFIXES)


def _split_path(path: str) -> tuple[str, str] | None:
    """``_split_key`` of a path given as a string (an op's)."""
    coll, sep, rkey = path.partition("/")
    if not sep or not path.isascii():
        return None
    ok = _COLLECTION_OK.get(coll)
    if ok is None:
        ok = _collection_ok(coll)
    if not ok or not (0 < len(rkey) <= 512) or rkey.strip(_RKEY_CHARS) or rkey == "." or rkey == "..":
        return None
    return coll, rkey


def _str(cid: bytes | None) -> str:
    if cid is None:
        return "null"
    try:
        return cid_to_str(cid)
    except Exception:
        return cid.hex()


def _read_car(blocks: Any, max_size: int, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Car:
    if not isinstance(blocks, (bytes, bytearray, memoryview)):
        raise BadCar("blocks is not a byte string")
    try:
        car = read_car(blocks, max_size=max_size, max_blocks=max_blocks)
    except CarError as e:
        raise BadCar(f"bad CAR: {e}") from None
    return car


def parse_signed_commit(car: Car, *, allow_v2: bool = False) -> SignedCommit:
    """Parse and check the commit block (first root) of a verified CAR; no signature check.

    ``allow_v2`` also accepts a legacy version-2 commit ``{did, version: 2, data, prev, sig}``
    (what old repos' ``getRepo`` exports still carry; ``rev`` is optional there, and an absent
    one is returned as ``""``). Only full-repo verification asks for it: Sync 1.1 firehose
    commits are v3.
    """
    return _parse_commit(car, None, None, allow_v2)


def _parse_commit(car: Car, did_hint: str | None, rev_hint: str | None, allow_v2: bool) -> SignedCommit:
    """``parse_signed_commit``; a ``did``/``rev`` equal to an already validated hint (the event's)
    is not validated again."""
    commit_cid = car.roots[0]
    block = car.blocks.get(commit_cid)
    if block is None:
        raise BadCar("commit block (first CAR root) is not in the CAR")
    try:
        c = _decode(block)
    except Exception as e:
        raise BadCommit(f"commit block is not DAG-CBOR: {e}") from None
    if type(c) is not dict:
        raise BadCommit("commit block is not a map")
    version = c.get("version")
    if type(version) is not int or version != 3:
        if not (allow_v2 and type(version) is int and version == 2):
            raise BadCommit(f"unsupported commit version {_show(version)}")
    sig = c.get("sig")
    if type(sig) is not bytes or not sig:
        raise BadCommit("commit has no signature")
    did = c.get("did")
    if (did_hint is None or did != did_hint) and (type(did) is not str or not syntax.is_valid_did(did)):
        raise BadCommit(f"commit did {_show(did, 100)} is not a DID")
    rev = c.get("rev")
    if version == 3 or rev is not None:
        if (rev_hint is None or rev != rev_hint) and (type(rev) is not str or not syntax.is_valid_tid(rev)):
            raise BadCommit(f"commit rev {_show(rev, 40)} is not a TID")
    else:
        rev = ""  # a v2 commit without rev
    data = c.get("data")
    if type(data) is not bytes or len(data) != 36 or not data.startswith(_CBOR_CID_PREFIX):
        raise BadCommit("commit data is not a DAG-CBOR CID")
    prev = c.get("prev")
    if prev is not None and not _is_cid(prev):
        raise BadCommit("commit prev is not a CID")
    # The signature input, rebuilt from typed fields (links as links), as the Go and TS
    # implementations do: unknown fields are dropped and ``prev`` is always present. A v2
    # commit signed everything but ``sig`` too: the same fields, version 2, ``rev`` if it had one.
    # libipld writes ``data`` and ``prev`` as links (36-byte sha2-256 CIDs, checked above, are
    # what it writes as links) and is ~4x cheaper than cbrrr with ``CID`` wrappers; tests compare
    # the two encodings.
    unsigned = {"did": did, "data": data, "prev": prev, "version": version}
    if rev:
        unsigned["rev"] = rev
    return SignedCommit(did, rev, data, prev, sig, _encode_links(unsigned), commit_cid, car, version)


#: What the MST code raised besides ``MSTError`` on hostile trees (found by tests/test_fuzz.py: a
#: duplicated entry made the inversion's re-encoding fail with IndexError, a subtree link that is
#: not a CID with AttributeError): verification turns them into ``BadMST``, so a caller always
#: gets a ``VerificationError``.
_MST_BUGS = (LookupError, TypeError, AttributeError, RecursionError)


def _load_mst(car: Car, data_cid: bytes) -> MST:
    try:
        tree = MST.load(car.blocks, data_cid)
    except MSTPartialError as e:
        raise ProofIncomplete(f"MST root not in CAR: {e}") from None
    except MSTError as e:
        raise BadMST(str(e)) from None
    except _MST_BUGS as e:  # a hostile tree the MST code did not foresee: still a verdict
        raise BadMST(f"malformed MST ({type(e).__name__}: {e})") from None
    root = tree.root
    if root.__class__ is not bytes and root.height > MAX_MST_HEIGHT:
        raise BadMST(f"MST is {root.height} layers tall, more than {MAX_MST_HEIGHT}")
    return tree


# ----------------------------------------------------------------------------- #commit

_ACTIONS = frozenset(("create", "update", "delete"))


def verify_commit(evt: Mapping[str, Any], key: SignatureKey, *,
                  max_car_size: int = DEFAULT_MAX_CAR_SIZE) -> VerifiedCommit:
    """Verify a decoded ``#commit`` body (CIDs as binary bytes, as ``cbor.decode`` gives them).

    ``key`` is the signing key of ``evt["repo"]``. Raises a VerificationError subclass.
    """
    # 1. event syntax
    did = evt.get("repo")
    rev = evt.get("rev")
    time = evt.get("time")
    if type(did) is not str or not syntax.is_valid_did(did):
        raise BadSyntax(f"repo {_show(did, 100)} is not a DID")
    if type(rev) is not str or not syntax.is_valid_tid(rev):
        raise BadSyntax(f"rev {_show(rev, 40)} is not a TID")
    if type(time) is not str or not syntax.is_valid_datetime(time):
        raise BadSyntax(f"time {_show(time, 60)} is not an atproto datetime")
    prev_data = evt.get("prevData")
    if prev_data is not None and not _is_cid(prev_data):
        raise BadSyntax("prevData is not a CID")
    raw_ops = evt.get("ops")
    if type(raw_ops) is not list:
        raise BadSyntax("ops is not a list")
    if len(raw_ops) > MAX_COMMIT_OPS:
        raise BadOp(f"{len(raw_ops)} ops, more than {MAX_COMMIT_OPS}")

    # 2-3. CAR and commit object
    car = _read_car(evt.get("blocks"), max_car_size, MAX_COMMIT_BLOCKS)
    commit = _parse_commit(car, did, rev, False)

    # 4. the commit is the event's (checked before the signature so the reason is precise)
    if commit.did != did:
        raise CommitMismatch(f"commit did {commit.did} differs from event repo {did}")
    if commit.rev != rev:
        raise CommitMismatch(f"commit rev {commit.rev} differs from event rev {rev}")

    # 5. signature
    commit.check_signature(key)

    # 6. MST from the proof
    tree = _load_mst(car, commit.data_cid)
    blocks = car.blocks

    # 7. op paths and MST values
    ops: list[CommitOp] = []
    keys: list[bytes] = []
    legacy = False
    new = tuple.__new__
    for op in raw_ops:
        if type(op) is not dict and not isinstance(op, Mapping):
            raise BadOp("op is not a map")
        action = op.get("action")
        path = op.get("path")
        cid = op.get("cid")
        prev = op.get("prev")
        if type(action) is not str or action not in _ACTIONS:  # an unhashable action made `in` raise
            raise BadOp(f"unknown op action {_show(action, 40)}")
        if type(path) is not str:
            raise BadOp("op path is not a string")
        parts = _split_path(path)
        if parts is None:
            raise BadOp(f"invalid op path {_show(path, 200)}")
        key = path.encode("ascii")
        if cid is not None and not _is_cid(cid):
            raise BadOp(f"op cid for {path} is not a CID")
        if prev is not None and not _is_cid(prev):
            raise BadOp(f"op prev for {path} is not a CID")
        record = None
        if action != "delete":
            if cid is None:
                raise BadOp(f"{action} of {path} has no cid")
            try:
                val = tree.get(key)
            except MSTPartialError as e:
                raise ProofIncomplete(f"cannot look up {path}: {e}") from None
            except MSTError as e:
                raise BadMST(str(e)) from None
            except _MST_BUGS as e:  # a hostile tree the MST code did not foresee: still a verdict
                raise BadMST(f"malformed MST ({type(e).__name__}: {e})") from None
            if val != cid:
                raise OpMismatch(f"MST value at {path} is {_str(val)}, op says {_str(cid)}")
            record = blocks.get(cid)
            if record is None:
                raise MissingRecord(f"record block {_str(cid)} for {path} not in CAR")
        elif prev is None:
            legacy = True
        if action == "update" and prev is None:
            legacy = True
        ops.append(new(CommitOp, (action, parts[0], parts[1], cid, prev, record)))
        keys.append(key)

    # 8. legacy escape: ops without prev cannot be inverted (legacy events only, see module doc)
    if legacy:
        if prev_data is not None:
            op = next(o for o in ops if o.action != "create" and o.prev is None)
            raise BadOp(f"{op.action} of {op.collection}/{op.rkey} has no prev in an event with prevData")
        return VerifiedCommit(did, rev, commit.data_cid, prev_data, commit.commit_cid, ops, False)

    # 9. op shapes, duplicates
    seen = set()
    inv = []
    for op, path in zip(ops, keys):
        if op.action == "create":
            if op.prev is not None:
                raise BadOp(f"create of {op.collection}/{op.rkey} has a prev")
        elif op.action == "update":
            if op.cid == op.prev:
                raise BadOp(f"update of {op.collection}/{op.rkey} does not change the cid")
        elif op.cid is not None:
            raise BadOp(f"delete of {op.collection}/{op.rkey} has a cid")
        if path in seen:
            raise BadOp(f"path {op.collection}/{op.rkey} appears twice")
        seen.add(path)
        inv.append((path, op.cid, op.prev))

    # 10. inversion
    try:
        computed = invert_ops(tree.copy(), inv)
    except MSTPartialError as e:
        raise ProofIncomplete(f"cannot invert: {e}") from None
    except MSTInversionError as e:
        raise InversionMismatch(str(e)) from None
    except MSTError as e:
        raise BadMST(str(e)) from None
    except _MST_BUGS as e:  # a hostile tree the MST code did not foresee: still a verdict
        raise BadMST(f"malformed MST ({type(e).__name__}: {e})") from None
    if prev_data is not None and computed != prev_data:
        raise InversionMismatch(f"inverted MST root {_str(computed)} is not prevData {_str(prev_data)}")
    return VerifiedCommit(did, rev, commit.data_cid, prev_data, commit.commit_cid, ops, True)


# ----------------------------------------------------------------------------- #sync


def parse_sync(blocks: bytes, *, max_car_size: int = DEFAULT_MAX_CAR_SIZE) -> SignedCommit:
    """Parse a ``#sync`` event's ``blocks``: the commit, whose ``did`` says whose key to fetch."""
    return parse_signed_commit(_read_car(blocks, max_car_size, MAX_COMMIT_BLOCKS))


def verify_sync(sync: SignedCommit | bytes, key: SignatureKey, *,
                max_car_size: int = DEFAULT_MAX_CAR_SIZE) -> SyncCommit:
    """Verify a ``#sync`` (§8.5): the CAR's first root is a valid commit signed by ``key``.

    ``key`` belongs to the DID *inside* the commit (``parse_sync(blocks).did``); the event's
    ``did`` field is not cross-checked, as in Tap.
    """
    if not isinstance(sync, SignedCommit):
        sync = parse_sync(sync, max_car_size=max_car_size)
    sync.check_signature(key)
    return SyncCommit(sync.did, sync.rev, sync.data_cid)


# ----------------------------------------------------------------------------- full repo


def verify_repo(car_bytes: bytes, key: SignatureKey, expected_did: str | None = None, *,
                allow_partial: bool = True, max_car_size: int = DEFAULT_MAX_CAR_SIZE,
                max_blocks: int = DEFAULT_MAX_BLOCKS) -> VerifiedRepo:
    """Verify a ``getRepo`` CAR (§9.2) and check the MST structure; records come from ``records()``.

    ``expected_did``: when given, the commit's DID must equal it (Tap does not check this; a
    PDS serving someone else's validly signed repo would otherwise be accepted).
    ``allow_partial``: missing MST subtrees are skipped and counted, as Tap does; False makes
    them an error. The whole MST is walked and checked before this returns, so a repo that is
    returned is valid; ``records()`` only splits paths and looks up blocks.

    Legacy version-2 commits are accepted here (old repos' exports still carry them): signed over
    the same fields minus ``sig``, and without a ``rev`` the result's ``rev`` is ``""`` (which Tap
    clients accept). Their signatures obey the same rules, low-S included.
    """
    return verify_repo_car(_read_car(car_bytes, max_car_size, max_blocks), key, expected_did,
                           allow_partial=allow_partial)


def read_repo_car(buf: Any, *, max_car_size: int = DEFAULT_MAX_CAR_SIZE,
                  max_blocks: int = DEFAULT_MAX_BLOCKS) -> Car:
    """A large ``getRepo`` CAR in a buffer (an ``mmap`` of a spooled body), every block hashed
    (``protocol.car.index_car``): its blocks stay in ``buf``. ``BadCar`` as ``verify_repo``'s."""
    try:
        return index_car(buf, max_size=max_car_size, max_blocks=max_blocks)
    except CarError as e:
        raise BadCar(f"bad CAR: {e}") from None


def verify_repo_car(car: Car, key: SignatureKey, expected_did: str | None = None, *, allow_partial: bool = True,
                    on_entries: Callable[[VerifiedRepo, list], None] | None = None) -> VerifiedRepo:
    """``verify_repo`` of a CAR already read (``read_car``, or ``read_repo_car`` for a huge one).

    ``on_entries(repo, entries)``: the MST entries are handed over in batches, in key order, while
    the walk goes on (``repo.entries`` stays empty), after the commit, its DID and signature were
    checked; a huge repo then never holds them all. Everything handed over belongs to an invalid
    repo if this raises.
    """
    commit = parse_signed_commit(car, allow_v2=True)
    if expected_did is not None and commit.did != expected_did:
        raise CommitMismatch(f"repo commit is for {commit.did}, expected {expected_did}")
    commit.check_signature(key)
    tree = _load_mst(car, commit.data_cid)
    repo = VerifiedRepo(commit.did, commit.rev, commit.data_cid, commit.commit_cid, [], car.blocks, 0,
                        version=commit.version)
    drain = None if on_entries is None else (lambda batch: on_entries(repo, batch))
    try:
        entries, missing = tree.verify_counted(allow_partial=allow_partial, drain=drain)
    except MSTPartialError as e:
        raise ProofIncomplete(str(e)) from None
    except MSTError as e:
        raise BadMST(str(e)) from None
    except _MST_BUGS as e:  # a hostile tree the MST code did not foresee: still a verdict
        raise BadMST(f"malformed MST ({type(e).__name__}: {e})") from None
    repo.missing_nodes = missing
    if on_entries is None:
        repo.entries = entries
    elif entries:
        on_entries(repo, entries)
    return repo
