"""protocol.atjson: record blocks to atproto JSON exactly as Go Tap (indigo atdata + encoding/json) does.

Inputs: the atproto interop data-model and lexicon record-data fixtures, every block of the
real repo CARs, hand-built CBOR for each Go quirk, and generated records (hypothesis).
Expected outputs come from an independent reference here (cbrrr non-atjson decode +
a tiny Go-style JSON writer), never from the module under test.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import cbrrr
import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import atjson
from protocol.atjson import (
    MAX_CONTAINER_LEN,
    MAX_KEY_LEN,
    MAX_RECORD_SIZE,
    Blob,
    RecordError,
    UnsafeRecord,
    decode_record,
    dumps_record,
    event_record_json,
    is_client_safe,
    record_to_json_bytes,
    record_to_obj,
    validate_outgoing_record,
)
from protocol.car import read_car
from protocol.cid import cid_for_dag_cbor, cid_for_raw, cid_from_str, cid_to_str

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # pragma: no cover - layout fallback
    SHARED = Path("/work/shared")
FIX = SHARED / "fixtures" / "atproto-interop"
REAL = SHARED / "fixtures" / "real-network"

RAW_CID = cid_for_raw(b"blob bytes")
CBOR_CID = cid_for_dag_cbor(b"\xa0")
RAW_CID_S = cid_to_str(RAW_CID)
CBOR_CID_S = cid_to_str(CBOR_CID)


# --- a small CBOR writer that can also write what DAG-CBOR forbids ---------------------------


def head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | info]) + n.to_bytes(width, "big")
    raise ValueError(n)


def uint(n: int) -> bytes:
    return head(0, n)


def nint(n: int) -> bytes:  # encodes -1 - n
    return head(1, n)


def tstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return head(3, len(b)) + b


def bstr(b: bytes) -> bytes:
    return head(2, len(b)) + b


def arr(*items: bytes) -> bytes:
    return head(4, len(items)) + b"".join(items)


def mp_raw(*pairs: tuple[str | bytes, bytes]) -> bytes:
    """A map with keys in the order given (duplicates and all)."""
    return head(5, len(pairs)) + b"".join(tstr(k) + v for k, v in pairs)


def mp(*pairs: tuple[str | bytes, bytes]) -> bytes:
    """A map with keys in DAG-CBOR canonical order (length first), so cbrrr's fast path takes it."""
    kb = lambda k: k.encode() if isinstance(k, str) else k  # noqa: E731
    return mp_raw(*sorted(pairs, key=lambda p: (len(kb(p[0])), kb(p[0]))))


def link(cid: bytes) -> bytes:
    return b"\xd8\x2a" + bstr(b"\x00" + cid)


def f64(x: float) -> bytes:
    return b"\xfb" + struct.pack(">d", x)


def lit(v) -> bytes:
    """JSON value -> CBOR literally: maps stay maps ($link/$bytes included), floats are float64."""
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return uint(v) if v >= 0 else nint(-1 - v)
    if isinstance(v, float):
        return f64(v)
    if isinstance(v, str):
        return tstr(v)
    if isinstance(v, list):
        return arr(*(lit(x) for x in v))
    if isinstance(v, dict):
        return mp(*((k, lit(x)) for k, x in v.items()))
    raise TypeError(v)


# --- independent reference: cbrrr (links as CID objects) + a Go-style writer -----------------


def ref_obj(v):
    if isinstance(v, cbrrr.CID):
        return {"$link": libipld.encode_cid(v.cid_bytes)}
    if isinstance(v, bytes):
        return {"$bytes": base64.b64encode(v).decode().rstrip("=")}
    if isinstance(v, list):
        return [ref_obj(x) for x in v]
    if isinstance(v, dict):
        return {k: ref_obj(x) for k, x in v.items()}
    return v


