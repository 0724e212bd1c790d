"""Delivery targets and ack tracking: how an outbox event leaves tapflow.

A *target* is one way events leave the delivery process: the ``/channel`` WebSocket
(``connectors.channel``), the webhook (``connectors.webhook``) or Kafka (``connectors.kafka``).
The outbox follower reads each shard of the outbox in id order and offers every event to
every configured target. A target calls its ``on_taken(key)`` callback once it has durably
taken the event (client ack, 2xx, broker ack, or write success in fire-and-forget mode).
When *every* target took an event, the ``AckTracker`` hands its key to the follower, which
writes it with the others of the same flush as one ack batch (``connectors.acks``) into the
delivery database's ``acks`` column family; the flow then deletes the outbox row.

Writing a target::

    class MyTarget:
        name = "mine"

        def __init__(self, cfg: Config, on_taken: TakenCallback) -> None:
            self._on_taken = on_taken

        async def start(self) -> None: ...          # connect, spawn tasks
        def offer(self, ev: OutboxEvent) -> None:    # never blocks; queue it
            ...
            self._on_taken(ev.key)                   # later, once durably taken
        async def stop(self) -> None: ...            # stop tasks; no need to flush

Contract:

- ``offer`` is called on the event loop thread for every outbox event (internal rows
  included, see ``OutboxEvent.internal``), per shard in id order, exactly once per process
  lifetime; after a restart, every event not yet acked is offered again. It must not block
  or await: queue the event and return.
- A target may also have ``offer_many(events)``: the follower then hands it the events of
  one read round in one call (each shard's in id order, so each DID's too; same contract as
  ``offer`` per event).
  ``taken_many(on_taken)`` is the matching batch form of ``on_taken`` (from the loop thread).
- ``on_taken(key)`` may be called from any thread (a Kafka delivery-report thread, say); it
  is cheapest from the event loop thread. Calling it twice, or for a key never offered,
  is harmless.
- Targets that must keep Tap's per-repo ordering (channel, webhook) use
  ``connectors.scheduler.Scheduler``; Kafka keeps per-repo order by keying on the DID.
- A target never holds an event forever without taking it: the follower stops reading
  once ``cfg.outbox_capacity`` events are offered and not yet taken by every target.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Callable, Protocol, runtime_checkable

from store.outbox import OutboxEvent

log = logging.getLogger(__name__)

TakenCallback = Callable[[bytes], None]


def taken_many(on_taken: TakenCallback) -> Callable[[list[bytes]], None]:
    """The batch form of ``on_taken`` (``AckTracker`` provides one; else one call per key)."""
    many = getattr(on_taken, "many", None)
    if many is not None:
        return many

    def each(keys: list[bytes]) -> None:
        for k in keys:
            on_taken(k)

    return each


@runtime_checkable
class DeliveryTarget(Protocol):
    """One way events leave: /channel, webhook or Kafka (see the module docstring)."""

    name: str

    async def start(self) -> None:
        """Start background work (connections, tasks). Called once, before any ``offer``."""

    def offer(self, ev: OutboxEvent) -> None:
        """Take responsibility for ``ev``; call ``on_taken(ev.key)`` once durably taken. Must not block."""

    async def stop(self) -> None:
        """Stop background work. Events not yet taken are simply redelivered after a restart."""


class AckTracker:
    """Which targets took which in-flight event; completes an event when all of them did.

    ``register`` an event before offering it to the targets; each target gets its own
    ``callback(i)``. Completed keys are handed to ``on_complete`` (the follower batches
    them into ack batches in the ``acks`` column family). ``in_flight`` is what the capacity bound counts.
    """

    def __init__(self, n_targets: int, on_complete: Callable[[bytes], None],
                 on_complete_many: Callable[[list[bytes]], None] | None = None) -> None:
        if not 1 <= n_targets <= 30:
            raise ValueError("between 1 and 30 delivery targets")
        self._all = (1 << n_targets) - 1
        self._pending: dict[bytes, int] = {}  # key -> bitmask of targets that still have to take it
        self._on_complete = on_complete
        self._on_complete_many = on_complete_many
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._foreign: collections.deque[tuple[int, bytes]] = collections.deque()
        self._foreign_scheduled = False
        self._foreign_lock = threading.Lock()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop whose thread owns this tracker; calls from other threads hop onto it."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def __contains__(self, key: bytes) -> bool:
        return key in self._pending

    def register(self, key: bytes) -> None:
        self._pending[key] = self._all

    def register_many(self, keys: list[bytes]) -> None:
        """``register`` each of ``keys`` (a run of rows read together)."""
        self._pending.update(dict.fromkeys(keys, self._all))

    def callback(self, index: int) -> TakenCallback:
        """The ``on_taken`` of target number ``index``; its attribute ``many`` takes a list of
        keys at once (what a target that learns of many takes together should call)."""
        bit = 1 << index

        def on_taken(key: bytes) -> None:
            if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
                self._taken_elsewhere(bit, key)
            else:
                self._taken(bit, key)

        def on_taken_many(keys: list[bytes]) -> None:
            if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
                for key in keys:
                    self._taken_elsewhere(bit, key)
            else:
                self._taken_many(bit, keys)

        on_taken.many = on_taken_many  # type: ignore[attr-defined]
        return on_taken

    def _taken(self, bit: int, key: bytes) -> None:
        left = self._pending.get(key)
        if left is None or not left & bit:
            return  # duplicate, or never offered: harmless
        left &= ~bit
        if left:
            self._pending[key] = left
        else:
            del self._pending[key]
            self._on_complete(key)

    def _taken_many(self, bit: int, keys: list[bytes]) -> None:
        pending = self._pending
        done: list[bytes] = []
        for key in keys:
            left = pending.get(key)
            if left is None or not left & bit:
                continue  # duplicate, or never offered: harmless
            left &= ~bit
            if left:
                pending[key] = left
            else:
                del pending[key]
                done.append(key)
        if not done:
            return
        if self._on_complete_many is not None:
            self._on_complete_many(done)
        else:
            for key in done:
                self._on_complete(key)

    def _taken_elsewhere(self, bit: int, key: bytes) -> None:
        with self._foreign_lock:
            self._foreign.append((bit, key))
            if self._foreign_scheduled:
                return
            self._foreign_scheduled = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._drain_foreign)

    def _drain_foreign(self) -> None:
        with self._foreign_lock:
            items = list(self._foreign)
            self._foreign.clear()
            self._foreign_scheduled = False
        for bit, key in items:
            self._taken(bit, key)


class DeliveryMetrics:
    """Prometheus series of the delivery process (spec §12 names), created on first use.

    In the service, ``PROMETHEUS_MULTIPROC_DIR`` is inherited from the flow process, which
    serves the sum of both processes on ``TAP_METRICS_LISTEN``.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.events_delivered = Counter("tap_events_delivered", "Events sent to a consumer (retries included)")
        self.events_acked = Counter("tap_events_acked", "Events taken by every delivery target")
        self.webhook_requests = Counter("tap_webhook_requests", "Webhook POSTs by outcome", ["status"])
        self.event_cache_size = Gauge("tap_event_cache_size", "Outbox events held by the delivery process",
                                      multiprocess_mode="livesum")
        self.outbox_depth = Gauge("tapflow_outbox_depth", "Outbox rows not yet acked and deleted",
                                  multiprocess_mode="livemax")
        self.channel_clients = Gauge("tapflow_channel_clients", "Connected /channel clients", multiprocess_mode="livesum")


_metrics: DeliveryMetrics | None = None


def metrics() -> DeliveryMetrics:
    global _metrics
    if _metrics is None:
        _metrics = DeliveryMetrics()
    return _metrics
