"""protocol.commit: #commit / #sync / full-repo verification on real and generated data, and corruptions."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import cbrrr
import pytest

from bench.gen import RepoSim, make_tid, random_writes
from protocol import cbor
from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_from_str
from protocol.commit import (
    BadCar,
    BadCommit,
    BadMST,
    BadOp,
    BadSignature,
    BadSyntax,
    HighSSignature,
    CommitMismatch,
    InversionMismatch,
    MissingRecord,
    OpMismatch,
    ProofIncomplete,
    SyncCommit,
    VerificationError,
    parse_signed_commit,
    parse_sync,
    verify_commit,
    verify_repo,
    verify_sync,
)
from protocol.keys import K256, P256, PrivateKey, key_from_verification_method
from protocol.mst import MST, common_prefix_len, key_height

REAL = Path("/work/shared/fixtures/real-network")
N_K256 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def from_json(x):
    """The fixtures' JSON (``$link``, ``$bytes``) to what ``cbor.decode`` gives (binary CIDs, bytes)."""
    if isinstance(x, dict):
        if set(x) == {"$link"}:
            return cid_from_str(x["$link"])
        if set(x) == {"$bytes"}:
            s = x["$bytes"]
            return base64.b64decode(s + "=" * (-len(s) % 4))
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    return x


