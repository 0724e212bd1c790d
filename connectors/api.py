"""Tap's HTTP API (spec/tap-behavior.md §4) on ``TAP_BIND``, served by the delivery child.

Routes, all at the root (the official client builds absolute paths)::

    GET  /health                 {"status":"ok"}
    GET  /channel                WebSocket (connectors.channel); 400 JSON in webhook / kafka-only mode
    POST /repos/add              {"dids":[...]}  -> 200, empty body, once the command is fsynced
    POST /repos/remove           {"dids":[...]}  -> 200, empty body, once the command is fsynced
    GET  /resolve/{did}          reconstructed DID document; 400 bad DID; 404 unknown (Tap: 500)
    GET  /info/{did}             {did,error,handle,records,retries,rev,state,status}; 404 untracked
    GET  /repos?cursor=&limit=   tracked repos, paginated (not in Tap; its issue #1252)
    GET  /stats/repo-count | record-count | outbox-buffer | resync-buffer | cursors

Behaviour kept from Tap (echo + gorilla): JSON errors ``{"message": ...}`` (404 ``Not Found``,
405 ``Method Not Allowed``), compact JSON bodies ending in a newline, and with
``TAP_ADMIN_PASSWORD`` set, HTTP Basic auth (user ``admin``, constant-time compare) on every
route, unknown paths included, with Tap's exact 401 body and ``WWW-Authenticate`` header.
Differences, all on the friendly side: an empty DID list answers 200 (Tap: 500), a syntactically
invalid DID in ``/repos/add`` answers 400 instead of tracking a repo that can never sync, bodies
over ``TAP_MAX_BODY_SIZE`` answer 413, ``/resolve`` answers a real 404, ``/info`` adds ``status``.

Commands do not touch the flow's state directly: ``/repos/add`` and ``/repos/remove`` append
``{"op","dids"}`` to ``data/delivery`` ``commands`` under the next sequence number (persisted
in ``dmeta`` in the same synced WriteBatch), and the flow's ControlSource applies them a few
milliseconds later. Reads (``/info``, ``/repos``, ``/stats``) use the flow's database as a
RocksDB secondary, caught up on every request.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Any, Callable

import orjson
from aiohttp import web
from rocksdict import WriteOptions

from config import Config
from store.db import Database, outbox_depth, read_counter
from store.layout import (
    decode_counter,
    META_CONTROL_CURSOR,
    command_key,
    meta_cursor_collection,
    meta_cursor_list_repos,
    pack_u64,
    record_key,
    unpack_u64,
)

log = logging.getLogger(__name__)

DMETA_COMMAND_SEQ = b"commands/seq"
META_FIREHOSE_SEQ = b"stats/firehose_seq"
LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000

UNAUTHORIZED_BODY = b'{"error":"Unauthorized","message":"atproto admin auth required, but missing or incorrect password"}\n'
WWW_AUTHENTICATE = 'Basic realm="admin", charset="UTF-8"'


# --- helpers ------------------------------------------------------------------------------------

def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj) + b"\n", content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return json_response({"message": message}, status)


def _valid_did(s: str) -> bool:
    from protocol.syntax import is_valid_did

    return is_valid_did(s)


def basic_auth_ok(header: str | None, password: str) -> bool:
    """Go ``r.BasicAuth()`` + user ``admin`` + constant-time password compare."""
    if not header or len(header) < 6 or header[:6].lower() != "basic ":
        return False
    try:
        raw = base64.b64decode(header[6:], validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, pw = raw.partition(b":")
    if not sep:
        return False
    return hmac.compare_digest(user, b"admin") & hmac.compare_digest(pw, password.encode())


# --- commands -----------------------------------------------------------------------------------

class CommandLog:
    """``/repos/add|remove`` commands for ControlSource, in ``data/delivery`` ``commands``.

    Sequence numbers are strictly increasing across restarts (``dmeta`` holds the last one);
    a command is fsynced before ``append`` returns. Commands every shard applied
    (``control/cursor`` in the flow's meta) are pruned by ``prune``.
    """

    def __init__(self, delivery: Database, flow: Database | None = None) -> None:
        self._db = delivery
        self._flow = flow
        self._cf = delivery.cf("commands")
        last = decode_counter(delivery.cf("dmeta").get(DMETA_COMMAND_SEQ))
        it = self._cf.iter()
        it.seek_to_last()
        if it.valid():
            last = max(last, unpack_u64(it.key()))
        if flow is not None:
            last = max(last, decode_counter(flow.cf("meta").get(META_CONTROL_CURSOR)))
        self.seq = last
        self._sync = WriteOptions()
        self._sync.sync = True

    def append(self, op: str, dids: list[str]) -> int:
        seq = self.seq + 1
        b = self._db.batch()
        b.put(command_key(seq), orjson.dumps({"op": op, "dids": dids}), self._db.handle("commands"))
        b.put(DMETA_COMMAND_SEQ, pack_u64(seq), self._db.handle("dmeta"))
        self._db.db.write(b, self._sync)  # synced: the 200 means the command survives a crash
        self.seq = seq
        return seq

    def prune(self) -> int:
        """Delete commands the flow has applied everywhere; returns how many."""
        if self._flow is None:
            return 0
        applied = decode_counter(self._flow.cf("meta").get(META_CONTROL_CURSOR))
        it = self._cf.iter()
        it.seek_to_first()
        keys = []
        while it.valid() and unpack_u64(it.key()) <= applied:
            keys.append(it.key())
            it.next()
        if keys:
            b = self._db.batch()
            h = self._db.handle("commands")
            for k in keys:
                b.delete(k, h)
            self._db.write(b)
        return len(keys)


# --- the app --------------------------------------------------------------------------------------

class Api:
    """Route handlers over the flow's database (secondary) and the command log."""

    def __init__(self, cfg: Config, flow: Database, commands: CommandLog, *,
                 channel_handler: Callable | None = None, directory: Any = None) -> None:
        self.cfg = cfg
        self.flow = flow
        self.commands = commands
        self.channel_handler = channel_handler
        self.directory = directory

    # middlewares

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if self.cfg.admin_password and not basic_auth_ok(request.headers.get("Authorization"), self.cfg.admin_password):
            return web.Response(status=401, body=UNAUTHORIZED_BODY, content_type="application/json",
                                headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        return await handler(request)

    @web.middleware
    async def json_errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
            resp = error(e.status, e.reason)
            resp.headers.update(headers)
            return resp
        except Exception:
            log.exception("API handler failed", extra={"path": request.path})
            return error(500, "Internal Server Error")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth, self.json_errors], client_max_size=self.cfg.max_body_size)
        r = app.router
        r.add_get("/health", self.health, allow_head=False)
        r.add_get("/channel", self.channel, allow_head=False)
        r.add_post("/repos/add", self.repos_add)
        r.add_post("/repos/remove", self.repos_remove)
        r.add_get("/resolve/{did:[^/]*}", self.resolve, allow_head=False)
        r.add_get("/info/{did:[^/]*}", self.info, allow_head=False)
        r.add_get("/repos", self.list_repos, allow_head=False)
        r.add_get("/stats/repo-count", self.stats_repo_count, allow_head=False)
        r.add_get("/stats/record-count", self.stats_record_count, allow_head=False)
        r.add_get("/stats/outbox-buffer", self.stats_outbox_buffer, allow_head=False)
        r.add_get("/stats/resync-buffer", self.stats_resync_buffer, allow_head=False)
        r.add_get("/stats/cursors", self.stats_cursors, allow_head=False)
        return app

    # routes

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def channel(self, request: web.Request) -> web.StreamResponse:
        mode = self.cfg.delivery_mode
        if mode == "webhook":
            return error(400, "websocket not available in webhook mode")
        if mode == "kafka-only" or self.channel_handler is None:
            return error(400, "websocket not available in kafka-only mode")
        return await self.channel_handler(request)

    async def _dids(self, request: web.Request) -> list[str] | web.Response:
        """The ``dids`` of a request body, echo's Bind rules; or the error response."""
        body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
        if not body:
            return []  # echo binds nothing for an empty body
        ctype = request.headers.get("Content-Type", "")
        if not ctype.startswith("application/json"):
            return error(415, "Unsupported Media Type")
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return error(400, f"Syntax error: {e}")
        if obj is None:
            return []
        if not isinstance(obj, dict):
            return error(400, f"Unmarshal type error: expected=main.DidPayload, got={_json_type(obj)}, field=, offset=1")
        dids = obj.get("dids")
        if dids is None:
            return []
        if not isinstance(dids, list) or not all(isinstance(d, str) for d in dids):
            got = _json_type(dids) if not isinstance(dids, list) else next(_json_type(d) for d in dids if not isinstance(d, str))
            return error(400, f"Unmarshal type error: expected=string, got={got}, field=dids")
        return dids

    async def repos_add(self, request: web.Request) -> web.Response:
        dids = await self._dids(request)
        if isinstance(dids, web.Response):
            return dids
        bad = [d for d in dids if not _valid_did(d)]
        if bad:
            return error(400, f"invalid DID: {bad[0][:200]!r}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        if dids:
            seq = self.commands.append("add", dids)
            log.info("added dids", extra={"count": len(dids), "seq": seq})
        return web.Response(status=200)

    async def repos_remove(self, request: web.Request) -> web.Response:
        dids = await self._dids(request)
        if isinstance(dids, web.Response):
            return dids
        if dids:
            seq = self.commands.append("remove", dids)
            log.info("removed dids", extra={"count": len(dids), "seq": seq})
        return web.Response(status=200)

    async def resolve(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        if not _valid_did(did):
            return error(400, "improperly formatted DID")
        try:
            from protocol.identity import DidNotFound, IdentityError, InvalidDid, to_resolve_json
        except ImportError:
            log.error("protocol.identity is not available: /resolve cannot work")
            return error(500, "failed to resolve DID")
        if self.directory is None:
            return error(500, "failed to resolve DID")
        try:
            ident = await self.directory.resolve(did)
        except InvalidDid:
            return error(400, "improperly formatted DID")
        except DidNotFound:
            return error(404, "DID not found")
        except IdentityError as e:
            log.info("resolve failed", extra={"did": did, "error": str(e)})
            return error(500, "failed to resolve DID")
        return json_response(to_resolve_json(ident))

    def _repo(self, did: str) -> dict | None:
        raw = self.flow.cf("repos").get(did.encode())
        return None if raw is None else orjson.loads(raw)

    async def info(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        try:
            self.flow.catch_up()
            st = self._repo(did) if did else None
        except Exception:
            log.exception("reading repo failed", extra={"did": did})
            return error(500, "failed to get repo")
        if st is None:
            return error(404, "repo not found")
        records = st.get("records")
        if not isinstance(records, int):
            records = self._count_records(did)
        return json_response({
            "did": did,
            "error": st.get("error") or "",
            "handle": st.get("handle") or "",
            "records": records,
            "retries": int(st.get("retries") or 0),
            "rev": st.get("rev") or "",
            "state": st.get("state") or "",
            "status": st.get("status") or "active",
        })

    def _count_records(self, did: str) -> int:
        prefix = record_key(did, "")
        it = self.flow.cf("records").iter()
        it.seek(prefix)
        n = 0
        while it.valid() and it.key().startswith(prefix):
            n += 1
            it.next()
        return n

    async def list_repos(self, request: web.Request) -> web.Response:
        q = request.query
        cursor = q.get("cursor", "")
        try:
            limit = int(q.get("limit", LIST_DEFAULT_LIMIT))
        except ValueError:
            return error(400, "limit must be an integer")
        if not 1 <= limit <= LIST_MAX_LIMIT:
            return error(400, f"limit must be between 1 and {LIST_MAX_LIMIT}")
        try:
            self.flow.catch_up()
            it = self.flow.cf("repos").iter()
            if cursor:
                it.seek(cursor.encode() + b"\x00")
            else:
                it.seek_to_first()
            repos = []
            while it.valid() and len(repos) < limit:
                did = it.key().decode()
                st = orjson.loads(it.value())
                repos.append({"did": did, "handle": st.get("handle") or "", "rev": st.get("rev") or "",
                              "state": st.get("state") or "", "status": st.get("status") or "active",
                              "records": st.get("records") or 0})
                it.next()
            more = it.valid()
        except Exception:
            log.exception("listing repos failed")
            return error(500, "failed to list repos")
        out: dict[str, Any] = {"repos": repos}
        if more and repos:
            out["cursor"] = repos[-1]["did"]
        return json_response(out)

    # stats

    def _counter(self, name: str) -> int:
        return read_counter(self.flow, name)

    def _stat(self, key: str, fn: Callable[[], int], fail: str) -> web.Response:
        try:
            self.flow.catch_up()
            return json_response({key: fn()})
        except Exception:
            log.exception("stats failed", extra={"stat": key})
            return error(500, fail)

    async def stats_repo_count(self, request: web.Request) -> web.Response:
        return self._stat("repo_count", lambda: self._counter("repos"), "failed to get repo count")

    async def stats_record_count(self, request: web.Request) -> web.Response:
        return self._stat("record_count", lambda: self._counter("records"), "failed to get record count")

    async def stats_outbox_buffer(self, request: web.Request) -> web.Response:
        return self._stat("outbox_buffer", lambda: max(0, outbox_depth(self.flow)),
                          "failed to get outbox buffer size")

    async def stats_resync_buffer(self, request: web.Request) -> web.Response:
        return self._stat("resync_buffer", lambda: self._counter("resync_buf"), "failed to get resync buffer size")

    async def stats_cursors(self, request: web.Request) -> web.Response:
        try:
            self.flow.catch_up()
            meta = self.flow.cf("meta")
            firehose = 0 if self.cfg.outbox_only else decode_counter(meta.get(META_FIREHOSE_SEQ))
            if self.cfg.signal_collection:
                raw = meta.get(meta_cursor_collection(self.cfg.relay_url, self.cfg.signal_collection))
            elif self.cfg.full_network:
                raw = meta.get(meta_cursor_list_repos(self.cfg.relay_url))
            else:
                raw = None
            list_repos = raw.decode("utf-8", "replace") if raw else ""
        except Exception:
            log.exception("stats failed", extra={"stat": "cursors"})
            return error(500, "failed to get list repos cursor")
        return json_response({"firehose": firehose, "list_repos": list_repos})


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"
