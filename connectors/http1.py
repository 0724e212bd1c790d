"""A lean HTTP/1.1 client for the webhook: keep-alive POSTs of pre-built requests to one URL.

aiohttp's client cost ~500 us of CPU per POST in the delivery child (docs/performance.md,
recommendation 6): request objects, header multidicts, tracing hooks, a full response parser.
The webhook needs much less: the same headers on every request, a body that is already bytes,
and only the status of the answer. So the request head is built once (only Content-Length
changes), and the answer is parsed as far as it must be to reuse the connection: the status
line, ``Content-Length`` / ``Transfer-Encoding: chunked`` / ``Connection: close``; the body is
read and dropped.

Connections to the URL's origin are kept alive and reused (at most ``size`` idle ones; the
webhook never has more requests in flight than workers). https uses a default SSL context
(certificates and host name checked). Redirects are followed (at most 10) as aiohttp and Go's
net/http do: 307/308 repeat the POST with its body, 301/302/303 turn it into a GET without
body; the Authorization header goes to the URL's own origin only, never across origins.

Example::

    c = Http1Client("https://example.com/hook", {"Content-Type": "application/json"}, size=4, timeout=30)
    status = await c.post(b'{"id":1}')   # raises OSError / TimeoutError / HttpError
    await c.close()
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import quote, urljoin, urlsplit

MAX_HEAD = 64 * 1024          # longest response head accepted
MAX_REDIRECTS = 10
_DROP = 1 << 16               # body bytes read at once while discarding
_REDIRECT = frozenset((301, 302, 303, 307, 308))
_PCHAR = "/%:@!$&'()*+,;=-._~"


class HttpError(Exception):
    """The server's answer is not HTTP/1.x as we can read it (the connection is dropped)."""


class _Origin:
    """Where requests go: scheme, host, port, the request target and the Host header."""

    __slots__ = ("https", "host", "port", "target", "host_header", "key")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.https = u.scheme == "https"
        self.host = u.hostname
        default = 443 if self.https else 80
        self.port = u.port or default
        self.target = quote(u.path or "/", safe=_PCHAR) + ("?" + quote(u.query, safe=_PCHAR + "?") if u.query else "")
        h = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = h if self.port == default else f"{h}:{self.port}"
        self.key = (self.https, self.host.lower(), self.port)


