"""Synthetic atproto data, produced the way a PDS would: repos, signed commits, Sync 1.1 proofs.

Reusable by benchmarks and tests (``from bench.gen import ...`` with the repo root on sys.path).

- :class:`RepoSim` is one account's repo: records, a full in-memory MST, a signing key. Its
  ``commit(writes)`` applies writes, signs a v3 commit and returns a :class:`CommitEvent` whose
  ``body`` is a firehose ``#commit`` body (links as ``cbrrr.CID``) and ``frame()`` its wire bytes.
  The CAR holds the commit block, the MST nodes needed to check the ops and invert them (found by
  running the inversion against a recording block store) and the new record blocks.
- ``RepoSim.get_repo_car()`` is what ``com.atproto.sync.getRepo`` returns.
- ``random_writes`` draws a realistic live mix (mostly single creates; some deletes and updates).
- ``make_repos`` and ``firehose_stream`` make many accounts and an interleaved ``#commit``
  stream over them (what a relay would send), for pipeline benchmarks.

Example::

    sim = RepoSim.create(n_records=10_000, seed=1)
    ev = sim.commit(random_writes(sim, rng))
    frame = ev.frame(seq=1)
    car = sim.get_repo_car()
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

import cbrrr

from protocol import cbor
from protocol.car import write_car
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.keys import K256, PrivateKey
from protocol.mst import MST

__all__ = [
    "B32_SORTABLE",
    "make_tid",
    "make_did",
    "make_record",
    "RepoSim",
    "CommitEvent",
    "random_writes",
    "encode_frame",
    "sync_frame_body",
    "make_repos",
    "firehose_stream",
]

B32_SORTABLE = "234567abcdefghijklmnopqrstuvwxyz"
_BASE_MICROS = 1_700_000_000_000_000  # late 2023

_COLLECTIONS = (
    ("app.bsky.feed.post", 0.45),
    ("app.bsky.feed.like", 0.35),
    ("app.bsky.graph.follow", 0.12),
    ("app.bsky.feed.repost", 0.08),
)
_WORDS = ("the quick brown fox jumps over lazy dog atproto bluesky firehose relay repo "
          "sync merkle search tree python bytewax kafka record commit signature today").split()


def make_tid(micros: int, clock_id: int = 0) -> str:
    """A TID: 13 base32-sortable chars of ``micros << 10 | clock_id`` (top bit zero)."""
    v = (micros << 10) | (clock_id & 0x3FF)
    out = []
    for _ in range(13):
        out.append(B32_SORTABLE[v & 31])
        v >>= 5
    return "".join(reversed(out))


def make_did(i: int) -> str:
    """A deterministic, syntactically valid did:plc for account number ``i``."""
    rng = random.Random(i * 7919 + 1)
    return "did:plc:" + "".join(rng.choice(B32_SORTABLE) for _ in range(24))


def _datetime(micros: int) -> str:
    secs, us = divmod(micros, 1_000_000)
    import time as _t

    return _t.strftime("%Y-%m-%dT%H:%M:%S", _t.gmtime(secs)) + f".{us // 1000:03d}Z"


def make_record(collection: str, rng: random.Random, micros: int) -> dict:
    """A plausible record of ``collection`` (atproto data model; links as ``cbrrr.CID``)."""
    created = _datetime(micros)
    if collection == "app.bsky.feed.post":
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))
        rec = {"$type": collection, "text": text, "createdAt": created, "langs": ["en"]}
        if rng.random() < 0.2:
            rec["reply"] = {
                "root": _strong_ref(rng),
                "parent": _strong_ref(rng),
            }
        return rec
    if collection in ("app.bsky.feed.like", "app.bsky.feed.repost"):
        return {"$type": collection, "subject": _strong_ref(rng), "createdAt": created}
    if collection == "app.bsky.graph.follow":
        return {"$type": collection, "subject": make_did(rng.randrange(1 << 30)), "createdAt": created}
    if collection == "app.bsky.actor.profile":
        return {"$type": collection, "displayName": "user " + str(rng.randrange(10**6)),
                "description": " ".join(rng.choice(_WORDS) for _ in range(12))}
    return {"$type": collection, "createdAt": created}


def _strong_ref(rng: random.Random) -> dict:
    did = make_did(rng.randrange(1 << 30))
    rkey = make_tid(_BASE_MICROS + rng.randrange(10**13))
    digest = rng.randbytes(32)
    return {"uri": f"at://{did}/app.bsky.feed.post/{rkey}",
            "cid": cid_to_str(b"\x01\x71\x12\x20" + digest)}


def encode_frame(t: str, body: dict) -> bytes:
    """A firehose message frame: header ``{op: 1, t}`` followed by the body (canonical DAG-CBOR)."""
    return cbor.encode({"op": 1, "t": t}) + cbor.encode(body)


class _RecordingStore:
    """Block source that remembers which CIDs were asked for (to cut a minimal proof)."""

    __slots__ = ("blocks", "seen")

    def __init__(self, blocks: dict) -> None:
        self.blocks = blocks
        self.seen: set = set()

    def get(self, cid: bytes) -> bytes | None:
        self.seen.add(cid)
        return self.blocks.get(cid)


@dataclass
class CommitEvent:
    """A signed commit as the firehose carries it. ``body`` uses ``cbrrr.CID`` for links."""

    body: dict
    data_cid: bytes
    prev_data: bytes
    commit_cid: bytes

    def frame(self, seq: int | None = None) -> bytes:
        body = self.body if seq is None else {**self.body, "seq": seq}
        return encode_frame("#commit", body)

    def decoded(self) -> dict:
        """The body as ``cbor.decode`` gives it to verification (links as binary CIDs)."""
        return cbor.decode(cbor.encode(self.body))


class RepoSim:
    """One account's repo on a simulated PDS."""

    def __init__(self, did: str, key: PrivateKey, seed: int = 0, micros: int = _BASE_MICROS) -> None:
        self.did = did
        self.key = key
        self.rng = random.Random(seed)
        self.micros = micros
        self.clock_id = self.rng.randrange(1024)
        self.records: dict[str, bytes] = {}  # path -> record CID
        self.paths: list[str] = []  # for random choice of existing records
        self._path_index: dict[str, int] = {}
        self.blocks: dict[bytes, bytes] = {}  # every MST node and record block ever made
        self.tree = MST.empty()
        self.rev = ""
        self.data_cid = self.tree.root_cid(out=self.blocks)
        self.commit_cid = b""
        self.commit_block = b""

    # -- construction

    @classmethod
    def create(cls, n_records: int = 0, seed: int = 0, did: str | None = None,
               key: PrivateKey | None = None, curve: str = K256) -> "RepoSim":
        """A repo with ``n_records`` records (built in one go) and a signed initial commit."""
        rng = random.Random(seed)
        if key is None:
            key = PrivateKey.from_bytes(curve, rng.randbytes(31) + b"\x01")
        sim = cls(did or make_did(seed), key, seed)
        items = []
        for _ in range(n_records):
            path, block = sim._new_record()
            cid = cid_for_dag_cbor(block)
            sim.blocks[cid] = block
            sim._add_path(path, cid)
            items.append((path.encode(), cid))
        sim.tree = MST.build(items)
        sim.data_cid = sim.tree.export_blocks(sim.blocks)
        sim._sign(sim.data_cid)
        return sim

    def _tick(self) -> int:
        self.micros += self.rng.randrange(1_000, 5_000_000)
        return self.micros

    def _new_record(self, collection: str | None = None) -> tuple[str, bytes]:
        if collection is None:
            r = self.rng.random()
            for collection, p in _COLLECTIONS:
                r -= p
                if r < 0:
                    break
        micros = self._tick()
        rkey = make_tid(micros, self.clock_id)
        rec = make_record(collection, self.rng, micros)
        return f"{collection}/{rkey}", cbor.encode(rec)

    def _add_path(self, path: str, cid: bytes) -> None:
        if path not in self.records:
            self._path_index[path] = len(self.paths)
            self.paths.append(path)
        self.records[path] = cid

    def _drop_path(self, path: str) -> None:
        del self.records[path]
        i = self._path_index.pop(path)
        last = self.paths.pop()
        if last != path:
            self.paths[i] = last
            self._path_index[last] = i

    def _sign(self, data_cid: bytes) -> None:
        rev = make_tid(self._tick(), self.clock_id)
        unsigned = {"did": self.did, "version": 3, "data": cbrrr.CID(data_cid), "prev": None, "rev": rev}
        sig = self.key.sign(cbor.encode(unsigned))
        block = cbor.encode({**unsigned, "sig": sig})
        self.rev = rev
        self.commit_block = block
        self.commit_cid = cid_for_dag_cbor(block)

    # -- commits

    def commit(self, writes: Iterable[tuple[str, str, bytes | None]]) -> CommitEvent:
        """Apply ``writes`` = (action, path, record block or None) and return the firehose event.

        ``action`` is create, update or delete; create/update need the record's DAG-CBOR block.
        """
        prev_rev = self.rev
        prev_data = self.data_cid
        tree = self.tree.copy()
        ops = []
        new_records = {}
        for action, path, block in writes:
            key = path.encode()
            if action == "delete":
                old = tree.remove(key)
                if old is None:
                    raise ValueError(f"delete of missing {path}")
                ops.append({"action": "delete", "path": path, "cid": None, "prev": cbrrr.CID(old)})
                self._drop_path(path)
                continue
            cid = cid_for_dag_cbor(block)
            old = tree.insert(key, cid)
            if action == "create" and old is not None:
                raise ValueError(f"create of existing {path}")
            if action == "update" and old is None:
                raise ValueError(f"update of missing {path}")
            new_records[cid] = block
            self.blocks[cid] = block
            ops.append({"action": action, "path": path, "cid": cbrrr.CID(cid),
                        "prev": None if old is None else cbrrr.CID(old)})
            self._add_path(path, cid)
        new_root = tree.root_cid(out=self.blocks)
        self.tree = tree
        self.data_cid = new_root
        self._sign(new_root)

        # The proof: whatever a verifier touches to check the ops and invert them.
        rec = _RecordingStore(self.blocks)
        proof_tree = MST.load(rec, new_root)
        inv = []
        for op in ops:
            k = op["path"].encode()
            cid = op["cid"].cid_bytes if op["cid"] is not None else None
            prev = op["prev"].cid_bytes if op["prev"] is not None else None
            if cid is not None:
                proof_tree.get(k)
            inv.append((k, cid, prev))
        from protocol.mst import invert_ops

        got = invert_ops(proof_tree.copy(), inv)
        assert got == prev_data, "generator bug: inversion does not give the previous root"
        car_blocks = [(self.commit_cid, self.commit_block)]
        car_blocks += [(c, self.blocks[c]) for c in sorted(rec.seen) if c in self.blocks]
        car_blocks += list(new_records.items())
        car = write_car([self.commit_cid], car_blocks)

        body = {
            "seq": 0,
            "rebase": False,
            "tooBig": False,
            "repo": self.did,
            "commit": cbrrr.CID(self.commit_cid),
            "rev": self.rev,
            "since": prev_rev or None,
            "blocks": car,
            "ops": ops,
            "blobs": [],
            "prevData": cbrrr.CID(prev_data),
            "time": _datetime(self.micros),
        }
        return CommitEvent(body, new_root, prev_data, self.commit_cid)

    def get_repo_car(self) -> bytes:
        """The repo as ``getRepo`` serves it: commit, MST nodes, records."""
        out: dict = {}
        self.tree.export_blocks(out)
        blocks = [(self.commit_cid, self.commit_block)]
        blocks += list(out.items())
        blocks += [(cid, self.blocks[cid]) for cid in self.records.values()]
        return write_car([self.commit_cid], blocks)

    def sync_body(self) -> dict:
        """A ``#sync`` body for the current commit."""
        return sync_frame_body(self.did, self.rev, self.commit_cid, self.commit_block, _datetime(self.micros))


