"""tapflow_client against a small Tap server on a real socket (aiohttp), plus parsing.

``FakeTap`` implements just enough of the contract: events as text frames, acks recorded
per connection, redelivery of unacked events on every new connection, 401 on a wrong
password, dropping the TCP connection on demand, optional silence to pings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tapflow_client import (AuthError, ChannelClosed, HandlerError, IdentityEvent, NotFound, ParseError,
                            RecordEvent, RepoInfo, SyncTapClient, TapClient, TapHTTPError, TapUnreachable,
                            check_admin_auth, format_admin_auth, parse_event, parse_webhook_body, webhook_app)
from tapflow_client import _lex

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
CID = "bafyreibyxjqwqfygc5yqlvbgygeqwcb3drstfyatkora4voxoxt7brxdyy"
RAW_CID = "bafkreibmqzenca7d3v5nq5ta3ihre2quio3negwbxu7maagf4jhcg45jbq"
FAST = dict(backoff_base=0.05, max_reconnect_seconds=0.2, heartbeat_interval=5.0)


# --- frames --------------------------------------------------------------------------------

_DROP = object()


def rec_frame(eid: int = 1, top: dict | None = None, **over: Any) -> str:
    body: dict[str, Any] = {"live": True, "did": DID, "rev": "3lbgkl2zuqs2a", "collection": "app.bsky.feed.post",
                            "rkey": "3lbgkl2zuqs2a", "action": "create", "cid": CID,
                            "record": {"$type": "app.bsky.feed.post", "text": "hi",
                                       "createdAt": "2024-10-07T12:00:00.000Z"}}
    for k, v in over.items():
        if v is _DROP:
            body.pop(k, None)
        else:
            body[k] = v
    ev: dict[str, Any] = {"id": eid, "type": "record", "record": body}
    for k, v in (top or {}).items():
        if v is _DROP:
            ev.pop(k, None)
        else:
            ev[k] = v
    return json.dumps(ev)


def ident_frame(eid: int = 2, **over: Any) -> str:
    body: dict[str, Any] = {"did": DID, "handle": "alice.test", "is_active": True, "status": "active"}
    for k, v in over.items():
        if v is _DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return json.dumps({"id": eid, "type": "identity", "identity": body})


def body_frame(value: Any) -> str:
    return rec_frame(record={"$type": "x.y.z", "v": value})


# Every variant of tap-client.md §1.7 (probe_parse.mjs), with the official verdict.
ACCEPTED = {
    "record create (baseline)": rec_frame(),
    "delete without cid/record": rec_frame(action="delete", cid=_DROP, record=_DROP),
    "delete with cid+record": rec_frame(action="delete"),
    "create without cid/record": rec_frame(cid=_DROP, record=_DROP),
    "rev empty": rec_frame(rev=""),
    "rkey self": rec_frame(rkey="self"),
    "extra field in record": rec_frame(seq=5),
    "extra field at top": rec_frame(top={"ts": 123}),
    "id 0": rec_frame(top={"id": 0}),
    "id negative": rec_frame(top={"id": -1}),
    "record and identity both present": json.dumps({**json.loads(rec_frame()),
                                                    "identity": json.loads(ident_frame())["identity"]}),
    "$link": body_frame({"$link": CID}),
    "$bytes unpadded": body_frame({"$bytes": "aGVsbG8"}),
    "$bytes padded": body_frame({"$bytes": "aGVsbG8="}),
    "typed blob": body_frame({"$type": "blob", "ref": {"$link": RAW_CID}, "mimeType": "image/jpeg", "size": 10}),
    "legacy blob": body_frame({"cid": RAW_CID, "mimeType": "image/jpeg"}),
    "record without $type": rec_frame(record={"text": "hi"}),
    "identity baseline": ident_frame(),
    "handle.invalid": ident_frame(handle="handle.invalid"),
    "handle uppercase": ident_frame(handle="Alice.Test"),
    "deleted + inactive": ident_frame(status="deleted", is_active=False),
}
REJECTED = {
    "record null": rec_frame(record=None),
    "cid empty": rec_frame(cid=""),
    "cid not a CID": rec_frame(cid="notacid"),
    "live missing": rec_frame(live=_DROP),
    "live as string": rec_frame(live="true"),
    "action put": rec_frame(action="put"),
    "collection not NSID": rec_frame(collection="post"),
    "rkey dot": rec_frame(rkey="."),
    "did invalid": rec_frame(did="alice"),
    "id string": rec_frame(top={"id": "1"}),
    "id float": rec_frame(top={"id": 1.5}),
    "id above 2^53": '{"id":9007199254740993,"type":"record","record":%s}' % json.dumps(json.loads(rec_frame())["record"]),
    "type commit": rec_frame(top={"type": "commit"}),
    "float in record": body_frame(1.5),
    "invalid $link": body_frame({"$link": "zzz"}),
    "blob ref as plain string": body_frame({"$type": "blob", "ref": RAW_CID, "mimeType": "image/jpeg", "size": 10}),
    "handle empty": ident_frame(handle=""),
    "handle missing": ident_frame(handle=_DROP),
    "status throttled": ident_frame(status="throttled"),
    "status desynchronized": ident_frame(status="desynchronized"),
    "isActive camelCase": ident_frame(is_active=_DROP, isActive=True),
    "not JSON": "not valid json",
}


# --- parsing -------------------------------------------------------------------------------

def test_parse_record_event_fields():
    ev = parse_event(rec_frame(7))
    assert isinstance(ev, RecordEvent) and ev.type == "record"
    assert (ev.id, ev.action, ev.did, ev.collection, ev.rkey, ev.cid, ev.live) == (
        7, "create", DID, "app.bsky.feed.post", "3lbgkl2zuqs2a", CID, True)
    assert ev.record == {"$type": "app.bsky.feed.post", "text": "hi", "createdAt": "2024-10-07T12:00:00.000Z"}
    assert ev.uri == f"at://{DID}/app.bsky.feed.post/3lbgkl2zuqs2a"
    assert parse_event(json.dumps(ev.to_wire())) == ev
    d = parse_event(rec_frame(8, action="delete", cid=_DROP, record=_DROP))
    assert d.record is None and d.cid is None and d.action == "delete"
    assert "record" not in d.to_wire()["record"] and "cid" not in d.to_wire()["record"]
    hash(d)  # frozen and hashable (the record dict is left out of the hash)


def test_parse_identity_event_fields():
    ev = parse_event(ident_frame(3, status="deactivated", is_active=False).encode())
    assert isinstance(ev, IdentityEvent) and ev.type == "identity"
    assert (ev.id, ev.did, ev.handle, ev.is_active, ev.status) == (3, DID, "alice.test", False, "deactivated")
    assert parse_event(json.dumps(ev.to_wire())) == ev
    with pytest.raises(Exception):
        ev.handle = "x"  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_official_matrix_accepted(name):
    parse_event(ACCEPTED[name])


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_official_matrix_rejected(name):
    with pytest.raises(ParseError) as e:
        parse_event(REJECTED[name])
    assert str(e.value).startswith("invalid Tap event")


def test_parse_numbers_like_javascript():
    # JSON.parse reads 1.0 and 1e0 as the integer 1; 2^53-1 is the largest safe integer
    rest = json.dumps(json.loads(rec_frame())["record"])
    assert parse_event('{"id":1.0,"type":"record","record":%s}' % rest).id == 1
    assert parse_event('{"id":1e0,"type":"record","record":%s}' % rest).id == 1
    assert parse_event('{"id":9007199254740991,"type":"record","record":%s}' % rest).id == 2**53 - 1
    for bad in ("9007199254740992", "1e400", "NaN", "true"):
        with pytest.raises(ParseError):
            parse_event('{"id":%s,"type":"record","record":%s}' % (bad, rest))
    with pytest.raises(ParseError, match="non-integer"):
        parse_event('{"id":1,"type":"record","x":{"y":[0.5]},"record":%s}' % rest)


def test_parse_special_objects():
    assert parse_event(body_frame({"$bytes": "aGk="})).record["v"] == {"$bytes": "aGk="}  # type: ignore[index]
    for bad in ({"$bytes": "aGk==="}, {"$bytes": "a"}, {"$bytes": None}, {"$bytes": "aGk", "x": 1},
                {"$link": CID, "x": 1}, {"$link": None}, {"$link": CID.upper()}, {"$type": ""}, {"$type": 5},
                {"$type": "blob", "ref": {"$link": CID}, "mimeType": "image/jpeg", "size": 1},  # not a raw CID
                {"$type": "blob", "ref": {"$link": RAW_CID}, "mimeType": "jpeg", "size": 1},
                {"$type": "blob", "ref": {"$link": RAW_CID}, "mimeType": "a/b", "size": -1},
                {"__proto__": 1}):
        with pytest.raises(ParseError):
            parse_event(body_frame(bad))
    # a record that is itself a link or bytes is not an object
    for bad in ({"$link": CID}, {"$bytes": "aGk"}):
        with pytest.raises(ParseError):
            parse_event(rec_frame(record=bad))


def test_cid_strings():
    assert _lex.is_cid_string(CID) and _lex.is_cid_string(RAW_CID)
    assert _lex.is_cid_string("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")  # v0 is canonical in base58
    assert not _lex.is_cid_string("zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA")  # v1, not base32
    assert not _lex.is_cid_string(CID[:-1]) and not _lex.is_cid_string(CID + "a")
    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "atproto-interop" / "syntax"
    valid = fixtures / "cid_syntax_valid.txt"
    if valid.exists():
        for line in valid.read_text().splitlines():
            if line and not line.startswith("#") and line.startswith("bafy"):
                assert _lex.is_cid_string(line), line


def test_identifier_syntax_against_interop_fixtures():
    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "atproto-interop" / "syntax"
    if not fixtures.exists():
        pytest.skip("no interop fixtures")
    checks = {"did": _lex.is_did, "handle": _lex.is_handle, "nsid": _lex.is_nsid, "recordkey": _lex.is_record_key}
    for kind, fn in checks.items():
        for verdict in ("valid", "invalid"):
            for line in (fixtures / f"{kind}_syntax_{verdict}.txt").read_text().splitlines():
                if not line or line.startswith("#"):
                    continue
                assert fn(line) is (verdict == "valid"), (kind, verdict, line)


def _oracle_dir() -> Path | None:
    home = Path(os.environ.get("TAPFLOW_HARNESS_HOME", Path.home() / ".cache" / "tapflow-harness"))
    d = home / "client"
    if shutil.which("node") and (d / "node_modules" / "@atproto" / "tap" / "dist" / "index.js").exists():
        return d
    return None


_ORACLE = """
const base = process.argv[2]
const { lexParse } = await import(base + '/node_modules/@atproto/lex/dist/index.js')
const { parseTapEvent } = await import(base + '/node_modules/@atproto/tap/dist/index.js')
let input = ''
for await (const c of process.stdin) input += c
console.log(JSON.stringify(JSON.parse(input).map((f) => {
  try { parseTapEvent(lexParse(f, { strict: true })); return true } catch { return false } })))
