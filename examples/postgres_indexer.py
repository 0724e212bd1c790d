"""A minimal indexer into Postgres, fed by /channel (asyncio + psycopg 3).

    pip install "psycopg[binary]"
    python examples/postgres_indexer.py --dsn postgresql://localhost/tap [--url http://127.0.0.1:2480]
                                        [--password PW] [--add DID ...]

Each event is applied in one transaction and acked after the commit: a crash loses nothing
(the unacked event comes again) and replays are harmless (upserts and deletes by key).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a checkout, not installed: use it

from tapflow_client import IdentityEvent, RecordEvent, TapClient, TapError

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  did TEXT NOT NULL, collection TEXT NOT NULL, rkey TEXT NOT NULL,
  cid TEXT, rev TEXT NOT NULL, record JSONB, live BOOLEAN NOT NULL,
  PRIMARY KEY (did, collection, rkey));
CREATE TABLE IF NOT EXISTS repos (
  did TEXT PRIMARY KEY, handle TEXT NOT NULL, status TEXT NOT NULL, is_active BOOLEAN NOT NULL);
"""


def _psycopg():
    try:
        import psycopg
        from psycopg.types.json import Jsonb
    except ImportError:
        sys.exit('this example needs psycopg 3: pip install "psycopg[binary]"')
    return psycopg, Jsonb


async def apply(conn, ev: RecordEvent | IdentityEvent, Jsonb) -> None:
    async with conn.transaction():
        if isinstance(ev, RecordEvent):
            if ev.action == "delete":
                await conn.execute("DELETE FROM records WHERE did=%s AND collection=%s AND rkey=%s",
                                   (ev.did, ev.collection, ev.rkey))
            else:
                await conn.execute(
                    "INSERT INTO records (did, collection, rkey, cid, rev, record, live)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (did, collection, rkey) DO UPDATE"
                    " SET cid=EXCLUDED.cid, rev=EXCLUDED.rev, record=EXCLUDED.record, live=EXCLUDED.live",
                    (ev.did, ev.collection, ev.rkey, ev.cid, ev.rev,
                     None if ev.record is None else Jsonb(ev.record), ev.live))
        else:
            await conn.execute(
                "INSERT INTO repos (did, handle, status, is_active) VALUES (%s,%s,%s,%s) ON CONFLICT (did)"
                " DO UPDATE SET handle=EXCLUDED.handle, status=EXCLUDED.status, is_active=EXCLUDED.is_active",
                (ev.did, ev.handle, ev.status, ev.is_active))
            if ev.status == "deleted":  # Tap forgets a deleted account without record events
                await conn.execute("DELETE FROM records WHERE did=%s", (ev.did,))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL", "postgresql://localhost/tap"))
    p.add_argument("--url", default=os.environ.get("TAP_URL", "http://127.0.0.1:2480"))
    p.add_argument("--password", default=os.environ.get("TAP_ADMIN_PASSWORD"))
    p.add_argument("--add", nargs="*", default=[], metavar="DID", help="track these repos first")
    args = p.parse_args()

    psycopg, Jsonb = _psycopg()
    async with await psycopg.AsyncConnection.connect(args.dsn) as conn:
        await conn.execute(SCHEMA)
        await conn.commit()
        async with TapClient(args.url, args.password) as tap:
            await tap.health()  # fail now, clearly, if the service is down or the password wrong
            if args.add:
                await tap.add_repos(args.add)
            # the handler returns -> acked; raises -> logged, not acked, delivered again later
            await tap.channel(lambda ev: apply(conn, ev, Jsonb)).run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except TapError as e:
        sys.exit(str(e))