class RecordingKey:
    """Stands in for a DID's key where the fixtures hold no DID document: accepts, and records
    what it was asked to verify so the test can check that it is the exact signature input."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls: list[tuple[bytes, bytes]] = []

    def verify(self, data: bytes, sig: bytes) -> bool:
        self.calls.append((data, sig))
        return self.ok


def doc_key(name: str):
    doc = json.loads((REAL / f"{name}.didDoc.json").read_text())
    vm = next(v for v in doc["verificationMethod"] if v["id"].endswith("#atproto"))
    return doc["id"], key_from_verification_method(vm, doc["id"])


# ----------------------------------------------------------------------------- real firehose commits

FIREHOSE = sorted(REAL.glob("firehose_commit_*.json"))
# The three from the bridgyfed PDS ship proofs that lack nodes the inversion needs (the Go
# reference cannot invert them either); 4623075231 inverts thanks to the stub-root rule.
EXPECTED = {
    "4621317030": ProofIncomplete,
    "4621317332": ProofIncomplete,
    "4621332152": ProofIncomplete,
    "4623075231": None,
}


def load_firehose(path: Path) -> dict:
    return from_json(json.loads(path.read_text()))


def test_firehose_fixture_set():
    assert {p.stem.split("_")[-1] for p in FIREHOSE} == set(EXPECTED)


@pytest.mark.parametrize("path", FIREHOSE, ids=[p.stem.split("_")[-1] for p in FIREHOSE])
def test_real_firehose_commit(path):
    evt = load_firehose(path)
    expected = EXPECTED[path.stem.split("_")[-1]]
    assert "prevData" not in evt  # captured before prevData shipped: the root check is skipped
    key = RecordingKey()
    if expected is not None:
        with pytest.raises(expected):
            verify_commit(evt, key)
    else:
        vc = verify_commit(evt, key)
        assert vc.inverted and vc.did == evt["repo"] and vc.rev == evt["rev"]
        assert [(o.action, o.collection, o.rkey) for o in vc.ops] == [("create", "app.bsky.actor.profile", "self")]
        assert vc.ops[0].cid == evt["ops"][0]["cid"] and vc.ops[0].record is not None
        assert vc.commit_cid == evt["commit"]
    # The signature was asked for over the commit minus ``sig``, rebuilt from typed fields; the
    # signed block re-encodes byte for byte from the same fields, so that input is exact.
    [(data, sig)] = key.calls
    car = read_car(evt["blocks"])
    block = car.blocks[car.roots[0]]
    strict = cbrrr.decode_dag_cbor(block)
    assert strict.pop("sig") == sig
    assert cbrrr.encode_dag_cbor(strict) == data
    assert cbrrr.encode_dag_cbor({**strict, "sig": sig}) == block


def test_real_commit_needs_stub_root():
    """4623075231 creates ``app.bsky.actor.profile/self``; removing it leaves the root as a bare
    pointer to a subtree the proof does not carry, so the inverted tree is a stub (its CID)."""
    evt = load_firehose(REAL / "firehose_commit_4623075231.json")
    car = read_car(evt["blocks"])
    commit = parse_signed_commit(car)
    tree = MST.load(car.blocks, commit.data_cid)
    path = evt["ops"][0]["path"].encode()
    assert tree.get(path) == evt["ops"][0]["cid"]
    t = tree.copy()
    assert t.remove(path) == evt["ops"][0]["cid"]
    assert type(t.root) is bytes and t.root not in car.blocks
    stub = t.root_cid()
    # with prevData present, the comparison is made against that stub root
    assert verify_commit({**evt, "prevData": stub}, RecordingKey()).prev_data == stub
    with pytest.raises(InversionMismatch):
        verify_commit({**evt, "prevData": commit.data_cid}, RecordingKey())


def test_real_firehose_commit_rejected_by_key():
    evt = load_firehose(REAL / "firehose_commit_4623075231.json")
    with pytest.raises(BadSignature):
        verify_commit(evt, RecordingKey(ok=False))
    _, other = doc_key("greenground")
    with pytest.raises(BadSignature):
        verify_commit(evt, other)


# ----------------------------------------------------------------------------- real repos


def test_greenground_repo():
    did, key = doc_key("greenground")
    data = (REAL / "greenground.repo.car").read_bytes()
    # Signed with the key of the document, but the commit names another DID (an account that
    # changed its DID's history?). Tap does not compare; with the hardening it is rejected.
    repo = verify_repo(data, key)
    assert repo.did == "did:plc:kzcqyc3unb33eh5sxzsfs25z" != did
    recs = list(repo.records())
    assert [(r.collection, r.rkey) for r in recs] == [
        ("app.bsky.graph.follow", "3k5rgfiifs42u"), ("app.bsky.graph.follow", "3k5vze25v5a26")]
    assert all(r.block is not None and cid_for_dag_cbor(r.block) == r.cid for r in recs)
    assert repo.missing_nodes == repo.missing_blocks == repo.invalid_paths == 0
    with pytest.raises(CommitMismatch):
        verify_repo(data, key, did)
    with pytest.raises(BadSignature):
        verify_repo(data, doc_key("paul_staging")[1])


def independent_walk(blocks: dict, root: bytes) -> list[bytes]:
    """All MST keys in tree order, by a plain recursive walk (cbrrr decoding, no protocol.mst)."""
    out: list[bytes] = []

    def walk(cid: bytes) -> None:
        node = cbrrr.decode_dag_cbor(blocks[cid])
        if node["l"] is not None:
            walk(node["l"].cid_bytes)
        prev = b""
        for e in node["e"]:
            prev = prev[:e["p"]] + e["k"]
            out.append(prev)
            if e["t"] is not None:
                walk(e["t"].cid_bytes)

    walk(root)
    return out


def test_real_repos_which_and_why():
    """The three getRepo exports, each against the key of its own DID document:

    - greenground: a v3 commit, signed by the document's key, but naming another DID (so it
      verifies only without ``expected_did``; see test_greenground_repo);
    - paul_staging: a legacy v2 commit ``{did, version: 2, prev, data, sig}`` (no rev): verifies,
      rev "" (Tap clients accept it);
    - fakermaker: a legacy v2 commit whose P-256 signature is high-S: rejected (atproto requires
      low-S), with its own reason.
    """
    outcomes = {}
    for name in ("greenground", "paul_staging", "fakermaker"):
        _, key = doc_key(name)
        try:
            repo = verify_repo((REAL / f"{name}.repo.car").read_bytes(), key)
            outcomes[name] = (repo.version, repo.rev != "", len(list(repo.records())))
        except VerificationError as e:
            outcomes[name] = e.reason
    assert outcomes == {"greenground": (3, True, 2), "paul_staging": (2, False, 185),
                        "fakermaker": "high_s_signature"}


def test_paul_staging_v2_repo():
    did, key = doc_key("paul_staging")
    data = (REAL / "paul_staging.repo.car").read_bytes()
    repo = verify_repo(data, key, did)
    assert (repo.did, repo.rev, repo.version) == (did, "", 2)
    recs = list(repo.records())
    car = read_car(data)
    paths = independent_walk(car.blocks, repo.data_cid)
    assert len(recs) == repo.record_count == len(paths) == 185
    assert [f"{r.collection}/{r.rkey}".encode() for r in recs] == paths
    assert all(r.block is not None and cid_for_dag_cbor(r.block) == r.cid for r in recs)
    assert repo.missing_nodes == repo.missing_blocks == repo.invalid_paths == 0
    # the signature input is the v2 commit minus sig: version 2 and no rev field
    sc = parse_signed_commit(car, allow_v2=True)
    strict = cbrrr.decode_dag_cbor(car.blocks[car.roots[0]])
    assert strict.pop("sig") == sc.sig and "rev" not in strict and strict["version"] == 2
    assert cbrrr.encode_dag_cbor(strict) == sc.unsigned and key.verify(sc.unsigned, sc.sig)
    # another key, another DID: refused as for any repo
    with pytest.raises(BadSignature):
        verify_repo(data, doc_key("greenground")[1])
    with pytest.raises(CommitMismatch):
        verify_repo(data, key, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    # v2 is for full repos only: the same commit as a #sync (or in a #commit) is refused
    with pytest.raises(BadCommit):
        parse_signed_commit(car)
    with pytest.raises(BadCommit):
        verify_sync(write_car(car.roots, [(car.roots[0], car.blocks[car.roots[0]])]), key)


def test_fakermaker_v2_repo_is_high_s():
    """fakermaker's own (v2, P-256) commit signature has a high S. atproto requires low-S, so the
    repo is refused, with a reason of its own; ``verify_lenient`` (a diagnostic, never used to
    accept anything) shows that the signature is otherwise valid, and so is its low-S twin."""
    did, key = doc_key("fakermaker")
    data = (REAL / "fakermaker.repo.car").read_bytes()
    with pytest.raises(HighSSignature, match="high-S signature") as e:
        verify_repo(data, key, did)
    assert isinstance(e.value, BadSignature) and e.value.reason == "high_s_signature"
    car = read_car(data)
    sc = parse_signed_commit(car, allow_v2=True)
    s = int.from_bytes(sc.sig[32:], "big")
    assert s > N_P256 // 2
    assert not key.verify(sc.unsigned, sc.sig)
    assert key.verify_lenient(sc.unsigned, sc.sig)  # diagnostic only
    assert key.verify(sc.unsigned, sc.sig[:32] + (N_P256 - s).to_bytes(32, "big"))
    # the unsigned bytes are the commit minus sig, re-encoded from the strict decoding
    strict = cbrrr.decode_dag_cbor(car.blocks[car.roots[0]])
    assert strict.pop("sig") == sc.sig and cbrrr.encode_dag_cbor(strict) == sc.unsigned
    # checked against a key that did not sign it, the same high S is a plain bad signature:
    # high-S is reported only for a signature whose low-S twin verifies
    for other in (PrivateKey.generate(P256).public_key, doc_key("paul_staging")[1]):
        with pytest.raises(BadSignature) as e2:
            verify_repo(data, other)
        assert type(e2.value) is BadSignature and e2.value.reason == "bad_signature"


@pytest.mark.parametrize("name,count", [("paul_staging", 185), ("fakermaker", 142)])
def test_v2_repo_msts_verify(name, count):
    """Both v2 exports' MSTs are real data: re-signed in a v3 commit, the whole repo verifies."""
    did, key = doc_key(name)
    data = (REAL / f"{name}.repo.car").read_bytes()
    car = read_car(data)
    old = cbor.decode(car.blocks[car.roots[0]])
    assert old["version"] == 2
    priv = PrivateKey.generate(key.curve)
    root, block = signed_commit(priv, did, make_tid(1_700_000_000_000_000), old["data"])
    blocks = dict(car.blocks)
    blocks[root] = block
    repo = verify_repo(write_car([root], blocks), priv.public_key, did)
    recs = list(repo.records())
    assert len(recs) == repo.record_count == count == len(independent_walk(car.blocks, old["data"]))
    assert all(r.block is not None and cid_for_dag_cbor(r.block) == r.cid for r in recs)
    assert [f"{r.collection}/{r.rkey}" for r in recs] == sorted(f"{r.collection}/{r.rkey}" for r in recs)


