"""``/channel``: events over a WebSocket, acked after your handler succeeds.

The contract is the official client's (``@atproto/tap`` ``TapChannel``):

- frames are handled strictly one at a time, in arrival order;
- a frame that does not parse goes to ``on_error`` (a :class:`ParseError`) and is never acked;
- an event is acked (``{"type":"ack","id":N}``) only after the handler returned; if it
  raised, ``on_error`` gets a :class:`HandlerError` and the event is not acked, so the
  server delivers it again later (after ``TAP_RETRY_TIMEOUT``; your handler sees it again);
- an ack made while disconnected is queued (a set, so duplicates collapse) and sent as soon
  as the next connection opens; acking never blocks the handler (the 0.4 behaviour);
- lost connections (refused, reset, dropped TCP, heartbeat timeout) are retried forever with
  capped exponential backoff and jitter: ``min(2^n, max_reconnect_seconds)`` ± half a second;
- the client pings on open and every ``heartbeat_interval``; if nothing at all arrived
  during an interval in which it was waiting for data, the connection is dropped and
  re-dialed. Server pings are answered.

Where we decide differently from the official client (documented in docs/client.md):

- an upgrade answered 401 raises :class:`AuthError` (a wrong password never heals); 400,
  403, 404 and 405 raise :class:`TapHTTPError`; other statuses (502, 503 during a restart)
  are retried;
- a close frame with code 1000 (normal) ends ``run()`` quietly, as in the official client;
  1002/1003/1007/1008/1009/1010 (protocol or policy errors, a retry would repeat them)
  raise :class:`ChannelClosed`; anything else (1001 going away, 1011-1014 restarts, proxy
  codes) is reconnected, since Tap itself never sends a close frame and proxies do.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import random
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, Union

import aiohttp

from .errors import AuthError, ChannelClosed, HandlerError, ParseError, TapError, TapHTTPError
from .events import Event, parse_event

log = logging.getLogger("tapflow_client")

Handler = Callable[[Event], Union[Awaitable[None], None]]
ErrorHandler = Callable[[Exception], None]
ReconnectHandler = Callable[[BaseException, int, bool], None]

_TERMINAL_CLOSE = {1002, 1003, 1007, 1008, 1009, 1010}
_FATAL_STATUS = {400, 401, 403, 404, 405}
_RETRYABLE = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def format_admin_auth(password: str) -> str:
    """``Authorization`` header value for the admin password (user ``admin``)."""
    return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode("ascii")


def _default_on_error(err: Exception) -> None:
    log.error("%s", err, exc_info=err if isinstance(err, HandlerError) else None)


def _default_on_reconnect(err: BaseException, attempt: int, initial: bool) -> None:
    what = "connecting" if initial else "connection lost"
    log.warning("tap channel: %s (%s); retry %d", what, err or type(err).__name__, attempt + 1)


class TapChannel:
    """One logical subscription to ``/channel`` that survives reconnects.

    Use ``await channel.run()`` with a handler, or iterate ``channel.events()``. Prefer
    ``TapClient.channel()`` / ``TapClient.events()``, which build the URL and auth for you.
    """

    def __init__(
        self,
        url: str,
        handler: Optional[Handler] = None,
        *,
        admin_password: Optional[str] = None,
        on_error: Optional[ErrorHandler] = None,
        on_reconnect_error: Optional[ReconnectHandler] = None,
        auto_ack: bool = True,
        max_reconnect_seconds: float = 64.0,
        backoff_base: float = 1.0,
        heartbeat_interval: float = 10.0,
        connect_timeout: float = 30.0,
        headers: Optional[Mapping[str, str]] = None,
        compress: bool = False,
        max_msg_size: int = 64 << 20,
    ):
        if not url.startswith(("ws://", "wss://")):
            raise ValueError("Invalid channel URL, expected ws:// or wss://")
        self.url = url
        self.handler = handler
        self.on_error: ErrorHandler = on_error or _default_on_error
        self.on_reconnect_error: ReconnectHandler = on_reconnect_error or _default_on_reconnect
        self.auto_ack = auto_ack
        self.max_reconnect_seconds = max_reconnect_seconds
        self.backoff_base = backoff_base
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        self.compress = compress
        self.max_msg_size = max_msg_size
        self._headers = dict(headers or {})
        if admin_password:
            self._headers["Authorization"] = format_admin_auth(admin_password)
        self._ws: Optional[aiohttp.ClientWebSocketResponse] = None
        self._pending_acks: set[int] = set()
        self._stop = asyncio.Event()
        self._running = False
        self._run_task: Optional[asyncio.Task] = None
        self._done: Optional[asyncio.Future] = None
        self._waiting = False  # in receive(), i.e. not inside a handler
        self.connections = 0  # successful opens so far (for status displays and tests)

    # --- acks ---------------------------------------------------------------------------

    async def ack(self, event: Union[Event, int]) -> None:
        """Ack an event (or id). Sent now if connected, else queued for the next connection.

        Returns once the ack is written or queued, never waits for a reconnect.
        """
        eid = event if isinstance(event, int) else event.id
        ws = self._ws
        if ws is None or ws.closed:
            self._pending_acks.add(eid)
            return
        try:
            await ws.send_str(_ack_frame(eid))
        except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError):
            self._pending_acks.add(eid)

    @property
    def pending_acks(self) -> frozenset[int]:
        """Acks waiting for a connection."""
        return frozenset(self._pending_acks)

    async def _flush_acks(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        for eid in sorted(self._pending_acks):
            try:
                await ws.send_str(_ack_frame(eid))
            except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError) as e:
                self.on_error(TapError(f"failed to send ack for event {eid}: {e}"))
                return
            self._pending_acks.discard(eid)

    # --- running with a handler ---------------------------------------------------------

    async def run(self) -> None:
        """Receive events and call the handler until :meth:`stop`, a normal close frame, or
        a fatal error (:class:`AuthError`, :class:`TapHTTPError`, :class:`ChannelClosed`,
        or whatever ``on_error`` raises)."""
        if self.handler is None:
            raise TypeError("TapChannel.run() needs a handler; or iterate channel.events()")
        self._run_task = asyncio.current_task()
        async with _aclosing(self._events()) as events:
            async for ev in events:
                try:
                    res = self.handler(ev)
                    if inspect.isawaitable(res):
                        await res
                except Exception as e:  # noqa: BLE001 - reported, the event stays unacked
                    self.on_error(HandlerError(ev, e))
                    continue
                if self.auto_ack:
                    await self.ack(ev.id)

    start = run  # the official client's name

    async def stop(self) -> None:
        """Stop receiving and disconnect. An event being handled is finished (and acked if
        the handler returns) first. Safe from inside the handler; elsewhere it waits until
        ``run()`` has returned."""
        self._stop.set()
        ws = self._ws
        if ws is not None and not ws.closed and self._waiting:
            await _abort(ws)  # idle in receive(): nothing to finish
        if self._done is not None and not self._in_handler():
            try:
                await asyncio.shield(self._done)
            except Exception:  # noqa: BLE001 - the runner reports its own errors
                pass

    destroy = stop

    def _in_handler(self) -> bool:
        return self._run_task is not None and asyncio.current_task() is self._run_task

    async def __aenter__(self) -> "TapChannel":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # --- iterating ----------------------------------------------------------------------

    def events(self) -> "EventStream":
        """An async iterator of events; see :class:`EventStream` for when acks happen."""
        return EventStream(self)

    # --- the connection loop ------------------------------------------------------------

    async def _events(self) -> AsyncIterator[Event]:
        if self._running:
            raise RuntimeError("this channel is already being consumed")
        self._running = True
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        session = aiohttp.ClientSession()
        attempt = 0
        ever_open = False
        try:
            while not self._stop.is_set():
                try:
                    ws = await self._connect(session)
                except (AuthError, TapHTTPError):
                    raise
                except _RETRYABLE as e:
                    if self._stop.is_set():
                        break
                    self.on_reconnect_error(e, attempt, not ever_open)
                    await self._sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                if ws is None:  # stopped while connecting
                    break
                ever_open = True
                attempt = 0
                self.connections += 1
                self._ws = ws
                try:
                    await self._flush_acks(ws)
                    reason: BaseException = ConnectionResetError("connection closed")
                    async with _aclosing(self._receive(ws)) as items:
                        async for item in items:
                            if isinstance(item, BaseException):
                                reason = item
                                break
                            yield item
                finally:
                    self._ws = None
                    if not ws.closed:
                        await _abort(ws)
                if isinstance(reason, _NormalClose) or self._stop.is_set():
                    break
                if isinstance(reason, ChannelClosed):
                    raise reason
                self.on_reconnect_error(reason, attempt, False)
                await self._sleep(self._backoff(attempt))
                attempt += 1
        finally:
            self._running = False
            await session.close()
            if not self._done.done():
                self._done.set_result(None)

    async def _connect(self, session: aiohttp.ClientSession) -> Optional[aiohttp.ClientWebSocketResponse]:
        dial = asyncio.ensure_future(session.ws_connect(
            self.url, headers=self._headers, autoping=False, autoclose=True, compress=15 if self.compress else 0,
            max_msg_size=self.max_msg_size, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            heartbeat=None))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({dial, stop}, timeout=self.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if dial not in done:
            dial.cancel()
            try:
                ws = await dial
                await _abort(ws)
            except BaseException:  # noqa: BLE001 - the dial was abandoned
                pass
            if self._stop.is_set():
                return None
            raise asyncio.TimeoutError(f"no answer from {self.url} within {self.connect_timeout}s")
        try:
            return dial.result()
        except aiohttp.WSServerHandshakeError as e:
            status = e.status
            if status == 401:
                raise AuthError(401, "the admin password is missing or wrong", method="GET", url=self.url) from None
            if status in _FATAL_STATUS:
                hint = " (is the service in webhook or Kafka-only mode?)" if status == 400 else ""
                raise TapHTTPError(status, f"WebSocket upgrade refused{hint}", method="GET", url=self.url) from None
            raise

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[Union[Event, BaseException]]:
        """Yield events until the connection ends; the last item is the reason it ended."""
        interval = self.heartbeat_interval
        last_in = time.monotonic()
        last_ping = time.monotonic()
        try:
            await ws.ping()
        except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError) as e:
            yield e
            return
        while True:
            if self._stop.is_set():
                yield _NormalClose()
                return
            wait = max(0.01, last_ping + interval - time.monotonic()) if interval > 0 else None
            self._waiting = True
            try:
                msg = await ws.receive(timeout=wait)
            except asyncio.TimeoutError:
                msg = None
            finally:
                self._waiting = False
            if msg is None:
                # a heartbeat tick: we were waiting for data the whole time
                if last_in < last_ping:
                    yield TimeoutError(f"no data and no pong for {interval}s")
                    return
                last_ping = time.monotonic()
                try:
                    await ws.ping()
                except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError) as e:
                    yield e
                    return
                continue
            last_in = time.monotonic()
            t = msg.type
            if t is aiohttp.WSMsgType.TEXT or t is aiohttp.WSMsgType.BINARY:
                try:
                    ev = parse_event(msg.data)
                except ParseError as e:
                    e.frame = msg.data if isinstance(msg.data, str) else bytes(msg.data).decode("utf-8", "replace")
                    self.on_error(e)
                    continue
                yield ev
                if interval > 0 and time.monotonic() - last_ping >= interval:
                    # a long handler: keep pinging, but judge liveness only while waiting
                    last_in = last_ping = time.monotonic()
                    try:
                        await ws.ping()
                    except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError) as e:
                        yield e
                        return
            elif t is aiohttp.WSMsgType.PING:
                try:
                    await ws.pong(msg.data)
                except (aiohttp.ClientError, ConnectionError, RuntimeError, OSError) as e:
                    yield e
                    return
            elif t is aiohttp.WSMsgType.PONG:
                continue
            elif t is aiohttp.WSMsgType.CLOSE:
                code = int(msg.data or 1005)
                reason = msg.extra or ""
                if code == 1000:
                    yield _NormalClose()
                elif code in _TERMINAL_CLOSE:
                    yield ChannelClosed(code, reason)
                else:
                    yield ConnectionResetError(f"server closed the channel with code {code} {reason}".strip())
                return
            elif t is aiohttp.WSMsgType.ERROR:
                err = msg.data if isinstance(msg.data, BaseException) else ConnectionResetError(str(msg.data))
                yield err
                return
            else:  # CLOSED / CLOSING: the TCP connection went away (1006)
                if self._stop.is_set():
                    yield _NormalClose()
                else:
                    yield ConnectionResetError("connection lost")
                return

    def _backoff(self, attempt: int) -> float:
        base = self.backoff_base
        delay = min(base * (2 ** min(attempt, 30)), self.max_reconnect_seconds)
        delay += random.uniform(-0.5, 0.5) * base
        return max(0.0, min(delay, self.max_reconnect_seconds))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass


class _NormalClose(Exception):
    """Internal: the stream ends without error."""


class EventStream:
    """Async iterator over channel events, acking each one when you ask for the next.

    ::

        async with client.events() as events:
            async for ev in events:
                await store(ev)          # returns -> acked when the loop comes back
                                         # raises  -> not acked, redelivered later

    Leaving an ``async with`` block normally (``break``) acks the last event; leaving
    it with an exception does not. Without ``async with``, the last event is not acked.
    With ``auto_ack=False`` nothing is acked for you: call ``await events.ack(ev)``.
    """

    def __init__(self, channel: TapChannel):
        self.channel = channel
        self._gen: Optional[AsyncIterator[Event]] = None
        self._last: Optional[int] = None
        self._closed = False

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._gen is None:
            self._gen = self.channel._events()
        await self._ack_last()
        try:
            ev = await self._gen.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        self._last = ev.id
        return ev

    async def ack(self, event: Union[Event, int]) -> None:
        """Ack now (for ``auto_ack=False``, or to ack before a long follow-up)."""
        eid = event if isinstance(event, int) else event.id
        if eid == self._last:
            self._last = None
        await self.channel.ack(eid)

    async def _ack_last(self) -> None:
        last, self._last = self._last, None
        if last is not None and self.channel.auto_ack:
            await self.channel.ack(last)

    async def aclose(self) -> None:
        """Disconnect; an event not yet acked stays unacked."""
        self._last = None
        self._closed = True
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self._ack_last()
        await self.aclose()


def _ack_frame(eid: int) -> str:
    return '{"type":"ack","id":%d}' % eid


async def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Drop the connection now, without the close handshake (a dead peer never answers)."""
    resp = getattr(ws, "_response", None)
    try:
        if resp is not None:
            resp.close()
        else:  # pragma: no cover - aiohttp internals changed
            await ws.close()
    except Exception:  # noqa: BLE001 - already gone
        pass


class _aclosing:
    def __init__(self, gen: AsyncIterator[Any]):
        self.gen = gen

    async def __aenter__(self) -> AsyncIterator[Any]:
        return self.gen

    async def __aexit__(self, *exc: Any) -> None:
        await self.gen.aclose()  # type: ignore[attr-defined]
