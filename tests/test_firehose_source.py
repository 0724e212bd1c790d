"""FirehoseSource against a real WebSocket server sending real DAG-CBOR frames.

The server (``websockets``) runs on the test's event loop; the client runs its own loop in
its own thread, exactly as in the flow. Frames are built with ``protocol.cbor.encode``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from websockets.asyncio.server import serve

from config import Config
from connectors.firehose import META_STATS_SEQ, FirehoseClient, FirehoseSource, _FirehosePartition, decode_frame, dial_backoff
from operators.items import FirehoseAccount, FirehoseCommit, FirehoseIdentity, FirehoseSync
from protocol import cbor
from protocol.cid import cid_for_dag_cbor
from store.db import open_flow_db
from store.layout import meta_cursor_firehose, meta_firehose_applied, pack_u64, shard_of, unpack_u64

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


# --- frame builders --------------------------------------------------------------------------

def frame(t: str, body: dict) -> bytes:
    return cbor.encode({"op": 1, "t": t}) + cbor.encode(body)


def error_frame(name: str, message: str = "") -> bytes:
    return cbor.encode({"op": -1}) + cbor.encode({"error": name, "message": message})


def commit(seq: int, did: str = DID, **over) -> bytes:
    rec = cbor.encode({"$type": "app.bsky.feed.post", "text": f"post {seq}", "createdAt": "2024-01-01T00:00:00Z"})
    rcid = cid_for_dag_cbor(rec)
    body = {
        "seq": seq, "repo": did, "rev": f"3l{seq:011d}", "since": None, "commit": cbor.link(rcid),
        "blocks": b"\x0a" + b"x" * 10, "ops": [{"action": "create", "path": f"app.bsky.feed.post/{seq}",
                                               "cid": cbor.link(rcid), "prev": None}],
        "blobs": [], "rebase": False, "tooBig": False, "time": "2024-01-01T00:00:00.000Z",
        "prevData": None,
    }
    body.update(over)
    return frame("#commit", body)


def identity(seq: int, did: str = DID, handle: str | None = "alice.test") -> bytes:
    b = {"seq": seq, "did": did, "time": "2024-01-01T00:00:00.000Z"}
    if handle is not None:
        b["handle"] = handle
    return frame("#identity", b)


def account(seq: int, did: str = DID, active: bool = False, status: str | None = "deactivated") -> bytes:
    b = {"seq": seq, "did": did, "active": active, "time": "2024-01-01T00:00:00.000Z"}
    if status is not None:
        b["status"] = status
    return frame("#account", b)


def sync(seq: int, did: str = DID) -> bytes:
    return frame("#sync", {"seq": seq, "did": did, "rev": "3l000000000ab", "blocks": b"\x01\x02",
                           "time": "2024-01-01T00:00:00.000Z"})


# --- decode_frame --------------------------------------------------------------------------------

def test_decode_each_event_type():
    f = decode_frame(commit(7))
    assert f.kind == "event" and f.seq == 7 and isinstance(f.item, FirehoseCommit)
    assert f.item.did == DID and f.item.body["rev"] == "3l00000000007" and isinstance(f.item.body["blocks"], bytes)
    assert isinstance(f.item.body["ops"][0]["cid"], bytes)  # libipld: links are binary CIDs
    f = decode_frame(sync(8))
    assert isinstance(f.item, FirehoseSync) and f.item.seq == 8
    f = decode_frame(identity(9))
    assert f.item == FirehoseIdentity(seq=9, did=DID, handle="alice.test")
    assert decode_frame(identity(10, handle=None)).item.handle is None
    f = decode_frame(account(11))
    assert f.item == FirehoseAccount(seq=11, did=DID, active=False, status="deactivated")
    assert decode_frame(account(12, active=True, status=None)).item.status is None


def test_decode_info_error_and_skips():
    f = decode_frame(frame("#info", {"name": "OutdatedCursor", "message": "too old"}))
    assert (f.kind, f.name, f.message) == ("info", "OutdatedCursor", "too old")
    f = decode_frame(error_frame("FutureCursor", "Cursor in the future."))
    assert (f.kind, f.name) == ("error", "FutureCursor")
    f = decode_frame(frame("#labels", {"seq": 5, "labels": []}))
    assert f.kind == "skip" and f.seq == 5
    f = decode_frame(frame("#somethingNew", {"seq": 6}))
    assert f.kind == "skip" and f.seq == 6


@pytest.mark.parametrize("data,reason", [
    (b"\xff\xff\xff", "bad_cbor"),
    (cbor.encode({"op": 1, "t": "#commit"}), "bad_frame_shape"),
    (cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode([1, 2]), "bad_frame_shape"),
    (cbor.encode({"op": 2}) + cbor.encode({}), "bad_op"),
    (cbor.encode({"op": 1, "t": 5}) + cbor.encode({}), "bad_type"),
    (frame("#commit", {"seq": "x", "repo": DID}), "bad_seq"),
    (frame("#commit", {"seq": -4, "repo": DID}), "bad_seq"),
    (commit(1, repo="not-a-did"), "bad_did"),
    (commit(1, rev=5), "bad_rev"),
    (commit(1, blocks="text"), "bad_blocks"),
    (commit(1, ops={"a": 1}), "bad_ops"),
    (frame("#account", {"seq": 3, "did": DID, "active": "yes"}), "bad_active"),
    (frame("#account", {"seq": 3, "did": DID, "active": True, "status": 4}), "bad_status"),
    (frame("#identity", {"seq": 3, "did": DID, "handle": 4}), "bad_handle"),
    (frame("#sync", {"seq": 3, "did": DID, "rev": "x"}), "bad_blocks"),
])
def test_decode_rejects_malformed(data, reason):
    f = decode_frame(data)
    assert f.kind == "rejected" and f.name == reason


def test_rejected_frame_keeps_seq_when_readable():
    f = decode_frame(commit(44, repo="bogus"))
    assert f.kind == "rejected" and f.seq == 44


def test_dial_backoff_capped():
    assert 1 <= dial_backoff(0) < 2
    assert 2 <= dial_backoff(1) < 3
    assert 8 <= dial_backoff(3) < 9
    assert all(10 <= dial_backoff(n) < 11 for n in (4, 10, 100, 10_000))


# --- a real server ----------------------------------------------------------------------------------

class Relay:
    """A WebSocket relay whose behaviour per connection is a script of frames and actions."""

    def __init__(self) -> None:
        self.connections: list[str] = []  # request path of each connection
        self.user_agents: list[str] = []
        self.scripts: list[list] = []  # one list per connection; the last one repeats
        self.server = None
        self.port = 0

    async def handler(self, ws) -> None:
        self.connections.append(ws.request.path)
        self.user_agents.append(ws.request.headers.get("User-Agent", ""))
        i = len(self.connections) - 1
        script = self.scripts[min(i, len(self.scripts) - 1)] if self.scripts else []
        for step in script:
            if step == "close":
                return
            if step == "abort":
                ws.transport.abort()
                return
            if isinstance(step, (bytes, str)):
                await ws.send(step)
            elif isinstance(step, float):
                await asyncio.sleep(step)
            elif isinstance(step, asyncio.Event):  # the test says when to go on
                await step.wait()
        await ws.wait_closed()

    async def __aenter__(self) -> "Relay":
        self.server = await serve(self.handler, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


def make_cfg(tmp_path, port: int, **over) -> Config:
    base = Config(relay_url=f"http://127.0.0.1:{port}", data_dir=str(tmp_path / "data"), cursor_save_interval=0.05,
                  outbox_capacity=1000)
    return replace(base, **over)


async def wait_for(cond, timeout: float = 5.0, step: float = 0.01):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


def drain_all(client: FirehoseClient) -> list:
    return client.drain(100_000)


async def test_frames_arrive_in_order_without_cursor(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[identity(1), account(2), commit(3), sync(4), frame("#info", {"name": "OutdatedCursor"}),
                          commit(5)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.pending() >= 5)
            got = drain_all(c)
        finally:
            c.stop()
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    assert [type(i).__name__ for _, i in got] == ["FirehoseIdentity", "FirehoseAccount", "FirehoseCommit",
                                                    "FirehoseSync", "FirehoseCommit"]
    assert relay.connections == ["/xrpc/com.atproto.sync.subscribeRepos"]
    assert relay.user_agents[0].startswith("tapflow/")
    assert c.stats["info"] == 1 and c.received_seq == 5


async def test_stored_cursor_is_sent_and_no_replay_ignores_it(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(101)]]
        cfg = make_cfg(tmp_path, relay.port)
        db = open_flow_db(cfg.data_dir)
        db.cf("meta")[meta_cursor_firehose(cfg.relay_url)] = pack_u64(100)
        c = FirehoseClient(cfg, db, depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.pending() >= 1)
        finally:
            c.stop()
        assert relay.connections[-1] == "/xrpc/com.atproto.sync.subscribeRepos?cursor=100"
        c2 = FirehoseClient(replace(cfg, no_replay=True), db, depth=lambda: 0)
        assert c2.dial_cursor() == 0
        c2.start()
        try:
            await wait_for(lambda: c2.pending() >= 1)
        finally:
            c2.stop()
        assert relay.connections[-1] == "/xrpc/com.atproto.sync.subscribeRepos"


async def test_reconnects_at_once_after_a_drop_and_resumes_after_last_seq(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(1), commit(2), commit(3), "abort"], [commit(4), "close"], [commit(5)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0)
        t0 = time.monotonic()
        c.start()
        try:
            await wait_for(lambda: c.pending() >= 5)
            took = time.monotonic() - t0
        finally:
            c.stop()
    assert [s for s, _ in drain_all(c)] == [1, 2, 3, 4, 5]
    assert relay.connections[1:] == ["/xrpc/com.atproto.sync.subscribeRepos?cursor=3",
                                     "/xrpc/com.atproto.sync.subscribeRepos?cursor=4"]
    assert took < 1.0, f"reconnect was not immediate ({took:.2f}s)"
    assert c.stats["connects"] == 3 and c.stats["dial_failures"] == 0


async def test_dial_failures_back_off(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = FirehoseClient(make_cfg(tmp_path, port), depth=lambda: 0, open_timeout=1)
    c.start()
    try:
        await asyncio.sleep(2.5)
    finally:
        c.stop()
    # 1st failure waits 1-2 s, 2nd 2-3 s: two or three dials in 2.5 s, never a tight loop
    assert 2 <= c.stats["dial_failures"] <= 3, c.stats


async def test_frame_metrics_reach_prometheus_in_batches(tmp_path):
    """Frame and event counts and the last seq are added to Prometheus once per
    ``METRICS_FLUSH``, not per frame, and none is lost."""
    from prometheus_client import REGISTRY

    from connectors.firehose import METRICS_FLUSH

    def sample(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (sample("tapflow_firehose_frames_total", type="commit"), sample("tapflow_firehose_frames_total", type="identity"),
              sample("tap_firehose_events_received_total"))
    async with Relay() as relay:
        relay.scripts = [[commit(1), identity(2), commit(3), commit(4), frame("#info", {"name": "OutdatedCursor"})]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.stats["info"] == 1)
            await asyncio.sleep(METRICS_FLUSH * 3)
        finally:
            c.stop()
    after = (sample("tapflow_firehose_frames_total", type="commit"), sample("tapflow_firehose_frames_total", type="identity"),
             sample("tap_firehose_events_received_total"))
    assert [a - b for a, b in zip(after, before)] == [3, 1, 4]
    assert sample("tap_firehose_last_seq") == 4


async def test_error_frames_are_counted_and_reconnect(tmp_path):
    async with Relay() as relay:
        relay.scripts = [
            [commit(10), error_frame("ConsumerTooSlow", "too slow"), 0.5],
            [commit(11), error_frame("FutureCursor", "Cursor in the future."), 0.5],
            [commit(500)],
        ]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.pending() >= 3, timeout=8)
        finally:
            c.stop()
    assert [s for s, _ in drain_all(c)] == [10, 11, 500]
    assert c.stats["error_frames"] == 2 and c.last_error == ("FutureCursor", "Cursor in the future.")
    # after ConsumerTooSlow: resume after the last seq; after FutureCursor: the live head
    assert relay.connections[1] == "/xrpc/com.atproto.sync.subscribeRepos?cursor=10"
    assert relay.connections[2] == "/xrpc/com.atproto.sync.subscribeRepos"


async def test_malformed_frames_are_skipped_and_counted(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(1), b"\xff\x00garbage", commit(2, repo="nope"), "a text frame",
                          frame("#labels", {"seq": 3}), commit(4)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.received_seq == 4)
        finally:
            c.stop()
    got = drain_all(c)
    assert [(s, type(i).__name__) for s, i in got] == [(1, "FirehoseCommit"), (2, "NoneType"), (3, "NoneType"),
                                                       (4, "FirehoseCommit")]
    assert c.stats["rejected"] == 3 and c.stats["skipped"] == 1 and c.stats["connects"] == 1


async def test_emit_rejected_puts_rejections_in_the_stream(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(1, repo="nope"), commit(2)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0, emit_rejected=True)
        c.start()
        try:
            await wait_for(lambda: c.pending() >= 2)
        finally:
            c.stop()
    (s1, r), (s2, ok) = drain_all(c)
    assert type(r).__name__ == "Rejected" and r.reason == "bad_did" and r.source == "firehose" and s1 == 1
    assert isinstance(ok, FirehoseCommit)


async def test_oversized_frame_is_skipped_without_wedging(tmp_path):
    big = commit(2, blocks=b"\x00" * 5000)
    async with Relay() as relay:
        relay.scripts = [[commit(1), big, commit(3)], [big, commit(3), commit(4)], [commit(3), commit(4)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port, max_frame_size=1024), depth=lambda: 0)
        c.start()
        try:
            await wait_for(lambda: c.received_seq == 4)
        finally:
            c.stop()
    got = [(s, type(i).__name__) for s, i in drain_all(c)]
    assert got == [(1, "FirehoseCommit"), (2, "NoneType"), (3, "FirehoseCommit"), (4, "FirehoseCommit")]
    assert relay.connections[1].endswith("?cursor=1")
    assert c.stats["rejected"] == 1  # one oversized frame, counted once


async def test_outbox_backpressure_holds_reading(tmp_path):
    depth = {"n": 5000}
    async with Relay() as relay:
        relay.scripts = [[commit(i) for i in range(1, 51)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port, outbox_capacity=100), depth=lambda: depth["n"])
        c.start()
        try:
            await asyncio.sleep(0.5)
            assert c.pending() == 0 and c.held and relay.connections == []  # not even dialled
            depth["n"] = 10
            await wait_for(lambda: c.pending() == 50)
            assert not c.held
        finally:
            c.stop()


async def test_outbox_backpressure_reads_meta_counters(tmp_path):
    """The real depth: sum(count/outbox/*) - count/outbox_acked/0 from meta."""
    from connectors.control import outbox_depth
    from store.layout import meta_counter

    cfg = make_cfg(tmp_path, 1)
    db = open_flow_db(cfg.data_dir)
    meta = db.cf("meta")
    meta[meta_counter("outbox", 0)] = pack_u64(70)
    meta[meta_counter("outbox", 9)] = pack_u64(50)
    meta[meta_counter("outbox_acked", 0)] = pack_u64(30)
    meta[meta_counter("outboxx", 0)] = pack_u64(999)  # another counter sharing the prefix text
    assert outbox_depth(db) == 90


async def test_local_queue_bound_holds_reading(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(i) for i in range(1, 201)]]
        c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0, queue_max=50)
        c.start()
        try:
            await asyncio.sleep(0.3)
            assert 50 <= c.pending() <= 51
            got = drain_all(c)
            t = time.monotonic()
            while len(got) < 200 and time.monotonic() - t < 5:
                await asyncio.sleep(0.01)
                assert c.pending() <= 51
                got += drain_all(c)
        finally:
            c.stop()
    assert [s for s, _ in got] == list(range(1, 201))


async def test_partition_emits_saves_cursor_and_stats(tmp_path):
    async with Relay() as relay:
        relay.scripts = [[commit(1), commit(2, repo="bad"), identity(3)]]
        cfg = make_cfg(tmp_path, relay.port)
        db = open_flow_db(cfg.data_dir)
        part = FirehoseSource(cfg, db).build_part("firehose", "firehose", None)
        try:
            items: list = []
            t = time.monotonic()
            while len(items) < 2 and time.monotonic() - t < 5:
                items += part.next_batch()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            part.next_batch()  # past the save interval
            meta = db.cf("meta")
            # no RepoLogic applied the items: the cursor stays before the first of them
            assert meta.get(meta_cursor_firehose(cfg.relay_url)) is None
            assert unpack_u64(meta[META_STATS_SEQ]) == 3  # received, for /stats/cursors
            applied = meta_firehose_applied(shard_of(DID, cfg.shards))
            db.cf("meta")[applied] = pack_u64(1)  # what RepoLogic writes with the item of seq 1
            part.save_cursor()
            assert unpack_u64(meta[meta_cursor_firehose(cfg.relay_url)]) == 2  # 2 carried no item
            db.cf("meta")[applied] = pack_u64(3)
            part.save_cursor()
            assert unpack_u64(meta[meta_cursor_firehose(cfg.relay_url)]) == 3
            assert part.next_awake() is not None  # idle: no busy spin
        finally:
            part.close()
    assert [type(i).__name__ for i in items] == ["FirehoseCommit", "FirehoseIdentity"]


def test_partition_in_outbox_only_mode_does_nothing(tmp_path):
    cfg = make_cfg(tmp_path, 1, outbox_only=True)
    part = FirehoseSource(cfg).build_part("firehose", "firehose", None)
    assert part.next_batch() == []
    assert not part._c._thread.alive
    part.close()


def test_in_a_real_bytewax_flow(tmp_path):
    """The source inside bytewax: run_main until the partition raises StopIteration after 3 items."""
    import threading

    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    loop = asyncio.new_event_loop()
    relay = Relay()
    relay.scripts = [[commit(1), identity(2), account(3)]]
    loop.run_until_complete(relay.__aenter__())
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        cfg = make_cfg(tmp_path, relay.port)

        class Stopping(_FirehosePartition):
            n = 0

            def next_batch(self):
                if Stopping.n >= 3:
                    raise StopIteration
                items = super().next_batch()
                Stopping.n += len(items)
                return items

        class Src(FirehoseSource):
            def build_part(self, step_id, for_part, resume_state):
                return Stopping(FirehoseClient(self.cfg), 100, 0.005)

        out: list = []
        flow = Dataflow("fh")
        s = op.input("in", flow, Src(cfg))
        op.output("out", op.map("name", s, lambda x: (type(x).__name__, x.seq)), TestingSink(out))
        run_main(flow)
        assert out == [("FirehoseCommit", 1), ("FirehoseIdentity", 2), ("FirehoseAccount", 3)]
        # no RepoLogic in this flow: nothing was applied, so no cursor passes the items
        assert open_flow_db(cfg.data_dir).cf("meta").get(meta_cursor_firehose(cfg.relay_url)) is None
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(2)


# --- against the real PDS harness -------------------------------------------------------------------

@pytest.mark.e2e
async def test_real_pds_firehose_live_replay_and_future_cursor(pds, tmp_path):
    """Live frames from a real PDS decode without a rejection, per DID and type as the scenario
    reports; a stored cursor replays from there; a cursor in the future (FutureCursor error
    frame) falls back to the live head."""
    cfg = Config(relay_url=pds.url, data_dir=str(tmp_path / "data"))
    db = open_flow_db(cfg.data_dir)
    c = FirehoseClient(cfg, db, depth=lambda: 0)
    c.start()
    try:
        await wait_for(lambda: c.connected, timeout=10)
        scen = await asyncio.to_thread(pds.script, "scenario.mjs")
        live = [d for d, r in scen["repos"].items() if r["status"] != "deleted"]
        want = {(d, t): n for d in live for t, n in scen["repos"][d]["events"].items()}

        def mine():
            got: dict = {}
            for _, item in list(c._queue):
                if item is not None and item.did in live:
                    k = (item.did, "#" + type(item).__name__[len("Firehose"):].lower())
                    got[k] = got.get(k, 0) + 1
            return got

        await wait_for(lambda: mine() == want, timeout=20)
        assert c.stats["rejected"] == 0 and c.stats["error_frames"] == 0
        got = drain_all(c)
    finally:
        c.stop()
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs)
    commits = [i for _, i in got if isinstance(i, FirehoseCommit)]
    assert all(isinstance(i.body["blocks"], bytes) and i.body["blocks"] for i in commits)
    # replay from a stored cursor in the middle
    mid = seqs[len(seqs) // 2]
    db.cf("meta")[meta_cursor_firehose(cfg.relay_url)] = pack_u64(mid)
    c2 = FirehoseClient(cfg, db, depth=lambda: 0)
    c2.start()
    try:
        await wait_for(lambda: c2.received_seq >= seqs[-1], timeout=20)
    finally:
        c2.stop()
    replayed = [s for s, _ in drain_all(c2)]
    # the deleted account's events are gone from the PDS's sequencer: compare the others
    kept = [s for s, i in got if s > mid and i is not None and i.did in live]
    assert replayed[0] > mid and set(kept) <= set(replayed)
    # a cursor far in the future: the PDS answers FutureCursor; we go to the live head
    db.cf("meta")[meta_cursor_firehose(cfg.relay_url)] = pack_u64(10**12)
    c3 = FirehoseClient(cfg, db, depth=lambda: 0)
    c3.start()
    try:
        await wait_for(lambda: c3.stats["error_frames"] >= 1 and c3.connected and c3.cursor_used[-1] == 0, timeout=20)
    finally:
        c3.stop()
    assert c3.last_error[0] == "FutureCursor" and c3.cursor_used[0] == 10**12


# --- #commit pre-verification (runtime.procpool; inline here: no pool started) ---------------

def _signed_commit_frames():
    """A genuine #commit frame of a RepoSim repo, and one of the same DID signed by another key."""
    from bench.gen import RepoSim

    sim = RepoSim.create(n_records=5, seed=3)
    post = cbor.encode({"$type": "app.bsky.feed.post", "text": "hi", "createdAt": "2024-01-01T00:00:00.000Z"})
    good = sim.commit([("create", "app.bsky.feed.post/3kpreverify001", post)]).frame(seq=1)
    mallory = RepoSim.create(n_records=0, seed=99, did=sim.did)
    mallory.micros = sim.micros + 10**9
    forged = mallory.commit([("create", "app.bsky.feed.post/3kpreverify002", post)]).frame(seq=3)
    return sim, good, forged


async def test_commits_are_preverified_with_the_key_repologic_holds(tmp_path):
    from operators.repo import RepoState
    from operators.verify import KeyCache, PreVerified

    sim, good, forged = _signed_commit_frames()
    key = sim.key.public_key.multibase()
    async with Relay() as relay:
        relay.scripts = [[good, commit(2), forged, identity(4)]]
        cfg = make_cfg(tmp_path, relay.port)
        db = open_flow_db(cfg.data_dir)
        # the key comes from the stored repo state on a miss (RepoLogic's, committed)
        db.cf("repos")[sim.did.encode()] = RepoState(state="active", signing_key=key).to_json()
        keys = KeyCache()
        c = FirehoseClient(cfg, db, depth=lambda: 0, preverify=True, keys=keys)
        c.start()
        got: list = []
        try:
            await wait_for(lambda: got.extend(drain_all(c)) or len(got) >= 4)  # verdicts come a bit later
        finally:
            c.stop()
    assert [s for s, _ in got] == [1, 2, 3, 4]
    first, unknown, bad = got[0][1], got[1][1], got[2][1]
    assert isinstance(first.pre, PreVerified) and first.pre.key == key
    assert first.pre.result[0] is True and first.pre.result[1:3] == (sim.did, first.body["rev"])
    assert unknown.pre is None  # no key known for that DID: RepoLogic decides
    assert bad.pre.result[:2] == (False, "bad_signature")
    assert keys.get(sim.did) == key and keys.get(DID) == ""  # both cached, the miss as "no key"
    assert c.stats["preverify_frames"] == 2


def test_drain_holds_everything_behind_a_commit_still_in_the_pool(tmp_path):
    """Frames reach RepoLogic in firehose order and the saved cursor never passes a frame not
    yet emitted, while a #commit waits for its verdict."""
    from concurrent.futures import Future

    from connectors.firehose import _Slot
    from operators.verify import PreVerified

    cfg = make_cfg(tmp_path, 9)  # nothing listens: the client's dials fail in the background
    db = open_flow_db(cfg.data_dir)
    client = FirehoseClient(cfg, db, depth=lambda: 0)
    part = _FirehosePartition(client, 100, 0.005)
    try:
        item = decode_frame(commit(2)).item
        slot = _Slot("zKey")
        item.pre = slot
        client._queue.extend([(1, decode_frame(identity(1)).item), (2, item), (3, decode_frame(identity(3)).item)])
        assert [type(i).__name__ for i in part.next_batch()] == ["FirehoseIdentity"]
        assert part.next_batch() == [] and not client.ready()  # not even submitted yet
        fut: Future = Future()
        slot.fut = fut
        assert part.next_batch() == []  # submitted, no verdict
        wake = part.next_awake()
        assert wake is not None and (wake - __import__("datetime").datetime.now(wake.tzinfo)).total_seconds() < 0.01
        applied = meta_firehose_applied(shard_of(DID, cfg.shards))
        db.cf("meta")[applied] = pack_u64(1)  # RepoLogic applied the identity of seq 1
        part.save_cursor()
        assert unpack_u64(db.cf("meta")[meta_cursor_firehose(cfg.relay_url)]) == 1
        fut.set_result([(False, "bad_signature", "commit signature does not verify")])
        out = part.next_batch()
        assert [type(i).__name__ for i in out] == ["FirehoseCommit", "FirehoseIdentity"]
        assert out[0].pre == PreVerified("zKey", (), (False, "bad_signature", "commit signature does not verify"))
        part.save_cursor()
        assert unpack_u64(db.cf("meta")[meta_cursor_firehose(cfg.relay_url)]) == 1  # 2 and 3 not applied yet
        db.cf("meta")[applied] = pack_u64(3)
        part.save_cursor()
        assert unpack_u64(db.cf("meta")[meta_cursor_firehose(cfg.relay_url)]) == 3
        # a pool that failed (broken, stopped) gives "no verdict": RepoLogic verifies inline
        item2 = decode_frame(commit(4)).item
        item2.pre = slot2 = _Slot("zKey")
        broken: Future = Future()
        broken.set_exception(RuntimeError("pool broken"))
        slot2.fut = broken
        client._queue.append((4, item2))
        assert part.next_batch()[0].pre.result is None
    finally:
        part.close()


def test_drains_wait_for_verdicts_while_the_lanes_are_behind(tmp_path):
    """Lanes behind by drain_min frames or more: the verdicts already in are applied drain_min
    at a time (or after drain_hold), not one lane answer at a time; a backlog below drain_min
    (the lanes keep up) is drained at once. The bytewax side looks again when a lane's answer
    is due, not every half millisecond."""
    import time as _time
    from datetime import datetime

    from connectors.firehose import _Answer, _Slot

    cfg = make_cfg(tmp_path, 9)  # nothing listens: the client's dials fail in the background
    db = open_flow_db(cfg.data_dir)
    client = FirehoseClient(cfg, db, depth=lambda: 0, drain_min=8, drain_hold=0.3)
    part = _FirehosePartition(client, 100, 0.005)
    try:
        # (the frames in the lanes sit in the queue too; here the queue holds only ready items,
        # so ``_in_lanes`` stands for frames queued behind them)
        client._queue.extend((i, decode_frame(identity(i)).item) for i in range(1, 12))
        client._in_lanes = 7  # behind by less than drain_min: no waiting
        assert [i.seq for i in part.next_batch()] == list(range(1, 12))
        client._queue.extend((i, decode_frame(identity(i)).item) for i in range(12, 24))
        client._in_lanes = 8  # behind: 12 queued, 8 of them in the lanes, 4 ready: wait for 8
        assert part.next_batch() == [] and client.ready()
        wake = part.next_awake()
        assert wake is not None and 0 < (wake - datetime.now(wake.tzinfo)).total_seconds() <= 0.01
        client._queue.extend((i, decode_frame(identity(i)).item) for i in range(24, 28))
        assert [i.seq for i in part.next_batch()] == list(range(12, 28))  # 8 ready: drained
        client._queue.extend((i, decode_frame(identity(i)).item) for i in range(28, 40))
        assert part.next_batch() == []
        _time.sleep(0.35)  # drain_hold passed: what is in goes on
        assert [i.seq for i in part.next_batch()] == list(range(28, 40))
        # the next look at a commit in a lane: when its answer is due
        client._in_lanes = 0
        item = decode_frame(commit(40)).item
        item.pre = slot = _Slot("zKey")
        client._queue.append((40, item))
        wake = part.next_awake()  # not sent yet: a look every few ms
        assert 0 < (wake - datetime.now(wake.tzinfo)).total_seconds() <= 0.005
        slot.fut = ans = _Answer()
        ans.eta = _time.monotonic() + 0.015
        wake = part.next_awake()
        assert 0.01 < (wake - datetime.now(wake.tzinfo)).total_seconds() <= 0.016
        ans.set_result([(False, "bad_signature", "commit signature does not verify")])
        assert part.next_awake() is None and [i.seq for i in part.next_batch()] == [40]
    finally:
        part.close()


def _frames_keys_and_one_lane():
    """A good and a forged signed ``#commit`` frame, a key cache that knows the repo's key, and the
    real pool started with one worker and one lane (the caller stops it)."""
    from operators.verify import KeyCache
    from runtime import procpool

    sim, good, forged = _signed_commit_frames()
    keys = KeyCache()
    keys.note(sim.did, sim.key.public_key.multibase())
    assert procpool.start_pool(1) == 1
    return good, forged, keys


async def test_verdicts_from_a_worker_process_and_its_death(tmp_path):
    """The real pool: a spawned worker gives the verdicts; once it is gone, frames go without
    one (RepoLogic verifies inline) and the stream goes on."""
    import os
    import signal as _signal

    from runtime import procpool

    good, forged, keys = _frames_keys_and_one_lane()
    try:
        lane = procpool.lanes()[0]
        async with Relay() as relay:
            later = frame("#commit", {**cbor.decode_multi(good)[1], "seq": 5})
            gate = asyncio.Event()  # the later frames come only once the worker is dead
            relay.scripts = [[good, forged, gate, later, identity(6)]]
            c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0, keys=keys, respawn_lanes=False)
            assert c._preverify  # on by default while the pool runs
            c.start()
            got: list = []
            try:
                await wait_for(lambda: got.extend(drain_all(c)) or len(got) >= 2, timeout=20)
                assert got[0][1].pre.result[0] is True and got[1][1].pre.result[:2] == (False, "bad_signature")
                os.kill(lane.proc.pid, _signal.SIGKILL)
                lane.proc.join(5)
                gate.set()
                await wait_for(lambda: got.extend(drain_all(c)) or len(got) >= 4, timeout=20)
            finally:
                c.stop()
        assert [s for s, _ in got] == [1, 3, 5, 6]
        # no verdict: RepoLogic verifies it itself (the loop sees the worker's pipe close at
        # once, so the frame is not even sent; were it sent before, its verdict would be None)
        pre = got[2][1].pre
        assert pre is None or pre.result is None
        assert not c._preverify
    finally:
        procpool.stop_pool()
    assert not procpool.pool_running()


async def test_a_dead_lane_is_replaced_and_verdicts_come_back(tmp_path):
    """A lane whose worker died is replaced by a new process: after the frames sent meanwhile
    (no verdict: RepoLogic verifies them), verdicts come from the new lane again, with no restart
    of the flow. Before, live verification stayed in the flow process until a restart."""
    import os
    import signal as _signal

    from prometheus_client import REGISTRY

    from runtime import procpool

    respawned = ("tapflow_verify_lanes_respawned_total", {})
    n0 = REGISTRY.get_sample_value(*respawned) or 0.0
    good, forged, keys = _frames_keys_and_one_lane()
    try:
        lane = procpool.lanes()[0]
        body = cbor.decode_multi(good)[1]
        async with Relay() as relay:
            gate = asyncio.Event()  # the later frames come once the new lane is up
            later = [frame("#commit", {**body, "seq": s}) for s in (5, 6)]
            relay.scripts = [[good, gate, *later]]
            c = FirehoseClient(make_cfg(tmp_path, relay.port), depth=lambda: 0, keys=keys)
            c.start()
            got: list = []
            try:
                await wait_for(lambda: got.extend(drain_all(c)) or len(got) >= 1, timeout=20)
                assert got[0][1].pre.result[0] is True
                os.kill(lane.proc.pid, _signal.SIGKILL)
                await wait_for(lambda: procpool.lanes()[0] is not lane and c._lanes[0] is not lane
                               and not c._gone, timeout=20)
                assert c._preverify
                gate.set()
                await wait_for(lambda: got.extend(drain_all(c)) or len(got) >= 3, timeout=30)
            finally:
                gate.set()  # (a failed wait must not leave the relay's script waiting)
                c.stop()
        assert [s for s, _ in got] == [1, 5, 6]
        assert all(item.pre is not None and item.pre.result[0] is True for _, item in got[1:])  # the new lane's
        assert REGISTRY.get_sample_value(*respawned) == n0 + 1
        assert not lane.proc.is_alive() and procpool.lanes()[0].proc.is_alive()
    finally:
        procpool.stop_pool()
    assert not procpool.pool_running()


async def test_frames_waiting_for_a_lane_get_no_verdict_when_the_last_lane_dies(tmp_path):
    """Frames queued for a busy lane when its worker dies are not left waiting: they resolve to
    "no verdict" (RepoLogic verifies them inline), so the drain never stalls behind them."""
    import asyncio
    import os
    import signal as _signal

    from runtime import procpool

    good, _, keys = _frames_keys_and_one_lane()
    try:
        lane = procpool.lanes()[0]
        cfg = make_cfg(tmp_path, 9)
        c = FirehoseClient(cfg, open_flow_db(cfg.data_dir), depth=lambda: 0, keys=keys, verify_hold=0.001,
                           respawn_lanes=False)
        body = cbor.decode_multi(good)[1]
        items = []
        for seq in range(1, 41):  # 16+ go at once to the lane, the rest wait for it
            data = frame("#commit", {**body, "seq": seq})
            item = decode_frame(data).item
            c._pre_submit(item, data)
            items.append(item)
        await asyncio.sleep(0.01)
        assert c.stats["preverify_batches"] == 1 and c._vbatch  # the lane is busy, frames wait
        os.kill(lane.proc.pid, _signal.SIGKILL)
        lane.proc.join(5)
        for _ in range(200):
            if all(i.pre.fut is not None and i.pre.fut.done() for i in items):
                break
            await asyncio.sleep(0.01)
        c._queue.extend((i.seq, i) for i in items)
        out = c.drain(100)
        assert [s for s, _ in out] == list(range(1, 41))
        assert all(i.pre.result is None for _, i in out)  # no verdict: RepoLogic verifies inline
        assert not c._preverify and not c._vbatch
    finally:
        procpool.stop_pool()