def _head(method: str, origin: _Origin, headers: dict[str, str], close: bool) -> bytes:
    lines = [f"{method} {origin.target} HTTP/1.1", f"Host: {origin.host_header}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class Http1Client:
    """POSTs to one URL over kept-alive HTTP/1.1 connections (see the module docstring).

    ``headers`` go on every request (Content-Length is added); ``auth`` (an Authorization value)
    only to the URL's own origin. ``timeout`` bounds one whole POST, redirects included.
    """

    def __init__(self, url: str, headers: dict[str, str], *, auth: str | None = None, size: int = 64,
                 timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self._origin = _Origin(url)
        self._headers = dict(headers)
        self._auth = auth
        own = dict(headers, Authorization=auth) if auth else headers
        # "POST /path HTTP/1.1\r\nHost: ...\r\n...Content-Length: " (the length and \r\n\r\n follow)
        self._post_head = _head("POST", self._origin, own, False) + b"Content-Length: "
        self._size = size
        self._timeout = timeout
        self._ssl = ssl_context
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.connects = 0

    def _ssl_for(self, origin: _Origin) -> ssl.SSLContext | None:
        if not origin.https:
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: _Origin) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.connects += 1
        ctx = self._ssl_for(origin)
        return await asyncio.open_connection(origin.host, origin.port, ssl=ctx, limit=MAX_HEAD,
                                             server_hostname=origin.host if ctx else None)

    async def post(self, body: bytes) -> int:
        """POST ``body``; the final status (after redirects). Raises on a connection error,
        an unreadable answer or the timeout."""
        async with asyncio.timeout(self._timeout):
            status, location = await self._post_own(body)
            if location is None:
                return status
            return await self._redirects(status, location, body)

    async def _post_own(self, body: bytes) -> tuple[int, str | None]:
        """One POST to the URL on a pooled connection. A kept-alive connection the server closed
        while it was idle fails before any answer: then once more on a new connection (if the
        server did read that request before closing, it sees it twice: the webhook is
        at-least-once anyway)."""
        req = self._post_head + str(len(body)).encode() + b"\r\n\r\n" + body
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn[1].is_closing() or conn[0].at_eof():
                conn[1].close()
                continue
            try:
                return await self._exchange(conn, req, True)
            except _Stale:
                continue
        conn = await self._connect(self._origin)
        try:
            return await self._exchange(conn, req, True)
        except _Stale as e:
            raise ConnectionResetError("connection closed before an answer") from e.__cause__

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], req: bytes,
                        pooled: bool, want_location: bool = True) -> tuple[int, str | None]:
        reader, writer = conn
        ok = False
        try:
            writer.write(req)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise _Stale() from e
                raise HttpError("connection closed in the answer's head") from e
            except asyncio.LimitOverrunError as e:
                raise HttpError("answer head too long") from e
            status, length, chunked, close, location = _parse_head(head)
            while 100 <= status < 200:  # 100 Continue and friends: the real answer follows
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, chunked, close, location = _parse_head(head)
            if status in (204, 304):
                length = 0
            if chunked:
                await _drop_chunked(reader)
            elif length is not None:
                await _drop(reader, length)
            else:  # no length: the body runs to the end of the connection
                while await reader.read(_DROP):
                    pass
                close = True
            ok = pooled and not close
            return status, (location if want_location and status in _REDIRECT and location else None)
        finally:
            if ok and len(self._idle) < self._size:
                self._idle.append(conn)
            else:
                writer.close()

    async def _redirects(self, status: int, location: str, body: bytes) -> int:
        url, method, data = self.url, "POST", body
        for _ in range(MAX_REDIRECTS):
            url = urljoin(url, location)
            if status in (301, 302, 303):
                method, data = "GET", b""
            origin = _Origin(url)
            headers = dict(self._headers)
            if self._auth and origin.key == self._origin.key:
                headers["Authorization"] = self._auth
            if method == "GET":
                headers.pop("Content-Type", None)
            head = _head(method, origin, headers, True)
            req = head + (b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data if method == "POST"
                          else b"\r\n")
            conn = await self._connect(origin)
            try:
                status, loc = await self._exchange(conn, req, False)
            except _Stale as e:
                raise ConnectionResetError("connection closed before an answer") from e.__cause__
            if loc is None:
                return status
            location = loc
        raise HttpError(f"more than {MAX_REDIRECTS} redirects")

    async def close(self) -> None:
        while self._idle:
            _, w = self._idle.pop()
            w.close()


class _Stale(Exception):
    """The connection closed before any byte of an answer."""


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool, str | None]:
    """(status, content length or None, chunked, connection close, location) of a response head.
    Looks up the four headers that matter in the lower-cased head (C-level scans, no per-line
    Python work: this runs once per POST)."""
    if not head.startswith(b"HTTP/1.") or len(head) < 12 or head[12:13] not in (b" ", b"\r"):
        raise HttpError(f"not an HTTP/1.x status line: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise HttpError(f"bad status: {head[:40]!r}") from None
    low = head.lower()
    close = head[5:8] == b"1.0"  # HTTP/1.0 closes unless it says keep-alive
    length = None
    v = _value(low, b"\r\ncontent-length:")
    if v is not None:
        try:
            length = int(v)
        except ValueError:
            raise HttpError(f"bad Content-Length: {v!r}") from None
        if length < 0:
            raise HttpError(f"bad Content-Length: {v!r}")
    v = _value(low, b"\r\ntransfer-encoding:")
    chunked = v is not None and b"chunked" in v
    v = _value(low, b"\r\nconnection:")
    if v == b"close":
        close = True
    elif v == b"keep-alive":
        close = False
    location = None
    i = low.find(b"\r\nlocation:")
    if i >= 0:  # from the original head: a URL keeps its case
        location = head[i + 11:head.index(b"\r\n", i + 2)].strip().decode("latin-1")
    return status, length, chunked, close, location


def _value(low: bytes, name: bytes) -> bytes | None:
    """The stripped value of header ``name`` (b"\\r\\nname:") in a lower-cased head, or None."""
    i = low.find(name)
    if i < 0:
        return None
    return low[i + len(name):low.index(b"\r\n", i + 2)].strip()


async def _drop(reader: asyncio.StreamReader, n: int) -> None:
    while n > 0:
        got = await reader.readexactly(min(n, _DROP))
        n -= len(got)


async def _drop_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(f"bad chunk size line: {line[:40]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return
        await _drop(reader, size + 2)
