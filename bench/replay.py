"""A cheap synthetic atproto upstream on loopback: relay, PDS, PLC and handle resolver in one.

Point tapflow at it with ``TAP_RELAY_URL=<url> TAP_PLC_URL=<url> TAP_HANDLE_RESOLVER=xrpc:<url>``.
The data come from :mod:`bench.gen` (``RepoSim``): N repos of M records, then K live commits
(creates, updates, deletes) whose ``#commit`` frames chain with ``prevData``. Everything a
subscriber reads is encoded once, WebSocket framing included, into one byte buffer; sending is
a ``transport.write`` of a slice of it (frame-aligned chunks of about 256 KiB), so serving costs
next to nothing per frame.

Routes (one aiohttp app; extra PDS ports serve the same app, see ``pds_count``):

- ``GET /{did}``: the PLC directory. A DID document in the current Multikey form: ``#atproto``
  key of the repo's signing key, ``#atproto_pds`` service = the repo's PDS URL, ``alsoKnownAs``
  ``at://user<i>.replay.test``.
- ``GET /xrpc/com.atproto.sync.getRepo?did=``: the repo's CAR. Which state (``repo_state``):
  ``"head"`` (default) = after the DID's last commit that has been sent to any subscriber so far
  (a PDS is never behind the relay: a fresh subscriber plus a snapshot always converge);
  ``"initial"`` = before any live commit; ``"final"`` = after all of them.
- ``GET /xrpc/com.atproto.sync.listRepos?limit=&cursor=`` (cursor = last DID of the page).
- ``GET /xrpc/com.atproto.identity.resolveHandle?handle=``.
- ``GET /xrpc/com.atproto.sync.subscribeRepos?cursor=`` (WebSocket): frames with ``seq > cursor``;
  without a cursor, from the oldest frame (a replay, not a live head). A cursor past the last
  seq gets a ``FutureCursor`` error frame. As fast as the client reads (``rate=0``) or ``rate``
  frames a second per connection. The connection stays open (idle) after the last frame.
  ``hold=True`` makes the stream wait at position 0 until :meth:`ReplayServer.release`
  (tests: track and backfill first, then let live commits flow).
- ``POST /_replay/release?upto=N`` (N frames; all when absent), ``GET /_replay/stats``,
  ``GET /_replay/dids``: control for a harness in another process.

Fault injection (tests):

- ``inject=[Inject(at, kind)]`` at construction: ``"forged"`` = a copy of base frame ``at`` whose
  first create/update writes a different record (``forged: true``), signed by a wrong key, placed
  just before it (same rev and prevData, a valid proof: only the signature is wrong;
  ``ReplayServer.forged`` has the key and the record's CID);
  ``"garbage"`` = bytes that are not CBOR; ``"truncated"`` = the first half of a copy of base
  frame ``at``; ``"raw"`` = ``data`` as given. Every frame that decodes gets a seq of its own; the
  others carry none.
- :meth:`ReplayServer.corrupt_car` (a flipped byte in a block for a DID, the next ``times``
  getRepo calls), :meth:`ReplayServer.fail` (an HTTP status, e.g. 429 or 500, for an endpoint and
  optionally one DID, ``times`` times), :meth:`ReplayServer.drop_connection_at` (write half of
  the frame at a position, then drop the TCP connection without a close frame).

Data are generated once and cached on disk (``cache_dir``, e.g. ``$HOME/.cache/tapflow-bench``)
keyed by the parameters; a cache file holds the initial CARs and the commit frames (later
states are rebuilt from those on demand).

Example::

    from bench.replay import ReplayData, ReplayServer, Inject
    data = ReplayData.load_or_generate(repos=10, records=100, commits=500, cache_dir=None)
    with ReplayServer(data, inject=[Inject(40, "forged")], hold=True) as srv:
        print(srv.url)                 # TAP_RELAY_URL, TAP_PLC_URL, xrpc:<url>
        srv.release()                  # let the stream flow
        print(srv.records_at(data.dids[0]))   # the true final state {path: cid}

CLI (prints its URLs as one JSON line, serves until killed)::

    python -m bench.replay --repos 100 --records 500 --commits 5000 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import os
import pickle
import random
import signal
import sys
import threading
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import cbrrr
from aiohttp import web

from bench.gen import RepoSim, encode_frame, make_did, random_writes
from protocol import cbor
from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.keys import K256, PrivateKey

__all__ = ["ReplayData", "RepoInfo", "ReplayServer", "Inject", "handle_for", "main"]

FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("TAPFLOW_BENCH_CACHE", Path.home() / ".cache" / "tapflow-bench"))

# Base frames are encoded once with this seq and spliced with the real one when a server
# assembles its stream (injected frames shift the numbering). 2**63 - 15 encodes as 1b + 8 bytes;
# the 13-byte pattern "seq" + that value cannot occur by chance.
_SEQ_SENTINEL = (1 << 63) - 15
_SEQ_PATTERN = b"\x63seq\x1b" + _SEQ_SENTINEL.to_bytes(8, "big")
_COMMIT_HEADER = cbor.encode({"op": 1, "t": "#commit"})
_CHUNK = 256 * 1024  # bytes per transport.write (frame-aligned)
GARBAGE = b"\xff\xfe this is not DAG-CBOR \x00\x01"


def handle_for(i: int) -> str:
    return f"user{i}.replay.test"


def _cbor_uint(n: int) -> bytes:
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x18, n))
    if n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return b"\x1b" + n.to_bytes(8, "big")


def _ws_binary(payload: bytes) -> bytes:
    """An unmasked, final, binary WebSocket frame (server to client)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 0x10000:
        head = bytes((0x82, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 127)) + n.to_bytes(8, "big")
    return head + payload


