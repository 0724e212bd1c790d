"""BackfillSource: fetch-queue scanning, getRepo download and verification, chunking, errors.

Most tests serve signed repo CARs (built here with ``protocol.mst`` + ``protocol.keys``) from a
local aiohttp "PDS" and use a small in-memory directory; the e2e tests fetch real repos from
the PDS harness with the real ``protocol.identity.Directory``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from aiohttp import web

from config import Config
from connectors.backfill import Backfiller, BackfillSource, _BackfillPartition
from operators.items import FetchFailed, FetchStarted, IdentityRefreshed, SnapshotChunk
from protocol import cbor
from protocol.car import write_car
from protocol.cid import cid_for_dag_cbor, cid_for_raw, cid_to_str
from protocol.keys import PrivateKey
from protocol.mst import MST
from store.db import open_flow_db
from store.layout import PRIO_DESYNC, PRIO_ERROR, PRIO_IDENTITY, PRIO_PENDING, fetch_key

REV = "3l3qo2vutsw2b"


# --- a signed repo ------------------------------------------------------------------------------

def make_repo(did: str, key: PrivateKey, records: dict[str, dict], rev: str = REV) -> tuple[bytes, dict[str, str]]:
    """A getRepo CAR and its {path: cid string}."""
    blocks: dict[bytes, bytes] = {}
    items = []
    cids = {}
    for path, rec in records.items():
        b = cbor.encode(rec)
        c = cid_for_dag_cbor(b)
        blocks[c] = b
        items.append((path.encode(), c))
        cids[path] = cid_to_str(c)
    tree = MST.build(items)
    data_cid = tree.export_blocks(blocks)
    unsigned = {"did": did, "rev": rev, "data": cbor.link(data_cid), "prev": None, "version": 3}
    commit = dict(unsigned, sig=key.sign(cbor.encode(unsigned)))
    cb = cbor.encode(commit)
    ccid = cid_for_dag_cbor(cb)
    blocks[ccid] = cb
    # commit first, as a PDS writes it
    ordered = [(ccid, cb)] + [(k, v) for k, v in blocks.items() if k != ccid]
    return write_car([ccid], ordered), cids


def post(i: int) -> dict:
    return {"$type": "app.bsky.feed.post", "text": f"post {i}", "createdAt": "2024-01-01T00:00:00.000Z"}


@dataclass
class Ident:
    did: str
    handle: str
    pds_endpoint: str
    signing_key: Any
    key_error: str = ""


class DidNotFound(Exception):
    pass


class FakeDirectory:
    def __init__(self) -> None:
        self.idents: dict[str, Ident] = {}
        self.purged: list[str] = []
        self.resolved: list[str] = []

    def purge(self, did: str) -> None:
        self.purged.append(did)

    async def resolve(self, did: str) -> Ident:
        self.resolved.append(did)
        if did not in self.idents:
            raise DidNotFound(f"{did}: PLC HTTP 404")
        return self.idents[did]

    async def close(self) -> None:
        pass


class FakePds:
    """getRepo from a dict; per-DID behaviour overrides; counts requests and concurrency."""

    def __init__(self) -> None:
        self.cars: dict[str, bytes] = {}
        self.behaviour: dict[str, Any] = {}
        self.requests: list[str] = []
        self.active = 0
        self.max_active = 0
        self.delay = 0.0
        self.hold = False  # getRepo answers wait while True
        self.runner = None
        self.port = 0

    async def get_repo(self, req: web.Request) -> web.StreamResponse:
        did = req.query.get("did", "")
        self.requests.append(did)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            while self.hold:
                await asyncio.sleep(0.02)
            b = self.behaviour.get(did)
            if b == "deactivated":
                return web.json_response({"error": "RepoDeactivated", "message": f"Repo has been deactivated: {did}"},
                                         status=400)
            if b == "429":
                return web.json_response({"error": "RateLimitExceeded", "message": "slow down"}, status=429)
            if b == "500":
                return web.Response(status=500, text="oops")
            if b == "truncated":
                resp = web.StreamResponse(headers={"Content-Length": str(len(self.cars[did]) + 100),
                                                   "Content-Type": "application/vnd.ipld.car"})
                await resp.prepare(req)
                await resp.write(self.cars[did][:50])
                req.transport.close()
                return resp
            if b == "truncated_late":  # the whole body but 100 bytes promised more
                resp = web.StreamResponse(headers={"Content-Length": str(len(self.cars[did]) + 100),
                                                   "Content-Type": "application/vnd.ipld.car"})
                await resp.prepare(req)
                await resp.write(self.cars[did])
                req.transport.close()
                return resp
            if b == "chunked_big":
                resp = web.StreamResponse(headers={"Content-Type": "application/vnd.ipld.car"})
                resp.enable_chunked_encoding()
                await resp.prepare(req)
                for _ in range(100):
                    await resp.write(b"\x00" * 4096)
                await resp.write_eof()
                return resp
            return web.Response(body=self.cars[did], content_type="application/vnd.ipld.car")
        finally:
            self.active -= 1

    async def start(self) -> "FakePds":
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self.get_repo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def pds_loop():
    """A FakePds served from a loop in its own thread (the tests poll synchronously)."""
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    p = asyncio.run_coroutine_threadsafe(FakePds().start(), loop).result(5)
    yield p
    asyncio.run_coroutine_threadsafe(p.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    th.join(2)


class Env:
    def __init__(self, tmp_path, pds: FakePds, **over) -> None:
        self.cfg = replace(Config(data_dir=str(tmp_path / "data"), resync_parallelism=2), **over)
        self.db = open_flow_db(self.cfg.data_dir)
        self.pds = pds
        self.dir = FakeDirectory()
        self.depth = 0

    def account(self, did: str, records: dict[str, dict], key: PrivateKey | None = None, handle: str = "alice.test",
                signer: PrivateKey | None = None) -> dict[str, str]:
        key = key or PrivateKey.generate()
        car, cids = make_repo(did, signer or key, records)
        self.pds.cars[did] = car
        self.dir.idents[did] = Ident(did, handle, self.pds.url, key.public_key)
        return cids

    def request(self, did: str, kind: str = "repo", prio: int = PRIO_PENDING, not_before: int = 0, **extra) -> bytes:
        k = fetch_key(prio, not_before, did)
        self.db.cf("fetch_q")[k] = orjson.dumps({"kind": kind, "did": did, **extra})
        return k

    def answered(self, key: bytes) -> None:
        """What RepoLogic does when it applies the answer."""
        del self.db.cf("fetch_q")[key]

    def backfiller(self, **kw) -> Backfiller:
        kw.setdefault("scan_interval", 0.01)
        return Backfiller(self.cfg, self.db, directory=self.dir, depth=lambda: self.depth, **kw)


def collect(b: Backfiller, until, timeout: float = 10.0, started: list | None = None) -> list:
    """Answers polled until ``until(answers)``; ``FetchStarted`` items go to ``started``."""
    out: list = []
    t = time.monotonic()
    while not until(out):
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out; got {out!r:.2000}")
        for x in b.poll():
            if isinstance(x, FetchStarted):
                if started is not None:
                    started.append(x)
            else:
                out.append(x)
        time.sleep(0.005)
    return out


def has_last(did: str):
    return lambda out: any((isinstance(x, SnapshotChunk) and x.last and x.did == did)
                           or (isinstance(x, FetchFailed) and x.did == did) for x in out)


# --- tests -----------------------------------------------------------------------------------------

def test_repo_snapshot_in_chunks(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    records = {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(7)}
    records["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "A",
                                              "avatar": {"$type": "blob", "ref": cbor.link(cid_for_raw(b"x")),
                                                         "mimeType": "image/png", "size": 1}}
    cids = env.account(did, records)
    key = env.request(did)
    b = env.backfiller(chunk_size=3)
    b.start()
    try:
        out = collect(b, has_last(did))
    finally:
        b.stop()
    assert all(isinstance(x, SnapshotChunk) for x in out)
    assert [len(c.records) for c in out] == [3, 3, 2]
    assert [(c.first, c.last) for c in out] == [(True, False), (False, False), (False, True)]
    assert out[0].identity is not None and out[0].identity.handle == "alice.test"
    assert out[0].identity.pds == pds_loop.url and out[0].identity.signing_key.startswith("z")
    assert out[1].identity is None and out[2].identity is None
    assert [c.after for c in out] == ["", out[0].records[-1].path, out[1].records[-1].path]
    paths = [r.path for c in out for r in c.records]
    assert paths == sorted(records)
    assert {r.path: r.cid for c in out for r in c.records} == cids
    assert all(c.fetch_key == key and c.rev == REV for c in out)
    profile = next(r for c in out for r in c.records if r.path == "app.bsky.actor.profile/self")
    j = orjson.loads(profile.record_json)
    assert j["displayName"] == "A" and j["avatar"]["ref"] == {"$link": cid_to_str(cid_for_raw(b"x"))}
    assert env.dir.purged == [did]  # identity purged before the fetch (Tap: RefreshIdentity)


def test_empty_repo_is_one_chunk(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:emptyemptyemptyemptyempt"
    env.account(did, {})
    env.request(did)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, has_last(did))
    finally:
        b.stop()
    assert len(out) == 1 and out[0].first and out[0].last and out[0].records == [] and out[0].identity


def test_chunk_boundary_at_end_of_repo(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:six"
    env.account(did, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(6)})
    env.request(did)
    b = env.backfiller(chunk_size=3)
    b.start()
    try:
        out = collect(b, has_last(did))
    finally:
        b.stop()
    assert [(len(c.records), c.last) for c in out] == [(3, False), (3, True)]


def test_collection_filters_leave_other_records_out(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop, collection_filters=("app.bsky.feed.*",))
    did = "did:plc:filtered"
    env.account(did, {"app.bsky.feed.post/3l00000000001": post(1), "app.bsky.graph.follow/3l00000000002": post(2),
                      "app.bsky.feed.like/3l00000000003": post(3)})
    env.request(did)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, has_last(did))
    finally:
        b.stop()
    assert [r.path for r in out[0].records] == ["app.bsky.feed.like/3l00000000003", "app.bsky.feed.post/3l00000000001"]


def test_identity_refresh(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:ident"
    env.account(did, {}, handle="bob.test")
    k1 = env.request(did, kind="identity", prio=PRIO_IDENTITY, not_before=int(time.time()))
    k2 = env.request("did:plc:gone", kind="identity", prio=PRIO_IDENTITY)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, lambda o: len(o) >= 2)
    finally:
        b.stop()
    by = {x.did: x for x in out}
    assert isinstance(by[did], IdentityRefreshed) and by[did].identity.handle == "bob.test" and by[did].fetch_key == k1
    gone = by["did:plc:gone"]
    assert gone.identity is None and gone.not_found and gone.fetch_key == k2 and "failed to resolve DID" in gone.error
    assert set(env.dir.purged) == {did, "did:plc:gone"}


def test_fetch_started_then_get_repo_after_the_claim(tmp_path, pds_loop):
    """Tap's claim: FetchStarted (with the resolved identity) is emitted before getRepo, and
    getRepo waits until RepoLogic shows the repo ``resyncing`` under this fetch key."""
    from operators.repo import RepoState

    env = Env(tmp_path, pds_loop)
    did = "did:plc:claimed"
    env.account(did, {"app.bsky.feed.post/3l00000000001": post(1)})
    key = env.request(did)
    repos = env.db.cf("repos")
    repos[did.encode()] = RepoState(state="pending", fetch_key=key.hex()).to_json()
    b = env.backfiller()
    b.start()
    try:
        started: list = []
        collect(b, lambda o: bool(started), started=started)
        time.sleep(0.2)
        assert pds_loop.requests == []  # not claimed yet: no download
        (fs,) = started
        assert fs.did == did and fs.fetch_key == key and fs.identity.handle == "alice.test"
        assert fs.identity.pds == pds_loop.url and fs.identity.signing_key.startswith("z")
        repos[did.encode()] = RepoState(state="resyncing", fetch_key=key.hex()).to_json()  # what RepoLogic does
        out = collect(b, has_last(did), started=started)
    finally:
        b.stop()
    assert pds_loop.requests == [did] and len(started) == 1 and b.stats["claim_timeouts"] == 0
    assert out[0].first and out[0].identity == fs.identity


def test_fetch_started_claim_wait_is_bounded_and_skipped_for_other_requests(tmp_path, pds_loop):
    from operators.repo import RepoState

    env = Env(tmp_path, pds_loop)
    slow, other = "did:plc:neverclaimed", "did:plc:otherrequest"
    for d in (slow, other):
        env.account(d, {})
    k1 = env.request(slow)
    env.request(other)
    env.db.cf("repos")[slow.encode()] = RepoState(state="pending", fetch_key=k1.hex()).to_json()
    # a newer request of `other` is outstanding: this answer will be stale, no point waiting
    env.db.cf("repos")[other.encode()] = RepoState(state="desynchronized", fetch_key="00ff").to_json()
    b = env.backfiller(claim_timeout=0.3)
    b.start()
    try:
        t = time.monotonic()
        collect(b, has_last(other))
        assert time.monotonic() - t < 0.25
        collect(b, has_last(slow))
        assert time.monotonic() - t >= 0.3
    finally:
        b.stop()
    assert b.stats["claim_timeouts"] == 1 and sorted(pds_loop.requests) == sorted([slow, other])


def test_no_fetch_started_when_failing_before_get_repo(tmp_path, pds_loop):
    """Identity failures and a PDS in backoff answer without a claim; an HTTP failure after it."""
    env = Env(tmp_path, pds_loop)
    env.account("did:plc:nopds", {})
    env.dir.idents["did:plc:nopds"].pds_endpoint = ""
    env.account("did:plc:http500", {})
    pds_loop.behaviour["did:plc:http500"] = "500"
    env.request("did:plc:nopds")
    env.request("did:plc:unknown")
    env.request("did:plc:http500")
    b = env.backfiller()
    b.start()
    started: list = []
    try:
        collect(b, lambda o: len(o) >= 3, started=started)
    finally:
        b.stop()
    assert [x.did for x in started] == ["did:plc:http500"]


@pytest.mark.parametrize("behaviour,error,rate_limited", [
    ("deactivated", "failed to get repo: API request failed (HTTP 400): RepoDeactivated: Repo has been deactivated: "
                    "did:plc:bad", False),
    ("500", "failed to get repo: API request failed (HTTP 500)", False),
    ("429", "failed to get repo: API request failed (HTTP 429): RateLimitExceeded: slow down", True),
    ("truncated", "failed to get repo: ", False),
])
def test_http_failures(tmp_path, pds_loop, behaviour, error, rate_limited):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:bad"
    env.account(did, {"app.bsky.feed.post/3l00000000001": post(1)})
    pds_loop.behaviour[did] = behaviour
    key = env.request(did)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, has_last(did))
    finally:
        b.stop()
    (f,) = out
    assert isinstance(f, FetchFailed) and f.fetch_key == key and f.rate_limited is rate_limited
    assert f.error.startswith(error), f.error


def test_429_backs_off_the_whole_pds_host(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    a, c = "did:plc:first", "did:plc:second"
    env.account(a, {})
    env.account(c, {})
    pds_loop.behaviour[a] = "429"
    env.request(a)
    b = env.backfiller()
    b.start()
    try:
        collect(b, has_last(a))
        env.request(c)
        out = collect(b, has_last(c))
    finally:
        b.stop()
    assert out[0].rate_limited and "rate limiting" in out[0].error
    assert pds_loop.requests == [a]  # the second fetch failed fast, no request sent


def test_corrupt_car(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:corrupt"
    env.account(did, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(5)})
    car = bytearray(pds_loop.cars[did])
    car[-3] ^= 0xFF  # a byte inside the last block: its hash no longer matches
    pds_loop.cars[did] = bytes(car)
    env.request(did)
    b = env.backfiller()
    b.start()
    try:
        (f,) = collect(b, has_last(did))
    finally:
        b.stop()
    assert isinstance(f, FetchFailed) and f.error.startswith("failed to read repo from CAR: ") and not f.rate_limited


def test_wrong_key_and_wrong_did(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    bad_sig, other = "did:plc:badsig", "did:plc:otherdid"
    env.account(bad_sig, {"app.bsky.feed.post/3l00000000001": post(1)}, signer=PrivateKey.generate())
    # a validly signed repo of someone else served for `other`
    env.account(other, {})
    k = PrivateKey.generate()
    car, _ = make_repo("did:plc:someoneelse", k, {})
    pds_loop.cars[other] = car
    env.dir.idents[other].signing_key = k.public_key
    env.request(bad_sig)
    env.request(other)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, lambda o: len(o) >= 2)
    finally:
        b.stop()
    by = {x.did: x for x in out}
    assert by[bad_sig].error.startswith("failed to verify signature: ")
    assert by[other].error.startswith("failed to read repo from CAR: ") and "did:plc:someoneelse" in by[other].error


def test_identity_problems(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    env.account("did:plc:nopds", {})
    env.dir.idents["did:plc:nopds"].pds_endpoint = ""
    env.account("did:plc:nokey", {})
    env.dir.idents["did:plc:nokey"].signing_key = None
    env.dir.idents["did:plc:nokey"].key_error = "no #atproto verification method"
    for d in ("did:plc:nopds", "did:plc:nokey", "did:plc:unknown"):
        env.request(d)
    b = env.backfiller(identity_parallelism=4)
    b.cfg = replace(b.cfg, resync_parallelism=3)
    b.repo_slots = 3
    b.start()
    try:
        out = collect(b, lambda o: len(o) >= 3)
    finally:
        b.stop()
    by = {x.did: x.error for x in out}
    assert by["did:plc:nopds"] == "no PDS endpoint for DID: did:plc:nopds"
    assert by["did:plc:nokey"] == "failed to get public key: no #atproto verification method"
    assert by["did:plc:unknown"].startswith("failed to resolve DID: ")


def test_car_size_cap(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop, max_car_size=2048)
    big, streamed = "did:plc:bigcar", "did:plc:streamed"
    env.account(big, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(100)})
    env.account(streamed, {})
    pds_loop.behaviour[streamed] = "chunked_big"  # no Content-Length: refused while streaming
    env.request(big)
    env.request(streamed)
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, lambda o: len(o) >= 2)
    finally:
        b.stop()
    for f in out:
        assert isinstance(f, FetchFailed) and "exceeds the limit of 2048 bytes" in f.error, f.error


def test_order_not_before_parallelism_and_no_double_fetch(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop, resync_parallelism=2)
    pds_loop.delay = 0.2
    dids = [f"did:plc:p{i}" for i in range(6)]
    for d in dids:
        env.account(d, {})
    now = int(time.time())
    keys = {
        dids[0]: env.request(dids[0], prio=PRIO_ERROR),
        dids[1]: env.request(dids[1], prio=PRIO_DESYNC),
        dids[2]: env.request(dids[2], prio=PRIO_PENDING),
        dids[3]: env.request(dids[3], prio=PRIO_PENDING, not_before=now + 3600),  # not yet
        dids[4]: env.request(dids[4], prio=PRIO_ERROR, not_before=now - 10),
    }
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, lambda o: sum(isinstance(x, SnapshotChunk) for x in o) >= 4)
        time.sleep(0.3)  # answered rows are still in fetch_q: they must not be fetched again
        out += b.poll()
        assert len(pds_loop.requests) == 4
        # RepoLogic applies one answer; a new request for that DID (new key) is fetched again
        env.answered(keys[dids[2]])
        env.request(dids[2], prio=PRIO_DESYNC, not_before=now - 1)
        collect(b, lambda o: len(o) >= 1)
    finally:
        b.stop()
    assert pds_loop.max_active <= 2
    # claim order: pending, desynchronized, error (oldest not_before first); the future row waits
    assert pds_loop.requests[:4] == [dids[2], dids[1], dids[0], dids[4]]
    assert pds_loop.requests[4] == dids[2] and dids[3] not in pds_loop.requests


def test_same_key_re_requested_with_new_value_is_fetched_again(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:again"
    env.account(did, {}, handle="x.test")
    k = env.request(did, kind="identity", prio=PRIO_IDENTITY, n=1)
    b = env.backfiller()
    b.start()
    try:
        collect(b, lambda o: len(o) >= 1)
        env.request(did, kind="identity", prio=PRIO_IDENTITY, n=2)  # same key, new value
        collect(b, lambda o: len(o) >= 1)
    finally:
        b.stop()
    assert env.dir.resolved == [did, did]
    assert k == fetch_key(PRIO_IDENTITY, 0, did)


def test_unanswered_row_is_fetched_again_after_the_timeout(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop)
    did = "did:plc:stuck"
    env.account(did, {})
    env.request(did, kind="identity", prio=PRIO_IDENTITY)
    b = env.backfiller(done_timeout={"identity": 0.2})
    b.start()
    try:
        collect(b, lambda o: len(o) >= 1)
        collect(b, lambda o: len(o) >= 1)
    finally:
        b.stop()
    assert b.stats["refetched"] >= 1


def test_outbox_backpressure_and_outbox_only(tmp_path, pds_loop):
    env = Env(tmp_path, pds_loop, outbox_capacity=10)
    did = "did:plc:held"
    env.account(did, {})
    env.request(did)
    env.depth = 10
    b = env.backfiller()
    b.start()
    try:
        time.sleep(0.2)
        assert b.poll() == [] and pds_loop.requests == [] and b.stats["held"] > 0
        env.depth = 9
        collect(b, has_last(did))
    finally:
        b.stop()
    off = Env(tmp_path, pds_loop, outbox_only=True)
    off.request("did:plc:never")
    part = BackfillSource(off.cfg, off.db, directory=off.dir).build_part("backfill", "backfill", None)
    time.sleep(0.1)
    assert part.next_batch() == [] and not part._b._thread.alive
    part.close()


def test_in_a_real_bytewax_flow(tmp_path, pds_loop):
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    env = Env(tmp_path, pds_loop)
    did = "did:plc:flow"
    cids = env.account(did, {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(5)})
    env.request(did)

    class Stopping(_BackfillPartition):
        done = False

        def next_batch(self):
            if Stopping.done:
                raise StopIteration
            items = list(super().next_batch())
            Stopping.done = any(getattr(x, "last", False) for x in items)
            return items

    class Src(BackfillSource):
        def build_part(self, step_id, for_part, resume_state):
            return Stopping(Backfiller(self.cfg, env.db, directory=env.dir, depth=lambda: 0, chunk_size=2), 0.005)

    out: list = []
    flow = Dataflow("bf")
    op.output("out", op.input("in", flow, Src(env.cfg)), TestingSink(out))
    run_main(flow)
    assert isinstance(out[0], FetchStarted) and out[0].identity.handle == "alice.test"
    chunks = out[1:]
    assert {r.path: r.cid for c in chunks for r in c.records} == cids
    assert chunks[-1].last and len(chunks) == 3


# --- against the real PDS harness --------------------------------------------------------------

def _harness_cfg(pds, tmp_path, **over) -> Config:
    return replace(Config(data_dir=str(tmp_path / "data"), plc_url=pds.plc_url,
                          handle_resolver=(f"xrpc:{pds.url}",), resync_parallelism=4), **over)


@pytest.mark.e2e
@pytest.mark.parametrize("spool_over", [None, 1], ids=["in-memory", "spooled"])
def test_fetch_and_verify_real_repos(pds, tmp_path, spool_over):
    """scenario.mjs accounts: the snapshot equals what the PDS says each repo holds; a deleted
    account fails with the PDS's error text, as Tap reports it. ``spooled``: every CAR takes the
    huge-repo path (streamed to a file, verified from a mapping, records read back from a file)."""
    scen = pds.script("scenario.mjs")
    cfg = _harness_cfg(pds, tmp_path)
    db = open_flow_db(cfg.data_dir)
    for did in scen["dids"]:
        db.cf("fetch_q")[fetch_key(PRIO_PENDING, 0, did)] = orjson.dumps({"kind": "repo", "did": did})
    alice = scen["names"]["alice"]
    db.cf("fetch_q")[fetch_key(PRIO_IDENTITY, 0, alice)] = orjson.dumps({"kind": "identity", "did": alice})
    b = Backfiller(cfg, db, depth=lambda: 0, **({} if spool_over is None else {"spool_over": spool_over}))
    b.start()
    try:
        out = collect(b, lambda o: all(has_last(d)(o) for d in scen["dids"]) and any(
            isinstance(x, IdentityRefreshed) for x in o), timeout=60)
    finally:
        b.stop()
    live = sum(1 for r in scen["repos"].values() if r["status"] != "deleted")
    assert b.stats["spooled"] == (0 if spool_over is None else live)
    assert not os.listdir(os.path.join(cfg.data_dir, "backfill-spool"))
    for did, want in scen["repos"].items():
        mine = [x for x in out if x.did == did and not isinstance(x, (IdentityRefreshed, FetchStarted))]
        if want["status"] == "deleted":
            (f,) = mine
            assert isinstance(f, FetchFailed) and f.error.startswith("failed to get repo: API request failed (HTTP 400)")
            continue
        assert all(isinstance(x, SnapshotChunk) for x in mine), mine
        assert {r.path: r.cid for c in mine for r in c.records} == want["records"]
        assert mine[0].identity.handle == want["handle"] and mine[-1].rev == want["rev"]
        assert all(r.record_json for c in mine for r in c.records)
    ident = next(x for x in out if isinstance(x, IdentityRefreshed))
    assert ident.identity.handle == scen["repos"][alice]["handle"] and ident.identity.pds == pds.public_url


@pytest.mark.e2e
def test_big_real_repo_costs(pds, tmp_path):
    """One real repo of 3000 records: verification off the loop, chunking paced by next_batch.
    Prints the measured costs (verify per record, convert per record, longest poll)."""
    load = pds.script("load.mjs", {"ACCOUNTS": "1", "RECORDS": "3000", "MODE": "apply", "BATCH": "200"})
    did = load["dids"][0]
    cfg = _harness_cfg(pds, tmp_path)
    db = open_flow_db(cfg.data_dir)
    db.cf("fetch_q")[fetch_key(PRIO_PENDING, 0, did)] = orjson.dumps({"kind": "repo", "did": did})
    b = Backfiller(cfg, db, depth=lambda: 0)
    b.start()
    polls: list[float] = []
    out: list = []
    try:
        t0 = time.perf_counter()
        while not has_last(did)(out):
            t = time.perf_counter()
            got = b.poll()
            polls.append(time.perf_counter() - t)
            out += [x for x in got if not isinstance(x, FetchStarted)]
            if not got:
                time.sleep(0.002)
            assert time.perf_counter() - t0 < 60
    finally:
        b.stop()
    n = sum(len(c.records) for c in out)
    assert n == load["repos"][did]["recordCount"] == 3000
    busy = sorted(p for p in polls if p > 0.0005) or [max(polls)]
    convert = sum(busy)
    print(f"\nbackfill of {n} records: verify {b.verify_seconds[0] * 1e3:.1f} ms "
          f"({b.verify_seconds[0] / n * 1e6:.1f} us/record, executor thread); "
          f"chunking {convert * 1e3:.1f} ms ({convert / n * 1e6:.1f} us/record) in {len(busy)} polls, "
          f"longest poll {busy[-1] * 1e3:.1f} ms")
    assert busy[-1] < 0.1


def test_public_only_refuses_loopback_pds(tmp_path, pds_loop):
    """TAP_PUBLIC_ONLY: a PDS endpoint (from a DID document) on a loopback address is refused."""
    env = Env(tmp_path, pds_loop, public_only=True)
    did = "did:plc:private"
    env.account(did, {})
    env.dir.idents["did:plc:localhost"] = replace(env.dir.idents[did], pds_endpoint=f"http://localhost:{pds_loop.port}")
    env.request(did)
    env.request("did:plc:localhost")
    b = env.backfiller()
    b.start()
    try:
        out = collect(b, lambda o: len(o) >= 2)
    finally:
        b.stop()
    for f in out:
        assert isinstance(f, FetchFailed) and "non-public" in f.error, f.error
    assert pds_loop.requests == []


def test_http_helper_follows_redirects_and_reports_timeouts(pds_loop):
    from connectors import http

    async def main():
        app = web.Application()

        async def hop(req):
            raise web.HTTPFound(f"/xrpc/com.atproto.sync.getRepo?did={req.query['did']}")

        async def slow(req):
            await asyncio.sleep(2)
            return web.Response(text="late")

        app.router.add_get("/hop", hop)
        app.router.add_get("/slow", slow)
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", pds_loop.get_repo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            pds_loop.cars["did:plc:r"] = b"CARBYTES"
            body = await http.get_bytes(f"http://127.0.0.1:{port}/hop", {"did": "did:plc:r"}, timeout=5, max_bytes=100)
            assert body == b"CARBYTES"
            with pytest.raises(http.HttpError, match="timed out"):
                await http.get_bytes(f"http://127.0.0.1:{port}/slow", timeout=0.3, max_bytes=100)
        finally:
            await http.close_sessions()
            await runner.cleanup()

    asyncio.run(main())


def test_wakeup_latency(tmp_path, pds_loop):
    """A row queued with RepoLogic's FETCH_WAKEUP set is answered within a few ms (no 50 ms poll wait)."""
    from operators.repo import FETCH_WAKEUP

    env = Env(tmp_path, pds_loop)
    b = env.backfiller(scan_interval=5.0)  # without the wake-up a row would wait up to 5 s
    b.start()
    lat = []
    try:
        time.sleep(0.1)
        for i in range(20):
            did = f"did:plc:wake{i}"
            env.account(did, {})
            t = time.perf_counter()
            env.request(did, kind="identity", prio=PRIO_IDENTITY)
            FETCH_WAKEUP.set()
            out: list = []
            while not out:
                out = b.poll()
                time.sleep(0.0005)
            lat.append(time.perf_counter() - t)
            time.sleep(0.013)
    finally:
        b.stop()
    lat.sort()
    print(f"\nbackfill wake-up: row -> answer p50 {lat[10] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")
    assert lat[-1] < 2.5  # every row answered through the wake-up, none by the 5 s scan


