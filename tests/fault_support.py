"""Shared parts of the crash and fault tests (test_crash_loop, test_upstream_faults,
test_downstream_faults, test_disk_full).

- ``fault_pds``: a PDS + PLC harness of their own for the session, so that killing the PDS or
  filling it with load never disturbs the other e2e tests (they use the ``pds`` fixture).
- ``LoadWriter``: ``load.mjs`` run back to back in the background (creates, updates, deletes in
  fresh accounts), each run leaving a ledger file; ``ledger()`` is what the PDS holds.
- Event bookkeeping for what a consumer received: applied state, duplicates, per-repo order.
- ``FaultyReplay``: ``bench.replay.ReplayServer`` with slow, hanging or cut-short getRepo
  answers and a PLC that fails for chosen DIDs.
- Small readers: ``/stats``, ``/info``, log lines, the delivery child's RSS, a Kafka topic.

``FULL=1`` in the environment makes the tests run their longer versions (more crashes, waits
long enough to see Tap's 60 s+ error backoff expire); ``FAULT_SEED`` changes the seed;
``FAULT_REPORT=<file>`` appends each test's figures there as a JSON line (``-s`` prints them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e_support import HARNESS, Pds, TapService, free_port, node_bin, start_client, state_from_events

FULL = os.environ.get("FULL", "") == "1"
SEED = int(os.environ.get("FAULT_SEED", "1729"))


def rng(name: str) -> random.Random:
    """A reproducible random stream per test (``FAULT_SEED`` + the test's name)."""
    return random.Random(f"{SEED}:{name}")


# --- a PDS of our own ---------------------------------------------------------------------------

@dataclass
class OwnPds(Pds):
    """A harness PDS whose ``up.sh`` gets extra settings (e.g. ``PDS_MAX_SUBSCRIPTION_BUFFER``)."""

    extra: dict = field(default_factory=dict)

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = super()._env(None)
        env.update(self.extra)
        env.update(extra or {})
        return env

    def kill_pds(self) -> None:
        """kill -9 the PDS process only (the PLC keeps the identities)."""
        self.stop_pds("KILL")

    def restart_pds(self) -> None:
        """up.sh: the PLC is still running, so the PDS comes back with its data (WIPE=0)."""
        self.start()


def start_own_pds(**extra: str) -> OwnPds:
    setup = subprocess.run(["bash", str(HARNESS / "pds" / "setup.sh")], capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        raise RuntimeError(f"harness setup failed: {setup.stderr[-3000:]}")
    pds = OwnPds(free_port(), free_port(), Path(tempfile.mkdtemp(prefix="tapflow-fault-pds-")), extra=extra)
    pds.start()
    return pds


_shared_pds: list[OwnPds] = []


@pytest.fixture(scope="session")
def fault_pds():
    """A PDS + PLC for the fault tests only (they crash it and load it), one per session.

    Each test module imports this fixture, and pytest then keeps a definition (and a session
    instance) per module: the module-level ``_shared_pds`` makes them all the same harness."""
    if not _shared_pds:
        _shared_pds.append(start_own_pds())
    pds = _shared_pds[0]
    try:
        yield pds
    finally:
        if _shared_pds:  # the first teardown (at the end of the session) stops it
            _shared_pds.clear()
            pds.stop()
            shutil.rmtree(pds.run_dir, ignore_errors=True)


def load(pds: Pds, out: Path, **env: str) -> dict:
    """One load.mjs run to its end; returns its ledger (``repos[did].records`` = {path: cid})."""
    pds.script("load.mjs", {**{k: str(v) for k, v in env.items()}, "OUT_FILE": str(out)})
    return json.loads(out.read_text())


class LoadWriter:
    """``load.mjs`` in a loop on a thread: each run creates ``accounts`` fresh accounts, writes
    ``records`` records to each (one commit each), then updates and deletes some of them.
    ``stop()`` lets the current run finish (a killed run would leave no ledger)."""

    def __init__(self, pds: Pds, tmp: Path, tag: str, *, accounts: int = 3, records: int = 25,
                 updates: float = 0.4, deletes: float = 0.2, concurrency: int = 3, max_runs: int = 1000) -> None:
        self.pds, self.tmp, self.tag = pds, tmp, tag
        self.env = {"ACCOUNTS": str(accounts), "RECORDS": str(records), "UPDATES": str(updates),
                    "DELETES": str(deletes), "CONCURRENCY": str(concurrency), "MODE": "create"}
        self.max_runs = max_runs
        self.files: list[Path] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    def start(self) -> "LoadWriter":
        self._thread = threading.Thread(target=self._loop, name=f"load-{self.tag}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set() and self.runs < self.max_runs:
            out = self.tmp / f"ledger-{self.tag}-{self.runs}.json"
            env = self.pds._env({**self.env, "TAG": f"{self.tag}{self.runs}", "OUT_FILE": str(out)})
            p = subprocess.run([node_bin(), str(HARNESS / "pds" / "load.mjs")], env=env, capture_output=True,
                               text=True, timeout=600)
            self.runs += 1
            if out.exists():
                self.files.append(out)
            if p.returncode != 0:
                self.errors.append(f"load.mjs exit {p.returncode}: {p.stdout[-500:]} {p.stderr[-500:]}")
                return

    def stop(self, timeout: float = 300) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def ledger(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for f in self.files:
            out.update({d: r["records"] for d, r in json.loads(f.read_text())["repos"].items()})
        return out

    def commits(self) -> int:
        return sum(json.loads(f.read_text())["commits"] for f in self.files)


# --- what a consumer received ------------------------------------------------------------------

class Consumer:
    """The official client reading /channel, replaced when it has exited.

    ``@atproto/tap`` 0.3.12 deadlocks when its connection drops while a handler is running: the
    ack of the event in hand is buffered until the reconnect, and the reconnect waits for the
    handler to return (``TapChannel.start`` awaits ``processWsEvent`` inside its ``for await``
    over the socket). With nothing else pending, node then exits 0 without its summary line.
    A crash of the service mid-burst triggers it nearly every time (an idle client reconnects
    fine), so tests that kill the service call ``ensure()`` after each restart: a consumer
    process that restarts, keeping what the previous one received."""

    def __init__(self, svc: TapService, tmp: Path, **env: str) -> None:
        self.svc, self.tmp, self.env = svc, tmp, {"TAP_MAX_RECONNECT_S": "1", **env}
        self.runs = [start_client(svc, tmp, **self.env)]
        self.replaced = 0

    def ensure(self) -> None:
        if self.runs[-1].proc.poll() is not None:
            self.replaced += 1
            self.runs.append(start_client(self.svc, self.tmp, **self.env))

    def events(self) -> list[dict]:
        out: list[dict] = []
        for r in self.runs:
            out.extend(r.events())
        return out

    def stop(self) -> None:
        for r in self.runs:
            r.stop()


# What a consumer applying every delivery in order holds: did -> {path: cid}.
apply_events = state_from_events


def state_diff(got: dict[str, dict[str, str]], want: dict[str, dict[str, str]]) -> dict:
    """Per DID: paths missing, extra or with another CID (empty dict = equal)."""
    out = {}
    for did in sorted(set(got) | set(want)):
        g, w = got.get(did, {}), want.get(did)
        if w is None:
            if g:
                out[did] = {"untracked_but_delivered": len(g)}
            continue
        missing = sorted(set(w) - set(g))
        extra = sorted(set(g) - set(w))
        wrong = sorted(p for p in set(w) & set(g) if w[p] != g[p])
        if missing or extra or wrong:
            out[did] = {"missing": missing[:5], "n_missing": len(missing), "extra": extra[:5], "n_extra": len(extra),
                        "wrong_cid": wrong[:5], "n_wrong": len(wrong)}
    return out


def duplicates(events: list[dict]) -> int:
    """Deliveries beyond the first of each event id."""
    return len(events) - len({e["id"] for e in events})


def live_order_violations(events: list[dict]) -> list[tuple]:
    """Per repo, live record events (first delivery of each id) must never go back in rev."""
    seen: set[int] = set()
    last: dict[str, str] = {}
    bad = []
    for e in events:
        if e["type"] != "record" or not e["live"] or e["id"] in seen:
            continue
        seen.add(e["id"])
        if e["rev"] < last.get(e["did"], ""):
            bad.append((e["did"], last[e["did"]], e["rev"], e["id"]))
        last[e["did"]] = max(last.get(e["did"], ""), e["rev"])
    return bad


def id_order_violations(events: list[dict]) -> list[tuple]:
    """Per repo, first deliveries of live events come in increasing id order, and no event of a
    repo is first delivered before an earlier live event of that repo (the barrier)."""
    seen: set[int] = set()
    last_live: dict[str, int] = {}
    bad = []
    for e in events:
        if e["id"] in seen:
            continue
        seen.add(e["id"])
        d = e["did"]
        if e["id"] < last_live.get(d, -1):
            bad.append((d, last_live[d], e["id"]))
        if e["type"] == "record" and e["live"]:
            last_live[d] = max(last_live.get(d, -1), e["id"])
    return bad


def from_wire(payload: bytes | str) -> dict:
    """A Tap event as it travels (``{"id","type",<type>:{...}}``) in the client's flat shape."""
    obj = json.loads(payload)
    body = dict(obj[obj["type"]])
    body["id"], body["type"] = obj["id"], obj["type"]
    if "is_active" in body:
        body["isActive"] = body.pop("is_active")
    return body


# --- the service from outside ------------------------------------------------------------------

def stat(svc: TapService, name: str) -> int:
    """``/stats/<name>`` as a number (outbox-buffer, repo-count, ...)."""
    status, body = svc.api("GET", f"/stats/{name}")
    assert status == 200, (name, status, body)
    return int(next(iter(body.values())))


def firehose_cursor(svc: TapService) -> int:
    status, body = svc.api("GET", "/stats/cursors")
    assert status == 200, body
    return int(body["firehose"])


def info(svc: TapService, did: str) -> dict:
    status, body = svc.api("GET", f"/info/{did}")
    return body if status == 200 else {}


def log_lines(svc: TapService) -> list[dict]:
    out = []
    try:
        text = svc.log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def delivery_pid(svc: TapService) -> int | None:
    """The delivery child of the running service (``python -m connectors.delivery_main``)."""
    if svc.proc is None:
        return None
    for pid in children_of(svc.proc.pid):
        try:
            if b"connectors.delivery_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def wait_until(pred, timeout: float, what: str, interval: float = 0.25, svc: TapService | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    tail = ("\n" + svc.log_tail(40)) if svc is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r}){tail}")


class Timer:
    """Wall time of named phases, printed at the end of a test (-s shows them)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))

    def report(self, **figures) -> str:
        phases = ", ".join(f"{w} {t:.1f}s" for w, t in self.marks)
        line = f"[{self.name}] {json.dumps(figures, sort_keys=True)} | {phases}"
        print(line)
        if os.environ.get("FAULT_REPORT"):  # figures of every test, one JSON line each
            with open(os.environ["FAULT_REPORT"], "a") as f:
                f.write(json.dumps({"test": self.name, "seconds": round(time.monotonic() - self.t0, 1),
                                    "phases": self.marks, **figures}) + "\n")
        return line


# --- Kafka ---------------------------------------------------------------------------------------

def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every message of every partition of ``topic``, from the start to the end (no group join)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        return []
    parts = sorted(md.partitions)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, eof = [], set()
    deadline = time.monotonic() + timeout
    try:
        while len(eof) < len(parts):
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic} timed out ({len(eof)}/{len(parts)} partitions)")
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise AssertionError(str(m.error()))
            out.append(m)
    finally:
        c.close()
    return out


def kafka_events(bootstrap: str, topic: str) -> list[dict]:
    """The events topic in per-partition offset order (per-DID order, since the key is the DID)."""
    msgs = sorted(read_topic(bootstrap, topic), key=lambda m: (m.partition(), m.offset()))
    return [from_wire(m.value()) for m in msgs]


# --- a misbehaving upstream ----------------------------------------------------------------------

def _replay_server_class():
    from bench.replay import ReplayServer

    return ReplayServer


class FaultyReplay(_replay_server_class()):
    """``ReplayServer`` plus getRepo faults per DID: ``slow[did] = s`` answers after s seconds
    (longer than the fetch timeout = a timeout), ``cut[did] = n`` sends half of the CAR and
    drops the connection n times, ``plc_down`` = DIDs whose PLC document answers 503 until
    removed (``plc_refuse`` = every PLC request fails).

    Stream: ``one_shot`` = stream positions of injected frames (e.g. an error frame) that are
    served once: a subscriber resuming right before one skips it (otherwise a relay would send
    the same ``ConsumerTooSlow`` on every reconnect). ``head_pos`` = where a subscriber without
    a cursor starts (a live head; the base server replays from the oldest frame)."""

    def __init__(self, *a, one_shot: tuple[int, ...] = (), head_pos: int | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.slow: dict[str, float] = {}
        self.cut: dict[str, int] = {}
        self.plc_down: set[str] = set()
        self.plc_refuse = False
        self.one_shot = set(one_shot)
        self.head_pos = head_pos

    def _start_pos(self, cursor):
        if cursor is None and self.head_pos is not None:
            return self.head_pos
        pos = super()._start_pos(cursor)
        while pos in self.one_shot and self.head > pos:
            pos += 1
        return pos

    async def _get_repo(self, request):
        from aiohttp import web

        did = request.query.get("did", "")
        delay = self.slow.get(did)
        if delay:
            await asyncio.sleep(delay)
        if self.cut.get(did, 0) > 0:
            self.cut[did] -= 1
            self.requests[("getRepo", did)] += 1
            car = self.car_at(did, self._served_index(did))
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/vnd.ipld.car",
                                                           "Content-Length": str(len(car))})
            await resp.prepare(request)
            await resp.write(car[: len(car) // 2])
            await asyncio.sleep(0.05)
            request.transport.abort()
            return resp
        return await super()._get_repo(request)

    async def _plc(self, request):
        from aiohttp import web

        did = request.match_info["did"]
        if self.plc_refuse or did in self.plc_down:
            self.requests[("plc", did)] += 1
            if self.plc_refuse:
                request.transport.abort()
            return web.json_response({"message": "PLC unavailable"}, status=503)
        return await super()._plc(request)
