"""CAR v1 reader and writer, verifying every block against its CID.

Why our own: ``libipld.decode_car`` never checks block hashes, and a CAR from a
PDS or a relay is untrusted input. Here every block's sha2-256 is compared with
its CID while splitting, so a ``Car`` that exists is a ``Car`` whose blocks are
what their CIDs say (what go-car's ``CarReader.Next`` guarantees for Tap).

Only atproto CIDs are accepted for blocks: CIDv1, sha2-256 (32 bytes), codec
dag-cbor (0x71) or raw (0x55). Anything else is ``CarBadCID``: atproto repos never
contain other blocks, and refusing them keeps the fast path to one prefix compare.

Layout: ``varint(len(header)) header`` then ``varint(len(cid)+len(data)) cid data``
repeated; the header is DAG-CBOR ``{"version": 1, "roots": [cid, ...]}``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from hashlib import sha256

import cbrrr

__all__ = [
    "Car",
    "CarError",
    "CarTooLarge",
    "CarTruncated",
    "CarBadVarint",
    "CarBadHeader",
    "CarHashMismatch",
    "CarMissingRoot",
    "CarBadCID",
    "read_car",
    "index_car",
    "BlockIndex",
    "write_car",
    "DEFAULT_MAX_CAR_SIZE",
    "DEFAULT_MAX_BLOCKS",
    "MAX_SECTION_SIZE",
]

#: Default cap on a whole CAR (getRepo of a big repo is a few hundred MiB at most).
DEFAULT_MAX_CAR_SIZE = 1 << 30
#: Default cap on the blocks of one CAR (sections read, duplicates included). 16 Mi fits any repo
#: under the default size cap whose blocks average 64 bytes or more; without it a CAR of minimal
#: 37-byte blocks costs ~150 bytes of dict and object overhead per block (~5 GB at 1 GiB).
DEFAULT_MAX_BLOCKS = 1 << 24
#: Cap on one header or block section, as go-car's ``util.MaxAllowedSectionSize``.
MAX_SECTION_SIZE = 32 << 20

_PFX_DAG_CBOR = b"\x01\x71\x12\x20"
_PFX_RAW = b"\x01\x55\x12\x20"
_CID_LEN = 36


class CarError(ValueError):
    """A CAR that cannot be used; the subclass says why."""


class CarTooLarge(CarError):
    """The CAR, or one section of it, exceeds the allowed size, or it has too many blocks."""


class CarTruncated(CarError):
    """The data ends in the middle of a varint, the header or a block."""


class CarBadVarint(CarError):
    """A section length varint is longer than 9 bytes or overflows 63 bits."""


class CarBadHeader(CarError):
    """The header is not DAG-CBOR ``{"version": 1, "roots": [cid, ...]}`` with at least one root."""


class CarHashMismatch(CarError):
    """A block's sha2-256 differs from the digest in its CID."""


class CarMissingRoot(CarError):
    """The first root's block is not in the CAR."""


class CarBadCID(CarError):
    """A CID that is not CIDv1 sha2-256 dag-cbor/raw, or an empty/short section."""


class Car:
    """A parsed and verified CAR: ``roots`` (binary CIDs) and ``blocks`` (cid -> bytes)."""

    __slots__ = ("roots", "blocks")

    def __init__(self, roots: list[bytes], blocks: dict[bytes, bytes]) -> None:
        self.roots = roots
        self.blocks = blocks

    @property
    def root(self) -> bytes:
        """The first root: the commit CID in every atproto CAR."""
        return self.roots[0]

    def require_root(self) -> bytes:
        """The first root's block (the commit); ``CarMissingRoot`` when it is absent."""
        block = self.blocks.get(self.roots[0])
        if block is None:
            raise CarMissingRoot("CAR root block is not in the CAR")
        return block

    def __repr__(self) -> str:
        return f"Car(roots={len(self.roots)}, blocks={len(self.blocks)})"


def _read_varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Unsigned LEB128 at ``pos``; returns (value, new_pos). Non-minimal forms are accepted, as Go's."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise CarTruncated("CAR ends inside a varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value >= 1 << 63:
                raise CarBadVarint("varint overflows 63 bits")
            return value, pos
        shift += 7
        if shift >= 63:
            raise CarBadVarint("varint longer than 9 bytes")


_ONE_ROOT_HEAD = b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00"  # {"roots": [link (37 bytes)],
_ONE_ROOT_TAIL = b"\x67version\x01"  # "version": 1}: the canonical one-root header


