"""atproto Merkle Search Tree (MST): load, walk, verify, edit, invert. Pure code, no I/O.

The MST maps keys (repo paths ``collection/rkey`` as bytes) to value CIDs. A key's *height*
(layer) is the number of leading zero 2-bit groups of sha256(key); every node holds the keys of
one layer in order, with subtrees of the layer below between them. The shape therefore depends
only on the key set, so two parties holding the same records compute the same root CID.

Node encoding (DAG-CBOR)::

    {"l": link | null,                     # subtree left of the first key
     "e": [{"p": int,                      # bytes shared with the previous key in this node
            "k": bytes,                    # the rest of the key
            "v": link,                     # the value (record CID)
            "t": link | null}, ...]}       # subtree right of this key

In memory a node is ``keys[n]``, ``vals[n]`` and ``subs[n + 1]`` (``subs[i]`` is the subtree
between ``keys[i-1]`` and ``keys[i]``). A subtree reference is ``None``, a ``Node``, or the
child's binary CID (``bytes``) while it has not been loaded. Loading is lazy: only the nodes an
operation touches get decoded, and a CID whose block is not in the store makes the tree
*partial*; touching it raises :class:`MSTPartialError`.

Nodes are never mutated after construction (apart from replacing a child CID by the node
loaded from it, which changes nothing observable), so edits copy only the path from the root
and ``MST.copy()`` is O(1). Each node caches its CID; the root CID after an edit re-hashes only
the new nodes.

Encoding (the hot path of every commit check: a proof is ~8 nodes deep in a 10k-record repo,
and each is decoded, edited and re-encoded). Nodes are built with the right types, never by
blindly re-encoding decoded data: a node above an edit changes only a subtree link, and is
re-encoded by swapping those 36 CID bytes in its block (exact: links have a fixed length). A
node that gains or loses an entry is re-encoded with libipld from its entry dicts, but only when
that is exact: the decoded node was canonical with exactly the schema's fields (``v``/``t``/``l``
are links by construction, and libipld writes a 36-byte CID as a link), and no key suffix could
be mistaken for a CID (libipld writes such byte strings as links; suffixes starting with a
printable ASCII byte never parse as one, and repo paths are printable). Otherwise the node is
encoded with cbrrr and explicit ``CID`` links. Tests check every block produced is canonical
DAG-CBOR with links as links. libipld encodes an MST node ~4x faster than cbrrr with ``CID``
wrappers, which is why the guarded path exists.

Example::

    t = MST.build([(b"app.bsky.feed.post/3k2a", rec_cid)])
    prev = t.insert(b"app.bsky.feed.like/3k2b", other_cid)
    root = t.root_cid(out=blocks)   # new node blocks land in ``blocks``
    t2 = MST.load(blocks, root)
    assert list(t2.walk()) == sorted(...)
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from operator import itemgetter
from typing import Callable, Iterable, Iterator, Protocol

import cbrrr
import libipld

try:  # the non-OpenSSL sha256: ~2x cheaper than hashlib's for the short inputs keys are
    from _sha256 import sha256 as _sha256_small
except ImportError:  # Python >= 3.12 names it _sha2
    try:
        from _sha2 import sha256 as _sha256_small  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover
        _sha256_small = hashlib.sha256

_sha256 = hashlib.sha256
_SMALL = 120  # below this (two SHA-256 blocks) the non-OpenSSL hash is cheaper, above it OpenSSL's

__all__ = [
    "MAX_KEY_BYTES",
    "MSTError",
    "MSTKeyError",
    "MSTPartialError",
    "MSTStructureError",
    "MSTBadNode",
    "MSTHeightError",
    "MSTOrderError",
    "MSTPrefixError",
    "MSTEmptyNodeError",
    "MSTInversionError",
    "BlockSource",
    "Node",
    "MST",
    "key_height",
    "common_prefix_len",
    "invert_ops",
]

MAX_KEY_BYTES = 1024

_CBOR_PREFIX = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32 bytes
_RAW_PREFIX = b"\x01\x55\x12\x20"


# ----------------------------------------------------------------------------- errors


class MSTError(ValueError):
    """Anything wrong with an MST or an operation on it."""


class MSTKeyError(MSTError):
    """A key that cannot be in an MST (empty or longer than MAX_KEY_BYTES), or a bad value CID."""


class MSTPartialError(MSTError):
    """The operation needs a node whose block is not available (a partial tree or proof)."""


class MSTStructureError(MSTError):
    """The tree is not a valid MST (base class of the specific structure errors)."""


class MSTBadNode(MSTStructureError):
    """A node block that is not a well-formed MST node (bad CBOR, wrong field types)."""


class MSTHeightError(MSTStructureError):
    """A key sits on a layer that does not match its height, or a subtree below layer 0."""


class MSTOrderError(MSTStructureError):
    """Keys are not strictly increasing in tree order (duplicates included)."""


class MSTPrefixError(MSTStructureError):
    """Prefix compression in a node is wrong or not maximal (not the canonical encoding)."""


class MSTEmptyNodeError(MSTStructureError):
    """An empty node below the root, or a root that is only a pointer to a subtree."""


class MSTInversionError(MSTError):
    """An operation could not be inverted: the tree did not hold what the operation claims."""


class BlockSource(Protocol):
    """Where nodes come from: anything with ``get(cid) -> bytes | None`` (a dict works)."""

    def get(self, cid: bytes, /) -> bytes | None: ...


# ----------------------------------------------------------------------------- key helpers


_last_height: tuple = (None, 0)  # one-entry cache: a commit op's key is looked up, then edited


def key_height(key: bytes) -> int:
    """Layer of ``key``: leading zero 2-bit groups of sha256(key) (fanout 4)."""
    global _last_height
    last = _last_height  # (key, height), replaced as a whole: safe across threads
    if last[0] is key:
        return last[1]
    d = _sha256_small(key).digest()
    h = 0 if d[0] & 0xC0 else (256 - int.from_bytes(d, "big").bit_length()) >> 1  # 0: three keys in four
    _last_height = (key, h)
    return h


def common_prefix_len(a: bytes, b: bytes) -> int:
    """Number of leading bytes ``a`` and ``b`` share (in C, via an integer XOR)."""
    n = len(a) if len(a) < len(b) else len(b)
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    if not x:
        return n
    return n - ((x.bit_length() + 7) >> 3)


def _check_key(key: bytes) -> None:
    if type(key) is not bytes or not key or len(key) > MAX_KEY_BYTES:
        raise MSTKeyError(f"invalid MST key {key!r:.80}")


def _check_value(val: bytes) -> None:
    if type(val) is not bytes or len(val) != 36 or (val[:4] != _CBOR_PREFIX and val[:4] != _RAW_PREFIX):
        raise MSTKeyError(f"MST value must be a binary sha2-256 CIDv1, got {val!r:.80}")


# ----------------------------------------------------------------------------- nodes

_LINK_HDR = b"\xd8\x2a\x58\x25\x00"  # tag 42, byte string of 37: the encoding of a link to a CID
_dec = libipld.decode_dag_cbor
_enc = libipld.encode_dag_cbor
_get_v = itemgetter("v")


class Node:
    """One MST node; see the module docstring for ``keys``, ``vals`` and ``subs``. Immutable.

    A decoded node is lazy: ``keys`` is always there, but ``vals`` and ``subs`` stay None until
    something needs them whole (:func:`_full`); until then values and subtree links are read from
    ``ents``/``lcid``, and the one child loaded so far (or replaced, in an edited copy) is ``kid``
    = ``(index, child)``. A proof walk touches one child per node, so most nodes never build the
    lists. ``full()`` fills them in.

    Encoding state, so that an edited node is re-encoded with as little Python as possible:

    - ``ents``/``lcid``: the node's entry dicts and left link as they are encoded (from the
      decoder or the last encode), correct except for the subtrees listed in ``stale``;
    - ``block``: the encoded bytes matching ``ents``/``lcid``. A copy whose only change is a
      subtree link (every node on the path above an edit) is encoded by swapping the 36 CID
      bytes in place, which is what a fresh encoding gives when the node is canonical (maximal
      prefixes, ``canonical``) with exactly the schema's fields (``plain``): links have a fixed
      length;
    - ``exact``: whether libipld re-encodes ``ents``/``lcid`` to exactly ``block`` (None: not
      checked yet; checked by one round trip when an entry of the node changes);
    - neither ``ents`` nor ``block``: a node built from scratch (split, merge, build), encoded
      entry by entry.
    """

    __slots__ = ("height", "keys", "vals", "subs", "cid", "block", "ents", "lcid", "stale", "canonical",
                 "plain", "exact", "kid")

    def __init__(self, height: int, keys: list, vals: list | None, subs: list | None, cid: bytes | None = None,
                 block: bytes | None = None, ents: list | None = None, lcid: bytes | None = None,
                 stale: tuple = (), canonical: bool = True, plain: bool = True, exact: bool | None = True,
                 kid: tuple | None = None) -> None:
        self.height = height
        self.keys = keys
        self.vals = vals  # None: read from ents (lazy decoded node)
        self.subs = subs  # None: read from lcid/ents, with ``kid`` overriding one index
        self.cid = cid  # None until computed; set for loaded nodes
        self.block = block
        self.ents = ents
        self.lcid = lcid
        self.stale = stale  # indices into subs whose link differs from ents/lcid/block
        self.canonical = canonical  # False when the decoded block's prefix compression was not maximal
        self.plain = plain  # False when the decoded block had fields beyond the schema's
        self.exact = exact
        self.kid = kid

    def full(self) -> "Node":
        """This node with ``keys``/``vals``/``subs`` filled in (subtrees as CIDs unless loaded)."""
        return _full(self)

    def is_empty(self) -> bool:
        return not self.keys and _ref(self, 0) is None

    def __repr__(self) -> str:
        return f"Node(h={self.height}, keys={len(self.keys)}, cid={'set' if self.cid else 'dirty'})"


def _decode_node(cid: bytes, block: bytes, height: int) -> Node:
    """Parse a node block. ``height`` is the layer the parent implies (-1 at the root: derive it).

    The hot path of every verification: only the keys are rebuilt here (they are needed to find
    anything), with the checks that the rebuilt keys depend on (prefix lengths) and the two
    flags the encoder needs; values and subtree links stay in the decoded entries until used.
    Links are checked when followed (:func:`_load`) and in full by ``verify``.
    """
    try:
        d = _dec(block)
    except Exception as e:
        raise MSTBadNode(f"MST node {_cid_str(cid)} is not DAG-CBOR: {e}") from None
    try:
        ents = d["e"]
        try:
            left = d["l"]
            plain = len(d) == 2
        except KeyError:  # tolerated (read as null), but then never re-encoded from this form
            left = None
            plain = False
        keys: list = []
        prev = b""
        canonical = True
        for e in ents:
            p = e["p"]
            k = e["k"]
            if p.__class__ is not int or p >= len(prev) or p < 0:
                if p.__class__ is not int:
                    raise MSTBadNode(f"MST node {_cid_str(cid)}: entry key or prefix of the wrong type")
                if p != len(prev):
                    raise MSTBadNode(f"MST node {_cid_str(cid)}: prefix length {p} beyond the previous key")
                # p == len(prev) (always so for the first entry): the suffix extends the previous key
            elif k and k[0] == prev[p]:  # the suffix repeats a byte the prefix could have covered
                canonical = False
            if len(e) != 4:  # exactly k, p, t, v (a missing v is reported when read, a missing t reads as null)
                plain = False
            prev = prev[:p] + k  # TypeError unless k is bytes
            keys.append(prev)
    except (KeyError, TypeError, AttributeError):
        raise MSTBadNode(f"MST node {_cid_str(cid)} is not a node map with well-formed entries") from None
    if ents.__class__ is not list:
        raise MSTBadNode(f"MST node {_cid_str(cid)} has no entry list")
    if height <= 0:
        if height < 0:  # the root: its keys say its layer
            height = key_height(keys[0]) if keys else (0 if left is None else -1)
        if height == 0:
            if left is None:
                for e in ents:
                    if e.get("t") is not None:
                        break
                else:
                    left = _NO_SUBTREE
            if left is not _NO_SUBTREE:
                for t in [left] + [e.get("t") for e in ents]:
                    if t is not None and (t.__class__ is not bytes or len(t) != 36 or not t.startswith(_CBOR_PREFIX)):
                        raise MSTBadNode(f"MST node {_cid_str(cid)}: subtree link is not a node CID")
                raise MSTHeightError(f"MST node {_cid_str(cid)} on layer 0 has subtrees")
            left = None
    # Node(height, keys, None, None, cid, block, ents, left, (), canonical, plain, None), without
    # the call: one per node of every proof
    node = _new_node(Node)
    node.height = height
    node.keys = keys
    node.vals = node.subs = node.exact = node.kid = None
    node.cid = cid
    node.block = block
    node.ents = ents
    node.lcid = left
    node.stale = ()
    node.canonical = canonical
    node.plain = plain
    return node


_NO_SUBTREE = object()  # _decode_node's marker: a layer-0 node without subtree links, as it must be
_new_node = object.__new__


def _cid_str(cid: bytes | None) -> str:
    if not cid:
        return "(unsaved)"
    try:
        return libipld.encode_cid(cid)
    except Exception:
        return repr(cid)[:100]




def _typed_ok(block: bytes) -> bool:
    """True when every link field of a node block (``l``, ``t``, ``v``) is a link or null and every
    key suffix a byte string, read with a decoder that keeps the two apart (cbrrr).

    libipld returns links and byte strings alike, so a node holding a CID as a byte string (Go's
    decoder refuses it) would otherwise pass as the same node with a link: the same records under
    two root CIDs. ``verify`` calls it only when the block's length is not what the decoded node
    encodes to with links as links (:func:`_encoded_size`: a CID written as a byte string is 3
    bytes shorter, a key suffix written as a link 3 bytes longer), so the common path pays a sum.
    Reading a proof does not check it; a proof node's types matter where the node is re-encoded,
    and there the round trip (``_exact``) refuses it.
    """
    try:
        d = cbrrr.decode_dag_cbor(block)
        link = cbrrr.CID
        left = d.get("l")
        if left is not None and left.__class__ is not link:
            return False
        for e in d["e"]:
            t = e.get("t")
            if t is not None and t.__class__ is not link:
                return False
            if e.get("v").__class__ is not link or e.get("k").__class__ is not bytes:
                return False
    except Exception:  # not canonical DAG-CBOR, or not a node: refused too
        return False
    return True


def _encoded_size(ents: list, left) -> int:
    """Length of the canonical encoding of a node with these entries (links as links, key
    suffixes as byte strings, no other fields); a node over 23 entries or with a suffix or prefix
    over 255 bytes is counted short, so it takes the exact check."""
    n = len(ents)
    size = 7 + (n > 23) + (0 if left is None else 40)  # {"e": [...], "l": null | link}
    for e in ents:
        lk = len(e.get("k"))
        size += 53 + lk + (lk > 23) + (e.get("p") > 23)  # {"k": bytes, "p": int, "t": null, "v": link}
        if e.get("t") is not None:
            size += 40
    return size


def _ref(node: Node, i: int):
    """Subtree ``i`` of ``node`` as it stands: None, a CID (not loaded) or a Node."""
    subs = node.subs
    if subs is not None:
        return subs[i]
    kid = node.kid
    if kid is not None and kid[0] == i:
        return kid[1]
    if i == 0:
        return node.lcid
    return node.ents[i - 1].get("t")


def _vals(node: Node) -> list:
    vals = node.vals
    if vals is None:
        try:
            vals = node.vals = list(map(_get_v, node.ents))
        except KeyError:
            raise MSTBadNode(f"MST node {_cid_str(node.cid)} has an entry without a value") from None
    return vals


def _subs(node: Node) -> list:
    subs = node.subs
    if subs is None:
        subs = [e.get("t") for e in node.ents]
        subs.insert(0, node.lcid)
        kid = node.kid
        if kid is not None:
            subs[kid[0]] = kid[1]
            node.kid = None
        node.subs = subs
    return subs


def _full(node: Node) -> Node:
    if node.vals is None:
        _vals(node)
    if node.subs is None:
        _subs(node)
    return node


def _load(ref, height: int, store: BlockSource) -> Node:
    """Decode the node a subtree link points at; MSTBadNode for a link that is not a node CID."""
    if ref.__class__ is not bytes or len(ref) != 36 or not ref.startswith(_CBOR_PREFIX):
        raise MSTBadNode(f"MST subtree link {ref!r:.80} is not a node CID")
    block = store.get(ref)
    if block is None:
        raise MSTPartialError(f"MST node {_cid_str(ref)} missing")
    return _decode_node(ref, block, height)


def _child(node: Node, i: int, store: BlockSource) -> Node | None:
    """Subtree ``i`` loaded (memoized on ``node``), or None when there is none.

    MSTPartialError if its block is missing, MSTBadNode if the link is not a node CID.
    """
    subs = node.subs
    if subs is None:
        kid = node.kid
        if kid is None:
            ref = node.lcid if i == 0 else node.ents[i - 1].get("t")
            if ref is None:
                return None
            if ref.__class__ is not bytes or len(ref) != 36 or not ref.startswith(_CBOR_PREFIX):
                raise MSTBadNode(f"MST subtree link {ref!r:.80} is not a node CID")
            block = store.get(ref)
            if block is None:
                raise MSTPartialError(f"MST node {_cid_str(ref)} missing")
            child = _decode_node(ref, block, node.height - 1)
            node.kid = (i, child)
            return child
        if kid[0] == i:
            return kid[1]
        subs = _subs(node)
    sub = subs[i]
    if sub is None or sub.__class__ is Node:
        return sub
    child = _load(sub, node.height - 1, store)
    subs[i] = child
    return child


def _sub_cid(s, out: dict | None):
    if s is None or s.__class__ is bytes:
        return s
    if s.__class__ is not Node:  # a decoded link of another type (a hostile node)
        raise MSTBadNode(f"MST subtree link {s!r:.80} is not a CID")
    c = s.cid
    return c if c is not None else _encode_node(s, out)


def _exact(node: Node) -> bool:
    """True when libipld re-encodes ``ents``/``lcid`` to exactly ``block`` (checked once)."""
    x = node.exact
    if x is None:
        block = node.block
        x = (node.canonical and node.plain and block is not None
             and _enc({"e": node.ents, "l": node.lcid}) == block)
        node.exact = x
    return x


def _encode_node(node: Node, out: dict | None) -> bytes:
    """Encode ``node`` (children first), cache its CID and return it; blocks go to ``out``."""
    kid = node.kid
    if kid is not None and node.subs is None and node.canonical and node.plain and len(node.stale) == 1:
        # The common case, every node above an edit: a decoded node with one subtree replaced.
        block = node.block
        child = kid[1]
        i = kid[0]
        if block is not None and child is not None and node.stale[0] == i:
            c = child.cid
            if c is None:
                c = _encode_node(child, out)
            ents = node.ents
            old = node.lcid if i == 0 else ents[i - 1].get("t")
            if old is not None:
                if c != old:
                    needle = _LINK_HDR + old
                    if block.count(needle) != 1:
                        return _encode_general(node, out)
                    block = block.replace(needle, _LINK_HDR + c)
                    if i == 0:
                        node.lcid = c
                    else:
                        ents = ents[:]
                        e = ents[i - 1]
                        ents[i - 1] = {"k": e.get("k"), "p": e.get("p"), "t": c, "v": e.get("v")}
                        node.ents = ents
                    node.block = block
                cid = _CBOR_PREFIX + (_sha256(block) if len(block) >= _SMALL else _sha256_small(block)).digest()
                node.cid = cid
                node.stale = ()
                if out is not None:
                    out[cid] = block
                return cid
    return _encode_general(node, out)


def _encode_general(node: Node, out: dict | None) -> bytes:
    ents = node.ents
    block = None
    if ents is not None:
        lcid = node.lcid
        block = node.block
        exact = node.exact
        changes = None
        for j in node.stale:
            c = _sub_cid(_ref(node, j), out)
            old = lcid if j == 0 else ents[j - 1].get("t")
            if c != old:
                if changes is None:
                    changes = []
                changes.append((j, old, c))
        if changes is not None:
            if block is not None and node.canonical and node.plain:
                for j, old, c in changes:  # swap the link bytes: same length, same position
                    if old is None or c is None:
                        block = None
                        break
                    needle = _LINK_HDR + old
                    if block.count(needle) != 1:
                        block = None
                        break
                    block = block.replace(needle, _LINK_HDR + c)
            else:
                block = None
            if block is None and exact is None:
                exact = _exact(node)  # judged on the unchanged node, before ents is replaced
            ents = ents[:]
            for j, old, c in changes:
                if j == 0:
                    lcid = c
                else:
                    e = ents[j - 1]
                    ents[j - 1] = {"k": e.get("k"), "p": e.get("p"), "t": c, "v": e.get("v")}
        if block is None:
            if exact is None:
                exact = _exact(node)
            if exact:
                block = _enc({"e": ents, "l": lcid})
                node.canonical = node.plain = True
            else:
                ents = None
    if block is None:
        block, ents, lcid = _encode_fresh(_full(node), out)
        exact = ents is not None
        node.canonical = node.plain = True
    cid = _CBOR_PREFIX + (_sha256(block) if len(block) >= _SMALL else _sha256_small(block)).digest()
    node.cid = cid
    node.block = block
    node.ents = ents
    node.lcid = lcid
    node.exact = exact
    node.stale = ()
    if out is not None:
        out[cid] = block
    return cid


def _encode_fresh(node: Node, out: dict | None) -> tuple[bytes, list | None, bytes | None]:
    """Encode a node built from scratch: prefixes computed here, always canonical."""
    sub_cids = [_sub_cid(s, out) for s in node.subs]
    vals = node.vals
    ents = []
    prev = b""
    safe = True
    for i, k in enumerate(node.keys):
        if k <= prev:  # only a hostile tree (keys as decoded, never checked) gets here so
            raise MSTOrderError(f"MST key {k!r:.80} out of order (after {prev!r:.80})")
        p = common_prefix_len(prev, k) if prev else 0
        suffix = k[p:] if p else k
        # libipld's encoder writes any byte string that parses as a CID as a link; a suffix
        # starting with a printable ASCII byte never does (repo paths always are printable).
        if not (0x20 <= suffix[0] < 0x7F):
            safe = False
        ents.append({"k": suffix, "p": p, "t": sub_cids[i + 1], "v": vals[i]})
        prev = k
    lcid = sub_cids[0]
    if safe:
        return _enc({"e": ents, "l": lcid}), ents, lcid
    return _encode_exact(ents, lcid), None, lcid


def _encode_all(node: Node, out: dict) -> None:
    """Encode ``node`` and everything under it (all loaded) into ``out``, ignoring cached CIDs."""
    for s in _full(node).subs:
        if s is not None:
            _encode_all(s, out)
    node.cid = None
    node.block = None
    node.ents = None
    node.stale = ()
    _encode_node(node, out)


def _encode_exact(ents: list, left: bytes | None) -> bytes:
    """Slow path with explicit link types (keys that could be mistaken for CIDs)."""
    link = cbrrr.CID
    e = [{"k": x["k"], "p": x["p"], "t": None if x["t"] is None else link(x["t"]), "v": link(x["v"])}
         for x in ents]
    return cbrrr.encode_dag_cbor({"e": e, "l": None if left is None else link(left)})


# ----------------------------------------------------------------------------- tree


class MST:
    """An MST over a block source. Edits replace ``root``; nodes are shared, so ``copy`` is O(1).

    ``root`` is a :class:`Node`, or a CID (``bytes``) for a *stub* root: the tree whose top was
    trimmed down to a subtree that is not available (only its CID is known, see ``remove``).
    """

    __slots__ = ("root", "store", "trail")

    def __init__(self, root: Node | bytes, store: BlockSource | None = None) -> None:
        self.root = root
        self.store: BlockSource = store if store is not None else {}
        # The last ``get`` that found its key: (key, root, node holding it, [(parent, index,
        # child), ...] from the root down). A commit's op is looked up, then inverted on a copy
        # of the same root: the inversion starts from this walk instead of repeating it. Valid
        # while ``root`` is that root (nodes are immutable; a walk only memoizes children).
        self.trail: tuple | None = None

    # -- construction

    @classmethod
    def empty(cls) -> "MST":
        return cls(Node(0, [], [], [None]), {})

    @classmethod
    def load(cls, store: BlockSource, root_cid: bytes) -> "MST":
        """Load lazily from ``store``; the root block must be present, the rest may be missing."""
        block = store.get(root_cid)
        if block is None:
            raise MSTPartialError(f"MST root block {_cid_str(root_cid)} missing")
        root = _decode_node(root_cid, block, -1)
        if root.height < 0:  # no keys, only a left subtree
            root.height = _height_below(root, store)
        return cls(root, store)

    @classmethod
    def build(cls, items: Iterable[tuple[bytes, bytes]]) -> "MST":
        """Build the tree for a set of (key, value) pairs directly (faster than inserting one by one)."""
        pairs = sorted(items)
        for k, v in pairs:
            _check_key(k)
            _check_value(v)
        for i in range(1, len(pairs)):
            if pairs[i][0] == pairs[i - 1][0]:
                raise MSTKeyError(f"duplicate key {pairs[i][0]!r:.80}")
        if not pairs:
            return cls.empty()
        keys = [k for k, _ in pairs]
        vals = [v for _, v in pairs]
        heights = [key_height(k) for k in keys]
        top = max(heights)
        return cls(_build(keys, vals, heights, 0, len(keys), top), {})

    def copy(self) -> "MST":
        t = MST(self.root, self.store)
        t.trail = self.trail
        return t

    # -- queries

    def root_cid(self, out: dict | None = None) -> bytes:
        """CID of the root; encodes only nodes changed since their CID was last computed.

        New node blocks are written into ``out`` when given (the blocks of a commit diff).
        """
        root = self.root
        if root.__class__ is bytes:
            return root
        if root.cid is not None:
            return root.cid
        return _encode_node(root, out)

    def export_blocks(self, out: dict) -> bytes:
        """Write every node block of the tree into ``out`` (re-encoding in-memory nodes, copying
        unloaded ones from the store); returns the root CID. MSTPartialError if a node is missing.
        """
        root = self._root_node()
        store = self.store
        stack = [root]
        while stack:
            node = stack.pop()
            for i, sub in enumerate(_full(node).subs):
                if sub is not None:
                    stack.append(_child(node, i, store))
        # children before parents: encode bottom-up through the recursive encoder
        _encode_all(root, out)
        return root.cid

    def is_partial(self) -> bool:
        """True when some node is not available (walks and loads the whole tree)."""
        if self.root.__class__ is bytes:
            return True
        missing = []
        for _ in self._iter(lambda cid: missing.append(cid)):
            pass
        return bool(missing)

    def get(self, key: bytes) -> bytes | None:
        """Value CID stored at ``key`` or None; MSTPartialError if the path is not available."""
        _check_key(key)
        node = self._root_node()
        if node.height < 0:
            raise MSTPartialError("MST root height unknown (its only subtree is missing)")
        h = key_height(key)
        store = self.store
        root = node
        path = []
        while node is not None:
            if h > node.height:
                return None
            keys = node.keys
            i = bisect_left(keys, key)
            if h == node.height:
                if i < len(keys) and keys[i] == key:
                    self.trail = (key, root, node, path)
                    vals = node.vals
                    if vals is not None:
                        return vals[i]
                    return _vals(node)[i]
                return None
            child = _child(node, i, store)
            path.append((node, i, child))
            node = child
        return None

    def walk(self, on_missing: Callable[[bytes], None] | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value CID) pairs in key order.

        A missing node raises MSTPartialError, unless ``on_missing(cid)`` is given: then it is
        called and that subtree is skipped.
        """
        return self._iter(on_missing)

    def _iter(self, on_missing):
        root = self.root
        store = self.store
        if root.__class__ is bytes:
            if on_missing is None:
                raise MSTPartialError(f"MST root {_cid_str(root)} not available")
            on_missing(root)
            return
        # explicit stack of (node, next index); avoids nested generators
        stack = [(_full(root), 0)]
        while stack:
            node, i = stack.pop()
            keys = node.keys
            if 0 < i <= len(keys):
                yield keys[i - 1], node.vals[i - 1]
            while i <= len(keys):
                sub = node.subs[i]
                if sub is not None:
                    if sub.__class__ is not Node:
                        try:
                            sub = _child(node, i, store)
                        except MSTPartialError:
                            if on_missing is None:
                                raise
                            on_missing(sub)
                            sub = None
                    if sub is not None:
                        stack.append((node, i + 1))
                        stack.append((_full(sub), 0))
                        break
                if i < len(keys):
                    yield keys[i], node.vals[i]
                i += 1

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._iter(None))

    def verify(self, allow_partial: bool = False) -> list[tuple[bytes, bytes]]:
        """Check the whole structure and return all (key, value) pairs in key order.

        Checks: every key on the layer of its height, subtrees exactly one layer down and none
        under layer 0, keys strictly increasing across the tree, canonical (maximal) prefix
        compression, no empty node below the root, a root that is not a bare pointer, links and
        values that are CIDs. Missing nodes raise MSTPartialError unless ``allow_partial`` (then
        they are skipped; see ``verify_counted`` for the count).
        """
        return self.verify_counted(allow_partial)[0]

    def verify_counted(self, allow_partial: bool = False,
                       drain: Callable[[list], None] | None = None) -> tuple[list[tuple[bytes, bytes]], int]:
        """Like ``verify``; also returns how many subtrees were missing.

        ``drain``: called with the entries found so far, in key order, whenever a few thousand
        have gathered (the list is emptied after each call; the returned list holds the rest),
        so a huge repo's walk never holds all its entries. The tree is valid only if this returns.
        """
        root = self.root
        if root.__class__ is bytes:
            raise MSTPartialError(f"MST root {_cid_str(root)} not available")
        if not root.keys:
            if _ref(root, 0) is not None:
                raise MSTEmptyNodeError("MST root is only a pointer to a subtree")
            return [], 0
        if root.height != key_height(root.keys[0]):
            raise MSTHeightError("MST root height does not match its keys")
        out: list = []
        state = [0, b"", drain]  # missing count, last key, drain
        _verify_node(root, root.height, self.store, out, state, allow_partial, True)
        return out, state[0]

    # -- edits

    def insert(self, key: bytes, val: bytes) -> bytes | None:
        """Set ``key`` to ``val``; returns the previous value (None if the key was new)."""
        _check_key(key)
        _check_value(val)
        root = self._root_node()
        h = key_height(key)
        store = self.store
        if root.is_empty():
            self.root = Node(h, [key], [val], [None, None])
            return None
        if root.height < 0:
            raise MSTPartialError("MST root height unknown (its only subtree is missing)")
        if h > root.height:
            left, right = _split(root, key, store)
            for layer in range(root.height + 1, h):
                if left is not None:
                    left = Node(layer, [], [], [left])
                if right is not None:
                    right = Node(layer, [], [], [right])
            self.root = Node(h, [key], [val], [left, right])
            return None
        new, prev = _insert(root, key, val, h, store)
        self.root = new
        return prev

    def remove(self, key: bytes) -> bytes | None:
        """Delete ``key``; returns its value (None if it was not there).

        Afterwards the top of the tree is trimmed while the root is a bare pointer. When the
        subtree it points to is not available, the tree becomes a *stub root* that is just that
        CID (the rule Sync 1.1 inversion needs for partial proofs: the root CID is still known).
        """
        _check_key(key)
        root = self._root_node()
        if root.height < 0:
            raise MSTPartialError("MST root height unknown (its only subtree is missing)")
        store = self.store
        new, prev = _remove(root, key, key_height(key), store)
        if prev is None:
            return None
        while not new.keys:
            sub = _ref(new, 0)
            if sub is None:
                break
            if sub.__class__ is not Node:
                try:
                    sub = _child(new, 0, store)
                except MSTPartialError:
                    self.root = sub  # stub root
                    return prev
            new = sub
        if new.is_empty():
            new = Node(0, [], [], [None])
        self.root = new
        return prev

    def _root_node(self) -> Node:
        root = self.root
        if root.__class__ is bytes:
            raise MSTPartialError(f"MST root {_cid_str(root)} is a stub (not available)")
        return root


