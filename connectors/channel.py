"""``/channel``: Tap's WebSocket delivery (spec/tap-behavior.md §6.4-6.6, tap-client.md §1.10).

Wire: one text frame per event, the event's JSON exactly as stored in the outbox. Nothing
else is ever sent by the server (no hello, no pings, and no close frame: on shutdown the TCP
connection is aborted, because the official client never reconnects after a close frame).
Client pings are answered. Client frames are acks ``{"type":"ack","id":N}``, parsed like Go's
``ReadJSON`` into ``{type string, id uint}``: anything that does not fit (non-JSON, empty,
string or negative id) drops the connection; an unknown ``type`` is ignored; acks are
connection-independent, and duplicate or unknown ids are harmless.

Modes:

- **ack** (default): an event is taken when a client acks it. Unacked events are sent again
  every ``TAP_RETRY_TIMEOUT`` until acked; events in flight on a connection that drops go
  back to the head of the queue at once (allowed by at-least-once, tap-client.md §1.10.8).
- **fire-and-forget** (``TAP_DISABLE_ACKS``): taken once written to a socket. A write that
  fails puts the events back in the queue for the next client (Tap leaves the repo blocked
  until restart, §15.6).

All clients pull from one shared queue, so each event goes to exactly one client; per-repo
order is kept before the queue by ``connectors.scheduler``. In ack mode a connection holds at
most ``WINDOW`` unacked events, so a client that stalls cannot soak up the whole queue. A writer sends what is queued in
one socket write (frames coalesced), which is most of the cost of delivery.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque

import orjson
from aiohttp import EofStream, WebSocketError, WSMsgType, web

from config import Config
from connectors.scheduler import Scheduler
from connectors.targets import TakenCallback, metrics, taken_many
from store.layout import FLAG_INTERNAL
from store.outbox import OutboxEvent

log = logging.getLogger(__name__)

_H2 = struct.Struct("!BBH")
_H_CODE = struct.Struct("!H")
_H3 = struct.Struct("!BBQ")
_U64_LIMIT = 1 << 64
WRITE_BATCH = 512  # events per socket write at most
WINDOW = 10_000  # ack mode: unacked events one connection may hold (a stalled client holds no more)
WRITE_HIGH_WATER = 1 << 20  # bytes buffered in the transport before a writer waits


class BadFrame(ValueError):
    """A client frame Go Tap would fail to read: the connection is dropped."""


def _field(obj: dict, name: str):
    """Go's encoding/json field match: exact key first, else case-insensitive."""
    if name in obj:
        return obj[name]
    for k, v in obj.items():
        if k.lower() == name:
            return v
    return None


_ACK_PREFIX = b'{"type":"ack","id":'


def parse_client_frame(data: str | bytes) -> int | None:
    """The acked id of a client frame, ``None`` if it is not an ack; ``BadFrame`` to drop."""
    if type(data) is bytes and data.startswith(_ACK_PREFIX) and data[-1:] == b"}":
        digits = data[19:-1]  # the official client's exact frame: skip the JSON parser
        if digits.isdigit() and len(digits) < 20 and (digits[:1] != b"0" or len(digits) == 1):
            return int(digits)
    if not data:
        raise BadFrame("empty frame")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadFrame(f"not JSON: {e}") from None
    if obj is None:
        return None  # Go: null decodes into the zero value
    if type(obj) is not dict:
        raise BadFrame("not a JSON object")
    typ = _field(obj, "type")
    if typ is not None and type(typ) is not str:
        raise BadFrame("type is not a string")
    ev_id = _field(obj, "id")
    if ev_id is not None and (type(ev_id) is not int or not 0 <= ev_id < _U64_LIMIT):
        raise BadFrame("id is not an unsigned integer")
    if typ != "ack":
        return None
    return ev_id or 0


def _control_frame(opcode_byte: int, payload: bytes) -> bytes:
    return bytes((opcode_byte, len(payload))) + payload  # control payloads are < 126 bytes


