"""Helpers for RepoLogic tests: a real RocksDB in a tmp dir, a fake clock, a fake verifier,
and readers for every column family RepoLogic writes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from config import Config
from operators.items import (
    FetchStarted,
    FirehoseCommit,
    ResolvedIdentity,
    SnapshotChunk,
    SnapshotRecord,
)
from operators.repo import RepoLogic, RepoState, load_repo_state
from operators.verify import CheckedCommit, CheckedSync, CommitOp, VerifyError
from protocol.cid import cid_for_dag_cbor, cid_to_str
from store.db import Database, open_flow_db
from store.ids import IdAllocator
from store.layout import (
    decode_outbox_row,
    meta_cmd_applied,
    meta_counter,
    parse_fetch_key,
    parse_outbox_key,
    unpack_u64,
)

KEY_A = "zQ3shKeyAAAA"  # opaque to the fake verifier
KEY_B = "zQ3shKeyBBBB"
T0 = 1_750_000_000.0


def cid(tag: str) -> str:
    """A valid CID string, distinct per tag."""
    return cid_to_str(cid_for_dag_cbor(tag.encode()))


def did(n: int) -> str:
    return f"did:plc:test{n:04d}"


def rev(n: int) -> str:
    """Sortable TID-like revs: rev(1) < rev(2) < ..."""
    return f"3k{n:011d}"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeVerifier:
    """Verifies bodies built by ``commit_item``/``sync_body``; records the keys used."""

    keys: list = field(default_factory=list)
    calls: int = 0

    def commit(self, body: dict, signing_key: str, keep) -> CheckedCommit:
        self.calls += 1
        self.keys.append(signing_key)
        if body.get("_fail"):
            raise VerifyError(body["_fail"])
        want = body.get("_key")
        if want and want != signing_key:
            raise VerifyError("signature does not verify")
        cc: CheckedCommit = body["_cc"]
        return replace(cc, ops=[op for op in cc.ops if keep(op.collection)])

    def sync(self, body: dict, signing_key: str) -> CheckedSync:
        self.calls += 1
        self.keys.append(signing_key)
        if body.get("_fail"):
            raise VerifyError(body["_fail"])
        return CheckedSync(body["did"], body["rev"], body["_data"])


def op(action: str, path: str, c: str | None = None, record: dict | None = None) -> CommitOp:
    coll, _, rkey = path.partition("/")
    rec = orjson.dumps(record) if record is not None else (orjson.dumps({"$type": coll, "n": path}) if action != "delete" else None)
    return CommitOp(action, coll, rkey, c if action != "delete" else None, rec)


def commit_item(d: str, r: str, prev: str | None, data: str, ops: list[CommitOp], seq: int = 1,
                fail: str | None = None, key: str | None = None) -> FirehoseCommit:
    body: dict[str, Any] = {
        "repo": d, "rev": r,
        "ops": [{"action": o.action, "path": o.path} for o in ops],
        "_cc": CheckedCommit(d, r, data, prev, list(ops)),
    }
    if fail:
        body["_fail"] = fail
    if key:
        body["_key"] = key
    return FirehoseCommit(seq=seq, did=d, body=body)


def sync_body(d: str, r: str, data: str, fail: str | None = None) -> dict:
    b = {"did": d, "rev": r, "_data": data}
    if fail:
        b["_fail"] = fail
    return b


def snapshot(d: str, fk: bytes, r: str, data: str, records: dict[str, str], *, chunk: int = 1000,
             handle: str = "alice.test", key: str = KEY_A, pds: str = "https://pds.test",
             identity: ResolvedIdentity | None | bool = True) -> list[SnapshotChunk]:
    """A snapshot as BackfillSource emits it: records in key order, ``chunk`` per chunk."""
    paths = sorted(records)
    recs = [SnapshotRecord(p, records[p], orjson.dumps({"$type": p.split("/")[0], "p": p})) for p in paths]
    groups = [recs[i:i + chunk] for i in range(0, len(recs), chunk)] or [[]]
    ident = ResolvedIdentity(handle, pds, key) if identity is True else (identity or None)
    out = []
    after = ""
    for i, g in enumerate(groups):
        out.append(SnapshotChunk.of_records(did=d, fetch_key=fk, rev=r, data_cid=data,
                                            identity=ident if i == 0 else None, records=g, after=after,
                                            first=i == 0, last=i == len(groups) - 1))
        if g:
            after = g[-1].path
    return out


def fetch_started(d: str, fk: bytes, *, handle: str = "alice.test", key: str = KEY_A,
                  pds: str = "https://pds.test") -> FetchStarted:
    """What BackfillSource emits right before calling getRepo for request ``fk``."""
    return FetchStarted(did=d, fetch_key=fk, identity=ResolvedIdentity(handle, pds, key))


class Env:
    """A flow database in ``path`` and a RepoLogic over it."""

    def __init__(self, path, **cfg: Any) -> None:
        self.path = path
        self.cfg = Config(data_dir=str(path), shards=cfg.pop("shards", 4), **cfg)
        self.db: Database = open_flow_db(path)
        self.ids = IdAllocator(self.db)
        self.clock = Clock()
        self.verifier = FakeVerifier()
        self.rand = lambda: 0.5
        self.logic = self.make_logic()

    def make_logic(self, **kw: Any) -> RepoLogic:
        return RepoLogic(self.db, self.cfg, self.ids, clock=self.clock, rand=lambda: self.rand(),
                         verify_commit=self.verifier.commit, verify_sync=self.verifier.sync, **kw)

    def process(self, *items):
        return self.logic.process(list(items))

    # --- readers
    def state(self, d: str) -> RepoState | None:
        return load_repo_state(self.db.cf("repos").get(d.encode()))

    def records(self, d: str) -> dict[str, str]:
        from store.db import prefix_items
        from store.layout import did_prefix, record_path

        return {record_path(k): cid_to_str(v) for k, v in prefix_items(self.db.cf("records"), did_prefix(d))}

    def buffered(self, d: str) -> list[dict]:
        from store.db import prefix_items
        from store.layout import did_prefix

        return [orjson.loads(v) for _, v in prefix_items(self.db.cf("resync_buf"), did_prefix(d))]

    def fetch_q(self) -> list[tuple[int, int, str, dict]]:
        it = self.db.cf("fetch_q").iter()
        it.seek_to_first()
        out = []
        while it.valid():
            p, nb, d = parse_fetch_key(it.key())
            value = orjson.loads(it.value())
            assert isinstance(value.pop("n"), int)  # uniqueness token (tells re-requests apart)
            out.append((p, nb, d, value))
            it.next()
        return out

    def outbox(self, d: str | None = None, internal: bool = False) -> list[dict]:
        """Outbox events in (shard, id) order, parsed; ``_flags``/``_id``/``_shard`` added."""
        it = self.db.cf("outbox").iter()
        it.seek_to_first()
        out = []
        while it.valid():
            shard, eid = parse_outbox_key(it.key())
            dd, flags, payload = decode_outbox_row(it.value())
            if d is None or dd == d:
                ev = orjson.loads(payload)
                ev["_flags"], ev["_id"], ev["_shard"], ev["_did"] = flags, eid, shard, dd
                if internal or not flags & 0x04:
                    out.append(ev)
            it.next()
        return sorted(out, key=lambda e: e["_id"])

    def counter(self, name: str) -> int:
        total = 0
        for s in range(self.cfg.shards):
            raw = self.db.cf("meta").get(meta_counter(name, s))
            total += unpack_u64(raw) if raw else 0
        return total

    def cmd_applied(self, shard: int) -> int:
        raw = self.db.cf("meta").get(meta_cmd_applied(shard))
        return unpack_u64(raw) if raw else 0

    def fetch_key_of(self, d: str) -> bytes:
        st = self.state(d)
        assert st is not None and st.fetch_key, f"no fetch outstanding for {d}: {st}"
        return bytes.fromhex(st.fetch_key)

    def start_fetch(self, d: str, **kw: Any):
        """BackfillSource claims the outstanding fetch of ``d`` (``FetchStarted``)."""
        return self.process(fetch_started(d, self.fetch_key_of(d), **kw))

    def sync_repo(self, d: str, r: str, data: str, records: dict[str, str], **kw: Any):
        """Answer the outstanding fetch of ``d`` with a snapshot."""
        return self.process(*snapshot(d, self.fetch_key_of(d), r, data, records, **kw))

    def active_repo(self, d: str, r: str = rev(1), data: str | None = None, records: dict[str, str] | None = None,
                    **kw: Any) -> None:
        """Add ``d`` and complete its first snapshot."""
        from operators.items import AddRepo

        assert self.process(AddRepo(d)) == []
        assert self.sync_repo(d, r, data or cid("root-" + r), records or {}, **kw) == []
        assert self.state(d).state == "active"
