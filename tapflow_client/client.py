"""``TapClient``: the HTTP API of a Tap / tapflow service, and its ``/channel``.

::

    from tapflow_client import TapClient

    async with TapClient("http://127.0.0.1:2480", admin_password="secret") as tap:
        await tap.add_repos(["did:plc:ewvi7nxzyoun6zhxrhs64oiz"])
        print(await tap.info("did:plc:ewvi7nxzyoun6zhxrhs64oiz"))
        async with tap.events() as events:
            async for ev in events:
                print(ev)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Optional
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .channel import EventStream, Handler, TapChannel, format_admin_auth
from .errors import AuthError, NotFound, ParseError, TapHTTPError, TapUnreachable
from .events import RepoInfo

DEFAULT_URL = "http://127.0.0.1:2480"
USER_AGENT = "tapflow-client/0.1.0"

__all__ = ["TapClient", "RepoPage", "DEFAULT_URL"]


@dataclass(frozen=True, slots=True)
class RepoPage:
    """One page of ``GET /repos``; ``cursor`` is None on the last page."""

    repos: tuple[RepoInfo, ...]
    cursor: Optional[str]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.repos)

    def __len__(self) -> int:
        return len(self.repos)


class TapClient:
    """Async client of one service. Cheap to create; use ``async with`` or call ``close()``.

    ``url`` is the service's base URL (``http://`` or ``https://``); a path prefix is kept,
    so a service behind ``https://host/tap/`` works. ``admin_password`` adds Basic auth
    (user ``admin``) to every request and to the channel.
    """

    def __init__(self, url: str = DEFAULT_URL, admin_password: Optional[str] = None, *,
                 timeout: float = 30.0, session: Optional[aiohttp.ClientSession] = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError("Invalid URL, expected http:// or https://")
        self.url = url
        self.admin_password = admin_password or None
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        parts = urlsplit(url)
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._query = parts.query
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self.admin_password:
            self._headers["Authorization"] = format_admin_auth(self.admin_password)

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> "TapClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._own_session = True
        return self._session

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: Optional[dict[str, str]] = None) -> tuple[int, Any]:
        """(status, decoded JSON or None) for a 2xx or 404; raises for the rest."""
        url = self._base + path
        data = None if json_body is None else _dumps(json_body)
        try:
            async with self._get_session().request(method, url, data=data, params=params,
                                                   headers=self._headers) as resp:
                raw = await resp.read()
                status = resp.status
                reason = resp.reason or ""
        except asyncio.TimeoutError as e:
            raise TapUnreachable(self.url, TimeoutError(f"no answer within {self.timeout}s")) from e
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise TapUnreachable(self.url, e) from e
        body: Any = None
        if raw:
            try:
                body = _loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        if 200 <= status < 300 or status == 404:
            return status, body
        message = body.get("message") if isinstance(body, dict) else None
        message = message or (body if isinstance(body, str) and body.strip() else reason)
        if status == 401:
            raise AuthError(401, "wrong or missing admin password", method=method, url=url)
        raise TapHTTPError(status, str(message), method=method, url=url)

    # --- HTTP API -----------------------------------------------------------------------

    async def add_repos(self, dids: Iterable[str]) -> None:
        """``POST /repos/add``: track these repos (already tracked ones are left alone)."""
        status, body = await self._request("POST", "/repos/add", json_body={"dids": list(dids)})
        if status == 404:
            raise NotFound(404, _msg(body, "Not Found"), method="POST", url=self._base + "/repos/add")

    async def remove_repos(self, dids: Iterable[str]) -> None:
        """``POST /repos/remove``: stop tracking these repos and forget their records."""
        status, body = await self._request("POST", "/repos/remove", json_body={"dids": list(dids)})
        if status == 404:
            raise NotFound(404, _msg(body, "Not Found"), method="POST", url=self._base + "/repos/remove")

    async def info(self, did: str) -> RepoInfo:
        """``GET /info/{did}``; raises :class:`NotFound` if the repo is not tracked."""
        status, body = await self._request("GET", f"/info/{did}")
        if status == 404:
            raise NotFound(404, _msg(body, "repo not found"), method="GET", url=self._base + f"/info/{did}")
        return RepoInfo.from_json(body)

    async def resolve(self, did: str) -> Optional[dict[str, Any]]:
        """``GET /resolve/{did}``: the DID document, or None if the DID does not exist."""
        status, body = await self._request("GET", f"/resolve/{did}")
        if status == 404:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise ParseError("resolve: the DID document has no id")
        return body

    async def list_repos(self, *, limit: Optional[int] = None, cursor: Optional[str] = None,
                         ) -> AsyncIterator[RepoPage]:
        """``GET /repos`` (tapflow only): tracked repos with their state, page by page."""
        while True:
            params: dict[str, str] = {}
            if limit is not None:
                params["limit"] = str(limit)
            if cursor:
                params["cursor"] = cursor
            status, body = await self._request("GET", "/repos", params=params)
            if status == 404:
                raise NotFound(404, "this service does not list repos (GET /repos is a tapflow addition)",
                               method="GET", url=self._base + "/repos")
            page = _parse_page(body)
            yield page
            if not page.cursor or not page.repos:
                return
            cursor = page.cursor

    async def stats(self) -> dict[str, Any]:
        """All ``/stats/*`` in one dict: ``repo_count``, ``record_count``, ``outbox_buffer``,
        ``resync_buffer``, ``firehose`` (cursor) and ``list_repos`` (cursor)."""
        paths = ("/stats/repo-count", "/stats/record-count", "/stats/outbox-buffer",
                 "/stats/resync-buffer", "/stats/cursors")
        results = await asyncio.gather(*(self._request("GET", p) for p in paths))
        out: dict[str, Any] = {}
        for path, (status, body) in zip(paths, results):
            if status == 404 or not isinstance(body, dict):
                raise TapHTTPError(status, f"unexpected answer from {path}", method="GET", url=self._base + path)
            out.update(body)
        return out

    async def health(self) -> dict[str, Any]:
        """``GET /health`` (``{"status": "ok"}``); raises if unreachable or unhealthy."""
        status, body = await self._request("GET", "/health")
        if status == 404:
            raise NotFound(404, "no /health here: is this a Tap service?", method="GET", url=self._base + "/health")
        return body if isinstance(body, dict) else {"status": body}

    # --- channel ------------------------------------------------------------------------

    @property
    def channel_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/channel", self._query, ""))

    def channel(self, handler: Optional[Handler] = None, **options: Any) -> TapChannel:
        """A :class:`TapChannel` on ``/channel``; ``await channel.run()`` to consume.

        ``handler(event)`` may be sync or async; the event is acked when it returns and not
        acked when it raises. Options: see :class:`TapChannel` (``on_error``,
        ``on_reconnect_error``, ``auto_ack``, ``max_reconnect_seconds``, ``heartbeat_interval``,
        ``headers``...).
        """
        options.setdefault("admin_password", self.admin_password)
        return TapChannel(self.channel_url, handler, **options)

    def events(self, **options: Any) -> EventStream:
        """``async with tap.events() as events: async for ev in events: ...``

        Each event is acked when you ask for the next one (or leave the block normally).
        """
        return self.channel(None, **options).events()


def _msg(body: Any, default: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return default


def _parse_page(body: Any) -> RepoPage:
    if isinstance(body, list):  # tolerate a bare list
        return RepoPage(tuple(RepoInfo.from_json(r) for r in body), None)
    if not isinstance(body, dict) or not isinstance(body.get("repos"), list):
        raise ParseError("GET /repos: expected {\"repos\": [...], \"cursor\": ...}")
    cursor = body.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        cursor = str(cursor)
    return RepoPage(tuple(RepoInfo.from_json(r) for r in body["repos"]), cursor or None)


try:
    import orjson as _orjson

    def _dumps(v: Any) -> bytes:
        return _orjson.dumps(v)

    def _loads(raw: bytes) -> Any:
        return _orjson.loads(raw)

except ImportError:  # pragma: no cover
    import json as _json

    def _dumps(v: Any) -> bytes:
        return _json.dumps(v, separators=(",", ":")).encode()

    def _loads(raw: bytes) -> Any:
        return _json.loads(raw)
