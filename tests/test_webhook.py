"""Webhook delivery (spec §6.7, §14 test 15) against a real receiver over a fake flow."""

from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest
from aiohttp import web

from config import USER_AGENT
from connectors.webhook import WebhookTarget, backoff
from store.db import close_all
from tests.test_channel import Stack, _until, did_n, make_cfg


class Receiver:
    """A webhook endpoint that records POSTs; ``script`` gives the status per request."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict, bytes]] = []
        self.statuses: list[int] = []  # consumed front to back; empty = 200
        self.delay = 0.0
        self.hang: set[int] = set()  # event ids whose first POST never answers
        self.active = 0
        self.max_active = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((dict(request.headers), body))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            eid = orjson.loads(body)["id"]
            if eid in self.hang:
                self.hang.discard(eid)
                await asyncio.sleep(3600)
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self.statuses.pop(0) if self.statuses else 200
            return web.Response(status=status)
        finally:
            self.active -= 1

    def ids(self) -> list[int]:
        return [orjson.loads(b)["id"] for _, b in self.posts]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"


@pytest.fixture
async def hook(tmp_path):
    recv = Receiver()
    url = await recv.start()
    stacks = []

    async def make(**kw):
        opts = {k: kw.pop(k) for k in ("timeout", "concurrency") if k in kw}
        cfg = make_cfg(tmp_path, webhook_url=url, **kw)
        factories = [lambda on_taken: WebhookTarget(cfg, on_taken, backoff=lambda n: 0.05, **opts)]
        s = await Stack(cfg, factories=factories).start()
        stacks.append(s)
        return s

    make.recv = recv
    yield make
    for s in stacks:
        await s.stop()
    await recv.runner.cleanup()
    close_all()


async def test_webhook_delivers_each_event(hook):  # §14 test 15
    s = await hook()
    d = did_n(1)
    ids = s.fake.push(d, 3)
    await _until(lambda: len(hook.recv.posts) >= 3)
    assert sorted(hook.recv.ids()) == ids
    headers, body = hook.recv.posts[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == USER_AGENT
    assert "Authorization" not in headers
    assert orjson.loads(body)["record"]["did"] == d
    await _until(lambda: s.fake.rows() == 0)


async def test_webhook_basic_auth(hook):
    s = await hook(admin_password="s3cret")
    s.fake.push(did_n(2), 1)
    await _until(lambda: len(hook.recv.posts) >= 1)
    headers, _ = hook.recv.posts[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"admin:s3cret").decode()


async def test_webhook_retries_failures_then_moves_on(hook):
    s = await hook()
    hook.recv.statuses = [500, 503]
    d = did_n(3)
    first = s.fake.push(d, 1, live=True)
    second = s.fake.push(d, 1, live=True)
    await _until(lambda: len(hook.recv.posts) >= 4, 5.0)
    assert hook.recv.ids() == first * 3 + second  # same body three times, then the next one
    assert hook.recv.posts[0][1] == hook.recv.posts[2][1]
    await _until(lambda: s.fake.rows() == 0)


async def test_webhook_live_barrier(hook):
    s = await hook()
    hook.recv.delay = 0.2
    d = did_n(4)
    h = s.fake.push(d, 2)
    l1 = s.fake.push(d, 1, live=True)
    h2 = s.fake.push(d, 1)
    await _until(lambda: len(hook.recv.posts) >= 2)
    await asyncio.sleep(0.1)
    assert sorted(hook.recv.ids()) == h  # both historical in flight together, L1 waits
    await _until(lambda: len(hook.recv.posts) >= 3)
    await asyncio.sleep(0.1)
    assert hook.recv.ids()[2:] == l1  # L1 alone
    await _until(lambda: len(hook.recv.posts) >= 4)
    assert hook.recv.ids()[3:] == h2


async def test_webhook_concurrency_is_bounded(hook):
    s = await hook(concurrency=2)
    hook.recv.delay = 0.05
    for i in range(5):
        s.fake.push(did_n(10 + i), 2)
    await _until(lambda: len(hook.recv.posts) >= 10, 5.0)
    assert hook.recv.max_active == 2


async def test_webhook_timeout_is_retried(hook):
    s = await hook(timeout=0.3)
    d = did_n(5)
    ids = s.fake.push(d, 1)
    hook.recv.hang = set(ids)
    t0 = time.monotonic()
    await _until(lambda: len(hook.recv.posts) >= 2, 5.0)
    assert hook.recv.ids() == ids * 2
    assert time.monotonic() - t0 >= 0.3
    await _until(lambda: s.fake.rows() == 0)


async def test_webhook_unreachable_is_retried(tmp_path):
    cfg = make_cfg(tmp_path, webhook_url="http://127.0.0.1:9/hook")
    targets = []

    def factory(on_taken):
        t = WebhookTarget(cfg, on_taken, backoff=lambda n: 0.02)
        targets.append(t)
        return t

    s = await Stack(cfg, factories=[factory]).start()
    s.fake.push(did_n(6), 1)
    await _until(lambda: targets[0].failures >= 3)
    assert s.fake.rows() == 1  # never taken
    await s.stop()
    close_all()


async def test_webhook_internal_rows_not_posted(hook):
    s = await hook()
    d = did_n(7)
    s.fake.push(d, 1, internal=True)
    ids = s.fake.push(d, 1)
    await _until(lambda: s.fake.rows() == 0)
    assert hook.recv.ids() == ids


def test_backoff_schedule():
    for n, base in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 10), (10, 10), (63, 10), (10_000, 10)]:
        for _ in range(20):
            assert base <= backoff(n) < base + 1


# --- connectors.http1: the client under the webhook, against real servers ---------------------

from connectors.http1 import Http1Client, HttpError  # noqa: E402


async def _raw_server(answer):
    """A TCP server: ``answer(request_bytes, n)`` gives the bytes to send back for the n-th
    request on any connection (None: close without answering). Returns (url, requests, stop)."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                requests.append(head + await reader.readexactly(length))
                out = answer(requests[-1], len(requests))
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def stop():
        server.close()
        await server.wait_closed()
    return f"http://127.0.0.1:{port}/hook?x=1", requests, stop