def _decode_header(hb: bytes) -> list[bytes]:
    """Decode the header section and return its roots as binary CIDs."""
    if len(hb) == 58 and hb.startswith(_ONE_ROOT_HEAD) and hb.endswith(_ONE_ROOT_TAIL):
        c = hb[13:49]  # every atproto CAR: one root, canonical encoding; no decoder needed
        if c.startswith((_PFX_DAG_CBOR, _PFX_RAW)):
            return [c]
    try:
        header = cbrrr.decode_dag_cbor(hb)
    except Exception as e:  # cbrrr raises its own error types and ValueError
        raise CarBadHeader(f"CAR header is not DAG-CBOR: {e}") from None
    if not isinstance(header, dict):
        raise CarBadHeader("CAR header is not a map")
    version = header.get("version")
    if type(version) is not int or version != 1:
        raise CarBadHeader(f"unsupported CAR version: {version!r}")
    roots = header.get("roots")
    if not isinstance(roots, list) or not roots:
        raise CarBadHeader("CAR header has no roots")
    out: list[bytes] = []
    for r in roots:
        if not isinstance(r, cbrrr.CID):
            raise CarBadHeader("CAR root is not a CID link")
        c = r.cid_bytes
        if len(c) != _CID_LEN or (c[:4] != _PFX_DAG_CBOR and c[:4] != _PFX_RAW):
            raise CarBadCID("CAR root is not a CIDv1 sha2-256 dag-cbor/raw CID")
        out.append(bytes(c))
    return out


def _read_header(data, end: int) -> tuple[list[bytes], int]:
    """The header section: its roots, and where the first block section starts."""
    hlen, pos = _read_varint(data, 0, end)
    if hlen > MAX_SECTION_SIZE:
        raise CarTooLarge(f"CAR header section of {hlen} bytes")
    if hlen == 0:
        raise CarBadHeader("CAR header is empty")
    if pos + hlen > end:
        raise CarTruncated("CAR ends inside the header")
    return _decode_header(data[pos : pos + hlen]), pos + hlen


def read_car(data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_CAR_SIZE,
             max_blocks: int = DEFAULT_MAX_BLOCKS) -> Car:
    """Parse a CAR v1 and verify the sha2-256 of every block against its CID.

    Raises a ``CarError`` subclass on anything wrong; never returns a partially
    verified CAR. Duplicate blocks (same CID) are kept once: same CID, same bytes.
    A zero-length section ends the CAR, as it does for go-car (Tap's reader).
    More than ``max_blocks`` block sections is ``CarTooLarge`` (checked before hashing
    the one over the limit, so the cost of a rejected CAR is bounded too).
    """
    end = len(data)
    if end > max_size:
        raise CarTooLarge(f"CAR is {end} bytes, more than {max_size}")
    if end == 0:
        raise CarTruncated("empty CAR")
    if type(data) is not bytes:
        data = bytes(data)  # one copy; bytes indexing and slicing beat memoryview per block

    roots, pos = _read_header(data, end)

    blocks: dict[bytes, bytes] = {}
    pfx_cbor = _PFX_DAG_CBOR
    pfx_raw = _PFX_RAW
    left = max_blocks
    while pos < end:
        # Section length: one byte for tiny sections, two bytes for most blocks.
        slen = data[pos]
        if slen < 0x80:
            pos += 1
        elif pos + 1 < end and data[pos + 1] < 0x80:
            slen = (slen & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            slen, pos = _read_varint(data, pos, end)
        send = pos + slen
        left -= 1
        if slen <= 36 or send > end or slen > MAX_SECTION_SIZE or left < 0:  # one test for the rare cases
            if _last_section(slen, send, end, left, max_blocks):
                break
        body_at = pos + 36
        cid = data[pos:body_at]
        pfx = cid[:4]
        if pfx != pfx_cbor and pfx != pfx_raw:
            raise CarBadCID(f"unsupported block CID prefix {pfx.hex()}")
        body = data[body_at:send]
        if sha256(body).digest() != cid[4:]:
            raise CarHashMismatch(f"block hash does not match its CID at offset {pos}")
        blocks[cid] = body
        pos = send
    return Car(roots, blocks)


def _last_section(slen: int, send: int, end: int, left: int, max_blocks: int) -> bool:
    """The rare cases of a section header, off the hot loops of ``read_car`` and
    ``read_repo_car``: True for an empty section (go-car reads it as io.EOF, so Go stops there
    and ignores the rest), a verdict for a bad one, False for a block of exactly a CID."""
    if slen == 0:
        return True
    if slen > MAX_SECTION_SIZE:
        raise CarTooLarge(f"CAR section of {slen} bytes")
    if left < 0:
        raise CarTooLarge(f"CAR has more than {max_blocks} blocks")
    if send > end:
        raise CarTruncated("CAR ends inside a block")
    if slen < 36:
        raise CarBadCID(f"CAR section of {slen} bytes is too short for a CID")
    return False


class BlockIndex:
    """The blocks of a CAR held in a buffer (an ``mmap`` of a spooled ``getRepo`` body), found by
    offset: ``get(cid)`` slices the block out of the buffer on demand.

    Why: ``read_car`` copies every block into a dict of ``bytes`` (about the CAR's size again,
    plus ~150 bytes of objects per block); here the buffer stays the only copy and the index is
    one open-addressing table of 8-byte slots (16-32 bytes per block, no object per block). A
    slot holds ``body offset << 26 | body length`` (+1, so 0 is free); the CID is not stored: it
    is the 36 bytes in front of the body, compared on every probe. The slot of a CID is its
    ``hash()`` (SipHash, keyed per process as for dicts), so a CAR cannot be built to collide.
    """

    __slots__ = ("_buf", "_slots", "_mask", "count")

    def __init__(self, buf, capacity: int) -> None:
        bits = max(4, (2 * max(1, capacity)).bit_length())  # at most half full
        self._buf = buf
        self._slots = array("Q", bytes(8 << bits))
        self._mask = (1 << bits) - 1
        self.count = 0

    def get(self, cid: bytes, default: bytes | None = None) -> bytes | None:
        if cid.__class__ is not bytes:
            return default
        slots, buf, mask = self._slots, self._buf, self._mask
        i = hash(cid) & mask
        while True:
            v = slots[i]
            if not v:
                return default
            v -= 1
            o = v >> 26
            if buf[o - 36 : o] == cid:
                return buf[o : o + (v & _LEN_MASK)]
            i = (i + 1) & mask

    def __len__(self) -> int:
        return self.count

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, bytes) and self.get(cid) is not None