def test_verification_pool_path(tmp_path, pds_loop, caplog):
    """CARs above INLINE_CAR_BYTES go to the spawn-started verification pool: the chunks that come
    back are the records, and each verification failure keeps its FetchFailed reason."""
    from connectors.backfill import INLINE_CAR_BYTES
    from runtime import procpool

    env = Env(tmp_path, pds_loop, resync_parallelism=3)
    ok, bad_sig, corrupt = "did:plc:poolok", "did:plc:poolbadsig", "did:plc:poolcorrupt"
    many = {f"app.bsky.feed.post/3l{i:011d}": post(i) for i in range(400)}
    cids = env.account(ok, many)
    env.account(bad_sig, many, signer=PrivateKey.generate())
    env.account(corrupt, many)
    car = bytearray(pds_loop.cars[corrupt])
    car[-3] ^= 0xFF
    pds_loop.cars[corrupt] = bytes(car)
    assert min(len(c) for c in pds_loop.cars.values()) > INLINE_CAR_BYTES
    for d in (ok, bad_sig, corrupt):
        env.request(d)
    assert procpool.start_pool(1) is not None
    b = env.backfiller(chunk_size=150)
    b.start()
    try:
        out = collect(b, lambda o: all(has_last(d)(o) for d in (ok, bad_sig, corrupt)), timeout=60)
    finally:
        b.stop()
        procpool.stop_pool()
    chunks = [c for c in out if isinstance(c, SnapshotChunk)]
    assert [c.count for c in chunks] == [150, 150, 100] and chunks[-1].last
    assert {r.path: r.cid for c in chunks for r in c.records} == cids
    fails = {f.did: f.error for f in out if isinstance(f, FetchFailed)}
    assert fails[bad_sig].startswith("failed to verify signature: ")
    assert fails[corrupt].startswith("failed to read repo from CAR: ") and "hash" in fails[corrupt]
    assert not [r for r in caplog.records if r.levelno >= 30 and "pool" in r.getMessage()]  # no thread fallback


