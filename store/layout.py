"""The RocksDB layout: column families, key encodings, row formats.

Two databases live under ``TAP_DATA_DIR``:

``flow/`` (written only by the dataflow process; the delivery process reads it as a
RocksDB *secondary* instance):

- ``repos``      ``did`` -> ``RepoState`` (orjson)
- ``records``    ``did \\0 collection/rkey`` -> binary CID: what we believe each repo holds
- ``outbox``     ``shard u16 BE | id u64 BE`` -> outbox row (see ``encode_outbox_row``).
                 Within one shard, rows are committed in id order (one writer per shard),
                 so a reader can follow each shard with a cursor.
- ``resync_buf`` ``did \\0 seq u64 BE`` -> buffered live commit (orjson), while a repo resyncs
- ``fetch_q``    ``priority u8 | not_before u64 BE (unix s) | did`` -> orjson request
                 ``{"kind": "repo"|"identity", ...}``. Priority 0 identity refresh, then
                 Tap's claim order: 1 pending, 2 desynchronized, 3 error.
- ``meta``       cursors, id reservation, per-shard counters (see ``meta_*`` helpers)

``delivery/`` (written only by the delivery process; the dataflow reads it as secondary):

- ``commands``   ``seq u64 BE`` -> orjson ``{"op": "add"|"remove", "dids": [...]}``
- ``acks``       ``ackbatch/ | batch no u64 BE`` -> the 10-byte outbox keys (``shard u16 | id
                 u64``) of one flush, concatenated: events every delivery target has taken.
                 Batch numbers increase across restarts (``dmeta`` ``acks/batch``). The flow's
                 ControlSource processes batches in order after its cursor (flow ``meta``
                 ``control/ackbatch``, which is also what it publishes back); the delivery
                 child deletes batch rows up to that number. Keys of exactly 10 bytes are the
                 per-event rows of older versions: converted into batches once at start.
- ``dmeta``      delivery-side counters and state (``commands/seq``, ``acks/batch``)

Counters that several threads would update live per shard (``count/<name>/<shard>``) or
per single writer, so no read-modify-write races exist; readers sum them.
"""

from __future__ import annotations

import struct
import zlib

FLOW_CFS = ("repos", "records", "outbox", "resync_buf", "fetch_q", "meta")
DELIVERY_CFS = ("commands", "acks", "dmeta")

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

SEP = b"\x00"

PRIO_IDENTITY = 0
PRIO_PENDING = 1
PRIO_DESYNC = 2
PRIO_ERROR = 3


def shard_of(did: str, shards: int) -> int:
    """Stable shard of a DID (crc32, never Python's per-process ``hash``)."""
    return zlib.crc32(did.encode()) % shards


# --- records / resync buffer ---------------------------------------------------

def did_prefix(did: str) -> bytes:
    """Prefix of every per-DID key (records, resync buffer)."""
    return did.encode() + SEP


def record_key(did: str, path: str) -> bytes:
    return did.encode() + SEP + path.encode()


def record_path(key: bytes) -> str:
    """The ``collection/rkey`` part of a records key."""
    return key[key.index(SEP) + 1:].decode()


def resync_buf_key(did: str, seq: int) -> bytes:
    return did.encode() + SEP + _U64.pack(seq)


# --- outbox ----------------------------------------------------------------------

FLAG_LIVE = 0x01
FLAG_IDENTITY = 0x02
# Not for clients: e.g. the record paths of a deleted account, so Kafka can write tombstones.
# /channel and webhook targets take such rows as acked without sending them.
FLAG_INTERNAL = 0x04


#: ``outbox_key(shard, event_id) -> bytes`` (the struct's own pack: no Python call per row)
outbox_key = struct.Struct(">HQ").pack


def parse_outbox_key(key: bytes) -> tuple[int, int]:
    """(shard, event id) of an outbox key."""
    return _U16.unpack_from(key, 0)[0], _U64.unpack_from(key, 2)[0]


def shard_prefix(shard: int) -> bytes:
    return _U16.pack(shard)


def encode_outbox_row(did: str, flags: int, payload: bytes) -> bytes:
    """Row = flags byte | did | \\0 | payload (the exact JSON sent to clients)."""
    return outbox_row_head(did, flags) + payload


def outbox_row_head(did: str, flags: int) -> bytes:
    """The row up to the payload: writers of many rows of one DID build it once."""
    return bytes((flags,)) + did.encode() + SEP


def decode_outbox_row(row: bytes) -> tuple[str, int, bytes]:
    """(did, flags, payload) of an outbox row."""
    i = row.index(SEP, 1)
    return row[1:i].decode(), row[0], row[i + 1:]


# --- fetch queue -------------------------------------------------------------------

def fetch_key(priority: int, not_before: int, did: str) -> bytes:
    return bytes((priority,)) + _U64.pack(max(0, int(not_before))) + did.encode()


def parse_fetch_key(key: bytes) -> tuple[int, int, str]:
    """(priority, not_before, did) of a fetch-queue key."""
    return key[0], _U64.unpack_from(key, 1)[0], key[9:].decode()


# --- meta ----------------------------------------------------------------------------

META_ID_RESERVED = b"ids/reserved"
META_CONTROL_CURSOR = b"control/cursor"
#: Highest ack batch (``data/delivery`` ``acks``) whose outbox rows ControlSource has deleted.
META_ACKS_DONE = b"control/ackbatch"


