"""Outbox rows as the delivery side sees them."""

from __future__ import annotations

from store.layout import FLAG_IDENTITY, FLAG_INTERNAL, FLAG_LIVE, decode_outbox_row, parse_outbox_key

_FIELDS = ("key", "shard", "id", "did", "flags", "payload")


class OutboxEvent:
    """One outbox row: ``key`` (shard|id) is what acks name; ``payload`` is the wire JSON.

    A plain ``__slots__`` class, not a frozen dataclass: the delivery child builds one per
    row read, and a frozen dataclass's ``__init__`` (six ``object.__setattr__`` calls) was its
    largest cost. Treat instances as immutable all the same; equality and hash are by value.
    """

    __slots__ = _FIELDS

    def __init__(self, key: bytes, shard: int, id: int, did: str, flags: int, payload: bytes) -> None:
        self.key = key
        self.shard = shard
        self.id = id
        self.did = did
        self.flags = flags
        self.payload = payload

    @property
    def live(self) -> bool:
        return bool(self.flags & FLAG_LIVE)

    @property
    def identity(self) -> bool:
        return bool(self.flags & FLAG_IDENTITY)

    @property
    def internal(self) -> bool:
        return bool(self.flags & FLAG_INTERNAL)

    def _astuple(self) -> tuple:
        return (self.key, self.shard, self.id, self.did, self.flags, self.payload)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not OutboxEvent:
            return NotImplemented
        return self is other or self._astuple() == other._astuple()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        return ("OutboxEvent(key=%r, shard=%r, id=%r, did=%r, flags=%r, payload=%r)"
                % self._astuple())

    @classmethod
    def from_row(cls, key: bytes, row: bytes) -> "OutboxEvent":
        shard, event_id = parse_outbox_key(key)
        did, flags, payload = decode_outbox_row(row)
        return cls(key, shard, event_id, did, flags, payload)