"""


def _differential_corpus() -> list[str]:
    frames = list(ACCEPTED.values()) + list(REJECTED.values())
    link = {"$link": CID}
    frames += [rec_frame(**{k: link}) for k in ("rev", "rkey", "did", "collection", "action", "cid")]
    frames += [rec_frame(collection=c) for c in ("a.b.c", "a.b.3c", "3a.b.c", "a.b.c-d", "app..bsky.post", "a.b.c.")]
    frames += [rec_frame(rkey=k) for k in ("..", "a" * 512, "a" * 513, "a/b", "~:_.-", "")]
    frames += [ident_frame(handle=h) for h in ("alice", "alice.test.", "a-.test", "alice.123", "xn--ls8h.test")]
    # multiformats keeps the source string of a parsed CID: padding survives toString()
    nonminimal = "b" + base64.b32encode(bytes([1, 0xF1, 0x00]) + _lex.parse_cid(CID)[2]).decode().rstrip("=").lower()
    for c in (CID + "=", CID + "====", nonminimal, "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA"):
        frames += [rec_frame(cid=c), body_frame({"$link": c}), rec_frame(rkey={"$link": c})]
    rnd = random.Random(1)
    alphabet = "ABCabc012+/=-_ !"
    frames += [body_frame({"$bytes": "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 9)))})
               for _ in range(150)]
    b32 = "abcdefghijklmnopqrstuvwxyz234567"
    for base in (CID, RAW_CID, "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"):
        for _ in range(60):
            s = list(base)
            pos = rnd.randrange(len(s))
            op = rnd.randint(0, 2)
            if op == 0:
                s[pos] = rnd.choice(b32 + "AZ19")
            elif op == 1:
                del s[pos]
            else:
                s = s[:rnd.randint(1, len(s))]
            frames += [rec_frame(cid="".join(s)), body_frame({"$link": "".join(s)})]
    return frames


def test_parse_agrees_with_the_official_client():
    """Differential: the real @atproto/tap parser (node + harness) decides every frame."""
    d = _oracle_dir()
    if d is None:
        pytest.skip("node or the harness client (@atproto/tap) is not installed")
    frames = _differential_corpus()
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"tapflow-oracle-{os.getpid()}.mjs"
    script.write_text(_ORACLE)
    try:
        out = subprocess.run(["node", str(script), str(d)], input=json.dumps(frames), capture_output=True,
                             text=True, timeout=60)
    finally:
        script.unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr
    official = json.loads(out.stdout)
    mismatches = []
    for frame, ok in zip(frames, official):
        try:
            parse_event(frame)
            mine = True
        except ParseError:
            mine = False
        if mine != ok:
            mismatches.append((ok, frame[:200]))
    assert not mismatches, mismatches
    assert sum(official) > 30 and len(frames) - sum(official) > 30


def test_repo_info_schema():
    info = RepoInfo.from_json({"did": DID, "handle": "a.test", "state": "active", "rev": "3l", "records": 3,
                               "error": "", "retries": 0, "status": "active", "extra": 1})
    assert info.records == 3 and info.status == "active"
    assert RepoInfo.from_json({"did": DID, "handle": "", "state": "pending", "rev": "", "records": 0}).error is None
    for bad in ({"records": "3"}, {"error": None}, {"handle": None}, {"retries": 1.5}):
        with pytest.raises(ParseError):
            RepoInfo.from_json({"did": DID, "handle": "a.test", "state": "active", "rev": "3l", "records": 3, **bad})


# --- webhook helpers -----------------------------------------------------------------------

def test_check_admin_auth():
    hdr = format_admin_auth("secret")
    assert hdr == "Basic YWRtaW46c2VjcmV0"  # what Tap and the official client send
    assert check_admin_auth(hdr, "secret")
    assert check_admin_auth(hdr[len("Basic "):], "secret")  # prefix optional, like assureAdminAuth
    assert not check_admin_auth(hdr, "Secret")
    assert not check_admin_auth(None, "secret") and not check_admin_auth("", "secret")
    assert not check_admin_auth("Basic " + base64.b64encode(b"root:secret").decode(), "secret")
    assert not check_admin_auth("Basic !!!notbase64", "secret")
    assert check_admin_auth(format_admin_auth("pa:ss"), "pa:ss")


def test_parse_webhook_body():
    assert parse_webhook_body(rec_frame(5).encode()).id == 5
    with pytest.raises(ParseError):
        parse_webhook_body(b"{}")


async def test_webhook_app_acks_only_after_handler():
    seen: list[int] = []

    async def handler(ev):
        if ev.id == 2:
            raise RuntimeError("db down")
        seen.append(ev.id)

    runner = web.AppRunner(webhook_app(handler, password="pw"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/"
    auth = {"Authorization": format_admin_auth("pw"), "Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=rec_frame(1), headers=auth) as r:
                assert r.status == 200
            async with s.post(url, data=rec_frame(2), headers=auth) as r:
                assert r.status == 500
            async with s.post(url, data="nope", headers=auth) as r:
                assert r.status == 400
            async with s.post(url, data=rec_frame(3)) as r:
                assert r.status == 401
    finally:
        await runner.cleanup()
    assert seen == [1]


# --- a small Tap server ----------------------------------------------------------------------

class FakeTap:
    def __init__(self, password: str | None = None, answer_pings: bool = True):
        self.password = password
        self.answer_pings = answer_pings
        self.queue: asyncio.Queue[tuple[int | None, str]] = asyncio.Queue()
        self.unacked: dict[int, str] = {}
        self.acks: list[tuple[int, int]] = []  # (connection number, id)
        self.raw_client_frames: list[str] = []
        self.connections = 0
        self.upgrade_auth: list[str | None] = []
        self.http_log: list[tuple[str, str, Any, dict]] = []
        self.repos: dict[str, dict] = {}
        self.handles: dict[str, str] = {}
        self.sockets: list[web.WebSocketResponse] = []
        self.transports: list[asyncio.Transport] = []
        self.acked_event = asyncio.Event()
        self.close_with: int | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, frame: str, eid: int | None = None) -> None:
        if eid is None:
            try:
                eid = json.loads(frame).get("id")
            except ValueError:
                eid = None
        self.queue.put_nowait((eid if isinstance(eid, int) else None, frame))

    def acked_ids(self) -> list[int]:
        return [i for _, i in self.acks]

    async def wait_acks(self, n: int, timeout: float = 5.0) -> None:
        async def _wait():
            while len(self.acks) < n:
                self.acked_event.clear()
                await self.acked_event.wait()
        await asyncio.wait_for(_wait(), timeout)

    async def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        async def _wait():
            while self.connections < n:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(_wait(), timeout)

    def drop(self) -> None:
        """Drop every channel connection at the TCP level (no close frame)."""
        for t in self.transports:
            t.abort()

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if self.password is not None:
            hdr = request.headers.get("Authorization")
            if not check_admin_auth(hdr, self.password):
                return web.json_response({"error": "Unauthorized", "message": "atproto admin auth required, but "
                                          "missing or incorrect password"}, status=401,
                                         headers={"WWW-Authenticate": 'Basic realm="admin", charset="UTF-8"'})
        return await handler(request)

    async def start(self) -> "FakeTap":
        app = web.Application(middlewares=[self.auth])
        app.router.add_get("/channel", self.channel)
        app.router.add_post("/repos/add", self.add)
        app.router.add_post("/repos/remove", self.remove)
        app.router.add_get("/info/{did}", self.info)
        app.router.add_get("/resolve/{did}", self.resolve)
        app.router.add_get("/repos", self.list_repos)
        app.router.add_get("/health", self.health)
        app.router.add_get("/xrpc/com.atproto.identity.resolveHandle", self.resolve_handle)
        for name, body in (("repo-count", {"repo_count": 3}), ("record-count", {"record_count": 42}),
                           ("outbox-buffer", {"outbox_buffer": 7}), ("resync-buffer", {"resync_buffer": 1}),
                           ("cursors", {"firehose": 1234, "list_repos": ""})):
            app.router.add_get(f"/stats/{name}", self._stat(body))
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.drop()
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    @staticmethod
    def _stat(body: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(body)
        return handler

    async def resolve_handle(self, request: web.Request) -> web.Response:
        did = self.handles.get(request.query.get("handle", ""))
        if did is None:
            return web.json_response({"error": "InvalidRequest", "message": "Unable to resolve handle"}, status=400)
        return web.json_response({"did": did})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _log(self, request: web.Request, body: Any) -> None:
        self.http_log.append((request.method, request.path_qs, body, dict(request.headers)))

    async def add(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._log(request, body)
        for did in body["dids"]:
            self.repos.setdefault(did, {"did": did, "handle": "handle.invalid", "state": "pending", "rev": "",
                                        "records": 0, "error": "", "retries": 0, "status": "active"})
        return web.Response(status=200)

    async def remove(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._log(request, body)
        for did in body["dids"]:
            self.repos.pop(did, None)
        return web.Response(status=200)

    async def info(self, request: web.Request) -> web.Response:
        self._log(request, None)
        repo = self.repos.get(request.match_info["did"])
        if repo is None:
            return web.json_response({"message": "repo not found"}, status=404)
        return web.json_response(repo)

    async def resolve(self, request: web.Request) -> web.Response:
        self._log(request, None)
        did = request.match_info["did"]
        if did not in self.repos:
            return web.json_response({"message": "DID not found"}, status=404)
        return web.json_response({"id": did, "alsoKnownAs": ["at://alice.test"]})

    async def list_repos(self, request: web.Request) -> web.Response:
        self._log(request, None)
        limit = int(request.query.get("limit", "2"))
        cursor = request.query.get("cursor", "")
        dids = sorted(d for d in self.repos if d > cursor)
        page = dids[:limit]
        nxt = page[-1] if len(dids) > limit else None
        # like tapflow's listing: no error/retries (those come from /info)
        rows = [{k: v for k, v in self.repos[d].items() if k not in ("error", "retries")} for d in page]
        out: dict[str, Any] = {"repos": rows}
        if nxt:
            out["cursor"] = nxt
        return web.json_response(out)

    async def channel(self, request: web.Request) -> web.StreamResponse:
        self.upgrade_auth.append(request.headers.get("Authorization"))
        ws = web.WebSocketResponse(autoping=self.answer_pings)
        await ws.prepare(request)
        self.connections += 1
        conn = self.connections
        self.sockets.append(ws)
        assert request.transport is not None
        self.transports.append(request.transport)

        async def sender():
            for eid in sorted(self.unacked):  # redelivery of everything unacked, on every connection
                await ws.send_str(self.unacked[eid])
            while True:
                eid, frame = await self.queue.get()
                if eid is not None:
                    self.unacked[eid] = frame
                await ws.send_str(frame)
                if self.close_with is not None:
                    await asyncio.sleep(0.05)
                    await ws.close(code=self.close_with)
                    return

        task = asyncio.ensure_future(sender())
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.raw_client_frames.append(msg.data)
                    data = json.loads(msg.data)
                    if data.get("type") == "ack":
                        self.acks.append((conn, data["id"]))
                        self.unacked.pop(data["id"], None)
                        self.acked_event.set()
        finally:
            task.cancel()
        return ws


@pytest.fixture
async def tap():
    server = await FakeTap().start()
    yield server
    await server.stop()


@pytest.fixture
async def secret_tap():
    server = await FakeTap(password="secret").start()
    yield server
    await server.stop()


async def _run_until(channel, cond, timeout: float = 5.0) -> None:
    """Run the channel until ``cond()`` holds, then stop it."""
    task = asyncio.ensure_future(channel.run())
    try:
        async def _wait():
            while not cond():
                if task.done():
                    task.result()
                    return
                await asyncio.sleep(0.01)
        await asyncio.wait_for(_wait(), timeout)
    finally:
        await channel.stop()
        await asyncio.wait_for(task, 5)


# --- HTTP methods ------------------------------------------------------------------------------

async def test_http_methods(tap):
    async with TapClient(tap.url) as client:
        await client.add_repos([DID, "did:plc:bbb", "did:plc:ccc"])
        method, path, body, headers = tap.http_log[-1]
        assert (method, path, body) == ("POST", "/repos/add", {"dids": [DID, "did:plc:bbb", "did:plc:ccc"]})
        assert headers["Content-Type"] == "application/json" and "Authorization" not in headers
        info = await client.info(DID)
        assert info == RepoInfo(did=DID, handle="handle.invalid", state="pending", rev="", records=0, error="",
                                retries=0, status="active")
        assert (await client.resolve(DID))["id"] == DID  # type: ignore[index]
        assert await client.resolve("did:plc:unknown") is None  # 404 -> None
        with pytest.raises(NotFound):
            await client.info("did:plc:unknown")
        pages = [p async for p in client.list_repos(limit=2)]
        assert [len(p) for p in pages] == [2, 1] and pages[-1].cursor is None
        assert sorted(r.did for p in pages for r in p) == sorted([DID, "did:plc:bbb", "did:plc:ccc"])
        assert await client.stats() == {"repo_count": 3, "record_count": 42, "outbox_buffer": 7,
                                        "resync_buffer": 1, "firehose": 1234, "list_repos": ""}
        assert await client.health() == {"status": "ok"}
        await client.remove_repos(["did:plc:bbb"])
        assert "did:plc:bbb" not in tap.repos


async def test_http_auth(secret_tap):
    async with TapClient(secret_tap.url, admin_password="secret") as client:
        await client.add_repos([DID])
        assert secret_tap.http_log[-1][3]["Authorization"] == "Basic YWRtaW46c2VjcmV0"
    async with TapClient(secret_tap.url, admin_password="wrong") as client:
        with pytest.raises(AuthError) as e:
            await client.info(DID)
        assert e.value.status == 401
    async with TapClient(secret_tap.url) as client:
        with pytest.raises(AuthError):
            await client.health()


async def test_unreachable():
    from tests.e2e_support import free_port

    url = f"http://127.0.0.1:{free_port()}"
    async with TapClient(url) as client:
        with pytest.raises(TapUnreachable) as e:
            await client.health()
    assert str(e.value).startswith(f"tapflow is not reachable at {url}")
    with pytest.raises(ValueError, match="expected http"):
        TapClient("localhost:2480")


async def test_path_prefix_and_channel_url():
    c = TapClient("https://example.com/tap/?x=1")
    assert c.channel_url == "wss://example.com/tap/channel?x=1"
    assert TapClient("http://h:2480").channel_url == "ws://h:2480/channel"
    await c.close()


# --- the channel -----------------------------------------------------------------------------

async def test_ack_after_handler_success_only(tap):
    seen: list[int] = []
    errors: list[Exception] = []

    async def handler(ev):
        seen.append(ev.id)
        if ev.id == 2:
            raise ValueError("boom")

    for frame in (rec_frame(1), rec_frame(2), "garbage", ident_frame(3), rec_frame(4, cid="notacid"), rec_frame(5)):
        tap.push(frame)
    client = TapClient(tap.url)
    ch = client.channel(handler, on_error=errors.append, **FAST)
    await _run_until(ch, lambda: len(tap.acks) >= 3)
    assert seen == [1, 2, 3, 5]
    assert tap.acked_ids() == [1, 3, 5]  # never 2 (handler raised), never the unparsable ones
    assert tap.raw_client_frames[0] == '{"type":"ack","id":1}'  # the exact wire form
    kinds = [type(e) for e in errors]
    assert kinds == [HandlerError, ParseError, ParseError]
    assert isinstance(errors[0].__cause__, ValueError) and errors[0].event.id == 2  # type: ignore[attr-defined]
    assert errors[1].frame == "garbage"  # type: ignore[attr-defined]


async def test_sync_handler_and_redelivery_after_failure(tap):
    attempts: dict[int, int] = {}

    def handler(ev):  # a plain function works too
        attempts[ev.id] = attempts.get(ev.id, 0) + 1
        if ev.id == 1 and attempts[1] == 1:
            raise RuntimeError("transient")

    tap.push(rec_frame(1))
    tap.push(rec_frame(2))
    client = TapClient(tap.url)
    ch = client.channel(handler, on_error=lambda e: None, **FAST)
    task = asyncio.ensure_future(ch.run())
    await tap.wait_acks(1)
    assert tap.acked_ids() == [2] and 1 in tap.unacked
    tap.drop()  # the server redelivers what is unacked on the next connection
    await tap.wait_acks(2)
    await ch.stop()
    await task
    assert attempts == {1: 2, 2: 1}
    assert tap.acks == [(1, 2), (2, 1)]


async def test_reconnect_and_flush_acks_queued_while_disconnected(tap):
    proceed = asyncio.Event()
    reconnects: list[tuple[str, int, bool]] = []
    calls: list[int] = []

    async def handler(ev):
        calls.append(ev.id)
        if calls == [1]:
            tap.drop()          # the connection dies while we work
            await asyncio.sleep(0.2)
        elif ev.id == 10:
            proceed.set()

    tap.push(rec_frame(1))
    ch = TapClient(tap.url).channel(handler, on_reconnect_error=lambda e, n, init: reconnects.append(
        (type(e).__name__, n, init)), **FAST)
    task = asyncio.ensure_future(ch.run())
    await tap.wait_connections(2)
    await tap.wait_acks(1)
    # the ack for 1 could not go out on the dead socket: it waited for the next connection
    assert tap.acks[0] == (2, 1)
    assert tap.connections == 2 and reconnects and reconnects[0][2] is False
    tap.push(rec_frame(10))
    await asyncio.wait_for(proceed.wait(), 5)
    await tap.wait_acks(3)
    await ch.stop()
    await task
    # 1 was also redelivered by the server (it had not seen the ack yet) and handled again
    assert calls == [1, 1, 10] and tap.acked_ids() == [1, 1, 10]


async def test_manual_acks_while_disconnected_are_deduplicated(tap):
    got: list[int] = []
    ch = TapClient(tap.url).channel(lambda ev: got.append(ev.id), auto_ack=False,
                                    backoff_base=0.3, max_reconnect_seconds=0.3)

    def on_reconnect(err, attempt, initial):
        # disconnected now: these acks are queued (a set) and sent on the next connection
        for eid in (1, 2, 1, 2):
            asyncio.ensure_future(ch.ack(eid))

    ch.on_reconnect_error = on_reconnect
    tap.push(rec_frame(1))
    tap.push(rec_frame(2))
    task = asyncio.ensure_future(ch.run())
    while len(got) < 2:
        await asyncio.sleep(0.01)
    assert tap.acks == []  # auto_ack=False: nothing yet
    tap.drop()
    await tap.wait_acks(2)
    await asyncio.sleep(0.1)
    await ch.stop()
    await task
    assert sorted(tap.acks) == [(2, 1), (2, 2)]  # once each, on the new connection
    assert ch.pending_acks == frozenset()


async def test_events_iterator_acks_when_the_next_is_requested(tap):
    for i in (1, 2, 3):
        tap.push(rec_frame(i))
    client = TapClient(tap.url)
    seen = []
    async with client.events(**FAST) as events:
        async for ev in events:
            seen.append(ev.id)
            if ev.id == 2:
                await asyncio.sleep(0.1)
                assert tap.acked_ids() == [1]  # 2 is acked only after this body completes
            if ev.id == 3:
                break  # leaving the block normally acks 3 too
    await tap.wait_acks(3)
    assert seen == [1, 2, 3] and tap.acked_ids() == [1, 2, 3]

    tap.push(rec_frame(4))
    with pytest.raises(RuntimeError):
        async with client.events(**FAST) as events:
            async for ev in events:
                raise RuntimeError("failed on %d" % ev.id)
    await asyncio.sleep(0.2)
    assert tap.acked_ids() == [1, 2, 3]  # 4 was not acked
    await client.close()


async def test_channel_auth(secret_tap):
    secret_tap.push(ident_frame(1))
    client = TapClient(secret_tap.url, admin_password="secret")
    ch = client.channel(lambda ev: None, **FAST)
    await _run_until(ch, lambda: secret_tap.acks)
    assert secret_tap.upgrade_auth[0] == "Basic YWRtaW46c2VjcmV0"

    bad = TapClient(secret_tap.url, admin_password="nope").channel(lambda ev: None, **FAST)
    with pytest.raises(AuthError):
        await asyncio.wait_for(bad.run(), 5)


async def test_retries_until_the_server_is_up():
    from tests.e2e_support import free_port

    server = FakeTap()
    server.port = free_port()
    server.push(rec_frame(1))
    attempts: list[tuple[int, bool]] = []
    ch = TapChannel_for(server, lambda ev: None, on_reconnect_error=lambda e, n, init: attempts.append((n, init)))
    task = asyncio.ensure_future(ch.run())
    await asyncio.sleep(0.4)
    assert attempts and all(init for _, init in attempts) and attempts[0][0] == 0
    await server.start()
    try:
        await server.wait_acks(1)
    finally:
        await ch.stop()
        await task
        await server.stop()


def TapChannel_for(server: FakeTap, handler, **opts):
    return TapClient(f"http://127.0.0.1:{server.port}").channel(handler, **{**FAST, **opts})


async def test_heartbeat_drops_a_silent_connection():
    server = await FakeTap(answer_pings=False).start()
    try:
        ch = TapChannel_for(server, lambda ev: None, heartbeat_interval=0.2, on_reconnect_error=lambda *a: None)
        task = asyncio.ensure_future(ch.run())
        await server.wait_connections(3)  # no pong -> dropped and re-dialed, again and again
        await ch.stop()
        await task
    finally:
        await server.stop()


async def test_heartbeat_keeps_a_quiet_healthy_connection(tap):
    ch = TapChannel_for(tap, lambda ev: None, heartbeat_interval=0.4)
    task = asyncio.ensure_future(ch.run())
    await asyncio.sleep(2.0)  # several heartbeats
    assert tap.connections == 1  # pongs arrive: no reconnects
    await ch.stop()
    await task


async def test_close_frames(tap):
    # 1000: the session ends quietly (as in the official client)
    tap.close_with = 1000
    tap.push(rec_frame(1))
    ch = TapChannel_for(tap, lambda ev: None)
    await asyncio.wait_for(ch.run(), 5)
    assert tap.connections == 1
    # 1001 going away (a proxy restarting): reconnect
    tap.close_with = 1001
    tap.push(rec_frame(2))
    ch = TapChannel_for(tap, lambda ev: None, on_reconnect_error=lambda *a: None)
    task = asyncio.ensure_future(ch.run())
    await tap.wait_connections(3)
    tap.close_with = None
    await ch.stop()
    await task
    # 1008 policy violation: a retry would repeat it
    tap.close_with = 1008
    tap.push(rec_frame(3))
    ch = TapChannel_for(tap, lambda ev: None)
    with pytest.raises(ChannelClosed) as e:
        await asyncio.wait_for(ch.run(), 5)
    assert e.value.code == 1008


async def test_stop_from_inside_the_handler(tap):
    for i in (1, 2, 3):
        tap.push(rec_frame(i))
    seen = []

    async def handler(ev):
        seen.append(ev.id)
        if ev.id == 2:
            await ch.stop()

    ch = TapChannel_for(tap, handler)
    await asyncio.wait_for(ch.run(), 5)
    await asyncio.sleep(0.1)
    assert seen == [1, 2] and tap.acked_ids() == [1, 2]


def test_sync_client(tap_thread):
    url, server = tap_thread
    with SyncTapClient(url) as client:
        client.add_repos([DID])
        assert client.info(DID).did == DID
        assert client.resolve("did:plc:nope") is None
        assert client.stats()["record_count"] == 42
        assert [r.did for page in client.list_repos() for r in page] == [DID]
        server.call(lambda s: [s.push(rec_frame(i)) for i in (1, 2, 3)])
        seen = []
        with client.iter_events(**FAST) as events:
            for ev in events:
                seen.append(ev.id)
                if ev.id == 3:
                    break
        assert seen == [1, 2, 3]
        server.call(lambda s: None)
        import time
        deadline = time.time() + 5
        while len(server.server.acks) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert server.server.acked_ids() == [1, 2, 3]
        with pytest.raises(NotFound):
            client.info("did:plc:nope")


class _ServerThread:
    def __init__(self, **opts: Any):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: FakeTap = asyncio.run_coroutine_threadsafe(self._start(opts), self.loop).result(10)

    async def _start(self, opts: dict) -> FakeTap:
        return await FakeTap(**opts).start()

    def call(self, fn):
        async def _c():
            return fn(self.server)
        return asyncio.run_coroutine_threadsafe(_c(), self.loop).result(10)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def tap_thread():
    st = _ServerThread()
    yield st.server.url, st
    st.stop()


# --- examples ------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example_events() -> list[str]:
    return [
        ident_frame(1),
        rec_frame(2, rkey="a1", live=False),
        rec_frame(3, rkey="a2", live=False),
        rec_frame(4, rkey="a1", action="update", record={"$type": "app.bsky.feed.post", "text": "edited"}),
        rec_frame(5, rkey="a2", action="delete", cid=_DROP, record=_DROP),
        rec_frame(6, did="did:plc:gone", rkey="x"),
        ident_frame(7, did="did:plc:gone", status="deleted", is_active=False),
    ]


def test_sqlite_indexer_example(tmp_path, tap_thread):
    import sqlite3

    url, st = tap_thread
    db = tmp_path / "records.db"
    st.call(lambda s: [s.push(f) for f in _example_events()])
    cmd = [sys.executable, str(EXAMPLES / "sqlite_indexer.py"), "--db", str(db), "--url", url, "--max", "7",
           "--add", DID]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "applied 7 events" in r.stdout
    assert DID in st.server.repos  # --add

    def rows():
        with sqlite3.connect(db) as c:
            return (c.execute("SELECT did, rkey, json_extract(record, '$.text'), live FROM records ORDER BY rkey")
                    .fetchall(),
                    c.execute("SELECT did, handle, status, is_active FROM repos ORDER BY did").fetchall())

    expected = ([(DID, "a1", "edited", 1)],
                [(DID, "alice.test", "active", 1), ("did:plc:gone", "alice.test", "deleted", 0)])
    assert rows() == expected
    deadline = __import__("time").time() + 5
    while len(st.server.acks) < 7 and __import__("time").time() < deadline:
        __import__("time").sleep(0.02)
    assert sorted(st.server.acked_ids()) == [1, 2, 3, 4, 5, 6, 7]
    # everything again (a redelivery after a crash): same result
    st.call(lambda s: [s.push(f) for f in _example_events()])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert rows() == expected


def test_postgres_example_without_psycopg():
    try:
        import psycopg  # noqa: F401
        pytest.skip("psycopg is installed")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, str(EXAMPLES / "postgres_indexer.py")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert 'this example needs psycopg 3: pip install "psycopg[binary]"' in r.stderr


# --- Kafka ---------------------------------------------------------------------------------

@pytest.fixture
def kafka_bootstrap(request):
    bootstrap = os.environ.get("TAPFLOW_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        yield bootstrap
        return
    try:
        from tests.kafka_broker import Broker
    except ImportError:
        pytest.skip("tests/kafka_broker.py is not available")

    try:
        broker = Broker().start()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Kafka-protocol broker: {e}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def _produce(bootstrap: str, topic: str, frames: list[str]) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for f in frames:
        p.produce(topic, key=DID.encode(), value=f.encode())
    assert p.flush(30) == 0


@pytest.mark.kafka
def test_kafka_events_commits_only_processed_events(kafka_bootstrap, tmp_path):
    from tapflow_client.kafka import kafka_events

    topic = f"tap.events.test{random.randrange(1 << 30)}"
    _produce(kafka_bootstrap, topic, [rec_frame(1), "not json", rec_frame(2), rec_frame(3), rec_frame(4)])
    group = f"g{random.randrange(1 << 30)}"
    errors: list[Exception] = []
    seen: list[int] = []
    with pytest.raises(RuntimeError):
        with kafka_events(kafka_bootstrap, group, topic, on_error=errors.append, session_timeout_ms=6000,
                          idle_timeout=20) as events:
            for ev in events:
                if ev.id == 3:
                    raise RuntimeError("handler failed on 3")
                seen.append(ev.id)
    assert seen == [1, 2] and len(errors) == 1 and isinstance(errors[0], ParseError)
    # the same group resumes at the event whose handler failed
    with kafka_events(kafka_bootstrap, group, topic, session_timeout_ms=6000, idle_timeout=3) as events:
        again = [ev.id for ev in events]
    assert again == [3, 4]

    # the example indexer, fed from the same topic by a fresh group
    db = tmp_path / "k.db"
    r = subprocess.run([sys.executable, str(EXAMPLES / "kafka_sqlite_indexer.py"), "--bootstrap", kafka_bootstrap,
                        "--group", group + "x", "--topic", topic, "--db", str(db), "--idle-exit", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "applied 4 events" in r.stdout


async def test_stop_from_outside_lets_the_current_event_finish(tap):
    started = asyncio.Event()
    tap.push(rec_frame(1))

    async def handler(ev):
        started.set()
        await asyncio.sleep(0.3)

    ch = TapChannel_for(tap, handler)
    task = asyncio.ensure_future(ch.run())
    await asyncio.wait_for(started.wait(), 5)
    await ch.stop()  # waits for the handler, its ack, then the disconnect
    assert task.done()
    await task
    await asyncio.sleep(0.1)
    assert tap.acked_ids() == [1]


# --- end to end: the real service ------------------------------------------------------------

def _pds_write(pds, did: str, ops: list[dict]) -> list[dict]:
    code = f"""
