"""The two databases of a data dir belong together: refuse a pair that does not.

``delivery/`` holds positions in ``flow/``: ack batches name outbox ids, the follower's cursors
are outbox ids, the flow's command cursor counts ``commands`` rows. If ``flow/`` is removed
(to start over) and ``delivery/`` kept, the new flow hands out the same ids again: old ack
batches would delete new, undelivered events and the follower would skip them. So the flow
database gets a random *incarnation* when it is created, the delivery database records the
incarnation it works for, and a flow process whose pair disagrees does not start (exit 2,
saying which directory to remove). A removed ``delivery/`` is harmless (the outbox is
delivered again from its start: at least once) and simply adopts the flow's incarnation.
"""

from __future__ import annotations

import os
from pathlib import Path

from store.db import Database, open_delivery_db, open_flow_db

#: flow ``meta`` / delivery ``dmeta``: the flow database's incarnation (32 hex digits).
INCARNATION = b"incarnation"


class PairingError(RuntimeError):
    """``flow/`` and ``delivery/`` of one data dir come from different flow databases."""


def flow_incarnation(flow: Database) -> bytes | None:
    return flow.cf("meta").get(INCARNATION)


def delivery_incarnation(delivery: Database) -> bytes | None:
    return delivery.cf("dmeta").get(INCARNATION)


def check_pairing(data_dir: str | Path) -> bytes:
    """Flow process, before the delivery child starts: the flow's incarnation (created with a
    new flow database); PairingError when ``delivery/`` belongs to another one."""
    flow = open_flow_db(data_dir)
    mine = flow_incarnation(flow)
    theirs = None
    if (Path(data_dir) / "delivery" / "CURRENT").exists():
        delivery = open_delivery_db(data_dir, secondary=True)
        delivery.catch_up()
        theirs = delivery_incarnation(delivery)
    if theirs is not None and theirs != mine:
        what = "is new (it was removed or replaced)" if mine is None else "belongs to another flow database"
        raise PairingError(
            f"{Path(data_dir) / 'flow'} {what}, but {Path(data_dir) / 'delivery'} still holds acks and cursors "
            f"for flow database {theirs.decode(errors='replace')}: applied to this one they would drop undelivered "
            f"events. Remove {Path(data_dir) / 'delivery'} as well (its events are delivered again from the outbox), "
            f"or restore the flow directory it belongs to.")
    if mine is None:
        mine = os.urandom(16).hex().encode()
        batch = flow.batch()
        batch.put(INCARNATION, mine, flow.handle("meta"))
        flow.write(batch, sync=True)
    return mine


def adopt_incarnation(flow: Database, delivery: Database) -> None:
    """Delivery child, before it reads or writes anything of the flow's: record the flow's
    incarnation (first start, or ``delivery/`` removed); PairingError if it is another one."""
    flow.catch_up()
    mine = flow_incarnation(flow)
    if mine is None:  # the flow process writes it before it starts the child: a tool or a test's database
        return
    theirs = delivery_incarnation(delivery)
    if theirs == mine:
        return
    if theirs is not None:
        raise PairingError(f"{delivery.path} works for flow database {theirs.decode(errors='replace')}, "
                           f"not {mine.decode()}")
    batch = delivery.batch()
    batch.put(INCARNATION, mine, delivery.handle("dmeta"))
    delivery.write(batch, sync=True)
