"""Record blocks -> atproto JSON, byte for byte what Tap (Go) puts in an event's ``record``.

Go Tap decodes a record with ``atdata.UnmarshalCBOR`` (go-ipld-cbor/refmt, then atdata's
data-model checks) and marshals it with ``encoding/json``. When that decode fails it
still emits the event, without ``record``. This module reproduces both the verdict and
the bytes:

* accepted: ``{"$link": ...}`` for CID links, ``{"$bytes": <std base64, no padding>}``,
  typed blobs as ``{"$type":"blob","ref":{...},"mimeType":...,"size":...}`` (Go's struct
  field order, not sorted), legacy blobs ``{"cid":...,"mimeType":...}``, all other
  object keys sorted bytewise, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as Go does;
* rejected (``None``): > 1 MiB, top level not a map, non-integral or out-of-range
  floats, ``$type`` present but not a non-empty string, malformed blobs, ``$link`` and
  ``$bytes`` objects with extra keys or bad values, invalid CIDs in links, tags other
  than 42, undefined, duplicate keys, keys > 8 KiB, containers > 128 Ki elements;
* Go's quirks kept: integral floats become integers (``1.0`` -> ``1``), unsigned
  integers >= 2^63 wrap negative (Go ``int(uint64)``), a typed blob with a negative size
  is written as a legacy blob, ``{"$link": "<cid string>"}`` maps inside the CBOR become
  links, invalid UTF-8 becomes ``\\ufffd``, non-canonical CBOR (unsorted keys, long
  integer forms, indefinite lengths, half floats) and trailing bytes are accepted,
  a top-level CBOR ``null`` is an empty record (which Go's ``omitempty`` then drops).

Fast path: ``cbrrr`` in atjson mode (strict DAG-CBOR, does the base32/base64 in C) plus
one walk for the atdata rules, then ``orjson``. Anything cbrrr refuses goes to a small
pure-Python decoder that mirrors refmt's leniency; it is slow but only odd records take it.

Deliberate limits: nesting deeper than ``MAX_DEPTH`` is rejected (Go has no limit, but
orjson and the official TS client's recursive parser do); multibase prefixes beyond
base16/32/36/58/64 in CID *strings* are not decoded.

The official client parses events with ``lexParse(..., {strict: true})`` and rejects
the whole event on things Go happily sends (integers beyond 2^53, a blob whose ref is
not a raw CID or whose mimeType has no ``/``, a ``__proto__`` key ...), so
:func:`validate_outgoing_record` checks a record against those rules and
:func:`event_record_json` drops a record that would poison the client.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import math
import struct
from typing import Any

import cbrrr
import orjson

__all__ = [
    "MAX_RECORD_SIZE",
    "MAX_CONTAINER_LEN",
    "MAX_KEY_LEN",
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "Blob",
    "RecordError",
    "UnsafeRecord",
    "decode_record",
    "record_to_obj",
    "record_to_json_bytes",
    "dumps_record",
    "validate_outgoing_record",
    "is_client_safe",
    "event_record_json",
]

MAX_RECORD_SIZE = 1 << 20  # atdata.MAX_CBOR_RECORD_SIZE
MAX_CONTAINER_LEN = 128 * 1024  # atdata.MAX_CBOR_CONTAINER_LEN
MAX_KEY_LEN = 8192  # atdata.MAX_OBJECT_KEY_LEN, bytes
MAX_DEPTH = 250  # ours: orjson stops at 255 levels
MAX_SAFE_INTEGER = (1 << 53) - 1  # JS Number.isSafeInteger bound, what the TS client requires

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U64 = 1 << 64
_MAX_CBOR_CHUNK = 33554432  # refmt's cap on one byte/text string


class RecordError(ValueError):
    """A record block Go Tap could not decode as atproto data (the event goes out without ``record``)."""


class UnsafeRecord(ValueError):
    """A record the official TS client's strict parser would reject (it would never ack the event)."""


class _Fallback(Exception):
    """cbrrr refused the block; retry with the lenient decoder."""


class Blob(dict):
    """A typed blob. A ``dict`` (so it compares and serializes as one) kept in Go's field order."""

    __slots__ = ()


# --- CIDs as go-cid sees them ---------------------------------------------------------------


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """go-varint ``FromUvarint``: at most 9 bytes, minimal encoding required."""
    x = 0
    s = 0
    i = 0
    n = len(data)
    while pos + i < n:
        b = data[pos + i]
        if (i == 8 and b >= 0x80) or i >= 9:
            raise RecordError("varint overflow in CID")
        if b < 0x80:
            if b == 0 and s > 0:
                raise RecordError("varint not minimally encoded in CID")
            return x | (b << s), pos + i + 1
        x |= (b & 0x7F) << s
        s += 7
        i += 1
    raise RecordError("varint underflow in CID")


