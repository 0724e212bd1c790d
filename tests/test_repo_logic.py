"""RepoLogic against a real RocksDB: spec §14 firehose (17-32) and resync (36-45) cases as they
apply to this component, snapshot merge-diff, buffering and chained drain, filters, account
deletion, ids across re-open, one-WriteBatch atomicity, backoff cap, the bytewax adapter."""

from __future__ import annotations

import orjson
import pytest

from operators.items import (
    AddRepo,
    FetchFailed,
    FirehoseAccount,
    FirehoseCommit,
    FirehoseIdentity,
    FirehoseSync,
    IdentityRefreshed,
    Rejected,
    RemoveRepo,
    ResolvedIdentity,
)
from operators.repo import retry_backoff
from store.db import StoreError
from store.layout import (
    FLAG_IDENTITY,
    FLAG_INTERNAL,
    FLAG_LIVE,
    PRIO_DESYNC,
    PRIO_ERROR,
    PRIO_IDENTITY,
    PRIO_PENDING,
    fetch_key,
    shard_of,
)
from tests.repo_support import (
    KEY_A,
    KEY_B,
    T0,
    Env,
    cid,
    commit_item,
    did,
    fetch_started,
    op,
    rev,
    snapshot,
    sync_body,
)

D = did(1)
P1 = "app.bsky.feed.post/3k0000000001"
P2 = "app.bsky.feed.post/3k0000000002"
P3 = "app.bsky.feed.like/3k0000000003"
F1 = "app.bsky.graph.follow/3k0000000004"


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path / "data")


def make_env(tmp_path, name="data", **cfg):
    return Env(tmp_path / name, **cfg)


# --------------------------------------------------------------------------- control

def test_add_is_pending_with_fetch_and_idempotent(env):
    assert env.process(AddRepo(D, seq=7)) == []
    st = env.state(D)
    assert (st.state, st.status, st.handle) == ("pending", "active", "")
    assert env.fetch_q() == [(PRIO_PENDING, int(T0), D, {"kind": "repo", "did": D})]
    assert env.counter("repos") == 1
    assert env.cmd_applied(shard_of(D, 4)) == 7
    env.process(AddRepo(D, seq=8))  # insert-or-ignore: no second fetch, no reset
    assert len(env.fetch_q()) == 1 and env.counter("repos") == 1
    assert env.cmd_applied(shard_of(D, 4)) == 8


def test_firehose_items_record_the_applied_seq_per_shard(env):
    """``fhapplied/<shard>`` is written with the item's effects: the firehose cursor never
    passes an item RepoLogic has not applied (a kill -9 in between loses nothing)."""
    from store.layout import meta_firehose_applied

    def applied(d):
        raw = env.db.cf("meta").get(meta_firehose_applied(shard_of(d, 4)))
        return int.from_bytes(raw, "big") if raw else 0

    env.active_repo(D, records={P1: cid("a")})
    env.process(FirehoseIdentity(seq=41, did=D, handle=None), FirehoseIdentity(seq=40, did=D, handle=None))
    assert applied(D) == 41  # the highest of the batch; never moves back
    env.process(FirehoseIdentity(seq=7, did=D, handle=None))
    assert applied(D) == 41
    env.process(FirehoseIdentity(seq=42, did="not a did", handle=None))  # rejected, still done with
    assert applied("not a did") == 42
    env.process(AddRepo(D, seq=99))  # control items do not count
    assert applied(D) == 41


def test_add_does_not_touch_existing_repo(env):
    env.active_repo(D, records={P1: cid("a")})
    env.process(AddRepo(D, seq=3))
    assert env.state(D).state == "active" and env.fetch_q() == []


def test_remove_deletes_state_records_buffer_and_fetches_but_keeps_outbox(env):
    env.active_repo(D, records={P1: cid("a"), P2: cid("b")})
    env.process(commit_item(D, rev(2), "wrong", cid("r2"), [op("create", P3, cid("c"))]))  # desync + buffered
    env.process(FirehoseIdentity(seq=1, did=D, handle=None))
    assert env.buffered(D) and len(env.fetch_q()) == 2
    n_out = len(env.outbox(D))
    assert env.process(RemoveRepo(D, seq=11)) == []
    assert env.state(D) is None
    assert env.records(D) == {} and env.buffered(D) == [] and env.fetch_q() == []
    assert len(env.outbox(D)) == n_out
    assert (env.counter("repos"), env.counter("records"), env.counter("resync_buf")) == (0, 0, 0)
    assert env.cmd_applied(shard_of(D, 4)) == 11
    env.process(RemoveRepo(D))  # unknown: fine
    # re-adding re-emits everything as creates (spec §9.3)
    env.process(AddRepo(D))
    env.sync_repo(D, rev(3), cid("r3"), {P1: cid("a")})
    assert [e["record"]["action"] for e in env.outbox(D) if e["type"] == "record"][-1] == "create"


@pytest.mark.parametrize("limit", [1024, 2])
def test_remove_deletes_rows_one_by_one_and_a_large_repo_by_range(env, monkeypatch, limit):
    """A repo's rows go by point deletes (a never-synced repo writes no deletion at all);
    only above ``CLEAR_POINT_DELETES`` rows one range deletion (RocksDB keeps those in memory)."""
    import operators.repo as repo_mod

    monkeypatch.setattr(repo_mod, "CLEAR_POINT_DELETES", limit)
    env.active_repo(D, records={P1: cid("a"), P2: cid("b"), P3: cid("c")})
    other = "did:plc:neighbour"
    env.active_repo(other, records={P1: cid("x")})
    env.process(AddRepo("did:plc:neversynced"))
    rows = env.db.cf("records")
    deletes = lambda: int(rows.property_value("rocksdb.num-deletes-active-mem-table"))  # noqa: E731
    before = deletes()
    env.process(RemoveRepo("did:plc:neversynced"))
    assert deletes() == before  # nothing stored, nothing deleted
    env.process(RemoveRepo(D))
    assert env.records(D) == {} and env.records(other) == {P1: cid("x")}
    assert deletes() == before + (3 if limit >= 3 else 0)  # a range deletion is not counted here


def test_bad_did_rejected_but_command_marked_applied(env):
    out = env.process(AddRepo("not-a-did", seq=5), AddRepo("did:plc:ok\x00x", seq=6))
    assert [r.reason for r in out] == ["bad_did", "bad_did"]
    assert env.fetch_q() == [] and env.counter("repos") == 0
    assert max(env.cmd_applied(s) for s in range(4)) == 6


def test_unknown_item_rejected(env):
    out = env.process(object())
    assert len(out) == 1 and out[0].reason == "unknown_item"


# --------------------------------------------------------------------------- §14 firehose 17-32

def test_17_commit_untracked_not_tracked(env):
    assert env.process(commit_item(D, rev(1), None, cid("x"), [op("create", P1, cid("a"))])) == []
    assert env.state(D) is None and env.fetch_q() == [] and env.verifier.calls == 0


def test_18_commit_untracked_full_network_tracks_pending(tmp_path):
    env = make_env(tmp_path, full_network=True)
    env.process(commit_item(D, rev(1), None, cid("x"), [op("create", P1, cid("a"))]))
    assert env.state(D).state == "pending"
    assert [(p, d) for p, _, d, _ in env.fetch_q()] == [(PRIO_PENDING, D)]
    assert env.outbox() == [] and env.verifier.calls == 0


def test_commit_signal_collection_autotracks_on_any_op_including_deletes(tmp_path):
    env = make_env(tmp_path, signal_collection="com.example.signal")
    env.process(commit_item(did(1), rev(1), None, cid("x"), [op("create", P1, cid("a"))]))
    assert env.state(did(1)) is None
    env.process(commit_item(did(2), rev(1), None, cid("x"), [op("delete", "com.example.signal/abc")]))
    assert env.state(did(2)).state == "pending"


def test_19_commit_for_pending_repo_ignored(env):
    env.process(AddRepo(D))
    env.process(commit_item(D, rev(1), None, cid("x"), [op("create", P1, cid("a"))]))
    assert env.state(D).state == "pending" and env.verifier.calls == 0 and env.outbox() == []


def test_20_commit_rev_replay_skipped_before_verification(env):
    env.active_repo(D, r=rev(5))
    calls = env.verifier.calls
    env.process(commit_item(D, rev(5), None, cid("x"), [op("create", P1, cid("a"))], fail="would fail"))
    env.process(commit_item(D, rev(4), None, cid("x"), [op("create", P1, cid("a"))], fail="would fail"))
    st = env.state(D)
    assert st.rev == rev(5) and st.state == "active" and env.verifier.calls == calls


def account(active: bool, status: str | None, d: str = D) -> FirehoseAccount:
    return FirehoseAccount(seq=1, did=d, active=active, status=status)


def test_21_22_24_account_status_changes(env):
    env.active_repo(D, handle="alice.test")
    base = len(env.outbox(D))
    env.process(account(False, "deactivated"))
    assert env.state(D).status == "deactivated"
    evs = env.outbox(D)[base:]
    assert len(evs) == 1 and evs[0]["_flags"] == FLAG_IDENTITY
    assert evs[0]["identity"] == {"did": D, "handle": "alice.test", "is_active": False, "status": "deactivated"}
    env.process(account(True, None))
    evs = env.outbox(D)[base:]
    assert env.state(D).status == "active" and len(evs) == 2
    assert evs[1]["identity"]["is_active"] is True and evs[1]["identity"]["status"] == "active"
    env.process(account(True, "active"))  # 24: already active
    assert len(env.outbox(D)) == base + 2
    assert env.state(D).state == "active"  # status never changes state