const did = {json.dumps(did)};
const s = await X.createSession(base, did);
const out = [];
for (const op of {json.dumps(ops)}) {{
  const r = await X.xrpc(base, 'com.atproto.repo.putRecord', {{ auth: s.accessJwt, body: {{ repo: did, collection: op.collection, rkey: op.rkey, record: op.record }} }});
  out.push({{ path: op.collection + '/' + op.rkey, cid: r.cid }});
}}
console.log(JSON.stringify({{ ok: true, out }}));
"""
    return pds.xrpc_script(code)["out"]


@pytest.mark.e2e
async def test_client_against_the_real_service(pds, tmp_path):
    """TapClient + channel + CLI against ``python -m bytewax.run flows.tap`` and the PDS harness:
    HTTP methods with auth, backfill then live events, a failed handler redelivered, and a
    kill -9 + restart of the service survived by the same channel."""
    from tests.e2e_support import make_service

    out = tmp_path / "load.json"
    pds.script("load.mjs", {"ACCOUNTS": "2", "RECORDS": "10", "OUT_FILE": str(out)})
    ledger = json.loads(out.read_text())
    dids = sorted(ledger["repos"])
    svc = make_service(pds, tmp_path, TAP_ADMIN_PASSWORD="pw", TAP_RETRY_TIMEOUT="2s")
    await asyncio.to_thread(svc.start)
    client = TapClient(svc.url, admin_password="pw")
    state: dict[str, dict[str, str]] = {d: {} for d in dids}
    identities: dict[str, IdentityEvent] = {}
    live: list[RecordEvent] = []
    failed_once: list[int] = []
    reconnects: list[BaseException] = []

    async def handler(ev):
        if isinstance(ev, IdentityEvent):
            identities[ev.did] = ev
            return
        if not failed_once:
            failed_once.append(ev.id)
            raise RuntimeError("first record fails once: must come again")
        if ev.live:
            live.append(ev)
        if ev.action == "delete":
            state[ev.did].pop(f"{ev.collection}/{ev.rkey}", None)
        else:
            state[ev.did][f"{ev.collection}/{ev.rkey}"] = ev.cid  # type: ignore[assignment]

    channel = client.channel(handler, on_error=lambda e: None,
                             on_reconnect_error=lambda e, n, init: reconnects.append(e),
                             backoff_base=0.2, max_reconnect_seconds=1.0, heartbeat_interval=2.0)
    task = asyncio.ensure_future(channel.run())

    async def wait_for(cond, what: str, timeout: float = 90.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            if task.done():
                task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{svc.log_tail()}")
            await asyncio.sleep(0.2)

    try:
        assert await client.health() == {"status": "ok"}
        with pytest.raises(AuthError):
            async with TapClient(svc.url, admin_password="wrong") as bad:
                await bad.health()
        await client.add_repos(dids)
        expected = {d: ledger["repos"][d]["records"] for d in dids}
        await wait_for(lambda: state == expected, "backfill through the channel")
        assert failed_once and set(identities) == set(dids)
        assert all(identities[d].handle == ledger["repos"][d]["handle"] for d in dids)

        infos = [await client.info(d) for d in dids]
        assert [i.state for i in infos] == ["active", "active"]
        assert [i.records for i in infos] == [len(expected[d]) for d in dids]
        listed = [r.did for page in [p async for p in client.list_repos(limit=1)] for r in page]
        assert listed == dids
        stats = await client.stats()
        assert stats["repo_count"] == 2 and stats["record_count"] == sum(len(v) for v in expected.values())
        doc = await client.resolve(dids[0])
        assert doc is not None and doc["id"] == dids[0]
        with pytest.raises(NotFound):
            await client.info("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")

        # the CLI sees the same service
        r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tapflow_cli.main", "status", "--url",
                                                     svc.url, "--password", "pw", "--sample", "0.2"],
                                    capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "active 2" in r.stdout and "100.0%" in r.stdout

        # kill -9 and restart on the same port: the channel reconnects by itself (no close frame)
        await asyncio.to_thread(svc.kill)
        await wait_for(lambda: reconnects, "the channel to notice", timeout=30)
        await asyncio.to_thread(svc.start)
        written = await asyncio.to_thread(_pds_write, pds, dids[0], [
            {"collection": "com.example.live", "rkey": "k1", "record": {"$type": "com.example.live", "n": 1}}])
        await wait_for(lambda: any(e.rkey == "k1" for e in live), "a live event after the restart")
        ev = next(e for e in live if e.rkey == "k1")
        assert ev.cid == written[0]["cid"] and ev.record == {"$type": "com.example.live", "n": 1}
        assert channel.connections >= 2
    finally:
        await channel.stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await client.close()
            await asyncio.to_thread(svc.stop)