def go_str(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(a, b)
    return out


def go_json(v) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return go_str(v)
    if isinstance(v, list):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if set(v) == {"$type", "ref", "mimeType", "size"} and v["$type"] == "blob":
        order = ["$type", "ref", "mimeType", "size"]  # Go's BlobSchema field order
    else:
        order = sorted(v)
    return "{" + ",".join(go_str(k) + ":" + go_json(v[k]) for k in order) + "}"


def expected_json(block: bytes) -> bytes:
    return go_json(ref_obj(cbrrr.decode_dag_cbor(block))).encode()


def slow(block: bytes) -> tuple[dict, bytes]:
    obj, model = atjson._slow(block)
    return obj, atjson._json(obj, model)


# --- interop data-model fixtures ------------------------------------------------------------

DM_FIXTURES = json.loads((FIX / "data-model" / "data-model-fixtures.json").read_text())
DM_VALID = json.loads((FIX / "data-model" / "data-model-valid.json").read_text())
DM_INVALID = json.loads((FIX / "data-model" / "data-model-invalid.json").read_text())
LEX_VALID = json.loads((FIX / "lexicon" / "record-data-valid.json").read_text())
LEX_INVALID = json.loads((FIX / "lexicon" / "record-data-invalid.json").read_text())


def _b64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


@pytest.mark.parametrize("fx", DM_FIXTURES, ids=lambda f: f["cid"][-8:])
def test_data_model_fixtures_round_trip(fx) -> None:
    block = _b64(fx["cbor_base64"])
    assert cid_to_str(cid_for_dag_cbor(block)) == fx["cid"]
    obj = record_to_obj(block)
    assert obj == fx["json"]
    # back to the same canonical CBOR
    assert cbrrr.encode_dag_cbor(json.loads(json.dumps(obj)), atjson_mode=True) == block
    out = record_to_json_bytes(block)
    assert out == go_json(fx["json"]).encode() == expected_json(block)
    assert json.loads(out) == fx["json"]
    assert slow(block) == (obj, out)


@pytest.mark.parametrize("fx", DM_VALID, ids=lambda f: f["note"])
def test_data_model_valid(fx) -> None:
    block = lit(fx["json"])
    obj = record_to_obj(block)
    assert obj is not None, fx["note"]
    # Go turns the integral float 123.0 into the integer 123
    assert json.loads(json.dumps(obj)) == json.loads(json.dumps(fx["json"]).replace("123.0", "123"))
    assert record_to_json_bytes(block) == go_json(obj).encode()


@pytest.mark.parametrize("fx", DM_INVALID, ids=lambda f: f["note"])
def test_data_model_invalid(fx) -> None:
    """Every invalid fixture, written literally as CBOR, is one Go's UnmarshalCBOR rejects too."""
    block = lit(fx["json"])
    assert record_to_obj(block) is None, fx["note"]
    assert record_to_json_bytes(block) is None
    assert event_record_json(block) is None
    with pytest.raises(RecordError):
        decode_record(block)


def _as_cbor_lexicon(data: dict) -> bytes:
    """Lexicon fixtures: valid $link/$bytes become real links/bytes, everything else literal."""

    def conv(v):
        if isinstance(v, dict):
            if set(v) == {"$link"}:
                return cbrrr.CID(cid_from_str(v["$link"]))
            if set(v) == {"$bytes"} and isinstance(v["$bytes"], str):
                return base64.b64decode(v["$bytes"] + "=" * (-len(v["$bytes"]) % 4))
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return cbrrr.encode_dag_cbor(conv(data))


@pytest.mark.parametrize("fx", LEX_VALID, ids=lambda f: f["name"])
def test_lexicon_record_data_valid_is_valid_data(fx) -> None:
    for block in (_as_cbor_lexicon(fx["data"]), lit(fx["data"])):
        obj = record_to_obj(block)
        assert obj is not None
        assert obj["$type"] == "example.lexicon.record"


@pytest.mark.parametrize("fx", LEX_INVALID, ids=lambda f: f["name"])
def test_lexicon_record_data_invalid_is_still_valid_data(fx) -> None:
    """All 50 are lexicon (schema) errors, not data-model errors: Go's atdata, and so Tap, accepts them."""
    block = _as_cbor_lexicon(fx["data"])
    assert record_to_obj(block) is not None, fx["name"]
    assert record_to_json_bytes(block) == expected_json(block)


def test_lexicon_full_record_details() -> None:
    full = next(f for f in LEX_VALID if f["name"] == "full")
    obj = record_to_obj(lit(full["data"]))  # literal: "$bytes": "123" and "$link" maps inside the CBOR
    assert obj["bytes"] == {"$bytes": "120"}  # Go re-encodes; the stray low bits of "3" are dropped
    assert obj["cidlink"] == full["data"]["cidlink"]
    assert type(obj["blob"]) is Blob
    # the blob's ref is a dag-cbor CID: Go sends it, the official client rejects the event
    assert record_to_json_bytes(lit(full["data"])) is not None
    assert event_record_json(lit(full["data"])) is None


# --- real records ------------------------------------------------------------------------------


def _real_blocks() -> list[bytes]:
    out = []
    for path in sorted(REAL.glob("*.repo.car")):
        out.extend(read_car(path.read_bytes()).blocks.values())
    return out


REAL_BLOCKS = _real_blocks()


def test_real_blocks_all_convert_like_the_reference() -> None:
    records = 0
    for block in REAL_BLOCKS:
        obj = record_to_obj(block)
        assert obj is not None
        out = record_to_json_bytes(block)
        assert out == expected_json(block)
        assert json.loads(out) == obj
        assert slow(block) == (obj, out)  # the lenient decoder agrees byte for byte
        if "$type" in obj:
            records += 1
            assert event_record_json(block) == out
    assert records > 300


def test_real_legacy_blob_records_keep_legacy_shape() -> None:
    legacy = 0
    for block in REAL_BLOCKS:
        raw = libipld.decode_dag_cbor(block)
        if isinstance(raw, dict) and isinstance(raw.get("embed"), dict) and "images" in raw["embed"]:
            for img in raw["embed"]["images"]:
                if "cid" in img["image"]:
                    legacy += 1
            out = json.loads(record_to_json_bytes(block))
            assert out["embed"]["images"][0]["image"].keys() in ({"cid", "mimeType"}, {"$type", "ref", "mimeType", "size"})
    assert legacy > 0


# --- Go quirks, one by one ------------------------------------------------------------------------

T = ("$type", tstr("com.example.rec"))


def one(value: bytes, key: str = "v") -> bytes:
    return mp(T, (key, value))


def val(block: bytes, key: str = "v"):
    obj = record_to_obj(block)
    return None if obj is None else obj[key]


@pytest.mark.parametrize(
    "cbor,expected",
    [
        (f64(1.0), 1),
        (f64(-0.0), 0),
        (f64(-(2.0**63)), -(2**63)),
        (b"\xf9\x40\x00", 2),  # half float 2.0
        (b"\xfa\x40\x40\x00\x00", 3),  # float32 3.0
        (uint(2**64 - 1), -1),  # Go int(uint64) wraps
        (uint(2**63), -(2**63)),
        (nint(2**63 - 1), -(2**63)),
        (b"\x18\x05", 5),  # non-minimal integer
        (b"\x1b" + (7).to_bytes(8, "big"), 7),
    ],
    ids=["1.0", "-0.0", "-2^63f", "half", "f32", "u64max", "2^63", "-2^63", "nonmin", "nonmin8"],
)
def test_numbers_go_accepts(cbor: bytes, expected: int) -> None:
    block = one(cbor)
    assert val(block) == expected
    assert type(val(block)) is int
    assert json.loads(record_to_json_bytes(block))["v"] == expected


@pytest.mark.parametrize(
    "cbor",
    [f64(1.5), f64(math.nan), f64(math.inf), f64(-math.inf), f64(2.0**63), f64(1e300), nint(2**63), b"\xf7", b"\xf0"],
    ids=["1.5", "nan", "inf", "-inf", "2^63f", "1e300", "-2^63-1", "undefined", "simple16"],
)
def test_numbers_and_simples_go_rejects(cbor: bytes) -> None:
    assert record_to_obj(one(cbor)) is None


def test_non_canonical_cbor_accepted_and_normalized() -> None:
    unsorted = mp_raw(("zz", uint(1)), ("a", uint(2)), T)
    assert record_to_json_bytes(unsorted) == b'{"$type":"com.example.rec","a":2,"zz":1}'
    indef = b"\xbf" + tstr("$type") + tstr("com.example.rec") + tstr("l") + b"\x9f\x01\x02\xff" + tstr("s")
    indef += b"\x7f" + tstr("ab") + tstr("cd") + b"\xff" + tstr("b") + b"\x5f" + bstr(b"\x01") + bstr(b"\x02") + b"\xff\xff"
    assert record_to_obj(indef) == {"$type": "com.example.rec", "l": [1, 2], "s": "abcd", "b": {"$bytes": "AQI"}}
    canonical = cbrrr.encode_dag_cbor({"$type": "com.example.rec", "a": 1})
    assert record_to_obj(canonical + b"\xff\x00 trailing garbage") == {"$type": "com.example.rec", "a": 1}


@pytest.mark.parametrize(
    "block",
    [
        mp_raw(("a", uint(1)), ("a", uint(2))),  # duplicate key
        head(5, 1) + uint(1) + uint(2),  # integer key
        one(b"\xd8\x2b" + bstr(b"\x00" + CBOR_CID)),  # tag 43
        one(b"\xd8\x2a" + tstr("x")),  # tag 42 on a string
        one(b"\xd8\x2a" + bstr(CBOR_CID)),  # no identity multibase byte
        one(b"\xd8\x2a" + bstr(b"\x00" + CBOR_CID[:-1])),  # truncated CID
        one(b"\xd8\x2a" + bstr(b"\x00" + CBOR_CID + b"\x00")),  # trailing byte after CID
        one(b"\xd8\x2a" + bstr(b"\x00")),  # empty CID
        one(b"\xd8\x2a\xd8\x2a" + bstr(b"\x00" + CBOR_CID)),  # two tags
        one(b"\xd8\x2a" + bstr(b"\x00\x02\x71\x12\x20" + bytes(32))),  # CID version 2
        one(arr(uint(1))[:-1]),  # truncated array
        b"",
        arr(),
        tstr("blah"),
        bstr(b"\x01\x02"),  # top-level bytes (atjson mode would make it a $bytes map)
        link(CBOR_CID),  # top-level link
        uint(7),
    ],
    ids=[
        "dupkey",
        "intkey",
        "tag43",
        "tag42str",
        "nomultibase",
        "truncid",
        "cidtrailing",
        "emptycid",
        "twotags",
        "cidv2",
        "trunc",
        "empty",
        "toparray",
        "topstr",
        "topbytes",
        "toplink",
        "topint",
    ],
)
def test_cbor_go_rejects(block: bytes) -> None:
    assert record_to_obj(block) is None
    assert record_to_json_bytes(block) is None


def test_top_level_blob_is_not_an_object() -> None:
    """atdata's parseObject: a top-level map that parses to a blob or link is rejected."""
    assert record_to_obj(_blob()) is None
    assert record_to_obj(mp(("cid", tstr(RAW_CID_S)), ("mimeType", tstr("image/png")))) is None
    assert record_to_obj(mp(("$link", tstr(RAW_CID_S)))) is None
    assert record_to_obj(mp(("$bytes", tstr("AAEC")))) is None
    with pytest.raises(RecordError):
        atjson._fast(_blob(), [])


def test_top_level_null_and_tag_on_map() -> None:
    assert record_to_obj(b"\xf6") == {}
    assert record_to_json_bytes(b"\xf6") == b"{}"
    assert event_record_json(b"\xf6") is None  # Go's omitempty drops an empty record
    assert event_record_json(b"\xa0") is None
    # refmt's map machine ignores a tag in front of the top-level map
    assert record_to_obj(b"\xc1" + mp(("a", uint(1)))) == {"a": 1}


def test_links_of_other_shapes() -> None:
    v0 = b"\x12\x20" + bytes(range(32))
    assert val(one(link(v0)))["$link"].startswith("Qm")  # go-cid prints CIDv0 in base58
    assert val(one(link(v0)))["$link"] == libipld.encode_cid(v0)
    dagpb = b"\x01\x70\x12\x20" + bytes(32)
    assert val(one(link(dagpb))) == {"$link": libipld.encode_cid(dagpb)}
    blake = b"\x01\x71\xa0\xe4\x02\x20" + bytes(32)  # blake2b-256
    assert val(one(link(blake))) == {"$link": "b" + base64.b32encode(blake).decode().lower().rstrip("=")}
    # CIDv0 link: Go sends it; the TS client parses base58 CIDv0 fine
    assert event_record_json(one(link(v0))) is not None


def test_link_and_bytes_maps_inside_cbor() -> None:
    assert val(one(mp(("$link", tstr(CBOR_CID_S))))) == {"$link": CBOR_CID_S}
    assert val(one(mp(("$link", tstr("B" + CBOR_CID_S[1:].upper()))))) == {"$link": CBOR_CID_S}
    assert val(one(mp(("$link", tstr("/ipfs/" + CBOR_CID_S))))) == {"$link": CBOR_CID_S}
    assert val(one(mp(("$link", uint(5))))) is None
    assert val(one(mp(("$link", tstr(CBOR_CID_S)), ("x", uint(1))))) is None
    assert val(one(mp(("$link", tstr("."))))) is None
    assert val(one(mp(("$bytes", tstr("AAEC"))))) == {"$bytes": "AAEC"}
    assert val(one(mp(("$bytes", tstr("AAE="))))) is None  # Go's RawStdEncoding refuses padding
    assert val(one(mp(("$bytes", tstr("AAE\nC"))))) == {"$bytes": "AAEC"}  # ...and skips newlines
    assert val(one(mp(("$bytes", tstr("!!"))))) is None
    assert val(one(mp(("$bytes", bstr(b"x"))))) is None


@pytest.mark.parametrize(
    "type_value", [tstr(""), uint(5), b"\xf6", arr(), b"\xf5"], ids=["empty", "int", "null", "array", "bool"]
)
def test_bad_type_field(type_value: bytes) -> None:
    assert record_to_obj(mp(("$type", type_value))) is None
    assert record_to_obj(mp(T, ("o", mp(("$type", type_value))))) is None


def _blob(size: bytes = uint(10000), mime: bytes = tstr("image/jpeg"), ref: bytes = link(RAW_CID), extra=()) -> bytes:
    return mp(("ref", ref), ("size", size), ("$type", tstr("blob")), ("mimeType", mime), *extra)


def test_typed_blob_go_field_order_and_quirks() -> None:
    good = one(_blob())
    out = record_to_json_bytes(good)
    assert out == (
        b'{"$type":"com.example.rec","v":{"$type":"blob","ref":{"$link":"' + RAW_CID_S.encode() + b'"},'
        b'"mimeType":"image/jpeg","size":10000}}'
    )
    assert type(val(good)) is Blob and list(val(good)) == ["$type", "ref", "mimeType", "size"]
    assert event_record_json(good) == out
    # negative size: Go marshals it as a legacy blob
    assert val(one(_blob(size=nint(0)))) == {"cid": RAW_CID_S, "mimeType": "image/jpeg"}
    assert val(one(_blob(size=f64(10.0))))["size"] == 10
    # ref as a {"$link": "..."} map inside the CBOR
    assert val(one(_blob(ref=mp(("$link", tstr(RAW_CID_S))))))["ref"] == {"$link": RAW_CID_S}


@pytest.mark.parametrize(
    "block",
    [
        one(_blob(size=f64(1.5))),
        one(_blob(size=tstr("10000"))),
        one(_blob(size=b"\xf5")),
        one(_blob(mime=uint(1))),
        one(_blob(ref=tstr(RAW_CID_S))),
        one(_blob(ref=bstr(RAW_CID))),
        one(_blob(ref=mp(("x", uint(1))))),
        one(_blob(extra=(("other", uint(1)),))),
        one(mp(("$type", tstr("blob")), ("size", uint(1)), ("mimeType", tstr("a/b")))),
    ],
    ids=["floatsize", "strsize", "boolsize", "intmime", "strref", "bytesref", "mapref", "5keys", "noref"],
)
def test_typed_blob_go_rejects(block: bytes) -> None:
    assert record_to_obj(block) is None


def test_legacy_blob() -> None:
    leg = lambda c: one(mp(("cid", c), ("mimeType", tstr("image/png"))))  # noqa: E731
    expected = {"cid": RAW_CID_S, "mimeType": "image/png"}
    assert val(leg(tstr(RAW_CID_S))) == expected
    assert val(leg(link(RAW_CID))) == expected  # a link becomes the string form
    assert val(leg(bstr(RAW_CID))) == expected  # so do raw CID bytes (go-cid Parse casts them)
    assert val(leg(tstr("B" + RAW_CID_S[1:].upper()))) == expected  # canonicalized
    v0 = libipld.encode_cid(b"\x12\x20" + bytes(range(32)))
    assert val(leg(tstr(v0))) == {"cid": v0, "mimeType": "image/png"}
    assert val(leg(tstr("not a cid"))) is None
    assert val(leg(uint(3))) is None
    assert val(one(mp(("cid", tstr(RAW_CID_S)), ("mimeType", uint(1))))) is None
    assert record_to_json_bytes(leg(tstr(RAW_CID_S))).endswith(b'"v":{"cid":"' + RAW_CID_S.encode() + b'","mimeType":"image/png"}}')
    # with a third key it is just an object
    assert val(one(mp(("a", uint(1)), ("cid", tstr("x")), ("mimeType", uint(1))))) == {"a": 1, "cid": "x", "mimeType": 1}


def test_go_string_escapes() -> None:
    s = "<a href='x'>&amp; \u2028\u2029 \x00\x01\x08\x0c\n\r\t\x1f\x7f \"q\" \\ é 😀"
    block = one(tstr(s))
    out = record_to_json_bytes(block)
    assert out == go_json({"$type": "com.example.rec", "v": s}).encode()
    assert b"\\u003ca href='x'\\u003e\\u0026amp; \\u2028\\u2029 \\u0000\\u0001\\b\\f\\n\\r\\t\\u001f\x7f" in out
    assert json.loads(out)["v"] == s
    assert slow(block)[1] == out


def test_invalid_utf8_becomes_replacement_char_like_go() -> None:
    raw = b"ok \xff mid \xe2\x82 end \xed\xa0\x80"
    block = mp(T, (b"k\xfe", tstr(raw)))
    out = record_to_json_bytes(block)
    assert out == (
        b'{"$type":"com.example.rec","k\\ufffd":"ok \\ufffd mid \\ufffd\\ufffd end \\ufffd\\ufffd\\ufffd"}'
    )
    obj = record_to_obj(block)
    assert obj == json.loads(out)


def test_size_limits() -> None:
    assert record_to_obj(mp(T, ("k" * MAX_KEY_LEN, uint(1)))) is not None
    assert record_to_obj(mp(T, ("k" * (MAX_KEY_LEN + 1), uint(1)))) is None
    assert record_to_obj(mp(T, ("é" * (MAX_KEY_LEN // 2 + 1), uint(1)))) is None  # bytes, not characters
    assert record_to_obj(mp(T, ("v", head(4, MAX_CONTAINER_LEN) + b"\x00" * MAX_CONTAINER_LEN))) is not None
    assert record_to_obj(mp(T, ("v", head(4, MAX_CONTAINER_LEN + 1) + b"\x00" * (MAX_CONTAINER_LEN + 1)))) is None
    big = mp(T, ("v", bstr(b"\x00" * (MAX_RECORD_SIZE - 40))))
    assert len(big) <= MAX_RECORD_SIZE and record_to_obj(big) is not None
    too_big = mp(T, ("v", bstr(b"\x00" * MAX_RECORD_SIZE)))
    assert record_to_obj(too_big) is None


@pytest.mark.parametrize("depth,ok", [(10, True), (atjson.MAX_DEPTH - 1, True), (atjson.MAX_DEPTH + 5, False), (2000, False)])
def test_nesting(depth: int, ok: bool) -> None:
    inner = uint(1)
    for _ in range(depth):
        inner = arr(inner)
    block = mp(T, ("v", inner))
    assert (record_to_obj(block) is not None) is ok
    assert (record_to_json_bytes(block) is not None) is ok
    if ok:
        assert slow(block)[1] == record_to_json_bytes(block)
    else:
        with pytest.raises(RecordError):
            atjson._slow(block)


def test_bytes_and_memoryview_inputs() -> None:
    block = REAL_BLOCKS[0]
    assert record_to_obj(bytearray(block)) == record_to_obj(memoryview(block)) == record_to_obj(block)


# --- the official client's strict parser ---------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {"$type": "app.bsky.feed.post", "text": "hi"},
        {"text": "no $type is fine"},
        {"l": {"$link": CBOR_CID_S}, "b": {"$bytes": "AAEC"}, "p": {"$bytes": "AAE="}},
        {"img": {"$type": "blob", "ref": {"$link": RAW_CID_S}, "mimeType": "image/jpeg", "size": 3}},
        {"legacy": {"cid": CBOR_CID_S, "mimeType": "image/jpeg"}},
        {"n": 2**53 - 1, "m": -(2**53 - 1), "z": None, "t": True},
        {"v0": {"$link": libipld.encode_cid(b"\x12\x20" + bytes(32))}},
    ],
    ids=["post", "no-type", "link-bytes", "blob", "legacy-blob", "safe-ints", "cidv0"],
)
def test_client_accepts(obj) -> None:
    validate_outgoing_record(obj)
    assert is_client_safe(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"f": 1.5},
        {"n": 2**53},
        {"n": -(2**53)},
        {"l": {"$link": "."}},
        {"l": {"$link": CBOR_CID_S, "x": 1}},
        {"l": {"$link": 5}},
        {"l": {"$link": CBOR_CID_S.upper()}},  # multiformats' base32 is lowercase
        {"l": {"$link": "f" + CBOR_CID.hex()}},  # a base the parser does not know without help
        {"b": {"$bytes": "!!"}},
        {"b": {"$bytes": [1, 2]}},
        {"t": {"$type": ""}},
        {"t": {"$type": 3}},
        {"img": {"$type": "blob", "ref": RAW_CID_S, "mimeType": "image/jpeg", "size": 3}},
        {"img": {"$type": "blob", "ref": {"$link": CBOR_CID_S}, "mimeType": "image/jpeg", "size": 3}},
        {"img": {"$type": "blob", "ref": {"$link": RAW_CID_S}, "mimeType": "jpeg", "size": 3}},
        {"img": {"$type": "blob", "ref": {"$link": RAW_CID_S}, "mimeType": "image/jpeg", "size": -1}},
        {"img": {"$type": "blob", "ref": {"$link": RAW_CID_S}, "mimeType": "image/jpeg", "size": 3, "x": 1}},
        {"img": {"$type": "blob", "ref": {"$link": RAW_CID_S}, "size": 3}},
        {"__proto__": {"a": 1}},
        {"deep": {"x": [{"__proto__": 1}]}},
        [1, 2],
    ],
    ids=[
        "float",
        "2^53",
        "-2^53",
        "bad-link",
        "link-extra",
        "link-int",
        "link-upper",
        "link-base16",
        "bad-bytes",
        "bytes-list",
        "empty-type",
        "int-type",
        "blob-ref-str",
        "blob-ref-dagcbor",
        "blob-mime",
        "blob-neg-size",
        "blob-extra",
        "blob-no-mime",
        "proto",
        "proto-nested",
        "not-object",
    ],
)
def test_client_rejects(obj) -> None:
    with pytest.raises(UnsafeRecord):
        validate_outgoing_record(obj)
    assert not is_client_safe(obj)


@pytest.mark.parametrize(
    "block",
    [
        one(uint(2**53)),
        one(nint(2**53)),
        one(_blob(ref=link(CBOR_CID))),
        one(_blob(mime=tstr("jpeg"))),
        one(_blob(size=uint(2**53))),
        mp(T, ("__proto__", uint(1))),
        one(link(b"\x01\x55\x12\xdc\x0b" + bytes(1500))),  # 1500-byte digest: a $link string over 2048 chars
    ],
    ids=["int", "negint", "dagcbor-ref", "mime", "size", "proto", "long-link"],
)
def test_go_sends_but_client_would_reject(block: bytes) -> None:
    assert record_to_json_bytes(block) is not None  # Go sends it...
    assert event_record_json(block) is None  # ...we leave the record out instead of poisoning the client
    assert event_record_json(block, client_safe=False) == record_to_json_bytes(block)
    assert not is_client_safe(record_to_obj(block))


def test_wide_varints_in_cids_are_fine_for_both() -> None:
    """go-cid takes 9-byte varints; so does the client's multiformats (checked against 0.3.12)."""
    block = one(link(b"\x01" + b"\xff" * 8 + b"\x01" + b"\x12\x20" + bytes(32)))
    assert event_record_json(block) == record_to_json_bytes(block) is not None


def test_dumps_record_matches_record_to_json_bytes() -> None:
    for block in REAL_BLOCKS[:200]:
        assert dumps_record(record_to_obj(block)) == record_to_json_bytes(block)


# --- generated records: fast path == lenient path == reference ----------------------------------

_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
    st.binary(max_size=12),
    st.sampled_from([cbrrr.CID(RAW_CID), cbrrr.CID(CBOR_CID), cbrrr.CID(b"\x12\x20" + bytes(32))]),
)
_blobs = st.builds(
    lambda ref, mime, size: {"$type": "blob", "ref": cbrrr.CID(ref), "mimeType": mime, "size": size},
    st.sampled_from([RAW_CID, CBOR_CID]),
    st.sampled_from(["image/png", "text", "<&>"]),
    st.integers(min_value=-5, max_value=2**63 - 1),
)
_values = st.recursive(
    st.one_of(_scalars, _blobs),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_keys.filter(lambda k: k not in ("$link", "$bytes")), inner, max_size=4),
    ),
    max_leaves=20,
)
_records = st.dictionaries(_keys.filter(lambda k: k not in ("$link", "$bytes", "$type")), _values, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_records, st.sampled_from(["app.bsky.feed.post", None]))
def test_generated_records_fast_equals_slow(rec, rtype) -> None:
    if rtype:
        rec = dict(rec, **{"$type": rtype})
    block = cbrrr.encode_dag_cbor(rec)
    try:
        fast_obj = atjson._fast(block, notes := [])
    except RecordError:
        with pytest.raises(RecordError):
            atjson._slow(block)
        return
    fast_json = dumps_record(fast_obj)
    slow_obj, slow_json = slow(block)
    assert fast_obj == slow_obj
    assert fast_json == slow_json
    assert json.loads(fast_json) == fast_obj
    # the walk's client verdict equals the standalone validator
    assert (not notes) == is_client_safe(fast_obj)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    for block in (data, b"\xa2" + data):
        res = record_to_obj(block)
        assert res is None or isinstance(res, dict)
        out = record_to_json_bytes(block)
        assert (out is None) == (res is None)
        if out is not None:
            json.loads(out)