# ----------------------------------------------------------------------------- internals


def _height_below(node: Node, store: BlockSource) -> int:
    """Height of a keyless root from the first node below it with keys (-1 if that is missing)."""
    depth = 0
    while not node.keys:
        sub = _ref(node, 0)
        if sub is None:
            return 0
        if sub.__class__ is not Node:
            if sub.__class__ is not bytes:
                raise MSTBadNode("MST subtree link is not a node CID")
            block = store.get(sub)
            if block is None:
                return -1
            sub = _decode_node(sub, block, -1)
        node = sub
        depth += 1
    return node.height + depth


def _build(keys: list, vals: list, heights: list, lo: int, hi: int, layer: int) -> Node:
    """Node on ``layer`` for keys[lo:hi] (all of height <= layer)."""
    nkeys = []
    nvals = []
    subs = []
    start = lo
    for i in range(lo, hi):
        if heights[i] == layer:
            subs.append(_build(keys, vals, heights, start, i, layer - 1) if i > start else None)
            nkeys.append(keys[i])
            nvals.append(vals[i])
            start = i + 1
    subs.append(_build(keys, vals, heights, start, hi, layer - 1) if hi > start else None)
    return Node(layer, nkeys, nvals, subs)


def _split(node: Node, key: bytes, store: BlockSource) -> tuple[Node | None, Node | None]:
    """Split the subtree ``node`` into the parts below and above ``key`` (which it does not hold)."""
    keys = node.keys
    i = bisect_left(keys, key)
    n = len(keys)
    child = _child(node, i, store)
    if child is None:
        cl = cr = None
    else:
        cl, cr = _split(child, key, store)
    if i == 0 and cl is None:
        return None, node
    if i == n and cr is None:
        return node, None
    _full(node)
    left = Node(node.height, keys[:i], node.vals[:i], node.subs[:i] + [cl])
    right = Node(node.height, keys[i:], node.vals[i:], [cr] + node.subs[i + 1:])
    return left, right


