"""/channel over real sockets: spec §14 delivery tests 7-14 and 16, plus the additional
acceptance tests of §14 (malformed acks, cross-connection acks, two clients, redelivery,
restart), against a fake flow that writes outbox rows into a RocksDB primary while the
delivery code follows it as a secondary.

``FakeFlow`` and ``Stack`` are shared with test_api.py and test_webhook.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web

from config import Config
from connectors.api import Api, CommandLog
from connectors.acks import AckApplier
from connectors.channel import BadFrame, ChannelTarget, parse_client_frame
from connectors.outbox_follower import ITEMS_MIN, OutboxFollower
from operators.events import identity_body, record_body, with_id
from store.db import Database, close_all, open_delivery_db, open_flow_db
from store.layout import (
    FLAG_IDENTITY,
    FLAG_INTERNAL,
    FLAG_LIVE,
    encode_outbox_row,
    meta_counter,
    outbox_key,
    pack_u64,
    shard_of,
    unpack_u64,
)

CID = "bafyreibyxjqwqfygc5yqlvbgygeqwcb3drstfyatkora4voxoxt7brxdyy"
SHARDS = 4


def did_n(i: int) -> str:
    """A valid did:plc (the official client checks DID syntax)."""
    return "did:plc:" + f"{i:024d}".translate(str.maketrans("0123456789", "abcdefghij"))


class FakeFlow:
    """What the dataflow does around the outbox, directly on a RocksDB primary.

    ``push`` writes rows and the shard's ``count/outbox`` counter in one WriteBatch (as
    RepoLogic does); ``apply_acks`` applies the ack batches of ``data/delivery`` with the
    real ``connectors.acks.AckApplier`` (as ControlSource does).
    """

    def __init__(self, data_dir: Path, shards: int = SHARDS) -> None:
        self.data_dir = data_dir
        self.db = open_flow_db(data_dir)
        self.shards = shards
        meta = self.db.cf("meta")
        raw = meta.get(b"fake/next_id")
        self.next_id = unpack_u64(raw) if raw else 1
        self._delivery: Database | None = None
        self.applier = AckApplier(self.db)

    def push(self, did: str, n: int = 1, *, live: bool = False, identity: bool = False,
             internal: bool = False) -> list[int]:
        shard = shard_of(did, self.shards)
        b = self.db.batch()
        h = self.db.handle("outbox")
        ids = []
        for _ in range(n):
            i = self.next_id
            self.next_id += 1
            flags = (FLAG_LIVE if live else 0) | (FLAG_IDENTITY if identity else 0) | (FLAG_INTERNAL if internal else 0)
            if internal:
                payload = orjson.dumps({"did": did, "deleted_paths": ["app.bsky.feed.post/x"]})
            elif identity:
                payload = with_id(i, "identity", identity_body(did=did, handle="alice.test", is_active=True, status="active"))
            else:
                rkey = f"3k{i:011d}".replace("0", "a")
                payload = with_id(i, "record", record_body(live=live, did=did, rev="3kb3fge5lm32x",
                                                             collection="app.bsky.feed.post", rkey=rkey,
                                                             action="create", cid=CID,
                                                             record_json=b'{"$type":"app.bsky.feed.post","text":"hi","createdAt":"2024-10-07T12:00:00.000Z"}'))
            b.put(outbox_key(shard, i), encode_outbox_row(did, flags, payload), h)
            ids.append(i)
        meta = self.db.cf("meta")
        key = meta_counter("outbox", shard)
        cur = meta.get(key)
        b.put(key, pack_u64((unpack_u64(cur) if cur else 0) + n), self.db.handle("meta"))
        b.put(b"fake/next_id", pack_u64(self.next_id), self.db.handle("meta"))
        self.db.write(b)
        return ids

    def rows(self) -> int:
        return sum(1 for _ in self.db.cf("outbox").keys())

    def apply_acks(self) -> int:
        """Apply every ack batch written so far; returns the outbox rows deleted."""
        if self._delivery is None:
            if not (self.data_dir / "delivery" / "CURRENT").exists():
                return 0
            self._delivery = open_delivery_db(self.data_dir, secondary=True)
        self._delivery.catch_up()
        deleted = 0
        while (n := self.applier.apply(self._delivery)) is not None:
            deleted += n
        return deleted

    def put_repo(self, did: str, **state) -> None:
        st = {"state": "active", "status": "active", "handle": "alice.test", "rev": "3kb3fge5lm32x",
              "error": "", "retries": 0, "records": 0}
        st.update(state)
        b = self.db.batch()
        b.put(did.encode(), orjson.dumps(st), self.db.handle("repos"))
        key = meta_counter("repos", shard_of(did, self.shards))
        cur = self.db.cf("meta").get(key)
        b.put(key, pack_u64((unpack_u64(cur) if cur else 0) + 1), self.db.handle("meta"))
        self.db.write(b)


def make_cfg(data_dir: Path, **kw) -> Config:
    base = Config(data_dir=str(data_dir), shards=SHARDS, bind=("127.0.0.1", 0), retry_timeout=60.0)
    return replace(base, **kw)


class Stack:
    """Follower + targets + HTTP API on a real port, over ``data_dir`` (no child process)."""

    def __init__(self, cfg: Config, *, control: bool = True, factories=None, directory=None) -> None:
        self.cfg = cfg
        self.control = control
        self.factories = factories
        self.directory = directory
        self.fake: FakeFlow | None = None

    async def start(self, fake: FakeFlow | None = None) -> "Stack":
        from connectors.delivery_main import target_factories

        self.fake = fake or FakeFlow(Path(self.cfg.data_dir), self.cfg.shards)
        self.delivery = open_delivery_db(self.cfg.data_dir)
        self.flow = open_flow_db(self.cfg.data_dir, secondary=True)
        factories = self.factories or target_factories(self.cfg)
        self.follower = OutboxFollower(self.cfg, self.flow, self.delivery, factories) if factories else None
        self.channel = next((t for t in self.follower.targets if isinstance(t, ChannelTarget)), None) if self.follower else None
        self.commands = CommandLog(self.delivery, self.flow)
        self.api = Api(self.cfg, self.flow, self.commands,
                       channel_handler=self.channel.handle if self.channel else None, directory=self.directory)
        self.runner = web.AppRunner(self.api.app(), handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await self.site.start()
        self.port = self.site._server.sockets[0].getsockname()[1]
        self.tasks = []
        if self.follower:
            await self.follower.start()
            self.tasks.append(asyncio.create_task(self.follower.run()))
        if self.control:
            self.tasks.append(asyncio.create_task(self._control()))
        return self

    async def _control(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.fake.apply_acks()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.channel:
            self.channel.abort_all()
        if self.follower:
            await self.follower.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.runner.cleanup()

    async def restart(self) -> "Stack":
        """A new delivery process over the same data (the fake flow stays)."""
        import gc

        from store import db as store_db

        await self.stop()
        for key in list(store_db._open):
            if key[0].endswith("delivery") or key[1]:  # delivery primary and every secondary
                store_db._open.pop(key).close()
        # RocksDB lets go of its LOCK only when no column family handle is left; aiohttp keeps
        # route handlers in a module-level cache, so cut what they reach.
        self.api.channel_handler = self.api.flow = self.api.commands = None
        self.delivery = self.flow = self.follower = self.channel = self.api = self.commands = None
        self.runner = self.site = None
        self.tasks = []
        self.fake._delivery = None
        gc.collect()
        return await Stack(self.cfg, control=self.control, factories=self.factories,
                           directory=self.directory).start(self.fake)


class Consumer:
    """A WebSocket client that records every frame (like Go's test consumer)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        self.ws = ws
        self.session = session
        self.msgs: list[dict] = []
        self.closed_with: WSMsgType | None = None
        self._task = asyncio.create_task(self._read())
        self._new = asyncio.Event()

    @classmethod
    async def connect(cls, url: str, **kw) -> "Consumer":
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url.replace("http", "ws", 1) + "/channel", **kw)
        return cls(ws, session)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                self.msgs.append(orjson.loads(msg.data))
                self._new.set()
        self.closed_with = WSMsgType.CLOSED
        self._new.set()

    async def wait(self, n: int, timeout: float = 2.0) -> list[dict]:
        """Up to ``timeout`` for ``n`` messages; returns what arrived."""
        deadline = time.monotonic() + timeout
        while len(self.msgs) < n and not self._task.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except asyncio.TimeoutError:
                break
        return list(self.msgs)

    async def ack(self, *ids: int) -> None:
        for i in ids:
            await self.ws.send_str(orjson.dumps({"type": "ack", "id": i}).decode())

    async def close(self) -> None:
        self._task.cancel()
        await self.ws.close()
        await self.session.close()


