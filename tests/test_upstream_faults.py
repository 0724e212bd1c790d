"""Upstream faults: the relay, the PDS and the PLC misbehave; the service keeps going, repos
heal, and ``/info`` tells the truth meanwhile.

1. The relay (``bench.replay`` as relay + PDS + PLC): connections dropped mid-frame, a
   ``ConsumerTooSlow`` error frame, a relay restarted with an *older* sequence (our cursor is in
   its future: ``FutureCursor``, then the live head, which skips commits: the gap heals through
   the continuity check and a resync) and one restarted with a *newer* sequence (everything
   replays; replays are dropped by rev, no resync).
2. getRepo answering 500, 429, hanging past ``TAP_REPO_FETCH_TIMEOUT``, closing mid-CAR, and a
   PLC that is down for one DID and then entirely: each repo shows its honest state and
   error, ``retry_after`` is Tap's 1-2 min backoff, the other repos are not affected, and live
   commits keep flowing while the PLC is down. The repos heal once the faults are gone: by
   themselves after the backoff with ``FULL=1``; in CI through ``/repos/remove`` + ``/repos/add``
   (the backoff is 60 s and more, too long for the suite).
3. The real PDS killed (SIGKILL) and restarted with its data while tapflow follows it: the
   firehose redials with its cursor and nothing is lost; a repo added while the PDS is down
   goes to ``error`` with the connection error and heals like the others.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.replay import Inject, ReplayData
from protocol import cbor
from tests.e2e_support import free_port, make_service, start_client
from tests.fault_support import (FULL, SEED, FaultyReplay, LoadWriter, Timer, apply_events, fault_pds,  # noqa: F401
                                 info, live_order_violations, load, log_lines, firehose_cursor, state_diff, wait_until)

pytestmark = pytest.mark.e2e

TOO_SLOW = cbor.encode({"op": -1}) + cbor.encode({"error": "ConsumerTooSlow", "message": "Stream consumer too slow"})


def _replay_service(url: str, tmp: Path, **extra: str):
    return make_service(None, tmp, TAP_RELAY_URL=url, TAP_PLC_URL=url, TAP_HANDLE_RESOLVER=f"xrpc:{url}", **extra)


def _read_repos(data_dir: Path, tmp: Path) -> dict[str, dict]:
    """The flow's repo rows, read as a RocksDB secondary while the service runs."""
    import orjson

    from store.db import _open_db
    from store.layout import FLOW_CFS

    db = _open_db(data_dir / "flow", FLOW_CFS, tmp / f"secondary-{time.monotonic_ns()}")
    try:
        db.catch_up()
        return {k.decode(): orjson.loads(v) for k, v in db.cf("repos").items()}
    finally:
        db.close()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _error_frames(svc) -> list[str]:
    return [x.get("error") for x in log_lines(svc) if x.get("msg") == "firehose error frame"]


# --- 1. the relay ---------------------------------------------------------------------------------

