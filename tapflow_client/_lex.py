"""The checks the official client (``@atproto/tap``) applies to every frame, in Python.

``lexParse(frame, {strict: true})`` then ``parseTapEvent``: JSON numbers must be safe
integers, ``$link`` / ``$bytes`` / ``$type`` objects must be well formed, and the event
fields must have atproto syntax (DID, NSID, record key, handle, CID). What the official
client rejects, we reject; what it accepts, we accept (see tests/test_client.py, which
also compares against the real client when node and the harness are installed).

No dependency beyond the standard library.
"""

from __future__ import annotations

import base64
import math
import re
from functools import lru_cache
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1

# --- identifier syntax (same regexes as @atproto/syntax; fullmatch, never $) -----------

_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_HANDLE_RE = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_NSID_RE = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"(?:\.[a-zA-Z](?:[a-zA-Z0-9]{0,62})?)"
)
_RKEY_RE = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")


def is_did(s: object) -> bool:
    return type(s) is str and len(s) <= 2048 and _did_ok(s)


@lru_cache(maxsize=8192)
def _did_ok(s: str) -> bool:  # the same DIDs come again and again
    return _DID_RE.fullmatch(s) is not None


def is_handle(s: object) -> bool:
    return type(s) is str and len(s) <= 253 and _HANDLE_RE.fullmatch(s) is not None


def is_nsid(s: object) -> bool:
    return type(s) is str and 5 <= len(s) <= 317 and _nsid_ok(s)


@lru_cache(maxsize=4096)
def _nsid_ok(s: str) -> bool:  # a handful of collections make up nearly all events
    return _NSID_RE.fullmatch(s) is not None


def is_record_key(s: object) -> bool:
    return type(s) is str and s not in (".", "..") and _RKEY_RE.fullmatch(s) is not None


# --- CIDs (multiformats CID.parse + the canonical-string check of lex-data) -------------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_IDX = {c: i for i, c in enumerate(_B58)}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_B36_IDX = {c: i for i, c in enumerate(_B36)}


_B32_ALPHABET = b"abcdefghijklmnopqrstuvwxyz234567"
_B32_TO_INT = bytes.maketrans(_B32_ALPHABET, b"0123456789abcdefghijklmnopqrstuv")


def _b32_decode(s: str) -> bytes:
    """multiformats' strict RFC 4648 base32: lowercase, trailing '=' ignored, the leftover
    bits must be fewer than 5 and zero."""
    try:
        b = s.rstrip("=").encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("non-base32 character") from None
    if b.translate(None, _B32_ALPHABET):
        raise ValueError("non-base32 character")
    nbytes, extra = divmod(len(b) * 5, 8)
    if extra >= 5:
        raise ValueError("unexpected end of data")
    value = int(b.translate(_B32_TO_INT), 32) if b else 0
    if value & ((1 << extra) - 1):
        raise ValueError("unexpected end of data")
    return (value >> extra).to_bytes(nbytes, "big")


def _bx_decode(s: str, alphabet: str, idx: dict[str, int]) -> bytes:
    base = len(alphabet)
    n = 0
    for ch in s:
        v = idx.get(ch)
        if v is None:
            raise ValueError("bad character")
        n = n * base + v
    zeros = len(s) - len(s.lstrip(alphabet[0]))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(b) or shift > 63:
            raise ValueError("could not decode varint")
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _decode_cid_bytes(b: bytes) -> tuple[int, int, bytes]:
    """(version, codec, multihash bytes) of a binary CID; the whole input must be used."""
    pos = 0
    version, pos = _varint(b, pos)
    codec = 0x70
    if version == 18:
        version, pos = 0, 0
    elif version == 1:
        codec, pos = _varint(b, pos)
    else:
        raise ValueError(f"invalid CID version {version}")
    prefix = pos
    _code, pos = _varint(b, pos)
    size, pos = _varint(b, pos)
    if pos + size != len(b):
        raise ValueError("incorrect length")
    return version, codec, b[prefix:]


def parse_cid(s: str) -> tuple[int, int, bytes, bool]:
    """Like multiformats ``CID.parse``: (version, codec, multihash, canonical), where canonical
    means ``s`` is what ``cid.toString()`` gives back."""
    if not s:
        raise ValueError("empty CID")
    first = s[0]
    if first == "Q":
        raw = _bx_decode(s, _B58, _B58_IDX)
    elif first == "z":
        raw = _bx_decode(s[1:], _B58, _B58_IDX)
    elif first == "b":
        raw = _b32_decode(s[1:])
    elif first == "k":
        raw = _bx_decode(s[1:], _B36, _B36_IDX)
    else:
        raise ValueError("not a base32, base36 or base58btc CID")
    version, codec, mh = _decode_cid_bytes(raw)
    if version == 0 and first != "Q":
        raise ValueError("version 0 CID string must not include a multibase prefix")
    # multiformats caches the source string under its base: toString() returns a "b..." or
    # "Q..." source verbatim (padding and all), and re-encodes the others in base32
    return version, codec, mh, first in ("b", "Q")


def cid_string(s: str) -> str:
    """What ``CID.parse(s).toString()`` returns."""
    version, codec, mh, canonical = parse_cid(s)
    if canonical:
        return s
    raw = _enc_varint(1) + _enc_varint(codec) + mh
    return "b" + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def is_cid_string(s: object) -> bool:
    """``l.string({format: 'cid'})``: parses and is in canonical form."""
    if type(s) is not str:
        return False
    try:
        return parse_cid(s)[3]
    except (ValueError, OverflowError):
        return False


