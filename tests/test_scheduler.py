"""Per-DID ordering (spec §6.3) on the pure scheduler, including §14 tests 7-16's rules and
the regressions fixed in Go (11-13). Socket-level versions live in test_channel.py."""

from __future__ import annotations

import random

import pytest

from connectors.scheduler import DidState, Scheduler
from store.layout import FLAG_IDENTITY, FLAG_LIVE, outbox_key, shard_of
from store.outbox import OutboxEvent

_next_id = [0]


def ev(did: str, live: bool = False, identity: bool = False) -> OutboxEvent:
    _next_id[0] += 1
    i = _next_id[0]
    flags = (FLAG_LIVE if live else 0) | (FLAG_IDENTITY if identity else 0)
    shard = shard_of(did, 64)
    return OutboxEvent(outbox_key(shard, i), shard, i, did, flags, b'{"id":%d}' % i)


class Harness:
    def __init__(self) -> None:
        self.sent: list[OutboxEvent] = []
        self.s = Scheduler(self.sent.append)

    def push(self, *events: OutboxEvent) -> None:
        for e in events:
            self.s.add(e)

    def ack(self, *events: OutboxEvent) -> None:
        for e in events:
            assert self.s.taken(e)

    def ids(self) -> list[int]:
        return [e.id for e in self.sent]


D = "did:plc:aaaa"


def test_historical_events_overlap():  # §14 tests 7, 9, 10
    h = Harness()
    hs = [ev(D) for _ in range(5)]
    h.push(*hs)
    assert h.ids() == [e.id for e in hs]
    assert h.s.state(D) is DidState.HISTORICAL
    h.ack(*hs)
    assert h.s.state(D) is DidState.IDLE
    assert len(h.s) == 0


def test_dids_are_independent():  # §14 test 8
    h = Harness()
    a = [ev("did:plc:a", live=True) for _ in range(3)]
    b = [ev("did:plc:b", live=True) for _ in range(3)]
    for x, y in zip(a, b):
        h.push(x, y)
    assert h.ids() == [a[0].id, b[0].id]
    h.ack(b[0])
    assert h.ids() == [a[0].id, b[0].id, b[1].id]


def test_live_barrier():  # §14 test 11
    h = Harness()
    h1, h2 = ev(D), ev(D)
    h.push(h1, h2)
    assert h.ids() == [h1.id, h2.id]
    l1, h3, h4 = ev(D, live=True), ev(D), ev(D)
    h.push(l1, h3, h4)
    assert len(h.sent) == 2
    assert h.s.state(D) is DidState.DRAINING
    h.ack(h1)
    assert len(h.sent) == 2  # H2 still in flight
    h.ack(h2)
    assert h.ids()[2] == l1.id and len(h.sent) == 3
    assert h.s.state(D) is DidState.LIVE
    h.ack(l1)
    assert sorted(h.ids()[3:]) == [h3.id, h4.id]
    assert h.s.state(D) is DidState.HISTORICAL


def test_consecutive_live_events_do_not_stall():  # §14 test 12 (Go #1331)
    h = Harness()
    l1, l2, l3 = (ev(D, live=True) for _ in range(3))
    h.push(l1, l2, l3)
    assert h.ids() == [l1.id]
    h.ack(l1)
    assert h.ids() == [l1.id, l2.id]
    h.ack(l2)
    assert h.ids() == [l1.id, l2.id, l3.id]
    h.ack(l3)
    assert len(h.s) == 0


def test_first_event_live_blocks_later_historical():  # §14 test 13 (Go fast-path regression)
    h = Harness()
    l1 = ev(D, live=True)
    h.push(l1)
    assert h.ids() == [l1.id]
    h1 = ev(D)
    h.push(h1)
    assert h.ids() == [l1.id]
    h.ack(l1)
    assert h.ids() == [l1.id, h1.id]


def test_live_at_head_while_historical_in_flight_blocks_followers():
    # Go's second #1331 bug: blockedOnLive was not set when the live event reached the head
    # while historical events were in flight, so later historical events overtook it.
    h = Harness()
    h1 = ev(D)
    h.push(h1)
    l1, h2 = ev(D, live=True), ev(D)
    h.push(l1, h2)
    assert h.ids() == [h1.id]
    h.ack(h1)
    assert h.ids() == [h1.id, l1.id]
    h.ack(l1)
    assert h.ids() == [h1.id, l1.id, h2.id]


def test_readme_example():
    h = Harness()
    H1, H2, L1, H3, H4, L2, H5 = ev(D), ev(D), ev(D, live=True), ev(D), ev(D), ev(D, live=True), ev(D)
    h.push(H1, H2, L1, H3, H4, L2, H5)
    assert h.ids() == [H1.id, H2.id]
    h.ack(H1, H2)
    assert h.ids()[2:] == [L1.id]
    h.ack(L1)
    assert h.ids()[3:] == [H3.id, H4.id]
    h.ack(H4)
    assert len(h.sent) == 5
    h.ack(H3)
    assert h.ids()[5:] == [L2.id]
    h.ack(L2)
    assert h.ids()[6:] == [H5.id]
    h.ack(H5)
    assert h.s.state(D) is DidState.IDLE and len(h.s) == 0


def test_identity_events_are_historical():  # §14 test 16: identity rows are not barriers
    h = Harness()
    i1, r1 = ev(D, identity=True), ev(D)
    h.push(i1, r1)
    assert h.ids() == [i1.id, r1.id]


def test_duplicate_and_unknown_taken_are_harmless():
    h = Harness()
    l1, l2 = ev(D, live=True), ev(D, live=True)
    h.push(l1, l2)
    h.ack(l1)
    assert not h.s.taken(l1)  # duplicate
    assert not h.s.taken(ev("did:plc:other"))  # never seen
    assert h.ids() == [l1.id, l2.id]