def test_generated_v2_repos():
    """v2 commits signed here: with and without rev, and with the signature over the wrong form."""
    sim = RepoSim.create(n_records=40, seed=21)
    priv = sim.key
    car = read_car(sim.get_repo_car())
    blocks = {c: b for c, b in car.blocks.items() if c != car.roots[0]}

    def v2_car(unsigned: dict, sig: bytes | None = None) -> bytes:
        if sig is None:
            sig = priv.sign(cbor.encode(unsigned))
        block = cbor.encode({**unsigned, "sig": sig})
        root = cid_for_dag_cbor(block)
        return write_car([root], {root: block, **blocks})

    base = {"did": sim.did, "version": 2, "data": cbrrr.CID(sim.data_cid), "prev": None}
    repo = verify_repo(v2_car(base), priv.public_key, sim.did)
    assert (repo.rev, repo.version, repo.record_count) == ("", 2, 40)
    rev = make_tid(1_600_000_000_000_000)
    repo = verify_repo(v2_car({**base, "rev": rev}), priv.public_key, sim.did)
    assert (repo.rev, repo.version) == (rev, 2)
    # signed as if it were v3 (or with rev when the block has none): not the v2 signature input
    wrong = priv.sign(cbor.encode({**base, "version": 3, "rev": rev}))
    with pytest.raises(BadSignature):
        verify_repo(v2_car(base, wrong), priv.public_key, sim.did)
    with pytest.raises(BadSignature):
        verify_repo(v2_car(base, priv.sign(cbor.encode({**base, "rev": rev}))), priv.public_key, sim.did)
    for bad in ({**base, "rev": "nope"}, {**base, "version": 1}, {**base, "did": "nope"}):
        with pytest.raises(BadCommit):
            verify_repo(v2_car(bad), priv.public_key)