def _chain(key: bytes, val: bytes, h: int, layer: int) -> Node:
    """A new subtree on ``layer`` holding only ``key`` (keyless nodes down to its height)."""
    node = Node(h, [key], [val], [None, None])
    for lyr in range(h + 1, layer + 1):
        node = Node(lyr, [], [], [node])
    return node


def _relink(node: Node, i: int, child) -> Node:
    """``node`` with subtree ``i`` replaced (the copy every node above an edit gets)."""
    if node.ents is None:  # built from scratch: plain lists
        subs = _full(node).subs[:]
        subs[i] = child
        return Node(node.height, node.keys, node.vals, subs)
    stale = node.stale
    if i not in stale:
        stale = stale + (i,)
    if node.subs is None:
        kid = node.kid
        if kid is None or kid[0] == i:  # the usual case: one path through a decoded node
            return Node(node.height, node.keys, node.vals, None, None, node.block, node.ents, node.lcid, stale,
                        node.canonical, node.plain, node.exact, (i, child))
    subs = _subs(node)[:]
    subs[i] = child
    return Node(node.height, node.keys, node.vals, subs, None, node.block, node.ents, node.lcid, stale,
                node.canonical, node.plain, node.exact)


def _printable(suffix: bytes) -> bool:
    """A key suffix libipld cannot take for a CID (and not empty, as one from a hostile node can be)."""
    return b" " <= suffix[:1] < b"\x7f"


