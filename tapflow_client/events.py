"""Tap events as small frozen dataclasses, and the strict parser that makes them.

A frame (WebSocket text, webhook body or Kafka value) is one JSON object::

    {"id":1,"type":"record","record":{"live":false,"did":"did:plc:…","rev":"3l…",
     "collection":"app.bsky.feed.post","rkey":"3l…","action":"create","cid":"bafy…","record":{…}}}
    {"id":2,"type":"identity","identity":{"did":"did:plc:…","handle":"alice.test","is_active":true,"status":"active"}}

``parse_event`` accepts exactly what the official client (``parseTapEvent`` after a strict
``lexParse``) accepts and raises :class:`ParseError` for the rest. Records stay in their
atproto-JSON form (``{"$link": …}``, ``{"$bytes": …}``, blob objects), ready to store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from . import _lex
from .errors import ParseError

import json as _json


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _std_loads(data: str | bytes) -> Any:
    return _json.loads(data, parse_constant=_reject_constant)


try:  # orjson when installed (faster); the standard library for what it refuses
    import orjson as _orjson

    def _loads(data: str | bytes) -> Any:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            # orjson refuses lone surrogates (\ud800) that JSON.parse accepts
            return _std_loads(data)

except ImportError:  # pragma: no cover - orjson is a dependency of tapflow
    _loads = _std_loads

_JSON_ERRORS: tuple[type[BaseException], ...] = (ValueError, UnicodeDecodeError, RecursionError)

__all__ = ["RecordEvent", "IdentityEvent", "Event", "RepoInfo", "parse_event", "ACTIONS", "STATUSES"]

ACTIONS = ("create", "update", "delete")
STATUSES = ("active", "takendown", "suspended", "deactivated", "deleted")


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """A record was created, updated or deleted in a repo.

    ``live`` is True for firehose commits, False for backfill/resync output. ``record`` and
    ``cid`` are None for deletes (and ``record`` is None when Tap could not decode it).
    """

    id: int
    action: Literal["create", "update", "delete"]
    did: str
    rev: str
    collection: str
    rkey: str
    record: dict[str, Any] | None = field(default=None, hash=False)
    cid: str | None = None
    live: bool = False
    type: ClassVar[str] = "record"

    @property
    def uri(self) -> str:
        """``at://did/collection/rkey``."""
        return f"at://{self.did}/{self.collection}/{self.rkey}"

    def to_wire(self) -> dict[str, Any]:
        """The event as Tap sends it (snake_case, ``cid``/``record`` left out when None)."""
        body: dict[str, Any] = {"live": self.live, "did": self.did, "rev": self.rev,
                                "collection": self.collection, "rkey": self.rkey, "action": self.action}
        if self.record is not None:
            body["record"] = self.record
        if self.cid is not None:
            body["cid"] = self.cid
        return {"id": self.id, "type": "record", "record": body}


@dataclass(frozen=True, slots=True)
class IdentityEvent:
    """A repo's handle or account status changed (or was first seen)."""

    id: int
    did: str
    handle: str
    is_active: bool
    status: Literal["active", "takendown", "suspended", "deactivated", "deleted"]
    type: ClassVar[str] = "identity"

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "type": "identity",
                "identity": {"did": self.did, "handle": self.handle, "is_active": self.is_active,
                             "status": self.status}}


Event = Union[RecordEvent, IdentityEvent]


@dataclass(frozen=True, slots=True)
class RepoInfo:
    """``GET /info/{did}`` (and one row of ``GET /repos``)."""

    did: str
    handle: str
    state: str
    rev: str
    records: int
    error: str | None = None
    retries: int | None = None
    status: str | None = None  # tapflow adds the account status; Tap does not send it

    @classmethod
    def from_json(cls, obj: Any) -> "RepoInfo":
        """Validate like the official ``repoInfoSchema`` (extra keys allowed)."""
        if type(obj) is not dict:
            raise ParseError("repo info: not a JSON object")
        for k in ("did", "handle", "state", "rev"):
            if type(obj.get(k)) is not str:
                raise ParseError(f"repo info: {k} must be a string")
        if not _is_int(obj.get("records")):
            raise ParseError("repo info: records must be an integer")
        for k in ("error", "status"):
            if k in obj and type(obj[k]) is not str:
                raise ParseError(f"repo info: {k} must be a string when present")
        if "retries" in obj and not _is_int(obj["retries"]):
            raise ParseError("repo info: retries must be an integer when present")
        return cls(did=obj["did"], handle=obj["handle"], state=obj["state"], rev=obj["rev"],
                   records=int(obj["records"]), error=obj.get("error"),
                   retries=None if "retries" not in obj else int(obj["retries"]), status=obj.get("status"))