_LEN_MASK = (1 << 26) - 1
assert MAX_SECTION_SIZE <= _LEN_MASK


def _count_sections(data, pos: int, end: int) -> int:
    """How many sections follow ``pos`` (stops early at anything malformed: the real pass reports it)."""
    n = 0
    while pos < end:
        b = data[pos]
        if b < 0x80:
            slen = b
            pos += 1
        elif pos + 1 < end and data[pos + 1] < 0x80:
            slen = (b & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            try:
                slen, pos = _read_varint(data, pos, end)
            except CarError:
                break
        if slen == 0:
            break
        pos += slen
        n += 1
    return n


def index_car(data, max_size: int = DEFAULT_MAX_CAR_SIZE, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Car:
    """``read_car`` for a large CAR in a buffer (``mmap``, ``bytes``): the same checks in the same
    order with the same errors (every block's sha2-256 against its CID), but the ``Car``'s
    ``blocks`` is a ``BlockIndex`` into ``data``, which must stay open while it is used.

    ``read_car`` keeps its own loop: it is the hot path of every small repo and live commit.
    """
    end = len(data)
    if end > max_size:
        raise CarTooLarge(f"CAR is {end} bytes, more than {max_size}")
    if end == 0:
        raise CarTruncated("empty CAR")
    roots, pos = _read_header(data, end)

    index = BlockIndex(data, min(_count_sections(data, pos, end), max_blocks))
    slots, mask = index._slots, index._mask  # filled here, in the loop: no call per block
    pfx_cbor = _PFX_DAG_CBOR
    pfx_raw = _PFX_RAW
    left = max_blocks
    count = 0
    view = memoryview(data)  # hashing a view of the block: no copy of its bytes
    try:
        while pos < end:
            slen = data[pos]
            if slen < 0x80:
                pos += 1
            elif pos + 1 < end and data[pos + 1] < 0x80:
                slen = (slen & 0x7F) | (data[pos + 1] << 7)
                pos += 2
            else:
                slen, pos = _read_varint(data, pos, end)
            send = pos + slen
            left -= 1
            if slen <= 36 or send > end or slen > MAX_SECTION_SIZE or left < 0:
                if _last_section(slen, send, end, left, max_blocks):
                    break
            body_at = pos + 36
            cid = data[pos:body_at]
            pfx = cid[:4]
            if pfx != pfx_cbor and pfx != pfx_raw:
                raise CarBadCID(f"unsupported block CID prefix {pfx.hex()}")
            if sha256(view[body_at:send]).digest() != cid[4:]:
                raise CarHashMismatch(f"block hash does not match its CID at offset {pos}")
            i = hash(cid) & mask
            while True:
                v = slots[i]
                if not v:
                    slots[i] = (body_at << 26 | slen - 36) + 1
                    count += 1
                    break
                o = (v - 1) >> 26
                if data[o - 36 : o] == cid:
                    break  # a duplicate: same CID, same bytes
                i = (i + 1) & mask
            pos = send
    finally:
        view.release()
    index.count = count
    return Car(roots, index)


def _varint(n: int) -> bytes:
    """Unsigned LEB128 encoding (minimal)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def write_car(
    roots: Iterable[bytes],
    blocks: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]],
) -> bytes:
    """Serialize a CAR v1 (roots are binary CIDs; blocks a mapping or (cid, bytes) pairs, in order).

    No verification: tests use it to build corrupted CARs on purpose.
    """
    header = cbrrr.encode_dag_cbor({"version": 1, "roots": [cbrrr.CID(bytes(r)) for r in roots]})
    parts = [_varint(len(header)), header]
    items = blocks.items() if isinstance(blocks, Mapping) else blocks
    for cid, data in items:
        parts.append(_varint(len(cid) + len(data)))
        parts.append(bytes(cid))
        parts.append(bytes(data))
    return b"".join(parts)