@pytest.fixture
async def stack_factory(tmp_path):
    stacks: list[Stack] = []

    async def make(**kw) -> Stack:
        control = kw.pop("control", True)
        fake = FakeFlow(tmp_path, SHARDS)
        s = await Stack(make_cfg(tmp_path, **kw), control=control).start(fake)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        try:
            await s.stop()
        except Exception:
            pass
    close_all()


QUIET = 0.15  # how long "nothing more arrives" is checked (Go's tests: 50 ms)


# --- ack frame parsing (Go ReadJSON into {type string, id uint}) ----------------------------

@pytest.mark.parametrize("frame,expected", [
    ('{"type":"ack","id":42}', 42),
    ('{"id":42,"type":"ack","extra":[1]}', 42),
    ('{"Type":"ack","ID":7}', 7),  # Go matches field names case-insensitively
    ('{"type":"hello","id":1}', None),
    ('{"type":"ack"}', 0),
    ("null", None),
    ('{"id":5}', None),
    (b'{"type":"ack","id":3}', 3),
])
def test_parse_client_frame(frame, expected):
    assert parse_client_frame(frame) == expected


@pytest.mark.parametrize("frame", ["", "hello", '{"type":"ack","id":"1"}', '{"type":"ack","id":-1}',
                                   '{"type":"ack","id":1.5}', '{"type":1,"id":1}', "[]", '"ack"',
                                   '{"type":"ack","id":18446744073709551616}', '{"type":"ack","id":true}'])
def test_parse_client_frame_drops(frame):
    with pytest.raises(BadFrame):
        parse_client_frame(frame)


# --- §14 delivery tests -------------------------------------------------------------------------

async def test_fire_and_forget_basic(stack_factory):  # §14 test 7
    s = await stack_factory(disable_acks=True)
    c = await Consumer.connect(s.url)
    await asyncio.sleep(0.02)
    d = did_n(1)
    s.fake.push(d, 5)
    msgs = await c.wait(5, 1.0)
    assert len(msgs) == 5
    assert all(m["type"] == "record" and m["record"]["did"] == d for m in msgs)
    await c.close()


async def test_fire_and_forget_multi_did(stack_factory):  # §14 test 8
    s = await stack_factory(disable_acks=True)
    c = await Consumer.connect(s.url)
    a, b = did_n(1), did_n(2)
    s.fake.push(a, 3)
    s.fake.push(b, 3)
    msgs = await c.wait(6, 1.0)
    assert len(msgs) == 6
    assert sum(m["record"]["did"] == a for m in msgs) == 3
    assert sum(m["record"]["did"] == b for m in msgs) == 3
    await c.close()


async def test_ack_mode_historical_concurrent(stack_factory):  # §14 tests 9 and 10
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d = did_n(3)
    ids = s.fake.push(d, 3)
    msgs = await c.wait(3, 1.0)
    assert [m["id"] for m in msgs] == ids  # all three before any ack
    await c.ack(*ids)
    await _until(lambda: s.fake.rows() == 0)
    await c.close()


