"""Tap's event wire format (spec/tap-behavior.md §5): the exact JSON that /channel, the
webhook and Kafka carry.

Events are built in two steps because the id is assigned only when the event is written to
the outbox: ``record_body``/``identity_body`` build the inner object once, ``with_id`` wraps it.
Everything emitted here must pass the official client's strict parser (spec/tap-client.md
§1.7): no empty handle, no null fields, ``record``/``cid`` omitted rather than empty.
"""

from __future__ import annotations

import orjson

ACCOUNT_STATUSES = frozenset({"active", "takendown", "suspended", "deactivated", "deleted"})
INVALID_HANDLE = "handle.invalid"


def record_body(*, live: bool, did: str, rev: str, collection: str, rkey: str, action: str,
                cid: str | None = None, record_json: bytes | None = None) -> bytes:
    """Inner ``record`` object. ``record_json`` is the record already in atproto JSON
    (``protocol.atjson``); deletes carry neither record nor cid."""
    obj: dict = {"live": live, "did": did, "rev": rev, "collection": collection, "rkey": rkey, "action": action}
    if action != "delete":
        if record_json is not None:
            obj["record"] = orjson.Fragment(record_json)
        if cid:
            obj["cid"] = cid
    return orjson.dumps(obj)


def identity_body(*, did: str, handle: str, is_active: bool, status: str) -> bytes:
    """Inner ``identity`` object; an empty handle becomes ``handle.invalid`` (never ``""``)."""
    if status not in ACCOUNT_STATUSES:
        raise ValueError(f"not an account status Tap clients accept: {status!r}")
    return orjson.dumps({"did": did, "handle": handle or INVALID_HANDLE, "is_active": is_active, "status": status})


ID_HEAD = b'{"id":'


def kind_mid(kind: str) -> bytes:
    """What follows the id in an event of ``kind``: ``,"type":kind,kind:`` (the body and ``}`` follow)."""
    k = kind.encode()
    return b',"type":"' + k + b'","' + k + b'":'


def with_id(event_id: int, kind: str, body: bytes) -> bytes:
    """The full event: ``{"id":N,"type":kind,kind:body}`` (``ID_HEAD``, N, ``kind_mid(kind)``, body, ``}``)."""
    return b"%b%d%b%b}" % (ID_HEAD, event_id, kind_mid(kind), body)
