"""End to end: repos added while the firehose is live are downloaded exactly once.

BackfillSource tells RepoLogic when it is about to call getRepo (``FetchStarted``, Tap's
claim); from then on the repo is ``resyncing`` and its live commits are buffered, then
drained onto the snapshot. Before that, a commit arriving between the start of getRepo and
the applied snapshot was ignored (the repo was still ``pending``), the next one failed its
prevData check and the repo was downloaded a second time.

The upstream is bench/replay.py (relay, PLC, PDS in one; ``repo_state="head"``: getRepo
answers the repo as of the commits published so far); the official client adds the repos,
the stream (300 commits/s) is released at once and the client reads ``/channel``. Without
the claim this took 32-52 getRepo calls for the 30 repos (most runs), and repos whose last
commits fell between getRepo and the snapshot stayed stale (no later commit to notice).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.replay import ReplayData, ReplayServer
from tests.e2e_support import make_service, start_client, state_from_events

pytestmark = pytest.mark.e2e

REPOS, RECORDS, COMMITS, RATE = 30, 200, 3000, 300


@pytest.fixture(scope="module")
def data() -> ReplayData:
    return ReplayData.generate(repos=REPOS, records=RECORDS, commits=COMMITS, seed=11)


def test_repos_added_while_live_are_fetched_once(data: ReplayData, tmp_path: Path):
    srv = ReplayServer(data, rate=RATE, hold=True, repo_state="head").start()
    final = {did: srv.records_at(did) for did in data.dids}
    svc = make_service(None, tmp_path, TAP_RELAY_URL=srv.url, TAP_PLC_URL=srv.url,
                       TAP_HANDLE_RESOLVER=f"xrpc:{srv.url}").start()
    client = start_client(svc, tmp_path, data.dids)
    try:
        srv.release()  # live commits flow while the repos are being fetched
        svc.wait_for(lambda: all(state_from_events(client.events()).get(d, {}) == final[d] for d in data.dids),
                     timeout=180, interval=0.5, what="consumer state equal to every repo's final state")

        def all_active() -> bool:
            for d in data.dids:
                status, body = svc.api("GET", f"/info/{d}")
                if status != 200 or body.get("state") != "active":
                    return False
            return True

        svc.wait_for(all_active, timeout=30, what="every repo active")
        calls = {d: srv.requests[("getRepo", d)] for d in data.dids}
        print(f"\ngetRepo calls: {sum(calls.values())} for {len(calls)} repos")
        assert sum(calls.values()) == len(data.dids), {d: n for d, n in calls.items() if n != 1}
        assert svc.proc.poll() is None
    finally:
        client.stop()
        svc.stop()
        srv.stop()