def test_23_account_deleted_removes_everything_and_lists_paths_for_kafka(env):
    env.active_repo(D, records={P1: cid("a"), P2: cid("b")}, handle="alice.test")
    env.process(commit_item(D, rev(2), "mismatch", cid("r2"), [op("create", P3, cid("c"))]))  # buffered
    assert env.buffered(D)
    base = len(env.outbox(D))
    env.process(account(False, "deleted"))
    assert env.state(D) is None and env.records(D) == {} and env.buffered(D) == [] and env.fetch_q() == []
    new = env.outbox(D, internal=True)[base:]
    assert len(new) == 2
    assert new[0]["identity"] == {"did": D, "handle": "alice.test", "is_active": False, "status": "deleted"}
    assert new[1]["_flags"] == FLAG_INTERNAL
    assert new[1] == {**new[1], "did": D, "deleted_paths": sorted([P1, P2])}
    assert len(env.outbox(D)[base:]) == 1  # exactly one client-visible row (Tap's test 23)
    assert (env.counter("repos"), env.counter("records"), env.counter("resync_buf")) == (0, 0, 0)


def test_account_deleted_without_records_has_no_internal_row(env):
    env.active_repo(D)
    env.process(account(False, "deleted"))
    assert [e["_flags"] for e in env.outbox(D, internal=True)][-1] == FLAG_IDENTITY


def test_account_event_for_never_resolved_repo_uses_handle_invalid(env):
    env.process(AddRepo(D))
    env.process(account(False, "takendown"))
    ev = env.outbox(D)[-1]["identity"]
    assert ev["handle"] == "handle.invalid" and ev["status"] == "takendown"


def test_25_32_account_untracked(tmp_path):
    env = make_env(tmp_path)
    env.process(account(True, None))
    assert env.state(D) is None
    fn = make_env(tmp_path, "fn", full_network=True)
    fn.process(account(True, None, did(2)))  # 26
    assert fn.state(did(2)).state == "pending"
    fn.process(account(False, "deactivated", did(3)))  # 32
    assert fn.state(did(3)) is None


def test_31_account_throttled_is_noop(env):
    env.active_repo(D)
    base = len(env.outbox(D))
    env.process(account(False, "throttled"), account(False, None), account(False, "desynchronized"))
    assert env.state(D).status == "active" and len(env.outbox(D)) == base


def identity_refresh(env, d, handle, key=KEY_A, pds="https://pds.test"):
    env.process(FirehoseIdentity(seq=1, did=d, handle=None))
    rows = [(p, nb, dd, v) for p, nb, dd, v in env.fetch_q() if v["kind"] == "identity" and dd == d]
    assert len(rows) == 1 and rows[0][0] == PRIO_IDENTITY
    fk = fetch_key(rows[0][0], rows[0][1], d)
    return env.process(IdentityRefreshed(did=d, fetch_key=fk, identity=ResolvedIdentity(handle, pds, key)))


def test_27_28_identity_refresh_emits_on_handle_change_only(env):
    env.active_repo(D, handle="old-handle.test")
    base = len(env.outbox(D))
    assert identity_refresh(env, D, "new-handle.test") == []
    assert env.state(D).handle == "new-handle.test"
    evs = env.outbox(D)[base:]
    assert len(evs) == 1 and evs[0]["identity"] == {"did": D, "handle": "new-handle.test", "is_active": True,
                                                    "status": "active"}
    assert not [r for r in env.fetch_q() if r[3]["kind"] == "identity"]  # request answered
    identity_refresh(env, D, "new-handle.test")  # 28
    assert len(env.outbox(D)) == base + 1


def test_identity_refresh_empty_handle_becomes_handle_invalid_and_key_rotates(env):
    env.active_repo(D, handle="alice.test")
    identity_refresh(env, D, "", key=KEY_B)
    st = env.state(D)
    assert st.handle == "handle.invalid" and st.signing_key == KEY_B
    assert env.outbox(D)[-1]["identity"]["handle"] == "handle.invalid"
    # the next commit is verified with the new key
    env.process(commit_item(D, rev(2), st.prev_data, cid("r2"), [], key=KEY_B))
    assert env.verifier.keys[-1] == KEY_B and env.state(D).rev == rev(2)


def test_29_30_identity_untracked(tmp_path):
    env = make_env(tmp_path)
    env.process(FirehoseIdentity(seq=1, did=D, handle="x.test"))
    assert env.state(D) is None and env.fetch_q() == []
    fn = make_env(tmp_path, "fn", full_network=True)
    fn.process(FirehoseIdentity(seq=1, did=D, handle="x.test"))
    assert fn.state(D).state == "pending"


def test_identity_request_replaced_not_duplicated(env):
    env.active_repo(D)
    env.process(FirehoseIdentity(seq=1, did=D, handle=None))
    env.clock.t += 5
    env.process(FirehoseIdentity(seq=2, did=D, handle=None))
    rows = [r for r in env.fetch_q() if r[3]["kind"] == "identity"]
    assert len(rows) == 1 and rows[0][1] == int(T0) + 5


def test_identity_refresh_failure_and_untracked(env):
    env.active_repo(D, handle="alice.test")
    env.process(FirehoseIdentity(seq=1, did=D, handle=None))
    fk = fetch_key(PRIO_IDENTITY, int(T0), D)
    out = env.process(IdentityRefreshed(did=D, fetch_key=fk, identity=None, error="boom"))
    assert [r.reason for r in out] == ["resolve_failed"]
    assert env.fetch_q() == [] and env.state(D).handle == "alice.test" and env.state(D).ident_key == ""
    # answer for a repo removed meanwhile: row deleted, nothing else
    env.process(FirehoseIdentity(seq=1, did=D, handle=None), RemoveRepo(D))
    assert env.process(IdentityRefreshed(did=D, fetch_key=fk, identity=ResolvedIdentity("x.test", "", KEY_A))) == []
    assert env.state(D) is None and env.fetch_q() == [] and env.outbox(D)[-1]["identity"]["handle"] == "alice.test"


# --------------------------------------------------------------------------- live commits

def test_live_commit_applied(env):
    env.active_repo(D, r=rev(1), data=cid("A"), records={P1: cid("a")})
    base = len(env.outbox(D))
    out = env.process(commit_item(D, rev(2), cid("A"), cid("B"), [
        op("create", P2, cid("b"), {"text": "hi"}), op("update", P1, cid("a2")), op("delete", P3)]))
    assert out == []
    st = env.state(D)
    assert (st.rev, st.prev_data, st.state, st.records) == (rev(2), cid("B"), "active", 2)
    assert env.records(D) == {P1: cid("a2"), P2: cid("b")}
    evs = env.outbox(D)[base:]
    assert [e["_flags"] for e in evs] == [FLAG_LIVE] * 3
    assert evs[0]["record"] == {"live": True, "did": D, "rev": rev(2), "collection": "app.bsky.feed.post",
                                "rkey": "3k0000000002", "action": "create", "record": {"text": "hi"}, "cid": cid("b")}
    assert evs[2]["record"] == {"live": True, "did": D, "rev": rev(2), "collection": "app.bsky.feed.like",
                                "rkey": "3k0000000003", "action": "delete"}
    assert env.counter("records") == 2
    ids = [e["_id"] for e in env.outbox()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_commit_record_omitted_when_not_decodable(env):
    env.active_repo(D, data=cid("A"))
    o = op("create", P1, cid("a"))
    o.record_json = None
    env.process(commit_item(D, rev(2), cid("A"), cid("B"), [o]))
    rec = env.outbox(D)[-1]["record"]
    assert "record" not in rec and rec["cid"] == cid("a")


def test_filtered_commit_still_advances_rev(tmp_path):
    env = make_env(tmp_path, collection_filters=("app.bsky.feed.*",))
    env.active_repo(D, data=cid("A"))
    base = len(env.outbox(D))
    env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", F1, cid("f"))]))
    st = env.state(D)
    assert (st.rev, st.prev_data) == (rev(2), cid("B")) and len(env.outbox(D)) == base and env.records(D) == {}
    env.process(commit_item(D, rev(3), cid("B"), cid("C"), [op("create", F1, cid("g")), op("create", P1, cid("p"))]))
    assert env.records(D) == {P1: cid("p")}
    assert [e["record"]["collection"] for e in env.outbox(D)[base:]] == ["app.bsky.feed.post"]


def test_legacy_commit_without_prevdata_skips_continuity(env):
    env.active_repo(D, data=cid("A"))
    env.process(commit_item(D, rev(2), None, cid("B"), [op("create", P1, cid("a"))]))
    assert env.state(D).prev_data == cid("B") and env.state(D).state == "active"


def test_prevdata_mismatch_desyncs_requests_fetch_and_buffers(env):
    env.active_repo(D, data=cid("A"))
    base = len(env.outbox(D))
    env.process(commit_item(D, rev(2), cid("X"), cid("B"), [op("create", P1, cid("a"))]))
    st = env.state(D)
    assert st.state == "desynchronized" and st.rev == rev(1) and len(env.outbox(D)) == base
    assert [(p, nb) for p, nb, _, _ in env.fetch_q()] == [(PRIO_DESYNC, int(T0))]
    assert [b["rev"] for b in env.buffered(D)] == [rev(2)] and env.counter("resync_buf") == 1


def test_verification_failure_rejects_and_desyncs_active_repo(env):
    env.active_repo(D, data=cid("A"))
    out = env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))], fail="bad sig"))
    assert len(out) == 1 and (out[0].source, out[0].reason, out[0].detail) == ("commit", "verify_failed", "bad sig")
    st = env.state(D)
    assert st.state == "desynchronized" and st.rev == rev(1) and env.records(D) == {}
    assert [p for p, _, _, _ in env.fetch_q()] == [PRIO_DESYNC]
    # a failure while desynchronized: rejected, nothing else changes
    out = env.process(commit_item(D, rev(3), cid("A"), cid("C"), [], fail="bad sig"))
    assert out[0].reason == "verify_failed" and len(env.fetch_q()) == 1 and env.buffered(D) == []


