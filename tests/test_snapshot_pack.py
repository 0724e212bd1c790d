"""protocol.snapshot: the backfill's pool task (verify a CAR, pack records for RepoLogic), and
the overlay operations RepoLogic uses for packed chunks (bulk put with one undo entry)."""

from __future__ import annotations

import pickle

import orjson
import pytest

from operators.events import record_body, with_id
from operators.items import SnapshotChunk, SnapshotRecord
from operators.repo import _Batch
from protocol import cbor
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.keys import PrivateKey
from protocol.snapshot import (
    UPDATE_ACTION,
    CREATE_ACTION,
    SnapshotFailed,
    body_head,
    pack_snapshot,
    record_json,
    record_tail,
)
from store.db import open_flow_db
from tests.test_backfill_source import make_repo, post

DID = "did:plc:packme"


def _key() -> PrivateKey:
    return PrivateKey.generate()


def mb(k: PrivateKey) -> str:
    return k.public_key.multibase()


@pytest.mark.parametrize("rev", ["3l3qo2vutsw2b", 'we"ird\n<rev>\u2028'])
@pytest.mark.parametrize("rj", [None, b'{"$type":"app.bsky.feed.post","text":"a<b"}'])
def test_template_equals_record_body(rev, rj):
    c = cid_to_str(cid_for_dag_cbor(b"x"))
    got = body_head(DID, rev) + b"app.bsky.feed.post" + record_tail("3kabc", c, rj)
    want = record_body(live=False, did=DID, rev=rev, collection="app.bsky.feed.post", rkey="3kabc",
                       action="create", cid=c, record_json=rj)
    assert got == want
    upd = record_body(live=False, did=DID, rev=rev, collection="app.bsky.feed.post", rkey="3kabc",
                      action="update", cid=c, record_json=rj)
    assert got.replace(CREATE_ACTION, UPDATE_ACTION, 1) == upd
    assert with_id(7, "record", got) == b'{"id":7,"type":"record","record":' + want + b"}"