def test_relay_drops_too_slow_and_restarts_with_older_and_newer_sequence(tmp_path):
    timer = Timer("relay_restarts")
    data = ReplayData.generate(repos=6, records=30, commits=160, seed=11)
    dids = data.dids
    port = free_port()
    # relay 1: seqs from 10000; drops mid-frame at base frames 25 and 50, ConsumerTooSlow before 75
    # (a relay writes ahead of what the client reads: a fault placed after the error frame
    # would be spent on the connection the client is leaving)
    r1 = FaultyReplay(data, port=port, hold=True, first_seq=10_000, inject=[Inject(75, "raw", TOO_SLOW)])
    too_slow_pos = r1.base_pos[75] - 1
    assert r1.injected.get(too_slow_pos) == "raw"
    r1.one_shot.add(too_slow_pos)
    r1.drop_connection_at(r1.base_pos[25])
    r1.drop_connection_at(r1.base_pos[50])
    url = f"http://127.0.0.1:{port}"
    r1.start()
    svc = _replay_service(url, tmp_path).start()
    client = start_client(svc, tmp_path, dids)
    relays = [r1]
    try:
        initial = {d: r1.records_at(d, -1) for d in dids}
        wait_until(lambda: not state_diff(apply_events(client.events()), initial)
                   and all(info(svc, d).get("state") == "active" for d in dids), 90, "backfill", svc=svc)
        timer.mark("backfilled")
        r1.release(r1.base_pos[100])
        last1 = r1.seqs[r1.base_pos[99]]
        wait_until(lambda: firehose_cursor(svc) == last1, 60, "relay 1 consumed up to base frame 99", svc=svc)
        assert r1.cursors == [None] + [r1.seqs[r1.base_pos[i]] for i in (24, 49, 74)], r1.cursors
        r1.stop()
        timer.mark("relay 1")

        # relay 2: restarted with an older sequence (1..160); without a cursor it serves its live
        # head, base frame 115 on: frames 100-114 are never seen (a gap)
        gap = range(100, 115)
        gapped = {data.repos[data.frame_repo[i]].did for i in gap}
        later = {data.repos[data.frame_repo[i]].did for i in range(115, 140)}
        assert gapped and gapped <= later, "every gapped repo has a later commit on relay 2 (seed choice)"
        r2 = FaultyReplay(data, port=port, hold=True, first_seq=1)
        r2.head_pos = r2.base_pos[115]
        r2.release(r2.base_pos[140])
        relays.append(r2)
        r2.start()
        last2 = r2.seqs[r2.base_pos[139]]
        wait_until(lambda: firehose_cursor(svc) == last2, 60, "relay 2 consumed up to base frame 139", svc=svc)
        at2 = {d: r2.records_at(d, r2._state_index(d, r2.base_pos[140])) for d in dids}
        wait_until(lambda: not state_diff(apply_events(client.events()), at2)
                   and all(info(svc, d).get("state") == "active" for d in dids), 60,
                   "the gap healed by resyncs", svc=svc)
        assert r2.cursors[:2] == [last1, None], r2.cursors
        assert {d for d in dids if r2.requests[("getRepo", d)]} == gapped, "only the gapped repos resynced"
        r2.stop()
        timer.mark("relay 2")

        # relay 3: restarted with a newer sequence (from 1,000,000): our cursor is older than
        # anything it has, so it replays everything; replays are dropped by rev
        r3 = FaultyReplay(data, port=port, first_seq=1_000_000)
        relays.append(r3)
        r3.start()
        final = {d: r3.records_at(d) for d in dids}
        wait_until(lambda: firehose_cursor(svc) == r3.last_seq, 60, "relay 3 consumed", svc=svc)
        wait_until(lambda: not state_diff(apply_events(client.events()), final), 60, "final state", svc=svc)
        timer.mark("relay 3")
        assert r3.cursors[0] == last2
        assert not any(r3.requests[("getRepo", d)] for d in dids), "replays caused no resync"
        assert sorted(_error_frames(svc)) == ["ConsumerTooSlow", "FutureCursor"], _error_frames(svc)
        for d in dids:
            i = info(svc, d)
            assert i["state"] == "active" and i["error"] == "" and i["records"] == len(final[d]), i
        events = client.events()
        assert not live_order_violations(events)
        assert svc.proc.poll() is None and svc.api("GET", "/health")[0] == 200
        timer.report(frames=sum(r.frames_sent for r in relays), connections=[r.connections for r in relays],
                     gapped_repos=len(gapped), deliveries=len(events), unique=len({e["id"] for e in events}))
    finally:
        client.stop()
        svc.stop()
        for r in relays:
            r.stop()


# --- 2. getRepo and PLC faults ----------------------------------------------------------------

