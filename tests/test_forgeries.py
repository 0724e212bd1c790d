"""Forged input against RepoLogic with the real verifier and a real RocksDB.

Each forgery is (1) rejected, (2) counted (a ``Rejected`` with its reason, which the rejection
sink logs with the DID and counts in ``tapflow_rejected_total``; replays, which Tap drops
silently, in ``RepoLogic.stats``), and (3) leaves the repo state correct: no record changed, no
record event, rev and MST root untouched. A verification failure on an active repo marks it
desynchronized (tapflow's rule, so key rotations heal); the test then lets the snapshot and the
genuine commits through and checks the repo ends exactly where the PDS is.

Forgeries: a commit signed by the wrong key; a valid signature over a different MST (the signed
``data`` swapped, or a genuine commit block shipped with another tree); ops that do not match the
proof (cid swapped, op injected with and without ``prev``, op dropped, action relabelled, path
moved); a replayed old commit (as is, and with its event rev bumped); a ``#sync`` that rolls
back (older rev, also under a newer event rev) or is signed by the wrong key; a CAR whose blocks
hash to other CIDs; the commit or repo of another DID; a DID document whose handle points
elsewhere (bidirectional verification gives ``handle.invalid``).
"""

from __future__ import annotations

import logging
import random

import cbrrr
import pytest
from prometheus_client import REGISTRY

from bench.gen import RepoSim
from operators.items import (
    AddRepo,
    FirehoseCommit,
    FirehoseIdentity,
    FirehoseSync,
    IdentityRefreshed,
    Rejected,
    ResolvedIdentity,
)
from operators.rejections import record_rejection
from operators.repo import RepoLogic
from protocol import cbor
from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.commit import (
    BadCar,
    BadSignature,
    CommitMismatch,
    verify_commit,
    verify_repo,
)
from protocol.mst import MST
from tests.repo_support import Env

FORGERIES: list[str] = []  # every forgery rejected here, for the closing summary

#: How #commit items reach RepoLogic: "inline" (RepoLogic verifies) or "pool" (with the verdict the
#: verification pool gives for the frame, as FirehoseSource attaches it; RepoLogic must use it and
#: reach exactly the same rejections and states).
PATH = {"mode": "inline"}


@pytest.fixture(autouse=True, params=["inline", "pool"])
def verify_path(request):
    PATH["mode"] = request.param
    yield request.param
    PATH["mode"] = "inline"


def preverified(body: dict, key: str, patterns: tuple = ()):
    """What FirehoseSource attaches to a #commit: the pool's verdict on the frame, made with ``key``."""
    from operators.verify import PreVerified, verify_commit_frames

    frame = cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode(_links(body))
    return PreVerified(key, patterns, verify_commit_frames([(frame, key)], patterns)[0])


def real_env(tmp_path, name: str = "data", **cfg) -> Env:
    env = Env(tmp_path / name, **cfg)
    env.logic = RepoLogic(env.db, env.cfg, env.ids, clock=env.clock, rand=lambda: 0.5)
    return env


def rec(text: str, coll: str = "app.bsky.feed.post") -> bytes:
    return cbor.encode({"$type": coll, "text": text, "createdAt": "2024-01-01T00:00:00.000Z"})


def truth(sim: RepoSim) -> dict[str, str]:
    return {p: cid_to_str(c) for p, c in sim.records.items()}


def snapshot_from(env: Env, sim: RepoSim, handle: str = "real.test") -> None:
    """Answer the outstanding fetch with what the PDS holds now."""
    assert env.sync_repo(sim.did, sim.rev, cid_to_str(sim.data_cid), truth(sim),
                         key=sim.key.public_key.multibase(), handle=handle) == []


