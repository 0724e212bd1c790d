"""Outbound HTTP for the connectors: one place for the User-Agent, timeouts, size caps,
XRPC error text and the public-address guard.

Every request goes through an ``aiohttp.ClientSession`` owned by the running event loop
(sessions cannot cross loops; each source runs its own loop in its own thread)::

    from connectors import http

    async def main():
        listing = await http.get_json("https://relay.example/xrpc/com.atproto.sync.listRepos",
                                      {"limit": 1000}, timeout=30)
        car = await http.get_bytes(pds + "/xrpc/com.atproto.sync.getRepo", {"did": did},
                                   timeout=300, max_bytes=1 << 30, public_only=True)
        await http.close_sessions()

Errors read like Tap's (indigo ``atclient.APIError``), because they end up in ``/info``'s
``error`` field: ``API request failed (HTTP 400): RepoDeactivated: repo is deactivated``.

``public_only=True`` (for URLs taken from DID documents when ``TAP_PUBLIC_ONLY`` is on)
checks every address the host resolves to at connect time (a custom resolver, so DNS
rebinding between a check and the connect cannot slip through) and refuses loopback,
private, link-local, multicast, reserved and unspecified addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from config import USER_AGENT

__all__ = [
    "LoopThread",
    "HttpError",
    "XrpcError",
    "BodyTooLarge",
    "NotPublic",
    "session",
    "close_sessions",
    "get_json",
    "get_bytes",
    "get_body",
    "SpooledBody",
    "is_public_ip",
    "CONNECT_TIMEOUT",
]

_log = logging.getLogger(__name__)

#: Seconds to wait for a TCP/TLS connection before giving up (inside the total timeout).
CONNECT_TIMEOUT = 15.0
_CHUNK = 1 << 16


class HttpError(Exception):
    """A request that did not produce a usable answer (network, timeout, status, size)."""


class XrpcError(HttpError):
    """A non-2xx answer; ``str()`` is Tap's text for it."""

    def __init__(self, status: int, name: str = "", message: str = "") -> None:
        self.status = status
        self.name = name
        self.message = message
        super().__init__(self._text())

    def _text(self) -> str:
        if self.status > 0:
            if self.name and self.message:
                return f"API request failed (HTTP {self.status}): {self.name}: {self.message}"
            if self.name:
                return f"API request failed (HTTP {self.status}): {self.name}"
            return f"API request failed (HTTP {self.status})"
        return "API request failed"

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


class BodyTooLarge(HttpError):
    """The body exceeds the cap (announced by Content-Length or seen while streaming)."""


class NotPublic(HttpError):
    """``public_only`` is on and the host resolves to a non-public address."""


def is_public_ip(addr: str) -> bool:
    """True for a globally routable unicast address (``protocol.identity``'s rule, one definition)."""
    from protocol.identity import is_public_ip as _is_public

    return _is_public(addr)


def _count_refused() -> None:
    """``tapflow_public_only_refused_total{client="http"}`` (the counter lives with the guard's rule)."""
    from protocol.identity import count_public_only_refused

    count_public_only_refused("http")


class _PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver, then drops every non-public address."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public_ip(r["host"])]
        if not public:
            _count_refused()
            raise NotPublic(f"refusing non-public address for host {host!r} (TAP_PUBLIC_ONLY)")
        return public

    async def close(self) -> None:
        await self._inner.close()


# (loop, public_only) -> session. A loop that is closed takes its sessions with it.
_sessions: dict[tuple[int, bool], tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}


def session(public_only: bool = False) -> aiohttp.ClientSession:
    """The running loop's shared session (created on first use)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), public_only)
    entry = _sessions.get(key)
    if entry is not None and entry[0] is loop and not entry[1].closed:
        return entry[1]
    for k in [k for k, (lp, _) in _sessions.items() if lp.is_closed()]:
        del _sessions[k]  # sessions of loops that ended without close_sessions()
    connector = aiohttp.TCPConnector(
        limit=256,
        limit_per_host=32,
        ttl_dns_cache=300,
        resolver=_PublicOnlyResolver() if public_only else None,
        # IP literals skip the resolver, so they are checked in _check_literal instead.
    )
    s = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=300, connect=CONNECT_TIMEOUT),
        auto_decompress=True,
    )
    _sessions[key] = (loop, s)
    return s


async def close_sessions() -> None:
    """Close the running loop's sessions (call before the loop stops)."""
    loop = asyncio.get_running_loop()
    for key in [k for k, (lp, _) in _sessions.items() if lp is loop]:
        _, s = _sessions.pop(key)
        await s.close()


def _check_literal(url: str, public_only: bool) -> None:
    if not public_only:
        return
    host = URL(url).host or ""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: the resolver checks it
    if not is_public_ip(host.strip("[]")):
        _count_refused()
        raise NotPublic(f"refusing non-public address {host!r} (TAP_PUBLIC_ONLY)")


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if 200 <= resp.status < 300:
        return
    name = message = ""
    try:
        body = await resp.content.read(64 << 10)
        data = orjson.loads(body)
        if isinstance(data, dict):
            name = data.get("error") if isinstance(data.get("error"), str) else ""
            message = data.get("message") if isinstance(data.get("message"), str) else ""
    except Exception:
        pass
    raise XrpcError(resp.status, name or "", message or "")


def _wrap(e: BaseException, url: str) -> HttpError:
    if isinstance(e, HttpError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return HttpError(f"request timed out: GET {_safe(url)}")
    if isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error, NotPublic):
        return e.os_error
    cause = e.__cause__ or e.__context__
    if isinstance(cause, NotPublic):
        return cause
    return HttpError(f"GET {_safe(url)}: {type(e).__name__}: {e}")


