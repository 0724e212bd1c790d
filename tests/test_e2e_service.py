"""End to end: the real service process against the real PDS + PLC, read by the official client.

Each test starts ``python -m bytewax.run flows.tap`` with its own data dir and port, writes to
the PDS through its public XRPC API, and checks what ``@atproto/tap`` 0.3.12 received.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.e2e_support import make_service, start_client

pytestmark = pytest.mark.e2e


def _load(pds, tmp: Path, accounts: int, records: int, **extra: str) -> dict:
    out = tmp / f"load-{len(list(tmp.glob('load-*.json')))}.json"
    pds.script("load.mjs", {"ACCOUNTS": str(accounts), "RECORDS": str(records), "OUT_FILE": str(out), **extra})
    return json.loads(out.read_text())


def _write_records(pds, did: str, ops: list[dict]) -> list[dict]:
    """Apply ops on the PDS as the account itself; returns [{action, path, cid}] in order."""
    code = f"""
const did = {json.dumps(did)};
const s = await X.createSession(base, did);
const out = [];
for (const op of {json.dumps(ops)}) {{
  if (op.action === 'delete') {{
    await X.xrpc(base, 'com.atproto.repo.deleteRecord', {{ auth: s.accessJwt, body: {{ repo: did, collection: op.collection, rkey: op.rkey }} }});
    out.push({{ action: 'delete', path: op.collection + '/' + op.rkey, cid: null }});
  }} else {{
    const r = await X.xrpc(base, 'com.atproto.repo.putRecord', {{ auth: s.accessJwt, body: {{ repo: did, collection: op.collection, rkey: op.rkey, record: op.record }} }});
    out.push({{ action: op.action, path: op.collection + '/' + op.rkey, cid: r.cid }});
  }}
}}
console.log(JSON.stringify({{ ok: true, out }}));
"""
    return pds.xrpc_script(code)["out"]


def _by_did(events: list[dict]) -> dict[str, list[dict]]:
    per: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        per[e["did"]].append(e)
    return per


def _state_from_events(events: list[dict]) -> dict[str, dict[str, str]]:
    """What a consumer applying the events would hold: did -> {path: cid}."""
    state: dict[str, dict[str, str]] = defaultdict(dict)
    for e in events:
        if e["type"] != "record":
            continue
        path = f"{e['collection']}/{e['rkey']}"
        if e["action"] == "delete":
            state[e["did"]].pop(path, None)
        else:
            state[e["did"]][path] = e["cid"]
    return state


def test_backfill_then_live_with_official_client(pds, tmp_path):
    ledger = _load(pds, tmp_path, accounts=2, records=25)
    dids = sorted(ledger["repos"])
    svc = make_service(pds, tmp_path).start()
    client = start_client(svc, tmp_path, dids)
    try:
        expected = {d: ledger["repos"][d]["records"] for d in dids}

        def backfilled():
            got = _state_from_events(client.events())
            return all(got.get(d) == expected[d] for d in dids)

        svc.wait_for(backfilled, timeout=90, what="backfill of every record")
        per = _by_did(client.events())
        for d in dids:
            evs = per[d]
            assert evs[0]["type"] == "identity", evs[0]
            assert evs[0]["handle"] == ledger["repos"][d]["handle"]
            assert evs[0]["status"] == "active" and evs[0]["isActive"] is True
            recs = [e for e in evs if e["type"] == "record"]
            assert all(e["live"] is False and e["action"] == "create" for e in recs)
            assert {f"{e['collection']}/{e['rkey']}": e["cid"] for e in recs} == expected[d]
            assert len({e["rev"] for e in recs}) == 1  # one snapshot rev

        status, info = svc.api("GET", f"/info/{dids[0]}")
        assert status == 200 and info["state"] == "active" and info["records"] == len(expected[dids[0]])

        # live writes: create, update, delete -> live:true, in order, with the PDS's CIDs
        target = dids[0]
        ops = [
            {"action": "create", "collection": "com.example.live", "rkey": "a", "record": {"$type": "com.example.live", "n": 1}},
            {"action": "create", "collection": "com.example.live", "rkey": "b", "record": {"$type": "com.example.live", "n": 2}},
            {"action": "update", "collection": "com.example.live", "rkey": "a", "record": {"$type": "com.example.live", "n": 3}},
            {"action": "delete", "collection": "com.example.live", "rkey": "b"},
        ]
        written = _write_records(pds, target, ops)

        def live_seen():
            live = [e for e in _by_did(client.events())[target] if e["type"] == "record" and e["live"]]
            return live if len(live) >= len(written) else None

        live = svc.wait_for(live_seen, timeout=60, what="live events")
        got = [(e["action"], f"{e['collection']}/{e['rkey']}", e.get("cid")) for e in live]
        assert got == [(w["action"], w["path"], w["cid"]) for w in written]
        assert live[2]["record"]["n"] == 3
    finally:
        client.stop()
        svc.stop()


def test_kill9_during_backfill_loses_nothing(pds, tmp_path):
    ledger = _load(pds, tmp_path, accounts=4, records=150, MODE="apply")
    dids = sorted(ledger["repos"])
    svc = make_service(pds, tmp_path).start()
    first = start_client(svc, tmp_path, dids)
    try:
        svc.wait_for(lambda: len(first.events()) >= 20, timeout=60, what="some events before the crash")
        svc.kill()
        first.stop()
        svc.start()
        second = start_client(svc, tmp_path, dids, TAP_ADD_REPOS="0")
        try:
            expected = {d: ledger["repos"][d]["records"] for d in dids}

            def complete():
                got = _state_from_events(first.events() + second.events())
                return all(got.get(d) == expected[d] for d in dids)

            svc.wait_for(complete, timeout=120, what="every record after kill -9")
        finally:
            second.stop()
    finally:
        first.stop()
        svc.stop()
