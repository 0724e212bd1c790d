"""End to end: the real service process against the real PDS + PLC, read by the official client.

Each test starts ``python -m bytewax.run flows.tap`` with its own data dir and port, writes to
the PDS through its public XRPC API, and checks what ``@atproto/tap`` 0.3.12 received.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.e2e_support import make_service, start_client, state_from_events

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



def test_backfill_then_live_with_official_client(pds, tmp_path):
    ledger = _load(pds, tmp_path, accounts=2, records=25)
    dids = sorted(ledger["repos"])
    svc = make_service(pds, tmp_path).start()
    client = start_client(svc, tmp_path, dids)
    try:
        expected = {d: ledger["repos"][d]["records"] for d in dids}

        def backfilled():
            got = state_from_events(client.events())
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


@pytest.mark.parametrize("spool", [None, "1"], ids=["in-memory", "spooled"])
def test_kill9_during_backfill_loses_nothing(pds, tmp_path, spool):
    """``spooled``: every CAR goes through files (TAP_BACKFILL_SPOOL_SIZE=1), as a huge repo's
    would; the files a kill -9 leaves behind are deleted when the service starts again."""
    ledger = _load(pds, tmp_path, accounts=4, records=150, MODE="apply")
    dids = sorted(ledger["repos"])
    svc = make_service(pds, tmp_path, **({} if spool is None else {"TAP_BACKFILL_SPOOL_SIZE": spool})).start()
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
                got = state_from_events(first.events() + second.events())
                return all(got.get(d) == expected[d] for d in dids)

            svc.wait_for(complete, timeout=120, what="every record after kill -9")
            spool_dir = tmp_path / "data" / "backfill-spool"
            svc.wait_for(lambda: not any(spool_dir.iterdir()), timeout=30, what="no spool file left")
            assert ("repo CAR spooled to disk" in svc.log_path.read_text(errors="replace")) == (spool is not None)
        finally:
            second.stop()
    finally:
        first.stop()
        svc.stop()


def _scenario_final_state(result: dict) -> dict[str, dict[str, str]]:
    return {d: r["records"] for d, r in result["repos"].items() if r.get("status") != "deleted"}


def _identity_events(events: list[dict], did: str) -> list[dict]:
    return [e for e in events if e["type"] == "identity" and e["did"] == did]


def test_full_network_scenario_every_event_kind(pds, tmp_path):
    """Service tracks everything from the firehose; the scenario drives creates, updates,
    deletes, a handle change, deactivate/activate, takedown and account deletion."""
    svc = make_service(pds, tmp_path, TAP_FULL_NETWORK="true").start()
    client = start_client(svc, tmp_path)
    try:
        result = pds.script("scenario.mjs")
        alice, bob, carol = (result["names"][k] for k in ("alice", "bob", "carol"))
        want = _scenario_final_state(result)

        def converged():
            evs = client.events()
            got = state_from_events(evs)
            return all(got.get(d, {}) == want[d] for d in (alice, bob)) and any(
                e["status"] == "deleted" for e in _identity_events(evs, carol))

        svc.wait_for(converged, timeout=120, what="consumer state equal to the PDS")
        evs = client.events()
        alice_handles = [e["handle"] for e in _identity_events(evs, alice)]
        assert result["aliceNewHandle"] in alice_handles
        bob_statuses = [e["status"] for e in _identity_events(evs, bob)]
        for s in ("deactivated", "takendown", "active"):
            assert s in bob_statuses, bob_statuses
        deleted = [e for e in _identity_events(evs, carol) if e["status"] == "deleted"]
        assert deleted and deleted[-1]["isActive"] is False
        # carol is no longer tracked
        svc.wait_for(lambda: svc.api("GET", f"/info/{carol}")[0] == 404, timeout=30, what="carol untracked")
        # every live event carries a valid rev and the official client parsed everything
        assert '"parseErrors":0' in client.stderr() or "parseErrors" not in client.stderr()
    finally:
        client.stop()
        svc.stop()


def test_signal_collection_discovers_repos(pds, tmp_path):
    """Repos that write to the signal collection are tracked by themselves; others are not."""
    svc = make_service(pds, tmp_path, TAP_SIGNAL_COLLECTION="com.example.thing").start()
    client = start_client(svc, tmp_path)
    try:
        result = pds.script("scenario.mjs")
        alice, bob = result["names"]["alice"], result["names"]["bob"]
        want = result["repos"][alice]["records"]
        svc.wait_for(lambda: state_from_events(client.events()).get(alice) == want, timeout=120,
                     what="alice (writes com.example.thing) fully synced")
        assert svc.api("GET", f"/info/{bob}")[0] == 404
        assert not [e for e in client.events() if e["did"] == bob]
    finally:
        client.stop()
        svc.stop()


def test_webhook_mode_delivers_to_receiver(pds, tmp_path):
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []
    auth_headers: list[str] = []
    fail_first = {"left": 2}
    lock = threading.Lock()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                auth_headers.append(self.headers.get("Authorization", ""))
                if fail_first["left"] > 0:
                    fail_first["left"] -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ledger = _load(pds, tmp_path, accounts=1, records=10)
    did = next(iter(ledger["repos"]))
    svc = make_service(pds, tmp_path, TAP_WEBHOOK_URL=f"http://127.0.0.1:{server.server_port}/hook",
                       TAP_ADMIN_PASSWORD="s3cret").start()
    try:
        assert svc.api("POST", "/repos/add", {"dids": [did]})[0] == 200

        def done():
            # the receiver fails the first two POSTs on purpose: wait for their retries too
            with lock:
                recs = {f"{e['record']['collection']}/{e['record']['rkey']}": e["record"]["cid"]
                        for e in received if e["type"] == "record"}
                identities = [e for e in received if e["type"] == "identity"]
            return recs == ledger["repos"][did]["records"] and identities

        svc.wait_for(done, timeout=90, what="webhook deliveries")
        want = "Basic " + base64.b64encode(b"admin:s3cret").decode()
        assert auth_headers and all(h == want for h in auth_headers)
        # historical events (the identity event included) may be posted concurrently (spec §6.7)
        assert [e["identity"]["handle"] for e in received if e["type"] == "identity"] == [ledger["repos"][did]["handle"]]
        # /channel is not available in webhook mode
        assert svc.api("GET", "/channel")[0] == 400
    finally:
        svc.stop()
        server.shutdown()


def _live_order_ok(events: list[dict]) -> bool:
    """Per repo, live events (first delivery of each id) never go back in rev."""
    seen: set[int] = set()
    last: dict[str, str] = {}
    for e in events:
        if e["type"] != "record" or not e["live"] or e["id"] in seen:
            continue
        seen.add(e["id"])
        if e["rev"] < last.get(e["did"], ""):
            return False
        last[e["did"]] = e["rev"]
    return True


def test_kill9_during_live_writes_loses_nothing(pds, tmp_path):
    """Full network: accounts are created and written to while the service is killed twice."""
    import subprocess
    import time as _time

    from tests.e2e_support import node_bin, HARNESS

    svc = make_service(pds, tmp_path, TAP_FULL_NETWORK="true").start()
    client = start_client(svc, tmp_path)
    out = tmp_path / "live-load.json"
    env = pds._env({"ACCOUNTS": "4", "RECORDS": "60", "MODE": "create", "CONCURRENCY": "4",
                    "UPDATES": "0.2", "DELETES": "0.1", "OUT_FILE": str(out)})
    writer = subprocess.Popen([node_bin(), str(HARNESS / "pds" / "load.mjs")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = [client]
    try:
        for _ in range(2):
            _time.sleep(1.5)
            svc.kill()
            clients[-1].stop()
            svc.start()
            clients.append(start_client(svc, tmp_path))
        assert writer.wait(300) == 0
        ledger = json.loads(out.read_text())
        want = {d: r["records"] for d, r in ledger["repos"].items()}

        def all_events():
            evs: list[dict] = []
            for c in clients:
                evs.extend(c.events())
            return evs

        svc.wait_for(lambda: all(state_from_events(all_events()).get(d, {}) == want[d] for d in want),
                     timeout=180, what="consumer state equal to the PDS after two kill -9")
        for c in clients:
            assert _live_order_ok(c.events())
    finally:
        if writer.poll() is None:
            writer.kill()
        for c in clients:
            c.stop()
        svc.stop()
