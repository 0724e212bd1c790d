"""CrawlerSource: discovers repos to track by listing the relay (spec/tap-behavior.md §11).

- ``TAP_SIGNAL_COLLECTION=<nsid>``: pages
  ``{relay}/xrpc/com.atproto.sync.listReposByCollection?collection=<nsid>&limit=1000``,
  cursor in ``meta[cursor/collection/<relay>\\0<nsid>]``.
- else ``TAP_FULL_NETWORK``: pages ``{relay}/xrpc/com.atproto.sync.listRepos?limit=1000``,
  repos with ``active: false`` skipped, cursor in ``meta[cursor/listrepos/<relay>]``.
- Neither: nothing to do (repos come from ``/repos/add`` only).

Each listed DID becomes ``AddRepo(did)`` (RepoLogic makes it ``pending``; adding is
idempotent). A page's cursor is saved once its items have been handed to the flow, so a
restart resumes after the last page taken, as Tap does (a re-run only sees repos listed
after that cursor). Runs at start, then every 24 h; on an error, again after 1 min.

Fixed against Tap: a page whose repos are all inactive no longer ends the enumeration
(Tap stops at the first page with nothing to insert, §15.12); only an empty page or an
empty/absent/unchanged next cursor ends it.

Note: a PDS does not serve ``listReposByCollection`` (the reference PDS answers
``AuthMissing``, it would proxy to an AppView); relays and collection indexers do.

Example::

    from bytewax.dataflow import Dataflow
    import bytewax.operators as op
    from config import load_config
    from connectors.crawler import CrawlerSource

    flow = Dataflow("crawl")
    adds = op.input("crawler", flow, CrawlerSource(load_config()))
    op.inspect("add", adds)

``Crawler`` is the same without bytewax (``start()``, ``poll()``, ``stop()``;
``enumerate()`` is one pass, awaitable).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import Counter

from runtime.shutdown import cap_awake, check_stop
from config import Config
from connectors import http
from connectors.http import LoopThread
from operators.items import AddRepo
from store.db import Database, open_flow_db
from store.layout import meta_cursor_collection, meta_cursor_list_repos

__all__ = ["CrawlerSource", "Crawler", "PAGE_LIMIT", "PERIOD_S", "RETRY_S"]

_log = logging.getLogger(__name__)

PAGE_LIMIT = 1000
PERIOD_S = 24 * 3600.0
RETRY_S = 60.0
REQUEST_TIMEOUT_S = 30.0

DISCOVERED = Counter("tap_crawler_repos_discovered", "repos found by the crawler (listRepos/listReposByCollection)")
PAGES = Counter("tapflow_crawler_pages", "listing pages fetched, by outcome", ["outcome"])


@dataclass(slots=True)
class _CursorMark:
    """Queued after a page's items: save ``cursor`` once they have been emitted."""

    key: bytes
    cursor: str