def sync_frame_body(did: str, rev: str, commit_cid: bytes, commit_block: bytes, time: str) -> dict:
    return {"seq": 0, "did": did, "rev": rev, "time": time,
            "blocks": write_car([commit_cid], [(commit_cid, commit_block)])}


def random_writes(sim: RepoSim, rng: random.Random | None = None) -> list[tuple[str, str, bytes | None]]:
    """One live commit's writes: ~80% a single create, ~15% a delete, ~5% an update; rarely several."""
    rng = rng or sim.rng
    n = 1 if rng.random() < 0.93 else rng.randint(2, 5)
    out: list = []
    used = set()
    for _ in range(n):
        r = rng.random()
        if r < 0.80 or len(sim.paths) < 10:
            path, block = sim._new_record()
            if path in used or path in sim.records:
                continue
            out.append(("create", path, block))
        else:
            path = sim.paths[rng.randrange(len(sim.paths))]
            if path in used:
                continue
            if r < 0.95:
                out.append(("delete", path, None))
            else:
                coll = path.split("/", 1)[0]
                out.append(("update", path, cbor.encode(make_record(coll, rng, sim._tick()))))
        used.add(out[-1][1])
    if not out:
        path, block = sim._new_record()
        out.append(("create", path, block))
    return out


def make_repos(n_repos: int, records_per_repo: int | Iterable[int] = 100, seed: int = 0,
               curve: str = K256) -> list[RepoSim]:
    """``n_repos`` accounts with distinct DIDs and keys; sizes fixed or drawn per repo."""
    rng = random.Random(seed)
    sizes = ([records_per_repo] * n_repos if isinstance(records_per_repo, int)
             else list(records_per_repo))
    out = []
    for i in range(n_repos):
        key = PrivateKey.from_bytes(curve, rng.randbytes(31) + b"\x01")
        out.append(RepoSim.create(n_records=sizes[i % len(sizes)], seed=seed * 1_000_003 + i,
                                  did=make_did(seed * 1_000_003 + i), key=key))
    return out


def firehose_stream(sims: list[RepoSim], n_commits: int, seed: int = 0, first_seq: int = 1):
    """Yield ``(seq, did, frame_bytes)`` for ``n_commits`` live commits spread over ``sims``.

    Each commit continues its repo's chain (``prevData`` is the previous commit's root), so a
    consumer that saw the snapshot (``sim.get_repo_car()`` taken before) can follow them all.
    """
    rng = random.Random(seed)
    seq = first_seq
    for _ in range(n_commits):
        sim = sims[rng.randrange(len(sims))]
        ev = sim.commit(random_writes(sim, rng))
        yield seq, sim.did, ev.frame(seq)
        seq += 1
