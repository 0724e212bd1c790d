"""Per-repo delivery ordering: Tap's rules (spec/tap-behavior.md §6.3) as one small scheduler.

The rules, for the events of one DID in id order:

1. A **historical** event (backfill record, any identity event) may be sent once every earlier
   **live** event of the DID has been taken. Historical events overlap freely.
2. A **live** event (firehose record) may be sent only when every earlier event of the DID
   has been taken, and while it is in flight nothing else of the DID is sent (a barrier).
3. Dispatch is FIFO per DID: nothing overtakes an earlier event of the same DID, so a
   historical event queued behind a waiting live event waits too.
4. DIDs are independent of each other.

Each DID is in one of four named states:

``IDLE``        nothing queued, nothing in flight. Not stored at all: a DID that goes idle is
                forgotten, so memory follows the DIDs with work, not every DID ever seen
                (Tap keeps a worker per DID forever, §15.16).
``HISTORICAL``  historical events in flight; further historical events go out at once.
``DRAINING``    a live event is at the head of the queue, waiting for the historical events
                in flight to be taken (rule 2); everything behind it waits (rule 3).
``LIVE``        one live event in flight, alone (rule 2).

Transitions happen in exactly two places: ``add`` (an event arrives) and ``taken`` (an event
in flight was acked); both end by ``_pump``, which sends from the head of the DID's queue for
as long as the rules allow. That one loop is what replaces the fast path / slow path / worker
goroutine of Go's ``outbox.go`` and the two stalls fixed there (spec §14 tests 12 and 13).

Example, README's ``H1 H2 L1 H3 H4 L2 H5``: H1, H2 go (HISTORICAL); L1 waits (DRAINING);
H1, H2 taken -> L1 goes (LIVE); L1 taken -> H3, H4 go (HISTORICAL), L2 waits (DRAINING); H3, H4
taken -> L2 goes (LIVE); L2 taken -> H5 goes (HISTORICAL); H5 taken -> IDLE (forgotten).

The scheduler does no I/O and knows no clock: retries of events already in flight bypass it
(the event is already allowed out), exactly as in Tap.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Callable, Iterable, Iterator

from store.layout import FLAG_LIVE
from store.outbox import OutboxEvent


class DidState(enum.Enum):
    IDLE = "idle"
    HISTORICAL = "historical"
    DRAINING = "draining"
    LIVE = "live"


class _Did:
    """The work of one non-idle DID: its FIFO of waiting events and the keys in flight."""

    __slots__ = ("state", "queue", "in_flight")

    def __init__(self) -> None:
        self.state = DidState.IDLE
        self.queue: deque[OutboxEvent] = deque()
        self.in_flight: set[bytes] = set()


def _may_send(d: _Did, ev: OutboxEvent) -> bool:
    """Rules 1 and 2 for the event at the head of the DID's queue."""
    if d.state is DidState.IDLE:
        return True  # nothing in flight: anything may go
    if ev.flags & FLAG_LIVE:
        return False  # a live event waits for everything before it
    return d.state is DidState.HISTORICAL  # historical overlaps historical, never a live event