# --- cross-check against the real official client, when the harness has installed it ---------

_PROBE = """
import { createInterface } from 'node:readline'
import { lexParse } from '@atproto/lex'
import { parseTapEvent } from '@atproto/tap'
const head = '{"id":1,"type":"record","record":{"live":true,"did":"did:plc:ewvi7nxzyoun6zhxrhs64oiz",' +
  '"rev":"3lbgkl2zuqs2a","collection":"app.bsky.feed.post","rkey":"3lbgkl2zuqs2a","action":"create",' +
  '"cid":"bafyreibyxjqwqfygc5yqlvbgygeqwcb3drstfyatkora4voxoxt7brxdyy","record":'
for await (const line of createInterface({ input: process.stdin })) {
  try { parseTapEvent(lexParse(head + line + '}}', { strict: true })); console.log('1') }
  catch (e) { console.log('0') }
}
"""


def _generated_records(n: int) -> list[bytes]:
    import random

    rnd = random.Random(7)
    cids = [RAW_CID, CBOR_CID, b"\x12\x20" + bytes(32), b"\x01\x70\x12\x20" + bytes(32),
            b"\x01\x55\xa0\xe4\x02\x20" + bytes(32), b"\x01" + b"\xff" * 8 + b"\x01\x12\x20" + bytes(32)]
    ints = [0, -1, 2**53 - 1, 2**53, -(2**53 - 1), -(2**53), 2**63 - 1, 2**64 - 1, 2**63, -(2**63)]

    def scalar():
        r = rnd.random()
        if r < 0.15:
            return rnd.choice(ints)
        if r < 0.3:
            return rnd.choice(["", "<&>", "\u2028", "é"])
        if r < 0.4:
            return rnd.choice([None, True, False])
        if r < 0.55:
            return cbrrr.CID(rnd.choice(cids))
        if r < 0.65:
            return bytes(rnd.randrange(4))
        if r < 0.85:
            return {"$type": "blob", "ref": cbrrr.CID(rnd.choice(cids)), "mimeType": rnd.choice(["image/png", "png"]),
                    "size": rnd.choice([0, 5, -1, 2**53])}
        return {"cid": rnd.choice([RAW_CID_S, "zzz"]), "mimeType": "image/png"}

    def value(d):
        r = rnd.random()
        if d > 3 or r < 0.5:
            return scalar()
        if r < 0.7:
            return [value(d + 1) for _ in range(rnd.randrange(3))]
        return {rnd.choice(["a", "$type", "__proto__", "cid", "mimeType"]): value(d + 1) for _ in range(rnd.randrange(3))}

    out = []
    for _ in range(n):
        rec = {k: value(0) for k in rnd.sample(["a", "b", "__proto__", "$type"], rnd.randrange(1, 4))}
        if "$type" in rec and rnd.random() < 0.7:
            rec["$type"] = "app.bsky.feed.post"
        try:
            out.append(cbrrr.encode_dag_cbor(rec))
        except Exception:
            pass
    return out


def test_client_verdicts_match_the_official_client(tmp_path) -> None:
    """validate_outgoing_record vs the installed @atproto/tap 0.3.12 parsing our exact bytes."""
    import os
    import subprocess

    from tests.e2e_support import HARNESS_HOME, node_bin

    modules = HARNESS_HOME / "client" / "node_modules"
    if not (modules / "@atproto" / "tap").exists():
        pytest.skip("official client not installed (run shared/harness/client/setup.sh)")
    os.symlink(modules, tmp_path / "node_modules")
    (tmp_path / "probe.mjs").write_text(_PROBE)
    lines, ours = [], []
    for block in _generated_records(600) + REAL_BLOCKS[::5]:
        out = record_to_json_bytes(block)
        if out is not None:
            lines.append(out.decode())
            ours.append(is_client_safe(record_to_obj(block)))
    res = subprocess.run([node_bin(), str(tmp_path / "probe.mjs")], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, timeout=120, check=True)
    theirs = [x == "1" for x in res.stdout.split()]
    assert len(theirs) == len(ours)
    bad = [lines[i][:200] for i in range(len(ours)) if ours[i] != theirs[i]]
    assert not bad, bad[:5]
    assert 0 < sum(theirs) < len(theirs)  # both verdicts exercised