# ----------------------------------------------------------------------------- generated data


def signed_commit(priv: PrivateKey, did: str, rev: str, data: bytes, *, version: int = 3,
                  sig: bytes | None = None) -> tuple[bytes, bytes]:
    unsigned = {"did": did, "version": version, "data": cbrrr.CID(data), "prev": None, "rev": rev}
    if sig is None:
        sig = priv.sign(cbor.encode(unsigned))
    block = cbor.encode({**unsigned, "sig": sig})
    return cid_for_dag_cbor(block), block


@pytest.fixture(scope="module")
def sim_events():
    sim = RepoSim.create(n_records=300, seed=11)
    rng = random.Random(3)
    events = [sim.commit(random_writes(sim, rng)) for _ in range(60)]
    return sim, events


def _multi(sim_events):
    sim, events = sim_events
    return next(e for e in events if len(e.body["ops"]) >= 2)


def test_generated_commits_verify(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    actions = set()
    for ev in events:
        body = ev.decoded()
        vc = verify_commit(body, key)
        assert vc.inverted and vc.prev_data == ev.prev_data and vc.data_cid == ev.data_cid
        assert vc.commit_cid == ev.commit_cid
        for op, raw in zip(vc.ops, body["ops"]):
            assert f"{op.collection}/{op.rkey}" == raw["path"] and op.action == raw["action"]
            assert op.cid == raw["cid"] and op.prev == raw["prev"]
            if op.action == "delete":
                assert op.record is None
            else:
                assert cid_for_dag_cbor(op.record) == op.cid
            actions.add(op.action)
    assert actions == {"create", "update", "delete"}
    assert any(len(e.body["ops"]) > 1 for e in events)


def with_car(body: dict, edit) -> dict:
    """``body`` with its CAR rebuilt after ``edit(roots, blocks)`` (a dict, mutated)."""
    car = read_car(body["blocks"])
    roots = list(car.roots)
    blocks = dict(car.blocks)
    edit(roots, blocks)
    return {**body, "blocks": write_car(roots, blocks)}


def test_wrong_key(sim_events):
    sim, events = sim_events
    with pytest.raises(BadSignature):
        verify_commit(events[0].decoded(), PrivateKey.generate(K256).public_key)
    with pytest.raises(BadSignature):
        verify_commit(events[0].decoded(), PrivateKey.generate(P256).public_key)


def test_signature_over_a_different_mst(sim_events):
    """The commit keeps its signature but points at another MST root: the signature fails."""
    sim, events = sim_events
    body = events[5].decoded()
    other = events[6]
    car = read_car(body["blocks"])
    commit = cbor.decode(car.blocks[car.roots[0]])
    root, block = signed_commit(sim.key, sim.did, body["rev"], other.data_cid, sig=commit["sig"])

    def edit(roots, blocks):
        roots[0] = root
        blocks[root] = block
        blocks.update(read_car(other.body["blocks"]).blocks)

    with pytest.raises(BadSignature):
        verify_commit(with_car(body, edit), sim.key.public_key)


def _sig_edit(body: dict, transform) -> dict:
    car = read_car(body["blocks"])
    c = cbrrr.decode_dag_cbor(car.blocks[car.roots[0]])
    c["sig"] = transform(c["sig"])
    block = cbor.encode(c)
    root = cid_for_dag_cbor(block)

    def edit(roots, blocks):
        del blocks[roots[0]]
        roots[0] = root
        blocks[root] = block

    return with_car(body, edit)


def test_high_s_signature_rejected(sim_events):
    sim, events = sim_events
    body = events[0].decoded()

    def high(sig):
        s = int.from_bytes(sig[32:], "big")
        return sig[:32] + (N_K256 - s).to_bytes(32, "big")

    evil = _sig_edit(body, high)
    # mathematically the same signature, so a lenient verifier would accept it
    sc = parse_signed_commit(read_car(evil["blocks"]))
    assert sim.key.public_key.verify_lenient(sc.unsigned, sc.sig)
    with pytest.raises(HighSSignature, match="high-S signature"):
        verify_commit(evil, sim.key.public_key)
    # the same high S under another key is just a signature that does not verify
    with pytest.raises(BadSignature) as e:
        verify_commit(evil, PrivateKey.generate(K256).public_key)
    assert type(e.value) is BadSignature


def test_high_s_p256_rejected():
    priv = PrivateKey.generate(P256)
    sim = RepoSim.create(n_records=20, seed=5, key=priv)
    body = sim.commit(random_writes(sim, random.Random(1))).decoded()
    assert verify_commit(body, priv.public_key).inverted

    def high(sig):
        return sig[:32] + (N_P256 - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")

    with pytest.raises(HighSSignature, match="high-S signature"):
        verify_commit(_sig_edit(body, high), priv.public_key)


def test_der_signature_rejected(sim_events):
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    sim, events = sim_events

    def der(sig):
        return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))

    with pytest.raises(BadSignature):
        verify_commit(_sig_edit(events[0].decoded(), der), sim.key.public_key)


