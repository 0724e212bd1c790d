"""protocol.car: real CARs parse and verify; each kind of corruption gets its own error."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import cbrrr
import libipld
import pytest

from protocol.car import (
    MAX_SECTION_SIZE,
    Car,
    CarBadCID,
    CarBadHeader,
    CarBadVarint,
    CarError,
    CarHashMismatch,
    CarMissingRoot,
    CarTooLarge,
    CarTruncated,
    read_car,
    write_car,
)
from protocol.cid import block_matches, cid_for_dag_cbor, cid_for_raw, cid_from_str

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # pragma: no cover - layout fallback
    SHARED = Path("/work/shared")
REAL = SHARED / "fixtures" / "real-network"
REPO_CARS = sorted(REAL.glob("*.repo.car"))
FIREHOSE = sorted(REAL.glob("firehose_commit_*.json"))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _header(obj) -> bytes:
    h = cbrrr.encode_dag_cbor(obj)
    return _varint(len(h)) + h


def _small_car() -> tuple[bytes, bytes, bytes, bytes]:
    """A CAR with a commit-like root block and one record; returns (car, root_cid, rec_cid, rec)."""
    rec = cbrrr.encode_dag_cbor({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z"})
    rec_cid = cid_for_dag_cbor(rec)
    root = cbrrr.encode_dag_cbor({"data": cbrrr.CID(rec_cid), "version": 3})
    root_cid = cid_for_dag_cbor(root)
    return write_car([root_cid], {root_cid: root, rec_cid: rec}), root_cid, rec_cid, rec


def _header_end(car: bytes) -> int:
    n, shift, pos = 0, 0, 0
    while True:
        b = car[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return pos + n


def _section_offsets(car: bytes) -> list[tuple[int, int]]:
    """(start of CID, end of section) for every block section, found independently."""
    out = []
    pos = 0
    n, shift = 0, 0
    while True:  # header varint
        b = car[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    pos += n
    while pos < len(car):
        n, shift = 0, 0
        while True:
            b = car[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        out.append((pos, pos + n))
        pos += n
    return out


# --- real data ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", REPO_CARS, ids=lambda p: p.name)
def test_real_repo_cars_parse_and_every_block_verifies(path: Path) -> None:
    data = path.read_bytes()
    car = read_car(data)
    assert isinstance(car, Car)
    assert len(car.roots) == 1
    assert car.require_root() == car.blocks[car.root]
    # Independent checks: libipld sees the same header and the same set of CIDs.
    header, blocks = libipld.decode_car(data)
    assert header["version"] == 1
    assert [bytes(r) for r in header["roots"]] == car.roots
    assert set(blocks) == set(car.blocks)
    for cid, block in car.blocks.items():
        assert block_matches(cid, block)
    # The root is a commit: {did, version (2 for older repos, 3 now), data, rev, sig, prev}.
    commit = libipld.decode_dag_cbor(car.require_root())
    assert commit["version"] in (2, 3) and commit["did"].startswith("did:")


@pytest.mark.parametrize("path", FIREHOSE, ids=lambda p: p.name)
def test_real_firehose_commit_blocks_parse(path: Path) -> None:
    evt = json.loads(path.read_text())
    raw = evt["blocks"]["$bytes"]
    data = base64.b64decode(raw + "=" * (-len(raw) % 4))
    car = read_car(data)
    assert car.root == cid_from_str(evt["commit"]["$link"])
    car.require_root()
    for op in evt["ops"]:
        if op.get("cid"):
            assert cid_from_str(op["cid"]["$link"]) in car.blocks


def test_accepts_bytearray_and_memoryview() -> None:
    data = REPO_CARS[0].read_bytes()
    a = read_car(data)
    assert read_car(bytearray(data)).blocks == a.blocks
    assert read_car(memoryview(data)).blocks == a.blocks


# --- round trip --------------------------------------------------------------------------


def test_write_read_round_trip_with_raw_block() -> None:
    blob = b"\x00\x01binary blob"
    blob_cid = cid_for_raw(blob)
    car, root_cid, rec_cid, rec = _small_car()
    car2 = write_car([root_cid, blob_cid], [(blob_cid, blob)] + list(read_car(car).blocks.items()))
    parsed = read_car(car2)
    assert parsed.roots == [root_cid, blob_cid]
    assert parsed.blocks[blob_cid] == blob and parsed.blocks[rec_cid] == rec


def test_duplicate_blocks_are_fine() -> None:
    car, root_cid, rec_cid, rec = _small_car()
    blocks = list(read_car(car).blocks.items())
    parsed = read_car(write_car([root_cid], blocks + blocks))
    assert len(parsed.blocks) == 2


def test_car_without_blocks_parses_but_root_is_missing() -> None:
    root = cid_for_dag_cbor(b"\xa0")
    car = read_car(write_car([root], {}))
    assert car.blocks == {}
    with pytest.raises(CarMissingRoot):
        car.require_root()


def test_non_minimal_section_varint_accepted_like_go() -> None:
    car, root_cid, rec_cid, rec = _small_car()
    hdr = _header({"version": 1, "roots": [cbrrr.CID(root_cid)]})
    section = rec_cid + rec
    n = len(section)
    padded = bytes([(n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, 0x80, 0x00])  # 4-byte form
    parsed = read_car(hdr + padded + section)
    assert parsed.blocks == {rec_cid: rec}


# --- corruption: each with its own error ---------------------------------------------------


@pytest.mark.parametrize("path", REPO_CARS, ids=lambda p: p.name)
def test_flipped_byte_in_any_block_is_hash_mismatch(path: Path) -> None:
    data = path.read_bytes()
    sections = _section_offsets(data)
    step = max(1, len(sections) // 40)
    for start, end in sections[::step]:
        for at in (start + 36, (start + 36 + end) // 2, end - 1):
            if at >= end:
                continue
            bad = bytearray(data)
            bad[at] ^= 0x01
            with pytest.raises(CarHashMismatch):
                read_car(bytes(bad))


def test_flipped_digest_byte_in_cid_is_hash_mismatch() -> None:
    car, *_ = _small_car()
    start, end = _section_offsets(car)[1]
    bad = bytearray(car)
    bad[start + 20] ^= 0xFF
    with pytest.raises(CarHashMismatch):
        read_car(bytes(bad))


def test_every_truncation_is_truncated_or_a_shorter_valid_car() -> None:
    data = (REAL / "greenground.repo.car").read_bytes()
    boundaries = {end for _, end in _section_offsets(data)}
    header_end = _header_end(data)
    for cut in range(len(data)):
        if cut in boundaries or cut == header_end:
            car = read_car(data[:cut])  # cut exactly between sections: fewer blocks, still valid
            assert len(car.blocks) < 4
            continue
        with pytest.raises(CarTruncated):
            read_car(data[:cut])


def test_truncated_big_car_inside_a_block() -> None:
    data = REPO_CARS[0].read_bytes()
    start, end = _section_offsets(data)[len(_section_offsets(data)) // 2]
    with pytest.raises(CarTruncated):
        read_car(data[: end - 1])


def test_bad_varint_in_header_and_in_section() -> None:
    with pytest.raises(CarBadVarint):
        read_car(b"\xff" * 12)
    car, *_ = _small_car()
    with pytest.raises(CarBadVarint):
        read_car(car + b"\xff" * 10 + b"\x01")
    # 2**63 exactly, in 10 bytes: overflow
    with pytest.raises(CarBadVarint):
        read_car(car + b"\x80" * 9 + b"\x01")


def test_varint_cut_by_end_of_data_is_truncated_not_bad() -> None:
    car, *_ = _small_car()
    with pytest.raises(CarTruncated):
        read_car(car + b"\x80\x80")


def test_missing_root_block() -> None:
    car, root_cid, rec_cid, rec = _small_car()
    only_record = write_car([root_cid], {rec_cid: rec})
    parsed = read_car(only_record)
    with pytest.raises(CarMissingRoot):
        parsed.require_root()


@pytest.mark.parametrize(
    "header",
    [
        {"version": 2, "roots": [cbrrr.CID(cid_for_dag_cbor(b"\xa0"))]},
        {"version": True, "roots": [cbrrr.CID(cid_for_dag_cbor(b"\xa0"))]},
        {"roots": [cbrrr.CID(cid_for_dag_cbor(b"\xa0"))]},
        {"version": 1, "roots": []},
        {"version": 1},
        {"version": 1, "roots": [cid_for_dag_cbor(b"\xa0")]},  # bytes, not a link
        {"version": 1, "roots": "x"},
        [1, 2],
    ],
    ids=["v2", "bool-version", "no-version", "empty-roots", "no-roots", "root-bytes", "roots-str", "list"],
)
def test_bad_header(header) -> None:
    with pytest.raises(CarBadHeader):
        read_car(_header(header))


def test_header_not_cbor_or_empty() -> None:
    with pytest.raises(CarBadHeader):
        read_car(b"\x02\xff\xff")
    with pytest.raises(CarBadHeader):
        read_car(b"\x00")
    with pytest.raises(CarTruncated):
        read_car(b"")
    with pytest.raises(CarTruncated):
        read_car(b"\x30\xa2")


def test_bad_root_cid_kind() -> None:
    v0 = b"\x12\x20" + hashlib.sha256(b"x").digest()
    with pytest.raises(CarBadCID):
        read_car(_header({"version": 1, "roots": [cbrrr.CID(v0)]}))


@pytest.mark.parametrize(
    "cid_prefix",
    [
        b"\x12\x20",  # CIDv0
        b"\x01\x70\x12\x20",  # dag-pb
        b"\x01\x71\x13\x20",  # sha2-512 code with 32-byte length
        b"\x01\x71\x12\x1f",  # wrong digest length
        b"\x02\x71\x12\x20",  # CID version 2
    ],
    ids=["v0", "dag-pb", "sha512", "len31", "v2"],
)
def test_unsupported_block_cid(cid_prefix: bytes) -> None:
    car, root_cid, *_ = _small_car()
    block = b"\xa1ax\x01"
    section = cid_prefix + hashlib.sha256(block).digest() + block
    with pytest.raises(CarBadCID):
        read_car(car + _varint(len(section)) + section)


def test_section_too_short_for_a_cid() -> None:
    car, *_ = _small_car()
    with pytest.raises(CarBadCID):
        read_car(car + b"\x05\x01\x71\x12\x20\x00")


def test_zero_length_section_ends_the_car_like_go_car() -> None:
    """go-car's CidFromReader returns io.EOF on an empty section, and Tap's loop stops there."""
    car, root_cid, rec_cid, rec = _small_car()
    parsed = read_car(car + b"\x00" + b"anything after is ignored \xff\xff")
    assert set(parsed.blocks) == {root_cid, rec_cid}


def test_too_large() -> None:
    data = REPO_CARS[0].read_bytes()
    with pytest.raises(CarTooLarge):
        read_car(data, max_size=len(data) - 1)
    read_car(data, max_size=len(data))
    car, *_ = _small_car()
    with pytest.raises(CarTooLarge):
        read_car(car + _varint(MAX_SECTION_SIZE + 1) + b"\x01")
    with pytest.raises(CarTooLarge):
        read_car(_varint(MAX_SECTION_SIZE + 1) + b"\xa0")


def test_error_classes_are_value_errors() -> None:
    for cls in (CarTooLarge, CarTruncated, CarBadVarint, CarBadHeader, CarHashMismatch, CarMissingRoot, CarBadCID):
        assert issubclass(cls, CarError) and issubclass(cls, ValueError)
    # distinct, so callers can count reasons
    assert len({CarTooLarge, CarTruncated, CarBadVarint, CarBadHeader, CarHashMismatch, CarMissingRoot, CarBadCID}) == 7


# --- index_car: the spooled path's reader ------------------------------------------------


def _outcome(reader, data: bytes, **kw):
    """(error class and text) or (roots, blocks) of one reader on ``data``."""
    try:
        car = reader(data, **kw)
    except CarError as e:
        return (type(e), str(e))
    cids = [c for c in read_car(data).blocks] if reader is not read_car else list(car.blocks)
    return (car.roots, len(car.blocks), {c: car.blocks.get(c) for c in cids})


def test_index_car_agrees_with_read_car() -> None:
    """Same verdict and text on every kind of bad CAR, the same blocks on good ones (duplicates,
    a non-minimal varint, a zero-length section, every truncation, flipped bytes, caps)."""
    from protocol.car import index_car

    real = REPO_CARS[0].read_bytes()
    small, root_cid, rec_cid, rec = _small_car()
    blocks = list(read_car(small).blocks.items())
    hdr = _header({"version": 1, "roots": [cbrrr.CID(root_cid)]})
    n = len(rec_cid + rec)
    cases = [real, small, write_car([root_cid], blocks + blocks), write_car([root_cid], {}),
             hdr + bytes([(n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, 0x80, 0x00]) + rec_cid + rec,
             small + b"\x00" + b"ignored", hdr + b"\x05abcde", hdr + b"\xff" * 10, b"\x00", b""]
    green = (REAL / "greenground.repo.car").read_bytes()
    cases += [green[:cut] for cut in range(0, len(green), 7)]
    for start, end in _section_offsets(real)[:: max(1, len(_section_offsets(real)) // 20)]:
        for at in (start + 2, start + 36, end - 1):
            bad = bytearray(real)
            bad[at] ^= 0x01
            cases.append(bytes(bad))
    for data in cases:
        assert _outcome(index_car, data) == _outcome(read_car, data), data[:80]
    for kw in ({"max_size": 100}, {"max_blocks": 3}):
        assert _outcome(index_car, real, **kw) == _outcome(read_car, real, **kw)
    idx = index_car(real).blocks
    assert idx.get(rec_cid) is None and idx.get(b"x") is None and rec_cid not in idx