async def test_ack_mode_live_barrier(stack_factory):  # §14 test 11
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d = did_n(4)
    h = s.fake.push(d, 2)
    assert len(await c.wait(2, 1.0)) == 2
    l1 = s.fake.push(d, 1, live=True)
    h2 = s.fake.push(d, 2)
    assert len(await c.wait(3, QUIET)) == 2, "L1 must wait for H1, H2"
    await c.ack(*h)
    msgs = await c.wait(3, 1.0)
    assert len(msgs) == 3 and msgs[2]["id"] == l1[0]
    assert len(await c.wait(4, QUIET)) == 3, "H3, H4 must wait for L1"
    await c.ack(l1[0])
    msgs = await c.wait(5, 1.0)
    assert len(msgs) == 5 and {msgs[3]["id"], msgs[4]["id"]} == set(h2)
    await c.close()


async def test_ack_mode_consecutive_live(stack_factory):  # §14 test 12 (Go #1331)
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(5), 3, live=True)
    msgs = await c.wait(1, 1.0)
    assert [m["id"] for m in msgs] == ids[:1]
    assert len(await c.wait(2, QUIET)) == 1
    await c.ack(ids[0])
    msgs = await c.wait(2, 1.0)
    assert [m["id"] for m in msgs] == ids[:2]
    assert len(await c.wait(3, QUIET)) == 2
    await c.ack(ids[1])
    msgs = await c.wait(3, 1.0)
    assert [m["id"] for m in msgs] == ids
    await c.close()


async def test_ack_mode_fast_path_live_blocks_historical(stack_factory):  # §14 test 13
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d = did_n(6)
    l1 = s.fake.push(d, 1, live=True)
    assert [m["id"] for m in await c.wait(1, 1.0)] == l1
    h1 = s.fake.push(d, 1)
    assert len(await c.wait(2, QUIET)) == 1
    await c.ack(l1[0])
    msgs = await c.wait(2, 1.0)
    assert [m["id"] for m in msgs] == l1 + h1
    await c.close()


async def test_fire_and_forget_preconnect_events(stack_factory):  # §14 test 14
    s = await stack_factory(disable_acks=True)
    ids = s.fake.push(did_n(7), 5)
    await asyncio.sleep(0.05)
    c = await Consumer.connect(s.url)
    msgs = await c.wait(5, 1.0)
    assert [m["id"] for m in msgs] == ids
    await _until(lambda: s.fake.rows() == 0)
    await c.close()


async def test_identity_event(stack_factory):  # §14 test 16
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d = did_n(8)
    s.fake.push(d, 1, identity=True)
    (m,) = await c.wait(1, 1.0)
    assert m["type"] == "identity"
    assert m["identity"] == {"did": d, "handle": "alice.test", "is_active": True, "status": "active"}
    await c.close()


# --- additional acceptance tests (§14, "suggested") ------------------------------------------------

@pytest.mark.parametrize("frame", ["hello", '{"type":"ack","id":"1"}', '{"type":"ack","id":-1}', ""])
async def test_malformed_ack_drops_the_connection_without_close_frame(stack_factory, frame):
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    await c.ws.send_str(frame)
    await asyncio.wait_for(c._task, 2.0)
    assert c.ws.close_code in (None, 1006)  # TCP dropped, no close frame from the server
    await c.close()


async def test_unknown_type_is_ignored(stack_factory):
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    await c.ws.send_str('{"type":"hello","id":1}')
    ids = s.fake.push(did_n(9), 1)
    assert [m["id"] for m in await c.wait(1, 1.0)] == ids


async def test_ack_on_another_connection_releases_the_barrier(stack_factory):
    s = await stack_factory()
    c1 = await Consumer.connect(s.url)
    d = did_n(10)
    l1 = s.fake.push(d, 1, live=True)
    h1 = s.fake.push(d, 1)
    assert [m["id"] for m in await c1.wait(1, 1.0)] == l1
    c2 = await Consumer.connect(s.url)
    await c2.ack(l1[0])
    got = (await c1.wait(2, 1.0))[1:] + await c2.wait(1, 0.3)
    assert [m["id"] for m in got] == h1
    await c1.close()
    await c2.close()


async def test_two_clients_each_event_to_exactly_one(stack_factory):
    s = await stack_factory()
    c1 = await Consumer.connect(s.url)
    c2 = await Consumer.connect(s.url)
    ids = []
    for i in range(20):
        ids += s.fake.push(did_n(100 + i), 5)
    await _until(lambda: len(c1.msgs) + len(c2.msgs) >= 100)
    await asyncio.sleep(QUIET)
    got = [m["id"] for m in c1.msgs + c2.msgs]
    assert sorted(got) == ids  # none twice, none lost
    await c1.close()
    await c2.close()


async def test_two_clients_barriers_hold(stack_factory):
    s = await stack_factory()
    c1 = await Consumer.connect(s.url)
    c2 = await Consumer.connect(s.url)
    d = did_n(11)
    ids = s.fake.push(d, 1) + s.fake.push(d, 1, live=True) + s.fake.push(d, 1)
    await _until(lambda: len(c1.msgs) + len(c2.msgs) >= 1)
    await asyncio.sleep(QUIET)
    assert [m["id"] for m in c1.msgs + c2.msgs] == ids[:1]
    await c2.ack(ids[0])
    await _until(lambda: len(c1.msgs) + len(c2.msgs) >= 2)
    await asyncio.sleep(QUIET)
    assert sorted(m["id"] for m in c1.msgs + c2.msgs) == ids[:2]
    await c1.ack(ids[1])
    await _until(lambda: len(c1.msgs) + len(c2.msgs) >= 3)
    assert sorted(m["id"] for m in c1.msgs + c2.msgs) == ids


