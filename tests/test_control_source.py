"""ControlSource against real RocksDB: the delivery database's primary lives in a child
process (as the delivery child does in production); the flow side follows it as secondary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from config import Config
from connectors.control import OUTBOX_ACKED, ControlFollower, ControlSource, outbox_depth, read_counter
from operators.items import AddRepo, RemoveRepo
from store.db import close_all, open_flow_db
from store.layout import (
    META_ACKS_DONE,
    META_CONTROL_CURSOR,
    decode_counter,
    encode_outbox_row,
    meta_cmd_applied,
    meta_counter,
    outbox_key,
    pack_u64,
    shard_of,
    unpack_u64,
)

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, json, orjson
from store.db import open_delivery_db
from store.layout import ackbatch_key, command_key
db = open_delivery_db(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    b = db.batch()
    for seq, op, dids in msg.get("cmds", []):
        b.put(command_key(seq), orjson.dumps({"op": op, "dids": dids}), db.handle("commands"))
    for n, keys in msg.get("batches", []):  # ack batches, as connectors.acks.AckLog writes them
        b.put(ackbatch_key(n), b"".join(bytes.fromhex(k) for k in keys), db.handle("acks"))
    db.write(b, sync=True)
    print("ok", flush=True)
"""


class DeliveryChild:
    """The delivery database's primary writer, in its own process."""

    def __init__(self, data_dir: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, data_dir], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self.p.stdout.readline().strip() == "ready"

    def send(self, **msg) -> None:
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


@pytest.fixture
def cfg(tmp_path) -> Config:
    return Config(data_dir=str(tmp_path / "data"), shards=8)


@pytest.fixture
def child(cfg):
    c = DeliveryChild(cfg.data_dir)
    yield c
    c.close()


def applied(flow, shard: int, seq: int) -> None:
    flow.cf("meta")[meta_cmd_applied(shard)] = pack_u64(seq)


def poll_until(f: ControlFollower, n: int, timeout: float = 5.0) -> list:
    out: list = []
    t = time.monotonic()
    while len(out) < n and time.monotonic() - t < timeout:
        out += f.poll()
        time.sleep(0.005)
    return out


def test_waits_for_the_delivery_database(cfg):
    f = ControlFollower(cfg)
    assert f.poll() == [] and f.delivery is None
    child = DeliveryChild(cfg.data_dir)
    try:
        child.send(cmds=[[1, "add", ["did:plc:a"]]])
        time.sleep(0.15)  # the follower retries opening every 100 ms
        assert poll_until(f, 1) == [AddRepo("did:plc:a", 1)]
    finally:
        child.close()


def test_commands_become_one_item_per_did(cfg, child):
    child.send(cmds=[[1, "add", ["did:plc:a", "did:plc:b", "did:plc:a", 7, ""]],
                     [2, "remove", ["did:plc:b"]],
                     [3, "frobnicate", ["did:plc:c"]],
                     [4, "add", "did:plc:notalist"],
                     [5, "add", []]])
    f = ControlFollower(cfg)
    items = poll_until(f, 3)
    assert items == [AddRepo("did:plc:a", 1), AddRepo("did:plc:b", 1), RemoveRepo("did:plc:b", 2)]
    assert f.emitted == 5


def test_cursor_advances_only_over_applied_commands(cfg, child):
    flow = open_flow_db(cfg.data_dir)
    a, b = "did:plc:aaaa", "did:plc:bbbbbbbb"
    sa, sb = shard_of(a, cfg.shards), shard_of(b, cfg.shards)
    assert sa != sb
    child.send(cmds=[[1, "add", [a, b]], [2, "add", [a]], [3, "unknown", []]])
    f = ControlFollower(cfg)
    assert len(poll_until(f, 3)) == 3
    assert f.cursor == 0 and flow.cf("meta").get(META_CONTROL_CURSOR) is None
    applied(flow, sa, 2)  # shard of a applied 1 and 2; shard of b nothing yet
    f.poll()
    assert f.cursor == 0
    applied(flow, sb, 1)
    f.poll()
    assert f.cursor == 3  # 1 and 2 fully applied; 3 touches no shard
    assert unpack_u64(flow.cf("meta")[META_CONTROL_CURSOR]) == 3
    assert f.pending_commands == 0


