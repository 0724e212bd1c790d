"""CrawlerSource: listRepos against the real PDS harness; listReposByCollection, paging edge
cases and errors against a small aiohttp relay stub (a PDS does not serve
listReposByCollection: the reference PDS answers 401 AuthMissing, it would proxy it)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from aiohttp import web

from config import Config
from connectors.crawler import Crawler, CrawlerSource
from operators.items import AddRepo
from store.db import open_flow_db
from store.layout import meta_cursor_collection, meta_cursor_list_repos


class StubRelay:
    """Pages of repos for listRepos / listReposByCollection; records every request."""

    def __init__(self, pages: list[dict], collection_pages: list[dict] | None = None) -> None:
        self.pages = pages
        self.collection_pages = collection_pages or []
        self.requests: list[dict] = []
        self.fail_next = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _page(self, pages: list[dict], cursor: str) -> dict:
        idx = int(cursor) if cursor else 0
        page = dict(pages[idx])
        if idx + 1 < len(pages):
            page["cursor"] = str(idx + 1)
        return page

    async def list_repos(self, req: web.Request) -> web.Response:
        self.requests.append({"path": req.path, **req.query, "ua": req.headers.get("User-Agent", "")})
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": "InternalServerError", "message": "boom"}, status=500)
        return web.json_response(self._page(self.pages, req.query.get("cursor", "")))

    async def by_collection(self, req: web.Request) -> web.Response:
        self.requests.append({"path": req.path, **req.query})
        return web.json_response(self._page(self.collection_pages, req.query.get("cursor", "")))

    async def __aenter__(self) -> "StubRelay":
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self.list_repos)
        app.router.add_get("/xrpc/com.atproto.sync.listReposByCollection", self.by_collection)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


@pytest.fixture(autouse=True)
async def _close_http_sessions():
    yield
    from connectors import http

    await http.close_sessions()


def repo(n: int, active: bool | None = True) -> dict:
    r = {"did": f"did:plc:r{n:04d}", "head": "bafy", "rev": "3l"}
    if active is not None:
        r["active"] = active
    return r


def cfg_for(tmp_path, port: int, **over) -> Config:
    return replace(Config(relay_url=f"http://127.0.0.1:{port}", data_dir=str(tmp_path / "data")), **over)


def take(c: Crawler) -> list[str]:
    return [i.did for i in c.poll(100_000)]


async def test_full_network_pages_skip_inactive_and_continue_past_all_inactive_page(tmp_path):
    pages = [
        {"repos": [repo(1), repo(2, active=False), repo(3, active=None)]},
        {"repos": [repo(4, active=False), repo(5, active=False)]},  # Tap stops here (§15.12)
        {"repos": [repo(6), {"did": 5}, {"nodid": True}, "junk"]},
    ]
    async with StubRelay(pages) as relay:
        cfg = cfg_for(tmp_path, relay.port, full_network=True)
        c = Crawler(cfg)
        n = await c.enumerate()
        assert n == 3
        assert take(c) == ["did:plc:r0001", "did:plc:r0003", "did:plc:r0006"]
        assert [r.get("cursor") for r in relay.requests] == [None, "1", "2"]
        assert all(r["limit"] == "1000" for r in relay.requests)
        assert relay.requests[0]["ua"].startswith("tapflow/")
        assert c.stats["skipped_inactive"] == 3
        # the cursor of the last page that had a next cursor is stored; a re-run resumes there
        meta = open_flow_db(cfg.data_dir).cf("meta")
        assert meta[meta_cursor_list_repos(cfg.relay_url)] == b"2"
        relay.requests.clear()
        await Crawler(cfg).enumerate()
        assert [r.get("cursor") for r in relay.requests] == ["2"]


async def test_cursor_saved_only_when_items_are_taken(tmp_path):
    async with StubRelay([{"repos": [repo(1)]}, {"repos": [repo(2)]}]) as relay:
        cfg = cfg_for(tmp_path, relay.port, full_network=True)
        c = Crawler(cfg)
        await c.enumerate()
        meta = open_flow_db(cfg.data_dir).cf("meta")
        assert meta.get(meta_cursor_list_repos(cfg.relay_url)) is None  # nothing emitted yet
        assert take(c) == ["did:plc:r0001", "did:plc:r0002"]
        assert meta[meta_cursor_list_repos(cfg.relay_url)] == b"1"


async def test_signal_collection_uses_list_repos_by_collection(tmp_path):
    cpages = [{"repos": [{"did": "did:plc:c1"}, {"did": "did:plc:c2"}]}, {"repos": [{"did": "did:plc:c3"}]}]
    async with StubRelay([{"repos": [repo(1)]}], cpages) as relay:
        cfg = cfg_for(tmp_path, relay.port, signal_collection="com.example.thing", full_network=True)
        c = Crawler(cfg)
        await c.enumerate()
        assert take(c) == ["did:plc:c1", "did:plc:c2", "did:plc:c3"]
        assert {r["path"] for r in relay.requests} == {"/xrpc/com.atproto.sync.listReposByCollection"}
        assert all(r["collection"] == "com.example.thing" for r in relay.requests)
        meta = open_flow_db(cfg.data_dir).cf("meta")
        assert meta[meta_cursor_collection(cfg.relay_url, "com.example.thing")] == b"1"


async def test_error_is_retried_after_the_retry_delay(tmp_path):
    async with StubRelay([{"repos": [repo(1)]}]) as relay:
        relay.fail_next = 1
        cfg = cfg_for(tmp_path, relay.port, full_network=True)
        c = Crawler(cfg, period=3600, retry=0.3)
        c.start()
        try:
            t = time.monotonic()
            got: list[str] = []
            while not got and time.monotonic() - t < 5:
                await asyncio.sleep(0.02)
                got = take(c)
            took = time.monotonic() - t
        finally:
            c.stop()
        assert got == ["did:plc:r0001"]
        assert c.stats["errors"] == 1 and "failed to list repos: API request failed (HTTP 500)" in c.last_error
        assert 0.25 < took < 3
        assert c.stats["runs"] == 2


async def test_runs_again_after_the_period(tmp_path):
    async with StubRelay([{"repos": [repo(1)]}]) as relay:
        c = Crawler(cfg_for(tmp_path, relay.port, full_network=True), period=0.2)
        c.start()
        try:
            await asyncio.sleep(0.7)
        finally:
            c.stop()
        assert c.stats["runs"] >= 3


def test_dynamic_mode_does_nothing(tmp_path):
    c = Crawler(cfg_for(tmp_path, 1))
    assert not c.enabled
    part = CrawlerSource(cfg_for(tmp_path, 1)).build_part("crawler", "crawler", None)
    assert part.next_batch() == [] and not part._c._thread.alive
    part.close()


def test_in_a_real_bytewax_flow(tmp_path):
    import threading

    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    from connectors.crawler import _CrawlerPartition

    loop = asyncio.new_event_loop()
    stub = StubRelay([{"repos": [repo(1), repo(2)]}, {"repos": [repo(3)]}])
    loop.run_until_complete(stub.__aenter__())
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        cfg = cfg_for(tmp_path, stub.port, full_network=True)

        class Stopping(_CrawlerPartition):
            seen = 0

            def next_batch(self):
                if Stopping.seen >= 3:
                    raise StopIteration
                items = super().next_batch()
                Stopping.seen += len(items)
                return items

        class Src(CrawlerSource):
            def build_part(self, step_id, for_part, resume_state):
                return Stopping(Crawler(self.cfg), 0.01)

        out: list = []
        flow = Dataflow("crawl")
        op.output("out", op.input("in", flow, Src(cfg)), TestingSink(out))
        run_main(flow)
        assert out == [AddRepo("did:plc:r0001"), AddRepo("did:plc:r0002"), AddRepo("did:plc:r0003")]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(2)


@pytest.mark.e2e
async def test_list_repos_against_the_real_pds(pds, tmp_path):
    """Accounts on a real PDS: active ones are discovered, a deactivated one is skipped."""
    made = await asyncio.to_thread(pds.xrpc_script, """