def test_commit_mismatching_event_did_or_rev_is_rejected(env):
    env.active_repo(D, data=cid("A"))
    item = commit_item(D, rev(2), cid("A"), cid("B"), [])
    item.body["_cc"].rev = rev(9)
    out = env.process(item)
    assert out[0].reason == "verify_failed" and env.state(D).rev == rev(1)


def test_commits_of_one_batch_see_each_other(env):
    env.active_repo(D, data=cid("A"))
    out = env.process(
        commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))]),
        commit_item(D, rev(3), cid("B"), cid("C"), [op("update", P1, cid("a2"))]),
        commit_item(D, rev(3), cid("B"), cid("C"), [op("update", P1, cid("zz"))]),  # replay within batch
        commit_item(D, rev(4), cid("C"), cid("D"), [op("delete", P1)]),
    )
    assert out == []
    st = env.state(D)
    assert (st.rev, st.prev_data, st.records) == (rev(4), cid("D"), 0) and env.records(D) == {}
    assert [e["record"]["action"] for e in env.outbox(D) if e["type"] == "record"] == ["create", "update", "delete"]
    assert env.counter("records") == 0


def test_bad_frame_rejected(env):
    env.active_repo(D)
    out = env.process(FirehoseCommit(seq=1, did=D, body="nope"), FirehoseCommit(seq=2, did=D, body={"ops": []}))
    assert [r.reason for r in out] == ["bad_frame", "bad_frame"]


# --------------------------------------------------------------------------- #sync

def test_sync_rules(env):
    env.active_repo(D, r=rev(2), data=cid("A"))
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(1), cid("Z"))))  # older
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(3), cid("A"))))  # same data: no-op
    assert env.state(D).state == "active" and env.state(D).rev == rev(2)
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(3), cid("B"))))
    assert env.state(D).state == "desynchronized" and [p for p, *_ in env.fetch_q()] == [PRIO_DESYNC]
    calls = env.verifier.calls
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(4), cid("C"))))  # not active: skipped
    assert env.verifier.calls == calls and len(env.fetch_q()) == 1


def test_sync_untracked_and_failure(tmp_path):
    env = make_env(tmp_path, full_network=True)
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(1), cid("A"))))
    assert env.state(D).state == "pending"
    env.sync_repo(D, rev(1), cid("A"), {})
    out = env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(2), cid("B"), fail="bad sig")))
    assert out[0].reason == "verify_failed" and env.state(D).state == "desynchronized"


# --------------------------------------------------------------------------- snapshots

def test_first_backfill_emits_identity_then_creates(env):
    env.process(AddRepo(D))
    recs = {P1: cid("a"), P2: cid("b"), P3: cid("c")}
    assert env.sync_repo(D, rev(1), cid("A"), recs, handle="alice.test") == []
    evs = env.outbox(D)
    assert evs[0]["type"] == "identity" and evs[0]["identity"] == {"did": D, "handle": "alice.test",
                                                                  "is_active": True, "status": "active"}
    recevs = [e["record"] for e in evs[1:]]
    assert [(r["action"], r["collection"] + "/" + r["rkey"], r["live"], r["rev"]) for r in recevs] == \
        [("create", p, False, rev(1)) for p in sorted(recs)]
    assert all(e["_flags"] == 0 for e in evs[1:])
    assert recevs[0]["cid"] == recs[sorted(recs)[0]] and "record" in recevs[0]
    st = env.state(D)
    assert (st.state, st.rev, st.prev_data, st.records, st.handle, st.signing_key, st.pds) == \
        ("active", rev(1), cid("A"), 3, "alice.test", KEY_A, "https://pds.test")
    assert (st.error, st.retries, st.retry_after, st.fetch_key) == ("", 0, 0, "")
    assert env.fetch_q() == [] and env.records(D) == recs and env.counter("records") == 3


def resync(env, d, r, data, records, **kw):
    """Desync ``d`` through a #sync and answer the fetch with a snapshot."""
    env.process(FirehoseSync(seq=1, did=d, body=sync_body(d, r, data + "x")))
    assert env.state(d).state == "desynchronized"
    return env.sync_repo(d, r, data, records, **kw)


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_snapshot_diff_create_update_noop_delete(env, chunk):
    a, b, c, f = cid("a"), cid("b"), cid("c"), cid("f")
    env.active_repo(D, records={P1: a, P2: b, P3: c, F1: f})
    base = len(env.outbox(D))
    # P1 same, P2 changed, P3 gone, F1 gone, new record at the end and in the middle
    new = {P1: a, P2: cid("b2"), "app.bsky.feed.post/3k0000000009": cid("n"), "app.bsky.actor.profile/self": cid("s")}
    assert resync(env, D, rev(2), cid("R2"), new, chunk=chunk) == []
    evs = [e["record"] for e in env.outbox(D)[base:]]
    got = [(r["action"], f"{r['collection']}/{r['rkey']}") for r in evs]
    assert sorted(got) == sorted([("update", P2), ("create", "app.bsky.feed.post/3k0000000009"),
                                  ("create", "app.bsky.actor.profile/self"), ("delete", P3), ("delete", F1)])
    assert got == sorted(got, key=lambda x: x[1])  # key order
    assert all(r["live"] is False and r["rev"] == rev(2) for r in evs)
    assert [r for r in evs if r["action"] == "delete"][0].keys() == {"live", "did", "rev", "collection", "rkey", "action"}
    assert env.records(D) == new and env.state(D).records == 4 and env.counter("records") == 4
    # the same snapshot again: nothing (invariant 3)
    n = len(env.outbox(D))
    resync(env, D, rev(3), cid("R3"), new, chunk=chunk)
    assert len(env.outbox(D)) == n


def test_snapshot_without_resync_deletes_keeps_stale_rows(tmp_path):
    env = make_env(tmp_path, resync_deletes=False)
    env.active_repo(D, records={P1: cid("a"), P2: cid("b")})
    base = len(env.outbox(D))
    resync(env, D, rev(2), cid("R2"), {P1: cid("a")})
    assert env.outbox(D)[base:] == [] and env.records(D) == {P1: cid("a"), P2: cid("b")}


def test_snapshot_filters(tmp_path):
    env = make_env(tmp_path, collection_filters=("app.bsky.feed.post",))
    env.process(AddRepo(D))
    env.sync_repo(D, rev(1), cid("A"), {P1: cid("a"), P3: cid("c"), F1: cid("f")})
    assert env.records(D) == {P1: cid("a")}
    assert [e["record"]["rkey"] for e in env.outbox(D) if e["type"] == "record"] == ["3k0000000001"]
    # identity events are not filtered
    assert env.outbox(D)[0]["type"] == "identity"


def test_snapshot_filters_changed_between_runs(tmp_path):
    env = make_env(tmp_path)
    env.active_repo(D, records={P1: cid("a"), P3: cid("c"), F1: cid("f")})
    from store.db import close_all

    close_all()
    env2 = Env(env.path, collection_filters=("app.bsky.feed.post",))
    base = len(env2.outbox(D))
    # P3 still exists (filtered now: untouched); F1 vanished (filtered: dropped silently)
    resync(env2, D, rev(2), cid("R2"), {P1: cid("a"), P3: cid("c")})
    assert env2.outbox(D)[base:] == []
    assert env2.records(D) == {P1: cid("a"), P3: cid("c")}


def test_second_sync_same_handle_no_identity_event(env):
    env.active_repo(D, handle="alice.test")
    base = len(env.outbox(D))
    resync(env, D, rev(2), cid("R2"), {}, handle="alice.test")
    assert env.outbox(D)[base:] == []
    resync(env, D, rev(3), cid("R3"), {}, handle="bob.test")
    assert [e["identity"]["handle"] for e in env.outbox(D)[base:]] == ["bob.test"]


