"""Size and shape limits on hostile input: each one is enforced where the input enters, with a
clear error, and the flow goes on.

| limit | where | what happens |
|---|---|---|
| ``TAP_MAX_FRAME_SIZE`` (5 MiB) | ``connectors.firehose`` (websockets ``max_size``) | frame rejected (``frame_too_large``), redial past it |
| ``TAP_MAX_CAR_SIZE`` (1 GiB) | getRepo download (``connectors.http``) and ``verify_repo`` | ``FetchFailed`` "exceeds the limit of N bytes" |
| record size (1 MiB, Go's ``MAX_CBOR_RECORD_SIZE``) | ``protocol.atjson`` | event emitted without ``record`` |
| blocks per CAR (16 Mi) / per ``#commit``/``#sync`` (10 000) | ``protocol.car.read_car`` / ``protocol.commit`` | ``CarTooLarge`` / ``BadCar`` |
| ops per ``#commit`` (200) | ``protocol.commit`` | ``BadOp`` |
| MST height (128 layers) | ``protocol.commit`` | ``BadMST`` (not a ``RecursionError``) |
| ``TAP_MAX_BODY_SIZE`` (10 MiB) | HTTP API (aiohttp ``client_max_size``) | 413 ``{"message": ...}`` |
"""

from __future__ import annotations

import random
from pathlib import Path

import cbrrr
import orjson
import pytest

from bench.gen import RepoSim, make_tid, random_writes
from protocol import cbor
from protocol.car import DEFAULT_MAX_BLOCKS, CarTooLarge, read_car, write_car
from protocol.cid import cid_for_dag_cbor
from protocol.commit import (
    MAX_COMMIT_BLOCKS,
    MAX_COMMIT_OPS,
    MAX_MST_HEIGHT,
    BadCar,
    BadMST,
    BadOp,
    verify_commit,
    verify_repo,
    verify_sync,
)
from protocol.keys import K256, PrivateKey
from protocol.mst import key_height

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-network"
DID = "did:plc:limitslimitslimitslimits"
PRIV = PrivateKey.from_bytes(K256, b"\x07" * 32)


def _junk_blocks(n: int, tag: bytes = b"j") -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        b = cbor.encode(tag + i.to_bytes(4, "big"))
        out.append((cid_for_dag_cbor(b), b))
    return out


def _signed(data_cid: bytes, rev: str, priv: PrivateKey = PRIV, did: str = DID) -> tuple[bytes, bytes]:
    unsigned = {"did": did, "version": 3, "data": cbrrr.CID(data_cid), "prev": None, "rev": rev}
    block = cbor.encode({**unsigned, "sig": priv.sign(cbor.encode(unsigned))})
    return cid_for_dag_cbor(block), block


@pytest.fixture(scope="module")
def sim():
    s = RepoSim.create(n_records=40, seed=21)
    return s, s.commit(random_writes(s, random.Random(1)))


# --------------------------------------------------------------------------- blocks per CAR


def test_car_block_count_limit():
    blocks = _junk_blocks(50)
    car = write_car([blocks[0][0]], blocks)
    assert len(read_car(car, max_blocks=50).blocks) == 50
    with pytest.raises(CarTooLarge, match="more than 49 blocks"):
        read_car(car, max_blocks=49)
    # duplicates are sections too: a CAR cannot dodge the cap by repeating one block
    dup = write_car([blocks[0][0]], [blocks[0]] * 60)
    assert len(read_car(dup, max_blocks=60).blocks) == 1
    with pytest.raises(CarTooLarge):
        read_car(dup, max_blocks=59)


def test_default_block_cap_fits_real_repos():
    for path in REAL.glob("*.repo.car"):
        assert len(read_car(path.read_bytes()).blocks) < DEFAULT_MAX_BLOCKS // 1000


def test_commit_and_sync_block_limit(sim):
    s, ev = sim
    body = ev.decoded()
    car = read_car(body["blocks"])
    padded = write_car(car.roots, list(car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS - len(car.blocks)))
    verify_commit({**body, "blocks": padded}, s.key.public_key)  # exactly at the limit: fine
    over = write_car(car.roots, list(car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS - len(car.blocks) + 1))
    with pytest.raises(BadCar, match=f"more than {MAX_COMMIT_BLOCKS} blocks") as e:
        verify_commit({**body, "blocks": over}, s.key.public_key)
    assert e.value.reason == "bad_car"
    sync = s.sync_body()
    sync_car = read_car(sync["blocks"])
    over = write_car(sync_car.roots, list(sync_car.blocks.items()) + _junk_blocks(MAX_COMMIT_BLOCKS))
    with pytest.raises(BadCar, match="blocks"):
        verify_sync(over, s.key.public_key)
    verify_sync(sync["blocks"], s.key.public_key)