def meta_cursor_firehose(relay_url: str) -> bytes:
    return b"cursor/firehose/" + relay_url.encode()


def meta_cursor_list_repos(relay_url: str) -> bytes:
    return b"cursor/listrepos/" + relay_url.encode()


def meta_cursor_collection(relay_url: str, collection: str) -> bytes:
    return b"cursor/collection/" + relay_url.encode() + SEP + collection.encode()


def meta_counter(name: str, shard: int) -> bytes:
    """Per-shard counter key; the shard's single writer owns it."""
    return b"count/" + name.encode() + b"/" + _U16.pack(shard)


def meta_counter_prefix(name: str) -> bytes:
    return b"count/" + name.encode() + b"/"


#: Every shard's ``count/outbox/<shard>`` in one value (u64 BE per shard, shard order), written
#: by RepoLogic in the same WriteBatch as the counters it repeats: the delivery child reads this
#: one key per step instead of one per shard (a 64-key multi-get was ~70 µs of each 5 ms step).
#: Absent (data written by an older version): readers fall back to the per-shard keys.
META_OUTBOX_COUNTS = b"countvec/outbox"


def pack_counts(values: list[int]) -> bytes:
    """``META_OUTBOX_COUNTS``'s value for ``values`` (one per shard)."""
    return struct.pack(">%dQ" % len(values), *values)


def unpack_counts(raw: bytes, n: int) -> tuple[int, ...]:
    """The ``n`` values ``pack_counts`` packed; struct.error for any other length."""
    return struct.unpack(">%dQ" % n, raw)


#: Outbox rows deleted after every target took them (one writer: ControlSource's AckApplier);
#: outbox depth = sum(count/outbox/*) - this.
OUTBOX_ACKED = "outbox_acked"


def meta_cmd_applied(shard: int) -> bytes:
    """Highest control-command seq the shard's RepoLogic has applied."""
    return b"cmdapplied/" + _U16.pack(shard)


def meta_firehose_applied(shard: int) -> bytes:
    """Highest firehose seq whose item the shard's RepoLogic has applied (the firehose cursor
    is saved only up to what every shard involved has applied)."""
    return b"fhapplied/" + _U16.pack(shard)


def pack_u64(n: int) -> bytes:
    return _U64.pack(n)


def unpack_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def decode_counter(raw: bytes | None) -> int:
    """A counter or cursor value: 8-byte big-endian (signed/unsigned agree for >= 0) or ASCII digits."""
    if not raw:
        return 0
    if len(raw) == 8:
        return int.from_bytes(raw, "big", signed=True)
    try:
        return int(raw)
    except ValueError:
        return 0


def pack_i64(n: int) -> bytes:
    return _I64.pack(n)


def unpack_i64(b: bytes) -> int:
    return _I64.unpack(b)[0]


def unpack_i64s(raw: bytes, n: int) -> tuple[int, ...]:
    """``n`` values of ``pack_i64`` back to back (counters read together); struct.error otherwise."""
    return struct.unpack(">%dq" % n, raw)


# --- delivery db ------------------------------------------------------------------------

def command_key(seq: int) -> bytes:
    return _U64.pack(seq)


ACKBATCH_PREFIX = b"ackbatch/"
OUTBOX_KEY_LEN = 10
#: ``dmeta``: the number of the last ack batch written (batch numbers never go back).
DMETA_ACK_BATCH = b"acks/batch"


def ackbatch_key(batch: int) -> bytes:
    return ACKBATCH_PREFIX + _U64.pack(batch)


def parse_ackbatch_key(key: bytes) -> int:
    return _U64.unpack_from(key, len(ACKBATCH_PREFIX))[0]


def split_outbox_keys(value: bytes) -> list[bytes]:
    """The outbox keys of an ack batch row (a trailing partial key is ignored)."""
    n = OUTBOX_KEY_LEN
    return [value[i:i + n] for i in range(0, len(value) - n + 1, n)]


def outbox_key_runs(keys: list[bytes]) -> list[tuple[bytes, bytes, int]]:
    """``(first key, key after the last, count)`` per run of consecutive outbox keys.

    Sorted and de-duplicated; keys that are not 10 bytes are dropped. A key read as an 80-bit
    big-endian number is ``shard * 2**64 + id``, so a run is a range of consecutive numbers and
    deleting ``[first, after)`` deletes exactly the keys of the run, nothing else.
    """
    from_bytes = int.from_bytes
    key_of = {from_bytes(k, "big"): k for k in keys if len(k) == OUTBOX_KEY_LEN}  # (first keys reused)
    nums = sorted(key_of)
    runs: list[tuple[bytes, bytes, int]] = []
    if not nums:
        return runs
    first = prev = nums[0]
    for x in nums[1:]:
        if x != prev + 1:
            runs.append((key_of[first], _after_key(prev), prev - first + 1))
            first = x
        prev = x
    runs.append((key_of[first], _after_key(prev), prev - first + 1))
    return runs


def _after_key(last: int) -> bytes:
    """The smallest key after the 10-byte key ``last`` (past every key for the largest one)."""
    return (last + 1).to_bytes(10, "big") if last < (1 << 80) - 1 else b"\xff" * 10 + b"\x00"
