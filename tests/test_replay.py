"""bench/replay: what the synthetic upstream serves verifies with tapflow's own protocol code.

DID documents resolve (handle verified through resolveHandle), getRepo CARs verify against
the served keys, every frame decodes and verifies, commits chain with prevData from the
initial snapshot to the final one, cursors and faults behave as documented.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.replay import GARBAGE, Inject, ReplayData, ReplayServer
from connectors.firehose import decode_frame
from protocol.car import CarHashMismatch, read_car
from protocol.cid import cid_to_str
from protocol.commit import BadSignature, verify_commit, verify_repo
from protocol.identity import Directory, XrpcHandleResolver, parse_did_doc


@pytest.fixture(scope="module")
def data() -> ReplayData:
    return ReplayData.generate(repos=4, records=40, commits=150, seed=3)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _ws_url(srv: ReplayServer, cursor: int | None = None) -> str:
    url = srv.url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos"
    return url if cursor is None else f"{url}?cursor={cursor}"


def _read(srv: ReplayServer, n: int | None = None, cursor: int | None = None, idle: float = 1.0) -> list[bytes]:
    """Frames until ``n`` were read or nothing came for ``idle`` seconds."""
    out = []
    with connect(_ws_url(srv, cursor), max_size=None, compression=None, max_queue=None) as ws:
        while n is None or len(out) < n:
            try:
                out.append(ws.recv(timeout=idle))
            except TimeoutError:
                break
    return out


def _key(srv: ReplayServer, did: str):
    status, body = _get(f"{srv.url}/{did}")
    assert status == 200
    return parse_did_doc(json.loads(body), did).signing_key


def _apply(state: dict[str, str], ops) -> None:
    for op in ops:
        path = f"{op.collection}/{op.rkey}"
        if op.action == "delete":
            del state[path]
        else:
            state[path] = cid_to_str(op.cid)


def test_did_docs_and_handles_resolve_with_the_directory(data):
    with ReplayServer(data) as srv:

        async def resolve_all():
            d = Directory(plc_url=srv.url, handle_resolver=XrpcHandleResolver(srv.url))
            try:
                return [await d.resolve(did) for did in data.dids]
            finally:
                await d.close()

        idents = asyncio.run(resolve_all())
        for ident, repo in zip(idents, data.repos):
            assert ident.did == repo.did
            assert ident.handle == repo.handle  # verified both ways
            assert ident.pds_endpoint == srv.url
            assert ident.signing_key == repo.key.public_key
        assert _get(f"{srv.url}/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")[0] == 404
        status, body = _get(f"{srv.url}/xrpc/com.atproto.identity.resolveHandle?handle=nobody.replay.test")
        assert status == 400


def test_getrepo_cars_verify_against_the_served_keys(data):
    with ReplayServer(data, hold=True) as srv:
        for repo in data.repos:
            status, car = _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={repo.did}")
            assert status == 200
            r = verify_repo(car, _key(srv, repo.did), repo.did, allow_partial=False)
            assert r.rev == repo.rev0 and r.commit_cid == repo.commit0
            assert r.record_count == 40 and r.missing_nodes == 0
            assert all(rec.block is not None for rec in r.records())
        status, body = _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
        assert status == 400 and json.loads(body)["error"] == "RepoNotFound"


def test_frames_decode_verify_and_chain_to_the_final_state(data):
    with ReplayServer(data) as srv:
        keys = {did: _key(srv, did) for did in data.dids}
        state: dict[str, dict[str, str]] = {}
        root: dict[str, bytes] = {}
        for repo in data.repos:
            r = verify_repo(repo.car0, keys[repo.did], repo.did)
            state[repo.did] = {f"{x.collection}/{x.rkey}": cid_to_str(x.cid) for x in r.records()}
            root[repo.did] = r.data_cid
        frames = _read(srv, n=srv.n_frames)
        assert len(frames) == srv.n_frames == 150
        seqs, actions = [], set()
        for raw in frames:
            f = decode_frame(raw)
            assert f.kind == "event" and f.type == "#commit", f
            body = f.item.body
            seqs.append(f.seq)
            vc = verify_commit(body, keys[f.did])
            assert vc.prev_data == root[f.did], "commit does not chain"
            root[f.did] = vc.data_cid
            _apply(state[f.did], vc.ops)
            actions.update(o.action for o in vc.ops)
        assert seqs == list(range(1, 151))
        assert actions == {"create", "update", "delete"}
        # the final CAR (what getRepo serves now that every frame was sent) is the chain's end
        for did in data.dids:
            status, car = _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={did}")
            r = verify_repo(car, keys[did], did, allow_partial=False)
            assert r.data_cid == root[did]
            assert {f"{x.collection}/{x.rkey}": cid_to_str(x.cid) for x in r.records()} == state[did]
            assert srv.records_at(did) == state[did]


def test_getrepo_follows_the_published_head(data):
    did = data.repos[data.frame_repo[0]].did
    with ReplayServer(data, hold=True) as srv:
        key = _key(srv, did)
        first = srv.base_pos[0]

        def served_rev() -> str:
            return verify_repo(_get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={did}")[1], key, did).rev

        assert served_rev() == data.repos[data.frame_repo[0]].rev0
        srv.release(first + 1)
        got = _read(srv, n=first + 1)
        assert len(got) == first + 1 and srv.head == first + 1
        assert not _read(srv, idle=0.3)[first + 1:]  # held at the limit
        assert served_rev() == decode_frame(got[first]).item.body["rev"]
    with ReplayServer(data, repo_state="final") as srv:
        final = srv.records_at(did)
        car = _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={did}")[1]
        assert {f"{x.collection}/{x.rkey}": cid_to_str(x.cid) for x in verify_repo(car, key, did).records()} == final


def test_cursor_resumes_after_seq_and_future_cursor_is_an_error_frame(data):
    with ReplayServer(data) as srv:
        got = _read(srv, cursor=100)
        assert [decode_frame(x).seq for x in got] == list(range(101, 151))
        with connect(_ws_url(srv, 10_000), max_size=None) as ws:
            f = decode_frame(ws.recv(timeout=5))
            assert f.kind == "error" and f.name == "FutureCursor"
        assert srv.cursors == [100, 10_000]


def test_injected_frames(data):
    inj = [Inject(6, "forged"), Inject(8, "garbage"), Inject(12, "truncated"), Inject(150, "raw", b"\xa0")]
    with ReplayServer(data, inject=inj) as srv:
        assert srv.n_frames == 154
        frames = _read(srv, n=srv.n_frames)
        decoded = [decode_frame(x) for x in frames]
        # forged: a copy of base frame 6 (a create) before it, same rev, signed by another key
        forged, real = decoded[6], decoded[7]
        assert forged.kind == real.kind == "event"
        assert forged.item.body["rev"] == real.item.body["rev"] and forged.did == real.did
        assert forged.seq == 7 and real.seq == 8
        key = _key(srv, real.did)
        vr = verify_commit(real.item.body, key)
        with pytest.raises(BadSignature):
            verify_commit(forged.item.body, key)
        did, wrong, forged_cid = srv.forged[6]
        assert did == real.did and wrong != key
        vf = verify_commit(forged.item.body, wrong)  # a valid proof: only the signer is wrong
        assert vf.prev_data == vr.prev_data and vf.data_cid != vr.data_cid
        changed = [(a, b) for a, b in zip(vf.ops, vr.ops) if a != b]
        assert len(changed) == 1 and cid_to_str(changed[0][0].cid) == forged_cid
        assert b"forged" in changed[0][0].record
        assert frames[9] == GARBAGE and decoded[9].kind == "rejected"
        assert decoded[14].kind == "rejected" and len(frames[14]) < len(frames[15])
        assert decoded[-1].kind == "rejected"
        assert srv.injected == {6: "forged", 9: "garbage", 14: "truncated", 153: "raw"}
        seqs = [d.seq for d in decoded if d.kind == "event"]
        assert seqs == list(range(1, 152))
        # a cursor just before an undecodable frame replays it
        assert decoded[8].seq == 9 and _read(srv, n=1, cursor=9)[0] == GARBAGE


def test_corrupt_car_and_http_faults(data):
    did = data.dids[1]
    with ReplayServer(data) as srv:
        url = f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={did}"
        srv.corrupt_car(did, times=2)
        srv.fail("getRepo", 429, did=data.dids[2])
        srv.fail("plc", 500)
        for _ in range(2):
            status, car = _get(url)
            assert status == 200
            with pytest.raises(CarHashMismatch):
                read_car(car)
        status, car = _get(url)
        read_car(car)
        status, body = _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={data.dids[2]}")
        assert status == 429 and json.loads(body)["error"] == "RateLimitExceeded"
        assert _get(f"{srv.url}/xrpc/com.atproto.sync.getRepo?did={data.dids[2]}")[0] == 200
        assert _get(f"{srv.url}/{did}")[0] == 500
        assert _get(f"{srv.url}/{did}")[0] == 200
        assert srv.requests[("getRepo", did)] == 3


def test_drop_connection_mid_frame_then_resume(data):
    with ReplayServer(data) as srv:
        srv.drop_connection_at(40)
        got = []
        with connect(_ws_url(srv), max_size=None) as ws:
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    got.append(ws.recv(timeout=5))
            assert e.value.rcvd is None  # no close frame: the TCP connection just ended
        assert [decode_frame(x).seq for x in got] == list(range(1, 41))
        rest = _read(srv, cursor=40)
        assert [decode_frame(x).seq for x in rest] == list(range(41, 151))


def test_list_repos_pages_and_pds_hosts(data):
    with ReplayServer(data, pds_count=2, pds_of={data.dids[3]: 1}) as srv:
        seen, cursor = [], ""
        while True:
            status, body = _get(f"{srv.url}/xrpc/com.atproto.sync.listRepos?limit=3" + (f"&cursor={cursor}" if cursor else ""))
            page = json.loads(body)
            seen += [r["did"] for r in page["repos"]]
            assert all(r["active"] and r["rev"] and r["head"].startswith("bafy") for r in page["repos"])
            cursor = page.get("cursor")
            if not cursor:
                break
        assert seen == sorted(data.dids)
        assert len(srv.pds_urls) == 2 and srv.pds_urls[0] == srv.url
        docs = {did: parse_did_doc(json.loads(_get(f"{srv.url}/{did}")[1]), did) for did in data.dids}
        assert docs[data.dids[3]].pds_endpoint == srv.pds_urls[1]
        assert {docs[d].pds_endpoint for d in data.dids[:3]} == {srv.url}
        car = _get(f"{srv.pds_urls[1]}/xrpc/com.atproto.sync.getRepo?did={data.dids[3]}")[1]
        verify_repo(car, docs[data.dids[3]].signing_key, data.dids[3])


def test_cache_round_trip(tmp_path):
    a = ReplayData.load_or_generate(2, 10, 20, seed=5, cache_dir=tmp_path)
    path = ReplayData.cache_path(tmp_path, 2, 10, 20, seed=5)
    assert path.exists()
    b = ReplayData.load_or_generate(2, 10, 20, seed=5, cache_dir=tmp_path)
    assert b.frames == a.frames and b.dids == a.dids and list(b.seq_at) == list(a.seq_at)
    assert [r.car0 for r in b.repos] == [r.car0 for r in a.repos]
    with ReplayServer(b) as srv:
        frames = _read(srv, n=20)
        for did in b.dids:
            verify_repo(srv.car_at(did), b.repos[b.repo_index(did)].key.public_key, did, allow_partial=False)
        assert [decode_frame(x).seq for x in frames] == list(range(1, 21))