class Scheduler:
    """Releases events to ``send`` in the order Tap's per-repo rules allow.

    ``add(ev)`` every event of the target, per DID in id order; call ``taken(ev)`` once the
    target's consumer took an event that was sent (or that is still waiting: it is dropped).
    ``send`` is called synchronously from ``add``/``taken``, after the state change, and must
    not block.
    """

    def __init__(self, send: Callable[[OutboxEvent], None],
                 send_many: Callable[[list[OutboxEvent]], None] | None = None) -> None:
        self._send = send
        # ``add_many`` hands what it released to ``send_many`` at once, in release order
        self._send_many = send_many if send_many is not None else self._send_each
        self._dids: dict[str, _Did] = {}

    # --- the two transitions ------------------------------------------------------------

    def add(self, ev: OutboxEvent) -> None:
        """A new event of ``ev.did`` (ids of one DID must arrive in increasing order)."""
        out: list[OutboxEvent] = []
        self._add(ev, out)
        for e in out:
            self._send(e)

    def add_many(self, events: Iterable[OutboxEvent]) -> None:
        """``add`` each of ``events`` in order; what they release goes to ``send_many`` once,
        in the order ``add`` would have sent it (a backfill run costs one call, not one per event)."""
        out: list[OutboxEvent] = []
        dids = self._dids
        historical = DidState.HISTORICAL
        for ev in events:
            d = dids.get(ev.did)
            if d is None:  # IDLE: anything may go, and nothing waits behind it yet
                d = dids[ev.did] = _Did()
                d.in_flight.add(ev.key)
                d.state = DidState.LIVE if ev.flags & FLAG_LIVE else historical
                out.append(ev)
            elif d.state is historical and not ev.flags & FLAG_LIVE and not d.queue:  # rule 1
                d.in_flight.add(ev.key)
                out.append(ev)
            else:
                d.queue.append(ev)
                self._pump(ev.did, d, out)
        if out:
            self._send_many(out)

    def _send_each(self, evs: list[OutboxEvent]) -> None:
        for ev in evs:
            self._send(ev)

    def _add(self, ev: OutboxEvent, out: list[OutboxEvent]) -> None:
        d = self._dids.get(ev.did)
        if d is None:  # IDLE: anything may go, and nothing waits behind it yet
            d = self._dids[ev.did] = _Did()
            d.in_flight.add(ev.key)
            d.state = DidState.LIVE if ev.flags & FLAG_LIVE else DidState.HISTORICAL
            out.append(ev)
            return
        if d.state is DidState.HISTORICAL and not ev.flags & FLAG_LIVE and not d.queue:  # rule 1, nothing ahead
            d.in_flight.add(ev.key)
            out.append(ev)
            return
        d.queue.append(ev)
        self._pump(ev.did, d, out)

    def taken(self, ev: OutboxEvent) -> bool:
        """``ev`` was taken by the consumer. False if it was neither in flight nor waiting."""
        d = self._dids.get(ev.did)
        if d is None:
            return False
        if ev.key in d.in_flight:
            d.in_flight.discard(ev.key)
            if d.in_flight:
                # Still HISTORICAL (nothing waits then: a waiting historical event would have
                # gone, a waiting live one makes it DRAINING) or DRAINING: nothing can move.
                return True
            if not d.queue:
                del self._dids[ev.did]  # IDLE: keep nothing
                return True
            else:
                d.state = DidState.IDLE
        else:
            # Taken before it was sent (an ack naming an event we still hold back, e.g. one the
            # consumer saw before a restart): it will not be sent; the rest moves on.
            try:
                d.queue.remove(ev)
            except ValueError:
                return False
            if d.state is DidState.DRAINING:
                d.state = DidState.HISTORICAL  # the head may no longer be live; _pump decides again
        out: list[OutboxEvent] = []
        self._pump(ev.did, d, out)
        for e in out:
            self._send(e)
        return True

    def taken_many(self, events: Iterable[OutboxEvent]) -> None:
        """``taken`` for each of ``events`` in order (the acks of one socket read): an event
        whose DID still has others in flight, or nothing waiting, costs no call of its own."""
        dids = self._dids
        taken = self.taken
        for ev in events:
            d = dids.get(ev.did)
            if d is None:
                continue
            fl = d.in_flight
            if ev.key in fl and (len(fl) > 1 or not d.queue):
                fl.discard(ev.key)  # still in flight: nothing moves (see ``taken``)
                if not fl:
                    del dids[ev.did]  # IDLE: keep nothing
            else:
                taken(ev)

    def _pump(self, did: str, d: _Did, out: list[OutboxEvent]) -> None:
        """Release from the head of the DID's queue into ``out`` while the rules allow (rule 3:
        FIFO); the caller sends ``out`` once the state change is done."""
        q = d.queue
        while q:
            ev = q[0]
            if not _may_send(d, ev):
                if ev.flags & FLAG_LIVE:
                    d.state = DidState.DRAINING
                break
            q.popleft()
            d.in_flight.add(ev.key)
            out.append(ev)
            if ev.flags & FLAG_LIVE:
                d.state = DidState.LIVE
                break
            d.state = DidState.HISTORICAL
        if not q and not d.in_flight:
            del self._dids[did]  # IDLE: keep nothing

    # --- inspection (tests, metrics) -------------------------------------------------------

    def state(self, did: str) -> DidState:
        d = self._dids.get(did)
        return d.state if d is not None else DidState.IDLE

    def waiting(self, did: str) -> int:
        d = self._dids.get(did)
        return len(d.queue) if d is not None else 0

    def in_flight(self, did: str) -> int:
        d = self._dids.get(did)
        return len(d.in_flight) if d is not None else 0

    def __len__(self) -> int:
        """DIDs with work (idle DIDs are not stored)."""
        return len(self._dids)

    def busy_dids(self) -> Iterator[str]:
        return iter(self._dids)
