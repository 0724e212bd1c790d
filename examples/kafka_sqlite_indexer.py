"""The SQLite indexer fed from Kafka instead of /channel (tapflow with TAP_KAFKA_BOOTSTRAP).

    python examples/kafka_sqlite_indexer.py --bootstrap 127.0.0.1:9092 --group my-indexer
                                            [--topic tap.events] [--db records.db] [--max N]

tapflow keys ``tap.events`` by DID, so one repo's events stay in one partition, in order;
run more copies with the same --group to split the partitions between them. Offsets are
committed only for events whose transaction committed (at-least-once; writes are upserts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a checkout, not installed: use it

from sqlite_indexer import apply, open_db  # examples/sqlite_indexer.py

from tapflow_client.kafka import kafka_events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--group", default="tapflow-sqlite-indexer")
    p.add_argument("--topic", default="tap.events")
    p.add_argument("--db", default="records.db")
    p.add_argument("--max", type=int, default=0, help="stop after N events (0: run until Ctrl-C)")
    p.add_argument("--idle-exit", type=float, default=None, help="stop after this many seconds without events")
    args = p.parse_args()

    db = open_db(args.db)
    n = 0
    with kafka_events(args.bootstrap, args.group, args.topic, idle_timeout=args.idle_exit,
                      session_timeout_ms=6000) as events:
        for ev in events:              # its offset is committed only after this body returned
            apply(db, ev)
            n += 1
            if args.max and n >= args.max:
                break
    print(f"applied {n} events to {args.db}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