def _is_link(s: object) -> bool:
    if type(s) is not str or not s or len(s) > 2048:
        return False
    try:
        parse_cid(s)
        return True
    except (ValueError, OverflowError):
        return False


def _is_raw_cid_link(s: str) -> bool:
    try:
        version, codec, mh, _ = parse_cid(s)
    except (ValueError, OverflowError):
        return False
    return version == 1 and codec == 0x55 and mh[:2] == b"\x12\x20" and len(mh) == 34


# --- base64 as Node's Buffer + lex-data's verifyBase64ForBytes --------------------------

_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_B64_NODE = _B64_CHARS | frozenset("-_")


def _node_b64_len(s: str) -> int:
    """Bytes Node's Buffer.from(s, 'base64') yields: it stops at the first '=' and skips
    characters outside its (standard + url-safe) alphabet."""
    n = 0
    for ch in s:
        if ch == "=":
            break
        if ch in _B64_NODE:
            n += 1
    return n * 3 // 4


def is_lex_bytes(s: object) -> bool:
    if type(s) is not str:
        return False
    pad = 2 if s.endswith("==") else 1 if s.endswith("=") else 0
    trimmed = len(s) - pad
    nbytes = _node_b64_len(s)
    if nbytes != trimmed * 3 // 4:
        return False
    exp_len = nbytes / 3 * 4
    exp_pad = 0 if exp_len % 4 == 0 else 4 - exp_len % 4
    if len(s) > exp_len + exp_pad:
        return False
    start = math.ceil(exp_len)
    for ch in s[start:trimmed]:
        if ch not in _B64_CHARS:
            return False
    return True


# --- values -----------------------------------------------------------------------------


class LexError(ValueError):
    """Not valid atproto data (strict): the message says where."""


def _where(path: str) -> str:
    return path or "(top level)"


_SCALARS = (str, bool, type(None))


def check_value(v: Any, path: str = "") -> Any:
    """Validate a decoded JSON value like ``jsonToLex(v, {strict: true})``.

    Returns the value, with integral floats (``1.0``, ``1e3``: JavaScript reads them as
    integers) turned into ints; containers are copied only when that happens.
    """
    t = type(v)
    if t is dict:
        _check_special(v, path)
        copy = None
        for k, item in v.items():
            ti = type(item)
            if ti is str or ti is bool or item is None:
                continue
            if ti is int and -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                continue
            if k == "__proto__":
                raise LexError(f"{_where(path)}: invalid key __proto__")
            new = check_value(item, f"{path}.{k}" if path else k)
            if new is not item:
                if copy is None:
                    copy = dict(v)
                copy[k] = new
        if "__proto__" in v:
            raise LexError(f"{_where(path)}: invalid key __proto__")
        return v if copy is None else copy
    if t in _SCALARS:
        return v
    if t is int:
        if -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
            return v
        raise LexError(f"{_where(path)}: integer {v} is outside the safe range (|n| < 2^53)")
    if t is float:
        if v.is_integer() and -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
            return int(v)
        raise LexError(f"{_where(path)}: non-integer number {v!r} (atproto data has integers only)")
    if t is list:
        copy = None
        for i, item in enumerate(v):
            ti = type(item)
            if ti is str or ti is bool or item is None:
                continue
            new = check_value(item, f"{path}[{i}]")
            if new is not item:
                if copy is None:
                    copy = list(v)
                copy[i] = new
        return v if copy is None else copy
    raise LexError(f"{_where(path)}: not a JSON value ({t.__name__})")


def special_kind(d: dict) -> str:
    """``link``, ``bytes`` or ``map`` (a blob is a map): what lexParse turns ``d`` into."""
    if "$link" in d and len(d) == 1:
        return "link"
    if "$bytes" in d and len(d) == 1:
        return "bytes"
    return "map"


def _check_special(d: dict, path: str) -> None:
    if "$link" in d:
        if len(d) != 1 or not _is_link(d["$link"]):
            raise LexError(f"{_where(path)}: invalid $link object")
    elif "$bytes" in d:
        if len(d) != 1 or not is_lex_bytes(d["$bytes"]):
            raise LexError(f"{_where(path)}: invalid $bytes object")
    elif "$type" in d:
        ty = d["$type"]
        if ty == "blob":
            if not _is_blob(d):
                raise LexError(f"{_where(path)}: invalid blob object")
        elif type(ty) is not str:
            raise LexError(f"{_where(path)}: invalid $type property")
        elif not ty:
            raise LexError(f"{_where(path)}: empty $type property")


def _is_blob(d: dict) -> bool:
    mime, size, ref = d.get("mimeType"), d.get("size"), d.get("ref")
    if type(mime) is not str or "/" not in mime:
        return False
    if type(size) is float and size.is_integer():
        size = int(size)
    if type(size) is not int or not 0 <= size <= MAX_SAFE_INTEGER:
        return False
    if set(d) - {"$type", "mimeType", "ref", "size"}:
        return False
    if type(ref) is not dict or set(ref) != {"$link"}:
        return False
    link = ref["$link"]
    return _is_link(link) and _is_raw_cid_link(link)