def test_ops_that_do_not_match_the_proof(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    create = next(e for e in events if e.body["ops"][0]["action"] == "create").decoded()
    other_cid = cid_for_dag_cbor(cbor.encode({"x": 1}))

    # an op cid that is not the MST value at its path
    bad = {**create, "ops": [{**create["ops"][0], "cid": other_cid}] + create["ops"][1:]}
    with pytest.raises(OpMismatch):
        verify_commit(bad, key)

    # prevData that the inversion does not reach
    with pytest.raises(InversionMismatch):
        verify_commit({**create, "prevData": other_cid}, key)

    # a create presented as an update of some previous record
    op = create["ops"][0]
    with pytest.raises(InversionMismatch):
        verify_commit({**create, "ops": [{**op, "action": "update", "prev": other_cid}] + create["ops"][1:]}, key)

    # a delete claimed for a record that is still in the tree
    present = next(p for p in sim.records if p != op["path"])
    fake = {"action": "delete", "path": present, "cid": None, "prev": other_cid}
    with pytest.raises((InversionMismatch, ProofIncomplete)):
        verify_commit({**create, "ops": create["ops"] + [fake]}, key)

    # an op left out of a multi-op commit
    multi = _multi(sim_events).decoded()
    with pytest.raises((InversionMismatch, ProofIncomplete)):
        verify_commit({**multi, "ops": multi["ops"][:-1]}, key)

    # an extra create that the MST does not hold
    extra = {"action": "create", "path": "app.bsky.feed.post/3kzzzzzzzzzz2", "cid": other_cid, "prev": None}
    with pytest.raises((OpMismatch, ProofIncomplete)):
        verify_commit({**create, "ops": create["ops"] + [extra]}, key)


def test_missing_blocks(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    body = next(e for e in events if e.body["ops"][0]["action"] == "create").decoded()
    rec_cid = body["ops"][0]["cid"]
    with pytest.raises(MissingRecord):
        verify_commit(with_car(body, lambda r, b: b.pop(rec_cid)), key)
    sc = parse_signed_commit(read_car(body["blocks"]))
    with pytest.raises(ProofIncomplete):  # the MST root itself
        verify_commit(with_car(body, lambda r, b: b.pop(sc.data_cid)), key)
    # some inner node on the path
    tree = MST.load(read_car(body["blocks"]).blocks, sc.data_cid)
    inner = next(s for s in tree.root.full().subs if type(s) is bytes and s in read_car(body["blocks"]).blocks)
    with pytest.raises(ProofIncomplete):
        verify_commit(with_car(body, lambda r, b: b.pop(inner)), key)


def test_car_problems(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    body = events[1].decoded()
    car = body["blocks"]
    # a flipped byte inside a block: the hash check fails
    flipped = bytearray(car)
    flipped[-5] ^= 0xFF
    with pytest.raises(BadCar):
        verify_commit({**body, "blocks": bytes(flipped)}, key)
    with pytest.raises(BadCar):
        verify_commit({**body, "blocks": car[:-3]}, key)
    with pytest.raises(BadCar):
        verify_commit({**body, "blocks": b""}, key)
    with pytest.raises(BadCar):
        verify_commit({**body, "blocks": "not bytes"}, key)
    # the commit block (first root) absent
    with pytest.raises(BadCar):
        verify_commit(with_car(body, lambda r, b: b.pop(r[0])), key)
    with pytest.raises(BadCar):
        verify_commit({**body, "blocks": car}, key, max_car_size=100)


def test_event_syntax_and_commit_mismatch(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    body = events[2].decoded()
    for field, value in (("repo", "not-a-did"), ("rev", "nope"), ("time", "yesterday"), ("repo", None),
                         ("prevData", "bafy"), ("ops", None)):
        with pytest.raises(BadSyntax):
            verify_commit({**body, field: value}, key)
    with pytest.raises(CommitMismatch):
        verify_commit({**body, "repo": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"}, key)
    with pytest.raises(CommitMismatch):
        verify_commit({**body, "rev": make_tid(1_800_000_000_000_000)}, key)


def test_bad_commit_objects(sim_events):
    sim, events = sim_events
    body = events[3].decoded()
    sc = parse_signed_commit(read_car(body["blocks"]))

    def replace_commit(obj):
        block = cbor.encode(obj)
        root = cid_for_dag_cbor(block)

        def edit(roots, blocks):
            del blocks[roots[0]]
            roots[0] = root
            blocks[root] = block

        return with_car(body, edit)

    base = {"did": sim.did, "version": 3, "data": cbrrr.CID(sc.data_cid), "prev": None, "rev": body["rev"]}
    for bad in ({**base, "version": 2, "sig": sc.sig}, {**base, "sig": b""}, base,
                {**base, "did": "nope", "sig": sc.sig}, {**base, "rev": "nope", "sig": sc.sig},
                {**base, "data": b"raw bytes", "sig": sc.sig}, {**base, "version": True, "sig": sc.sig}):
        with pytest.raises(BadCommit):
            verify_commit(replace_commit(bad), sim.key.public_key)
    with pytest.raises(BadCommit):
        verify_commit(replace_commit(["a", "list"]), sim.key.public_key)


def test_signature_input_is_the_typed_encoding(sim_events):
    """The signature input is the canonical DAG-CBOR of the typed fields with ``data``/``prev`` as
    links (tag 42), whatever ``prev`` is (null, a dag-cbor or a raw CID) and for a v2 commit
    without ``rev``: what cbrrr writes from explicit ``CID`` values."""
    sim, events = sim_events
    sc = parse_signed_commit(read_car(events[3].decoded()["blocks"]))
    raw_cid = b"\x01\x55\x12\x20" + sc.data_cid[4:]
    for prev, version, rev in ((None, 3, sc.rev), (sc.data_cid, 3, sc.rev), (raw_cid, 3, sc.rev),
                               (sc.data_cid, 2, None)):
        fields = {"did": sc.did, "version": version, "data": sc.data_cid, "prev": prev, "sig": sc.sig}
        if rev is not None:
            fields["rev"] = rev
        block = cbor.encode({**fields, "data": cbrrr.CID(sc.data_cid),
                             "prev": None if prev is None else cbrrr.CID(prev)})
        root = cid_for_dag_cbor(block)
        got = parse_signed_commit(read_car(write_car([root], {root: block})), allow_v2=True)
        del fields["sig"]
        typed = {**fields, "data": cbrrr.CID(sc.data_cid), "prev": None if prev is None else cbrrr.CID(prev)}
        assert got.unsigned == cbrrr.encode_dag_cbor(typed)
        assert cbrrr.decode_dag_cbor(got.unsigned)["data"] == cbrrr.CID(sc.data_cid)  # a link, not bytes
    assert parse_signed_commit(read_car(events[3].decoded()["blocks"])).unsigned == sc.unsigned


def test_op_shapes(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    body = next(e for e in events if e.body["ops"][0]["action"] == "create").decoded()
    op = body["ops"][0]
    other = cid_for_dag_cbor(cbor.encode({"y": 2}))

    def with_op(**kw):
        return {**body, "ops": [{**op, **kw}] + body["ops"][1:]}

    for bad in (with_op(prev=other),  # create with prev
                with_op(action="mutate"),
                with_op(action=None),
                with_op(path="no-slash"),
                with_op(path="app.bsky.feed.post/a/b"),
                with_op(path="bad coll/abc"),
                with_op(path=7),
                with_op(cid=None),  # create without cid
                with_op(cid="bafy-string"),
                with_op(action="update", prev=op["cid"]),  # update that changes nothing
                {**body, "ops": body["ops"] + [dict(op)]},  # same path twice
                {**body, "ops": ["not a map"]}):
        with pytest.raises(BadOp):
            verify_commit(bad, key)
    delete = next((e for e in events if e.body["ops"][0]["action"] == "delete"), None)
    d = delete.decoded()
    with pytest.raises(BadOp):  # delete with a cid
        verify_commit({**d, "ops": [{**d["ops"][0], "cid": other}] + d["ops"][1:]}, key)


def test_legacy_ops_skip_inversion(sim_events):
    sim, events = sim_events
    key = sim.key.public_key
    body = next(e for e in events if e.body["ops"][0]["action"] == "update").decoded()
    legacy = {**body, "ops": [{**body["ops"][0], "prev": None}] + body["ops"][1:]}
    legacy.pop("prevData")
    vc = verify_commit(legacy, key)
    assert not vc.inverted and vc.prev_data is None
    # with prevData (a Sync 1.1 event) an op without prev is refused, not waved through: Tap
    # would accept ops added to a genuine commit that way (tests/test_forgeries.py)
    with pytest.raises(BadOp, match="no prev in an event with prevData"):
        verify_commit({**legacy, "prevData": body["prevData"]}, key)
    # but the MST value check still applies
    with pytest.raises(OpMismatch):
        verify_commit({**legacy, "ops": [{**legacy["ops"][0], "cid": cid_for_dag_cbor(b"\xa0")}]}, key)


def test_reasons_are_distinct():
    classes = [BadSyntax, BadCar, BadCommit, BadSignature, HighSSignature, CommitMismatch, BadOp, OpMismatch,
               MissingRecord, ProofIncomplete, InversionMismatch, BadMST]
    reasons = [c.reason for c in classes]
    assert len(set(reasons)) == len(reasons)
    assert all(issubclass(c, VerificationError) and issubclass(c, ValueError) for c in classes)


# ----------------------------------------------------------------------------- #sync


def test_sync(sim_events):
    sim, _ = sim_events
    body = sim.sync_body()
    parsed = parse_sync(body["blocks"])
    assert parsed.did == sim.did
    res = verify_sync(parsed, sim.key.public_key)
    assert res == SyncCommit(sim.did, sim.rev, sim.data_cid)
    assert verify_sync(body["blocks"], sim.key.public_key) == res
    with pytest.raises(BadSignature):
        verify_sync(body["blocks"], PrivateKey.generate(K256).public_key)
    with pytest.raises(BadCar):
        verify_sync(b"\x00garbage", sim.key.public_key)
    with pytest.raises(BadCar):
        verify_sync(write_car([sim.commit_cid], []), sim.key.public_key)


# ----------------------------------------------------------------------------- full repos


def test_generated_repo(sim_events):
    sim, _ = sim_events
    car = sim.get_repo_car()
    repo = verify_repo(car, sim.key.public_key, sim.did)
    assert (repo.did, repo.rev, repo.data_cid, repo.commit_cid) == (sim.did, sim.rev, sim.data_cid, sim.commit_cid)
    recs = list(repo.records())
    assert [(f"{r.collection}/{r.rkey}", r.cid) for r in recs] == sorted(sim.records.items())
    assert all(r.block is not None and cid_for_dag_cbor(r.block) == r.cid for r in recs)
    with pytest.raises(CommitMismatch):
        verify_repo(car, sim.key.public_key, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    with pytest.raises(BadSignature):
        verify_repo(car, PrivateKey.generate(K256).public_key, sim.did)


def test_repo_missing_blocks_and_nodes(sim_events):
    sim, _ = sim_events
    data = sim.get_repo_car()
    car = read_car(data)
    sc = parse_signed_commit(car)
    some_record = next(iter(sim.records.values()))
    blocks = {c: b for c, b in car.blocks.items() if c != some_record}
    repo = verify_repo(write_car(car.roots, blocks), sim.key.public_key, sim.did)
    recs = list(repo.records())
    assert repo.missing_blocks == 1 and sum(r.block is None for r in recs) == 1
    tree = MST.load(car.blocks, sc.data_cid)
    node = next(s for s in tree.root.full().subs if s is not None)
    node = node if type(node) is bytes else node.cid
    blocks = {c: b for c, b in car.blocks.items() if c != node}
    partial = write_car(car.roots, blocks)
    repo = verify_repo(partial, sim.key.public_key, sim.did)
    assert repo.missing_nodes == 1 and 0 < repo.record_count < len(sim.records)
    with pytest.raises(ProofIncomplete):
        verify_repo(partial, sim.key.public_key, sim.did, allow_partial=False)


def _repo_car(priv, did, entries, records, left=None) -> bytes:
    """A one-node MST repo with exactly these entries (no structure fix-ups)."""
    out = []
    prev = b""
    for k, v in entries:
        p = common_prefix_len(prev, k)
        out.append({"k": k[p:], "p": p, "t": None, "v": cbrrr.CID(v)})
        prev = k
    node = cbor.encode({"e": out, "l": None if left is None else cbrrr.CID(left)})
    data = cid_for_dag_cbor(node)
    root, block = signed_commit(priv, did, make_tid(1_700_000_000_000_000), data)
    return write_car([root], [(root, block), (data, node)] + list(records.items()))


def test_repo_structure_errors_are_rejected():
    priv = PrivateKey.generate(K256)
    did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    rec = cbor.encode({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z"})
    cid = cid_for_dag_cbor(rec)
    h0 = [k for k in (f"app.bsky.feed.like/3k{i:011d}".encode() for i in range(200)) if key_height(k) == 0]
    h1 = [k for k in (f"app.bsky.feed.like/3k{i:011d}".encode() for i in range(200)) if key_height(k) == 1]
    ok = _repo_car(priv, did, [(h0[0], cid), (h0[1], cid)], {cid: rec})
    assert verify_repo(ok, priv.public_key, did).record_count == 2
    for entries in ([(h0[1], cid), (h0[0], cid)],  # out of order
                    [(h0[0], cid), (h1[0], cid)]):  # a layer-1 key among layer-0 ones
        with pytest.raises(BadMST):
            verify_repo(_repo_car(priv, did, entries, {cid: rec}), priv.public_key, did)


def test_repo_invalid_paths_are_skipped_and_counted():
    priv = PrivateKey.generate(K256)
    did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    rec = cbor.encode({"a": 1})
    cid = cid_for_dag_cbor(rec)
    keys = sorted([b"app.bsky.feed.like/3kaaaaaaaaaa2", b"no-collection", b"bad coll/x"])
    t = MST.build([(k, cid) for k in keys])
    blocks: dict = {}
    data = t.export_blocks(blocks)
    root, block = signed_commit(priv, did, make_tid(1_700_000_000_000_000), data)
    blocks[root] = block
    blocks[cid] = rec
    repo = verify_repo(write_car([root], blocks), priv.public_key, did)
    recs = list(repo.records())
    assert [(r.collection, r.rkey) for r in recs] == [("app.bsky.feed.like", "3kaaaaaaaaaa2")]
    assert repo.invalid_paths == 2 and repo.record_count == 3