def text_frame_header(n: int) -> bytes:
    """Header of an unmasked, final, uncompressed text frame of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return _H2.pack(0x81, 126, n)
    return _H3.pack(0x81, 127, n)


class _Flight:
    """An event released to the channel, until a client takes it."""

    __slots__ = ("ev", "conn", "sent_at", "queued")

    def __init__(self, ev: OutboxEvent) -> None:
        self.ev = ev
        self.conn: _Conn | None = None  # where it was last written (ack mode)
        self.sent_at = 0.0
        self.queued = False  # in the shared ready queue


class _Conn:
    __slots__ = ("ws", "transport", "protocol", "unacked", "closed", "peer", "window_open")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.transport = request.transport
        self.protocol = request.protocol
        self.unacked = 0  # events written here and not yet acked (ack mode; ``f.conn is self``)
        self.closed = False
        self.peer = request.remote
        self.window_open = asyncio.Event()
        self.window_open.set()


class ChannelTarget:
    """The ``/channel`` delivery target; ``handle`` is the aiohttp route handler."""

    name = "channel"

    def __init__(self, cfg: Config, on_taken: TakenCallback, *, write_batch: int = WRITE_BATCH,
                 window: int = WINDOW) -> None:
        self._ack_mode = not cfg.disable_acks
        self._window = window
        self._retry_timeout = cfg.retry_timeout
        self._on_taken = on_taken
        self._on_taken_many = taken_many(on_taken)
        self._write_batch = write_batch
        self._sched = Scheduler(self._release, self._release_many)
        self._flights: dict[int, _Flight] = {}  # offered, not yet taken: id -> flight
        self._ready: deque[_Flight] = deque()  # may be written to any client now
        self._sent: dict[int, _Flight] = {}  # ack mode: written, unacked; oldest send first
        self._conns: set[_Conn] = set()
        self._have_ready = asyncio.Event()
        self._sweeper: asyncio.Task | None = None
        self._stopped = False

    # --- DeliveryTarget ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._ack_mode:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="channel-retry")

    def offer(self, ev: OutboxEvent) -> None:
        if ev.internal:  # not for clients (Kafka tombstones): nothing to send
            self._on_taken(ev.key)
            return
        self._flights[ev.id] = _Flight(ev)
        self._sched.add(ev)

    def offer_many(self, events: list[OutboxEvent]) -> None:
        """``offer`` for a run of events read together (the follower's per-shard runs)."""
        flights = self._flights
        out: list[OutboxEvent] = []
        internal: list[bytes] = []
        for ev in events:
            if ev.flags & FLAG_INTERNAL:
                internal.append(ev.key)
            else:
                flights[ev.id] = _Flight(ev)
                out.append(ev)
        if internal:
            self._on_taken_many(internal)
        if out:
            self._sched.add_many(out)

    async def stop(self) -> None:
        self._stopped = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.abort_all()

    def abort_all(self) -> None:
        """Drop every client's TCP connection, without a close frame (clients reconnect)."""
        for conn in list(self._conns):
            conn.closed = True
            conn.window_open.set()
            if conn.transport is not None:
                conn.transport.abort()
        self._have_ready.set()

    # --- numbers ---------------------------------------------------------------------------------

    @property
    def clients(self) -> int:
        return len(self._conns)

    @property
    def unacked(self) -> int:
        return len(self._sent)

    @property
    def queued(self) -> int:
        return len(self._ready)

    # --- the queue ----------------------------------------------------------------------------

    def _release(self, ev: OutboxEvent) -> None:
        """The scheduler allows ``ev`` out."""
        self._enqueue(self._flights[ev.id])

    def _release_many(self, events: list[OutboxEvent]) -> None:
        """The scheduler allows ``events`` out, in this order."""
        flights = self._flights
        ready = self._ready
        for ev in events:
            f = flights[ev.id]
            if not f.queued:
                f.queued = True
                ready.append(f)
        self._have_ready.set()

    def _enqueue(self, f: _Flight, front: bool = False) -> None:
        if f.queued:
            return
        f.queued = True
        if front:
            self._ready.appendleft(f)
        else:
            self._ready.append(f)
        self._have_ready.set()

    def _take(self, f: _Flight) -> None:
        del self._flights[f.ev.id]
        self._sched.taken(f.ev)
        self._on_taken(f.ev.key)

    def _take_many(self, batch: list[_Flight]) -> None:
        flights = self._flights
        sched_taken = self._sched.taken
        keys: list[bytes] = []
        for f in batch:
            ev = f.ev
            del flights[ev.id]
            sched_taken(ev)
            keys.append(ev.key)
        self._on_taken_many(keys)

    def ack(self, event_id: int) -> None:
        """A client acked ``event_id`` (on any connection)."""
        f = self._flights.get(event_id)
        if f is None:
            return  # unknown, or already taken: harmless
        conn = f.conn
        if conn is not None:
            conn.unacked -= 1
            if not conn.window_open.is_set() and conn.unacked < self._window:
                conn.window_open.set()
        self._sent.pop(event_id, None)
        self._take(f)

    def ack_many(self, event_ids: list[int]) -> None:
        """``ack`` for each of ``event_ids`` (the acks one socket read brought, in order)."""
        flights = self._flights
        sent_pop = self._sent.pop
        evs: list[OutboxEvent] = []
        keys: list[bytes] = []
        conns: list[_Conn] = []
        last: _Conn | None = None
        n = 0  # acks of ``last`` not yet subtracted from its unacked count
        for i in event_ids:
            f = flights.pop(i, None)
            if f is None:
                continue  # unknown, or already taken: harmless
            conn = f.conn
            if conn is not None:
                sent_pop(i, None)
                if conn is not last:
                    if last is not None:
                        last.unacked -= n
                    conns.append(conn)
                    last = conn
                    n = 0
                n += 1
            ev = f.ev
            evs.append(ev)
            keys.append(ev.key)
        if last is not None:
            last.unacked -= n
        for conn in conns:
            if not conn.window_open.is_set() and conn.unacked < self._window:
                conn.window_open.set()
        if evs:
            self._sched.taken_many(evs)
            self._on_taken_many(keys)

    # --- retries (ack mode) ------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        tick = min(max(self._retry_timeout / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(tick)
            self.resend_timed_out(time.monotonic())

    def resend_timed_out(self, now: float) -> int:
        """Queue again every event written at least ``retry_timeout`` ago and not acked."""
        due: list[_Flight] = []
        for f in self._sent.values():
            if now - f.sent_at < self._retry_timeout:
                break  # ordered by last send: the rest is younger
            due.append(f)
        for f in due:
            del self._sent[f.ev.id]
            if f.conn is not None:
                f.conn.unacked -= 1
                f.conn.window_open.set()
                f.conn = None
            self._enqueue(f)
        if due:
            log.info("resending unacked events", extra={"count": len(due), "retry_timeout_s": self._retry_timeout})
        return len(due)

    def _requeue_connection(self, conn: _Conn) -> None:
        """A connection dropped: its unacked events go to the head of the queue, in id order."""
        conn.window_open.set()
        back = [f for f in self._sent.values() if f.conn is conn]
        for f in back:
            f.conn = None
            del self._sent[f.ev.id]
        conn.unacked = 0
        back.sort(key=lambda f: f.ev.id, reverse=True)
        for f in back:
            self._enqueue(f, front=True)

    # --- connections -------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False, compress=False, decode_text=False)
        if not ws.can_prepare(request).ok:
            # Not an upgrade: plain-text 400 like gorilla/websocket.
            return web.Response(status=400, text="Bad Request\n", headers={"Sec-WebSocket-Version": "13"})
        await ws.prepare(request)
        conn = _Conn(ws, request)
        self._conns.add(conn)
        metrics().channel_clients.inc()
        log.info("websocket connected", extra={"peer": conn.peer, "clients": len(self._conns)})
        writer = asyncio.create_task(self._write_loop(conn), name="channel-writer")
        reason = "stopped"
        try:
            reason = await self._read_loop(conn, ws)
        finally:
            conn.closed = True
            writer.cancel()
            self._conns.discard(conn)
            metrics().channel_clients.dec()
            if self._ack_mode:
                self._requeue_connection(conn)
            if conn.transport is not None:
                conn.transport.abort()  # never a close frame from us
            log.info("websocket disconnected", extra={"peer": conn.peer, "reason": reason, "clients": len(self._conns)})
        return ws

    async def _read_loop(self, conn: _Conn, ws: web.WebSocketResponse) -> str:
        """Read client frames until the connection must go; returns why.

        Reads aiohttp's frame queue directly rather than ``ws.receive()``, which answers
        protocol errors with a close frame (the official client never reconnects after one;
        Go Tap just drops the connection) and costs more per ack.
        """
        reader = ws._reader
        assert reader is not None
        write = conn.transport.write if conn.transport is not None else None
        ack_many = self.ack_many if self._ack_mode else None
        # Acks already parsed by aiohttp (queued in the reader) are applied together: one
        # ``ack_many`` per socket read instead of the whole ack path per frame.
        buffered = getattr(reader, "_buffer", None)
        acks: list[int] = []
        text, binary = WSMsgType.TEXT, WSMsgType.BINARY
        try:
            while not conn.closed:
                if acks and not buffered:
                    ack_many(acks)  # type: ignore[misc]
                    acks = []
                try:
                    msg = await reader.read()
                except EofStream:
                    return "closed by client"
                except WebSocketError as e:
                    return f"protocol error: {e}"
                except Exception as e:  # connection reset and the like
                    return f"read error: {e!r}"
                t = msg.type
                if t is text or t is binary:
                    data = msg.data
                    # the official client's exact ack frame, as in ``parse_client_frame``
                    if data[:19] == _ACK_PREFIX and data[-1:] == b"}":  # (a str never equals it)
                        digits = data[19:-1]
                        if digits.isdigit() and len(digits) < 20 and (digits[:1] != b"0" or len(digits) == 1):
                            if ack_many is not None:
                                acks.append(int(digits))
                            continue
                    try:
                        ack_id = parse_client_frame(data)
                    except BadFrame as e:
                        return f"bad client frame: {e}"
                    if ack_id is not None and ack_many is not None:
                        acks.append(ack_id)
                    continue
                if acks:
                    ack_many(acks)  # type: ignore[misc]
                    acks = []
                if t is WSMsgType.PING:
                    if write is not None and not conn.transport.is_closing():
                        write(_control_frame(0x8A, msg.data))  # pong, same payload
                elif t is WSMsgType.CLOSE:
                    if write is not None and not conn.transport.is_closing():
                        # echo the client's close (its own close handshake, as gorilla does)
                        code = msg.data if isinstance(msg.data, int) and msg.data not in (1005, 1006) else 0
                        write(_control_frame(0x88, _H_CODE.pack(code) if code else b""))
                    return "closed by client"
                elif t is WSMsgType.PONG:
                    continue
                else:  # CLOSING, CLOSED, ERROR
                    return f"closed ({t.name})"
            return "closed"
        finally:
            if acks:  # acks read before the connection went still count
                ack_many(acks)  # type: ignore[misc]

    async def _write_loop(self, conn: _Conn) -> None:
        ready = self._ready
        transport = conn.transport
        ack_mode = self._ack_mode
        flights = self._flights
        sent = self._sent
        delivered = metrics().events_delivered
        h2_pack = _H2.pack
        window = self._window if ack_mode else 1 << 62
        try:
            while not conn.closed:
                if not ready:
                    self._have_ready.clear()
                    await self._have_ready.wait()
                    continue
                room = min(self._write_batch, window - conn.unacked)
                if room <= 0:  # this client holds a full window of unacked events: others go first
                    conn.window_open.clear()
                    await conn.window_open.wait()
                    continue
                batch: list[_Flight] = []
                parts: list[bytes] = []
                while ready and len(batch) < room:
                    f = ready.popleft()
                    f.queued = False
                    if flights.get(f.ev.id) is not f:
                        continue  # taken while it waited
                    if ack_mode and f.conn is not None:
                        continue  # already written (a stale retry entry)
                    p = f.ev.payload
                    n = len(p)  # (most events: text_frame_header's middle case, inlined)
                    parts.append(h2_pack(0x81, 126, n) if 126 <= n < 65536 else text_frame_header(n))
                    parts.append(p)
                    batch.append(f)
                if not batch:
                    continue
                if conn.closed or transport is None or transport.is_closing():
                    for f in reversed(batch):  # nothing written: to the head again
                        self._enqueue(f, front=True)
                    return
                transport.write(b"".join(parts))
                delivered.inc(len(batch))
                if ack_mode:
                    now = time.monotonic()
                    conn.unacked += len(batch)
                    for f in batch:
                        i = f.ev.id
                        f.conn = conn
                        if f.sent_at:  # a resend: to the end of the send order
                            sent.pop(i, None)
                        f.sent_at = now
                        sent[i] = f
                else:
                    self._take_many(batch)
                if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    await self._drain(conn)
                elif ready:
                    await asyncio.sleep(0)  # let acks and other sockets in between batches
        except (asyncio.CancelledError, ConnectionError):
            pass  # stopped, or the connection went while we waited for it to drain
        except Exception:
            log.exception("websocket writer failed", extra={"peer": conn.peer})
            conn.closed = True
            if transport is not None:
                transport.abort()

    async def _drain(self, conn: _Conn) -> None:
        """Wait until the transport's buffer drained below its low-water mark."""
        proto = conn.protocol
        drain = getattr(proto, "_drain_helper", None)
        if drain is not None and getattr(proto, "_paused", False):
            await drain()
            return
        while not conn.closed and conn.transport is not None and conn.transport.get_write_buffer_size() > WRITE_HIGH_WATER // 4:
            await asyncio.sleep(0.005)