def test_multichunk_snapshot_spanning_batches(env):
    env.active_repo(D, records={f"app.bsky.feed.post/k{i:03d}": cid(f"o{i}") for i in range(0, 30, 3)})
    base = len(env.outbox(D))
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(2), cid("zz"))))
    new = {f"app.bsky.feed.post/k{i:03d}": cid(f"o{i}") for i in range(0, 30, 2)}
    chunks = snapshot(D, env.fetch_key_of(D), rev(2), cid("R2"), new, chunk=4)
    assert len(chunks) == 4
    env.process(chunks[0])
    assert env.state(D).state == "resyncing" and env.state(D).snap_pos == chunks[0].records[-1].path
    env.process(chunks[1], chunks[2])
    env.process(chunks[3])
    assert env.state(D).state == "active" and env.records(D) == new
    evs = [e["record"] for e in env.outbox(D)[base:]]
    deleted = sorted(f"{r['collection']}/{r['rkey']}" for r in evs if r["action"] == "delete")
    created = sorted(f"{r['collection']}/{r['rkey']}" for r in evs if r["action"] == "create")
    assert deleted == sorted(f"app.bsky.feed.post/k{i:03d}" for i in range(0, 30, 3) if i % 2)
    assert created == sorted(f"app.bsky.feed.post/k{i:03d}" for i in range(0, 30, 2) if i % 3)


def test_crash_mid_snapshot_then_refetch_converges(env):
    """Tap resets `resyncing` at startup; tapflow needs no reset: the fetch_q row survives."""
    env.process(AddRepo(D))
    recs = {f"app.bsky.feed.post/k{i:03d}": cid(f"o{i}") for i in range(10)}
    chunks = snapshot(D, env.fetch_key_of(D), rev(1), cid("A"), recs, chunk=3)
    env.process(chunks[0], chunks[1])
    assert env.state(D).state == "resyncing" and len(env.fetch_q()) == 1
    from store.db import close_all

    close_all()  # "crash" and restart
    env2 = Env(env.path)
    assert env2.state(D).state == "resyncing" and len(env2.fetch_q()) == 1
    fk = env2.fetch_key_of(D)
    recs2 = dict(recs)
    recs2["app.bsky.feed.post/k000"] = cid("changed")
    for ch in snapshot(D, fk, rev(2), cid("B"), recs2, chunk=3):
        assert env2.process(ch) == []
    st = env2.state(D)
    assert st.state == "active" and st.records == 10 and env2.records(D) == recs2
    acts = [(e["record"]["action"], e["record"]["rkey"]) for e in env2.outbox(D) if e["type"] == "record"]
    assert acts.count(("create", "k000")) == 1 and acts[-4:][0][0] in ("create", "update")
    assert ("update", "k000") in acts and len([a for a in acts if a[0] == "create"]) == 10


def test_stale_or_out_of_sequence_chunks_rejected(env):
    env.active_repo(D)
    out = env.process(*snapshot(D, fetch_key(PRIO_PENDING, 1, D), rev(2), cid("X"), {P1: cid("a")}))
    assert out[0].reason == "stale_fetch" and env.records(D) == {}
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(2), cid("B"))))
    chunks = snapshot(D, env.fetch_key_of(D), rev(2), cid("B"), {P1: cid("a"), P2: cid("b")}, chunk=1)
    out = env.process(chunks[1])
    assert out[0].reason == "chunk_out_of_sequence" and env.state(D).state == "desynchronized"


def test_snapshot_for_removed_repo_ignored(env):
    env.process(AddRepo(D))
    fk = env.fetch_key_of(D)
    env.process(RemoveRepo(D))
    assert env.process(*snapshot(D, fk, rev(1), cid("A"), {P1: cid("a")})) == []
    assert env.state(D) is None and env.records(D) == {} and env.outbox(D) == []


def test_add_and_snapshot_in_one_batch(env):
    fk = fetch_key(PRIO_PENDING, int(T0), D)
    out = env.process(AddRepo(D), *snapshot(D, fk, rev(1), cid("A"), {P1: cid("a")}))
    assert out == [] and env.state(D).state == "active" and env.fetch_q() == []
    assert env.counter("repos") == 1 and env.counter("records") == 1


# --------------------------------------------------------------------------- FetchStarted (Tap's claim)

def test_fetch_started_claims_pending_repo_as_resyncing(env):
    env.process(AddRepo(D))
    fk = env.fetch_key_of(D)
    assert env.start_fetch(D, handle="alice.test", key=KEY_B, pds="https://pds2.test") == []
    st = env.state(D)
    # /info shows resyncing; the identity is stored so live commits can be verified
    assert (st.state, st.signing_key, st.pds, st.handle, st.fetch_key) == \
        ("resyncing", KEY_B, "https://pds2.test", "alice.test", fk.hex())
    assert len(env.fetch_q()) == 1  # the request stays until its answer is applied
    evs = env.outbox(D)
    assert [e["type"] for e in evs] == ["identity"] and evs[0]["identity"]["handle"] == "alice.test"
    assert evs[0]["_flags"] == FLAG_IDENTITY


def test_commit_after_fetch_started_is_buffered_then_applied_live_after_the_snapshot(env):
    env.process(AddRepo(D))
    env.start_fetch(D)
    # one commit the snapshot will contain, one newer: both verified and buffered
    assert env.process(commit_item(D, rev(1), cid("0"), cid("A"), [op("create", P1, cid("a"))]),
                       commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P2, cid("b"))])) == []
    assert len(env.buffered(D)) == 2 and env.verifier.keys == [KEY_A, KEY_A]
    assert [e["type"] for e in env.outbox(D)] == ["identity"] and env.records(D) == {}
    assert env.sync_repo(D, rev(1), cid("A"), {P1: cid("a")}) == []
    st = env.state(D)
    assert (st.state, st.rev, st.prev_data, st.records, st.buffered) == ("active", rev(2), cid("B"), 2, 0)
    assert env.buffered(D) == [] and env.counter("resync_buf") == 0 and env.fetch_q() == []
    evs = env.outbox(D)
    assert [(e["type"], e.get("record", {}).get("rkey"), e.get("record", {}).get("live")) for e in evs] == [
        ("identity", None, None), ("record", "3k0000000001", False), ("record", "3k0000000002", True)]
    assert evs[2]["_flags"] == FLAG_LIVE


def test_commit_before_fetch_started_is_ignored(env):
    """Tap: pending repos ignore commits; BackfillSource only calls getRepo after the claim,
    so such a commit is in the snapshot."""
    env.process(AddRepo(D))
    env.process(commit_item(D, rev(1), None, cid("A"), [op("create", P1, cid("a"))]))
    assert env.buffered(D) == [] and env.verifier.calls == 0
    env.start_fetch(D)
    env.sync_repo(D, rev(1), cid("A"), {P1: cid("a")})
    assert env.state(D).state == "active" and env.records(D) == {P1: cid("a")}


def test_stale_fetch_started_is_ignored(env):
    # removed while the fetch was starting
    env.process(AddRepo(D))
    fk = env.fetch_key_of(D)
    env.process(RemoveRepo(D))
    assert env.process(fetch_started(D, fk)) == []
    assert env.state(D) is None and env.outbox(D) == [] and env.fetch_q() == []
    # an older request of a repo that has moved on (active, or waiting for a newer fetch)
    d2 = did(2)
    env.active_repo(d2, data=cid("A"), handle="alice.test")
    base = len(env.outbox(d2))
    old = fetch_key(PRIO_PENDING, int(T0) - 100, d2)
    assert env.process(fetch_started(d2, old, handle="mallory.test", key=KEY_B)) == []
    st = env.state(d2)
    assert (st.state, st.signing_key, st.handle) == ("active", KEY_A, "alice.test")
    env.process(FirehoseSync(seq=1, did=d2, body=sync_body(d2, rev(2), cid("Q"))))
    assert env.process(fetch_started(d2, old, handle="mallory.test", key=KEY_B)) == []
    st = env.state(d2)
    assert (st.state, st.signing_key, st.handle) == ("desynchronized", KEY_A, "alice.test")
    assert env.outbox(d2)[base:] == []
    assert env.logic.stats["fetch_started_stale"] == 3


def test_identity_event_once_per_first_sync_and_on_handle_change(env):
    env.process(AddRepo(D))
    env.start_fetch(D, handle="alice.test")
    env.sync_repo(D, rev(1), cid("A"), {P1: cid("a")}, handle="alice.test")
    assert [e["identity"]["handle"] for e in env.outbox(D) if e["type"] == "identity"] == ["alice.test"]
    # a resync: same handle, nothing; a new handle, one event (at the claim), none on the chunk
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(2), cid("Q"))))
    env.start_fetch(D, handle="alice.test")
    env.sync_repo(D, rev(2), cid("B"), {P1: cid("a")}, handle="alice.test")
    env.process(FirehoseSync(seq=2, did=D, body=sync_body(D, rev(3), cid("R"))))
    env.start_fetch(D, handle="bob.test")
    assert env.outbox(D)[-1]["identity"]["handle"] == "bob.test"
    env.sync_repo(D, rev(3), cid("C"), {P1: cid("a")}, handle="bob.test")
    assert [e["identity"]["handle"] for e in env.outbox(D) if e["type"] == "identity"] == ["alice.test", "bob.test"]