const tag = Math.random().toString(36).slice(2, 8);
const a = await X.createAccount(base, `cra-${tag}.test`);
const b = await X.createAccount(base, `crb-${tag}.test`);
const c = await X.createAccount(base, `crc-${tag}.test`);
await X.xrpc(base, 'com.atproto.server.deactivateAccount', { auth: c.accessJwt, body: {} });
console.log(JSON.stringify({ active: [a.did, b.did], inactive: [c.did] }));
""")
    cfg = Config(relay_url=pds.url, data_dir=str(tmp_path / "data"), full_network=True)
    c = Crawler(cfg, page_limit=2)  # small pages: exercise the cursor against the real server
    await c.enumerate()
    found = take(c)
    assert set(made["active"]) <= set(found)
    assert not set(made["inactive"]) & set(found)
    assert c.stats["pages"] >= 2
    assert open_flow_db(cfg.data_dir).cf("meta").get(meta_cursor_list_repos(cfg.relay_url))


@pytest.mark.e2e
async def test_pds_lacks_list_repos_by_collection(pds):
    """Documents why listReposByCollection is tested against the stub: a PDS refuses it."""
    from connectors import http

    with pytest.raises(http.XrpcError) as e:
        await http.get_json(pds.url + "/xrpc/com.atproto.sync.listReposByCollection",
                            {"collection": "app.bsky.feed.post"})
    await http.close_sessions()
    assert e.value.status in (400, 401, 404, 501)