def _deleted_rows(env: Env, n: int, prio: int = PRIO_PENDING) -> None:
    """``n`` fetch_q rows written and deleted: tombstones at the front of ``prio``'s range."""
    h = env.db.handle("fetch_q")
    keys = [fetch_key(prio, 0, f"did:plc:gone{i:07d}") for i in range(n)]
    for op in ("put", "delete"):
        batch = env.db.batch()
        for k in keys:
            batch.put(k, b'{"kind":"repo"}', h) if op == "put" else batch.delete(k, h)
        env.db.write(batch)


def test_full_repo_slots_scan_identity_rows_only(tmp_path, pds_loop):
    """With every repo slot busy only identity rows can start: scans stop at their range's end
    and never step over the repo rows (or their tombstones) behind it."""
    env = Env(tmp_path, pds_loop)  # 2 repo slots
    pds_loop.hold = True
    for i in range(2):
        env.account(f"did:plc:slow{i}", {})
        env.request(f"did:plc:slow{i}")
    b = env.backfiller()
    b.start()
    try:
        deadline = time.monotonic() + 10
        while pds_loop.active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pds_loop.active == 2
        _deleted_rows(env, 200_000)
        did = "did:plc:ident"
        env.account(did, {}, handle="bob.test")
        env.request(did, kind="identity", prio=PRIO_IDENTITY)
        out = collect(b, lambda o: any(isinstance(x, IdentityRefreshed) for x in o))
        scans = b.stats["scans"]
        while b.stats["scans"] < scans + 5 and time.monotonic() < deadline + 10:
            time.sleep(0.01)
    finally:
        pds_loop.hold = False
        b.stop()
    assert out[0].identity.handle == "bob.test"
    assert b.stats["scans"] >= scans + 5 and b.stats["compactions"] == 0