def test_fetch_started_then_failure(env):
    env.process(AddRepo(D))
    env.start_fetch(D)
    env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P2, cid("b"))]))
    fail(env, D, "failed to get repo: boom")
    st = env.state(D)
    assert (st.state, st.error, st.retries) == ("error", "failed to get repo: boom", 1)
    # the identity stays: commits keep being buffered until the retry's snapshot
    env.process(commit_item(D, rev(3), cid("B"), cid("C"), [op("create", P3, cid("c"))]))
    assert len(env.buffered(D)) == 2
    env.clock.t += 3600
    env.start_fetch(D)
    env.sync_repo(D, rev(1), cid("A"), {})
    st = env.state(D)
    assert (st.state, st.rev, st.records, st.buffered) == ("active", rev(3), 2, 0)


@pytest.mark.parametrize("refetch_claims", [True, False])
def test_crash_after_fetch_started_fetches_again(env, refetch_claims):
    """State ``resyncing`` survives a crash together with the fetch_q row: BackfillSource
    fetches again; commits meanwhile are buffered (the identity is stored); the next
    FetchStarted (or directly the first chunk) proceeds."""
    env.process(AddRepo(D))
    fk = env.fetch_key_of(D)
    env.start_fetch(D)
    env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P2, cid("b"))]))
    from store.db import close_all

    close_all()  # "crash" and restart
    env2 = Env(env.path)
    st = env2.state(D)
    assert st.state == "resyncing" and st.fetch_key == fk.hex() and st.signing_key == KEY_A
    assert [r[2] for r in env2.fetch_q()] == [D] and len(env2.buffered(D)) == 1
    env2.process(commit_item(D, rev(3), cid("B"), cid("C"), [op("create", P3, cid("c"))]))
    assert len(env2.buffered(D)) == 2
    if refetch_claims:
        assert env2.start_fetch(D) == []
        assert env2.state(D).state == "resyncing"
    assert env2.sync_repo(D, rev(1), cid("A"), {P1: cid("a")}) == []
    st = env2.state(D)
    assert (st.state, st.rev, st.records, st.buffered) == ("active", rev(3), 3, 0) and env2.fetch_q() == []
    assert len([e for e in env2.outbox(D) if e["type"] == "identity"]) == 1


# --------------------------------------------------------------------------- §14 resync 36-45

def fail(env, d, error="something went wrong", rate_limited=False):
    return env.process(FetchFailed(did=d, fetch_key=env.fetch_key_of(d), error=error, rate_limited=rate_limited))


def test_36_38_claim_order_is_fetch_key_order(env):
    assert env.fetch_q() == []  # 38
    env.active_repo(did(2))
    env.process(AddRepo(did(3)))
    fail(env, did(3))  # error
    env.process(FirehoseSync(seq=1, did=did(2), body=sync_body(did(2), rev(5), cid("new"))))  # desync
    env.process(AddRepo(did(1)))  # pending, added last
    assert [(p, d) for p, _, d, _ in env.fetch_q()] == [(PRIO_PENDING, did(1)), (PRIO_DESYNC, did(2)),
                                                        (PRIO_ERROR, did(3))]


def test_37_39_failure_sets_error_and_backoff(env):
    env.process(AddRepo(D))
    assert fail(env, D) == []
    st = env.state(D)
    assert (st.state, st.error, st.retries) == ("error", "something went wrong", 1)
    assert st.retry_after == int(T0 + 60 * 1.5)
    assert [(p, nb) for p, nb, _, _ in env.fetch_q()] == [(PRIO_ERROR, st.retry_after)]  # not before retry_after


def test_40_rate_limited_is_desynchronized_without_error(env):
    env.process(AddRepo(D))
    fail(env, D, error="429", rate_limited=True)
    st = env.state(D)
    assert (st.state, st.error, st.retries) == ("desynchronized", "", 1) and st.retry_after > T0
    assert [p for p, *_ in env.fetch_q()] == [PRIO_DESYNC]


def test_41_consecutive_failures_back_off_and_success_resets(env):
    env.process(AddRepo(D))
    afters = []
    for i in range(1, 5):
        fail(env, D)
        st = env.state(D)
        assert st.retries == i
        afters.append(st.retry_after)
        assert len(env.fetch_q()) == 1  # old request replaced
    assert afters == sorted(afters) and len(set(afters)) == 4
    assert [a - int(T0) for a in afters] == [int(60 * (2 ** c + 0.5)) for c in range(4)]
    env.sync_repo(D, rev(1), cid("A"), {})
    st = env.state(D)
    assert (st.state, st.retries, st.retry_after, st.error) == ("active", 0, 0, "")


def test_backoff_exponent_capped():
    assert retry_backoff(0, 0.0) == 60.0
    assert retry_backoff(5, 0.0) == 60 * 32
    assert retry_backoff(6, 0.0) == retry_backoff(63, 0.0) == retry_backoff(10**6, 0.0) == 3600.0
    assert retry_backoff(10**9, 0.999) < 3661


def test_backoff_no_overflow_after_many_failures(env):
    env.process(AddRepo(D))
    st = env.state(D)
    # jump straight to a huge retry count
    from operators.repo import RepoState

    raw = RepoState(**{**{f: getattr(st, f) for f in st.__slots__}, "retries": 10_000}).to_json()
    env.db.cf("repos")[D.encode()] = raw
    env.logic.states.clear()  # written behind RepoLogic's back: not what it remembers
    fail(env, D)
    st = env.state(D)
    assert st.retries == 10_001 and st.retry_after == int(T0 + 60 * 60.5)


def test_fetch_failed_for_removed_repo_ignored(env):
    env.process(AddRepo(D))
    fk = env.fetch_key_of(D)
    env.process(RemoveRepo(D))
    assert env.process(FetchFailed(did=D, fetch_key=fk, error="x")) == []
    assert env.state(D) is None and env.fetch_q() == []


def test_fetch_failed_mid_snapshot(env):
    env.process(AddRepo(D))
    chunks = snapshot(D, env.fetch_key_of(D), rev(1), cid("A"), {P1: cid("a"), P2: cid("b")}, chunk=1)
    env.process(chunks[0])
    fail(env, D, "connection reset")
    st = env.state(D)
    assert st.state == "error" and st.snap_pos == "" and st.records == 1
    # the retry completes; the record already applied is not re-emitted
    env.clock.t = st.retry_after + 1
    env.sync_repo(D, rev(1), cid("A"), {P1: cid("a"), P2: cid("b")})
    creates = [e["record"]["rkey"] for e in env.outbox(D) if e["type"] == "record"]
    assert sorted(creates) == ["3k0000000001", "3k0000000002"]


def buffered_commit(env, d, r, prev, data, ops):
    return env.process(commit_item(d, r, prev, data, ops))


def desynced_repo(env, data="A", r=1):
    """An active repo (rev r, prev_data data) that a #sync has just desynchronized."""
    env.active_repo(D, r=rev(r), data=cid(data))
    env.process(FirehoseSync(seq=1, did=D, body=sync_body(D, rev(r + 1), cid("other"))))
    assert env.state(D).state == "desynchronized"


def test_43_drain_basic(env):
    desynced_repo(env)
    buffered_commit(env, D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])
    assert len(env.buffered(D)) == 1
    base = len(env.outbox(D))
    env.sync_repo(D, rev(1), cid("A"), {})
    st = env.state(D)
    assert env.buffered(D) == [] and (st.rev, st.prev_data, st.records, st.buffered) == (rev(2), cid("B"), 1, 0)
    evs = env.outbox(D)[base:]
    assert len(evs) == 1 and evs[0]["record"]["live"] is True and evs[0]["_flags"] == FLAG_LIVE
    assert env.counter("resync_buf") == 0


def test_44_drain_mismatch_is_a_gap(env):
    desynced_repo(env)
    buffered_commit(env, D, rev(3), cid("X"), cid("Y"), [op("create", P1, cid("a"))])
    env.sync_repo(D, rev(2), cid("B"), {})
    st = env.state(D)
    # Tap: row stays, repo active at rev2. tapflow: row stays, and the gap sends the repo back to resync
    assert len(env.buffered(D)) == 1 and st.rev == rev(2) and st.prev_data == cid("B")
    assert st.state == "desynchronized" and [p for p, *_ in env.fetch_q()] == [PRIO_DESYNC]
    # the next snapshot contains the commit: the row goes, nothing is lost
    env.sync_repo(D, rev(3), cid("Y"), {P1: cid("a")})
    assert env.buffered(D) == [] and env.state(D).state == "active" and env.records(D) == {P1: cid("a")}


def test_45_drain_chain(env):
    desynced_repo(env)
    buffered_commit(env, D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])
    buffered_commit(env, D, rev(3), cid("B"), cid("C"), [op("create", P2, cid("b"))])
    env.sync_repo(D, rev(1), cid("A"), {})
    st = env.state(D)
    assert (st.rev, st.prev_data, st.records) == (rev(3), cid("C"), 2) and env.buffered(D) == []


def test_drain_deletes_commits_contained_in_snapshot_and_zero_op_commits(env):
    desynced_repo(env)
    buffered_commit(env, D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])
    buffered_commit(env, D, rev(3), cid("B"), cid("C"), [])  # zero ops (filtered)
    buffered_commit(env, D, rev(4), cid("C"), cid("D"), [op("create", P2, cid("b"))])
    base = len(env.outbox(D))
    env.sync_repo(D, rev(2), cid("B"), {P1: cid("a")})  # the snapshot already has rev2
    st = env.state(D)
    assert env.buffered(D) == [] and (st.rev, st.prev_data, st.state) == (rev(4), cid("D"), "active")
    evs = env.outbox(D)[base:]
    # the snapshot's own create (historical), then only the commit after it (live)
    assert [(e["record"]["rkey"], e["record"]["live"]) for e in evs] == [("3k0000000001", False),
                                                                         ("3k0000000002", True)]


