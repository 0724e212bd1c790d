"""AckTracker: an event completes once every target took it, single or batched calls alike."""

from __future__ import annotations

from connectors.targets import AckTracker, taken_many


def test_completes_only_when_every_target_took_it_batched_or_not():
    done_one: list[bytes] = []
    done_many: list[list[bytes]] = []
    t = AckTracker(2, done_one.append, done_many.append)
    keys = [b"k%d" % i for i in range(5)]
    t.register_many(keys)
    assert t.in_flight == 5 and all(k in t for k in keys)
    a, b = t.callback(0), t.callback(1)
    a.many(keys[:3] + [b"never-offered"])  # type: ignore[attr-defined]
    assert done_one == [] and done_many == [] and t.in_flight == 5
    b.many([keys[2], keys[0], keys[0]])  # type: ignore[attr-defined]  # duplicate: harmless
    assert done_many == [[keys[2], keys[0]]] and t.in_flight == 3
    b(keys[1])
    assert done_one == [keys[1]]
    a.many(keys[3:])  # type: ignore[attr-defined]
    taken_many(b)(keys[3:])
    assert done_many[-1] == keys[3:] and t.in_flight == 0


def test_taken_many_of_a_plain_callback_calls_it_per_key():
    got: list[bytes] = []
    taken_many(got.append)([b"a", b"b"])
    assert got == [b"a", b"b"]


def test_without_a_batch_completion_callback_keys_complete_one_by_one():
    done: list[bytes] = []
    t = AckTracker(1, done.append)
    t.register_many([b"x", b"y"])
    t.callback(0).many([b"y", b"x"])  # type: ignore[attr-defined]
    assert done == [b"y", b"x"] and t.in_flight == 0