def test_taken_while_waiting_is_dropped_and_releases_the_queue():
    h = Harness()
    h1, l1, h2 = ev(D), ev(D, live=True), ev(D)
    h.push(h1, l1, h2)
    assert h.s.state(D) is DidState.DRAINING
    assert h.s.taken(l1)  # acked before it was sent (e.g. seen before a restart)
    assert h.ids() == [h1.id, h2.id]  # H2 no longer waits for the dropped barrier
    assert h.s.state(D) is DidState.HISTORICAL


def test_idle_dids_are_forgotten():  # §15.16
    h = Harness()
    for i in range(1000):
        e = ev(f"did:plc:{i}", live=bool(i % 2))
        h.push(e)
        h.ack(e)
    assert len(h.s) == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_interleavings_obey_the_rules(seed):
    """Property check of rules 1-3 under random pushes and out-of-order acks."""
    rnd = random.Random(seed)
    h = Harness()
    dids = [f"did:plc:r{i}" for i in range(4)]
    pushed: dict[str, list[OutboxEvent]] = {d: [] for d in dids}
    acked: set[int] = set()
    in_flight: list[OutboxEvent] = []
    seen_sent = 0
    for _ in range(400):
        if rnd.random() < 0.5:
            d = rnd.choice(dids)
            e = ev(d, live=rnd.random() < 0.3)
            pushed[d].append(e)
            h.push(e)
        elif in_flight:
            e = in_flight.pop(rnd.randrange(len(in_flight)))
            h.ack(e)
            acked.add(e.id)
        for e in h.sent[seen_sent:]:
            earlier = [x for x in pushed[e.did] if x.id < e.id]
            sent_ids = {x.id for x in h.sent}
            assert all(x.id in sent_ids for x in earlier), "FIFO per DID"
            if e.live:
                assert all(x.id in acked for x in earlier), "live waits for everything earlier"
            else:
                assert all(x.id in acked for x in earlier if x.live), "historical waits for earlier live"
            in_flight.append(e)
        # a live event in flight is alone
        for d in dids:
            fl = [x for x in in_flight if x.did == d]
            if any(x.live for x in fl):
                assert len(fl) == 1
        seen_sent = len(h.sent)
    while in_flight:  # drain: everything eventually goes out, nothing stalls
        e = in_flight.pop(0)
        h.ack(e)
        in_flight.extend(h.sent[seen_sent:])
        seen_sent = len(h.sent)
    assert len(h.sent) == sum(len(v) for v in pushed.values())
    assert len(h.s) == 0


@pytest.mark.parametrize("seed", range(10))
def test_add_many_releases_what_add_would_in_the_same_order(seed):
    """``add_many`` (the follower's per-shard runs) is ``add`` per event: same sends, same
    order, same states, under random runs of live/historical events and random acks."""
    rnd = random.Random(seed)
    one, many_sent = Harness(), []
    many_calls: list[int] = []
    many = Scheduler(many_sent.append, lambda evs: (many_calls.append(len(evs)), many_sent.extend(evs)))
    dids = [f"did:plc:m{i}" for i in range(5)]
    acked: set[int] = set()
    for _ in range(150):
        in_flight = [e for e in one.sent if e.id not in acked]
        if rnd.random() < 0.5 or not in_flight:
            run = [ev(rnd.choice(dids), live=rnd.random() < 0.2) for _ in range(rnd.randrange(1, 12))]
            before = len(one.sent)
            one.push(*run)
            calls = len(many_calls)
            many.add_many(run)
            assert len(many_calls) == calls + (len(one.sent) > before), "one send_many per run"
        else:
            e = rnd.choice(in_flight)
            acked.add(e.id)
            assert one.s.taken(e) and many.taken(e)
        assert [e.id for e in many_sent] == one.ids()
        assert all(many.state(d) is one.s.state(d) and many.waiting(d) == one.s.waiting(d)
                   and many.in_flight(d) == one.s.in_flight(d) for d in dids)
    assert len(one.sent) >= 50 and any(n > 1 for n in many_calls)


@pytest.mark.parametrize("seed", range(10))
def test_taken_many_is_taken_per_event(seed):
    """``taken_many`` (the acks of one socket read) releases what ``taken`` per event would, in
    the same order, and leaves the same states: random runs, acks in random batches, events
    taken while still waiting, and unknown events included."""
    rnd = random.Random(seed)
    one, many = Harness(), Harness()
    dids = [f"did:plc:t{i}" for i in range(5)]
    acked: set[int] = set()
    pushed: list[OutboxEvent] = []
    for _ in range(200):
        in_flight = [e for e in one.sent if e.id not in acked]
        if rnd.random() < 0.4 or not in_flight:
            run = [ev(rnd.choice(dids), live=rnd.random() < 0.25) for _ in range(rnd.randrange(1, 8))]
            pushed += run
            one.push(*run)
            many.push(*run)
        else:
            batch = rnd.sample(in_flight, rnd.randrange(1, len(in_flight) + 1))
            if rnd.random() < 0.2:  # an event still waiting, and one never offered
                waiting = [e for e in pushed if e.id not in acked and e not in one.sent]
                batch += waiting[:1] + [ev("did:plc:unknown")]
            for e in batch:
                one.s.taken(e)
            many.s.taken_many(batch)
            acked.update(e.id for e in batch)
        assert many.ids() == one.ids()
        for d in dids:
            assert many.s.state(d) is one.s.state(d)
            assert many.s.in_flight(d) == one.s.in_flight(d) and many.s.waiting(d) == one.s.waiting(d)
    assert len(many.s) == len(one.s)