def _insert(node: Node, key: bytes, val: bytes, h: int, store: BlockSource) -> tuple[Node, bytes | None]:
    keys = node.keys
    i = bisect_left(keys, key)
    if h < node.height:  # the key lives further down, in subtree i
        old = _child(node, i, store)
        if old is None:
            return _relink(node, i, _chain(key, val, h, node.height - 1)), None
        child, prev = _insert(old, key, val, h, store)
        if child is old:
            return node, prev
        return _relink(node, i, child), prev
    n = len(keys)
    _full(node)
    ents = node.ents
    if ents is not None and not _exact(node):
        ents = None
    if i < n and keys[i] == key:  # update in place
        prev = node.vals[i]
        if prev == val:
            return node, prev
        vals = node.vals[:]
        vals[i] = val
        if ents is None:
            return Node(node.height, keys, vals, node.subs), prev
        ents = ents[:]
        e = ents[i]
        ents[i] = {"k": e.get("k"), "p": e.get("p"), "t": e.get("t"), "v": val}
        return Node(node.height, keys, vals, node.subs, None, None, ents, node.lcid, node.stale), prev
    # a new key on this layer: the subtree it falls into is split around it
    child = _child(node, i, store)
    if child is None:
        left = right = None
    else:
        left, right = _split(child, key, store)
    nkeys = keys[:i]
    nkeys.append(key)
    nkeys += keys[i:]
    nvals = node.vals[:i]
    nvals.append(val)
    nvals += node.vals[i:]
    subs = node.subs[:i]
    subs.append(left)
    subs.append(right)
    subs += node.subs[i + 1:]
    if ents is not None:
        p = common_prefix_len(keys[i - 1], key) if i else 0
        new_ents = ents[:i]
        new_ents.append({"k": key[p:], "p": p, "t": None, "v": val})
        ok = _printable(key[p:])
        if i < n:
            nxt = keys[i]
            q = common_prefix_len(key, nxt)
            e = ents[i]
            new_ents.append({"k": nxt[q:], "p": q, "t": e.get("t"), "v": e.get("v")})
            new_ents += ents[i + 1:]
            ok = ok and _printable(nxt[q:])
        if ok:
            stale = tuple(j if j < i else j + 1 for j in node.stale if j != i) + (i, i + 1)
            return Node(node.height, nkeys, nvals, subs, None, None, new_ents, node.lcid, stale), None
    return Node(node.height, nkeys, nvals, subs), None


