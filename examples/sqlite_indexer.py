"""A minimal indexer: the records of the tracked repos into SQLite, fed by /channel.

    python examples/sqlite_indexer.py --db records.db [--url http://127.0.0.1:2480]
                                      [--password PW] [--add DID ...] [--max N]

Every event is applied in its own transaction and acked after the commit, so a crash
loses nothing (the unacked event is delivered again) and replays are harmless: writes
are upserts and deletes keyed by (did, collection, rkey). Per repo, Tap never delivers an
event before the live event preceding it was acked, so one record's writes arrive in order.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a checkout, not installed: use it

from tapflow_client import IdentityEvent, RecordEvent, SyncTapClient, TapError

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  did TEXT NOT NULL, collection TEXT NOT NULL, rkey TEXT NOT NULL,
  cid TEXT, rev TEXT NOT NULL, record TEXT, live INTEGER NOT NULL,
  PRIMARY KEY (did, collection, rkey));
CREATE TABLE IF NOT EXISTS repos (
  did TEXT PRIMARY KEY, handle TEXT NOT NULL, status TEXT NOT NULL, is_active INTEGER NOT NULL);
"""


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


def apply(db: sqlite3.Connection, ev: RecordEvent | IdentityEvent) -> None:
    """Apply one event idempotently, in one transaction."""
    with db:
        if isinstance(ev, RecordEvent):
            if ev.action == "delete":
                db.execute("DELETE FROM records WHERE did=? AND collection=? AND rkey=?",
                           (ev.did, ev.collection, ev.rkey))
            else:
                db.execute(
                    "INSERT INTO records (did, collection, rkey, cid, rev, record, live) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT (did, collection, rkey) DO UPDATE SET cid=excluded.cid, rev=excluded.rev,"
                    " record=excluded.record, live=excluded.live",
                    (ev.did, ev.collection, ev.rkey, ev.cid, ev.rev,
                     None if ev.record is None else json.dumps(ev.record), int(ev.live)))
        else:
            db.execute(
                "INSERT INTO repos (did, handle, status, is_active) VALUES (?,?,?,?) ON CONFLICT (did) DO UPDATE"
                " SET handle=excluded.handle, status=excluded.status, is_active=excluded.is_active",
                (ev.did, ev.handle, ev.status, int(ev.is_active)))
            if ev.status == "deleted":  # Tap forgets a deleted account without record events
                db.execute("DELETE FROM records WHERE did=?", (ev.did,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="records.db")
    p.add_argument("--url", default=os.environ.get("TAP_URL", "http://127.0.0.1:2480"))
    p.add_argument("--password", default=os.environ.get("TAP_ADMIN_PASSWORD"))
    p.add_argument("--add", nargs="*", default=[], metavar="DID", help="track these repos first")
    p.add_argument("--max", type=int, default=0, help="stop after N events (0: run until Ctrl-C)")
    args = p.parse_args()

    with SyncTapClient(args.url, args.password) as tap:
        tap.health()                   # fail now, clearly, if the service is down or the password wrong
        db = open_db(args.db)
        if args.add:
            tap.add_repos(args.add)
        n = 0
        with tap.iter_events() as events:
            for ev in events:          # the previous event is acked when the loop asks for this one
                apply(db, ev)
                n += 1
                if args.max and n >= args.max:
                    break              # leaving the `with` normally acks the last one too
    print(f"applied {n} events to {args.db}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except TapError as e:
        sys.exit(str(e))