def _cid_check(data: bytes) -> None:
    """go-cid ``Cast``: a whole CIDv0 (sha2-256 multihash) or CIDv1, nothing trailing."""
    n = len(data)
    if n > 2 and data[0] == 0x12 and data[1] == 0x20:
        if n != 34:
            raise RecordError("invalid CIDv0 length")
        return
    version, p = _uvarint(data, 0)
    if version != 1:
        raise RecordError(f"unsupported CID version {version}")
    _, p = _uvarint(data, p)  # codec: any
    if n - p < 2:
        raise RecordError("multihash too short")
    _, p = _uvarint(data, p)  # hash function: any
    length, p = _uvarint(data, p)
    if length > 0x7FFFFFFF or length > n - p:
        raise RecordError("multihash length exceeds data")
    if p + length != n:
        raise RecordError("trailing bytes after CID")


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_B36_INDEX = {c: i for i, c in enumerate("0123456789abcdefghijklmnopqrstuvwxyz")}


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + "".join(reversed(out))


def _baseN_decode(text: str, index: dict[str, int], base: int, zero: str) -> bytes:
    n = 0
    for c in text:
        v = index.get(c)
        if v is None:
            raise RecordError("invalid character in CID string")
        n = n * base + v
    pad = len(text) - len(text.lstrip(zero))
    return b"\0" * pad + (n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b"")


def _cid_str(cid: bytes) -> str:
    """go-cid ``String``: base58btc for CIDv0, multibase base32 (lowercase) for CIDv1."""
    if len(cid) == 34 and cid[0] == 0x12 and cid[1] == 0x20:
        return _b58encode(cid)
    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


def _b32(text: str, hexalpha: bool) -> bytes:
    t = text.replace("\r", "").replace("\n", "").upper().rstrip("=")
    t += "=" * (-len(t) % 8)
    return base64.b32hexdecode(t) if hexalpha else base64.b32decode(t)


def _b64(text: str, urlsafe: bool) -> bytes:
    t = text.replace("\r", "").replace("\n", "").rstrip("=")
    if len(t) % 4 == 1:
        raise RecordError("bad base64 length")
    t += "=" * (-len(t) % 4)
    if urlsafe:
        t = t.replace("-", "+").replace("_", "/")
    return base64.b64decode(t, validate=True)


def _multibase_decode(text: str) -> bytes:
    """The multibase prefixes go-multibase knows that anyone uses."""
    prefix, body = text[0], text[1:]
    try:
        if prefix in "bBcC":
            return _b32(body, False)
        if prefix in "vVtT":
            return _b32(body, True)
        if prefix == "z":
            return _baseN_decode(body, _B58_INDEX, 58, "1")
        if prefix in "fF":
            return bytes.fromhex(body)
        if prefix in "mM":
            return _b64(body, False)
        if prefix in "uU":
            return _b64(body, True)
        if prefix in "kK":
            return _baseN_decode(body.lower(), _B36_INDEX, 36, "0")
    except (binascii.Error, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"undecodable CID string: {e}") from None
    raise RecordError(f"unsupported multibase prefix {prefix!r}")


def _cid_from_string(text: str) -> bytes:
    """go-cid ``Parse`` of a string: "/ipfs/" prefix stripped, base58 CIDv0, else multibase."""
    if "/ipfs/" in text:
        text = text.split("/ipfs/")[1]
    if len(text) < 2:
        raise RecordError("CID string too short")
    if len(text) == 46 and text.startswith("Qm"):
        data = _baseN_decode(text, _B58_INDEX, 58, "1")
        if len(data) != 34 or data[0] != 0x12 or data[1] != 0x20:
            raise RecordError("invalid CIDv0 string")
        return data
    data = _multibase_decode(text)
    _cid_check(data)
    return data


# --- fast path: cbrrr atjson output + atdata rules -----------------------------------------

_ABSENT = object()
_B32_FIRST_DIGEST_CHAR = frozenset("abcdefgh")  # 7th char: 2 zero bits of the 0x20 length byte


def _is_common_cid_str(s: str) -> bool:
    """CIDv1 sha2-256 dag-cbor/raw in canonical base32: the shape of nearly every CID, valid by construction."""
    return len(s) == 59 and s[7] in _B32_FIRST_DIGEST_CHAR and (s.startswith("bafyrei") or s.startswith("bafkrei"))


# The walk below applies atdata's rules to cbrrr's output in place. ``notes`` collects
# reasons the official TS client would refuse the record (Go would still send it), so
# event_record_json needs no second walk.


