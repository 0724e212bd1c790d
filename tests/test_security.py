"""Security: admin auth on every route and ``/channel``, the webhook's credentials, the
public-address guard (``TAP_PUBLIC_ONLY``), no secret in the logs, an owner-only data dir.

- ``TAP_ADMIN_PASSWORD`` (spec §4.1): every route of the API (each route the app registers,
  unknown paths and wrong methods included) and the ``/channel`` upgrade answer 401 with Tap's
  body and ``WWW-Authenticate`` for a missing, wrong or malformed ``Authorization`` header (not
  base64, no colon, wrong user, empty password, a prefix or extension of the password, a second
  header, ...); the scheme is case-insensitive as in Go (``basic`` works). Both user and password
  go through ``hmac.compare_digest``, without short-circuit. A refused request changes nothing.
- The webhook carries ``Basic admin:<password>``; a redirect to another origin does not get it.
- ``TAP_PUBLIC_ONLY``: requests to hosts taken from DID documents (PDS endpoints, did:web
  hosts, handle well-knowns) are refused when the host is or resolves to a loopback, private,
  link-local, CGNAT, unique-local, multicast, reserved or unspecified address (also inside
  NAT64, 6to4 or IPv4-compatible IPv6), with a clear error,
  counted in ``tapflow_public_only_refused_total``; with the setting off the same requests work.
- The service (``python -m bytewax.run flows.tap``) run with a password, Kafka SASL/SSL settings,
  credentials in URLs and debug logs writes none of them to its log, and creates its data dir and
  RocksDB dirs 0700 (also tightening a data dir that existed with wider permissions).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import stat
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from connectors.api import UNAUTHORIZED_BODY, WWW_AUTHENTICATE, basic_auth_ok
from store.db import close_all
from tests.test_channel import Stack, did_n, make_cfg

PW = "s3cret-Pässwörd:with/colon+plusÿÿ"  # a colon, non-ASCII, and base64 with "=" and "/"
GOOD = "Basic " + base64.b64encode(f"admin:{PW}".encode()).decode()


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


# --------------------------------------------------------------------------- the API


@pytest.fixture
async def stack(tmp_path):
    made = []

    async def make(**kw):
        s = await Stack(make_cfg(tmp_path / f"d{len(made)}", **kw)).start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()
    close_all()


async def raw(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """One raw HTTP/1.1 exchange (full control over headers); (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def request(method: str, path: str, auth: list[str] | str | None, body: bytes = b"",
            extra: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for a in ([auth] if isinstance(auth, str) else auth or []):
        lines.append(f"Authorization: {a}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8") + extra + b"\r\n" + body


def routes(s) -> list[tuple[str, str]]:
    """Every (method, path) the app registers, with a DID in path parameters, plus the
    unregistered ones Tap also guards (unknown path, wrong method)."""
    out = []
    for r in s.api.app().router.routes():
        info = r.resource.get_info() if r.resource is not None else {}
        path = info.get("path") or info.get("formatter", "").replace("{did}", did_n(1))
        out.append((r.method, path))
    return sorted(set(out)) + [("GET", "/nope"), ("DELETE", "/health"), ("PUT", "/repos/add"), ("HEAD", "/health")]


BAD = {
    "missing": None,
    "empty": "",
    "scheme only": "Basic",
    "scheme and space": "Basic ",
    "other scheme": f"Bearer {PW}",
    "wrong password": basic("admin", "wrong"),
    "wrong user": basic("root", PW),
    "user in other case": basic("Admin", PW),
    "empty password": basic("admin", ""),
    "empty user": basic("", PW),
    "password prefix": basic("admin", PW[:-1]),
    "password extended": basic("admin", PW + "x"),
    "password with NUL": basic("admin", PW + "\x00"),
    "no colon": "Basic " + base64.b64encode(f"admin{PW}".encode()).decode(),
    "not base64": "Basic !!!not*base64!!!",
    "base64 without padding": GOOD.rstrip("="),
    "urlsafe base64": GOOD.replace("+", "-").replace("/", "_"),
    "trailing garbage": GOOD + "x",
    "tab after scheme": GOOD.replace(" ", "\t", 1),
    "two spaces": GOOD.replace(" ", "  ", 1),
    "non-ASCII": "Basic \u00e9\u00e9\u00e9\u00e9",
    "first of two is wrong": [basic("admin", "wrong"), GOOD],
}
GOOD_FORMS = {"canonical": GOOD, "lowercase scheme": "basic" + GOOD[5:], "uppercase scheme": "BASIC" + GOOD[5:]}


def test_password_material_is_what_we_think():
    assert "=" in GOOD and ("+" in GOOD or "/" in GOOD)  # so the padding/urlsafe cases mean something


async def test_every_route_refuses_missing_wrong_and_malformed_credentials(stack):
    s = await stack(admin_password=PW)
    rs = routes(s)
    assert ("GET", "/channel") in rs and ("POST", "/repos/add") in rs and len(rs) >= 14
    for method, path in rs:
        for name, auth in BAD.items():
            body = b'{"dids":["%s"]}' % did_n(9).encode() if method == "POST" else b""
            st, h, out = await raw(s.port, request(method, path, auth, body))
            assert st == 401, (method, path, name, st, out)
            if method != "HEAD":
                assert out == UNAUTHORIZED_BODY, (method, path, name)
            assert h["www-authenticate"] == WWW_AUTHENTICATE and h["content-type"] == "application/json"
    # nothing a refused request asked for happened
    assert list(s.delivery.cf("commands").items()) == []


async def test_every_route_accepts_the_password(stack):
    s = await stack(admin_password=PW)
    for method, path in routes(s):
        if path == "/channel":
            continue  # the upgrade is below
        for name, auth in GOOD_FORMS.items():
            body = b'{"dids":["%s"]}' % did_n(9).encode() if method == "POST" else b""
            st, _, out = await raw(s.port, request(method, path, auth, body))
            assert st != 401, (method, path, name, out)
            if path == "/nope":
                assert (st, orjson.loads(out)) == (404, {"message": "Not Found"})
            elif (method, path) in (("DELETE", "/health"), ("PUT", "/repos/add"), ("HEAD", "/health")):
                assert st == 405
            else:
                # /info of an unknown DID is 404; /resolve has no directory in this stack (500)
                assert st in (200, 404) or path.startswith("/resolve/"), (method, path, st, out)


async def test_channel_upgrade_needs_the_password(stack):
    s = await stack(admin_password=PW)
    url = s.url.replace("http", "ws") + "/channel"
    async with aiohttp.ClientSession() as session:
        for name, auth in BAD.items():
            if isinstance(auth, list) or auth is None or not auth.isascii():
                headers = {} if auth is None else None
                if headers is None:
                    continue  # raw cases above; aiohttp cannot send these
            else:
                headers = {"Authorization": auth}
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await session.ws_connect(url, headers=headers)
            assert e.value.status == 401, name
        for name, auth in GOOD_FORMS.items():
            ws = await session.ws_connect(url, headers={"Authorization": auth})
            await ws.close()
    # and the raw upgrade with two headers, the first wrong
    upgrade = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    st, _, out = await raw(s.port, request("GET", "/channel", BAD["first of two is wrong"], extra=upgrade))
    assert (st, out) == (401, UNAUTHORIZED_BODY)


async def test_without_a_password_nothing_is_asked(stack):
    s = await stack()
    st, _, out = await raw(s.port, request("GET", "/health", None))
    assert (st, out) == (200, b'{"status":"ok"}\n')
    st, _, _ = await raw(s.port, request("GET", "/health", basic("anyone", "anything")))
    assert st == 200


def test_compare_is_constant_time_for_user_and_password(monkeypatch):
    """Both fields go through hmac.compare_digest every time (no early exit on a wrong user)."""
    import connectors.api as api

    calls = []
    real = api.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", spy)
    for header, ok in ((GOOD, True), (basic("root", PW), False), (basic("admin", "x"), False),
                       (basic("root", "x"), False)):
        calls.clear()
        assert basic_auth_ok(header, PW) is ok
        assert len(calls) == 2 and all(isinstance(a, bytes) for pair in calls for a in pair)
    calls.clear()
    assert not basic_auth_ok("Basic !!!", PW) and calls == []  # malformed: refused before any compare


# --------------------------------------------------------------------------- the webhook


class Receiver:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.redirect_to: str | None = None
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        await req.read()
        self.posts.append(dict(req.headers))
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.Response(text="ok")

    async def start(self, host: str = "127.0.0.1") -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://{host}:{site._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _post_one(tmp_path, url: str, **cfg) -> None:
    from config import Config
    from connectors.webhook import WebhookTarget
    from store.layout import outbox_key
    from store.outbox import OutboxEvent

    taken = []
    t = WebhookTarget(Config(data_dir=str(tmp_path), webhook_url=url, **cfg), taken.append,
                      backoff=lambda n: 0.05)
    await t.start()
    try:
        t.offer(OutboxEvent(outbox_key(0, 1), 0, 1, did_n(1), 0, b'{"id":1,"type":"record"}'))
        for _ in range(200):
            if taken:
                break
            await asyncio.sleep(0.02)
        assert taken
    finally:
        await t.stop()


async def test_webhook_carries_the_password_but_not_across_origins(tmp_path):
    a, b = await Receiver().start(), await Receiver().start(host="localhost")  # two origins
    try:
        await _post_one(tmp_path, a.url, admin_password=PW)
        assert a.posts[-1]["Authorization"] == GOOD
        await _post_one(tmp_path, a.url)
        assert "Authorization" not in a.posts[-1]
        a.redirect_to = b.url  # 307 to another origin: the credentials stay behind
        await _post_one(tmp_path, a.url, admin_password=PW)
        assert a.posts[-1]["Authorization"] == GOOD
        assert b.posts and "Authorization" not in b.posts[-1]
    finally:
        await a.stop()
        await b.stop()


async def test_webhook_url_credentials_give_way_to_the_admin_password(tmp_path):
    """TAP_WEBHOOK_URL with user:password@ and TAP_ADMIN_PASSWORD: aiohttp refused to send both
    (every POST failed, retried forever); the admin password wins, as Go's SetBasicAuth does.
    Without the admin password the URL's credentials are the Basic auth."""
    a = await Receiver().start()
    try:
        with_creds = a.url.replace("http://", "http://hook:urlpw@")
        await _post_one(tmp_path, with_creds, admin_password=PW)
        assert a.posts[-1]["Authorization"] == GOOD
        await _post_one(tmp_path, with_creds)
        assert a.posts[-1]["Authorization"] == basic("hook", "urlpw")
    finally:
        await a.stop()


# --------------------------------------------------------------------------- TAP_PUBLIC_ONLY

NOT_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "::1",                      # loopback
    "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.1.1",  # private
    "169.254.169.254", "fe80::1", "fe80::1%1",                 # link-local (cloud metadata!)
    "100.64.0.1", "100.127.255.254",                           # CGNAT (shared address space)
    "fc00::1", "fd12:3456:789a::1",                            # IPv6 unique local
    "0.0.0.0", "::",                                           # unspecified
    "224.0.0.1", "239.255.255.250", "ff02::1",                 # multicast
    "240.0.0.1", "255.255.255.255",                            # reserved, broadcast
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1",  # documentation
    "198.18.0.1",                                              # benchmarking
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",  # NAT64 of loopback/metadata/private
    "2002:7f00:1::1", "2002:a9fe:a9fe::1",                     # 6to4 of loopback/link-local
    "::7f00:1", "::127.0.0.1", "fec0::1",                      # IPv4-compatible, site-local (deprecated)
    "not an address", "",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "2a00:1450:4001:80e::200e",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("addr", NOT_PUBLIC)
def test_non_public_addresses(addr):
    from connectors.http import is_public_ip as http_rule
    from protocol.identity import is_public_ip

    assert not is_public_ip(addr) and not http_rule(addr), addr


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses(addr):
    from protocol.identity import is_public_ip

    assert is_public_ip(addr)


def _refused(client: str) -> float:
    return REGISTRY.get_sample_value("tapflow_public_only_refused_total", {"client": client}) or 0.0


@pytest.fixture
async def loopback():
    """A plain HTTP server on 127.0.0.1 that answers every GET with its path."""
    async def any_path(req: web.Request) -> web.Response:
        return web.Response(body=req.path.encode())

    app = web.Application()
    app.router.add_get("/{tail:.*}", any_path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


async def test_pds_requests_public_only_on_and_off(loopback):
    """connectors.http (getRepo from a PDS endpoint taken from a DID document)."""
    from connectors import http

    targets = [f"http://127.0.0.1:{loopback}/xrpc/x", f"http://localhost:{loopback}/xrpc/x"]
    for url in targets:
        n = _refused("http")
        with pytest.raises(http.NotPublic, match=r"refusing non-public address .*\(TAP_PUBLIC_ONLY\)"):
            await http.get_bytes(url, timeout=5, max_bytes=1 << 20, public_only=True)
        assert _refused("http") == n + 1, url
    for url in targets:  # off: the same requests go through
        assert await http.get_bytes(url, timeout=5, max_bytes=1 << 20) == b"/xrpc/x"
    await http.close_sessions()


async def test_did_web_and_handle_hosts_public_only_on_and_off(loopback):
    """protocol.identity: did:web documents and handle well-knowns are fetched from hosts named
    by untrusted data; with the guard on, a loopback host is refused (and counted)."""
    from protocol.identity import HttpClient, PrivateHostRefused

    for public_only in (True, False):
        http = HttpClient(public_only=public_only, timeout=5)
        try:
            for url in (f"http://127.0.0.1:{loopback}/.well-known/did.json",
                        f"http://localhost:{loopback}/.well-known/atproto-did"):
                n = _refused("identity")
                if public_only:
                    with pytest.raises(PrivateHostRefused, match="non-public|not a public"):
                        await http.get(url, guard=True)
                    assert _refused("identity") == n + 1
                else:
                    status, body = await http.get(url, guard=True)
                    assert status == 200 and body.startswith(b"/.well-known/")
                # PLC and XRPC base URLs are configuration, not document data: never guarded
                status, _ = await http.get(url, guard=False)
                assert status == 200
        finally:
            await http.close()


async def test_directory_public_only_on_and_off():
    """Through the Directory: a did:web whose host is loopback fails to resolve with the guard
    on and resolves with it off; a handle whose well-known host is loopback is handle.invalid
    with the guard on and verified with it off."""
    from protocol.identity import (
        INVALID_HANDLE,
        ChainHandleResolver,
        DidResolutionFailed,
        DidWebResolver,
        Directory,
        HttpClient,
        WellKnownHandleResolver,
    )
    from tests.test_identity import FakeNet, make_doc

    net = FakeNet()
    await net.start()
    did = "did:web:alice.test"
    net.web_docs["alice.test"] = make_doc(did, "alice.test")
    net.well_known["alice.test"] = did
    try:
        for public_only in (True, False):
            http = HttpClient(public_only=public_only, timeout=3)
            wk = WellKnownHandleResolver(http, scheme="http", port=net.port, connect_host="127.0.0.1", timeout=3)
            d = Directory(plc_url=net.url, http=http, public_only=public_only,
                          did_web=DidWebResolver(scheme="http", port=net.port, connect_host="127.0.0.1"),
                          handle_resolver=ChainHandleResolver([wk]))
            try:
                n = _refused("identity")
                if public_only:
                    with pytest.raises(DidResolutionFailed, match="not a public address"):
                        await d.resolve(did)
                    assert _refused("identity") > n
                    assert await d.verify_handle("alice.test", did) == INVALID_HANDLE
                else:
                    ident = await d.resolve(did)
                    assert ident.handle == "alice.test"
            finally:
                await d.close()
    finally:
        await net.stop()


# --------------------------------------------------------------------------- the service


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_databases_are_created_owner_only(tmp_path):
    from store.db import open_delivery_db, open_flow_db

    old = os.umask(0o022)
    try:
        open_flow_db(tmp_path / "d")
        open_delivery_db(tmp_path / "d")
    finally:
        os.umask(old)
        close_all()
    assert _mode(tmp_path / "d" / "flow") == 0o700 and _mode(tmp_path / "d" / "delivery") == 0o700


def test_service_logs_no_secret_and_keeps_its_data_private(tmp_path):
    from tests.e2e_support import free_port, make_service

    secrets = {
        "TAP_ADMIN_PASSWORD": "adminpw-" + os.urandom(6).hex(),
        "TAP_KAFKA_SASL_PASSWORD": "saslpw-" + os.urandom(6).hex(),
        "TAP_KAFKA_SSL_KEY_PASSWORD": "sslkeypw-" + os.urandom(6).hex(),
        "TAP_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "oauthsecret-" + os.urandom(6).hex(),
        "TAP_KAFKA_SASL_OAUTHBEARER_CONFIG": "oauthcfg-" + os.urandom(6).hex(),
        "TAP_DATABASE_URL": "dbpw-" + os.urandom(6).hex(),
        "TAP_WEBHOOK_URL": "hookpw-" + os.urandom(6).hex(),
    }
    dead = free_port()
    settings = {
        "TAP_ADMIN_PASSWORD": secrets["TAP_ADMIN_PASSWORD"],
        "TAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead}",
        "TAP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TAP_KAFKA_SASL_MECHANISM": "PLAIN",
        "TAP_KAFKA_SASL_USERNAME": "tapuser",
        "TAP_KAFKA_SASL_PASSWORD": secrets["TAP_KAFKA_SASL_PASSWORD"],
        "TAP_KAFKA_SSL_KEY_PASSWORD": secrets["TAP_KAFKA_SSL_KEY_PASSWORD"],
        "TAP_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": secrets["TAP_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"],
        "TAP_KAFKA_SASL_OAUTHBEARER_CONFIG": f"principal=tap clientSecret={secrets['TAP_KAFKA_SASL_OAUTHBEARER_CONFIG']}",
        "TAP_DATABASE_URL": f"postgres://tap:{secrets['TAP_DATABASE_URL']}@db.internal:5432/tap",
        "TAP_WEBHOOK_URL": f"http://hook:{secrets['TAP_WEBHOOK_URL']}@127.0.0.1:{dead}/hook",
        "TAP_RELAY_URL": f"http://127.0.0.1:{dead}",
        "TAP_PLC_URL": f"http://127.0.0.1:{dead}",
        "TAP_LOG_LEVEL": "debug",
    }
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # an existing data dir with wider permissions
    os.chmod(data, 0o755)
    svc = make_service(None, tmp_path, **settings)
    svc.start(wait=False)
    try:
        svc.wait_healthy(90)
        wrong = "wrongpw-" + os.urandom(6).hex()
        st, _ = svc.api("POST", "/repos/add", {"dids": [did_n(1)]})
        assert st == 200
        import urllib.request

        req = urllib.request.Request(svc.url + "/stats/repo-count", headers={
            "Authorization": "Basic " + base64.b64encode(f"admin:{wrong}".encode()).decode()})
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            assert e.code == 401
        # let the flow try the PLC, the webhook and Kafka (all dead) and log about it
        time.sleep(4)
        assert _mode(data) == 0o700
        for sub in ("flow", "delivery"):
            assert _mode(data / sub) == 0o700, sub
    finally:
        svc.stop()
    log = svc.log_path.read_bytes()
    assert b"tapflow starting" in log
    leaked = {}
    for name, secret in {**secrets, "wrong password": wrong}.items():
        forms = [secret, base64.b64encode(f"admin:{secret}".encode()).decode(), secret.encode().hex()]
        hits = [f for f in forms if f.encode() in log]
        if hits:
            leaked[name] = hits
    assert not leaked, f"secrets in the service log: {leaked}"
    # the masked settings line is there (so the test looked at the right thing)
    first = next(orjson.loads(line) for line in log.splitlines() if b"tapflow starting" in line)
    assert first["settings"]["admin_password"] == "***"
