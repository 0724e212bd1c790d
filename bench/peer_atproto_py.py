"""The Python atproto SDK's firehose parsing (PyPI ``atproto``, no verification) on the replay
upstream; started by ``bench/peers.py`` in its own venv (``$HOME/.cache/tapflow-bench/venv-atproto``).

    venv-atproto/bin/python bench/peer_atproto_py.py WS_BASE_URI N_COMMITS

What the SDK's firehose example does per message: ``parse_subscribe_repos_message``, then for a
commit ``CAR.from_bytes(blocks)`` and ``models.get_or_create`` of every created/updated record.
No signature, no MST, no block-hash check. Prints one JSON line (counts, times, CPU).
"""

import json
import sys
import threading
import time

from atproto import CAR, FirehoseSubscribeReposClient, models, parse_subscribe_repos_message


def main() -> None:
    base_uri, want = sys.argv[1], int(sys.argv[2])
    client = FirehoseSubscribeReposClient(base_uri=base_uri)
    st = {"commits": 0, "records": 0, "errors": 0, "t_first": 0.0, "t_half": 0.0}
    done = threading.Event()
    t0 = time.monotonic()
    c0 = time.process_time()

    def on_message(message) -> None:
        if done.is_set():
            return
        try:
            commit = parse_subscribe_repos_message(message)
            if not isinstance(commit, models.ComAtprotoSyncSubscribeRepos.Commit):
                return
            car = CAR.from_bytes(commit.blocks)
            for op in commit.ops:
                if op.action in ("create", "update") and op.cid:
                    raw = car.blocks.get(op.cid)
                    if raw is not None:
                        models.get_or_create(raw, strict=False)
                        st["records"] += 1
        except Exception as e:  # count, keep going
            st["errors"] += 1
            if st["errors"] < 5:
                print(repr(e), file=sys.stderr)
        st["commits"] += 1
        if not st["t_first"]:
            st["t_first"] = time.monotonic()
        if st["commits"] == want // 2:
            st["t_half"] = time.monotonic()
        if st["commits"] >= want:
            st["t_last"] = time.monotonic()
            st["cpu_s"] = time.process_time() - c0
            done.set()
            client.stop()

    th = threading.Thread(target=lambda: client.start(on_message), daemon=True)
    th.start()
    done.wait(float(sys.argv[3]) if len(sys.argv) > 3 else 600)
    st.setdefault("t_last", time.monotonic())
    st.setdefault("cpu_s", time.process_time() - c0)
    print(json.dumps({"commits": st["commits"], "records": st["records"], "errors": st["errors"],
                      "t_first_s": st["t_first"] - t0 if st["t_first"] else None, "t_last_s": st["t_last"] - t0,
                      "t_half_s": st["t_half"] - t0 if st["t_half"] else None, "cpu_s": st["cpu_s"]}), flush=True)


if __name__ == "__main__":
    main()