def test_drain_legacy_commit_applied_only_if_newer(env):
    desynced_repo(env)
    buffered_commit(env, D, rev(2), None, cid("B"), [op("create", P1, cid("a"))])
    buffered_commit(env, D, rev(4), None, cid("D"), [op("create", P2, cid("b"))])
    env.sync_repo(D, rev(3), cid("C"), {})
    assert env.records(D) == {P2: cid("b")} and env.state(D).rev == rev(4) and env.buffered(D) == []


def test_buffer_in_resyncing_error_and_desync_but_not_pending(env):
    env.process(AddRepo(D))
    env.process(commit_item(D, rev(1), None, cid("x"), []))
    assert env.buffered(D) == []  # pending: ignored
    env.active_repo(did(2), data=cid("A"))
    d2 = did(2)
    env.process(FirehoseSync(seq=1, did=d2, body=sync_body(d2, rev(2), cid("Q"))))
    env.process(FetchFailed(did=d2, fetch_key=env.fetch_key_of(d2), error="boom"))
    assert env.state(d2).state == "error"
    buffered_commit(env, d2, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])
    buffered_commit(env, d2, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])  # replay: skipped
    assert len(env.buffered(d2)) == 1
    chunks = snapshot(d2, env.fetch_key_of(d2), rev(1), cid("A"), {}, chunk=1)
    chunks2 = snapshot(d2, env.fetch_key_of(d2), rev(1), cid("A"), {P2: cid("z"), P3: cid("y")}, chunk=1)
    env.process(chunks2[0])
    assert env.state(d2).state == "resyncing"
    buffered_commit(env, d2, rev(3), cid("B"), cid("C"), [op("create", P3 + "x", cid("c"))])
    assert len(env.buffered(d2)) == 2
    env.process(chunks2[1])
    st = env.state(d2)
    assert st.state == "active" and st.rev == rev(3) and env.buffered(d2) == [] and st.records == 4
    del chunks


def test_buffer_cap(tmp_path):
    env = make_env(tmp_path)
    env.logic = env.make_logic(max_buffered=2)
    desynced_repo(env)
    for i in range(2, 5):
        out = buffered_commit(env, D, rev(i), cid(f"s{i - 1}"), cid(f"s{i}"), [])
    assert [r.reason for r in out] == ["resync_buffer_full"] and len(env.buffered(D)) == 2


def test_commit_and_last_chunk_in_one_batch(env):
    desynced_repo(env)
    chunks = snapshot(D, env.fetch_key_of(D), rev(1), cid("A"), {})
    out = env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))]), *chunks,
                      commit_item(D, rev(3), cid("B"), cid("C"), [op("create", P2, cid("b"))]))
    assert out == []
    st = env.state(D)
    assert (st.state, st.rev, st.records, st.buffered) == ("active", rev(3), 2, 0) and env.buffered(D) == []
    assert env.counter("resync_buf") == 0 and env.counter("records") == 2


# --------------------------------------------------------------------------- ids, atomicity, adapter

def test_ids_strictly_increase_across_reopen(tmp_path):
    env = make_env(tmp_path)
    env.active_repo(D, records={P1: cid("a")})
    first = [e["_id"] for e in env.outbox()]
    from store.db import close_all

    close_all()
    env2 = Env(env.path)
    env2.active_repo(did(2), records={P2: cid("b")})
    second = [e["_id"] for e in env2.outbox(did(2))]
    assert min(second) > max(first)
    s = shard_of(D, 4)
    same_shard = [e["_id"] for e in env2.outbox() if e["_shard"] == s]
    assert same_shard == sorted(same_shard)


def test_one_writebatch_failing_write_leaves_nothing(env, monkeypatch):
    env.active_repo(D, data=cid("A"))
    before = (env.state(D), env.records(D), env.outbox(), env.fetch_q(), env.counter("records"))

    def boom(batch, sync=False):
        raise StoreError("disk full")

    monkeypatch.setattr(env.db, "write", boom)
    with pytest.raises(StoreError):
        env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))]),
                    AddRepo(did(2)), account(False, "deactivated"))
    monkeypatch.undo()
    assert (env.state(D), env.records(D), env.outbox(), env.fetch_q(), env.counter("records")) == before
    assert env.state(did(2)) is None
    # nothing cached: the same input then applies normally
    assert env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a"))])) == []
    assert env.state(D).rev == rev(2) and env.records(D) == {P1: cid("a")}


def test_write_is_a_single_batch(env, monkeypatch):
    env.active_repo(D, data=cid("A"))
    writes = []
    real = env.db.write
    monkeypatch.setattr(env.db, "write", lambda b, sync=False: (writes.append(b.len()), real(b, sync)))
    env.process(commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a")), op("create", P2, cid("b"))]),
                AddRepo(did(2)), FirehoseIdentity(seq=3, did=D, handle=None))
    assert len(writes) == 1 and writes[0] > 5


def test_state_cache_is_bounded_and_forgets_deleted_repos():
    from operators.repo import RepoState, StateCache

    c = StateCache(size=2)
    a, b, x = RepoState(rev="a"), RepoState(rev="b"), RepoState(rev="x")
    c.written({"a": a, "b": b})
    c.written({"x": x})  # the young generation was full: it became the old one
    assert (c.get("a"), c.get("x")) == (a, x) and len(c.young) + len(c.old) <= 4
    c.written({"a": None})
    assert c.get("a") is None and c.get("b") in (None, b)
    c.written({f"d{i}": RepoState() for i in range(10)})
    assert len(c.young) + len(c.old) <= 4


def test_item_failing_half_way_is_rolled_back(env):
    env.active_repo(D, data=cid("A"))
    bad = op("create", P2, "not-a-cid")
    out = env.process(
        commit_item(D, rev(2), cid("A"), cid("B"), [op("create", P1, cid("a")), bad]),
        AddRepo(did(2)),
    )
    assert [r.reason for r in out] == ["internal_error"]
    st = env.state(D)
    assert (st.rev, st.records) == (rev(1), 0) and env.records(D) == {}
    assert env.logic.states.get(D) == st  # the state RepoLogic remembers is the row, not the half-applied copy
    assert [e for e in env.outbox(D) if e["type"] == "record"] == []
    assert env.state(did(2)).state == "pending" and env.counter("records") == 0 and env.counter("repos") == 2


def test_wakeups_called(env):
    calls = []
    env.logic = env.make_logic(on_fetch_queued=lambda: calls.append("fetch"), on_events=lambda: calls.append("events"))
    env.process(AddRepo(D))
    assert calls == ["fetch"]
    env.sync_repo(D, rev(1), cid("A"), {P1: cid("a")})
    assert calls[-1] == "events"


def test_bytewax_adapter_runs_in_a_dataflow(tmp_path):
    import bytewax.operators as op_
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    from operators.repo import repo_logic_builder

    env = make_env(tmp_path)
    verifier = env.verifier
    items = [AddRepo(did(i)) for i in range(10)] + [AddRepo("bogus")]
    flow = Dataflow("t")
    s = op_.input("in", flow, TestingSource(items))
    keyed = op_.key_on("k", s, lambda it: str(shard_of(it.did, env.cfg.shards)) if isinstance(it.did, str) else "0")
    out = op_.stateful_batch("repo", keyed, repo_logic_builder(env.cfg, db=env.db, ids=env.ids,
                                                               verify_commit=verifier.commit, verify_sync=verifier.sync))
    got: list = []
    op_.output("out", op_.key_rm("u", out), TestingSink(got))
    run_main(flow)
    assert [type(r) for r in got] == [Rejected] and got[0].reason == "bad_did"
    assert all(env.state(did(i)).state == "pending" for i in range(10))
    assert env.counter("repos") == 10 and len(env.fetch_q()) == 10


def test_dataflow_key_makes_a_batch_of_many_shards_one_write(tmp_path, monkeypatch):
    """``flows.dataflow`` keys every item alike: a bytewax batch of items of many shards is ONE
    RepoLogic call and ONE WriteBatch (a key per shard cost one RocksDB write per shard), and
    each shard's counters and applied marks still come out right."""
    import bytewax.operators as op_
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    from flows.dataflow import _one_key
    from operators.repo import repo_logic_builder

    env = make_env(tmp_path)
    items = [AddRepo(did(i), seq=i + 1) for i in range(20)]
    assert len({shard_of(it.did, env.cfg.shards) for it in items}) == env.cfg.shards
    writes: list[int] = []
    real = env.db.write
    monkeypatch.setattr(env.db, "write", lambda b, sync=False: (writes.append(b.len()), real(b, sync)))
    flow = Dataflow("t")
    s = op_.input("in", flow, TestingSource(items, batch_size=len(items)))
    out = op_.stateful_batch("repo", op_.key_on("k", s, _one_key),
                             repo_logic_builder(env.cfg, db=env.db, ids=env.ids))
    got: list = []
    op_.output("out", op_.key_rm("u", out), TestingSink(got))
    run_main(flow)
    assert got == [] and len(writes) == 1
    assert env.counter("repos") == 20 and len(env.fetch_q()) == 20
    for sh in range(env.cfg.shards):
        assert env.cmd_applied(sh) == max(it.seq for it in items if shard_of(it.did, env.cfg.shards) == sh)