def test_restart_replays_unapplied_commands_only(cfg, child):
    flow = open_flow_db(cfg.data_dir)
    a = "did:plc:aaaa"
    child.send(cmds=[[1, "add", [a]], [2, "remove", [a]]])
    f = ControlFollower(cfg)
    assert len(poll_until(f, 2)) == 2
    applied(flow, shard_of(a, cfg.shards), 1)
    f.poll()
    assert f.cursor == 1
    # a new follower (restart) starts after the persisted cursor
    f2 = ControlFollower(cfg)
    assert poll_until(f2, 1) == [RemoveRepo(a, 2)]


def put_outbox(flow, n: int, shard: int = 3) -> list[bytes]:
    keys = [outbox_key(shard, i) for i in range(1, n + 1)]
    b = flow.batch()
    for k in keys:
        b.put(k, encode_outbox_row("did:plc:x", 0, b'{"id":1}'), flow.handle("outbox"))
    b.put(meta_counter("outbox", shard), pack_u64(n), flow.handle("meta"))
    flow.write(b)
    return keys


def present(flow, keys: list[bytes]) -> list[bytes]:
    return [k for k in keys if flow.cf("outbox").get(k) is not None]


def test_ack_batches_delete_outbox_rows_and_count_once(cfg, child):
    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 10)
    assert outbox_depth(flow) == 10
    f = ControlFollower(cfg)
    child.send(batches=[[1, [k.hex() for k in keys[:4]] + [outbox_key(3, 999).hex()]]])  # one never existed
    poll_until_done(f, 1)
    assert present(flow, keys) == keys[4:]
    assert read_counter(flow, OUTBOX_ACKED) == 4 and outbox_depth(flow) == 6
    assert decode_counter(flow.cf("meta").get(META_ACKS_DONE)) == 1  # published for the child
    f.poll()  # nothing new: nothing more is counted
    assert read_counter(flow, OUTBOX_ACKED) == 4
    # after a restart the follower starts after its persisted cursor
    f2 = ControlFollower(cfg)
    assert f2.acks.done == 1
    child.send(batches=[[2, [keys[4].hex()]]])
    poll_until_done(f2, 2)
    assert read_counter(flow, OUTBOX_ACKED) == 5 and outbox_depth(flow) == 5


def test_replayed_batches_are_not_counted_twice(cfg, child):
    """A batch applied again (as after a crash that lost the cursor, or acks of rows an older
    flow already deleted) deletes nothing more and counts only rows actually present."""
    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 10)
    child.send(batches=[[1, [k.hex() for k in keys[:6]]], [2, [k.hex() for k in keys[6:8]]]])
    f = ControlFollower(cfg)
    poll_until_done(f, 2)
    assert read_counter(flow, OUTBOX_ACKED) == 8 and present(flow, keys) == keys[8:]
    flow.cf("meta")[META_ACKS_DONE] = pack_u64(0)  # both batches are seen again
    f2 = ControlFollower(cfg)
    poll_until_done(f2, 2)
    assert read_counter(flow, OUTBOX_ACKED) == 8 and outbox_depth(flow) == 2
    # a batch there at the start naming deleted and present rows counts the present ones only
    child.send(batches=[[3, [k.hex() for k in keys[5:]]]])
    f3 = ControlFollower(cfg)
    poll_until_done(f3, 3)
    assert read_counter(flow, OUTBOX_ACKED) == 10 and outbox_depth(flow) == 0 and present(flow, keys) == []


def test_only_batches_that_may_name_deleted_rows_are_read(cfg, child):
    """Rows are looked up for batches there when the flow first looked (written before a crash
    or a power loss) and for batches converted from per-event rows (``LEGACY_MARK``); a batch
    the child writes while the flow runs names rows it read, each once: counted without a read."""
    from connectors.acks import LEGACY_MARK

    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 12)
    child.send(batches=[[1, [k.hex() for k in keys[:3]]]])
    f = ControlFollower(cfg)
    poll_until_done(f, 1)
    assert f.acks.checked == 3 and read_counter(flow, OUTBOX_ACKED) == 3
    child.send(batches=[[2, [k.hex() for k in keys[3:6]]], [3, [k.hex() for k in keys[6:8]]]])
    poll_until_done(f, 3)
    assert f.acks.checked == 3 and read_counter(flow, OUTBOX_ACKED) == 8 and present(flow, keys) == keys[8:]
    # a converted batch may name rows the older version deleted: read, present ones counted
    child.send(batches=[[4, [k.hex() for k in keys[7:10]] + [LEGACY_MARK.hex()]]])
    poll_until_done(f, 4)
    assert f.acks.checked == 6 and read_counter(flow, OUTBOX_ACKED) == 10 and present(flow, keys) == keys[10:]
    assert outbox_depth(flow) == 2


