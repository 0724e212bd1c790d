"""Webhook delivery (spec/tap-behavior.md §6.7): one POST per event, 2xx = taken.

Each event the per-repo rules allow out (``connectors.scheduler``) is POSTed to
``TAP_WEBHOOK_URL`` with the event JSON as body, ``Content-Type: application/json``, our
``User-Agent`` and, when ``TAP_ADMIN_PASSWORD`` is set, ``Authorization: Basic
base64("admin:<password>")`` (what ``@atproto/tap``'s ``assureAdminAuth`` checks). Any 2xx
takes the event; anything else (status, connection error, 30 s timeout) retries the same event
forever after ``min(2^n, 10)`` s + up to 1 s of jitter (n = attempts so far, exponent capped,
unlike Tap's which overflows after ~63 failures). At most ``TAP_WEBHOOK_CONCURRENCY`` POSTs
are in flight (Tap: unbounded); a live event is still posted alone for its repo, and the
receiver still sees historical events of one repo concurrently and in any order.

The POSTs go through ``connectors.http1.Http1Client``: a pool of kept-alive HTTP/1.1
connections and a request head built once (aiohttp's client cost ~500 us of CPU per POST).
Credentials in the URL (``user:password@``) are the Basic auth when ``TAP_ADMIN_PASSWORD`` is
not set; the admin password wins over them (as Go's SetBasicAuth). The Authorization header
never follows a redirect to another origin.

Example::

    t = WebhookTarget(cfg, on_taken)   # cfg.webhook_url = "https://example.com/hook"
    await t.start(); t.offer(ev); ...; await t.stop()
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections import deque
from typing import Callable

from urllib.parse import unquote, urlsplit, urlunsplit

from config import USER_AGENT, Config
from connectors.http1 import Http1Client
from connectors.scheduler import Scheduler
from connectors.targets import TakenCallback, metrics
from store.outbox import OutboxEvent

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
MAX_BACKOFF_S = 10.0


def backoff(attempts: int, cap: float = MAX_BACKOFF_S) -> float:
    """Tap's ``backoff(retries, 10)``: 1, 2, 4, 8, 10, 10, ... s plus 0-1 s jitter (exponent capped)."""
    return min(2.0 ** min(attempts, 16), cap) + random.random()


class WebhookTarget:
    name = "webhook"

    def __init__(self, cfg: Config, on_taken: TakenCallback, *, concurrency: int | None = None,
                 timeout: float = TIMEOUT_S, backoff: Callable[[int], float] = backoff) -> None:
        self._url, self._auth = split_credentials(cfg.webhook_url)
        if cfg.admin_password:
            # the admin password is the Authorization header (as Go's SetBasicAuth, it wins over
            # user:password@ in the URL)
            token = base64.b64encode(f"admin:{cfg.admin_password}".encode()).decode()
            self._auth = f"Basic {token}"
        self._on_taken = on_taken
        self._concurrency = concurrency or cfg.webhook_concurrency
        self._timeout = timeout
        self._backoff = backoff
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        self._sched = Scheduler(self._release)
        self._ready: deque[OutboxEvent] = deque()
        self._have_ready = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._client: Http1Client | None = None
        self._outcomes: dict = {}  # outcome -> its labelled counter
        self.posts = 0
        self.failures = 0

    async def start(self) -> None:
        self._client = Http1Client(self._url, self._headers, auth=self._auth, size=self._concurrency,
                                   timeout=self._timeout)
        self._workers = [asyncio.create_task(self._worker(), name=f"webhook-{i}") for i in range(self._concurrency)]

    def offer(self, ev: OutboxEvent) -> None:
        if ev.internal:
            self._on_taken(ev.key)
            return
        self._sched.add(ev)

    async def stop(self) -> None:
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def queued(self) -> int:
        return len(self._ready)

    def _release(self, ev: OutboxEvent) -> None:
        self._ready.append(ev)
        self._have_ready.set()

    async def _worker(self) -> None:
        ready = self._ready
        while True:
            if not ready:
                self._have_ready.clear()
                await self._have_ready.wait()
                continue
            ev = ready.popleft()
            await self._deliver(ev)
            self._sched.taken(ev)
            self._on_taken(ev.key)

    async def _deliver(self, ev: OutboxEvent) -> None:
        """POST until a 2xx."""
        attempts = 0
        m = metrics()
        while True:
            outcome = await self._post(ev)
            c = self._outcomes.get(outcome)
            if c is None:
                c = self._outcomes[outcome] = m.webhook_requests.labels(outcome)
            c.inc()
            m.events_delivered.inc()
            if outcome == "success":
                return
            self.failures += 1
            delay = self._backoff(attempts)
            attempts += 1
            log.warning("webhook failed, retrying", extra={"id": ev.id, "did": ev.did, "outcome": outcome,
                                                           "retries": attempts, "retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)

    async def _post(self, ev: OutboxEvent) -> str:
        assert self._client is not None
        self.posts += 1
        try:
            status = await self._client.post(ev.payload)
            return "success" if 200 <= status < 300 else "non_2xx"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("webhook request error", extra={"id": ev.id, "error": repr(e)})
            return "error"


def split_credentials(url: str) -> tuple[str, str | None]:
    """``(url without user:password@, "Basic ..." from them or None)``."""
    u = urlsplit(url)
    if "@" not in u.netloc:
        return url, None
    userinfo, _, hostport = u.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit((u.scheme, hostport, u.path, u.query, u.fragment)), f"Basic {token}"