async def test_http1_keeps_the_connection_and_reads_every_body_kind():
    answers = {1: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
               2: b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
               3: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
               4: b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"}
    url, requests, stop = await _raw_server(lambda req, n: answers[n])
    c = Http1Client(url, {"Content-Type": "application/json", "User-Agent": USER_AGENT}, auth="Basic eA==",
                    size=2, timeout=5)
    try:
        assert [await c.post(b'{"id":%d}' % i) for i in range(4)] == [200, 201, 204, 503]
        assert c.connects == 1  # one kept-alive connection for all four
        head = requests[0].split(b"\r\n")
        assert head[0] == b"POST /hook?x=1 HTTP/1.1"
        assert {b"Host: 127.0.0.1:" + url.split(":")[2].split("/")[0].encode(), b"Content-Length: 8",
                b"Authorization: Basic eA==", b"Content-Type: application/json"} <= set(head)
        assert requests[3].endswith(b'\r\n\r\n{"id":3}')
    finally:
        await c.close()
        await stop()


async def test_http1_reconnects_when_the_server_closed_an_idle_connection():
    # the 2nd request is never answered: the server closes the connection (its idle timeout race)
    def answer(req, n):
        return None if n == 2 else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    url, requests, stop = await _raw_server(answer)
    c = Http1Client(url, {}, size=4, timeout=5)
    try:
        assert await c.post(b"a") == 200
        assert await c.post(b"b") == 200  # stale connection: sent again on a new one, no error
        assert c.connects == 2 and len(requests) == 3
    finally:
        await c.close()
        await stop()


async def test_http1_body_to_end_of_connection_and_garbage():
    answers = {1: b"HTTP/1.0 200 OK\r\n\r\nno length, ends at close", 2: b"SSH-2.0-OpenSSH\r\n\r\n"}
    url, _, stop = await _raw_server(lambda req, n: None)
    await stop()
    with pytest.raises(OSError):  # nothing listens any more
        await Http1Client(url, {}, timeout=5).post(b"x")

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1)
        writer.write(answers[len(seen) + 1])
        seen.append(1)
        await writer.drain()
        writer.close()
    seen: list[int] = []
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    c = Http1Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", {}, timeout=5)
    try:
        assert await c.post(b"x") == 200
        assert not c._idle  # read to the close, not pooled
        with pytest.raises(HttpError):
            await c.post(b"x")
    finally:
        await c.close()
        server.close()


async def test_http1_times_out_a_silent_server():
    url, _, stop = await _raw_server(lambda req, n: b"")  # reads, never answers
    c = Http1Client(url, {}, timeout=0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await c.post(b"x")
        assert time.monotonic() - t0 >= 0.3
    finally:
        await c.close()
        await stop()


async def test_http1_over_https(tmp_path):
    import ssl
    import subprocess
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    got = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        got.append(head + await reader.readexactly(2))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusting = Http1Client(f"https://localhost:{port}/h", {}, timeout=5)
        with pytest.raises(ssl.SSLError):  # a self-signed certificate is refused by default
            await untrusting.post(b"{}")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        c = Http1Client(f"https://localhost:{port}/h", {}, timeout=5, ssl_context=client_ctx)
        assert await c.post(b"{}") == 200
        assert got[-1].startswith(b"POST /h HTTP/1.1\r\nHost: localhost:%d\r\n" % port)
        await c.close()
    finally:
        server.close()