def _ws_payload(frame: bytes | memoryview) -> bytes:
    """The payload of a frame built by :func:`_ws_binary`."""
    n = frame[1] & 0x7F
    return bytes(frame[2 if n < 126 else 4 if n == 126 else 10:])


# ----------------------------------------------------------------------------- data


@dataclass
class RepoInfo:
    """One account: identity, signing key, its CAR before any live commit."""

    did: str
    handle: str
    curve: str
    secret: bytes
    car0: bytes
    rev0: str
    commit0: bytes  # commit CID of car0
    extra_blocks: dict[bytes, bytes] = field(default_factory=dict, repr=False)  # see ReplayData.generate

    @property
    def key(self) -> PrivateKey:
        return PrivateKey.from_bytes(self.curve, self.secret)


@dataclass
class ReplayData:
    """Repos and the ``#commit`` frames of their live commits (base stream, no faults)."""

    params: dict
    repos: list[RepoInfo]
    frames: list[bytes]  # frame bytes with the seq sentinel
    seq_at: array  # offset of the sentinel's CBOR int in each frame
    frame_repo: array  # repo index of each frame

    @property
    def dids(self) -> list[str]:
        return [r.did for r in self.repos]

    def frames_of(self, did: str) -> list[int]:
        """Base frame indexes of ``did``'s commits, in order."""
        i = self.repo_index(did)
        return [k for k, r in enumerate(self.frame_repo) if r == i]

    def repo_index(self, did: str) -> int:
        idx = getattr(self, "_idx", None)
        if idx is None:
            idx = self._idx = {r.did: i for i, r in enumerate(self.repos)}
        return idx[did]

    def frame(self, i: int, seq: int) -> bytes:
        """Base frame ``i`` with ``seq``."""
        f, p = self.frames[i], self.seq_at[i]
        return f[:p] + _cbor_uint(seq) + f[p + 9:]

    # -- generation and cache

    @classmethod
    def generate(cls, repos: int, records: int, commits: int, seed: int = 0, curve: str = K256,
                 progress: Callable[[str], None] | None = None) -> "ReplayData":
        rng = random.Random(seed)
        sims: list[RepoSim] = []
        secrets: list[bytes] = []
        t0 = time.time()
        for i in range(repos):
            secret = rng.randbytes(31) + b"\x01"
            secrets.append(secret)
            sims.append(RepoSim.create(n_records=records, seed=seed * 1_000_003 + i,
                                       did=make_did(seed * 1_000_003 + i), key=PrivateKey.from_bytes(curve, secret)))
            if progress and (i + 1) % 1000 == 0:
                progress(f"{i + 1}/{repos} repos ({time.time() - t0:.0f}s)")
        infos = []
        avail: list[set] = []
        for i, sim in enumerate(sims):
            car0 = sim.get_repo_car()
            infos.append(RepoInfo(sim.did, handle_for(i), curve, secrets[i], car0, sim.rev, sim.commit_cid))
            avail.append(set(read_car(car0).blocks))
        frames: list[bytes] = []
        seq_at = array("I")
        frame_repo = array("I")
        crng = random.Random(seed + 1)
        for k in range(commits):
            i = crng.randrange(repos)
            sim = sims[i]
            ev = sim.commit(random_writes(sim, crng))
            f = ev.frame(_SEQ_SENTINEL)
            p = f.index(_SEQ_PATTERN) + 4
            frames.append(f)
            seq_at.append(p)
            frame_repo.append(i)
            avail[i].update(read_car(ev.body["blocks"]).blocks)
            if progress and (k + 1) % 10_000 == 0:
                progress(f"{k + 1}/{commits} commits ({time.time() - t0:.0f}s)")
        # Blocks a later state needs that no CAR carried (normally none: a commit's CAR holds
        # every node its ops touched). Kept so any state can be rebuilt from the cache alone.
        for i, sim in enumerate(sims):
            infos[i].extra_blocks = {c: b for c, b in sim.blocks.items() if c not in avail[i]}
        params = {"repos": repos, "records": records, "commits": commits, "seed": seed, "curve": curve}
        return cls(params, infos, frames, seq_at, frame_repo)

    @staticmethod
    def cache_path(cache_dir: str | Path, repos: int, records: int, commits: int, seed: int = 0,
                   curve: str = K256) -> Path:
        return Path(cache_dir) / f"replay-v{FORMAT_VERSION}-r{repos}-m{records}-c{commits}-s{seed}-{curve}.pkl"

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        state = {"version": FORMAT_VERSION, "params": self.params,
                 "repos": [(r.did, r.handle, r.curve, r.secret, r.car0, r.rev0, r.commit0, r.extra_blocks)
                           for r in self.repos],
                 "frames": self.frames, "seq_at": self.seq_at.tobytes(), "frame_repo": self.frame_repo.tobytes()}
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=5)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "ReplayData":
        with open(path, "rb") as f:
            state = pickle.load(f)  # our own cache file
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: cache format {state.get('version')}, expected {FORMAT_VERSION}")
        repos = [RepoInfo(*t) for t in state["repos"]]
        seq_at, frame_repo = array("I"), array("I")
        seq_at.frombytes(state["seq_at"])
        frame_repo.frombytes(state["frame_repo"])
        return cls(state["params"], repos, state["frames"], seq_at, frame_repo)

    @classmethod
    def load_or_generate(cls, repos: int, records: int, commits: int, seed: int = 0, curve: str = K256,
                         cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                         progress: Callable[[str], None] | None = None) -> "ReplayData":
        """From ``cache_dir`` when cached there, else generated (and cached when ``cache_dir``)."""
        if cache_dir is not None:
            path = cls.cache_path(cache_dir, repos, records, commits, seed, curve)
            if path.exists():
                try:
                    return cls.load(path)
                except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
                    if progress:
                        progress(f"ignoring unreadable cache {path}: {e}")
        data = cls.generate(repos, records, commits, seed, curve, progress)
        if cache_dir is not None:
            data.save(path)
        return data