async def test_unacked_event_is_resent_after_retry_timeout(stack_factory):
    s = await stack_factory(retry_timeout=0.3)
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(12), 1, live=True)
    t0 = time.monotonic()
    assert len(await c.wait(1, 1.0)) == 1
    assert len(await c.wait(2, 0.15)) == 1
    msgs = await c.wait(3, 2.0)  # resent, and again
    assert [m["id"] for m in msgs] == ids * 3
    assert time.monotonic() - t0 >= 0.55
    await c.ack(ids[0])
    await asyncio.sleep(0.5)
    assert len(c.msgs) <= 4  # no more resends once acked (one may have crossed the ack)
    await _until(lambda: s.fake.rows() == 0)


async def test_events_of_a_dropped_connection_go_to_the_next_client_at_once(stack_factory):
    s = await stack_factory()  # retry timeout 60 s: no timer involved
    c1 = await Consumer.connect(s.url)
    d = did_n(13)
    ids = s.fake.push(d, 1, live=True) + s.fake.push(d, 2)
    assert [m["id"] for m in await c1.wait(1, 1.0)] == ids[:1]
    await c1.close()
    c2 = await Consumer.connect(s.url)
    assert [m["id"] for m in await c2.wait(1, 1.0)] == ids[:1]
    await c2.ack(ids[0])
    assert [m["id"] for m in await c2.wait(3, 1.0)] == ids
    await c2.close()


async def test_fire_and_forget_failed_write_is_retried(stack_factory):
    """§15.6: a write to a dead socket puts the events back (Tap blocks the repo until restart)."""
    s = await stack_factory(disable_acks=True)
    ch = s.channel

    class DeadTransport:
        def is_closing(self):
            return True

    class FakeConn:
        transport = DeadTransport()
        protocol = None
        closed = False
        unacked = 0
        peer = "x"

    d = did_n(14)
    ids = s.fake.push(d, 1, live=True) + s.fake.push(d, 1)
    await _until(lambda: ch.queued == 1)
    await ch._write_loop(FakeConn())  # finds the transport closing: requeues and returns
    assert ch.queued == 1
    c = await Consumer.connect(s.url)
    assert [m["id"] for m in await c.wait(2, 1.0)] == ids
    await c.close()


async def test_pings_are_answered(stack_factory):
    s = await stack_factory()
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(s.url.replace("http", "ws") + "/channel", autoping=False)
    await ws.ping(b"hb")
    msg = await asyncio.wait_for(ws.receive(), 1.0)
    assert msg.type is WSMsgType.PONG and msg.data == b"hb"
    await ws.close()
    await session.close()


async def test_shutdown_aborts_without_close_frame(stack_factory):
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    await asyncio.sleep(0.02)
    frames = []

    async def raw_reader():
        pass

    await s.stop()
    await asyncio.wait_for(c._task, 2.0)
    assert c.ws.close_code in (None, 1006)
    await c.close()


async def test_internal_rows_are_taken_without_sending(stack_factory):
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d = did_n(15)
    s.fake.push(d, 2, internal=True)
    ids = s.fake.push(d, 1)
    assert [m["id"] for m in await c.wait(1, 1.0)] == ids
    await _until(lambda: s.fake.rows() == 1)  # the internal rows are acked and deleted
    assert len(await c.wait(2, QUIET)) == 1


async def test_restart_redelivers_unacked_in_order_with_barriers(stack_factory, tmp_path):
    s = await stack_factory(control=True)
    c = await Consumer.connect(s.url)
    d = did_n(16)
    h = s.fake.push(d, 2)
    l1 = s.fake.push(d, 1, live=True)
    h2 = s.fake.push(d, 1)
    other = s.fake.push(did_n(17), 1)
    msgs = await c.wait(3, 1.0)
    assert sorted(m["id"] for m in msgs) == sorted(h + other)
    await c.ack(other[0])
    await _until(lambda: s.fake.rows() == 4)
    await c.close()
    s2 = await s.restart()
    c2 = await Consumer.connect(s2.url)
    msgs = await c2.wait(2, 1.0)
    assert sorted(m["id"] for m in msgs) == h  # the acked event is gone for good
    assert len(await c2.wait(3, QUIET)) == 2
    await c2.ack(*h)
    assert [m["id"] for m in await c2.wait(3, 1.0)][2:] == l1
    await c2.ack(l1[0])
    assert [m["id"] for m in await c2.wait(4, 1.0)][3:] == h2
    await c2.close()
    await s2.stop()


async def test_acked_but_not_deleted_rows_are_not_redelivered(stack_factory):
    s = await stack_factory(control=False)  # the flow never deletes: acks pile up
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(18), 3)
    await c.wait(3, 1.0)
    await c.ack(ids[0], ids[1])
    await _until(lambda: s.follower.awaiting_delete == 2)
    await c.close()
    s2 = await s.restart()
    c2 = await Consumer.connect(s2.url)
    assert [m["id"] for m in await c2.wait(1, 1.0)] == ids[2:]
    assert len(await c2.wait(2, QUIET)) == 1
    assert s2.follower.awaiting_delete == 2
    s2.fake.apply_acks()  # the flow catches up: ack rows go, and so does the memory of them
    await _until(lambda: s2.follower.awaiting_delete == 0, 3.0)
    s2.delivery.catch_up() if s2.delivery.secondary else None
    assert list(s2.delivery.cf("acks").keys()) == []
    await c2.close()
    await s2.stop()


