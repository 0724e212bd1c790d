"""CIDs as atproto uses them: CIDv1, sha2-256, codec dag-cbor (0x71) or raw (0x55).

Inside tapflow a CID is its binary form (``bytes``, e.g. ``b"\\x01\\x71\\x12\\x20" + digest``):
that is what DAG-CBOR links carry, what RocksDB stores and what hashes compare cheaply.
Strings (base32 ``bafy...``) exist only at the edges (JSON, HTTP).
"""

from __future__ import annotations

import hashlib

import libipld

CODEC_DAG_CBOR = 0x71
CODEC_RAW = 0x55
_SHA256 = 0x12

_PREFIX_DAG_CBOR = bytes((0x01, CODEC_DAG_CBOR, _SHA256, 0x20))
_PREFIX_RAW = bytes((0x01, CODEC_RAW, _SHA256, 0x20))


class CIDError(ValueError):
    """A CID that cannot be parsed or is not one atproto allows."""


def cid_for_dag_cbor(block: bytes) -> bytes:
    """The CID of a DAG-CBOR block (what MST nodes, commits and records are)."""
    return _PREFIX_DAG_CBOR + hashlib.sha256(block).digest()


def cid_for_raw(data: bytes) -> bytes:
    """The CID of raw bytes (blobs)."""
    return _PREFIX_RAW + hashlib.sha256(data).digest()


def block_matches(cid: bytes, block: bytes) -> bool:
    """True when ``block`` hashes to ``cid`` (sha2-256 CIDv1 only; anything else is False)."""
    if len(cid) != 36 or cid[0] != 0x01 or cid[2] != _SHA256 or cid[3] != 0x20:
        return False
    return hashlib.sha256(block).digest() == cid[4:]


def cid_to_str(cid: bytes) -> str:
    """Binary CID to its canonical string (base32 multibase for v1)."""
    try:
        return libipld.encode_cid(cid)
    except Exception as e:  # libipld raises ValueError-like errors of its own
        raise CIDError(f"invalid binary CID: {e}") from None


def cid_from_str(text: str) -> bytes:
    """Parse a CID string into binary form; only CIDv1 sha2-256 of dag-cbor or raw is accepted."""
    if not isinstance(text, str) or not text:
        raise CIDError("empty CID")
    try:
        parsed = libipld.decode_cid(text)
    except Exception as e:
        raise CIDError(f"invalid CID {text!r}: {e}") from None
    h = parsed["hash"]
    if parsed["version"] != 1:
        raise CIDError(f"CID {text!r} is not CIDv1")
    if h["code"] != _SHA256 or h["size"] != 32 or len(h["digest"]) != 32:
        raise CIDError(f"CID {text!r} is not sha2-256")
    codec = parsed["codec"]
    if codec == CODEC_DAG_CBOR:
        return _PREFIX_DAG_CBOR + h["digest"]
    if codec == CODEC_RAW:
        return _PREFIX_RAW + h["digest"]
    raise CIDError(f"CID {text!r} has codec {codec:#x}, not dag-cbor or raw")


def is_atproto_cid(cid: bytes) -> bool:
    """True for the binary CIDs atproto data may link to (v1, sha2-256, dag-cbor or raw)."""
    return len(cid) == 36 and (cid[:4] == _PREFIX_DAG_CBOR or cid[:4] == _PREFIX_RAW)