def test_pds_and_plc_faults_show_honest_states_and_heal(tmp_path):
    timer = Timer("fetch_faults")
    data = ReplayData.generate(repos=9, records=25, commits=90, seed=5)
    dids = data.dids
    d500, d429, dslow, dcut, dplc = dids[:5]
    healthy = dids[5:]
    # the 429 puts its PDS host in a 10 s backoff: that repo lives on a host of its own
    srv = FaultyReplay(data, hold=True, pds_count=2, pds_of=lambda d: 1 if d == d429 else 0).start()
    srv.fail("getRepo", 500, did=d500)
    srv.fail("getRepo", 429, did=d429)
    srv.slow[dslow] = 6.0
    srv.cut[dcut] = 1
    srv.plc_down.add(dplc)
    svc = _replay_service(srv.url, tmp_path, TAP_REPO_FETCH_TIMEOUT="2s").start()
    client = start_client(svc, tmp_path, dids)
    try:
        want_state = {d500: "error", d429: "desynchronized", dslow: "error", dcut: "error", dplc: "error"}
        wait_until(lambda: all(info(svc, d).get("state") == s for d, s in want_state.items()), 60,
                   "every faulty repo in its state", svc=svc)
        t_seen = time.time()  # after the 429
        initial = {d: srv.records_at(d, -1) for d in dids}
        wait_until(lambda: not state_diff({d: s for d, s in apply_events(client.events()).items() if d in healthy},
                                          {d: initial[d] for d in healthy})
                   and all(info(svc, d).get("state") == "active" for d in healthy), 60, "healthy repos", svc=svc)
        timer.mark("faults observed")
        infos = {d: info(svc, d) for d in want_state}
        assert "500" in infos[d500]["error"], infos[d500]
        assert infos[d429]["error"] == "", infos[d429]
        assert "timeout" in infos[dslow]["error"].lower() or "timed out" in infos[dslow]["error"].lower(), infos[dslow]
        assert infos[dcut]["error"], infos[dcut]
        assert infos[dplc]["error"], infos[dplc]
        for d, i in infos.items():
            assert i["retries"] == 1 and i["records"] == 0, i
        rows = _read_repos(svc.data_dir, tmp_path)
        failed_at = {x["did"]: _epoch(x["time"]) for x in log_lines(svc) if x.get("msg") == "repo fetch failed"}
        for d in want_state:
            wait = rows[d]["retry_after"] - failed_at[d]
            assert 59 <= wait <= 125, (d, wait, rows[d])  # Tap: 60 x (1 s + U[0,1) s) for the first failure
        # nothing of the failed repos reached the consumer but identity events
        assert not [e for e in client.events() if e["did"] in want_state and e["type"] == "record"]

        # the PLC goes down entirely; live commits keep flowing for the active repos (their keys
        # are in their state), the errored ones ignore them
        srv.plc_refuse = True
        srv.release()
        final = {d: srv.records_at(d) for d in dids}
        wait_until(lambda: not state_diff({d: s for d, s in apply_events(client.events()).items() if d in healthy},
                                          {d: final[d] for d in healthy}), 60, "live commits with the PLC down",
                   svc=svc)
        assert all(info(svc, d)["state"] == "active" for d in healthy)
        assert all(info(svc, d)["state"] == want_state[d] for d in want_state)
        timer.mark("live with PLC down")

        # faults gone: the repos heal
        srv.plc_refuse = False
        srv.plc_down.clear()
        srv.slow.clear()
        if FULL:  # by themselves, after Tap's backoff (60-120 s)
            wait_until(lambda: all(info(svc, d).get("state") == "active" for d in want_state), 150,
                       "healing after the backoff", interval=2.0, svc=svc)
        else:  # an operator's retry: remove + add, once the 429's host backoff (10 s) is over
            time.sleep(max(0.0, t_seen + 10.5 - time.time()))
            assert svc.api("POST", "/repos/remove", {"dids": list(want_state)})[0] == 200
            wait_until(lambda: all(svc.api("GET", f"/info/{d}")[0] == 404 for d in want_state), 30, "removed")
            assert svc.api("POST", "/repos/add", {"dids": list(want_state)})[0] == 200
        wait_until(lambda: not state_diff(apply_events(client.events()), final)
                   and all(info(svc, d).get("state") == "active" for d in dids), 150 if FULL else 60,
                   "every repo healed with its final records", svc=svc)
        timer.mark("healed")
        for d in dids:
            i = info(svc, d)
            assert i["error"] == "" and i["retries"] == 0 and i["records"] == len(final[d]), i
        assert svc.proc.poll() is None
        events = client.events()
        timer.report(repos=len(dids), faulty=len(want_state), deliveries=len(events), full=FULL,
                     get_repo={d[-6:]: srv.requests[("getRepo", d)] for d in want_state})
    finally:
        client.stop()
        svc.stop()
        srv.stop()