class Crawler:
    """Listing loop without bytewax. ``poll()`` returns queued ``AddRepo`` items (and saves cursors)."""

    def __init__(self, cfg: Config, db: Database | None = None, *, period: float = PERIOD_S,
                 retry: float = RETRY_S, queue_max: int = 20_000, page_limit: int = PAGE_LIMIT) -> None:
        self.cfg = cfg
        self.db = db if db is not None else open_flow_db(cfg.data_dir)
        self.period = period
        self.retry = retry
        self.page_limit = page_limit
        self._queue: deque[Any] = deque()
        self._queue_max = queue_max
        self._thread = LoopThread("crawler")
        self.stats: dict[str, int] = {"runs": 0, "pages": 0, "discovered": 0, "skipped_inactive": 0, "errors": 0}
        self.last_error = ""
        if cfg.signal_collection:
            self.mode = "collection"
            self.url = cfg.relay_url.rstrip("/") + "/xrpc/com.atproto.sync.listReposByCollection"
            self.cursor_key = meta_cursor_collection(cfg.relay_url, cfg.signal_collection)
        elif cfg.full_network:
            self.mode = "full"
            self.url = cfg.relay_url.rstrip("/") + "/xrpc/com.atproto.sync.listRepos"
            self.cursor_key = meta_cursor_list_repos(cfg.relay_url)
        else:
            self.mode = ""
            self.url = ""
            self.cursor_key = b""

    @property
    def enabled(self) -> bool:
        return bool(self.mode) and not self.cfg.outbox_only

    def start(self) -> None:
        if self.enabled:
            self._thread.start(self._run)

    def stop(self) -> None:
        self._thread.stop()

    def stored_cursor(self) -> str:
        raw = self.db.cf("meta").get(self.cursor_key) if self.cursor_key else None
        return raw.decode() if raw else ""

    # --- bytewax side ---------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._queue)

    def poll(self, max_items: int = 5000) -> list[AddRepo]:
        out: list[AddRepo] = []
        q = self._queue
        mark: _CursorMark | None = None
        while q and len(out) < max_items:
            x = q.popleft()
            if isinstance(x, _CursorMark):
                mark = x
            else:
                out.append(x)
        if mark is not None:
            b = self.db.batch()
            b.put(mark.key, mark.cursor.encode(), self.db.handle("meta"))
            self.db.write(b)
        return out

    # --- loop side -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.enumerate()
                delay = self.period
                _log.info("crawler: enumeration complete; next run later", extra={"in_s": delay, "mode": self.mode})
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats["errors"] += 1
                self.last_error = str(e)
                delay = self.retry
                _log.error("crawler: enumeration failed; retrying", extra={"error": str(e), "in_s": delay})
            await asyncio.sleep(delay)

    async def enumerate(self) -> int:
        """One pass from the stored cursor to the end of the listing; returns DIDs queued."""
        self.stats["runs"] += 1
        cursor = self.stored_cursor()
        found = 0
        while True:
            while len(self._queue) >= self._queue_max:
                await asyncio.sleep(0.01)
            params: dict[str, Any] = {"limit": self.page_limit}
            if self.mode == "collection":
                params["collection"] = self.cfg.signal_collection
            if cursor:
                params["cursor"] = cursor
            try:
                page = await http.get_json(self.url, params, timeout=REQUEST_TIMEOUT_S)
            except http.HttpError as e:
                PAGES.labels("error").inc()
                what = "list repos by collection" if self.mode == "collection" else "list repos"
                raise RuntimeError(f"failed to {what}: {e}") from None
            repos = page.get("repos") if isinstance(page, dict) else None
            if not isinstance(repos, list):
                PAGES.labels("error").inc()
                raise RuntimeError("listing answer has no repos list")
            PAGES.labels("ok").inc()
            self.stats["pages"] += 1
            n = 0
            for r in repos:
                if not isinstance(r, dict):
                    continue
                did = r.get("did")
                if not isinstance(did, str) or not did.startswith("did:"):
                    continue
                if self.mode == "full" and r.get("active") is False:
                    self.stats["skipped_inactive"] += 1
                    continue
                self._queue.append(AddRepo(did=did))
                n += 1
            found += n
            self.stats["discovered"] += n
            DISCOVERED.inc(n)
            _log.info("crawler: page listed", extra={"mode": self.mode, "repos": n, "listed": len(repos)})
            nxt = page.get("cursor")
            if not repos or not isinstance(nxt, str) or not nxt or nxt == cursor:
                return found
            cursor = nxt
            self._queue.append(_CursorMark(self.cursor_key, cursor))


# --- bytewax ----------------------------------------------------------------------------------

class _CrawlerPartition(StatefulSourcePartition):
    def __init__(self, c: Crawler, idle: float) -> None:
        self._c = c
        self._idle = timedelta(seconds=idle)
        c.start()

    def next_batch(self) -> Iterable[AddRepo]:
        check_stop()
        return self._c.poll() if self._c.pending() else []

    def next_awake(self) -> datetime | None:
        if self._c.pending():
            return None
        idle = self._idle if self._c.enabled else timedelta(days=1)
        return cap_awake(datetime.now(timezone.utc) + idle)

    def snapshot(self) -> None:
        return None  # cursors live in meta

    def close(self) -> None:
        self._c.stop()


class CrawlerSource(FixedPartitionedSource):
    """One partition listing the relay (see module doc)."""

    def __init__(self, cfg: Config, db: Database | None = None, *, period: float = PERIOD_S,
                 retry: float = RETRY_S, idle: float = 0.05) -> None:
        self.cfg = cfg
        self._db = db
        self._period = period
        self._retry = retry
        self._idle = idle

    def list_parts(self) -> list[str]:
        return ["crawler"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _CrawlerPartition:
        return _CrawlerPartition(Crawler(self.cfg, self._db, period=self._period, retry=self._retry), self._idle)