def test_counters_stay_right_across_batches_and_a_failed_write(env, monkeypatch):
    """RepoLogic remembers the counters it wrote (no read per activation): the sums stay exact
    over many batches, and a write that failed leaves nothing remembered."""
    for i in range(6):
        env.process(AddRepo(did(i)))
    assert env.counter("repos") == 6

    def boom(batch, sync=False):
        raise StoreError("disk full")

    monkeypatch.setattr(env.db, "write", boom)
    with pytest.raises(StoreError):
        env.process(AddRepo(did(10)), AddRepo(did(11)))
    monkeypatch.undo()
    env.process(RemoveRepo(did(0)), AddRepo(did(12)))
    assert env.counter("repos") == 6
    assert env.make_logic().process([AddRepo(did(13))]) == []  # a new logic reads them back
    assert env.counter("repos") == 7


def test_repo_state_json_roundtrip_tolerates_unknown_fields(env):
    from operators.repo import RepoState

    st = RepoState(handle="a.test", records=3)
    d = orjson.loads(st.to_json())
    d["future_field"] = 1
    assert RepoState.from_json(orjson.dumps(d)) == st


def test_repo_state_json_roundtrip_any_field_order_or_missing_fields():
    """``from_json`` reads what ``to_json`` wrote positionally; rows with their fields in another
    order, or without newer fields (older versions), still land in the right fields."""
    from dataclasses import fields

    from operators.repo import RepoState

    st = RepoState(**{f.name: (7 + i if f.type == "int" else f"v{i}") for i, f in enumerate(fields(RepoState))})
    assert RepoState.from_json(st.to_json()) == st
    d = orjson.loads(st.to_json())
    assert RepoState.from_json(orjson.dumps(dict(reversed(d.items())))) == st
    del d["snap_pos"], d["buf_rev"]
    old = RepoState.from_json(orjson.dumps(d))
    assert (old.snap_pos, old.buf_rev, old.buf_next, old.state) == ("", "", st.buf_next, st.state)


# --------------------------------------------------------------------------- real signed commits

def _real_env(tmp_path, **cfg):
    """An Env whose RepoLogic uses the real verifier (protocol.commit + protocol.keys)."""
    pytest.importorskip("protocol.commit")
    gen = pytest.importorskip("bench.gen")
    env = make_env(tmp_path, **cfg)
    env.logic = __import__("operators.repo", fromlist=["RepoLogic"]).RepoLogic(
        env.db, env.cfg, env.ids, clock=env.clock, rand=lambda: 0.5)
    return env, gen


def _backfill(env, sim):
    from protocol.cid import cid_to_str

    env.process(AddRepo(sim.did))
    recs = {p: cid_to_str(c) for p, c in sim.records.items()}
    out = env.sync_repo(sim.did, sim.rev, cid_to_str(sim.data_cid), recs,
                        key=sim.key.public_key.multibase(), handle="real.test")
    assert out == []


def test_real_signed_commits_applied_and_forgeries_desync(tmp_path):
    env, gen = _real_env(tmp_path)
    import random

    from protocol import cbor
    from protocol.cid import cid_to_str

    sim = gen.RepoSim.create(n_records=20, seed=3)
    _backfill(env, sim)
    rng = random.Random(5)
    base = len(env.outbox(sim.did))
    for i in range(15):
        ev = sim.commit(gen.random_writes(sim, rng))
        assert env.process(FirehoseCommit(seq=i + 1, did=sim.did, body=ev.decoded())) == []
    st = env.state(sim.did)
    assert (st.state, st.rev, st.prev_data) == ("active", sim.rev, cid_to_str(sim.data_cid))
    assert env.records(sim.did) == {p: cid_to_str(c) for p, c in sim.records.items()}
    live = env.outbox(sim.did)[base:]
    assert live and all(e["record"]["live"] is True and e["_flags"] == FLAG_LIVE for e in live)
    creates = [e["record"] for e in live if e["record"]["action"] == "create"]
    assert creates and all("$type" in r["record"] and "cid" in r for r in creates)

    # a replayed commit is skipped before verification; a forged one is rejected and desyncs
    ev = sim.commit(gen.random_writes(sim, rng))
    body = ev.decoded()
    other = gen.RepoSim.create(n_records=0, seed=99, did=sim.did)  # same DID, wrong key
    other.micros = sim.micros + 10**9  # and a newer rev, so it is not skipped as a replay
    forged = other.commit([("create", "app.bsky.feed.post/3kforged00001", cbor.encode({"$type": "x"}))]).decoded()
    out = env.process(FirehoseCommit(seq=100, did=sim.did, body=forged))
    assert [r.reason for r in out] == ["verify_failed"] and out[0].extra["verify"] in ("bad_signature", "invalid")
    assert env.state(sim.did).state == "desynchronized"
    # while desynchronized, genuine commits are verified and buffered, then drained after the snapshot
    assert env.process(FirehoseCommit(seq=101, did=sim.did, body=body)) == []
    assert len(env.buffered(sim.did)) == 1
    snap_rev, snap_data = sim.rev, sim.data_cid  # the PDS snapshot already includes it
    env.sync_repo(sim.did, snap_rev, cid_to_str(snap_data), {p: cid_to_str(c) for p, c in sim.records.items()},
                  key=sim.key.public_key.multibase(), handle="real.test")
    assert env.buffered(sim.did) == [] and env.state(sim.did).rev == sim.rev


def test_real_sync_event(tmp_path):
    env, gen = _real_env(tmp_path)
    sim = gen.RepoSim.create(n_records=3, seed=4)
    _backfill(env, sim)
    assert env.process(FirehoseSync(seq=1, did=sim.did, body=sim.sync_body())) == []  # same state: replay
    sim.commit(gen.random_writes(sim))  # a commit the firehose never showed us
    assert env.process(FirehoseSync(seq=2, did=sim.did, body=sim.sync_body())) == []
    assert env.state(sim.did).state == "desynchronized"


def test_real_commit_filtered_ops_not_converted(tmp_path):
    env, gen = _real_env(tmp_path, collection_filters=("app.bsky.feed.post",))
    from protocol import cbor

    sim = gen.RepoSim.create(n_records=0, seed=7)
    _backfill(env, sim)
    ev = sim.commit([("create", "app.bsky.graph.follow/3kaaaaaaaaaa2", cbor.encode({"$type": "app.bsky.graph.follow"})),
                     ("create", "app.bsky.feed.post/3kaaaaaaaaaa3", cbor.encode({"$type": "app.bsky.feed.post"}))])
    assert env.process(FirehoseCommit(seq=1, did=sim.did, body=ev.decoded())) == []
    assert list(env.records(sim.did)) == ["app.bsky.feed.post/3kaaaaaaaaaa3"]
    assert env.state(sim.did).rev == sim.rev


# --------------------------------------------------------------------------- randomized model check

class _Truth:
    """What the PDS holds for one repo: records, root, rev."""

    def __init__(self, d: str) -> None:
        self.did = d
        self.recs: dict[str, str] = {}
        self.n = 1
        self.root = cid(f"{d}-root-0")

    def write(self, rng) -> tuple[str, str, str, list]:
        ops = []
        for _ in range(rng.randint(0, 3)):
            r = rng.random()
            colls = ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow")
            if r < 0.6 or not self.recs:
                p = f"{rng.choice(colls)}/k{rng.randrange(60):03d}"
                if p in self.recs or any(o.path == p for o in ops):
                    continue
                c = cid(f"{p}-{rng.random()}")
                ops.append(op("create", p, c))
                self.recs[p] = c
            elif r < 0.8:
                p = rng.choice(sorted(self.recs))
                if any(o.path == p for o in ops):
                    continue
                c = cid(f"{p}-{rng.random()}")
                ops.append(op("update", p, c))
                self.recs[p] = c
            else:
                p = rng.choice(sorted(self.recs))
                if any(o.path == p for o in ops):
                    continue
                ops.append(op("delete", p))
                del self.recs[p]
        prev = self.root
        self.n += 1
        self.root = cid(f"{self.did}-root-{self.n}")
        return rev(self.n), prev, self.root, ops