async def test_memory_is_bounded_by_outbox_capacity(stack_factory):
    s = await stack_factory(outbox_capacity=10)
    ids = []
    for i in range(10):
        ids += s.fake.push(did_n(200 + i), 10)
    await asyncio.sleep(0.2)
    assert s.follower.in_flight == 10  # read only as far as the capacity allows
    c = await Consumer.connect(s.url)
    seen: set[int] = set()
    deadline = time.monotonic() + 10
    while len(seen) < 100 and time.monotonic() < deadline:
        msgs = await c.wait(len(c.msgs) + 1, 0.5)
        new = [m["id"] for m in msgs if m["id"] not in seen]
        seen.update(new)
        await c.ack(*new)
        assert s.follower.in_flight <= 10
    assert sorted(seen) == ids
    await _until(lambda: s.fake.rows() == 0, 3.0)
    await _until(lambda: s.follower.awaiting_delete == 0, 3.0)
    await c.close()


async def _until(cond, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- the real child process and the official client (@atproto/tap 0.3.12) ----------------------------

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(os.environ.get("TAPFLOW_SHARED", ROOT.parent / "shared")) / "harness" / "client" / "run-client.sh"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """``python -m connectors.delivery_main`` over ``data_dir``."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        self.data_dir, self.port = data_dir, port
        e = {k: v for k, v in os.environ.items() if not k.startswith("TAP_")}
        e.update({"PYTHONPATH": str(ROOT), "TAP_DATA_DIR": str(data_dir), "TAP_BIND": f"127.0.0.1:{port}",
                  "TAP_SHARDS": str(SHARDS), "TAP_LOG_LEVEL": "info"})
        e.update(env)
        self.log = open(data_dir.parent / f"child-{port}-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([os.sys.executable, "-m", "connectors.delivery_main"], cwd=str(ROOT), env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 60.0) -> "Child":
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, Path(self.log.name).read_text()
                try:
                    async with s.get(self.url + "/health", headers=self._auth()) as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("delivery child did not start:\n" + Path(self.log.name).read_text())

    def _auth(self) -> dict:
        return {}

    def stop(self, sig=None) -> int:
        import signal as _signal

        self.proc.send_signal(sig or _signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.log.close()


async def _control_loop(fake: FakeFlow) -> None:
    while True:
        try:
            fake.apply_acks()
        except Exception:
            fake._delivery = None
        await asyncio.sleep(0.005)


def _client(url: str, out: Path, **env: str) -> subprocess.Popen:
    e = dict(os.environ)
    e.update({"TAP_URL": url, "TAP_ADD_REPOS": "0", "TIMEOUT_S": "60"})
    e.update(env)
    return subprocess.Popen(["bash", str(CLIENT)], env=e, stdout=open(out, "wb"), stderr=open(str(out) + ".err", "wb"))


def _events(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.e2e
async def test_official_client_redelivery_with_fail_first(tmp_path):
    """TAP_FAIL_FIRST=1: the client rejects each first delivery; the child resends after the
    retry timeout; barriers hold; every event ends acked and deleted."""
    data = tmp_path / "data"
    fake = FakeFlow(data)
    child = await Child(data, _free_port(), TAP_RETRY_TIMEOUT="1s").ready()
    control = asyncio.create_task(_control_loop(fake))
    try:
        d1, d2 = did_n(1), did_n(2)
        ids = fake.push(d1, 1, identity=True) + fake.push(d1, 3) + fake.push(d1, 1, live=True) + fake.push(d1, 2)
        ids += fake.push(d2, 1, live=True) + fake.push(d2, 1, live=True)
        out = tmp_path / "client.out"
        proc = _client(child.url, out, TAP_FAIL_FIRST="1", TAP_COUNT_UNIQUE="1", MAX_EVENTS=str(len(ids)),
                       TAP_HEARTBEAT_MS="300")  # pings every 300 ms: a missing pong would reconnect
        code = await asyncio.to_thread(proc.wait, 60)
        evs = _events(out)
        err = Path(str(out) + ".err").read_text()
        assert code == 0, err
        assert "reconnect" not in err, err
        assert {e["id"] for e in evs} == set(ids)
        # each id failed once and was redelivered (the client exits after handling the last one)
        assert {e["id"] for e in evs if e["_delivery"] == 1} == set(ids)
        assert {e["id"] for e in evs if e["_delivery"] == 2} == set(ids)
        # per-DID rules on what the client saw: an event's first delivery never precedes the
        # ack (= second delivery) of an earlier live event, and a live event's first delivery
        # never precedes the acks of everything earlier of its DID.
        pos = {(e["id"], e["_delivery"]): i for i, e in enumerate(evs)}
        acked_at = {i: pos.get((i, 2), 10**9) for i in ids}
        by_did = {d1: ids[:7], d2: ids[7:]}
        live = set(ids[4:5]) | set(ids[7:9])
        for did, seq in by_did.items():
            for j, i in enumerate(seq):
                earlier = seq[:j]
                first = pos[(i, 1)]
                for e in earlier:
                    if e in live or i in live:
                        assert acked_at[e] < first, (did, e, i)
        await _until(lambda: fake.rows() == 0, 10.0)
    finally:
        control.cancel()
        child.stop()


@pytest.mark.e2e
async def test_official_client_survives_a_delivery_restart(tmp_path):
    """SIGTERM drops the TCP connection without a close frame: the official client reconnects to
    the next delivery process, which redelivers what was not acked."""
    data = tmp_path / "data"
    fake = FakeFlow(data)
    port = _free_port()
    child = await Child(data, port).ready()
    control = asyncio.create_task(_control_loop(fake))
    try:
        d = did_n(3)
        ids = fake.push(d, 1, live=True) + fake.push(d, 2)
        out = tmp_path / "client.out"
        proc = _client(child.url, out, TAP_ACK="0", TAP_COUNT_UNIQUE="1", MAX_EVENTS="3")
        await _until(lambda: out.exists() and len(_events(out)) >= 1, 20.0)
        assert [e["id"] for e in _events(out)] == ids[:1]
        child.stop()  # no acks were sent: everything must come again from the next process
        child = await Child(data, port).ready()
        await _until(lambda: len(_events(out)) >= 2, 20.0)
        assert proc.poll() is None, "the client must not have ended on a close frame"
        assert [e["id"] for e in _events(out)][:2] == ids[:1] * 2
        proc.terminate()
        proc.wait(10)
    finally:
        control.cancel()
        child.stop()


@pytest.mark.parametrize("frame", [b'{"type":"ack","id":0}', b'{"type":"ack","id":123}', b'{"type":"ack","id":007}',
                                   b'{"type":"ack","id":18446744073709551615}', b'{"type":"ack","id":18446744073709551616}',
                                   b'{"type":"ack","id":1 }', b'{"type":"ack","id":-1}', b'{"type":"ack","id":1}x'])
def test_ack_fast_path_agrees_with_the_parser(frame):
    """The shortcut for the official client's exact frame must decide like the full parse."""
    import connectors.channel as ch

    def slow(f):
        try:
            return ("ok", ch.parse_client_frame(f.decode()))  # str: never the fast path
        except BadFrame:
            return ("drop", None)

    def fast(f):
        try:
            return ("ok", ch.parse_client_frame(f))
        except BadFrame:
            return ("drop", None)

    assert fast(frame) == slow(frame)


async def test_client_close_frame_is_answered_and_events_stay(stack_factory):
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(19), 1, live=True)
    await c.wait(1, 1.0)
    await c.ws.close()  # client-initiated close handshake: must complete
    assert c.ws.close_code == 1000
    c2 = await Consumer.connect(s.url)
    assert [m["id"] for m in await c2.wait(1, 1.0)] == ids  # resent to the next client
    await c2.close()
    await c.session.close()


