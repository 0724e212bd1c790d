"""DAG-CBOR for atproto: fast decode (libipld) and canonical encode (cbrrr).

Two decoders on purpose:
- ``decode`` (libipld, ~1 us a frame) returns CID links as plain ``bytes`` (binary CID).
  Fine where the schema says which fields are links (frames, commits, MST nodes).
  Never re-encode its output to compute a CID or a signature input: links and byte
  strings look the same there.
- ``decode_strict`` (cbrrr) keeps links as ``cbrrr.CID`` and byte strings as ``bytes``,
  and rejects what DAG-CBOR forbids; use it where the distinction matters.

``encode`` is canonical DAG-CBOR (sorted map keys, shortest integers); links must be
given as ``cbrrr.CID`` (use ``link(cid_bytes)``).
"""

from __future__ import annotations

from typing import Any

import cbrrr
import libipld

CID = cbrrr.CID


class CBORError(ValueError):
    """Bytes that are not valid DAG-CBOR."""


def decode(data: bytes) -> Any:
    """Decode one DAG-CBOR object; links come back as binary CID ``bytes``."""
    try:
        return libipld.decode_dag_cbor(data)
    except Exception as e:
        raise CBORError(f"invalid DAG-CBOR: {e}") from None


def decode_multi(data: bytes) -> list[Any]:
    """Decode concatenated DAG-CBOR objects (a firehose frame: header then body)."""
    try:
        return libipld.decode_dag_cbor_multi(data)
    except Exception as e:
        raise CBORError(f"invalid DAG-CBOR: {e}") from None


def decode_strict(data: bytes) -> Any:
    """Decode keeping links as ``cbrrr.CID``; rejects non-canonical or forbidden encodings."""
    try:
        return cbrrr.decode_dag_cbor(data)
    except Exception as e:
        raise CBORError(f"invalid DAG-CBOR: {e}") from None


def decode_atjson(data: bytes) -> Any:
    """Decode straight to the atproto JSON data model (``$link``, ``$bytes``)."""
    try:
        return cbrrr.decode_dag_cbor(data, atjson_mode=True)
    except Exception as e:
        raise CBORError(f"invalid DAG-CBOR: {e}") from None


def encode(obj: Any) -> bytes:
    """Canonical DAG-CBOR; links must be ``cbrrr.CID`` values."""
    try:
        return cbrrr.encode_dag_cbor(obj)
    except Exception as e:
        raise CBORError(f"cannot encode as DAG-CBOR: {e}") from None


def link(cid: bytes) -> CID:
    """Wrap a binary CID so ``encode`` writes it as a link (tag 42)."""
    return cbrrr.CID(cid)
