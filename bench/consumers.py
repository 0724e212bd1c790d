"""Cheap event consumers for the end-to-end benchmarks: each runs as a process of its own.

    python -m bench.consumers channel --url ws://127.0.0.1:2480/channel --status-every 0.2
    python -m bench.consumers webhook --port 8099
    python -m bench.consumers kafka --bootstrap 127.0.0.1:19092 --topic tap.events

They must cost the machine as little as possible (the service shares two cores with them),
so none uses a general-purpose library on the hot path:

- ``channel``: a WebSocket client on a bare ``asyncio.Protocol``. It parses server frames
  from the receive buffer, acks every event at once (``{"type":"ack","id":N}``, the official
  client's exact frame) and writes all the acks of one read in a single socket write. It
  finds the id, type and ``live`` flag by byte search; only live events are parsed (orjson)
  for their DID and rev (latency join).
- ``webhook``: an HTTP/1.1 keep-alive server on a bare ``asyncio.Protocol``; every request
  gets ``200`` with an empty body at once.
- ``kafka``: a confluent-kafka consumer with manual partition assignment (no group join),
  reading ``<prefix>events`` from the beginning.

Every consumer prints a status line (JSON) to stdout every ``--status-every`` seconds:
``{"t": monotonic, "records": n, "identity": n, "live": n, "events": n}``, and on SIGTERM or
when stdin closes writes ``--out`` (JSON): counts, first/last receive times, and for live
events ``[did, rev, t_receive]`` (``time.monotonic()`` is system-wide on Linux, so it compares
with the upstream's send times taken in another process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import time
from urllib.parse import urlsplit

import orjson

_LIVE = b'"live":true'
_REC = b'"type":"record"'
_IDENT = b'"type":"identity"'


class Counts:
    __slots__ = ("events", "records", "identity", "live", "t_first", "t_last", "live_events", "keep_live",
                 "bytes")

    def __init__(self, keep_live: bool) -> None:
        self.events = self.records = self.identity = self.live = self.bytes = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.live_events: list = []
        self.keep_live = keep_live

    def event(self, payload: bytes, now: float) -> None:
        """Count one event JSON (``{"id":N,"type":...}``)."""
        self.events += 1
        self.bytes += len(payload)
        if _REC in payload[:48]:
            self.records += 1
            if _LIVE in payload[:96]:
                self.live += 1
                if self.keep_live:
                    r = orjson.loads(payload)["record"]
                    self.live_events.append((r["did"], r["rev"], now))
        elif _IDENT in payload[:48]:
            self.identity += 1
        if not self.t_first:
            self.t_first = now
        self.t_last = now

    def status(self) -> dict:
        return {"t": time.monotonic(), "events": self.events, "records": self.records, "identity": self.identity,
                "live": self.live, "t_first": self.t_first, "t_last": self.t_last}

    def result(self) -> dict:
        return {**self.status(), "bytes": self.bytes, "live_events": self.live_events}


# ----------------------------------------------------------------------------- /channel


class ChannelProtocol(asyncio.Protocol):
    """A WebSocket client that acks every event it receives (ack mode) or only counts."""

    def __init__(self, host: str, path: str, counts: Counts, ack: bool, password: str = "") -> None:
        self.host = host
        self.path = path
        self.counts = counts
        self.ack = ack
        self.password = password
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.closed = asyncio.get_event_loop().create_future()
        self.acks_sent = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        auth = ""
        if self.password:
            auth = "Authorization: Basic " + base64.b64encode(f"admin:{self.password}".encode()).decode() + "\r\n"
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"{auth}\r\n").encode())

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                print(f"channel: upgrade refused: {head[:200]!r}", file=sys.stderr)
                self.transport.close()
                return
            del buf[:end + 4]
            self.upgraded = True
        now = time.monotonic()
        counts = self.counts
        acks: list[bytes] = []
        i = 0
        n = len(buf)
        while n - i >= 2:
            b0 = buf[i]
            ln = buf[i + 1] & 0x7F
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = int.from_bytes(buf[i + 2:i + 4], "big")
                h = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2:i + 10], "big")
                h = 10
            if n - i < h + ln:
                break
            op = b0 & 0x0F
            payload = bytes(buf[i + h:i + h + ln])
            i += h + ln
            if op == 1 or op == 2:
                counts.event(payload, now)
                if self.ack:
                    eid = payload[6:payload.index(b",", 6)]
                    body = b'{"type":"ack","id":' + eid + b"}"
                    # masked client frame; a zero mask key leaves the payload as it is
                    acks.append(bytes((0x81, 0x80 | len(body))) + b"\0\0\0\0" + body)
            elif op == 9:  # ping -> pong
                acks.append(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif op == 8:
                self.transport.close()
        del buf[:i]
        if acks:
            self.acks_sent += len(acks)
            self.transport.write(b"".join(acks))


async def run_channel(args, counts: Counts, stop: asyncio.Event) -> None:
    u = urlsplit(args.url)
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            _, proto = await loop.create_connection(
                lambda: ChannelProtocol(u.netloc, u.path or "/channel", counts, not args.no_ack, args.password),
                u.hostname, u.port or 80)
        except OSError as e:
            print(f"channel: connect failed: {e}", file=sys.stderr)
            await asyncio.sleep(0.2)
            continue
        done = asyncio.ensure_future(stop.wait())
        await asyncio.wait({done, proto.closed}, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        if proto.transport is not None:
            proto.transport.abort()
        if not stop.is_set():
            print("channel: connection lost; reconnecting", file=sys.stderr)
            await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- webhook

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"


class WebhookProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server: each request (Content-Length bodies) answered 200 at once."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        now = time.monotonic()
        out = 0
        i = 0
        while True:
            end = buf.find(b"\r\n\r\n", i)
            if end < 0:
                break
            head = bytes(buf[i:end]).lower()
            k = head.find(b"content-length:")
            ln = 0
            if k >= 0:
                e = head.find(b"\r\n", k)
                ln = int(head[k + 15:e if e >= 0 else len(head)])
            if len(buf) < end + 4 + ln:
                break
            self.counts.event(bytes(buf[end + 4:end + 4 + ln]), now)
            i = end + 4 + ln
            out += 1
        del buf[:i]
        if out:
            self.transport.write(_OK * out)


async def run_webhook(args, counts: Counts, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: WebhookProtocol(counts), "127.0.0.1", args.port, backlog=1024)
    print(json.dumps({"listening": args.port}), flush=True)
    await stop.wait()
    server.close()


# ----------------------------------------------------------------------------- kafka


async def run_kafka(args, counts: Counts, stop: asyncio.Event) -> None:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"bench-{os.getpid()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10, "api.version.request": True,
                  "fetch.min.bytes": 1, "queued.min.messages": 100000})
    loop = asyncio.get_running_loop()
    # the topic exists once the service has started (it creates it); wait for it
    parts: list = []
    while not stop.is_set() and not parts:
        md = await loop.run_in_executor(None, lambda: c.list_topics(args.topic, timeout=5))
        t = md.topics.get(args.topic)
        if t is not None and t.error is None and t.partitions:
            parts = [TopicPartition(args.topic, p, 0) for p in sorted(t.partitions)]
        else:
            await asyncio.sleep(0.2)
    c.assign(parts)

    def poll_some() -> int:
        msgs = c.consume(num_messages=10000, timeout=0.05)
        now = time.monotonic()
        n = 0
        for m in msgs:
            if m.error() is None:
                counts.event(m.value(), now)
                n += 1
        return n

    while not stop.is_set():
        await loop.run_in_executor(None, poll_some)
    c.close()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.consumers")
    ap.add_argument("kind", choices=("channel", "webhook", "kafka"))
    ap.add_argument("--url", default="ws://127.0.0.1:2480/channel")
    ap.add_argument("--password", default="")
    ap.add_argument("--no-ack", action="store_true", help="channel: do not ack (fire-and-forget mode)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bootstrap", default="")
    ap.add_argument("--topic", default="tap.events")
    ap.add_argument("--status-every", type=float, default=0.2)
    ap.add_argument("--keep-live", action="store_true", help="keep (did, rev, t) of every live event")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    counts = Counts(args.keep_live)

    async def amain() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.buffer.read1(65536) or stop.set()))

        async def status() -> None:
            while not stop.is_set():
                print(json.dumps(counts.status()), flush=True)
                await asyncio.sleep(args.status_every)

        st = asyncio.ensure_future(status())
        runner = {"channel": run_channel, "webhook": run_webhook, "kafka": run_kafka}[args.kind]
        await runner(args, counts, stop)
        st.cancel()
        print(json.dumps(counts.status()), flush=True)

    asyncio.run(amain())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(counts.result(), f)


if __name__ == "__main__":
    main()