@dataclass
class Inject:
    """A frame put into the stream before base frame ``at`` (``at`` = number of base frames: at the end).

    kind: ``"forged"`` (base frame ``at`` with one record changed, signed by a wrong key), ``"garbage"``,
    ``"truncated"`` (first half of base frame ``at``), ``"raw"`` (``data``; a seq is not added).
    """

    at: int
    kind: str
    data: bytes = b""


def _forge(body_bytes: bytes, curve: str, seed: bytes) -> tuple[dict, PrivateKey, bytes | None]:
    """``body_bytes`` (a ``#commit`` body) with its first create/update writing a different
    record, and the commit signed by a wrong key. The proof stays valid (the MST path is
    re-encoded, inverting still gives ``prevData``): only the signature is wrong.

    Returns (body, the wrong key, the forged record's CID or None when the commit only deletes).
    """
    from protocol.mst import MST

    body = cbrrr.decode_dag_cbor(body_bytes)
    car = read_car(body["blocks"])
    root = car.roots[0]
    commit = cbrrr.decode_dag_cbor(car.blocks[root])
    blocks = {c: b for c, b in car.blocks.items() if c != root}
    forged_cid = None
    for op in body["ops"]:
        if op["action"] in ("create", "update") and op["cid"] is not None:
            record = cbrrr.decode_dag_cbor(blocks[op["cid"].cid_bytes])
            record_block = cbor.encode({**record, "forged": True})
            forged_cid = cid_for_dag_cbor(record_block)
            tree = MST.load(dict(blocks), commit["data"].cid_bytes)
            tree.insert(op["path"].encode(), forged_cid)
            new_nodes: dict[bytes, bytes] = {}
            commit["data"] = cbrrr.CID(tree.root_cid(out=new_nodes))
            blocks.update(new_nodes)
            blocks[forged_cid] = record_block
            op["cid"] = cbrrr.CID(forged_cid)
            break
    unsigned = {k: v for k, v in commit.items() if k != "sig"}
    wrong = PrivateKey.from_bytes(curve, hashlib.sha256(b"forged" + seed).digest()[:31] + b"\x01")
    block = cbor.encode({**unsigned, "sig": wrong.sign(cbor.encode(unsigned))})
    cid = cid_for_dag_cbor(block)
    body["blocks"] = write_car([cid], [(cid, block)] + list(blocks.items()))
    body["commit"] = cbrrr.CID(cid)
    return body, wrong, forged_cid


