"""Outbox rows as the delivery side sees them."""

from __future__ import annotations

from dataclasses import dataclass

from store.layout import FLAG_IDENTITY, FLAG_INTERNAL, FLAG_LIVE, decode_outbox_row, parse_outbox_key


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One outbox row: ``key`` (shard|id) is what acks name; ``payload`` is the wire JSON."""

    key: bytes
    shard: int
    id: int
    did: str
    flags: int
    payload: bytes

    @property
    def live(self) -> bool:
        return bool(self.flags & FLAG_LIVE)

    @property
    def identity(self) -> bool:
        return bool(self.flags & FLAG_IDENTITY)

    @property
    def internal(self) -> bool:
        return bool(self.flags & FLAG_INTERNAL)

    @classmethod
    def from_row(cls, key: bytes, row: bytes) -> "OutboxEvent":
        shard, event_id = parse_outbox_key(key)
        did, flags, payload = decode_outbox_row(row)
        return cls(key, shard, event_id, did, flags, payload)