def _fast_link(d: dict, notes: list) -> dict:
    """A ``{"$link": "b..."}`` cbrrr made from tag 42: check the CID the way go-cid would."""
    s = d["$link"]
    if _is_common_cid_str(s):
        return d
    try:
        raw = _b32(s[1:], False)
    except (binascii.Error, ValueError):
        raise RecordError("undecodable link") from None
    _cid_check(raw)
    s = _cid_str(raw)
    if _client_cid(s) is None:
        notes.append("link the TS client cannot parse")
    return {"$link": s}


def _fast_int(v: int, notes: list) -> int:
    """An integer outside the JS-safe range: Go's int64 view of it, noted if still unsafe."""
    if v > _I64_MAX:
        if v >= _U64:
            raise RecordError("integer out of range")
        v -= _U64  # Go: int(uint64) wraps
    elif v < _I64_MIN:
        raise RecordError("negative integer out of int64 range")
    if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
        notes.append("integer beyond 2^53")
    return v


def _fast_blob(d: dict, notes: list) -> dict:
    if len(d) != 4:
        raise RecordError("blobs expected to have 4 fields")
    size = d.get("size")
    if type(size) is not int:
        raise RecordError("blob 'size' missing or not a number")
    if not 0 <= size <= MAX_SAFE_INTEGER:
        size = _fast_int(size, [])  # Go's wrap and range check; a negative size ends up a legacy blob
        if size > MAX_SAFE_INTEGER:
            notes.append("blob size beyond 2^53")
    mime = d.get("mimeType")
    if type(mime) is not str:
        raise RecordError("blob 'mimeType' missing or not a string")
    ref = d.get("ref", _ABSENT)
    if type(ref) is not dict or len(ref) != 1 or "$link" not in ref:
        raise RecordError("blob 'ref' is not a link")
    ref = _fast_link(ref, notes)
    link = ref["$link"]
    if size < 0:  # Go marshals Size < 0 as a legacy blob (a plain object for the TS client)
        return {"cid": link, "mimeType": mime}
    if "/" not in mime or not (link.startswith("bafkrei") or _client_raw_str(link)):
        notes.append("blob the TS client rejects (mimeType without '/' or ref not a raw CID)")
    b = Blob()
    b["$type"] = "blob"
    b["ref"] = ref
    b["mimeType"] = mime
    b["size"] = size
    return b


def _fast_legacy_blob(d: dict, notes: list) -> dict:
    mime = d["mimeType"]
    if type(mime) is not str:
        raise RecordError("blob 'mimeType' missing or not a string")
    c = d["cid"]
    if type(c) is str:
        cid = c if _is_common_cid_str(c) and c.islower() else _cid_str(_cid_from_string(c))
    elif type(c) is dict and len(c) == 1 and "$link" in c:
        cid = _fast_link(c, [])["$link"]  # becomes a plain string: nothing for the TS client to parse
    elif type(c) is dict and len(c) == 1 and "$bytes" in c:
        raw = _b64(c["$bytes"], False)
        _cid_check(raw)
        cid = _cid_str(raw)
    else:
        raise RecordError("legacy blob 'cid' is not a CID")
    return {"cid": cid, "mimeType": mime}


def _fast_map(d: dict, depth: int, notes: list) -> dict:
    n = len(d)
    if n == 1:
        # cbrrr refuses "$link"/"$bytes" keys in atjson mode, so these came from a tag 42 / byte string
        if "$link" in d:
            return _fast_link(d, notes)
        if "$bytes" in d:
            return d
    t = d.get("$type", _ABSENT)
    if t is not _ABSENT:
        if type(t) is not str or not t:
            raise RecordError("$type field must contain a non-empty string")
        if t == "blob":
            return _fast_blob(d, notes)
    elif n == 2 and "mimeType" in d and "cid" in d:
        return _fast_legacy_blob(d, notes)
    if depth >= MAX_DEPTH:
        raise RecordError("record nested too deeply")
    if "__proto__" in d:
        notes.append("key __proto__")
    for k, v in d.items():
        tv = type(v)
        if tv is str:  # most values: nothing to do
            continue
        if tv is dict:
            d[k] = _fast_map(v, depth + 1, notes)
        elif tv is list:
            _fast_list(v, depth + 1, notes)
        elif tv is int and not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
            d[k] = _fast_int(v, notes)
    return d


def _fast_list(lst: list, depth: int, notes: list) -> None:
    if depth >= MAX_DEPTH:
        raise RecordError("record nested too deeply")
    for i, v in enumerate(lst):
        tv = type(v)
        if tv is str:
            continue
        if tv is dict:
            lst[i] = _fast_map(v, depth + 1, notes)
        elif tv is list:
            _fast_list(v, depth + 1, notes)
        elif tv is int and not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
            lst[i] = _fast_int(v, notes)