class Case:
    """One tracked repo: a RepoSim (the PDS), an Env (tapflow) in step with it."""

    def __init__(self, tmp_path, seed: int = 1, n: int = 30) -> None:
        self.env = real_env(tmp_path, f"data{seed}")
        self.sim = RepoSim.create(n_records=n, seed=seed)
        self.did = self.sim.did
        self.seq = 0
        assert self.env.process(AddRepo(self.did)) == []
        snapshot_from(self.env, self.sim)
        rng = random.Random(seed)
        for _ in range(3):
            self.apply(self.sim.commit([("create", f"app.bsky.feed.post/3kgen{rng.randrange(10**8):08d}",
                                         rec(str(rng.random())))]).decoded())

    def item(self, body: dict) -> FirehoseCommit:
        self.seq += 1
        item = FirehoseCommit(seq=self.seq, did=self.did, body=body)
        if PATH["mode"] == "pool":
            item.pre = preverified(body, self.env.state(self.did).signing_key)
        return item

    def apply(self, body: dict) -> None:
        pre0 = self.env.logic.stats["commit_preverified"]
        assert self.env.process(self.item(body)) == []
        assert self.env.logic.stats["commit_preverified"] == pre0 + (PATH["mode"] == "pool")
        self.check_in_step()

    def check_in_step(self) -> None:
        st = self.env.state(self.did)
        assert (st.state, st.rev, st.prev_data) == ("active", self.sim.rev, cid_to_str(self.sim.data_cid))
        assert self.env.records(self.did) == truth(self.sim)

    def before(self) -> tuple:
        st = self.env.state(self.did)
        return (st.rev, st.prev_data, self.env.records(self.did), len(self.env.outbox(self.did)))

    def reject(self, item, reason: str, verify: str | tuple[str, ...], name: str, caplog=None,
               pool_verdict: bool = True) -> Rejected:
        """Process a forged item: one Rejected with this reason (and verification reason, or one of
        several), counted and logged; state kept."""
        before = self.before()
        counter = ("tapflow_rejected_total", {"source": "sync" if isinstance(item, FirehoseSync) else "commit",
                                              "reason": reason})
        n0 = REGISTRY.get_sample_value(*counter) or 0.0
        pre0 = self.env.logic.stats["commit_preverified"]
        out = self.env.process(item)
        assert len(out) == 1, out
        if PATH["mode"] == "pool" and isinstance(item, FirehoseCommit):
            # the pool's verdict, not inline (unless the test says it must not be taken)
            assert self.env.logic.stats["commit_preverified"] == pre0 + pool_verdict
        r = out[0]
        ok = r.extra.get("verify") in verify if isinstance(verify, tuple) else r.extra.get("verify") == verify
        assert r.reason == reason and ok, (r.reason, r.extra, r.detail)
        assert r.did == self.did and r.detail
        with caplog.at_level(logging.WARNING, logger="tapflow.rejected") if caplog else _null():
            record_rejection(r)
        assert REGISTRY.get_sample_value(*counter) == n0 + 1
        if caplog is not None:
            logged = [x for x in caplog.records if x.name == "tapflow.rejected" and getattr(x, "did", "") == self.did]
            assert logged and logged[-1].reason == reason
        self.unchanged(before)
        FORGERIES.append(name)
        return r

    def unchanged(self, before: tuple) -> None:
        assert self.before() == before  # no record changed, no event, rev and root as they were

    def heal(self, *genuine: dict) -> None:
        """A desynchronized repo: genuine commits buffer, the snapshot brings it back in step."""
        st = self.env.state(self.did)
        assert st.state == "desynchronized" and st.fetch_key
        for body in genuine:
            assert self.env.process(self.item(body)) == []
        snapshot_from(self.env, self.sim)
        self.check_in_step()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def reencode(body: dict) -> dict:
    """What the firehose decoder hands RepoLogic for ``body`` (links as binary CIDs)."""
    return cbor.decode(cbor.encode(_links(body)))


