"""End to end: the real service against a misbehaving upstream (bench/replay.py).

``python -m bytewax.run flows.tap`` follows the replay server as relay, PLC, PDS and handle
resolver; the official ``@atproto/tap`` client reads ``/channel``. The upstream injects a
forged commit (signed by a wrong key), frames that are not CBOR or are cut short, a dropped
connection mid-frame, a getRepo CAR with a flipped byte and a 429. DESIGN.md invariant 6: bad
input never stops the flow; it is counted, logged with the DID and reason, and dropped or
turned into a resync.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from bench.replay import Inject, ReplayData, ReplayServer
from protocol import cbor
from tests.e2e_support import free_port, make_service, start_client, state_from_events

pytestmark = pytest.mark.e2e

RECORDS = 30


@pytest.fixture(scope="module")
def data() -> ReplayData:
    return ReplayData.generate(repos=6, records=RECORDS, commits=120, seed=7)


def _service(srv: ReplayServer, tmp: Path, **extra: str):
    return make_service(None, tmp, TAP_RELAY_URL=srv.url, TAP_PLC_URL=srv.url,
                        TAP_HANDLE_RESOLVER=f"xrpc:{srv.url}", **extra)



def _log_lines(svc) -> list[dict]:
    out = []
    for line in svc.log_path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _info(svc, did: str) -> dict:
    status, body = svc.api("GET", f"/info/{did}")
    return body if status == 200 else {}


@pytest.mark.parametrize("live_verify", ["inline", "pool"])
def test_forged_commit_and_broken_frames_are_rejected_and_the_repo_heals(data, tmp_path, live_verify):
    # the DID whose third live commit is forged; garbage and a truncated frame elsewhere;
    # a dropped connection half-way through a frame. Live commits verified by RepoLogic
    # (inline) or by the verification processes' lanes (pool): the same outcome either way.
    victim = data.repos[data.frame_repo[0]].did
    forged_at = next(i for i in data.frames_of(victim)[2:]
                     if any(o["action"] == "create" for o in cbor.decode_multi(data.frames[i])[1]["ops"]))
    inject = [Inject(forged_at, "forged"), Inject(30, "garbage"), Inject(70, "truncated")]
    srv = ReplayServer(data, inject=inject, hold=True).start()
    drop_at = srv.base_pos[90]
    srv.drop_connection_at(drop_at)
    metrics_port = free_port()
    svc = _service(srv, tmp_path, TAP_METRICS_LISTEN=f"127.0.0.1:{metrics_port}", TAP_LIVE_VERIFY=live_verify,
                   TAP_VERIFY_WORKERS="2").start()
    client = start_client(svc, tmp_path, data.dids)
    try:
        # 1. backfill every repo (the stream is held, getRepo serves the initial state)
        initial = {did: srv.records_at(did, -1) for did in data.dids}

        def backfilled():
            got = state_from_events(client.events())
            return all(got.get(d) == initial[d] for d in data.dids) and all(
                _info(svc, d).get("state") == "active" for d in data.dids)

        svc.wait_for(backfilled, timeout=90, what="backfill of every repo")
        assert all(srv.requests[("getRepo", d)] == 1 for d in data.dids)

        # 2. live commits flow, bad frames among them
        srv.release()
        final = {did: srv.records_at(did) for did in data.dids}
        assert final[victim] != initial[victim]
        svc.wait_for(lambda: all(state_from_events(client.events()).get(d) == final[d] for d in data.dids),
                     timeout=120, what="consumer state equal to every repo's final state")
        svc.wait_for(lambda: _info(svc, victim).get("state") == "active", timeout=30, what="victim active")

        # the service kept running, the victim was resynced (a second getRepo), the others not
        assert svc.proc.poll() is None and svc.api("GET", "/health")[0] == 200
        assert srv.requests[("getRepo", victim)] == 2
        assert all(srv.requests[("getRepo", d)] == 1 for d in data.dids if d != victim)
        info = _info(svc, victim)
        assert info["error"] == "" and info["records"] == len(final[victim])

        # the forged commit: one log line with the DID and the reason
        lines = _log_lines(svc)
        rejected = [x for x in lines if x.get("logger") == "tapflow.rejected" and x.get("did") == victim]
        assert len(rejected) == 1, rejected
        assert rejected[0]["reason"] == "verify_failed" and rejected[0]["source"] == "commit"
        assert "signature" in rejected[0]["detail"]
        assert not [x for x in lines if x.get("logger") == "tapflow.rejected" and x.get("did") != victim]
        # garbage and truncated frames: logged and skipped, later frames still flowed (step 2)
        bad = [x for x in lines if x.get("msg") == "firehose frame rejected"]
        assert [x["reason"] for x in bad] == ["bad_cbor", "bad_cbor"], bad
        # the dropped connection: redialled at once, resuming after the last complete frame
        assert srv.connections == 2
        assert srv.cursors == [None, srv.seqs[drop_at - 1]]
        # the forged record never reached the consumer
        (forged_did, _, forged_cid), = srv.forged.values()
        assert forged_did == victim and forged_cid
        assert not [e for e in client.events() if e.get("cid") == forged_cid]

        # metrics: the rejection counter and the malformed-frame counter
        text = _metrics(metrics_port)
        assert _metric(text, "tapflow_rejected_total", source="commit", reason="verify_failed") == 1
        assert _metric(text, "tapflow_firehose_frames_rejected_total", reason="bad_cbor") == 2
        # the lanes gave the verdicts (the forged one included) only when asked to
        verdicts = _metric(text, "tapflow_firehose_preverify_total", outcome="verdict")
        assert verdicts >= len(data.frames) - 10 if live_verify == "pool" else verdicts == 0, verdicts
    finally:
        client.stop()
        svc.stop()
        srv.stop()


def test_corrupt_car_errors_and_a_429_desynchronizes_others_unaffected(data, tmp_path):
    corrupt, limited = data.dids[1], data.dids[2]
    others = [d for d in data.dids if d not in (corrupt, limited)]
    # the rate-limited repo lives on a PDS of its own: a 429 backs off the whole host for 10 s
    srv = ReplayServer(data, hold=True, pds_count=2, pds_of={limited: 1}).start()
    srv.corrupt_car(corrupt)
    srv.fail("getRepo", 429, did=limited)
    metrics_port = free_port()
    svc = _service(srv, tmp_path, TAP_METRICS_LISTEN=f"127.0.0.1:{metrics_port}").start()
    client = start_client(svc, tmp_path, data.dids)
    try:
        initial = {did: srv.records_at(did, -1) for did in data.dids}
        svc.wait_for(lambda: _info(svc, corrupt).get("state") == "error", timeout=60, what="corrupt repo in error")
        svc.wait_for(lambda: _info(svc, limited).get("state") == "desynchronized", timeout=60,
                     what="rate-limited repo desynchronized")
        svc.wait_for(lambda: all(state_from_events(client.events()).get(d) == initial[d] for d in others)
                     and all(_info(svc, d).get("state") == "active" for d in others),
                     timeout=90, what="the other repos backfilled")

        info = _info(svc, corrupt)
        assert info["retries"] == 1 and info["records"] == 0
        assert "hash does not match" in info["error"] and info["error"].startswith("failed to read repo from CAR")
        info = _info(svc, limited)
        assert info["retries"] == 1 and info["error"] == "" and info["records"] == 0
        # nothing of the two reached the consumer but (at most) their identity events
        evs = client.events()
        assert not [e for e in evs if e["did"] in (corrupt, limited) and e["type"] == "record"]
        # one attempt each: Tap's backoff (60 s and up) holds the retry
        assert srv.requests[("getRepo", corrupt)] == 1 and srv.requests[("getRepo", limited)] == 1
        assert svc.proc.poll() is None

        lines = _log_lines(svc)
        failed = [x for x in lines if x.get("msg") == "repo fetch failed"]
        assert {x["did"]: x["rate_limited"] for x in failed} == {corrupt: False, limited: True}
        text = _metrics(metrics_port)
        assert _metric(text, "tapflow_backfill_fetches_total", kind="repo", outcome="failed") == 1
        assert _metric(text, "tapflow_backfill_fetches_total", kind="repo", outcome="rate_limited") == 1
    finally:
        client.stop()
        svc.stop()
        srv.stop()


def test_oversized_frame_is_skipped_and_the_stream_goes_on(data, tmp_path):
    """A frame over TAP_MAX_FRAME_SIZE makes the client drop the connection; the redial reads
    that one frame without the limit, rejects it and carries on from there."""
    big = cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode({"seq": 0, "junk": b"\x00" * 200_000})
    srv = ReplayServer(data, inject=[Inject(40, "raw", big)], hold=True).start()
    metrics_port = free_port()
    svc = _service(srv, tmp_path, TAP_MAX_FRAME_SIZE="65536", TAP_METRICS_LISTEN=f"127.0.0.1:{metrics_port}").start()
    client = start_client(svc, tmp_path, data.dids)
    try:
        initial = {did: srv.records_at(did, -1) for did in data.dids}
        svc.wait_for(lambda: all(state_from_events(client.events()).get(d) == initial[d] for d in data.dids)
                     and all(_info(svc, d).get("state") == "active" for d in data.dids),
                     timeout=90, what="backfill of every repo")
        srv.release()
        final = {did: srv.records_at(did) for did in data.dids}
        svc.wait_for(lambda: all(state_from_events(client.events()).get(d) == final[d] for d in data.dids),
                     timeout=120, what="consumer state equal to every repo's final state")
        assert svc.proc.poll() is None
        assert all(srv.requests[("getRepo", d)] == 1 for d in data.dids)  # nothing was lost
        big_pos = next(p for p, k in srv.injected.items() if k == "raw")
        assert srv.connections == 2 and srv.cursors == [None, srv.seqs[big_pos - 1]]
        lines = _log_lines(svc)
        assert [x for x in lines if x.get("msg", "").startswith("firehose frame larger than TAP_MAX_FRAME_SIZE")]
        text = _metrics(metrics_port)
        # one frame, counted once (by the reject on redial, not by the dropped connection too)
        assert _metric(text, "tapflow_firehose_frames_rejected_total", reason="frame_too_large") == 1
    finally:
        client.stop()
        svc.stop()
        srv.stop()