def _check_sizes(v: Any) -> None:
    """Key and container limits; only big blocks can break them, so only they pay for this walk."""
    stack = [v]
    while stack:
        x = stack.pop()
        if type(x) is list:
            if len(x) > MAX_CONTAINER_LEN:
                raise RecordError("data array length too long")
            stack.extend(x)
        elif isinstance(x, dict):
            if len(x) > MAX_CONTAINER_LEN:
                raise RecordError("data object has too many fields")
            for k in x:
                if len(k) > MAX_KEY_LEN // 4 and len(k.encode()) > MAX_KEY_LEN:
                    raise RecordError("data object key too long")
            stack.extend(x.values())


def _fast(block: bytes, notes: list) -> dict:
    try:
        obj = cbrrr.decode_dag_cbor(block, atjson_mode=True)
    except Exception:
        raise _Fallback from None
    if obj is None:
        return {}
    # The first byte tells a real map from a byte string or link that atjson mode turned into one.
    if type(obj) is not dict or not 0xA0 <= block[0] <= 0xBB:
        raise RecordError("top-level datum was not an object")
    if _fast_map(obj, 0, notes) is not obj:  # a top-level blob or legacy blob is not an object in Go
        raise RecordError("top-level datum was not an object")
    if len(block) > MAX_KEY_LEN:
        _check_sizes(obj)
    return obj


# --- slow path: a refmt-like lenient decoder, then atdata's parse, then Go's JSON -------------


class _RawStr(bytes):
    """A CBOR text string that is not valid UTF-8 (Go keeps the bytes; JSON turns them into U+FFFD)."""

    __slots__ = ()


class _Link:
    __slots__ = ("cid",)

    def __init__(self, cid: bytes) -> None:
        self.cid = cid


class _GoBlob:
    __slots__ = ("ref", "mime", "size")

    def __init__(self, ref: bytes, mime: str | _RawStr, size: int) -> None:
        self.ref = ref
        self.mime = mime
        self.size = size


_BREAK = object()


