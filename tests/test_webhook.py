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
