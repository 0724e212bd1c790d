"""Size and shape limits on hostile input: each one is enforced where the input enters, with a
clear error, and the flow goes on.

| limit | where | what happens |
|---|---|---|
| ``TAP_MAX_FRAME_SIZE`` (5 MiB) | ``connectors.firehose`` (websockets ``max_size``) | frame rejected (``frame_too_large``), redial past it; never more than 16x in memory |
| ``TAP_MAX_CAR_SIZE`` (1 GiB) | getRepo download (``connectors.http``) and ``verify_repo`` | ``FetchFailed`` "exceeds the limit of N bytes" |
| record size (1 MiB, Go's ``MAX_CBOR_RECORD_SIZE``) | ``protocol.atjson`` | event emitted without ``record`` |
| blocks per CAR (16 Mi) / per ``#commit``/``#sync`` (10 000) | ``protocol.car.read_car`` / ``protocol.commit`` | ``CarTooLarge`` / ``BadCar`` |
| ops per ``#commit`` (200) | ``protocol.commit`` | ``BadOp`` |
| MST height (128 layers) | ``protocol.commit`` | ``BadMST`` (not a ``RecursionError``) |
| ``TAP_MAX_BODY_SIZE`` (10 MiB) | HTTP API (aiohttp ``client_max_size``) | 413 ``{"message": ...}`` |
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import cbrrr
import orjson
import pytest

from bench.gen import RepoSim, make_tid, random_writes
from protocol import cbor
from protocol.car import DEFAULT_MAX_BLOCKS, CarTooLarge, read_car, write_car
from protocol.cid import cid_for_dag_cbor
from protocol.commit import (
    MAX_COMMIT_BLOCKS,
    MAX_COMMIT_OPS,
    MAX_MST_HEIGHT,
    BadCar,
    BadMST,
    BadOp,
    verify_commit,
    verify_repo,
    verify_sync,
)
from protocol.keys import K256, PrivateKey
from protocol.mst import key_height

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-network"
DID = "did:plc:limitslimitslimitslimits"
PRIV = PrivateKey.from_bytes(K256, b"\x07" * 32)


def _junk_blocks(n: int, tag: bytes = b"j") -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        b = cbor.encode(tag + i.to_bytes(4, "big"))
        out.append((cid_for_dag_cbor(b), b))
    return out


def _signed(data_cid: bytes, rev: str, priv: PrivateKey = PRIV, did: str = DID) -> tuple[bytes, bytes]:
    unsigned = {"did": did, "version": 3, "data": cbrrr.CID(data_cid), "prev": None, "rev": rev}
    block = cbor.encode({**unsigned, "sig": priv.sign(cbor.encode(unsigned))})
    return cid_for_dag_cbor(block), block


@pytest.fixture(scope="module")
def sim():
    s = RepoSim.create(n_records=40, seed=21)
    return s, s.commit(random_writes(s, random.Random(1)))


# --------------------------------------------------------------------------- blocks per CAR


def test_car_block_count_limit():
    blocks = _junk_blocks(50)
    car = write_car([blocks[0][0]], blocks)
    assert len(read_car(car, max_blocks=50).blocks) == 50
    with pytest.raises(CarTooLarge, match="more than 49 blocks"):
        read_car(car, max_blocks=49)
    # duplicates are sections too: a CAR cannot dodge the cap by repeating one block
    dup = write_car([blocks[0][0]], [blocks[0]] * 60)
    assert len(read_car(dup, max_blocks=60).blocks) == 1
    with pytest.raises(CarTooLarge):
        read_car(dup, max_blocks=59)


def test_default_block_cap_fits_real_repos():
    for path in REAL.glob("*.repo.car"):
        assert len(read_car(path.read_bytes()).blocks) < DEFAULT_MAX_BLOCKS // 1000


def test_commit_and_sync_block_limit(sim):
    s, ev = sim
    body = ev.decoded()
    car = read_car(body["blocks"])
    padded = write_car(car.roots, list(car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS - len(car.blocks)))
    verify_commit({**body, "blocks": padded}, s.key.public_key)  # exactly at the limit: fine
    over = write_car(car.roots, list(car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS - len(car.blocks) + 1))
    with pytest.raises(BadCar, match=f"more than {MAX_COMMIT_BLOCKS} blocks") as e:
        verify_commit({**body, "blocks": over}, s.key.public_key)
    assert e.value.reason == "bad_car"
    sync = s.sync_body()
    sync_car = read_car(sync["blocks"])
    over = write_car(sync_car.roots, list(sync_car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS))
    with pytest.raises(BadCar, match="blocks"):
        verify_sync(over, s.key.public_key)
    verify_sync(sync["blocks"], s.key.public_key)


def test_repo_block_limit(sim):
    s, _ = sim
    car = s.get_repo_car()
    n = len(read_car(car).blocks)
    assert verify_repo(car, s.key.public_key, s.did, max_blocks=n).record_count == len(s.records)
    with pytest.raises(BadCar, match=f"more than {n - 1} blocks"):
        verify_repo(car, s.key.public_key, s.did, max_blocks=n - 1)


# --------------------------------------------------------------------------- ops per commit


def test_commit_ops_limit(sim):
    s, ev = sim
    body = ev.decoded()
    many = body["ops"] + [{"action": "delete", "path": f"app.bsky.feed.like/3k{i:011d}", "cid": None,
                           "prev": body["ops"][0].get("cid") or body["ops"][0].get("prev")}
                          for i in range(MAX_COMMIT_OPS + 1 - len(body["ops"]))]
    assert len(many) == MAX_COMMIT_OPS + 1
    with pytest.raises(BadOp, match=f"{MAX_COMMIT_OPS + 1} ops, more than {MAX_COMMIT_OPS}"):
        verify_commit({**body, "ops": many}, s.key.public_key)


# --------------------------------------------------------------------------- MST height


def deep_commit(chain: int) -> dict:
    """A signed #commit whose MST root is ``chain`` empty nodes, each only pointing at the next,
    above a leaf holding the created record (the root's height is then ``chain`` + the key's)."""
    rec = cbor.encode({"$type": "app.bsky.feed.post", "text": "deep", "createdAt": "2024-01-01T00:00:00.000Z"})
    rc = cid_for_dag_cbor(rec)
    path = "app.bsky.feed.post/3kdeepdeepdee"
    leaf = cbor.encode({"l": None, "e": [{"p": 0, "k": path.encode(), "v": cbrrr.CID(rc), "t": None}]})
    cur = cid_for_dag_cbor(leaf)
    blocks = [(cur, leaf), (rc, rec)]
    for _ in range(chain):
        node = cbor.encode({"l": cbrrr.CID(cur), "e": []})
        cur = cid_for_dag_cbor(node)
        blocks.append((cur, node))
    rev = make_tid(1_700_000_000_000_000)
    ccid, cblock = _signed(cur, rev)
    return {"repo": DID, "rev": rev, "time": "2024-01-01T00:00:00.000Z", "seq": 1,
            "blocks": write_car([ccid], [(ccid, cblock)] + blocks[::-1]),
            "ops": [{"action": "create", "path": path, "cid": rc, "prev": None}],
            "prevData": cid_for_dag_cbor(b"\xa0"), "_height": chain + key_height(path.encode())}


def test_mst_height_limit_commit():
    """Before the limit, a 3000-node chain made the inversion recurse into a RecursionError, which
    escaped verify_commit (only VerificationError is documented) and was an internal error upstream."""
    evt = deep_commit(3000)
    with pytest.raises(BadMST, match=f"layers tall, more than {MAX_MST_HEIGHT}") as e:
        verify_commit(evt, PRIV.public_key)
    assert e.value.reason == "bad_mst"
    # a chain under the limit is merely an MST that does not invert to prevData
    shallow = deep_commit(MAX_MST_HEIGHT - 20)
    assert shallow["_height"] <= MAX_MST_HEIGHT
    with pytest.raises(Exception) as e:
        verify_commit(shallow, PRIV.public_key)
    assert e.value.reason in ("inversion_mismatch", "proof_incomplete", "bad_mst"), e.value
    assert not isinstance(e.value, RecursionError)


def real_env(tmp_path):
    """RepoLogic with the real verifier over a real RocksDB (tests.repo_support)."""
    from operators.repo import RepoLogic
    from tests.repo_support import Env

    env = Env(tmp_path / "data")
    env.logic = RepoLogic(env.db, env.cfg, env.ids, clock=env.clock, rand=lambda: 0.5)
    return env


def test_mst_height_limit_repo_and_repo_logic(tmp_path):
    from operators.items import AddRepo, FirehoseCommit
    from protocol.cid import cid_to_str

    evt = deep_commit(3000)
    with pytest.raises(BadMST):
        verify_repo(evt["blocks"], PRIV.public_key)
    # through RepoLogic: a counted verification failure, not an internal error
    env = real_env(tmp_path)
    env.process(AddRepo(DID))
    env.sync_repo(DID, make_tid(1_600_000_000_000_000), cid_to_str(cid_for_dag_cbor(b"\xa0")), {},
                  key=PRIV.public_key.multibase())
    body = {k: v for k, v in evt.items() if not k.startswith("_")}
    out = env.process(FirehoseCommit(seq=1, did=DID, body=body))
    assert [(r.reason, r.extra.get("verify")) for r in out] == [("verify_failed", "bad_mst")]
    assert env.records(DID) == {} and env.outbox(DID)[-1]["type"] == "identity"


# --------------------------------------------------------------------------- frame size


class _Relay:
    """A WebSocket relay of ``(seq, frame)``s honouring ``?cursor=`` (websockets, no size cap)."""

    def __init__(self, frames: list[tuple[int, bytes]]) -> None:
        self.frames = frames
        self.connections = 0
        self.completed: list[int] = []  # per connection: how many frames were sent in full
        self.cursors: list[int | None] = []  # per connection: its ?cursor= (None: live head)

    async def handler(self, ws) -> None:
        from urllib.parse import parse_qs, urlsplit

        self.connections += 1
        q = parse_qs(urlsplit(ws.request.path).query)
        # no cursor on a redial: the live head, i.e. only the last frame is still to come
        cursor = int(q["cursor"][0]) if "cursor" in q else (self.frames[-2][0] if self.connections > 1 else 0)
        self.cursors.append(cursor if "cursor" in q else None)
        sent = 0
        try:
            for seq, f in self.frames:
                if seq > cursor:
                    await ws.send(f)
                    sent += 1
        finally:
            self.completed.append(sent)
        await ws.wait_closed()

    async def __aenter__(self):
        from websockets.asyncio.server import serve

        self.server = await serve(self.handler, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def _commit_frame(seq: int, pad: int = 0) -> bytes:
    body = {"seq": seq, "repo": DID, "rev": make_tid(1_700_000_000_000_000 + seq), "blocks": b"\x00" * (10 + pad),
            "ops": [], "time": "2024-01-01T00:00:00.000Z", "commit": None, "since": None, "blobs": [],
            "rebase": False, "tooBig": False}
    return cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode(body)


def _client(tmp_path, port: int, max_frame_size: int):
    from dataclasses import replace

    from config import Config
    from connectors.firehose import FirehoseClient

    cfg = replace(Config(relay_url=f"http://127.0.0.1:{port}", data_dir=str(tmp_path / "data"),
                         cursor_save_interval=0.05, outbox_capacity=1000), max_frame_size=max_frame_size)
    return FirehoseClient(cfg, depth=lambda: 0, emit_rejected=True)


async def _until(cond, timeout: float = 10.0) -> None:
    import time

    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "condition not met in time"
        await asyncio.sleep(0.01)


async def _read_frames(tmp_path, frames, limit: int, settle: float = 0.0):
    """A client with ``TAP_MAX_FRAME_SIZE=limit`` reads ``frames`` from a relay until seq 3
    arrived (then ``settle`` seconds more); returns (drained pairs, the relay, the client)."""
    async with _Relay(frames) as relay:
        c = _client(tmp_path, relay.port, limit)
        c.start()
        try:
            await _until(lambda: c.received_seq == 3)
            if settle:
                await asyncio.sleep(settle)
        finally:
            c.stop()
    return c.drain(100), relay, c


async def test_frame_size_limit_rejects_counts_and_goes_on(tmp_path):
    from prometheus_client import REGISTRY

    metric = ("tapflow_firehose_frames_rejected_total", {"reason": "frame_too_large"})
    n0 = REGISTRY.get_sample_value(*metric) or 0.0
    got, _, _ = await _read_frames(tmp_path, [(1, _commit_frame(1)), (2, _commit_frame(2, pad=4000)),
                                              (3, _commit_frame(3))], 1024)
    kinds = [(seq, type(item).__name__, getattr(item, "reason", "")) for seq, item in got]
    assert kinds[0][:2] == (1, "FirehoseCommit") and kinds[-1][:2] == (3, "FirehoseCommit")
    too_large = [item for _, item in got if getattr(item, "reason", "") == "frame_too_large"]
    assert len(too_large) == 1 and "bytes" in too_large[0].detail
    assert REGISTRY.get_sample_value(*metric) == n0 + 1


async def test_frame_size_limit_bounds_memory_on_the_redial_too(tmp_path):
    """The redial that skips an oversized frame used to read it with no limit (a relay could make
    tapflow buffer a frame of any size). Now it reads at most SKIP_READ_FACTOR times the limit;
    a frame larger still is never read: the client redials at the live head, counted and logged."""
    from prometheus_client import REGISTRY

    from connectors.firehose import SKIP_READ_FACTOR

    limit = 1024
    metric = ("tapflow_firehose_frames_rejected_total", {"reason": "frame_too_large"})
    n0 = REGISTRY.get_sample_value(*metric) or 0.0
    huge = _commit_frame(2, pad=4 * SKIP_READ_FACTOR * limit)  # (a real attack would send gigabytes)
    got, relay, c = await _read_frames(tmp_path, [(1, _commit_frame(1)), (2, huge), (3, _commit_frame(3))], limit,
                                       settle=0.2)
    assert [s for s, item in got if item is not None and type(item).__name__ == "FirehoseCommit"] == [1, 3]
    assert relay.cursors == [None, 1, None]  # head, skip-redial (bounded read fails too), head
    assert REGISTRY.get_sample_value(*metric) == n0 + 1 and c.stats["rejected"] == 1
    read = [item for _, item in got if getattr(item, "reason", "") == "frame_too_large"]
    assert read == []  # never read whole, so never rejected with its size: it was not in memory


async def test_frame_between_limit_and_skip_read_is_read_once_and_rejected(tmp_path):
    from connectors.firehose import SKIP_READ_FACTOR

    limit = 1024
    got, relay, _ = await _read_frames(tmp_path, [(1, _commit_frame(1)),
                                                 (2, _commit_frame(2, pad=(SKIP_READ_FACTOR // 2) * limit)),
                                                 (3, _commit_frame(3))], limit)
    assert [(s, getattr(i, "reason", type(i).__name__)) for s, i in got] == [
        (1, "FirehoseCommit"), (2, "frame_too_large"), (3, "FirehoseCommit")]
    assert relay.cursors == [None, 1]


# --------------------------------------------------------------------------- CAR size


async def test_car_size_limit_on_download_and_in_verification(sim):
    from aiohttp import web

    from connectors import http

    s, _ = sim
    car = s.get_repo_car()

    async def with_length(req):
        return web.Response(body=car, content_type="application/vnd.ipld.car")

    async def streamed(req):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for i in range(0, len(car), 1000):
            await resp.write(car[i:i + 1000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/len", with_length)
    app.router.add_get("/chunked", streamed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        cap = len(car) - 1
        with pytest.raises(http.BodyTooLarge, match=f"exceeds the limit of {cap} bytes"):
            await http.get_bytes(base + "/len", timeout=5, max_bytes=cap)  # refused from Content-Length
        with pytest.raises(http.BodyTooLarge, match=f"exceeds the limit of {cap} bytes"):
            await http.get_bytes(base + "/chunked", timeout=5, max_bytes=cap)  # refused while streaming
        assert await http.get_bytes(base + "/chunked", timeout=5, max_bytes=len(car)) == car
        await http.close_sessions()
    finally:
        await runner.cleanup()
    with pytest.raises(BadCar, match=f"CAR is {len(car)} bytes, more than {len(car) - 1}"):
        verify_repo(car, s.key.public_key, s.did, max_car_size=len(car) - 1)


def test_car_size_setting_reaches_the_backfill():
    """TAP_MAX_CAR_SIZE is what the backfill passes as the download cap and to verify_repo."""
    import inspect

    from config import load_config
    from connectors import backfill

    assert load_config({"TAP_MAX_CAR_SIZE": "2048"}, dotenv=None).max_car_size == 2048
    src = inspect.getsource(backfill)
    assert "max_bytes=self.cfg.max_car_size" in src and "max_car_size=self.cfg.max_car_size" in src


# --------------------------------------------------------------------------- record size


def test_records_over_1_mib_are_emitted_without_record(tmp_path):
    """Go's MAX_CBOR_RECORD_SIZE: a record block over 1 MiB is not decoded; the event carries
    its cid and no ``record`` (live commit and snapshot alike)."""
    from connectors.backfill import record_json
    from operators.items import FirehoseCommit
    from protocol.atjson import MAX_RECORD_SIZE
    from protocol.cid import cid_to_str
    from tests.test_forgeries import Case

    big = cbor.encode({"$type": "app.bsky.feed.post", "text": "x" * (MAX_RECORD_SIZE + 10)})
    ok = cbor.encode({"$type": "app.bsky.feed.post", "text": "x" * (MAX_RECORD_SIZE - 100)})
    assert len(big) > MAX_RECORD_SIZE >= len(ok)
    assert record_json(big) is None and record_json(ok) is not None
    c = Case(tmp_path, seed=31, n=5)
    body = c.sim.commit([("create", "app.bsky.feed.post/3kbigbigbig01", big),
                         ("create", "app.bsky.feed.post/3kbigbigbig02", ok)]).decoded()
    assert c.env.process(FirehoseCommit(seq=1, did=c.did, body=body)) == []
    evs = {e["record"]["rkey"]: e["record"] for e in c.env.outbox(c.did)[-2:]}
    assert "record" not in evs["3kbigbigbig01"] and evs["3kbigbigbig01"]["cid"] == cid_to_str(cid_for_dag_cbor(big))
    assert evs["3kbigbigbig02"]["record"]["text"].startswith("xxx")
    c.check_in_step()


# --------------------------------------------------------------------------- JSON body size


async def test_api_body_size_limit_is_413(tmp_path):
    import aiohttp

    from store.db import close_all
    from tests.test_channel import Stack, did_n, make_cfg

    s = await Stack(make_cfg(tmp_path, max_body_size=1024)).start()
    try:
        async with aiohttp.ClientSession() as session:
            small = orjson.dumps({"dids": [did_n(i) for i in range(10)]})
            big = orjson.dumps({"dids": [did_n(i) for i in range(100)]})
            assert len(small) <= 1024 < len(big)
            async with session.post(s.url + "/repos/add", data=small, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
            for path in ("/repos/add", "/repos/remove"):
                async with session.post(s.url + path, data=big, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 413
                    assert r.headers["Content-Type"].startswith("application/json")
                    assert orjson.loads(await r.read()) == {"message": "Request Entity Too Large"}
        assert [orjson.loads(v)["op"] for _, v in s.delivery.cf("commands").items()] == ["add"]  # only the small one
    finally:
        await s.stop()
        close_all()