def test_event_from_row_matches_the_contract():
    from connectors.outbox_follower import event_from_row
    from store.outbox import OutboxEvent

    for shard, i, did, flags, payload in [(0, 1, "did:plc:a", 0, b"{}"), (65535, 2**64 - 1, "did:web:x.com", 7, b""),
                                          (3, 42, did_n(5), FLAG_LIVE, b'{"id":42}')]:
        k, row = outbox_key(shard, i), encode_outbox_row(did, flags, payload)
        a, b = OutboxEvent.from_row(k, row), event_from_row(k, row, shard)
        assert a == b and hash(a) == hash(b) and b.live == a.live


def _ack_batches(delivery: Database) -> dict[int, list[bytes]]:
    from store.layout import parse_ackbatch_key, split_outbox_keys

    return {parse_ackbatch_key(k): split_outbox_keys(v) for k, v in delivery.cf("acks").items()}


async def test_child_releases_ack_batches_after_the_flows_published_number(stack_factory):
    """Acks go out as batch rows; the child keeps them (and counts them against the capacity)
    until the flow publishes that it applied them, then deletes them and forgets the events."""
    from connectors.acks import acks_done

    s = await stack_factory(control=False)
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(300), 5)
    await c.wait(5, 1.0)
    await c.ack(*ids[:3])
    await _until(lambda: s.follower.awaiting_delete == 3)
    await c.ack(*ids[3:])
    await _until(lambda: s.follower.awaiting_delete == 5)
    batches = _ack_batches(s.delivery)
    assert len(batches) >= 2 and sorted(k for ks in batches.values() for k in ks) == \
        [outbox_key(shard_of(did_n(300), SHARDS), i) for i in ids]
    await asyncio.sleep(0.1)
    assert s.follower.awaiting_delete == 5 and _ack_batches(s.delivery) == batches  # nothing applied: kept
    # the flow applies only the first batch: the child releases exactly that one
    first = min(batches)
    s.fake._delivery = open_delivery_db(s.cfg.data_dir, secondary=True)
    s.fake._delivery.catch_up()
    applier = AckApplier(s.fake.db, max_keys=1)
    assert applier.apply(s.fake._delivery) == len(batches[first]) and applier.done == first
    await _until(lambda: s.follower.awaiting_delete == 5 - len(batches[first]))
    assert set(_ack_batches(s.delivery)) == set(batches) - {first}
    s.fake.applier = AckApplier(s.fake.db)  # the flow restarts: its cursor comes from meta
    assert s.fake.applier.done == first == acks_done(s.fake.db)
    assert s.fake.apply_acks() == 5 - len(batches[first])
    await _until(lambda: s.follower.awaiting_delete == 0)
    assert _ack_batches(s.delivery) == {} and s.fake.rows() == 0
    await c.close()


async def test_per_event_ack_rows_of_an_older_version_are_handled_once(stack_factory, tmp_path):
    """An upgrade over a data dir whose ``acks`` holds one row per event (previous version):
    those events are not delivered again, their rows get deleted and counted once."""
    from connectors.control import outbox_depth

    fake = FakeFlow(tmp_path, SHARDS)
    d = did_n(400)
    ids = fake.push(d, 4)
    keys = [outbox_key(shard_of(d, SHARDS), i) for i in ids]
    # the old flow had deleted (and counted) the first one; the second one it had not seen yet
    b = fake.db.batch()
    b.delete(keys[0], fake.db.handle("outbox"))
    b.put(meta_counter("outbox_acked", 0), pack_u64(1), fake.db.handle("meta"))
    fake.db.write(b)
    old = open_delivery_db(tmp_path)
    for k in keys[:2]:
        old.cf("acks")[k] = b""
    s = await stack_factory()  # the same data dir; the stack's flow side applies acks
    c = await Consumer.connect(s.url)
    assert [m["id"] for m in await c.wait(2, 1.0)] == ids[2:]  # keys[1] is acked: not again
    assert len(await c.wait(3, QUIET)) == 2
    await c.ack(*ids[2:])
    await _until(lambda: s.fake.rows() == 0)
    await _until(lambda: s.follower.awaiting_delete == 0)
    assert read_counter_acked(s.fake.db) == 4 and outbox_depth(s.fake.db) == 0  # counted once each
    assert list(s.delivery.cf("acks").keys()) == []
    await c.close()