def _remove(node: Node, key: bytes, h: int, store: BlockSource) -> tuple[Node, bytes | None]:
    if h > node.height:
        return node, None
    keys = node.keys
    i = bisect_left(keys, key)
    if h < node.height:
        old = _child(node, i, store)
        if old is None:
            return node, None
        child, prev = _remove(old, key, h, store)
        if prev is None:
            return node, None
        return _relink(node, i, None if child.is_empty() else child), prev
    n = len(keys)
    if i >= n or keys[i] != key:
        return node, None
    _full(node)
    prev = node.vals[i]
    subs = node.subs
    merged = _merge(subs[i], subs[i + 1], node.height - 1, store)
    nkeys = keys[:i] + keys[i + 1:]
    nvals = node.vals[:i] + node.vals[i + 1:]
    nsubs = subs[:i]
    nsubs.append(merged)
    nsubs += subs[i + 2:]
    ents = node.ents
    if ents is not None and _exact(node):
        new_ents = ents[:i]
        ok = True
        if i + 1 < n:
            nxt = keys[i + 1]
            q = common_prefix_len(keys[i - 1], nxt) if i else 0
            e = ents[i + 1]
            new_ents.append({"k": nxt[q:], "p": q, "t": e.get("t"), "v": e.get("v")})
            new_ents += ents[i + 2:]
            ok = _printable(nxt[q:])
        if ok:
            stale = tuple(j if j < i else j - 1 for j in node.stale if j != i and j != i + 1) + (i,)
            return Node(node.height, nkeys, nvals, nsubs, None, None, new_ents, node.lcid, stale), prev
    return Node(node.height, nkeys, nvals, nsubs), prev