def test_a_queue_full_of_deleted_rows_is_compacted(tmp_path, pds_loop):
    """Answered and removed requests leave tombstones that every scan steps over until
    compaction; a scan that pays for them compacts ``fetch_q`` (1M removed repos made each
    scan cost ~1.4 s of CPU and the removal take minutes)."""
    env = Env(tmp_path, pds_loop)
    q = env.db.cf("fetch_q")
    waiting = [env.request(f"did:plc:later{i:05d}", not_before=2**40) for i in range(1000)]
    b = env.backfiller()
    b.start()
    try:
        deadline = time.monotonic() + 10
        while b.stats["scans"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.stats["scans"] >= 5 and b.stats["compactions"] == 0  # a live queue (rows not due yet) is no reason
        _deleted_rows(env, 200_000)
        assert q.property_int_value("rocksdb.num-deletes-active-mem-table") == 200_000
        did = "did:plc:afterwards"
        env.account(did, {"app.bsky.feed.post/1": {"text": "x"}})
        env.request(did)
        collect(b, has_last(did))
        deadline = time.monotonic() + 30
        while (b._compacting is None or not b._compacting.done()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        b.stop()
    assert b.stats["compactions"] >= 1
    assert q.property_int_value("rocksdb.num-deletes-active-mem-table") == 0  # flushed and compacted away
    assert sum(1 for _ in q.keys()) == len(waiting) + 1  # nothing live was lost (the answered row stays until RepoLogic deletes it)
