"""Crash loop: kill -9 at seeded random moments while the PDS writes and tapflow backfills and
streams; what the consumers applied must equal what the PDS holds.

The PDS (a harness instance of its own) keeps writing: ``load.mjs`` runs back to back, each
run creating fresh accounts and writing creates, then updates and deletes (one commit each).
tapflow tracks the seed accounts (added through /repos/add) and every account that
writes an ``app.bsky.feed.post`` (signal collection), so new repos are backfilled while the
older ones stream live. It delivers to the official ``@atproto/tap`` client over /channel
(acks) and to the Kafka test broker (``tap.events``), both targets at once. The client
reconnects by itself; when a crash caught it mid-event it deadlocks and exits (an
``@atproto/tap`` 0.3.12 bug, see ``fault_support.Consumer``) and is started again, keeping what
it received: a consumer process that restarts.

The kills are drawn from ``random.Random(FAULT_SEED)``: a pause of 0.3-2.5 s after the service
is healthy, then SIGKILL to the whole process group, to the flow process only (the delivery
child dies with it), or to the delivery child only (the flow restarts it). 8 kills in CI,
20 with ``FULL=1``.

At the end, for every repo: the state applied from /channel deliveries (in arrival order) and
from the Kafka topic (per-partition offset order) equals the load ledger (spot-checked with
``probe.py records`` = getRepo + MST walk); no repo outside the ledger got events; per repo,
live events never go back in rev among first deliveries and nothing is first-delivered
behind a live event; both targets saw the same event ids. Duplicates are counted and printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from tests.e2e_support import HARNESS, HARNESS_HOME, make_service
from tests.fault_support import (FULL, SEED, Consumer, LoadWriter, Timer, apply_events, delivery_pid, duplicates,  # noqa: F401
                                 fault_pds, id_order_violations, kafka_events, live_order_violations, load, rng,
                                 stat, state_diff, wait_until)
from tests.kafka_broker import kafka_broker  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

KILLS = 20 if FULL else 8


def _probe_records(pds, did: str) -> dict[str, str]:
    """getRepo + MST walk by the harness's own probe (independent of tapflow's code)."""
    py = HARNESS_HOME / "pds" / "venv" / "bin" / "python"
    out = subprocess.run([str(py), str(HARNESS / "pds" / "probe.py"), "records", did], env=pds._env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)["records"]


def _kill(svc, mode: str) -> None:
    if mode == "group":
        svc.kill()
        svc.start()
    elif mode == "flow":
        child = delivery_pid(svc)
        os.kill(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(30)
        if child is not None:  # PR_SET_PDEATHSIG takes the child down too
            wait_until(lambda: not os.path.exists(f"/proc/{child}") or
                       "Z" in open(f"/proc/{child}/stat").read().split()[2], 15, "the delivery child to die")
        svc.start()
    else:  # the delivery child alone: the flow restarts it
        child = delivery_pid(svc)
        assert child is not None, "no delivery child"
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: (delivery_pid(svc) or child) != child, 30, "a new delivery child", svc=svc)
        svc.wait_healthy()


def test_crash_loop_kill9_loses_nothing(fault_pds, kafka_broker, tmp_path):
    r = rng("crash_loop")
    timer = Timer("crash_loop")
    tag = f"k{SEED % 1000}"
    seeds = load(fault_pds, tmp_path / "seed.json", ACCOUNTS=3, RECORDS=150, MODE="apply", BATCH=50, TAG=f"{tag}s")
    seed_dids = sorted(seeds["repos"])
    prefix = f"crash{uuid.uuid4().hex[:6]}."
    svc = make_service(fault_pds, tmp_path, TAP_SIGNAL_COLLECTION="app.bsky.feed.post",
                       TAP_KAFKA_BOOTSTRAP=kafka_broker.bootstrap, TAP_KAFKA_TOPIC_PREFIX=prefix,
                       TAP_KAFKA_PARTITIONS="4", TAP_RETRY_TIMEOUT="3s").start()
    assert svc.api("POST", "/repos/add", {"dids": seed_dids})[0] == 200
    client = Consumer(svc, tmp_path)
    writer = LoadWriter(fault_pds, tmp_path, tag, accounts=3, records=20, updates=0.4, deletes=0.25,
                        concurrency=3).start()
    kills: list[tuple[float, str]] = []
    try:
        timer.mark("started")
        for _ in range(KILLS):
            pause = round(r.uniform(0.3, 2.5), 2)
            mode = r.choice(["group", "group", "flow", "child"])
            time.sleep(pause)
            _kill(svc, mode)
            client.ensure()
            kills.append((pause, mode))
            assert not writer.errors, writer.errors
        timer.mark(f"{KILLS} kills")
        writer.stop()
        assert not writer.errors, writer.errors
        timer.mark("writer done")

        want = {d: seeds["repos"][d]["records"] for d in seed_dids}
        want.update(writer.ledger())
        assert len(want) >= len(seed_dids) + 3

        def converged():
            client.ensure()
            return not state_diff(apply_events(client.events()), want)

        try:
            wait_until(converged, 300 if FULL else 150, "consumer state equal to the PDS", interval=1.0)
        except AssertionError:
            diff = state_diff(apply_events(client.events()), want)
            infos = {d: svc.api("GET", f"/info/{d}")[1] for d in list(diff)[:5]}
            raise AssertionError(f"/channel consumer differs from the PDS: {json.dumps(diff)[:3000]}\n"
                                 f"info: {infos}\n{svc.log_tail(30)}")
        timer.mark("channel converged")
        wait_until(lambda: stat(svc, "outbox-buffer") == 0, 60, "outbox drained", svc=svc)

        events = client.events()
        kevents: list[dict] = []

        def kafka_converged():
            kevents[:] = kafka_events(kafka_broker.bootstrap, prefix + "events")
            return not state_diff(apply_events(kevents), want)

        try:
            wait_until(kafka_converged, 60, "Kafka consumer state equal to the PDS", interval=2.0)
        except AssertionError:
            raise AssertionError(f"Kafka differs: {json.dumps(state_diff(apply_events(kevents), want))[:3000]}")
        timer.mark("kafka converged")

        # per-repo order on both targets
        assert not live_order_violations(events), live_order_violations(events)[:5]
        assert not id_order_violations(events), id_order_violations(events)[:5]
        assert not live_order_violations(kevents), live_order_violations(kevents)[:5]
        first_ids: dict[str, list[int]] = {}
        seen: set[int] = set()
        for e in kevents:
            if e["id"] not in seen:
                seen.add(e["id"])
                first_ids.setdefault(e["did"], []).append(e["id"])
        assert all(ids == sorted(ids) for ids in first_ids.values()), "Kafka: a repo's events out of id order"
        # both targets took the same events; nothing for repos outside the ledger
        assert {e["id"] for e in events} == {e["id"] for e in kevents}
        assert {e["did"] for e in events} <= set(want) and {e["did"] for e in kevents} <= set(want)
        # every repo got its identity event first (first delivery)
        for did in want:
            firsts = [e for e in events if e["did"] == did]
            assert firsts and firsts[0]["type"] == "identity", (did, firsts[:1])
        # the ledger is what the PDS holds (independent getRepo + MST walk)
        for did in r.sample(sorted(want), 2):
            assert _probe_records(fault_pds, did) == want[did], did
        assert svc.proc.poll() is None
        records = sum(len(v) for v in want.values())
        timer.report(kills=len(kills), kill_modes={m: sum(1 for _, x in kills if x == m) for m in ("group", "flow", "child")},
                     repos=len(want), records_on_pds=records, pds_commits=writer.commits() + seeds["commits"],
                     channel_deliveries=len(events), channel_unique=len({e["id"] for e in events}),
                     channel_duplicates=duplicates(events), kafka_messages=len(kevents),
                     kafka_duplicates=duplicates(kevents), client_restarts=client.replaced, seed=SEED,
                     schedule=kills)
    finally:
        writer.stop()
        client.stop()
        svc.stop()