def _safe(url: str) -> str:
    """The URL without query (no DIDs or cursors needed in connection error texts twice)."""
    return url.split("?", 1)[0]


async def get_json(url: str, params: Mapping[str, Any] | None = None, *, timeout: float = 30.0,
                   max_bytes: int = 16 << 20, public_only: bool = False) -> Any:
    """GET and parse a JSON body (XRPC query). Raises ``XrpcError`` on non-2xx, ``HttpError`` else."""
    body = await get_bytes(url, params, timeout=timeout, max_bytes=max_bytes, public_only=public_only)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HttpError(f"invalid JSON from {_safe(url)}: {e}") from None


async def get_bytes(url: str, params: Mapping[str, Any] | None = None, *, timeout: float,
                    max_bytes: int, public_only: bool = False) -> bytes:
    """GET a body of at most ``max_bytes``, streamed (never buffers more than the cap).

    Redirects (at most 5) are followed by hand so each hop passes the public-address check.
    """
    body = await get_body(url, params, timeout=timeout, max_bytes=max_bytes, public_only=public_only)
    assert isinstance(body, bytes)
    return body


@dataclass(frozen=True, slots=True)
class SpooledBody:
    """A body written to the file ``path`` (``size`` bytes) instead of memory; the caller deletes it."""

    path: str
    size: int


async def get_body(url: str, params: Mapping[str, Any] | None = None, *, timeout: float, max_bytes: int,
                   public_only: bool = False, spool_path: str | None = None,
                   spool_over: int = 0) -> bytes | SpooledBody:
    """``get_bytes``, but a body longer than ``spool_over`` bytes goes to the file ``spool_path``
    as it arrives (``SpooledBody``; ``max_bytes`` still caps it), so a huge body never sits in
    memory. Shorter bodies come back as ``bytes``, as from ``get_bytes``. On any error the file
    is gone."""
    s = session(public_only)
    to = aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout))
    spool = (spool_path, spool_over) if spool_path else None
    try:
        async with asyncio.timeout(timeout):
            return await _get_body(s, url, params, to, max_bytes, public_only, spool)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, HttpError) as e:
        raise _wrap(e, url) from None


async def _get_body(s: aiohttp.ClientSession, url: str, params: Mapping[str, Any] | None,
                    to: aiohttp.ClientTimeout, max_bytes: int, public_only: bool,
                    spool: tuple[str, int] | None) -> bytes | SpooledBody:
    target: URL = URL(url)
    if params:
        target = target.update_query({k: str(v) for k, v in params.items()})
    for _ in range(6):
        _check_literal(str(target), public_only)
        async with s.get(target, timeout=to, allow_redirects=False) as resp:
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                target = target.join(URL(resp.headers["Location"]))
                continue
            await _raise_for_status(resp)
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise BodyTooLarge(f"response of {resp.content_length} bytes exceeds the limit of {max_bytes} bytes")
            return await _read_body(resp, max_bytes, spool)
    raise HttpError(f"too many redirects: GET {_safe(url)}")


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int,
                     spool: tuple[str, int] | None) -> bytes | SpooledBody:
    """The body, in memory while it is at most ``over`` bytes of ``spool = (path, over)``, then
    in the file ``path`` (removed again if the body turns out bad); all in memory without ``spool``."""
    path, over = spool if spool is not None else ("", max_bytes)  # over max_bytes: never reached
    buf = bytearray()
    f = None
    n = 0
    try:
        if resp.content_length is not None and resp.content_length > over:
            f = open(path, "wb")
        async for chunk in resp.content.iter_chunked(_CHUNK):
            n += len(chunk)
            if n > max_bytes:
                raise BodyTooLarge(f"response exceeds the limit of {max_bytes} bytes")
            if f is not None:
                f.write(chunk)  # the page cache takes it: no wait worth a thread hop
                continue
            buf += chunk
            if n > over:
                f = open(path, "wb")
                f.write(buf)
                buf = bytearray()
        _check_length(resp, n)
        if f is None:
            return bytes(buf)
        f.close()
        return SpooledBody(path, n)
    except BaseException:
        if f is not None:
            f.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _check_length(resp: aiohttp.ClientResponse, n: int) -> None:
    if resp.content_length is not None and n != resp.content_length:
        raise HttpError(f"truncated body: got {n} of {resp.content_length} bytes")


class LoopThread:
    """An asyncio loop in a daemon thread: the connectors' I/O side.

    ``start(main)`` runs ``main()`` (a coroutine function) until it returns or ``stop()``
    cancels it; the loop's HTTP sessions are closed before the thread ends. The bytewax
    side never awaits anything: it exchanges data with ``main`` through thread-safe
    structures (``collections.deque``) and calls ``stop()`` from ``close()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self, main) -> None:
        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)

            async def wrapper() -> None:
                self._task = asyncio.current_task()
                self._started.set()
                try:
                    await main()
                except asyncio.CancelledError:
                    pass
                except BaseException as e:  # logged by the caller's main normally
                    self.error = e
                    _log.exception("%s: background loop failed", self.name)
                finally:
                    try:
                        await close_sessions()
                    except Exception:
                        pass

            try:
                loop.run_until_complete(wrapper())
            finally:
                self._started.set()
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        self._started.wait(5)

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the loop thread (thread-safe, fire and forget)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel ``main`` and wait for the thread (at most ``timeout`` seconds)."""
        task = self._task
        if task is not None:
            self.call(task.cancel)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