# ----------------------------------------------------------------------------- server


class _Conn:
    __slots__ = ("transport", "t0", "sent", "pos", "cursor")

    def __init__(self, transport, pos: int, cursor: int | None) -> None:
        self.transport = transport
        self.t0 = time.monotonic()
        self.sent = 0
        self.pos = pos
        self.cursor = cursor


class ReplayServer:
    """The upstream (see module doc). ``start()``/``stop()`` run it on a thread of its own;
    ``await start_async()``/``stop_async()`` run it on the caller's loop."""

    def __init__(self, data: ReplayData, *, host: str = "127.0.0.1", port: int = 0, pds_count: int = 1,
                 pds_of: dict[str, int] | Callable[[str], int] | None = None, rate: float = 0.0,
                 hold: bool = False, repo_state: str = "head", inject: Iterable[Inject] = (),
                 first_seq: int = 1, keep_source: bool = True) -> None:
        if repo_state not in ("head", "initial", "final"):
            raise ValueError("repo_state must be head, initial or final")
        self.data = data
        self.host = host
        self.port = port
        self.pds_count = max(1, pds_count)
        self.rate = float(rate)
        self.repo_state = repo_state
        self._pds_of = pds_of
        self._ports: list[int] = []
        self._did_index = {r.did: i for i, r in enumerate(data.repos)}
        self._handles = {r.handle: r.did for r in data.repos}
        self._sorted_dids = sorted(self._did_index)
        self._build_stream(list(inject), first_seq)
        self._limit = 0 if hold else self.n_frames
        self.head = 0  # frames written to any subscriber (the "published" position)
        # faults
        self._corrupt: dict[str, int] = {}
        self._fails: dict[tuple[str, str | None], list[int]] = {}
        self._drops: dict[int, int] = {}
        # stats
        self.requests: Counter = Counter()  # (endpoint, did or "") -> count
        self.frames_sent = 0
        self.bytes_sent = 0
        self.connections = 0
        self.cursors: list[int | None] = []
        self._conns: set[_Conn] = set()
        # caches for rebuilt states
        self._stores: OrderedDict[str, dict] = OrderedDict()
        self._cars: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._heads: dict[tuple[str, int], tuple[str, bytes, bytes]] = {}
        self._docs: dict[str, bytes] = {}
        # loop plumbing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._more: asyncio.Event | None = None
        if not keep_source:
            data.frames = []

    # -- the stream

    def _build_stream(self, inject: list[Inject], first_seq: int) -> None:
        data = self.data
        n_base = len(data.frames)
        by_at: dict[int, list[Inject]] = {}
        for inj in inject:
            if not 0 <= inj.at <= n_base:
                raise ValueError(f"inject position {inj.at} outside 0..{n_base}")
            if inj.kind in ("forged", "truncated") and inj.at >= n_base:
                raise ValueError(f"{inj.kind} needs a base frame at {inj.at}")
            if inj.kind not in ("forged", "garbage", "truncated", "raw"):
                raise ValueError(f"unknown inject kind {inj.kind!r}")
            by_at.setdefault(inj.at, []).append(inj)
        blob = bytearray()
        offs = array("Q", [0])
        keys = array("q")  # 2*seq for a frame with a seq, 2*previous seq + 1 otherwise (cursor lookup)
        seqs = array("q")  # seq of each frame, -1 when it has none
        base_pos = array("Q")  # stream position of each base frame
        kinds: dict[int, str] = {}  # stream position -> inject kind
        #: stream position of each forged frame -> (DID, the wrong key, CID of the forged record)
        self.forged: dict[int, tuple[str, Any, str | None]] = {}
        seq = first_seq - 1

        def add(payload: bytes, s: int | None) -> None:
            blob.extend(_ws_binary(payload))
            offs.append(len(blob))
            keys.append(2 * s if s is not None else 2 * seq + 1)
            seqs.append(s if s is not None else -1)

        for i in range(n_base + 1):
            for inj in by_at.get(i, ()):
                kinds[len(seqs)] = inj.kind
                if inj.kind == "forged":
                    did = data.repos[data.frame_repo[i]].did
                    f = data.frames[i]
                    body, wrong, rec = _forge(f[len(_COMMIT_HEADER):], data.repos[data.frame_repo[i]].curve,
                                              did.encode() + i.to_bytes(4, "big"))
                    self.forged[len(seqs)] = (did, wrong.public_key, cid_to_str(rec) if rec else None)
                    seq += 1
                    body["seq"] = seq
                    add(encode_frame("#commit", body), seq)
                elif inj.kind == "truncated":
                    f = data.frame(i, seq + 1)
                    add(f[: len(f) // 2], None)
                elif inj.kind == "garbage":
                    add(GARBAGE, None)
                else:
                    add(bytes(inj.data), None)
            if i < n_base:
                seq += 1
                base_pos.append(len(seqs))
                add(data.frame(i, seq), seq)
        self._blob = bytes(blob)
        self._mv = memoryview(self._blob)
        self._offs = offs
        self._keys = keys
        self.seqs = seqs
        self.base_pos = base_pos
        self.injected = kinds
        self.last_seq = seq
        # per repo: stream positions of its commits
        per: list[array] = [array("Q") for _ in data.repos]
        for i, r in enumerate(data.frame_repo):
            per[r].append(base_pos[i])
        self._repo_pos = per

    @property
    def n_frames(self) -> int:
        return len(self._offs) - 1

    def frame_bytes(self, pos: int) -> bytes:
        """The frame (DAG-CBOR header + body) at stream position ``pos``."""
        return _ws_payload(self._mv[self._offs[pos]:self._offs[pos + 1]])

    def position_of_seq(self, seq: int) -> int:
        i = bisect.bisect_left(self._keys, 2 * seq)
        if i >= len(self._keys) or self._keys[i] != 2 * seq:
            raise KeyError(seq)
        return i

    def release(self, upto: int | None = None) -> None:
        """Let the stream run to position ``upto`` (all frames when None)."""
        self._limit = self.n_frames if upto is None else max(0, min(int(upto), self.n_frames))
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        ev = self._more
        if ev is not None:
            ev.set()
        self._more = asyncio.Event()

    # -- faults

    def corrupt_car(self, did: str, times: int = 1) -> None:
        """The next ``times`` getRepo answers for ``did`` have one byte flipped in a block."""
        self._corrupt[did] = self._corrupt.get(did, 0) + times

    def fail(self, endpoint: str, status: int, times: int = 1, did: str | None = None) -> None:
        """Answer ``status`` to the next ``times`` calls of ``endpoint`` (``getRepo``, ``listRepos``,
        ``resolveHandle``, ``subscribeRepos``, ``plc``), for ``did`` only when given."""
        self._fails.setdefault((endpoint, did), []).extend([status] * times)

    def drop_connection_at(self, pos: int, times: int = 1) -> None:
        """When a subscriber reaches stream position ``pos``: half of that frame, then a dropped
        TCP connection (no close frame); ``times`` connections in all."""
        self._drops[pos] = self._drops.get(pos, 0) + times

    def _take_fail(self, endpoint: str, did: str | None) -> int | None:
        for key in ((endpoint, did), (endpoint, None)) if did else ((endpoint, None),):
            q = self._fails.get(key)
            if q:
                return q.pop(0)
        return None

    # -- repo states

    def pds_url_of(self, did: str) -> str:
        p = self._pds_of
        if p is None:
            k = self._did_index[did] % self.pds_count
        elif callable(p):
            k = p(did)
        else:
            k = p.get(did, 0)
        return f"http://{self.host}:{self._ports[k % len(self._ports)]}"

    def _state_index(self, did: str, pos: int | None) -> int:
        """Index into the DID's commits of its state after stream position ``pos`` (-1: initial)."""
        ps = self._repo_pos[self._did_index[did]]
        if pos is None:
            return len(ps) - 1
        return bisect.bisect_left(ps, pos) - 1

    def _served_index(self, did: str) -> int:
        if self.repo_state == "initial":
            return -1
        if self.repo_state == "final":
            return self._state_index(did, None)
        return self._state_index(did, self.head)

    def _commit_at(self, did: str, j: int) -> tuple[str, bytes, bytes]:
        """(rev, commit CID, commit block) of the DID's state ``j``."""
        r = self.data.repos[self._did_index[did]]
        if j < 0:
            return r.rev0, r.commit0, b""
        got = self._heads.get((did, j))
        if got is None:
            pos = self._repo_pos[self._did_index[did]][j]
            body = cbor.decode_multi(self.frame_bytes(pos))[1]
            car = read_car(body["blocks"])
            root = car.roots[0]
            got = (body["rev"], root, car.blocks[root])
            if len(self._heads) > 100_000:
                self._heads.clear()
            self._heads[(did, j)] = got
        return got

    def _store(self, did: str) -> dict:
        st = self._stores.get(did)
        if st is not None:
            self._stores.move_to_end(did)
            return st
        i = self._did_index[did]
        r = self.data.repos[i]
        st = dict(read_car(r.car0).blocks)
        for pos in self._repo_pos[i]:
            body = cbor.decode_multi(self.frame_bytes(pos))[1]
            st.update(read_car(body["blocks"]).blocks)
        st.update(r.extra_blocks)
        self._stores[did] = st
        while len(self._stores) > 64:
            self._stores.popitem(last=False)
        return st

    def car_at(self, did: str, j: int | None = None) -> bytes:
        """getRepo CAR of the DID's state ``j`` (its commits applied up to j; -1 initial; None final)."""
        if j is None:
            j = self._state_index(did, None)
        if j < 0:
            return self.data.repos[self._did_index[did]].car0
        car = self._cars.get((did, j))
        if car is not None:
            self._cars.move_to_end((did, j))
            return car
        _, commit_cid, commit_block = self._commit_at(did, j)
        store = self._store(did)
        data_cid = cbor.decode(commit_block)["data"]
        blocks = [(commit_cid, commit_block)]
        stack = [data_cid]
        while stack:
            cid = stack.pop()
            block = store[cid]
            blocks.append((cid, block))
            node = cbor.decode(block)
            for e in reversed(node["e"]):
                if e.get("t"):
                    stack.append(e["t"])
            if node.get("l"):
                stack.append(node["l"])
            for e in node["e"]:
                blocks.append((e["v"], store[e["v"]]))
        car = write_car([commit_cid], blocks)
        self._cars[(did, j)] = car
        while len(self._cars) > 256:
            self._cars.popitem(last=False)
        return car

    def records_at(self, did: str, j: int | None = None) -> dict[str, str]:
        """{path: CID string} of the DID's state ``j`` (None: final), read back from its CAR."""
        from protocol.commit import verify_repo

        repo = verify_repo(self.car_at(did, j), self.data.repos[self._did_index[did]].key.public_key, did)
        return {f"{rr.collection}/{rr.rkey}": cid_to_str(rr.cid) for rr in repo.records()}

    def did_doc(self, did: str) -> dict:
        r = self.data.repos[self._did_index[did]]
        return {
            "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1",
                         "https://w3id.org/security/suites/secp256k1-2019/v1"],
            "id": did,
            "alsoKnownAs": [f"at://{r.handle}"],
            "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                    "publicKeyMultibase": r.key.public_key.multibase()}],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                         "serviceEndpoint": self.pds_url_of(did)}],
        }

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._ports[0]}"

    @property
    def pds_urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self._ports]

    def urls(self) -> dict:
        return {"url": self.url, "relay_url": self.url, "plc_url": self.url,
                "handle_resolver": f"xrpc:{self.url}", "pds_urls": self.pds_urls,
                "repos": len(self.data.repos), "frames": self.n_frames, "last_seq": self.last_seq}

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/xrpc/com.atproto.sync.subscribeRepos", self._subscribe)
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        app.router.add_get("/xrpc/com.atproto.identity.resolveHandle", self._resolve_handle)
        app.router.add_get("/xrpc/_health", self._health)
        app.router.add_post("/_replay/release", self._http_release)
        app.router.add_get("/_replay/stats", self._http_stats)
        app.router.add_get("/_replay/dids", self._http_dids)
        app.router.add_get("/{did}", self._plc)
        return app

    async def start_async(self) -> "ReplayServer":
        self._loop = asyncio.get_running_loop()
        self._more = asyncio.Event()
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        self._ports = []
        for k in range(self.pds_count):
            site = web.TCPSite(self._runner, self.host, self.port if k == 0 else 0, backlog=512)
            await site.start()
            self._ports.append(site._server.sockets[0].getsockname()[1])
        return self

    async def stop_async(self) -> None:
        for c in list(self._conns):
            c.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> "ReplayServer":
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as e:  # report to the starting thread
                err.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name="replay-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if err:
            raise err[0]
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "ReplayServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        return {"frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent, "head": self.head,
                "limit": self._limit, "frames": self.n_frames, "connections": self.connections,
                "open_connections": len(self._conns), "cursors": self.cursors[-20:],
                "requests": {f"{e}:{d}" if d else e: n for (e, d), n in self.requests.items()}}

    # -- handlers

    @staticmethod
    def _xrpc_error(status: int, error: str, message: str) -> web.Response:
        return web.json_response({"error": error, "message": message}, status=status)

    def _fault(self, endpoint: str, did: str | None) -> web.Response | None:
        status = self._take_fail(endpoint, did)
        if status is None:
            return None
        names = {429: "RateLimitExceeded", 500: "InternalServerError", 502: "UpstreamFailure",
                 503: "NotEnoughResources", 400: "InvalidRequest"}
        headers = {"ratelimit-remaining": "0", "retry-after": "1"} if status == 429 else None
        r = self._xrpc_error(status, names.get(status, "Error"), f"injected {status}")
        if headers:
            r.headers.update(headers)
        return r

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "tapflow-replay"})

    async def _plc(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        self.requests[("plc", did)] += 1
        f = self._fault("plc", did)
        if f is not None:
            return f
        if did not in self._did_index:
            return web.json_response({"message": f"DID not registered: {did}"}, status=404)
        body = self._docs.get(did)
        if body is None:
            body = self._docs[did] = json.dumps(self.did_doc(did)).encode()
        return web.Response(body=body, content_type="application/did+ld+json")

    async def _get_repo(self, request: web.Request) -> web.Response:
        did = request.query.get("did", "")
        self.requests[("getRepo", did)] += 1
        f = self._fault("getRepo", did)
        if f is not None:
            return f
        if did not in self._did_index:
            return self._xrpc_error(400, "RepoNotFound", f"Could not find repo for DID: {did}")
        car = self.car_at(did, self._served_index(did))
        n = self._corrupt.get(did, 0)
        if n > 0:
            self._corrupt[did] = n - 1
            car = car[:-1] + bytes((car[-1] ^ 0x55,))  # the last byte belongs to the last block's data
        return web.Response(body=car, content_type="application/vnd.ipld.car")

    async def _list_repos(self, request: web.Request) -> web.Response:
        self.requests[("listRepos", "")] += 1
        f = self._fault("listRepos", None)
        if f is not None:
            return f
        try:
            limit = max(1, min(int(request.query.get("limit", "500")), 1000))
        except ValueError:
            return self._xrpc_error(400, "InvalidRequest", "bad limit")
        cursor = request.query.get("cursor", "")
        dids = self._sorted_dids
        i = bisect.bisect_right(dids, cursor) if cursor else 0
        page = dids[i:i + limit]
        repos = []
        for did in page:
            rev, commit_cid, _ = self._commit_at(did, self._served_index(did))
            repos.append({"did": did, "head": cid_to_str(commit_cid), "rev": rev, "active": True})
        out: dict[str, Any] = {"repos": repos}
        if i + limit < len(dids):
            out["cursor"] = page[-1]
        return web.json_response(out)

    async def _resolve_handle(self, request: web.Request) -> web.Response:
        handle = request.query.get("handle", "").lower()
        self.requests[("resolveHandle", handle)] += 1
        f = self._fault("resolveHandle", self._handles.get(handle))
        if f is not None:
            return f
        did = self._handles.get(handle)
        if did is None:
            return self._xrpc_error(400, "InvalidRequest", "Unable to resolve handle")
        return web.json_response({"did": did})

    async def _http_release(self, request: web.Request) -> web.Response:
        upto = request.query.get("upto")
        self.release(None if upto in (None, "") else int(upto))
        return web.json_response({"limit": self._limit})

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _http_dids(self, request: web.Request) -> web.Response:
        return web.json_response([{"did": r.did, "handle": r.handle, "pds": self.pds_url_of(r.did)}
                                  for r in self.data.repos])

    def _start_pos(self, cursor: int | None) -> int:
        if cursor is None:
            return 0
        return bisect.bisect_right(self._keys, 2 * cursor)

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        self.requests[("subscribeRepos", "")] += 1
        f = self._fault("subscribeRepos", None)
        if f is not None:
            return f
        raw = request.query.get("cursor")
        try:
            cursor = int(raw) if raw not in (None, "") else None
        except ValueError:
            return self._xrpc_error(400, "InvalidRequest", "bad cursor")
        ws = web.WebSocketResponse(compress=False, autoping=True, max_msg_size=1 << 20)
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        self.connections += 1
        self.cursors.append(cursor)
        if cursor is not None and cursor > self.last_seq:
            transport.write(_ws_binary(cbor.encode({"op": -1}) + cbor.encode(
                {"error": "FutureCursor", "message": "Cursor in the future."})))
            await ws.close()
            return ws
        conn = _Conn(transport, self._start_pos(cursor), cursor)
        self._conns.add(conn)
        reader = asyncio.ensure_future(self._read_client(ws))
        try:
            await self._pump(conn, request.protocol, reader)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(conn)
            reader.cancel()
            # No close frame of ours. When the client closed, its close answer may sit behind
            # frames it no longer reads, so flushing could hang: drop the connection either way.
            if not transport.is_closing():
                transport.abort()
        return ws

    @staticmethod
    async def _read_client(ws: web.WebSocketResponse) -> None:
        async for _ in ws:  # answers pings; ends when the client goes away
            pass

    async def _pump(self, conn: _Conn, protocol: Any, reader: asyncio.Future) -> None:
        offs = self._offs
        mv = self._mv
        transport = conn.transport
        drain = getattr(protocol, "_drain_helper", None)
        rate = self.rate
        pos = conn.pos
        while not reader.done() and not transport.is_closing():
            limit = self._limit
            if pos >= limit:
                ev = self._more
                if pos < self._limit:
                    continue
                waiter = asyncio.ensure_future(ev.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            end = limit
            if rate > 0:
                allowed = int((time.monotonic() - conn.t0) * rate) - conn.sent
                if allowed <= 0:
                    await asyncio.sleep(max(1.0 / rate, 0.005))
                    continue
                end = min(end, pos + allowed)
            end = min(end, max(pos + 1, bisect.bisect_right(offs, offs[pos] + _CHUNK, pos + 1) - 1))
            drop = -1
            if self._drops:
                for d, n in self._drops.items():
                    if n > 0 and pos <= d < end:
                        end, drop = d, d
                        break
            if end > pos:
                transport.write(mv[offs[pos]:offs[end]])
                self.frames_sent += end - pos
                self.bytes_sent += offs[end] - offs[pos]
                conn.sent += end - pos
                pos = conn.pos = end
                if end > self.head:
                    self.head = end
            if drop >= 0 and pos == drop:
                self._drops[drop] -= 1
                half = offs[drop] + (offs[drop + 1] - offs[drop]) // 2
                transport.write(mv[offs[drop]:half])
                transport.abort()
                return
            if drain is not None:
                if getattr(protocol, "writing_paused", True):
                    # the client is not reading: wait for it, or for it to go away
                    d = asyncio.ensure_future(drain())
                    await asyncio.wait({d, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if not d.done():
                        d.cancel()
                    elif d.exception() is not None:
                        return
            else:
                while transport.get_write_buffer_size() > _CHUNK and not transport.is_closing():
                    await asyncio.sleep(0.001)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repos", type=int, default=100)
    ap.add_argument("--records", type=int, default=500, help="records per repo")
    ap.add_argument("--commits", type=int, default=5000, help="live commits in the stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--pds-count", type=int, default=1, help="PDS hosts (extra ports) the repos are spread over")
    ap.add_argument("--rate", type=float, default=0.0, help="frames/s per subscriber (0 = as fast as it reads)")
    ap.add_argument("--hold", action="store_true", help="stream waits for POST /_replay/release")
    ap.add_argument("--repo-state", default="head", choices=("head", "initial", "final"))
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="'' = no cache")
    args = ap.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    data = ReplayData.load_or_generate(args.repos, args.records, args.commits, args.seed,
                                       cache_dir=args.cache_dir or None, progress=progress)
    load_s = time.time() - t0
    srv = ReplayServer(data, host=args.host, port=args.port, pds_count=args.pds_count, rate=args.rate,
                       hold=args.hold, repo_state=args.repo_state, keep_source=False)
    serve_until_signalled(srv, load_s)


def serve_until_signalled(srv: "ReplayServer", load_s: float) -> None:
    """Start ``srv``, print its URLs as one JSON line (what a parent process waits for), serve
    until SIGTERM/SIGINT."""

    async def serve() -> None:
        await srv.start_async()
        print(json.dumps({**srv.urls(), "load_s": round(load_s, 2), "pid": os.getpid()}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await srv.stop_async()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