def _resolve(ref, height: int, store: BlockSource) -> Node:
    if ref.__class__ is Node:
        return ref
    return _load(ref, height, store)


def _merge(a, b, height: int, store: BlockSource):
    """Join two adjacent subtrees (left one entirely below the right one)."""
    if a is None:
        return b
    if b is None:
        return a
    a = _full(_resolve(a, height, store))
    b = _full(_resolve(b, height, store))
    mid = _merge(a.subs[-1], b.subs[0], height - 1, store)
    subs = a.subs[:-1]
    subs.append(mid)
    subs += b.subs[1:]
    return Node(height, a.keys + b.keys, a.vals + b.vals, subs)


def _verify_node(node: Node, height: int, store: BlockSource, out: list, state: list,
                 allow_partial: bool, is_root: bool) -> None:
    """Check one node and (recursively, in key order) its subtrees; append its entries to ``out``.

    ``state`` is ``[missing subtrees, last key, drain or None]``. Loaded children are not memoized:
    a full-repo check touches every node once and should not keep the decoded tree alive.
    """
    keys = node.keys
    vals = _vals(node)
    subs = _subs(node)
    if not is_root and not keys and subs[0] is None:
        raise MSTEmptyNodeError(f"empty MST node {_cid_str(node.cid)}")
    if not node.canonical:
        raise MSTPrefixError(f"MST node {_cid_str(node.cid)} has non-maximal prefix compression")
    if height < 0:
        raise MSTHeightError(f"MST node {_cid_str(node.cid)} is below layer 0")
    block = node.block
    if (block is not None and node.ents is not None and node.cid is not None and not node.stale
            and len(block) != _encoded_size(node.ents, node.lcid) and not _typed_ok(block)):
        raise MSTBadNode(f"MST node {_cid_str(node.cid)} holds a link where a byte string belongs, or the reverse")
    if height == 0:  # a leaf: no subtrees to visit
        if subs.count(None) != len(subs):
            raise MSTHeightError(f"MST node {_cid_str(node.cid)} on layer 0 has subtrees")
        _check_leaf_entries(node.cid, keys, vals, out, state)
        return
    for k in keys:
        if key_height(k) != height:
            raise MSTHeightError(f"MST key {k!r:.80} (height {key_height(k)}) on layer {height}")
    n = len(keys)
    pc = _CBOR_PREFIX
    for i in range(n + 1):
        sub = subs[i]
        if sub is not None:
            if sub.__class__ is not Node:
                if sub.__class__ is not bytes or len(sub) != 36 or not sub.startswith(pc):
                    raise MSTBadNode(f"MST node {_cid_str(node.cid)}: subtree link is not a node CID")
                block = store.get(sub)
                if block is None:
                    if not allow_partial:
                        raise MSTPartialError(f"MST node {_cid_str(sub)} missing")
                    state[0] += 1
                    sub = None
                elif height == 1:  # most nodes: decode and check a leaf in one pass
                    _verify_leaf_block(sub, block, out, state)
                    sub = None
                else:
                    sub = _decode_node(sub, block, height - 1)
            if sub is not None:
                if sub.height != height - 1:
                    raise MSTHeightError(f"MST node {_cid_str(sub.cid)} has the wrong height")
                _verify_node(sub, height - 1, store, out, state, allow_partial, False)
        if i < n:
            k = keys[i]
            v = vals[i]
            if k <= state[1]:
                raise MSTOrderError(f"MST key {k!r:.80} out of order (after {state[1]!r:.80})")
            if v.__class__ is not bytes or len(v) != 36 or not v.startswith(_CID_PREFIXES):
                raise MSTBadNode(f"MST value for {k!r:.80} is not a CID")
            state[1] = k
            out.append((k, v))
    if len(out) >= DRAIN_ENTRIES and state[2] is not None:
        state[2](out)
        out.clear()