# --- 3. the real PDS killed and restarted ------------------------------------------------------

def test_pds_killed_and_restarted(fault_pds, tmp_path):
    timer = Timer("pds_kill")
    seeds = load(fault_pds, tmp_path / "seed.json", ACCOUNTS=4, RECORDS=30, MODE="apply", BATCH=10,
                 TAG=f"u{SEED % 1000}s")
    dids = sorted(seeds["repos"])
    tracked, late = dids[:3], dids[3]
    svc = make_service(fault_pds, tmp_path, TAP_SIGNAL_COLLECTION="app.bsky.feed.post").start()
    assert svc.api("POST", "/repos/add", {"dids": tracked})[0] == 200
    client = start_client(svc, tmp_path, TAP_MAX_RECONNECT_S="1")
    writer = None
    try:
        want = {d: seeds["repos"][d]["records"] for d in tracked}
        wait_until(lambda: not state_diff(apply_events(client.events()), want), 90, "backfill", svc=svc)
        # live writes first: they give the service a firehose cursor to resume from (without one
        # it would redial at the live head and miss what the PDS does meanwhile, as Tap does)
        first = load(fault_pds, tmp_path / "live-0.json", ACCOUNTS=1, RECORDS=10, UPDATES=0.3, DELETES=0.2,
                     TAG=f"u{SEED % 1000}a")
        want.update({d: r["records"] for d, r in first["repos"].items()})
        wait_until(lambda: not state_diff(apply_events(client.events()), want), 90, "live writes", svc=svc)
        timer.mark("before kill")

        fault_pds.kill_pds()
        t_kill = time.time()
        # while the PDS is down: the service runs, tracked repos stay active, a repo added now
        # fails its fetch with the connection error
        assert svc.api("POST", "/repos/add", {"dids": [late]})[0] == 200
        wait_until(lambda: info(svc, late).get("state") == "error", 60, "the late repo in error", svc=svc)
        i = info(svc, late)
        assert i["retries"] == 1 and i["error"], i
        assert svc.api("GET", "/health")[0] == 200 and svc.proc.poll() is None
        assert all(info(svc, d)["state"] == "active" for d in want)
        wait_until(lambda: any(x.get("msg") == "firehose dial failed" and x.get("time", "") for x in log_lines(svc)),
                   30, "a failed firehose dial", svc=svc)
        timer.mark("down")
        fault_pds.restart_pds()
        timer.mark("restarted")
        writer = LoadWriter(fault_pds, tmp_path, f"u{SEED % 1000}b", accounts=2, records=15, max_runs=1).start()
        writer.stop()
        assert not writer.errors, writer.errors
        want.update(writer.ledger())
        wait_until(lambda: not state_diff({d: s for d, s in apply_events(client.events()).items() if d != late},
                                          want), 120, "live writes after the PDS restart", svc=svc)
        timer.mark("caught up")
        connects = [x for x in log_lines(svc) if x.get("msg") == "connected to firehose"]
        assert len(connects) >= 2 and "cursor=" in connects[-1]["url"], connects[-2:]
        # the late repo heals: by itself after the backoff (FULL=1), else by remove + add
        want[late] = seeds["repos"][late]["records"]
        if not FULL:
            assert svc.api("POST", "/repos/remove", {"dids": [late]})[0] == 200
            wait_until(lambda: svc.api("GET", f"/info/{late}")[0] == 404, 30, "removed")
            assert svc.api("POST", "/repos/add", {"dids": [late]})[0] == 200
        wait_until(lambda: not state_diff(apply_events(client.events()), want)
                   and info(svc, late).get("state") == "active", 150 if FULL else 60, "the late repo healed",
                   interval=1.0, svc=svc)
        assert all(info(svc, d)["state"] == "active" and info(svc, d)["error"] == "" for d in want)
        events = client.events()
        assert not live_order_violations(events)
        timer.report(repos=len(want), deliveries=len(events), unique=len({e["id"] for e in events}),
                     pds_down_s=round(time.time() - t_kill, 1), full=FULL)
    finally:
        if writer is not None:
            writer.stop()
        client.stop()
        svc.stop()
        fault_pds.restart_pds()  # whatever happened, leave it running