def test_pack_snapshot_chunks_and_pickles():
    key = _key()
    records = {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(7)}
    records["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "x&y"}
    car, cids = make_repo(DID, key, records)
    snap = pack_snapshot(car, mb(key), DID, allow_partial=False, max_car_size=1 << 20, chunk_size=3)
    snap = pickle.loads(pickle.dumps(snap))  # what the pool sends back
    assert snap.did == DID and snap.records == 8 and [c.count for c in snap.chunks] == [3, 3, 2]
    got = {}
    after = ""
    for i, c in enumerate(snap.chunks):
        ch = SnapshotChunk(did=DID, fetch_key=b"k", rev=snap.rev, data_cid=snap.data_cid, identity=None,
                           count=c.count, keys=c.keys, cids=c.cids, bodies=c.bodies, after=after,
                           first=i == 0, last=i == len(snap.chunks) - 1, last_path=c.last_path)
        recs = ch.records
        assert [r.path for r in recs] == sorted(r.path for r in recs) and recs[-1].path == c.last_path
        assert all(r.path > after for r in recs)
        after = c.last_path
        for r, body in zip(recs, ch.unpack()[2]):
            got[r.path] = r.cid
            coll, _, rkey = r.path.partition("/")
            want_json = record_json(cbor.encode(records[r.path]))
            assert r.record_json == want_json is not None
            assert body == record_body(live=False, did=DID, rev=snap.rev, collection=coll, rkey=rkey,
                                       action="create", cid=r.cid, record_json=want_json)
    assert got == cids


def test_pack_snapshot_filter_and_errors():
    key, other = _key(), _key()
    records = {"app.bsky.feed.post/3l00000000001": post(1), "app.bsky.feed.like/3l00000000002": post(2)}
    car, _ = make_repo(DID, key, records)
    from operators.filters import CollectionFilter

    snap = pack_snapshot(car, mb(key), DID, allow_partial=False, max_car_size=1 << 20,
                         keep=CollectionFilter(["app.bsky.feed.like"]))
    assert snap.records == 1 and snap.chunks[0].last_path == "app.bsky.feed.like/3l00000000002"
    with pytest.raises(SnapshotFailed) as e:
        pack_snapshot(car, mb(other), DID, allow_partial=False, max_car_size=1 << 20)
    assert e.value.kind == "signature"
    with pytest.raises(SnapshotFailed) as e:
        pack_snapshot(car, mb(key), "did:plc:someoneelse", allow_partial=False, max_car_size=1 << 20)
    assert e.value.kind == "car" and "did:plc:someoneelse" in str(e.value)
    with pytest.raises(SnapshotFailed) as e:
        pack_snapshot(car[:-5], mb(key), DID, allow_partial=False, max_car_size=1 << 20)
    assert e.value.kind == "car"
    with pytest.raises(SnapshotFailed) as e:
        pack_snapshot(car, mb(key), DID, allow_partial=False, max_car_size=100)
    assert e.value.kind == "car"
    err = pickle.loads(pickle.dumps(e.value))  # crosses the pool as an exception
    assert err.kind == "car" and str(err) == str(e.value)


def test_bulk_put_rolls_back_and_falls_back_on_overlap(tmp_path):
    db = open_flow_db(tmp_path / "flow")
    b = _Batch(db)
    p = DID.encode() + b"\x00"
    b.kv_put("records", p, p + b"a/1", b"old")
    mark = b.mark()
    b.kv_put_many("records", p, [p + b"b/1", p + b"b/2"], [b"x", b"y"])
    assert b.kv_get("records", p, p + b"b/2") == b"y"
    assert [k for k, _ in b.kv_scan("records", p, p + b"a/1")] == [p + b"b/1", p + b"b/2"]
    b.rollback(mark)
    assert b.kv[("records")][p] == {p + b"a/1": b"old"}
    # keys the bucket already holds: per-key undo restores the old value
    mark = b.mark()
    b.kv_put_many("records", p, [p + b"a/1", p + b"c/1"], [b"new", b"z"])
    assert b.kv_get("records", p, p + b"a/1") == b"new"
    b.rollback(mark)
    assert b.kv["records"][p] == {p + b"a/1": b"old"}
    # a fresh bucket: rolled back entirely
    q = b"did:plc:other\x00"
    mark = b.mark()
    b.kv_put_many("records", q, [q + b"a/1"], [b"v"])
    b.rollback(mark)
    assert q not in b.kv["records"]


def test_scan_sees_overlay_rows_in_range(tmp_path):
    """The bucket's upper bound lets a scan skip it only when every row lies below the range."""
    db = open_flow_db(tmp_path / "flow")
    b = _Batch(db)
    p = DID.encode() + b"\x00"
    b.kv_put_many("records", p, [p + b"a/1", p + b"a/2"], [b"1", b"2"])
    assert b.kv_scan("records", p, p + b"a/2") == []
    assert b.kv_scan("records", p, p + b"a/1") == [(p + b"a/2", b"2")]
    b.kv_put("records", p, p + b"z/9", b"9")
    assert b.kv_scan("records", p, p + b"a/2") == [(p + b"z/9", b"9")]


def test_of_records_round_trip():
    c = cid_to_str(cid_for_dag_cbor(b"y"))
    rj = orjson.dumps({"$type": "x.y.z", "n": 1})
    ch = SnapshotChunk.of_records(did=DID, fetch_key=b"k", rev="r", data_cid=c, identity=None,
                                  records=[SnapshotRecord("x.y.z/b", c, None), SnapshotRecord("x.y.z/a", c, rj),
                                           SnapshotRecord("noslash", c, rj)],
                                  after="", first=True, last=True)
    assert ch.count == 2 and ch.last_path == "x.y.z/b"
    assert ch.records == [SnapshotRecord("x.y.z/a", c, rj), SnapshotRecord("x.y.z/b", c, None)]