#: ``verify_counted``'s ``drain`` gets the entries in batches of about this many.
DRAIN_ENTRIES = 4096

_CID_PREFIXES = (_CBOR_PREFIX, _RAW_PREFIX)


def _check_leaf_entries(cid: bytes | None, keys: list, vals: list, out: list, state: list) -> None:
    """Order, layer-0 heights and value CIDs of a leaf's entries; then emit them."""
    if not keys:
        raise MSTEmptyNodeError(f"empty MST node {_cid_str(cid)}")
    last = state[1]
    sha = _sha256_small
    pc = _CBOR_PREFIX
    pr = _RAW_PREFIX
    for k, v in zip(keys, vals):
        if k <= last:
            raise MSTOrderError(f"MST key {k!r:.80} out of order (after {last!r:.80})")
        if sha(k).digest()[0] < 64:
            raise MSTHeightError(f"MST key {k!r:.80} (height {key_height(k)}) on layer 0")
        if type(v) is not bytes or len(v) != 36 or (v[:4] != pc and v[:4] != pr):
            raise MSTBadNode(f"MST value for {k!r:.80} is not a CID")
        last = k
    out += zip(keys, vals)
    state[1] = last


def _verify_leaf_block(cid: bytes, block: bytes, out: list, state: list) -> None:
    """``_decode_node`` + ``_verify_node`` for a layer-0 node, fused (the bulk of a full-repo check)."""
    try:
        d = _dec(block)
    except Exception as e:
        raise MSTBadNode(f"MST node {_cid_str(cid)} is not DAG-CBOR: {e}") from None
    try:
        ents = d["e"]
        if type(ents) is not list:
            raise MSTBadNode(f"MST node {_cid_str(cid)} has no entry list")
        if not ents:
            raise MSTEmptyNodeError(f"empty MST node {_cid_str(cid)}")
        if d.get("l") is not None:
            raise MSTHeightError(f"MST node {_cid_str(cid)} on layer 0 has subtrees")
        last = state[1]
        prev = b""
        sha = _sha256_small
        pc = _CBOR_PREFIX
        pr = _RAW_PREFIX
        append = out.append
        size = 0
        for e in ents:
            k = e["k"]
            p = e["p"]
            v = e["v"]
            if p.__class__ is not int or p > len(prev) or p < 0:
                if p.__class__ is not int:
                    raise MSTBadNode(f"MST node {_cid_str(cid)}: entry key or prefix of the wrong type")
                raise MSTBadNode(f"MST node {_cid_str(cid)}: prefix length {p} beyond the previous key")
            if prev[p:p + 1] == k[:1] and k:
                raise MSTPrefixError(f"MST node {_cid_str(cid)} has non-maximal prefix compression")
            key = prev[:p] + k  # TypeError unless k is bytes
            if e.get("t") is not None:
                raise MSTHeightError(f"MST node {_cid_str(cid)} on layer 0 has subtrees")
            if key <= last:
                raise MSTOrderError(f"MST key {key!r:.80} out of order (after {last!r:.80})")
            if sha(key).digest()[0] < 64:
                raise MSTHeightError(f"MST key {key!r:.80} (height {key_height(key)}) on layer 0")
            if v.__class__ is not bytes or len(v) != 36 or (v[:4] != pc and v[:4] != pr):
                raise MSTBadNode(f"MST value for {key!r:.80} is not a CID")
            lk = len(k)
            size += lk + (lk > 23) + (p > 23)
            append((key, v))
            prev = last = key
    except (KeyError, TypeError, AttributeError):
        raise MSTBadNode(f"MST node {_cid_str(cid)} is not a node map with well-formed entries") from None
    n = len(ents)
    if len(block) != size + 53 * n + 7 + (n > 23) and not _typed_ok(block):  # see _encoded_size
        raise MSTBadNode(f"MST node {_cid_str(cid)} holds a link where a byte string belongs, or the reverse")
    state[1] = last


# ----------------------------------------------------------------------------- inversion