def test_repo_block_limit(sim):
    s, _ = sim
    car = s.get_repo_car()
    n = len(read_car(car).blocks)
    assert verify_repo(car, s.key.public_key, s.did, max_blocks=n).record_count == len(s.records)
    with pytest.raises(BadCar, match=f"more than {n - 1} blocks"):
        verify_repo(car, s.key.public_key, s.did, max_blocks=n - 1)


# --------------------------------------------------------------------------- ops per commit


def test_commit_ops_limit(sim):
    s, ev = sim
    body = ev.decoded()
    many = body["ops"] + [{"action": "delete", "path": f"app.bsky.feed.like/3k{i:011d}", "cid": None,
                           "prev": body["ops"][0].get("cid") or body["ops"][0].get("prev")}
                          for i in range(MAX_COMMIT_OPS + 1 - len(body["ops"]))]
    assert len(many) == MAX_COMMIT_OPS + 1
    with pytest.raises(BadOp, match=f"{MAX_COMMIT_OPS + 1} ops, more than {MAX_COMMIT_OPS}"):
        verify_commit({**body, "ops": many}, s.key.public_key)


# --------------------------------------------------------------------------- MST height


def deep_commit(chain: int) -> dict:
    """A signed #commit whose MST root is ``chain`` empty nodes, each only pointing at the next,
    above a leaf holding the created record (the root's height is then ``chain`` + the key's)."""
    rec = cbor.encode({"$type": "app.bsky.feed.post", "text": "deep", "createdAt": "2024-01-01T00:00:00.000Z"})
    rc = cid_for_dag_cbor(rec)
    path = "app.bsky.feed.post/3kdeepdeepdee"
    leaf = cbor.encode({"l": None, "e": [{"p": 0, "k": path.encode(), "v": cbrrr.CID(rc), "t": None}]})
    cur = cid_for_dag_cbor(leaf)
    blocks = [(cur, leaf), (rc, rec)]
    for _ in range(chain):
        node = cbor.encode({"l": cbrrr.CID(cur), "e": []})
        cur = cid_for_dag_cbor(node)
        blocks.append((cur, node))
    rev = make_tid(1_700_000_000_000_000)
    ccid, cblock = _signed(cur, rev)
    return {"repo": DID, "rev": rev, "time": "2024-01-01T00:00:00.000Z", "seq": 1,
            "blocks": write_car([ccid], [(ccid, cblock)] + blocks[::-1]),
            "ops": [{"action": "create", "path": path, "cid": rc, "prev": None}],
            "prevData": cid_for_dag_cbor(b"\xa0"), "_height": chain + key_height(path.encode())}


def test_mst_height_limit_commit():
    """Before the limit, a 3000-node chain made the inversion recurse into a RecursionError, which
    escaped verify_commit (only VerificationError is documented) and was an internal error upstream."""
    evt = deep_commit(3000)
    with pytest.raises(BadMST, match=f"layers tall, more than {MAX_MST_HEIGHT}") as e:
        verify_commit(evt, PRIV.public_key)
    assert e.value.reason == "bad_mst"
    # a chain under the limit is merely an MST that does not invert to prevData
    shallow = deep_commit(MAX_MST_HEIGHT - 20)
    assert shallow["_height"] <= MAX_MST_HEIGHT
    with pytest.raises(Exception) as e:
        verify_commit(shallow, PRIV.public_key)
    assert e.value.reason in ("inversion_mismatch", "proof_incomplete", "bad_mst"), e.value
    assert not isinstance(e.value, RecursionError)


def real_env(tmp_path):
    """RepoLogic with the real verifier over a real RocksDB (tests.repo_support)."""
    from operators.repo import RepoLogic
    from tests.repo_support import Env

    env = Env(tmp_path / "data")
    env.logic = RepoLogic(env.db, env.cfg, env.ids, clock=env.clock, rand=lambda: 0.5)
    return env


def test_mst_height_limit_repo_and_repo_logic(tmp_path):
    from operators.items import AddRepo, FirehoseCommit
    from protocol.cid import cid_to_str

    evt = deep_commit(3000)
    with pytest.raises(BadMST):
        verify_repo(evt["blocks"], PRIV.public_key)
    # through RepoLogic: a counted verification failure, not an internal error
    env = real_env(tmp_path)
    env.process(AddRepo(DID))
    env.sync_repo(DID, make_tid(1_600_000_000_000_000), cid_to_str(cid_for_dag_cbor(b"\xa0")), {},
                  key=PRIV.public_key.multibase())
    body = {k: v for k, v in evt.items() if not k.startswith("_")}
    out = env.process(FirehoseCommit(seq=1, did=DID, body=body))
    assert [(r.reason, r.extra.get("verify")) for r in out] == [("verify_failed", "bad_mst")]
    assert env.records(DID) == {} and env.outbox(DID)[-1]["type"] == "identity"