def test_runs_and_gaps_delete_exactly_the_acked_rows(cfg, child):
    """Consecutive ids go as one range deletion: it must never take a row that was not acked."""
    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 40, shard=3) + put_outbox(flow, 40, shard=4)
    acked = keys[0:5] + keys[6:7] + keys[8:20] + keys[21:23] + keys[39:45] + keys[60:80]
    f = ControlFollower(cfg)
    child.send(batches=[[1, [k.hex() for k in reversed(acked)]]])  # order within a batch is free
    poll_until_done(f, 1)
    assert present(flow, keys) == [k for k in keys if k not in set(acked)]
    assert read_counter(flow, OUTBOX_ACKED) == len(acked)


def test_many_acks_in_rounds(cfg, child):
    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 30_000)
    f = ControlFollower(cfg, max_ack_keys=2000)
    child.send(batches=[[i + 1, [k.hex() for k in keys[i * 1000:(i + 1) * 1000]]] for i in range(30)])
    rounds = 0
    while outbox_depth(flow) > 0 and rounds < 40:
        f.poll()
        rounds += 1
    assert outbox_depth(flow) == 0 and read_counter(flow, OUTBOX_ACKED) == 30_000
    assert rounds >= 15 and f.acks.done == 30  # at most 2 batches of 1000 a round: a round stays short


def poll_until_done(f: ControlFollower, batch: int, timeout: float = 5.0) -> None:
    t = time.monotonic()
    while f.acks.done < batch and time.monotonic() - t < timeout:
        f.poll()
        time.sleep(0.005)
    assert f.acks.done == batch


def test_partition_sees_each_command_and_prints_its_latency(cfg, child):
    """Every command the child writes comes out of the next rounds, in order; the latency and
    the idle round's cost are printed (figures, not assertions: bench/ proves speed)."""
    src = ControlSource(cfg, interval=0.005)
    part = src.build_part("control", "control", None)
    part.next_batch()
    time.sleep(0.15)
    part.next_batch()  # opened
    idle = []
    for _ in range(200):
        t = time.perf_counter()
        part.next_batch()
        idle.append(time.perf_counter() - t)
    idle.sort()
    lat = []
    for seq in range(1, 21):
        child.send(cmds=[[seq, "add", [f"did:plc:n{seq}"]]])
        t = time.perf_counter()
        got = []
        while not got:
            got = list(part.next_batch())
        lat.append(time.perf_counter() - t)
        assert got == [AddRepo(f"did:plc:n{seq}", seq)]
    lat.sort()
    print(f"\ncontrol: idle round p50 {idle[100] * 1e6:.0f} us p99 {idle[198] * 1e6:.0f} us; "
          f"command visible after write: p50 {lat[10] * 1e3:.2f} ms max {lat[-1] * 1e3:.2f} ms")
    assert part.next_awake() is not None


def test_in_a_real_bytewax_flow(cfg, child):
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    from connectors.control import _ControlPartition

    child.send(cmds=[[1, "add", ["did:plc:a", "did:plc:b"]], [2, "remove", ["did:plc:a"]]])

    class Stopping(_ControlPartition):
        seen = 0

        def next_batch(self):
            if Stopping.seen >= 3:
                raise StopIteration
            items = super().next_batch()
            Stopping.seen += len(items)
            return items

    class Src(ControlSource):
        def build_part(self, step_id, for_part, resume_state):
            return Stopping(ControlFollower(self.cfg), self.interval)

    out: list = []
    flow = Dataflow("ctl")
    s = op.input("in", flow, Src(cfg))
    op.output("out", s, TestingSink(out))
    run_main(flow)
    assert out == [AddRepo("did:plc:a", 1), AddRepo("did:plc:b", 1), RemoveRepo("did:plc:a", 2)]


def test_outbox_key_runs():
    from store.layout import outbox_key_runs

    k = outbox_key
    keys = [k(2, 7), k(1, 3), k(1, 1), k(1, 2), k(1, 2), k(1, 5), k(2, 2**64 - 1), k(2, 2**64 - 2), b"short",
            k(65535, 2**64 - 1)]
    assert outbox_key_runs(keys) == [
        (k(1, 1), k(1, 4), 3),
        (k(1, 5), k(1, 6), 1),
        (k(2, 7), k(2, 8), 1),
        (k(2, 2**64 - 2), k(3, 0), 2),  # the range ends before the next shard's first key
        (k(65535, 2**64 - 1), b"\xff" * 10 + b"\x00", 1),
    ]
    assert outbox_key_runs([]) == []