def _is_int(v: object) -> bool:
    if type(v) is float:
        return v.is_integer() and abs(v) <= _lex.MAX_SAFE_INTEGER
    return type(v) is int and abs(v) <= _lex.MAX_SAFE_INTEGER


def _fail(msg: str) -> ParseError:
    return ParseError(f"invalid Tap event: {msg}")


def _req_str(d: dict, key: str, where: str) -> str:
    if key not in d:
        raise _fail(f"{where}.{key} is missing")
    v = d[key]
    if type(v) is not str:
        if type(v) is dict and _lex.special_kind(v) == "link":
            # like the official client: a {"$link": cid} stands for the CID's string
            return _lex.cid_string(v["$link"])
        raise _fail(f"{where}.{key} must be a string")
    return v


def _req_bool(d: dict, key: str, where: str) -> bool:
    if key not in d:
        raise _fail(f"{where}.{key} is missing")
    v = d[key]
    if type(v) is not bool:
        raise _fail(f"{where}.{key} must be a boolean, got {v!r}")
    return v


def _obj(v: Any, where: str) -> dict:
    if type(v) is not dict or _lex.special_kind(v) != "map":
        raise _fail(f"{where} must be an object")
    return v


def parse_event(data: str | bytes | bytearray | memoryview | dict) -> Event:
    """Parse and validate one Tap event frame; raise :class:`ParseError` if it is invalid.

    ``data`` is the JSON text (str or UTF-8 bytes) or an already-decoded dict.
    """
    if isinstance(data, dict):
        obj: Any = data
    else:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        try:
            obj = _loads(data)
        except _JSON_ERRORS as e:
            raise ParseError(f"invalid Tap event: not JSON ({e})") from None
    try:
        obj = _lex.check_value(obj)
    except _lex.LexError as e:
        raise _fail(str(e)) from None
    top = _obj(obj, "the event")
    if "id" not in top:
        raise _fail("id is missing")
    eid = top["id"]
    if type(eid) is not int:
        raise _fail(f"id must be an integer, got {eid!r}")
    typ = top.get("type")
    if typ == "record":
        d = _obj(top.get("record"), "record")
        did = _req_str(d, "did", "record")
        if not _lex.is_did(did):
            raise _fail(f"record.did is not a DID: {did!r}")
        rev = _req_str(d, "rev", "record")
        coll = _req_str(d, "collection", "record")
        if not _lex.is_nsid(coll):
            raise _fail(f"record.collection is not an NSID: {coll!r}")
        rkey = _req_str(d, "rkey", "record")
        if not _lex.is_record_key(rkey):
            raise _fail(f"record.rkey is not a record key: {rkey!r}")
        action = _req_str(d, "action", "record")
        if action not in ACTIONS:
            raise _fail(f"record.action must be create, update or delete, got {action!r}")
        record = None
        if "record" in d:
            record = _obj(d["record"], "record.record")
        cid = None
        if "cid" in d:
            cid = _req_str(d, "cid", "record") if type(d["cid"]) is dict else d["cid"]
            if not _lex.is_cid_string(cid):
                raise _fail(f"record.cid is not a CID: {cid!r}")
        live = _req_bool(d, "live", "record")
        return RecordEvent(id=eid, action=action, did=did, rev=rev, collection=coll, rkey=rkey,  # type: ignore[arg-type]
                           record=record, cid=cid, live=live)
    if typ == "identity":
        d = _obj(top.get("identity"), "identity")
        did = _req_str(d, "did", "identity")
        if not _lex.is_did(did):
            raise _fail(f"identity.did is not a DID: {did!r}")
        handle = _req_str(d, "handle", "identity")
        if not _lex.is_handle(handle):
            raise _fail(f"identity.handle is not a handle: {handle!r}")
        active = _req_bool(d, "is_active", "identity")
        status = _req_str(d, "status", "identity")
        if status not in STATUSES:
            raise _fail(f"identity.status must be one of {', '.join(STATUSES)}, got {status!r}")
        return IdentityEvent(id=eid, did=did, handle=handle, is_active=active, status=status)  # type: ignore[arg-type]
    raise _fail(f"type must be 'record' or 'identity', got {typ!r}")