def _links(x):
    if isinstance(x, dict):
        return {k: _links(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_links(v) for v in x]
    if isinstance(x, bytes) and len(x) == 36 and x[:2] in (b"\x01\x71", b"\x01\x55"):
        return cbrrr.CID(x)
    return x


def car_with(body: dict, extra: dict[bytes, bytes] | None = None, drop=(), replace=None) -> bytes:
    car = read_car(body["blocks"])
    blocks = {c: b for c, b in car.blocks.items() if c not in drop}
    blocks.update(extra or {})
    if replace:
        blocks.update(replace)
    return write_car(car.roots, list(blocks.items()))


# --------------------------------------------------------------------------- signatures


def test_commit_signed_by_the_wrong_key(tmp_path, caplog):
    c = Case(tmp_path)
    genuine = c.sim.commit([("create", "app.bsky.feed.post/3kgenuine0001", rec("genuine"))]).decoded()
    mallory = RepoSim.create(n_records=0, seed=99, did=c.did)  # same DID, another key
    mallory.micros = c.sim.micros + 10**9  # newer rev: not dropped as a replay
    forged = mallory.commit([("create", "app.bsky.feed.post/3kforged00001", rec("forged"))]).decoded()
    c.reject(c.item(forged), "verify_failed", "bad_signature", "wrong key", caplog)
    c.heal(genuine)


def test_pool_verdict_made_with_another_key_is_not_trusted(tmp_path, caplog, verify_path):
    """The pool verifies with the key RepoLogic last published; if the repo's key is another one
    by the time the commit reaches RepoLogic, the verdict is ignored and the commit verified inline."""
    if verify_path == "inline":
        pytest.skip("about the pool's verdicts")
    c = Case(tmp_path)
    mallory = RepoSim.create(n_records=0, seed=99, did=c.did)  # same DID, another key
    mallory.micros = c.sim.micros + 10**9
    forged = mallory.commit([("create", "app.bsky.feed.post/3kforged00002", rec("forged"))]).decoded()
    item = c.item(forged)
    item.pre = preverified(forged, mallory.key.public_key.multibase())  # a stale key said yes
    assert item.pre.result[0] is True
    pre0 = c.env.logic.stats["commit_preverified"]
    c.reject(item, "verify_failed", "bad_signature", "wrong key, pool verdict with a stale key", caplog,
             pool_verdict=False)
    assert c.env.logic.stats["commit_preverified"] == pre0
    c.heal()
    # and the other way round: a genuine commit the pool refused with a stale key is applied
    body = c.sim.commit([("create", "app.bsky.feed.post/3kgenuine0009", rec("genuine"))]).decoded()
    item = c.item(body)
    item.pre = preverified(body, mallory.key.public_key.multibase())
    assert item.pre.result[:2] == (False, "bad_signature")
    assert c.env.process(item) == []
    c.check_in_step()


def test_pool_verdict_ignored_with_an_injected_verifier(tmp_path):
    """A RepoLogic given its own verify_commit (tests, tools) never takes the pool's verdicts."""
    c = Case(tmp_path)
    calls = []

    def verify(body, key, keep):
        from operators.verify import default_verify_commit

        calls.append(body["rev"])
        return default_verify_commit(body, key, keep)

    env = c.env
    env.logic = RepoLogic(env.db, env.cfg, env.ids, clock=env.clock, rand=lambda: 0.5, verify_commit=verify)
    body = c.sim.commit([("create", "app.bsky.feed.post/3kgenuine0010", rec("genuine"))]).decoded()
    item = FirehoseCommit(seq=99, did=c.did, body=body)
    item.pre = preverified(body, c.env.state(c.did).signing_key)
    assert env.process(item) == []
    assert calls == [body["rev"]] and env.logic.stats["commit_preverified"] == 0
    c.check_in_step()


def test_valid_signature_over_a_different_mst(tmp_path, caplog):
    c = Case(tmp_path)
    ev = c.sim.commit([("create", "app.bsky.feed.post/3kgenuine0002", rec("genuine"))])
    genuine = ev.decoded()
    # Mallory's tree: everything the repo holds plus her record
    evil = rec("mallory was here")
    evil_cid = cid_for_dag_cbor(evil)
    evil_path = "app.bsky.feed.post/3kmallory0001"
    tree = MST.build([(p.encode(), cid) for p, cid in c.sim.records.items()] + [(evil_path.encode(), evil_cid)])
    evil_blocks: dict[bytes, bytes] = {evil_cid: evil}
    evil_root = tree.export_blocks(evil_blocks)
    evil_ops = [{"action": "create", "path": evil_path, "cid": evil_cid, "prev": None}]

    # (a) the genuine signature, with the signed `data` pointing at her tree instead
    commit = cbrrr.decode_dag_cbor(c.sim.commit_block)
    commit["data"] = cbrrr.CID(evil_root)
    block = cbrrr.encode_dag_cbor(commit)
    ccid = cid_for_dag_cbor(block)
    forged = {**genuine, "blocks": write_car([ccid], [(ccid, block), *evil_blocks.items()]), "ops": evil_ops,
              "commit": ccid}
    c.reject(c.item(forged), "verify_failed", "bad_signature", "signature over another MST root", caplog)

    # (b) the genuine commit block, shipped with her tree and ops: the signed root is not there
    car = read_car(genuine["blocks"])
    forged = {**genuine, "ops": evil_ops,
              "blocks": write_car(car.roots, [(car.roots[0], car.blocks[car.roots[0]]), *evil_blocks.items()])}
    c.reject(c.item(forged), "verify_failed", "proof_incomplete", "genuine commit + foreign MST", caplog)

    # (c) the genuine proof plus her blocks, her record claimed at the genuine op's path
    gpath = genuine["ops"][0]["path"]
    forged = {**genuine, "blocks": car_with(genuine, evil_blocks),
              "ops": [{"action": "create", "path": gpath, "cid": evil_cid, "prev": None}]}
    c.reject(c.item(forged), "verify_failed", "op_mismatch", "foreign record at a genuine path", caplog)
    c.heal(genuine)


# --------------------------------------------------------------------------- ops vs proof


def _three_op_commit(c: Case) -> tuple[dict, str, str]:
    """A genuine commit that creates, updates and deletes; returns it and two untouched paths."""
    paths = sorted(c.sim.records)
    upd, dele = paths[3], paths[7]
    ev = c.sim.commit([("create", "app.bsky.feed.post/3kthreeops001", rec("new")),
                       ("update", upd, rec("updated", upd.split("/")[0])),
                       ("delete", dele, None)])
    untouched = [p for p in paths if p not in (upd, dele)]
    return ev.decoded(), untouched[0], untouched[-1]


def test_ops_that_do_not_match_the_proof(tmp_path, caplog):
    c = Case(tmp_path, seed=2, n=60)
    genuine, victim, victim2 = _three_op_commit(c)
    ops = genuine["ops"]
    by = {o["action"]: o for o in ops}
    victim_cid = c.sim.records[victim]
    evil = rec("evil")
    evil_cid = cid_for_dag_cbor(evil)

    def forged(new_ops, blocks=None):
        return c.item({**genuine, "ops": new_ops, "blocks": blocks or genuine["blocks"]})

    def swap(old, new):
        return [new if o is old else o for o in ops]

    c.reject(forged(swap(by["create"], {**by["create"], "cid": evil_cid}), car_with(genuine, {evil_cid: evil})),
             "verify_failed", "op_mismatch", "create cid swapped", caplog)
    c.reject(forged(swap(by["update"], {**by["update"], "cid": evil_cid}), car_with(genuine, {evil_cid: evil})),
             "verify_failed", "op_mismatch", "update cid swapped", caplog)
    c.reject(forged(ops + [{"action": "delete", "path": victim, "cid": None, "prev": victim_cid}]),
             "verify_failed", ("inversion_mismatch", "proof_incomplete"), "delete injected (with prev)", caplog)
    # Tap's legacy escape would accept this one uninverted, deleting the victim: tapflow refuses
    # ops without prev in an event that carries prevData
    c.reject(forged(ops + [{"action": "delete", "path": victim2, "cid": None, "prev": None}]),
             "verify_failed", "bad_op", "delete injected (no prev) into a Sync 1.1 event", caplog)
    c.reject(forged(swap(by["update"], {**by["update"], "prev": None})),
             "verify_failed", "bad_op", "update stripped of prev in a Sync 1.1 event", caplog)
    c.reject(forged([o for o in ops if o is not by["delete"]]), "verify_failed", "inversion_mismatch",
             "op dropped", caplog)
    c.reject(forged(swap(by["update"], {**by["update"], "action": "create", "prev": None})),
             "verify_failed", "inversion_mismatch", "update relabelled create", caplog)
    c.reject(forged(swap(by["create"], {**by["create"], "path": "app.bsky.feed.post/3kelsewhere01"})),
             "verify_failed", ("op_mismatch", "proof_incomplete"), "create moved to another path", caplog)
    c.reject(forged(ops + [dict(ops[0])]), "verify_failed", "bad_op", "op given twice", caplog)
    c.heal(genuine)


def test_injected_delete_in_sync11_event_was_accepted_before_the_fix():
    """The protocol-level view of the fix: verify_commit itself refuses it (Tap accepts it)."""
    sim = RepoSim.create(n_records=30, seed=5)
    victim = sorted(sim.records)[4]
    body = sim.commit([("create", "app.bsky.feed.post/3kfix00000001", rec("x"))]).decoded()
    assert body["prevData"] is not None
    with pytest.raises(Exception) as e:
        verify_commit({**body, "ops": body["ops"] + [{"action": "delete", "path": victim, "cid": None,
                                                       "prev": None}]}, sim.key.public_key)
    assert e.value.reason == "bad_op" and "no prev in an event with prevData" in str(e.value)
    # a legacy event (no prevData) keeps Tap's escape: nothing to invert against
    legacy = {**body, "prevData": None, "ops": body["ops"] + [{"action": "delete", "path": victim,
                                                               "cid": None, "prev": None}]}
    assert not verify_commit(legacy, sim.key.public_key).inverted


# --------------------------------------------------------------------------- replays


def test_replayed_old_commit(tmp_path, caplog):
    c = Case(tmp_path, seed=3)
    old = c.sim.commit([("create", "app.bsky.feed.post/3kreplay00001", rec("one"))]).decoded()
    c.apply(old)
    c.apply(c.sim.commit([("create", "app.bsky.feed.post/3kreplay00002", rec("two"))]).decoded())
    before = c.before()
    n = c.env.logic.stats["commit_replay"]
    assert c.env.process(c.item(old)) == []  # Tap: skipped before verification, by rev
    assert c.env.logic.stats["commit_replay"] == n + 1
    c.unchanged(before)
    c.check_in_step()  # still active: a replay is harmless (invariant 3)
    FORGERIES.append("replayed commit")
    # the same commit under a newer event rev: the signed rev gives it away
    bumped = {**old, "rev": "3z" + old["rev"][2:]}
    c.reject(c.item(bumped), "verify_failed", "commit_mismatch", "replayed commit with bumped rev", caplog)
    c.heal()


def test_sync_that_rolls_back(tmp_path, caplog):
    c = Case(tmp_path, seed=4)
    old_sync = c.sim.sync_body()
    c.apply(c.sim.commit([("create", "app.bsky.feed.post/3ksync0000001", rec("s"))]).decoded())
    before = c.before()
    n = c.env.logic.stats["sync_replay"]
    for body in (reencode(old_sync), reencode({**old_sync, "rev": "3z" + old_sync["rev"][2:]})):
        assert c.env.process(FirehoseSync(seq=99, did=c.did, body=body)) == []
    assert c.env.logic.stats["sync_replay"] == n + 2
    c.unchanged(before)
    c.check_in_step()
    FORGERIES.extend(["#sync with an older rev", "#sync with an older commit under a newer rev"])
    # a #sync that does claim a newer state, signed by another key
    mallory = RepoSim.create(n_records=0, seed=98, did=c.did)
    mallory.micros = c.sim.micros + 10**9
    mallory.commit([("create", "app.bsky.feed.post/3kmallsync001", rec("m"))])
    c.reject(FirehoseSync(seq=100, did=c.did, body=reencode(mallory.sync_body())), "verify_failed",
             "bad_signature", "#sync signed by the wrong key", caplog)
    c.heal()


# --------------------------------------------------------------------------- CARs and DIDs


def test_car_whose_blocks_hash_to_other_cids(tmp_path, caplog):
    c = Case(tmp_path, seed=6)
    genuine = c.sim.commit([("create", "app.bsky.feed.post/3kcarcar00001", rec("genuine record"))]).decoded()
    rcid = genuine["ops"][0]["cid"]
    evil = rec("evil record")
    # Mallory's record under the genuine record's CID
    c.reject(c.item({**genuine, "blocks": car_with(genuine, replace={rcid: evil})}), "verify_failed", "bad_car",
             "record block under another CID", caplog)
    # one flipped byte inside the record block
    blocks = bytearray(genuine["blocks"])
    at = bytes(blocks).index(read_car(genuine["blocks"]).blocks[rcid]) + 10
    blocks[at] ^= 0x01
    r = c.reject(c.item({**genuine, "blocks": bytes(blocks)}), "verify_failed", "bad_car", "flipped byte", caplog)
    assert "hash" in r.detail
    # and an MST node swapped for another node's bytes
    car = read_car(genuine["blocks"])
    nodes = [cid for cid in car.blocks if cid not in (car.roots[0], rcid)]
    c.reject(c.item({**genuine, "blocks": car_with(genuine, replace={nodes[0]: car.blocks[car.roots[0]]})}),
             "verify_failed", "bad_car", "MST node under another CID", caplog)
    c.heal(genuine)
    # the same forgeries on the snapshot path (getRepo): verify_repo refuses them
    full = c.sim.get_repo_car()
    rc = read_car(full)
    some = next(cid for cid in rc.blocks if cid != rc.roots[0])
    with pytest.raises(BadCar):
        verify_repo(write_car(rc.roots, list({**rc.blocks, some: b"\xa0"}.items())), c.sim.key.public_key, c.did)
    FORGERIES.append("getRepo CAR with a block under another CID")


def test_commit_or_repo_of_another_did(tmp_path, caplog):
    c = Case(tmp_path, seed=7)
    other = RepoSim.create(n_records=5, seed=70, key=c.sim.key)  # even with the same key
    other.micros = c.sim.micros + 10**9
    body = other.commit([("create", "app.bsky.feed.post/3kotherdid001", rec("o"))]).decoded()
    c.reject(c.item({**body, "repo": c.did}), "verify_failed", "commit_mismatch", "another DID's commit", caplog)
    with pytest.raises(CommitMismatch):
        verify_repo(other.get_repo_car(), c.sim.key.public_key, c.did)
    FORGERIES.append("getRepo CAR of another DID")
    with pytest.raises(BadSignature):
        verify_repo(c.sim.get_repo_car(), RepoSim.create(seed=97).key.public_key, c.did)
    FORGERIES.append("getRepo CAR checked with another key")
    c.heal()


# --------------------------------------------------------------------------- identity


async def test_did_document_whose_handle_points_elsewhere(tmp_path):
    """alice's document claims bob's handle; bob.test resolves to bob: the handle is not verified
    both ways, so tapflow stores and emits handle.invalid, and counts the mismatch."""
    from connectors.backfill import _resolved
    from protocol.identity import INVALID_HANDLE, Directory, XrpcHandleResolver
    from tests.test_identity import ALICE, BOB, FakeNet, make_doc

    net = FakeNet()
    await net.start()
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver(net.url), timeout=2.0)
    try:
        sim = RepoSim.create(n_records=3, seed=8, did=ALICE)
        net.docs[ALICE] = make_doc(ALICE, "bob.test", key=sim.key.public_key, pds="https://pds.example.com")
        net.docs[BOB] = make_doc(BOB, "bob.test")
        net.handles["bob.test"] = BOB
        metric = ("atproto_identity_resolve_handle_total", {"result": "mismatch"})
        n0 = REGISTRY.get_sample_value(*metric) or 0.0
        ident = await d.resolve(ALICE)
        assert ident.handle == INVALID_HANDLE and ident.declared_handle == "bob.test"
        assert ident.signing_key is not None  # the rest of the identity is usable
        assert REGISTRY.get_sample_value(*metric) == n0 + 1
        bob = await d.resolve(BOB)
        assert bob.handle == "bob.test"
        resolved = _resolved(ident)
    finally:
        await d.close()
        await net.stop()

    env = real_env(tmp_path)
    env.process(AddRepo(ALICE))
    assert env.process(*[ch for ch in __import__("tests.repo_support", fromlist=["snapshot"]).snapshot(
        ALICE, env.fetch_key_of(ALICE), sim.rev, cid_to_str(sim.data_cid), truth(sim), identity=resolved)]) == []
    st = env.state(ALICE)
    assert st.handle == INVALID_HANDLE and st.state == "active"
    ids = [e for e in env.outbox(ALICE) if e["type"] == "identity"]
    assert [e["identity"]["handle"] for e in ids] == [INVALID_HANDLE]
    # an #identity frame naming bob.test changes nothing by itself: the handle is re-verified
    assert env.process(FirehoseIdentity(seq=5, did=ALICE, handle="bob.test")) == []
    key = [k for p, nb, dd, v in env.fetch_q() if dd == ALICE and v["kind"] == "identity" for k in [(p, nb, dd)]]
    assert key, "an identity refresh is queued"
    fk = bytes.fromhex(env.state(ALICE).ident_key)
    assert env.process(IdentityRefreshed(did=ALICE, fetch_key=fk, identity=resolved)) == []
    assert env.state(ALICE).handle == INVALID_HANDLE
    assert [e["identity"]["handle"] for e in env.outbox(ALICE) if e["type"] == "identity"] == [INVALID_HANDLE]
    FORGERIES.append("DID document with a handle that points elsewhere")


def test_zz_summary(capsys):
    """Print how many forgeries this module rejected (the closing note quotes it)."""
    with capsys.disabled():
        print(f"\ntest_forgeries: {len(FORGERIES)} forgeries rejected: " + "; ".join(FORGERIES))