def read_counter_acked(db: Database) -> int:
    return unpack_u64(db.cf("meta")[meta_counter("outbox_acked", 0)])


async def test_a_stalled_client_does_not_stall_the_others(stack_factory):
    """A client that stops reading holds only what its socket buffers took; the other client
    gets the rest and the API stays responsive."""
    import base64 as b64

    s = await stack_factory()
    s.channel._window = 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    key = b64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /channel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await writer.drain()
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    # from here on the raw client reads nothing: its socket buffers fill up
    await asyncio.sleep(0.05)
    ids = []
    for i in range(200):
        ids += s.fake.push(did_n(1000 + i), 100)
    await _until(lambda: s.channel.unacked == 1000 and s.follower.in_flight == len(ids), 10.0)
    stalled = s.channel.unacked
    c = await Consumer.connect(s.url)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.get(s.url + "/health") as r:
            assert r.status == 200
    assert time.monotonic() - t0 < 1.0
    got: set[int] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(got) < len(ids) - stalled:
        msgs = await c.wait(len(c.msgs) + 1, 0.5)
        new = [m["id"] for m in msgs if m["id"] not in got]
        got.update(new)
        await c.ack(*new)
    assert len(got) == len(ids) - stalled
    writer.close()
    await c.close()


async def test_window_reopens_as_the_client_acks(stack_factory):
    s = await stack_factory()
    s.channel._window = 3
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(20), 10)
    assert [m["id"] for m in await c.wait(3, 1.0)] == ids[:3]
    assert len(await c.wait(4, QUIET)) == 3  # the window is full
    await c.ack(ids[0])
    assert [m["id"] for m in await c.wait(4, 1.0)] == ids[:4]
    for _ in range(10):
        await c.ack(*[m["id"] for m in c.msgs])
        await c.wait(len(c.msgs) + 1, 0.3)
    assert sorted({m["id"] for m in c.msgs}) == ids
    await c.close()


async def test_dir_notify_wakes_on_writes_and_new_files(tmp_path):
    from runtime.dirnotify import DirNotify

    calls = []
    ev = asyncio.Event()
    n = DirNotify(tmp_path, lambda: (calls.append(1), ev.set()))
    assert n.start(asyncio.get_running_loop())  # Linux: the follower relies on it to sleep long
    try:
        f = tmp_path / "000001.log"
        f.write_bytes(b"x")  # a new file
        await asyncio.wait_for(ev.wait(), 2.0)
        ev.clear()
        with open(f, "ab") as fh:  # an append (a WAL write)
            fh.write(b"y")
        await asyncio.wait_for(ev.wait(), 2.0)
        ev.clear()
        (tmp_path / "000001.log").read_bytes()  # reading wakes nobody
        await asyncio.sleep(0.1)
        assert not ev.is_set()
    finally:
        n.close()


async def test_dir_notify_paused_keeps_changes_for_resume(tmp_path):
    """Paused (the follower is busy), writes wake nobody; resumed, what was written meanwhile
    wakes at once: no change is ever missed."""
    from runtime.dirnotify import DirNotify

    ev = asyncio.Event()
    n = DirNotify(tmp_path, ev.set)
    assert n.start(asyncio.get_running_loop())
    try:
        n.pause()
        (tmp_path / "000002.log").write_bytes(b"x")
        await asyncio.sleep(0.1)
        assert not ev.is_set()
        n.resume()
        await asyncio.wait_for(ev.wait(), 2.0)
        ev.clear()
        n.resume()  # twice is harmless
        with open(tmp_path / "000002.log", "ab") as fh:
            fh.write(b"y")
        await asyncio.wait_for(ev.wait(), 2.0)
    finally:
        n.close()
    n.pause()  # after close: harmless


async def test_busy_follower_reads_shards_in_one_offer(stack_factory):
    """A round that finds rows in several shards offers them in one call, each DID in id order."""
    s = await stack_factory()
    calls: list[list[int]] = []
    real = s.channel.offer_many
    s.channel.offer_many = lambda evs: (calls.append([e.id for e in evs]), real(evs))
    s.follower._offers = [s.channel.offer_many]
    c = await Consumer.connect(s.url)
    ids = []
    did_of = {}
    dids = [did_n(700 + i) for i in range(6)]
    assert len({shard_of(d, SHARDS) for d in dids}) > 1
    for d in dids:  # written together: the follower's next round finds them all
        for i in s.fake.push(d, 2):
            ids.append(i)
            did_of[i] = d
    msgs = await c.wait(len(ids), 2.0)
    assert sorted(m["id"] for m in msgs) == sorted(ids)
    assert calls and all(len(c_) == len(ids) for c_ in calls)  # one call for every shard's rows
    for d in dids:  # each DID in id order
        mine = [i for i in calls[0] if did_of[i] == d]
        assert mine == sorted(mine) and len(mine) == 2
    await c.ack(*ids)
    await _until(lambda: s.fake.rows() == 0)
    await c.close()