def _check_invariants(env, dids):
    from store.db import prefix_items

    repos = recs = bufs = 0
    for d in dids:
        st = env.state(d)
        assert env.logic.states.get(d) in (None, st), d  # what RepoLogic remembers is the row
        rows = env.records(d)
        buf = env.buffered(d)
        if st is None:
            assert rows == {} and buf == []
            continue
        repos += 1
        recs += len(rows)
        bufs += len(buf)
        assert st.records == len(rows), (d, st)
        assert st.buffered == len(buf), (d, st)
        repo_rows = [r for r in env.fetch_q() if r[2] == d and r[3]["kind"] == "repo"]
        if st.state == "active":
            assert not st.fetch_key and repo_rows == []
        else:
            assert len(repo_rows) == 1 and fetch_key(*repo_rows[0][:3]).hex() == st.fetch_key, (d, st, repo_rows)
    assert (env.counter("repos"), env.counter("records"), env.counter("resync_buf")) == (repos, recs, bufs)
    assert env.counter("outbox") == len(list(prefix_items(env.db.cf("outbox"), b"")))


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_keep_invariants_and_events_rebuild_the_repo(tmp_path, seed):
    import random

    rng = random.Random(seed)
    filters = ("app.bsky.feed.*",) if seed % 3 == 0 else ()
    env = make_env(tmp_path, collection_filters=filters)
    dids = [did(i) for i in range(4)]
    truth = {d: _Truth(d) for d in dids}
    reset_after: dict[str, int] = {d: 0 for d in dids}  # consumer restarts a DID after a removal
    keep = env.logic.filter
    pending_chunks: dict[str, list] = {}

    def last_id():
        ids = [e["_id"] for e in env.outbox(internal=True)]
        return max(ids) if ids else 0

    for step in range(250):
        d = rng.choice(dids)
        t = truth[d]
        r = rng.random()
        batch = []
        if r < 0.08:
            batch.append(AddRepo(d, seq=step + 1))
        elif r < 0.11:
            batch.append(RemoveRepo(d, seq=step + 1))
            pending_chunks.pop(d, None)
        elif r < 0.55:
            rv, prev, root, ops = t.write(rng)
            item = commit_item(d, rv, prev, root, ops, seq=step)
            if rng.random() < 0.1:
                continue  # the firehose lost it (gap): continuity must catch it later
            batch.append(item)
            if rng.random() < 0.1:
                batch.append(item)  # replayed
        elif r < 0.62:
            batch.append(FirehoseSync(seq=step, did=d, body=sync_body(d, rev(t.n), t.root)))
        else:
            st = env.state(d)
            if st is None or not st.fetch_key:
                continue
            if d not in pending_chunks:
                fk = bytes.fromhex(st.fetch_key)
                if rng.random() < 0.8:  # the claim: BackfillSource is about to call getRepo
                    batch.append(fetch_started(d, fk))
                    if rng.random() < 0.1:  # a stale claim (an older request) is ignored
                        batch.append(fetch_started(d, fetch_key(PRIO_PENDING, 1, d), key=KEY_B))
                pending_chunks[d] = snapshot(d, fk, rev(t.n), t.root,
                                             {p: c for p, c in t.recs.items() if keep.path_matches(p)},
                                             chunk=rng.randint(1, 8))
                if batch and rng.random() < 0.5:
                    env.process(*batch)  # live commits may arrive between the claim and the snapshot
                    _check_invariants(env, dids)
                    continue
            chunks = pending_chunks[d]
            if rng.random() < 0.1:
                batch.append(FetchFailed(did=d, fetch_key=chunks[0].fetch_key, error="boom",
                                         rate_limited=rng.random() < 0.5))
                del pending_chunks[d]
                env.clock.t += 10_000  # past any backoff
            else:
                k = rng.randint(1, len(chunks))
                batch.extend(chunks[:k])
                del chunks[:k]
                if not chunks:
                    del pending_chunks[d]
        before = last_id()
        out = env.process(*batch)
        assert [x for x in out if x.reason not in ("stale_fetch",)] == [], out
        if isinstance(batch[0], RemoveRepo):
            reset_after[d] = before
        _check_invariants(env, dids)

    # heal: resync every repo, with one more live commit arriving while it resyncs
    for d in dids:
        if env.state(d) is None:
            env.process(AddRepo(d))
        pending_chunks.pop(d, None)
        t = truth[d]
        if env.state(d).state == "active":
            env.process(FirehoseSync(seq=10**6, did=d, body=sync_body(d, rev(t.n + 1), cid("force"))))
        rv, prev, root, ops = t.write(rng)
        env.process(commit_item(d, rv, prev, root, ops))
        assert env.state(d).fetch_key
    # answer with snapshots taken *before* the last commit where possible, so the drain applies it
    for d in dids:
        t = truth[d]
        st = env.state(d)
        # rebuild the pre-commit state from the buffered commit
        buf = env.buffered(d)
        pre = dict(t.recs)
        if buf and buf[-1]["rev"] == rev(t.n):
            for o in buf[-1]["ops"]:
                p = f"{o['collection']}/{o['rkey']}"
                pre.pop(p, None)
            pre_root, pre_rev = buf[-1]["prev_data"], rev(t.n - 1)
            # ops of the last commit we cannot undo exactly (updates/deletes): use the true
            # post-state instead, which the drain then skips as contained in the snapshot
            if any(o["action"] != "create" for o in buf[-1]["ops"]):
                pre, pre_root, pre_rev = dict(t.recs), t.root, rev(t.n)
        else:
            pre_root, pre_rev = t.root, rev(t.n)
        env.process(*snapshot(d, bytes.fromhex(st.fetch_key), pre_rev, pre_root,
                              {p: c for p, c in pre.items() if keep.path_matches(p)}, chunk=3))
        st = env.state(d)
        assert st.state == "active", (d, st)
        assert (st.rev, st.prev_data) == (rev(t.n), t.root)
        want = {p: c for p, c in t.recs.items() if keep.path_matches(p)}
        assert env.records(d) == want
        # a consumer applying the events (after the last removal) holds exactly the repo
        seen: dict[str, str] = {}
        for e in env.outbox(d):
            if e["_id"] <= reset_after[d] or e["type"] != "record":
                continue
            rec = e["record"]
            p = f"{rec['collection']}/{rec['rkey']}"
            if rec["action"] == "delete":
                seen.pop(p, None)
            else:
                seen[p] = rec["cid"]
        assert seen == want, d
    _check_invariants(env, dids)
    stats = env.logic.stats
    assert stats["commit_applied"] and stats["desynchronized"] and stats["commit_buffered"], stats
    assert stats["fetch_started"], stats


def test_rocksdb_read_failure_is_a_store_error_not_a_rejection(env, monkeypatch):
    env.active_repo(D)

    class Broken:
        def get(self, key):
            raise Exception("IO error: read failed")  # what rocksdict raises

    real_cf = env.db.cf
    monkeypatch.setattr(env.db, "cf", lambda name: Broken() if name == "repos" else real_cf(name))
    env.logic.states.clear()  # the state RepoLogic remembers would spare it the read
    with pytest.raises(StoreError):
        env.process(account(False, "deactivated"))


def test_outbox_counter_vector_repeats_the_per_shard_counters(env):
    """RepoLogic writes every shard's outbox counter again as one value (``META_OUTBOX_COUNTS``,
    what the delivery child reads per step), in the batch that moves them; a new logic (a
    restart) fills in the shards it has not written from the database."""
    import struct

    from store.layout import META_OUTBOX_COUNTS, meta_counter

    def per_shard() -> list[int]:
        return [int.from_bytes(env.db.cf("meta").get(meta_counter("outbox", s)) or b"", "big")
                for s in range(env.cfg.shards)]

    def vector() -> list[int]:
        return list(struct.unpack(">%dQ" % env.cfg.shards, env.db.cf("meta").get(META_OUTBOX_COUNTS)))

    import operators.repo as repo_mod

    assert env.db.cf("meta").get(META_OUTBOX_COUNTS) is None
    env.active_repo(did(1), records={P1: cid("a")})
    assert vector() == per_shard() and sum(per_shard()) >= 2
    repo_mod._known.clear()  # a new process: nothing remembered
    env.logic = env.make_logic()
    env.active_repo(did(2), records={P1: cid("b"), P2: cid("c")})
    assert shard_of(did(1), 4) != shard_of(did(2), 4)
    assert vector() == per_shard()  # did(1)'s shard, not written since the restart, read back
    # two logics on one handle (a bytewax key per shard makes one per shard) see each other
    other = env.make_logic()
    other.process([commit_item(did(1), rev(2), cid("root-" + rev(1)), cid("B"), [op("create", P2, cid("d"))])])
    assert vector() == per_shard()
    env.process(commit_item(did(2), rev(2), cid("root-" + rev(1)), cid("C"), [op("create", P3, cid("e"))]))
    assert env.state(did(1)).rev == env.state(did(2)).rev == rev(2)  # both commits applied
    assert vector() == per_shard()


def test_a_large_activation_is_applied_in_bounded_calls(env):
    """Under one bytewax key an activation can hold a whole /repos/add (50,000 DIDs): it is
    applied ``MAX_ITEMS_PER_CALL`` items at a time (peak memory), every item, in order."""
    from operators.repo import MAX_ITEMS_PER_CALL, RepoLogicBatch

    calls = []
    process = env.logic.process
    env.logic.process = lambda items: calls.append(len(items)) or process(items)
    dids = [f"did:plc:bulk{i:020d}" for i in range(2 * MAX_ITEMS_PER_CALL + 10)]
    out, retain = RepoLogicBatch(env.logic).on_batch([AddRepo(d) for d in dids] + [object()])
    assert calls == [MAX_ITEMS_PER_CALL, MAX_ITEMS_PER_CALL, 11]
    assert [r.reason for r in out] == ["unknown_item"] and retain == RepoLogicBatch.RETAIN
    assert env.counter("repos") == len(dids) and env.state(dids[-1]).state == "pending"