def invert_ops(tree: MST, ops: Iterable[tuple[bytes, bytes | None, bytes | None]]) -> bytes:
    """Undo a commit's operations on ``tree`` (mutated; pass a copy) and return the root CID.

    ``ops`` are ``(key, value, prev)``: create = value only, update = value and a different
    prev, delete = prev only. Per Sync 1.1 the inverse is applied deletes first, then by key:
    create -> remove (the removed value must be ``value``), update -> put ``prev`` back (the
    replaced value must be ``value``), delete -> put ``prev`` back (the key must have been
    absent). The result must equal the commit's ``prevData``; comparing is the caller's job.

    Raises MSTInversionError when the tree contradicts an op, MSTPartialError when the proof
    lacks a node the inversion needs (some real PDS proofs do; those repos must resync).
    """
    ops = list(ops)
    if len(ops) == 1:  # most commits: no copy of the path, see _invert_one
        key, value, prev = ops[0]
        cid = _invert_one(tree, key, value, prev)
        if cid is not None:
            tree.root = cid  # the tree is now known by its root CID only (a stub)
            return cid
    ordered = sorted(ops, key=lambda op: (op[1] is not None, op[0]))
    for key, value, prev in ordered:
        if value is not None and prev is None:  # create
            old = tree.remove(key)
            if old != value:
                raise MSTInversionError(f"inverting create of {key!r:.80}: tree held {_cid_str(old)}")
        elif value is not None and prev is not None and value != prev:  # update
            old = tree.insert(key, prev)
            if old != value:
                raise MSTInversionError(f"inverting update of {key!r:.80}: tree held {_cid_str(old)}")
        elif value is None and prev is not None:  # delete
            old = tree.insert(key, prev)
            if old is not None:
                raise MSTInversionError(f"inverting delete of {key!r:.80}: key was still in the tree")
        else:
            raise MSTInversionError(f"operation on {key!r:.80} is neither create, update nor delete")
    return tree.root_cid()


def _invert_one(tree: MST, key: bytes, value: bytes | None, prev: bytes | None) -> bytes | None:
    """The inverse of one op as a root CID, without building the edited tree.

    Walks down to the node on the key's layer, lets ``_remove``/``_insert`` edit that one node
    (with any splits or merges below it), encodes it, and walks back up writing each new child
    CID into its parent's block in place (the same link swap ``_encode_node`` does; a node that
    gains or loses a link is re-encoded the general way). Returns None whenever the case is not
    the plain one (an op the tree contradicts, a missing node, a path through nodes not yet
    encoded, a root that would be trimmed or grown): the general path then redoes the op and
    reports any error, so the outcome is always the general path's.
    """
    root = tree.root
    if root.__class__ is not Node or root.cid is None or not root.keys:
        return None
    if value is not None:
        if prev is None:
            remove = True
        elif prev != value:
            remove = False
        else:
            return None
    elif prev is not None:
        remove = False
    else:
        return None
    try:
        _check_key(key)
        if not remove:
            _check_value(prev)
        h = key_height(key)
        store = tree.store
        trail = tree.trail
        if trail is not None and trail[0] is key and trail[1] is root:  # the walk of the op's lookup
            node = trail[2]
            path = trail[3]
        else:
            node = root
            path = []
            while node.height > h:
                i = bisect_left(node.keys, key)
                child = _child(node, i, store)
                if child is None:
                    return None
                path.append((node, i, child))
                node = child
            if node.height != h:
                return None
        c = _FALLBACK
        if h == 0 and node.subs is None and node.ents is not None and node.canonical and node.plain:
            c = _leaf_edit(node, key, value, prev, remove)  # most ops: a key on layer 0
            if c is None and not path:
                return None
        if c is not _FALLBACK:
            pass
        elif remove:
            new, old = _remove(node, key, h, store)
            if old is None or old != value:
                return None
            if new.is_empty():
                if not path:
                    return None
                c = None
            elif not path and not new.keys:
                return None  # the root would be trimmed
            else:
                c = _encode_node(new, None)
        else:
            new, old = _insert(node, key, prev, h, store)
            if old != value:
                return None
            c = _encode_node(new, None)
        for parent, i, child in reversed(path):
            link = child.cid
            if link is None:
                return None
            if c is not None and parent.canonical and parent.plain and parent.cid is not None:
                block = parent.block
                needle = _LINK_HDR + link
                if block.count(needle) == 1:
                    block = block.replace(needle, _LINK_HDR + c)
                    c = _CBOR_PREFIX + (_sha256(block) if len(block) >= _SMALL else _sha256_small(block)).digest()
                    continue
            # a link that appears or goes away, or a node that cannot be patched
            if parent.ents is not None:
                _subs(parent)
            if c is None and not parent.keys and _subs(parent).count(None) == len(parent.subs) - 1:
                return None  # the parent would become empty too
            c = _encode_node(_relink(parent, i, c), None)
        return c
    except MSTError:
        return None


_FALLBACK = object()


def _leaf_edit(node: Node, key: bytes, value: bytes | None, prev: bytes | None, remove: bool):
    """The inverse of one op on a decoded layer-0 node (no subtrees), straight from its entries:
    the new node's CID, None when it is left empty, ``_FALLBACK`` for anything else (the general
    ``_remove``/``_insert`` then decide, and report). Same encoding as theirs: the entries as
    decoded, the one or two that change rebuilt, re-encoded by libipld when exact."""
    keys = node.keys
    ents = node.ents
    n = len(keys)
    i = bisect_left(keys, key)
    found = i < n and keys[i] == key
    if remove:  # a create undone
        if not found or ents[i].get("v") != value:
            return _FALLBACK
        if n == 1:
            return None
        new = ents[:i]
        if i + 1 < n:
            nxt = keys[i + 1]
            q = common_prefix_len(keys[i - 1], nxt) if i else 0
            suffix = nxt[q:]
            if not b" " <= suffix[:1] < b"\x7f":  # (empty only for a hostile node's duplicate keys)
                return _FALLBACK
            new.append({"k": suffix, "p": q, "t": None, "v": ents[i + 1].get("v")})
            new += ents[i + 2:]
    elif value is None:  # a delete undone: the old record goes back
        if found:
            return _FALLBACK
        p = common_prefix_len(keys[i - 1], key) if i else 0
        suffix = key[p:]
        if not b" " <= suffix[:1] < b"\x7f":
            return _FALLBACK
        new = ents[:i]
        new.append({"k": suffix, "p": p, "t": None, "v": prev})
        if i < n:
            nxt = keys[i]
            q = common_prefix_len(key, nxt)
            suffix = nxt[q:]
            if not b" " <= suffix[:1] < b"\x7f":
                return _FALLBACK
            new.append({"k": suffix, "p": q, "t": None, "v": ents[i].get("v")})
            new += ents[i + 1:]
    else:  # an update undone
        if not found or ents[i].get("v") != value:
            return _FALLBACK
        new = ents[:]
        e = ents[i]
        new[i] = {"k": e.get("k"), "p": e.get("p"), "t": None, "v": prev}
    if not _exact(node):
        return _FALLBACK
    block = _enc({"e": new, "l": None})
    return _CBOR_PREFIX + (_sha256(block) if len(block) >= _SMALL else _sha256_small(block)).digest()
