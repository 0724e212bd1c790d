"""The HTTP API (spec §4, §14 tests 1-6) on a real port over a fake flow database."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest

from connectors.api import CommandLog, basic_auth_ok
from store.db import close_all
from store.layout import command_key, meta_counter, meta_cursor_list_repos, pack_u64, unpack_u64
from tests.test_channel import Consumer, Stack, did_n, make_cfg

CLIENT = Path(os.environ.get("TAPFLOW_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "harness" / "client" / "run-client.sh"
UNAUTH = b'{"error":"Unauthorized","message":"atproto admin auth required, but missing or incorrect password"}\n'


@pytest.fixture
async def api(tmp_path):
    stacks = []

    async def make(**kw):
        directory = kw.pop("directory", None)
        s = await Stack(make_cfg(tmp_path, **kw), directory=directory).start()
        stacks.append(s)
        return s

    session = aiohttp.ClientSession()
    make.session = session
    yield make
    await session.close()
    for s in stacks:
        await s.stop()
    close_all()


async def req(make, s, method, path, **kw):
    async with make.session.request(method, s.url + path, **kw) as r:
        return r.status, await r.read(), r.headers


def commands(s) -> list[tuple[int, dict]]:
    return [(unpack_u64(k), orjson.loads(v)) for k, v in s.delivery.cf("commands").items()]


async def test_health(api):  # §14 test 1
    s = await api()
    st, body, h = await req(api, s, "GET", "/health")
    assert (st, body) == (200, b'{"status":"ok"}\n')
    assert h["Content-Type"].startswith("application/json")


async def test_add_and_remove_repos(api):  # §14 test 2
    s = await api()
    dids = [did_n(1), did_n(2), did_n(3)]
    st, body, _ = await req(api, s, "POST", "/repos/add", json={"dids": dids})
    assert (st, body) == (200, b"")
    st, body, _ = await req(api, s, "POST", "/repos/remove", json={"dids": dids[:1]})
    assert (st, body) == (200, b"")
    assert commands(s) == [(1, {"op": "add", "dids": dids}), (2, {"op": "remove", "dids": dids[:1]})]


async def test_command_seq_survives_restart_and_pruning(api, tmp_path):
    s = await api()
    await req(api, s, "POST", "/repos/add", json={"dids": [did_n(1)]})
    await req(api, s, "POST", "/repos/add", json={"dids": [did_n(2)]})
    # the flow applied everything: commands are pruned, the sequence must not restart
    b = s.fake.db.batch()
    b.put(b"control/cursor", pack_u64(2), s.fake.db.handle("meta"))
    s.fake.db.write(b)
    s.flow.catch_up()
    assert s.commands.prune() == 2
    assert commands(s) == []
    assert CommandLog(s.delivery, s.flow).seq == 2
    await req(api, s, "POST", "/repos/add", json={"dids": [did_n(3)]})
    assert commands(s) == [(3, {"op": "add", "dids": [did_n(3)]})]


@pytest.mark.parametrize("body,headers", [
    (b"", {}),
    (b'{"dids":[]}', {"Content-Type": "application/json"}),
    (b'{"dids":null}', {"Content-Type": "application/json; charset=utf-8"}),
    (b"{}", {"Content-Type": "application/json"}),
])
async def test_empty_add_is_ok(api, body, headers):  # Tap: 500; improvement
    s = await api()
    st, out, _ = await req(api, s, "POST", "/repos/add", data=body, headers=headers)
    assert (st, out) == (200, b"")
    assert commands(s) == []


@pytest.mark.parametrize("body,headers,status,message", [
    (b'{"dids":["did:plc:x"]}', {}, 415, "Unsupported Media Type"),
    (b'{"dids":["did:plc:x"]}', {"Content-Type": "text/plain"}, 415, "Unsupported Media Type"),
    (b"dids=did:plc:x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Unsupported Media Type"),
    (b"{nope", {"Content-Type": "application/json"}, 400, None),
    (b'{"dids":"did:plc:x"}', {"Content-Type": "application/json"}, 400, None),
    (b'{"dids":[1]}', {"Content-Type": "application/json"}, 400, None),
    (b"[]", {"Content-Type": "application/json"}, 400, None),
    (b'{"dids":["alice"]}', {"Content-Type": "application/json"}, 400, "invalid DID: 'alice'"),
])
async def test_bad_add_bodies(api, body, headers, status, message):
    s = await api()
    st, out, h = await req(api, s, "POST", "/repos/add", data=body, headers=headers)
    assert st == status
    assert h["Content-Type"].startswith("application/json")
    msg = orjson.loads(out)["message"]
    if message:
        assert msg == message
    assert commands(s) == []


async def test_body_limit(api):
    s = await api(max_body_size=1024)
    big = orjson.dumps({"dids": [did_n(i) for i in range(100)]})
    st, out, _ = await req(api, s, "POST", "/repos/add", data=big, headers={"Content-Type": "application/json"})
    assert st == 413
    assert orjson.loads(out) == {"message": "Request Entity Too Large"}


async def test_not_found_and_method_not_allowed(api):
    s = await api()
    assert (await req(api, s, "GET", "/nope"))[:2] == (404, b'{"message":"Not Found"}\n')
    assert (await req(api, s, "GET", "/health/"))[:2] == (404, b'{"message":"Not Found"}\n')
    st, body, _ = await req(api, s, "GET", "/repos/add")
    assert (st, body) == (405, b'{"message":"Method Not Allowed"}\n')
    st, body, _ = await req(api, s, "POST", "/health")
    assert (st, body) == (405, b'{"message":"Method Not Allowed"}\n')


async def test_stats(api):  # §14 tests 3, 4, 6
    s = await api(disable_acks=True)
    fake = s.fake
    fake.put_repo(did_n(1), state="active")
    fake.put_repo(did_n(2), state="pending")
    b = fake.db.batch()
    meta = fake.db.handle("meta")
    b.put(meta_counter("records", 0), pack_u64(2), meta)
    b.put(meta_counter("records", 3), pack_u64(1), meta)
    b.put(meta_counter("resync_buf", 1), pack_u64(1), meta)
    b.put(meta_counter("resync_buf", 2), pack_u64(1), meta)
    b.put(b"stats/firehose_seq", pack_u64(12345), meta)
    fake.db.write(b)
    for path, expected in [("/stats/repo-count", {"repo_count": 2}), ("/stats/record-count", {"record_count": 3}),
                           ("/stats/resync-buffer", {"resync_buffer": 2}),
                           ("/stats/cursors", {"firehose": 12345, "list_repos": ""})]:
        st, body, _ = await req(api, s, "GET", path)
        assert st == 200 and orjson.loads(body) == expected, path
        assert body.endswith(b"}\n")


async def test_stats_outbox_buffer(api):  # §14 test 5: fire-and-forget, no client
    s = await api(disable_acks=True)
    s.fake.push(did_n(1), 4)
    await asyncio.sleep(0.05)
    st, body, _ = await req(api, s, "GET", "/stats/outbox-buffer")
    assert (st, orjson.loads(body)) == (200, {"outbox_buffer": 4})
    c = await Consumer.connect(s.url)
    await c.wait(4, 1.0)
    for _ in range(100):
        st, body, _ = await req(api, s, "GET", "/stats/outbox-buffer")
        if orjson.loads(body) == {"outbox_buffer": 0}:
            break
        await asyncio.sleep(0.02)
    assert orjson.loads(body) == {"outbox_buffer": 0}
    await c.close()


async def test_stats_cursors_list_repos(api):
    s = await api(full_network=True)
    b = s.fake.db.batch()
    b.put(meta_cursor_list_repos(s.cfg.relay_url), b"abc123", s.fake.db.handle("meta"))
    s.fake.db.write(b)
    st, body, _ = await req(api, s, "GET", "/stats/cursors")
    assert orjson.loads(body) == {"firehose": 0, "list_repos": "abc123"}


async def test_info(api):
    s = await api()
    d = did_n(1)
    st, body, _ = await req(api, s, "GET", f"/info/{d}")
    assert (st, body) == (404, b'{"message":"repo not found"}\n')
    s.fake.put_repo(d, state="error", error="boom", retries=3, records=7, status="deactivated", handle="")
    st, body, _ = await req(api, s, "GET", f"/info/{d}")
    assert st == 200
    assert body == (b'{"did":"%s","error":"boom","handle":"","records":7,"retries":3,"rev":"3kb3fge5lm32x",'
                    b'"state":"error","status":"deactivated"}\n' % d.encode())


async def test_list_repos(api):
    s = await api()
    dids = sorted(did_n(i) for i in range(5))
    for d in dids:
        s.fake.put_repo(d)
    st, body, _ = await req(api, s, "GET", "/repos?limit=2")
    page = orjson.loads(body)
    assert [r["did"] for r in page["repos"]] == dids[:2] and page["cursor"] == dids[1]
    assert set(page["repos"][0]) == {"did", "handle", "rev", "state", "status", "records"}
    st, body, _ = await req(api, s, "GET", f"/repos?limit=2&cursor={page['cursor']}")
    page = orjson.loads(body)
    assert [r["did"] for r in page["repos"]] == dids[2:4]
    st, body, _ = await req(api, s, "GET", f"/repos?limit=2&cursor={page['cursor']}")
    page = orjson.loads(body)
    assert [r["did"] for r in page["repos"]] == dids[4:] and "cursor" not in page
    assert (await req(api, s, "GET", "/repos?limit=0"))[0] == 400
    assert (await req(api, s, "GET", "/repos?limit=x"))[0] == 400


class FakeDirectory:
    def __init__(self, docs: dict) -> None:
        self.docs = docs

    async def resolve(self, did: str):
        from protocol.identity import DidNotFound, DidResolutionFailed, parse_did_doc

        if did not in self.docs:
            raise DidNotFound(did)
        if self.docs[did] is None:
            raise DidResolutionFailed("PLC down")
        return parse_did_doc(self.docs[did], did)


async def test_resolve(api):
    d = did_n(1)
    doc = {"id": d, "alsoKnownAs": ["at://alice.test"],
           "verificationMethod": [{"id": d + "#atproto", "type": "Multikey", "controller": d,
                                   "publicKeyMultibase": "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}],
           "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                        "serviceEndpoint": "https://pds.example.com"}]}
    s = await api(directory=FakeDirectory({d: doc, did_n(2): None}))
    assert (await req(api, s, "GET", "/resolve/not-a-did"))[:2] == (400, b'{"message":"improperly formatted DID"}\n')
    assert (await req(api, s, "GET", f"/resolve/{did_n(3)}"))[:2] == (404, b'{"message":"DID not found"}\n')
    assert (await req(api, s, "GET", f"/resolve/{did_n(2)}"))[:2] == (500, b'{"message":"failed to resolve DID"}\n')
    st, body, _ = await req(api, s, "GET", f"/resolve/{d}")
    assert st == 200
    got = orjson.loads(body)
    assert got["id"] == d and got["alsoKnownAs"] == ["at://alice.test"]
    assert got["service"] == doc["service"]
    assert got["verificationMethod"][0]["id"] == d + "#atproto"


async def test_channel_in_other_modes(api, tmp_path):
    s = await api(webhook_url="http://127.0.0.1:9/hook")
    st, body, _ = await req(api, s, "GET", "/channel")
    assert (st, body) == (400, b'{"message":"websocket not available in webhook mode"}\n')


async def test_channel_not_an_upgrade(api):
    s = await api()
    st, body, _ = await req(api, s, "GET", "/channel")
    assert (st, body) == (400, b"Bad Request\n")


# --- auth -------------------------------------------------------------------------------------------

def basic(pw: str, user: str = "admin") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_basic_auth_parsing():
    assert basic_auth_ok(basic("pw")["Authorization"], "pw")
    assert basic_auth_ok("basic " + base64.b64encode(b"admin:pw").decode(), "pw")
    assert not basic_auth_ok(basic("pw", "root")["Authorization"], "pw")
    assert not basic_auth_ok(basic("px")["Authorization"], "pw")
    assert not basic_auth_ok("Bearer x", "pw")
    assert not basic_auth_ok("Basic !!!", "pw")
    assert not basic_auth_ok("Basic " + base64.b64encode(b"adminpw").decode(), "pw")
    assert not basic_auth_ok(None, "pw")


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/nope"), ("GET", "/channel"),
                                         ("POST", "/repos/add"), ("GET", "/stats/repo-count")])
async def test_auth_on_every_route(api, method, path):
    s = await api(admin_password="secret")
    for headers in ({}, basic("wrong"), basic("secret", "root")):
        st, body, h = await req(api, s, method, path, headers=headers)
        assert (st, body) == (401, UNAUTH)
        assert h["WWW-Authenticate"] == 'Basic realm="admin", charset="UTF-8"'
        assert h["Content-Type"] == "application/json"
    st, _, _ = await req(api, s, method, path, headers=basic("secret"))
    assert st != 401


async def test_auth_websocket(api):
    s = await api(admin_password="secret")
    session = aiohttp.ClientSession()
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await session.ws_connect(s.url.replace("http", "ws") + "/channel")
    assert e.value.status == 401
    ws = await session.ws_connect(s.url.replace("http", "ws") + "/channel", headers=basic("secret"))
    await ws.close()
    await session.close()


# --- the official client (@atproto/tap 0.3.12) ------------------------------------------------------

async def _run_client(*args: str, env: dict, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec("bash", str(CLIENT), *args, env={**os.environ, **env},
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.e2e
async def test_official_client_api_calls(api):
    d = did_n(1)
    doc = {"id": d, "alsoKnownAs": ["at://alice.test"],
           "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://pds.example.com"}]}
    s = await api(admin_password="secret", directory=FakeDirectory({d: doc}))
    env = {"TAP_URL": s.url, "TAP_ADMIN_PASSWORD": "secret"}
    code, out, err = await _run_client("api", "add", d, env=env)
    assert code == 0, err
    assert commands(s) == [(1, {"op": "add", "dids": [d]})]
    s.fake.put_repo(d, records=2)
    code, out, err = await _run_client("api", "info", d, env=env)
    assert code == 0, err
    assert '"records":2' in out and '"state":"active"' in out
    code, out, err = await _run_client("api", "resolve", did_n(2), env=env)
    assert code == 0 and out.strip().endswith("null"), (out, err)  # 404 -> null
    code, out, err = await _run_client("api", "resolve", d, env=env)
    assert code == 0 and "pds.example.com" in out, err
    code, out, err = await _run_client("api", "remove", d, env=env)
    assert code == 0, err
    code, out, err = await _run_client("api", "info", d, env={**env, "TAP_ADMIN_PASSWORD": "wrong"})
    assert code == 1


@pytest.mark.e2e
async def test_official_client_wrong_password_exits_with_401(api):
    s = await api(admin_password="secret")
    code, out, err = await _run_client(env={"TAP_URL": s.url, "TAP_ADMIN_PASSWORD": "wrong", "TIMEOUT_S": "20",
                                            "TAP_ADD_REPOS": "0"})
    assert code == 1, (out, err)
    assert "401" in err


@pytest.mark.e2e
async def test_delivery_child_metrics_logs_and_clean_stop(tmp_path):
    """The real child: /metrics on TAP_METRICS_LISTEN when run alone, JSON log lines, and a
    clean exit on SIGTERM with the taken events flushed to ``acks``."""
    from tests.test_channel import Child, FakeFlow, _free_port

    data = tmp_path / "data"
    fake = FakeFlow(data)
    mport = _free_port()
    child = await Child(data, _free_port(), TAP_DISABLE_ACKS="true", TAP_METRICS_LISTEN=f"127.0.0.1:{mport}").ready()
    c = await Consumer.connect(child.url)
    ids = fake.push(did_n(1), 3)
    assert [m["id"] for m in await c.wait(3, 5.0)] == ids
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
            text = await r.text()
    assert r.status == 200
    assert "tap_events_delivered_total 3.0" in text
    assert "tapflow_channel_clients 1.0" in text
    code = await asyncio.to_thread(child.stop)
    assert code == 0
    await asyncio.wait_for(c._task, 5)
    assert c.ws.close_code in (None, 1006)  # no close frame on shutdown
    await c.close()
    lines = Path(child.log.name).read_text().splitlines()
    logs = [orjson.loads(line) for line in lines if line.startswith("{")]
    assert logs and all("level" in x and "msg" in x for x in logs)
    assert any(x["msg"] == "delivery stopped" for x in logs)
    fake.apply_acks()  # the acks written before exit reach the flow
    assert fake.rows() == 0


def test_clean_stale_secondaries(tmp_path):
    from connectors.delivery_main import clean_stale_secondaries

    sec = tmp_path / "secondary"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in (f"flow-{dead.pid}", f"flow-{os.getpid()}", f"delivery-{os.getppid()}", "other"):
        (sec / name).mkdir(parents=True)
    assert clean_stale_secondaries(str(tmp_path)) == 1
    assert sorted(p.name for p in sec.iterdir()) == sorted([f"flow-{os.getpid()}", f"delivery-{os.getppid()}", "other"])