def test_change_watch_sees_writes_and_new_files(tmp_path):
    from store.db import ChangeWatch, _open_db
    from store.layout import DELIVERY_CFS

    db = _open_db(tmp_path / "d", DELIVERY_CFS, None)
    w = ChangeWatch(db.path, max_quiet=60.0, settle=0.02)
    time.sleep(0.03)
    assert w.changed()  # first look
    assert not w.changed()
    db.cf("commands")[b"k"] = b"v"  # appended to the WAL
    assert w.changed() and not w.changed()
    db.cf("commands").flush()  # new files (SST, a new WAL)
    assert w.changed()
    time.sleep(0.03)
    w.changed()  # settled
    assert not w.changed()
    db.cf("commands")[b"k2"] = b"v"  # into the new WAL
    assert w.changed() and not w.changed()
    quiet = ChangeWatch(db.path, max_quiet=0.05)
    quiet.changed()
    time.sleep(0.06)
    assert quiet.changed()  # the safety net: true at least every max_quiet seconds
    db.close()


def test_partition_backs_off_when_idle_and_wakes_up_on_commands(cfg, child):
    src = ControlSource(cfg, interval=0.005, idle_max=0.05)
    part = src.build_part("control", "control", None)
    part.next_batch()
    time.sleep(0.15)

    def wait_s() -> float:
        return (part.next_awake() - datetime.now(timezone.utc)).total_seconds()

    for _ in range(10):
        part.next_batch()
    assert 0.03 < wait_s() <= 0.05
    child.send(cmds=[[1, "add", ["did:plc:a"]]])
    assert list(part.next_batch()) == [AddRepo("did:plc:a", 1)]
    assert wait_s() <= 0.005
    for _ in range(10):
        part.next_batch()
    flow = open_flow_db(cfg.data_dir)
    keys = put_outbox(flow, 3)
    child.send(batches=[[1, [k.hex() for k in keys]]])
    assert list(part.next_batch()) == []
    assert 0.005 < wait_s() <= 0.02  # acks only: no hurry
    assert present(flow, keys) == []


def test_ack_log_numbers_keep_increasing_across_restarts_and_releases(tmp_path):
    """AckLog (the child) and AckApplier (the flow) back to back, in one process."""
    from connectors.acks import AckApplier, AckLog
    from store.db import _open_db
    from store.layout import DELIVERY_CFS, FLOW_CFS

    flow = _open_db(tmp_path / "flow", FLOW_CFS, None)
    delivery = _open_db(tmp_path / "delivery", DELIVERY_CFS, None)
    keys = put_outbox(flow, 6)
    log = AckLog(delivery, flow)
    assert log.load() == 0
    assert (log.write(keys[:2]), log.write(keys[2:3])) == (1, 2) and log.waiting == 3
    assert log.release() == 0  # the flow has applied nothing yet
    applier = AckApplier(flow)
    assert applier.apply(delivery) == 3 and applier.done == 2
    assert log.release() == 3 and log.waiting == 0 and list(delivery.cf("acks").keys()) == []
    log2 = AckLog(delivery, flow)  # restart: every batch row is gone, the number is not
    assert log2.load() == 0 and log2.write(keys[3:4]) == 3
    log3 = AckLog(delivery, flow)  # restart with batch 3 not applied: its key is acked, skip it
    assert log3.load() == 1 and log3.skip == {keys[3]} and log3.write(keys[4:5]) == 4
    assert applier.apply(delivery) == 2
    assert log3.release() == 2 and log3.skip == set()
    delivery.close()
    fresh = _open_db(tmp_path / "delivery2", DELIVERY_CFS, None)  # a new delivery DB, same flow
    log4 = AckLog(fresh, flow)
    assert log4.load() == 0 and log4.write(keys[5:]) == 5  # after the flow's cursor, never below
    flow.close()
    fresh.close()


def test_point_lookup_families_have_bloom_filters(tmp_path):
    """``repos`` and ``records`` answer a lookup per live commit / op, mostly misses on the
    firehose: every family's SSTs carry a bloom filter (``store.db._family_options``)."""
    import re

    from store.db import FLOW_CFS, open_flow_db

    open_flow_db(tmp_path)
    opts = sorted((tmp_path / "flow").glob("OPTIONS-*"))[-1].read_text()
    policy = dict(re.findall(r'\[TableOptions/BlockBasedTable "(\w+)"\][^\[]*?filter_policy=(\S+)', opts))
    assert {cf for cf, p in policy.items() if p != "nullptr"} == set(FLOW_CFS) >= {"repos", "records"}