def _arg(b: bytes, pos: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, pos
    if info == 24:
        w = 1
    elif info == 25:
        w = 2
    elif info == 26:
        w = 4
    elif info == 27:
        w = 8
    else:
        raise RecordError(f"invalid CBOR additional info {info}")
    if pos + w > len(b):
        raise RecordError("unexpected end of CBOR")
    return int.from_bytes(b[pos : pos + w], "big"), pos + w


def _chunks(b: bytes, pos: int, major: int) -> tuple[bytes, int]:
    """An indefinite-length byte/text string: definite chunks of the same major type until break."""
    out = bytearray()
    while True:
        if pos >= len(b):
            raise RecordError("unexpected end of CBOR")
        ib = b[pos]
        pos += 1
        if ib == 0xFF:
            return bytes(out), pos
        if ib >> 5 != major:
            raise RecordError("bad chunk in indefinite-length string")
        n, pos = _arg(b, pos, ib & 0x1F)
        if n > _MAX_CBOR_CHUNK or pos + n > len(b):
            raise RecordError("bad chunk length in indefinite-length string")
        out += b[pos : pos + n]
        pos += n


def _string(b: bytes, pos: int, major: int, info: int) -> tuple[bytes, int]:
    if info == 31:
        return _chunks(b, pos, major)
    n, pos = _arg(b, pos, info)
    if n > _MAX_CBOR_CHUNK or pos + n > len(b):
        raise RecordError("unexpected end of CBOR in string")
    return b[pos : pos + n], pos + n


def _text(raw: bytes) -> str | _RawStr:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _RawStr(raw)


def _dec(b: bytes, pos: int, depth: int, tagged: bool = False) -> tuple[Any, int]:
    """One data item, as refmt decodes it into ``interface{}`` (floats and all)."""
    if pos >= len(b):
        raise RecordError("unexpected end of CBOR")
    ib = b[pos]
    pos += 1
    major = ib >> 5
    info = ib & 0x1F
    if major == 7:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info == 22:
            return None, pos
        if info in (25, 26, 27):
            w = {25: 2, 26: 4, 27: 8}[info]
            if pos + w > len(b):
                raise RecordError("unexpected end of CBOR in float")
            return struct.unpack({2: ">e", 4: ">f", 8: ">d"}[w], b[pos : pos + w])[0], pos + w
        if info == 31:
            return _BREAK, pos
        raise RecordError(f"unsupported CBOR simple value {info}")
    if major == 6:
        if tagged:
            raise RecordError("multiple tags on one item")
        tag, pos = _arg(b, pos, info)
        if tag != 42:
            raise RecordError(f"unsupported CBOR tag {tag}")
        v, pos = _dec(b, pos, depth, tagged=True)
        if type(v) is not bytes or not v:
            raise RecordError("tag 42 is not a non-empty byte string")
        if v[0] != 0:
            raise RecordError("invalid multibase on IPLD link")
        _cid_check(v[1:])
        return _Link(v[1:]), pos
    if major in (2, 3):
        raw, pos = _string(b, pos, major, info)
        return (raw if major == 2 else _text(raw)), pos
    if info == 31 and major in (4, 5):
        count = -1
    else:
        count, pos = _arg(b, pos, info)
    if major == 0:
        return (count - _U64 if count > _I64_MAX else count), pos
    if major == 1:
        if count + 1 > 1 << 63:
            raise RecordError("negative integer out of int64 range")
        return -1 - count, pos
    if depth >= MAX_DEPTH:
        raise RecordError("record nested too deeply")
    if major == 4:
        arr = []
        while count != 0:
            v, pos = _dec(b, pos, depth + 1)
            if v is _BREAK:
                if count < 0:
                    break
                raise RecordError("unexpected break in array")
            arr.append(v)
            count -= 1
        return arr, pos
    # major 5: keys are text strings (a tag on a key is ignored by refmt)
    m: dict = {}
    while count != 0:
        if pos >= len(b):
            raise RecordError("unexpected end of CBOR in map")
        kb = b[pos]
        if kb == 0xFF and count < 0:
            pos += 1
            break
        kpos = pos + 1
        if kb >> 5 == 6:
            _, kpos = _arg(b, kpos, kb & 0x1F)
            if kpos >= len(b):
                raise RecordError("unexpected end of CBOR in map key")
            kb = b[kpos]
            kpos += 1
            if kb >> 5 == 6:
                raise RecordError("multiple tags on one item")
        if kb >> 5 != 3:
            raise RecordError("map key is not a string")
        raw, pos = _string(b, kpos, 3, kb & 0x1F)
        key = _text(raw)
        if key in m:
            raise RecordError(f"repeated map key {key!r}")
        v, pos = _dec(b, pos, depth + 1)
        if v is _BREAK:
            raise RecordError("unexpected break in map")
        m[key] = v
        count -= 1
    return m, pos


def _slow_decode(block: bytes) -> dict:
    """refmt into ``map[string]any``: a map (a tag on it ignored) or null; trailing bytes ignored."""
    if not block:
        raise RecordError("empty record block")
    pos = 0
    if block[0] >> 5 == 6:  # the map machine never looks at a tag
        _, pos = _arg(block, 1, block[0] & 0x1F)
        if pos >= len(block) or block[pos] >> 5 == 6:
            raise RecordError("bad tag on record")
    if pos < len(block) and block[pos] == 0xF6:
        return {}
    if pos >= len(block) or block[pos] >> 5 != 5:
        raise RecordError("top-level datum was not an object")
    m, _ = _dec(block, pos, 0)
    return m


def _parse_float(f: float) -> int:
    """atdata ``parseFloat`` on amd64: exact integers in int64 range pass, the rest fail."""
    if not math.isfinite(f) or f != math.floor(f) or not -(2.0**63) <= f < 2.0**63:
        raise RecordError(f"number is not a safe integer: {f}")
    return int(f)


def _parse_link(d: dict) -> _Link:
    if len(d) != 1:
        raise RecordError("$link objects must have a single field")
    v = d.get("$link")
    if type(v) is not str:
        raise RecordError("$link field missing or not a string")
    return _Link(_cid_from_string(v))


def _parse_atom(v: Any, depth: int) -> Any:
    """atdata ``parseAtom`` over refmt's output."""
    t = type(v)
    if v is None or t is bool or t is int or t is str or t is _RawStr or t is bytes or t is _Link:
        return v
    if t is float:
        return _parse_float(v)
    if t is list:
        if len(v) > MAX_CONTAINER_LEN:
            raise RecordError("data array length too long")
        return [_parse_atom(x, depth + 1) for x in v]
    if t is dict:
        return _parse_map(v, depth)
    raise RecordError(f"unexpected type {t.__name__}")


def _parse_map(d: dict, depth: int) -> Any:
    if len(d) > MAX_CONTAINER_LEN:
        raise RecordError("data object has too many fields")
    if "$link" in d:
        return _parse_link(d)
    if "$bytes" in d:
        if len(d) != 1:
            raise RecordError("$bytes objects must have a single field")
        v = d["$bytes"]
        if type(v) is not str or "=" in v:
            raise RecordError("$bytes field missing or not unpadded base64")
        try:
            return _b64(v, False)
        except (binascii.Error, ValueError):
            raise RecordError("decoding $bytes value") from None
    if "$type" in d:
        t = d["$type"]
        if type(t) is str and t == "blob":
            return _parse_blob(d)
        if not (type(t) is str or type(t) is _RawStr) or len(t) == 0:
            raise RecordError("$type field must contain a non-empty string")
    if len(d) == 2 and "mimeType" in d and "cid" in d:
        mime = d["mimeType"]
        if not (type(mime) is str or type(mime) is _RawStr):
            raise RecordError("blob 'mimeType' missing or not a string")
        c = d["cid"]
        if type(c) is str:
            ref = _cid_from_string(c)
        elif type(c) is bytes:
            _cid_check(c)
            ref = c
        elif type(c) is _Link:
            ref = c.cid
        else:
            raise RecordError("legacy blob 'cid' is not a CID")
        return _GoBlob(ref, mime, -1)
    out = {}
    for k, v in d.items():
        klen = len(k) if type(k) is _RawStr else len(k.encode())
        if klen > MAX_KEY_LEN:
            raise RecordError("data object key too long")
        out[k] = _parse_atom(v, depth + 1)
    return out


def _parse_blob(d: dict) -> _GoBlob:
    if len(d) != 4:
        raise RecordError("blobs expected to have 4 fields")
    size = d.get("size")
    if type(size) is float:
        size = _parse_float(size)
    elif type(size) is not int:
        raise RecordError("blob 'size' missing or not a number")
    mime = d.get("mimeType")
    if not (type(mime) is str or type(mime) is _RawStr):
        raise RecordError("blob 'mimeType' missing or not a string")
    if "ref" not in d:
        raise RecordError("blob 'ref' missing")
    ref = d["ref"]
    if type(ref) is dict:
        cid = _parse_link(ref).cid
    elif type(ref) is _Link:
        cid = ref.cid
    else:
        raise RecordError("blob 'ref' unexpected type")
    return _GoBlob(cid, mime, size)


def _replace_per_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("tapflow_go_fffd", _replace_per_byte)


def _go_text(s: str | _RawStr) -> str:
    """What a JSON reader of Go's output sees: each invalid byte became U+FFFD."""
    return s if type(s) is str else bytes(s).decode("utf-8", "tapflow_go_fffd")


def _b64nopad(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _to_obj(v: Any) -> Any:
    """The Go model as the atjson Python objects the fast path produces."""
    t = type(v)
    if t is dict:
        out = {}
        for k in sorted(v, key=_key_bytes):
            out[_go_text(k)] = _to_obj(v[k])
        return out
    if t is list:
        return [_to_obj(x) for x in v]
    if t is _RawStr:
        return _go_text(v)
    if t is bytes:
        return {"$bytes": _b64nopad(v)}
    if t is _Link:
        return {"$link": _cid_str(v.cid)}
    if t is _GoBlob:
        if v.size < 0:
            return {"cid": _cid_str(v.ref), "mimeType": _go_text(v.mime)}
        b = Blob()
        b["$type"] = "blob"
        b["ref"] = {"$link": _cid_str(v.ref)}
        b["mimeType"] = _go_text(v.mime)
        b["size"] = v.size
        return b
    return v


def _key_bytes(k: str | _RawStr) -> bytes:
    return bytes(k) if type(k) is _RawStr else k.encode()


_HEX = "0123456789abcdef"
_ASCII_ESC = {}
for _c in range(0x20):
    _ASCII_ESC[_c] = "\\u00" + _HEX[_c >> 4] + _HEX[_c & 0xF]
_ASCII_ESC.update({0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
_ASCII_ESC.update({0x22: '\\"', 0x5C: "\\\\", 0x3C: "\\u003c", 0x3E: "\\u003e", 0x26: "\\u0026"})
_STR_ESC = {chr(k): v for k, v in _ASCII_ESC.items()}
_STR_ESC.update({"\u2028": "\\u2028", "\u2029": "\\u2029"})
_STR_TRANS = str.maketrans(_STR_ESC)


def _go_quote(s: str | _RawStr) -> str:
    """encoding/json ``appendString`` with HTML escaping; invalid UTF-8 bytes become ``\\ufffd``."""
    if type(s) is _RawStr:
        text = bytes(s).decode("utf-8", "surrogateescape")
        out = []
        for ch in text:
            if "\udc80" <= ch <= "\udcff":
                out.append("\\ufffd")
            else:
                out.append(ch.translate(_STR_TRANS))
        return '"' + "".join(out) + '"'
    return '"' + s.translate(_STR_TRANS) + '"'


def _go_json(v: Any, out: list[str]) -> None:
    """encoding/json ``Marshal`` of atdata's parsed values (maps sorted, blobs in struct order)."""
    t = type(v)
    if v is None:
        out.append("null")
    elif t is bool:
        out.append("true" if v else "false")
    elif t is int:
        out.append(str(v))
    elif t is str or t is _RawStr:
        out.append(_go_quote(v))
    elif t is list:
        out.append("[")
        for i, x in enumerate(v):
            if i:
                out.append(",")
            _go_json(x, out)
        out.append("]")
    elif t is dict:
        out.append("{")
        for i, k in enumerate(sorted(v, key=_key_bytes)):
            if i:
                out.append(",")
            out.append(_go_quote(k))
            out.append(":")
            _go_json(v[k], out)
        out.append("}")
    elif t is bytes:
        out.append('{"$bytes":"' + _b64nopad(v) + '"}')
    elif t is _Link:
        out.append('{"$link":' + _go_quote(_cid_str(v.cid)) + "}")
    elif t is _GoBlob:
        if v.size < 0:
            out.append('{"cid":' + _go_quote(_cid_str(v.ref)) + ',"mimeType":' + _go_quote(v.mime) + "}")
        else:
            out.append(
                '{"$type":"blob","ref":{"$link":'
                + _go_quote(_cid_str(v.ref))
                + '},"mimeType":'
                + _go_quote(v.mime)
                + ',"size":'
                + str(v.size)
                + "}"
            )
    else:  # pragma: no cover - _parse_atom admits nothing else
        raise RecordError(f"cannot marshal {t.__name__}")


def _slow(block: bytes) -> tuple[dict, Any]:
    try:
        model = _parse_map(_slow_decode(block), 0)
    except RecursionError:
        raise RecordError("record nested too deeply") from None
    if type(model) is not dict:  # a top-level {"$link": ...} or blob is not an object in Go
        raise RecordError("top-level datum was not an object")
    return _to_obj(model), model


# --- public API -----------------------------------------------------------------------------


def _convert(block: bytes, notes: list) -> tuple[dict, Any]:
    """(atjson object, Go model or None when the fast path produced the object)."""
    if type(block) is not bytes:
        block = bytes(block)
    if len(block) > MAX_RECORD_SIZE:
        raise RecordError(f"exceeded max CBOR record size: {len(block)}")
    try:
        return _fast(block, notes), None
    except _Fallback:
        obj, model = _slow(block)
        if not is_client_safe(obj):
            notes.append("not accepted by the TS client")
        return obj, model


def decode_record(block: bytes) -> dict:
    """Record block -> atproto JSON data model objects, or ``RecordError`` saying why Go would drop it."""
    return _convert(block, [])[0]


def record_to_obj(block: bytes) -> dict | None:
    """Record block -> atjson ``dict`` as Go Tap would send it; ``None`` when Go could not decode it."""
    try:
        return _convert(block, [])[0]
    except RecordError:
        return None


_DUMPS_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS


def _blob_default(o: Any) -> Any:
    if type(o) is Blob:
        return orjson.Fragment(orjson.dumps(o))  # a dict subclass, dumped in insertion (Go) order
    raise TypeError(f"unexpected {type(o).__name__} in record")


_ESCAPE_CANDIDATES = b"<>&\xe2"  # 0xe2 leads the UTF-8 of U+2028/U+2029


def _go_escapes(out: bytes) -> bytes:
    """orjson writes ``<>&`` and U+2028/9 raw; Go escapes them. Only string contents can hold them.

    One ``translate`` pass decides whether there is anything to do (cheaper here than
    four ``find`` calls or a regex search).
    """
    if len(out.translate(None, _ESCAPE_CANDIDATES)) == len(out):
        return out
    out = out.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    return out.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")


def dumps_record(obj: dict) -> bytes:
    """Go-compatible JSON for an object from :func:`record_to_obj` (sorted keys, Go blob order and escapes)."""
    try:
        return _go_escapes(orjson.dumps(obj, default=_blob_default, option=_DUMPS_OPTS))
    except orjson.JSONEncodeError as e:
        raise RecordError(f"cannot serialize record: {e}") from None


def _json(obj: dict, model: Any) -> bytes:
    if model is None:
        return dumps_record(obj)
    out: list[str] = []
    _go_json(model, out)
    return "".join(out).encode("utf-8", "surrogatepass")


def record_to_json_bytes(block: bytes) -> bytes | None:
    """Record block -> the exact JSON bytes Go Tap would put under ``record``; ``None`` if Go could not decode it."""
    try:
        obj, model = _convert(block, [])
        return _json(obj, model)
    except RecordError:
        return None


def event_record_json(block: bytes, client_safe: bool = True) -> bytes | None:
    """What goes in an event's ``record`` field, or ``None`` to leave the field out.

    ``None`` when Go could not decode the record, when it decodes to ``{}`` (Go's
    ``omitempty`` drops empty maps) and, with ``client_safe``, when the official TS
    client would reject the event because of it (see :func:`validate_outgoing_record`).
    """
    try:
        notes: list = []
        obj, model = _convert(block, notes)
        if not obj or (client_safe and notes):
            return None
        return _json(obj, model)
    except RecordError:
        return None


# --- what the official TS client accepts ------------------------------------------------------


def _client_cid(v: Any) -> bytes | None:
    """The CID bytes if multiformats ``CID.parse`` (no base given) takes this string, else None.

    It knows base32 (lowercase ``b``), base58btc (``z``, or a bare ``Qm`` CIDv0) and base36
    (``k``); lex-json refuses ``$link`` strings longer than 2048 characters. (Checked against
    the installed @atproto/tap 0.3.12: every CID go-cid accepts, wide varints included, parses.)
    """
    if type(v) is not str or not 0 < len(v) <= 2048:
        return None
    c = v[0]
    if c == "b":
        if v != v.lower():
            return None
    elif not (c in "zk" or (c == "Q" and len(v) == 46 and v.startswith("Qm"))):
        return None
    try:
        return _cid_from_string(v)
    except RecordError:
        return None


def _client_raw_str(s: str) -> bool:
    data = _client_cid(s)
    return data is not None and _client_raw_cid(data)


def _client_raw_cid(data: bytes) -> bool:
    """lex-data ``flavor: 'raw'``: CIDv1 with codec raw (0x55)."""
    if len(data) == 34 and data[0] == 0x12 and data[1] == 0x20:
        return False
    _, p = _uvarint(data, 0)
    codec, _ = _uvarint(data, p)
    return codec == 0x55


_BLOB_KEYS = frozenset(("$type", "mimeType", "ref", "size"))


def validate_outgoing_record(obj: Any) -> None:
    """Raise ``UnsafeRecord`` if ``lexParse(json, {strict: true})`` + ``l.lexMap()`` would reject this record.

    Rules (from ``@atproto/lex-json`` and ``lex-data``): integers must be JS-safe (|n| <= 2^53-1),
    no floats; ``$link`` objects have one key and a parseable CID; ``$bytes`` objects have one
    key and base64; ``$type`` is a non-empty string; a ``$type: "blob"`` object has only
    ``$type/mimeType/ref/size``, a mimeType containing ``/``, a non-negative safe size and a
    ``ref`` that is a link to a *raw* CIDv1; no ``__proto__`` keys. Legacy blobs pass as plain objects.
    """
    if not isinstance(obj, dict):
        raise UnsafeRecord("record is not an object")
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                raise UnsafeRecord(f"integer {v} is not a safe JS integer")
            continue
        if depth > MAX_DEPTH:
            raise UnsafeRecord("record nested too deeply")
        if t is list:
            stack.extend((x, depth + 1) for x in v)
            continue
        if not isinstance(v, dict):
            raise UnsafeRecord(f"{t.__name__} is not atproto data")
        if "$link" in v:
            if len(v) != 1 or _client_cid(v["$link"]) is None:
                raise UnsafeRecord("invalid $link object")
            continue
        if "$bytes" in v:
            b = v["$bytes"]
            if len(v) != 1 or type(b) is not str:
                raise UnsafeRecord("invalid $bytes object")
            try:
                _b64(b, False)
            except (binascii.Error, ValueError):
                raise UnsafeRecord("invalid $bytes object") from None
            continue
        if "$type" in v:
            ty = v["$type"]
            if type(ty) is not str or not ty:
                raise UnsafeRecord("invalid $type property")
            if ty == "blob":
                mime, size, ref = v.get("mimeType"), v.get("size"), v.get("ref")
                cid = _client_cid(ref.get("$link")) if isinstance(ref, dict) and len(ref) == 1 else None
                if (
                    not _BLOB_KEYS.issuperset(v)
                    or type(mime) is not str
                    or "/" not in mime
                    or type(size) is not int
                    or not 0 <= size <= MAX_SAFE_INTEGER
                    or cid is None
                    or not _client_raw_cid(cid)
                ):
                    raise UnsafeRecord("invalid blob object")
                continue
        for k, x in v.items():
            if k == "__proto__":
                raise UnsafeRecord("key __proto__")
            stack.append((x, depth + 1))


def is_client_safe(obj: Any) -> bool:
    """True when the official TS client would accept this record (see :func:`validate_outgoing_record`)."""
    try:
        validate_outgoing_record(obj)
    except UnsafeRecord:
        return False
    return True