async def test_follower_reads_the_counter_vector_and_falls_back_without_it(stack_factory):
    """The follower takes the shards' outbox counters from RepoLogic's one-key copy when the
    flow wrote it, and key by key when it did not (older data): events flow either way."""
    from store.layout import META_OUTBOX_COUNTS, pack_counts

    s = await stack_factory()
    c = await Consumer.connect(s.url)
    ids = s.fake.push(did_n(900), 2) + s.fake.push(did_n(901), 1)  # per-shard counters only
    assert [m["id"] for m in await c.wait(3, 2.0)] == ids
    meta = s.fake.db.cf("meta")
    per_shard = [unpack_u64(meta.get(meta_counter("outbox", sh)) or pack_u64(0)) for sh in range(SHARDS)]
    assert list(s.follower._counts()) == per_shard
    # the vector present: it is what the follower reads (one more row counted there, and written)
    more = s.fake.push(did_n(902), 1)
    vec = [unpack_u64(meta.get(meta_counter("outbox", sh)) or pack_u64(0)) for sh in range(SHARDS)]
    b = s.fake.db.batch()
    b.put(META_OUTBOX_COUNTS, pack_counts(vec), s.fake.db.handle("meta"))
    s.fake.db.write(b)
    msgs = await c.wait(4, 2.0)
    assert [m["id"] for m in msgs][-1] == more[0]
    s.flow.catch_up()
    assert list(s.follower._counts()) == vec
    b = s.fake.db.batch()
    b.put(META_OUTBOX_COUNTS, pack_counts(vec[:-1] + [vec[-1] + 5]), s.fake.db.handle("meta"))
    s.fake.db.write(b)
    s.flow.catch_up()
    assert list(s.follower._counts())[-1] == vec[-1] + 5  # the vector wins when present
    await c.ack(*ids, *more)
    await c.close()


async def test_a_failed_shard_read_loses_and_repeats_nothing(stack_factory, monkeypatch):
    """A read that fails in one shard after others were read in the same round: the rows of
    the shards read go out (their cursors moved), the failed shard's rows are read again on the
    retry, and nothing is sent twice."""
    real = OutboxFollower._scan_rows
    failed: list[int] = []

    def flaky(sh, it, limit, prefix, skip, keys, events):
        n, k, at_end = real(sh, it, limit, prefix, skip, keys, events)
        if n and not failed and len(events) > n:  # another shard's rows are already in the round
            failed.append(sh)
            raise RuntimeError("read failed")
        return n, k, at_end

    monkeypatch.setattr(OutboxFollower, "_scan_rows", staticmethod(flaky))
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    dids = [did_n(800 + i) for i in range(6)]
    assert len({shard_of(d, SHARDS) for d in dids}) > 1
    ids = [i for d in dids for i in s.fake.push(d, 2)]
    msgs = await c.wait(len(ids), 3.0)
    assert failed
    assert sorted(m["id"] for m in msgs) == sorted(ids)  # every event, each once
    await asyncio.sleep(0.2)
    assert len(c.msgs) == len(ids)
    await c.ack(*ids)
    await _until(lambda: s.fake.rows() == 0)
    await c.close()


async def test_idle_follower_is_woken_by_the_flows_write(stack_factory):
    """Idle, the follower sleeps up to 100 ms; the flow's writes reach it while it sleeps
    (inotify) and every event still arrives."""
    from connectors.outbox_follower import POLL_IDLE_NOTIFIED

    s = await stack_factory()
    f = s.follower
    assert f._idle_max == POLL_IDLE_NOTIFIED
    seen_idle: list[bool] = []
    real = f._notify._callback
    f._notify._callback = lambda: (seen_idle.append(f._idle), real())
    c = await Consumer.connect(s.url)
    for i in range(3):
        await asyncio.sleep(0.5)  # long idle: the follower's sleep has grown to its maximum
        seen_idle.clear()
        ids = s.fake.push(did_n(500 + i), 1)
        msgs = await c.wait(i + 1, 2.0)
        assert msgs[-1]["id"] == ids[0]
        assert seen_idle and seen_idle[0]  # the write's notification found the follower asleep
        await c.ack(ids[0])
    await _until(lambda: s.fake.rows() == 0)
    await c.close()


async def test_a_run_of_new_rows_is_read_once_in_order(stack_factory):
    """A shard with a run of new rows (at least ``ITEMS_MIN``: an iteration of its own bounded to
    the shard) next to shards with a row or two (the round's shared iterator): every row once,
    each DID in id order; after a restart the same through the bounded scan of every shard,
    and rows written after that scan are found from the cursors it left."""
    s = await stack_factory()
    c = await Consumer.connect(s.url)
    d, lone = did_n(900), did_n(901)
    after = next(did_n(i) for i in range(902, 2000)  # a DID in the shard right after d's
                 if shard_of(did_n(i), SHARDS) == (shard_of(d, SHARDS) + 1) % SHARDS)
    assert shard_of(lone, SHARDS) != shard_of(d, SHARDS)
    first = s.fake.push(d, 1) + s.fake.push(after, 1)
    await c.wait(2, 1.0)  # the cursors are set
    runs: list[int] = []
    real = OutboxFollower._scan_items
    s.follower._scan_items = lambda *a: (lambda r: (runs.append(r[0]), r)[1])(real(*a))
    assert ITEMS_MIN <= 20
    per_did = {d: first[:1] + s.fake.push(d, 20), lone: s.fake.push(lone, 1), after: first[1:] + s.fake.push(after, 3)}
    ids = sorted(i for v in per_did.values() for i in v)

    def check(msgs: list[dict]) -> None:
        got = [m["id"] for m in msgs]
        assert sorted(got) == ids  # every event once
        for v in per_did.values():
            assert [i for i in got if i in v] == v  # each DID in id order

    check(await c.wait(len(ids), 2.0))
    assert 20 in runs  # the run had an iteration of its own
    await asyncio.sleep(0.1)
    assert len(c.msgs) == len(ids)
    await c.close()
    s2 = await s.restart()  # nothing acked: all again, each shard read by the bounded scan
    c2 = await Consumer.connect(s2.url)
    check(await c2.wait(len(ids), 2.0))
    more = s2.fake.push(d, 2) + s2.fake.push(after, 1)  # the cursors the scan left are right
    assert sorted(m["id"] for m in (await c2.wait(len(ids) + 3, 2.0))[len(ids):]) == more
    await asyncio.sleep(0.1)
    assert len(c2.msgs) == len(ids) + 3
    ids += more
    await c2.ack(*ids)
    await _until(lambda: s2.fake.rows() == 0)
    await c2.close()
    await s2.stop()
