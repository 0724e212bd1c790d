"""protocol.mst: interop fixtures, known roots, structure errors, edits on full and partial trees."""

from __future__ import annotations

import json
from pathlib import Path

import cbrrr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor
from protocol.cid import cid_for_dag_cbor, cid_from_str, cid_to_str
from protocol.mst import (
    MAX_KEY_BYTES,
    MST,
    MSTBadNode,
    MSTError,
    MSTEmptyNodeError,
    MSTHeightError,
    MSTInversionError,
    MSTKeyError,
    MSTOrderError,
    MSTPartialError,
    MSTPrefixError,
    common_prefix_len,
    invert_ops,
    key_height,
)

FIX = Path("/work/shared/fixtures/atproto-interop")
CID1 = cid_from_str("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")
REC = "com.example.record/"


def tree_of(keys, val=CID1) -> MST:
    return MST.build([(k.encode() if isinstance(k, str) else k, val) for k in keys])


def root_str(t: MST) -> str:
    return cid_to_str(t.root_cid())


def blocks_of(t: MST) -> tuple[dict, bytes]:
    out: dict = {}
    root = t.export_blocks(out)
    return out, root


def val(i: int) -> bytes:
    return cid_for_dag_cbor(cbor.encode({"i": i}))


# ----------------------------------------------------------------------------- fixtures


def test_key_heights_fixture():
    cases = json.loads((FIX / "mst/key_heights.json").read_text())
    assert cases
    for c in cases:
        assert key_height(c["key"].encode()) == c["height"], c


def test_example_keys_heights():
    """example_keys.txt: the second character of each key is its height."""
    n = 0
    for line in (FIX / "mst/example_keys.txt").read_text().splitlines():
        if len(line) < 3 or line.startswith("#"):
            continue
        assert key_height(line.encode()) == int(line[1]), line
        n += 1
    assert n > 100


def test_common_prefix_fixture():
    cases = json.loads((FIX / "mst/common_prefix.json").read_text())
    for c in cases:
        assert common_prefix_len(c["left"].encode(), c["right"].encode()) == c["len"], c


def test_example_keys_tree_roundtrip():
    keys = [ln for ln in (FIX / "mst/example_keys.txt").read_text().splitlines() if len(ln) > 2]
    t = tree_of(keys)
    assert t.root.height == max(int(k[1]) for k in keys)
    store, root = blocks_of(t)
    loaded = MST.load(store, root)
    assert [k.decode() for k, _ in loaded.verify()] == sorted(keys)
    # same root whatever the insertion order
    t2 = MST.empty()
    for k in reversed(keys):
        t2.insert(k.encode(), CID1)
    assert t2.root_cid() == root


# ----------------------------------------------------------------------------- known roots (TS/Go interop tests)


def test_known_maps():
    assert root_str(MST.empty()) == "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    assert root_str(tree_of([REC + "3jqfcqzm3fo2j"])) == "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"
    assert root_str(tree_of([REC + "3jqfcqzm3fx2j"])) == "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai"
    simple = [REC + s for s in ("3jqfcqzm3fp2j", "3jqfcqzm3fr2j", "3jqfcqzm3fs2j", "3jqfcqzm3ft2j", "3jqfcqzm4fc2j")]
    assert root_str(tree_of(simple)) == "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m"


def test_trims_top_of_tree_on_delete():
    keys = [REC + s for s in ("3jqfcqzm3fn2j", "3jqfcqzm3fo2j", "3jqfcqzm3fp2j", "3jqfcqzm3fs2j",
                              "3jqfcqzm3ft2j", "3jqfcqzm3fu2j")]
    t = tree_of(keys)
    assert t.root.height == 1
    assert root_str(t) == "bafyreifnqrwbk6ffmyaz5qtujqrzf5qmxf7cbxvgzktl4e3gabuxbtatv4"
    assert t.remove((REC + "3jqfcqzm3fs2j").encode()) == CID1
    assert t.root.height == 0
    assert root_str(t) == "bafyreie4kjuxbwkhzg2i5dljaswcroeih4dgiqq6pazcmunwt2byd725vi"


def test_insertion_that_splits_two_layers_down():
    keys = [REC + s for s in ("3jqfcqzm3fo2j", "3jqfcqzm3fp2j", "3jqfcqzm3fr2j", "3jqfcqzm3fs2j",
                              "3jqfcqzm3ft2j", "3jqfcqzm3fz2j", "3jqfcqzm4fc2j", "3jqfcqzm4fd2j",
                              "3jqfcqzm4ff2j", "3jqfcqzm4fg2j", "3jqfcqzm4fh2j")]
    l1 = "bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem"
    l2 = "bafyreid2x5eqs4w4qxvc5jiwda4cien3gw2q6cshofxwnvv7iucrmfohpm"
    for t in (tree_of(keys), MST.load(*blocks_of(tree_of(keys)))):
        assert root_str(t) == l1 and t.root.height == 1
        assert t.insert((REC + "3jqfcqzm3fx2j").encode(), CID1) is None
        assert root_str(t) == l2 and t.root.height == 2
        assert t.remove((REC + "3jqfcqzm3fx2j").encode()) == CID1
        assert root_str(t) == l1 and t.root.height == 1


def test_new_layers_two_higher():
    l0 = "bafyreidfcktqnfmykz2ps3dbul35pepleq7kvv526g47xahuz3rqtptmky"
    l2 = "bafyreiavxaxdz7o7rbvr3zg2liox2yww46t7g6hkehx4i4h3lwudly7dhy"
    l2b = "bafyreig4jv3vuajbsybhyvb7gggvpwh2zszwfyttjrj6qwvcsp24h6popu"
    t = tree_of([REC + "3jqfcqzm3ft2j", REC + "3jqfcqzm3fz2j"])
    assert root_str(t) == l0 and t.root.height == 0
    b, d = (REC + "3jqfcqzm3fx2j").encode(), (REC + "3jqfcqzm4fd2j").encode()
    t.insert(b, CID1)
    assert root_str(t) == l2
    t.remove(b)
    assert root_str(t) == l0 and t.root.height == 0
    t.insert(b, CID1)
    t.insert(d, CID1)
    assert root_str(t) == l2b and t.root.height == 2
    t.verify()
    t.remove(d)
    assert root_str(t) == l2 and t.root.height == 2
    t.verify()


def test_manual_node_encoding():
    """A node built by hand (one entry) has the known CID: the encoding is canonical."""
    block = cbor.encode({"e": [{"k": (REC + "3jqfcqzm3fo2j").encode(), "p": 0, "t": None, "v": cbor.link(CID1)}],
                         "l": None})
    assert cid_to_str(cid_for_dag_cbor(block)) == "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"


# ----------------------------------------------------------------------------- commit proofs (interop)


PROOFS = json.loads((FIX / "firehose/commit-proof-fixtures.json").read_text())


@pytest.mark.parametrize("fx", PROOFS, ids=[f["comment"] for f in PROOFS])
def test_commit_proof_fixture(fx):
    leaf = cid_from_str(fx["leafValue"])
    before = MST.build([(k.encode(), leaf) for k in fx["keys"]])
    assert root_str(before) == fx["rootBeforeCommit"]
    after = before.copy()
    for k in fx["adds"]:
        assert after.insert(k.encode(), leaf) is None
    for k in fx["dels"]:
        assert after.remove(k.encode()) == leaf
    assert root_str(after) == fx["rootAfterCommit"]
    assert root_str(before) == fx["rootBeforeCommit"]  # edits never touch the original
    final = (set(fx["keys"]) | set(fx["adds"])) - set(fx["dels"])
    assert after.root_cid() == tree_of(sorted(final), leaf).root_cid()

    # invert from exactly the blocks the fixture says a proof holds
    full, root = blocks_of(tree_of(sorted(final), leaf))
    proof = {c: full[c] for c in map(cid_from_str, fx["blocksInProof"])}
    partial = MST.load(proof, root)
    ops = [(k.encode(), leaf, None) for k in fx["adds"]] + [(k.encode(), None, leaf) for k in fx["dels"]]
    for k, v, _ in ops:
        assert partial.get(k) == v
    assert cid_to_str(invert_ops(partial.copy(), ops)) == fx["rootBeforeCommit"]
    assert partial.root_cid() == root


# ----------------------------------------------------------------------------- structure errors


def link(c):
    return None if c is None else cbrrr.CID(c)


def node_block(entries, left=None, prefixes=None) -> bytes:
    """entries: [(key bytes, value cid, right subtree cid|None)], maximal prefixes unless given."""
    out = []
    prev = b""
    for i, (k, v, t) in enumerate(entries):
        p = common_prefix_len(prev, k) if prefixes is None else prefixes[i]
        out.append({"k": k[p:], "p": p, "t": link(t), "v": link(v)})
        prev = k
    return cbor.encode({"e": out, "l": link(left)})


def put(store: dict, block: bytes) -> bytes:
    c = cid_for_dag_cbor(block)
    store[c] = block
    return c


K = {ln[:2]: ln.encode() for ln in (FIX / "mst/example_keys.txt").read_text().splitlines() if len(ln) > 2}


def test_valid_handmade_tree():
    s: dict = {}
    leaf = put(s, node_block([(K["A0"], CID1, None), (K["C0"], CID1, None)]))
    root = put(s, node_block([(K["D1"], CID1, None)], left=leaf))
    assert [k for k, _ in MST.load(s, root).verify()] == [K["A0"], K["C0"], K["D1"]]
    assert MST.load(s, root).root_cid() == tree_of([K["A0"], K["C0"], K["D1"]]).root_cid()


def test_misplaced_key_wrong_layer():
    s: dict = {}
    # a height-1 key inside a layer-0 node under a layer-1 root
    leaf = put(s, node_block([(K["A0"], CID1, None), (K["B1"], CID1, None)]))
    root = put(s, node_block([(K["D1"], CID1, None)], left=leaf))
    with pytest.raises(MSTHeightError):
        MST.load(s, root).verify()
    # a height-0 key sitting in the root next to a height-1 key
    root2 = put(s, node_block([(K["B1"], CID1, None), (K["C0"], CID1, None)]))
    with pytest.raises(MSTHeightError):
        MST.load(s, root2).verify()


def test_skipped_layer():
    s: dict = {}
    leaf = put(s, node_block([(K["A0"], CID1, None)]))
    root = put(s, node_block([(K["B2"], CID1, None)], left=leaf))  # layer 2 pointing straight at layer 0
    with pytest.raises(MSTHeightError):
        MST.load(s, root).verify()


def test_subtree_below_layer_zero():
    s: dict = {}
    leaf = put(s, node_block([(K["A0"], CID1, None)]))
    root = put(s, node_block([(K["C0"], CID1, None)], left=leaf))
    with pytest.raises(MSTHeightError):
        MST.load(s, root).verify()


def test_keys_out_of_order():
    s: dict = {}
    root = put(s, node_block([(K["C0"], CID1, None), (K["A0"], CID1, None)], prefixes=[0, 0]))
    with pytest.raises(MSTOrderError):
        MST.load(s, root).verify()
    dup = put(s, node_block([(K["A0"], CID1, None), (K["A0"], CID1, None)]))
    with pytest.raises(MSTOrderError):
        MST.load(s, dup).verify()
    # out of order across nodes: a left subtree holding a key above its parent's key
    leaf = put(s, node_block([(K["E0"], CID1, None)]))
    root = put(s, node_block([(K["D1"], CID1, None)], left=leaf))
    with pytest.raises(MSTOrderError):
        MST.load(s, root).verify()


def _layer0(prefix: str, n: int) -> list[bytes]:
    out = []
    i = 0
    while len(out) < n:
        k = f"{prefix}{i:04d}".encode()
        if key_height(k) == 0:
            out.append(k)
        i += 1
    return out


def test_non_maximal_prefix_compression():
    a, b, c = _layer0("app.bsky.feed.post/", 3)
    s: dict = {}
    root = put(s, node_block([(a, CID1, None), (b, CID1, None)], prefixes=[0, 3]))
    t = MST.load(s, root)
    assert t.get(b) == CID1  # readable, but not canonical
    with pytest.raises(MSTPrefixError):
        t.verify()
    # an edit re-encodes canonically, like the Go and TS implementations
    t2 = MST.load(s, root)
    t2.insert(c, CID1)
    assert t2.root_cid() == tree_of([a, b, c]).root_cid()


def test_leaf_errors_below_the_root():
    """Leaves under the root are checked by the fused decode+verify pass: same error types."""
    a, b = _layer0("app.bsky.feed.post/", 2)
    top = next(k for k in (f"app.bsky.graph.follow/{i}".encode() for i in range(10000)) if key_height(k) == 1)
    cases = [
        (node_block([(a, CID1, None), (b, CID1, None)], prefixes=[0, 3]), MSTPrefixError),
        (node_block([(b, CID1, None), (a, CID1, None)], prefixes=[0, common_prefix_len(a, b)]), MSTOrderError),
        (node_block([(a, CID1, CID1)]), MSTHeightError),  # a subtree under layer 0
        (node_block([(a, CID1, None)], left=CID1), MSTHeightError),
        (node_block([(a, CID1, None), (top, CID1, None)]), MSTHeightError),
        (node_block([]), MSTEmptyNodeError),
        (cbor.encode({"e": [{"k": a, "p": 0, "t": None, "v": b"nope"}], "l": None}), MSTBadNode),
        (cbor.encode({"e": [{"k": a, "p": 99, "t": None, "v": cbrrr.CID(CID1)}], "l": None}), MSTBadNode),
        (cbor.encode({"e": [{"k": "str", "p": 0, "t": None, "v": cbrrr.CID(CID1)}], "l": None}), MSTBadNode),
        (cbor.encode({"e": "x", "l": None}), MSTBadNode),
        (b"\xff", MSTBadNode),
    ]
    for leaf_block, err in cases:
        s: dict = {}
        leaf = put(s, leaf_block)
        root = put(s, node_block([(top, CID1, None)], left=leaf))
        with pytest.raises(err):
            MST.load(s, root).verify()
    s = {}
    leaf = put(s, node_block([(a, CID1, None), (b, CID1, None)]))
    root = put(s, node_block([(top, CID1, None)], left=leaf))
    assert MST.load(s, root).verify() == [(a, CID1), (b, CID1), (top, CID1)]


def test_prefix_beyond_previous_key():
    s: dict = {}
    root = put(s, node_block([(K["A0"], CID1, None), (K["C0"], CID1, None)], prefixes=[0, 40]))
    with pytest.raises(MSTBadNode):  # nodes are checked lazily: when read, and in full by verify
        MST.load(s, root).get(K["C0"])
    with pytest.raises(MSTBadNode):
        MST.load(s, root).verify()


def test_node_decode_prefix_and_layer0_checks():
    """What reading a node (the root, or a child on a lookup path) checks of its entries: a prefix
    that is an int within the previous key (a first entry's must be 0), maximal compression (a
    prefix may end exactly at the previous key's end), no subtree link on layer 0."""
    a, b = _layer0("app.bsky.feed.post/", 2)
    ext = next(k for k in (a + str(i).encode() for i in range(1000)) if key_height(k) == 0)  # a + more
    bad_p = [(-1, MSTBadNode), (len(a) + 1, MSTBadNode), (True, MSTBadNode), (1.0, MSTBadNode), ("3", MSTBadNode)]
    for p, err in bad_p:
        block = cbor.encode({"e": [{"k": a, "p": 0, "t": None, "v": cbrrr.CID(CID1)},
                                   {"k": b[3:], "p": p, "t": None, "v": cbrrr.CID(CID1)}], "l": None})
        s: dict = {}
        with pytest.raises(err):
            MST.load(s, put(s, block))
    s = {}
    first_not_zero = cbor.encode({"e": [{"k": a[1:], "p": 1, "t": None, "v": cbrrr.CID(CID1)}], "l": None})
    with pytest.raises(MSTBadNode):
        MST.load(s, put(s, first_not_zero))
    # a key extending the previous one: prefix = the whole previous key, still canonical
    s = {}
    t = MST.load(s, put(s, node_block([(a, CID1, None), (ext, val(2), None)])))
    assert t.root.canonical and t.get(ext) == val(2) and t.verify() == [(a, CID1), (ext, val(2))]
    s = {}
    t = MST.load(s, put(s, node_block([(a, CID1, None), (ext, val(2), None)], prefixes=[0, len(a) - 1])))
    assert not t.root.canonical  # the suffix repeats the previous key's last byte
    with pytest.raises(MSTPrefixError):
        t.verify()
    # layer 0: no subtree link, whether the node is the root or reached by a lookup
    top = next(k for k in (f"app.bsky.graph.follow/{i}".encode() for i in range(10000)) if key_height(k) == 1)
    for leaf_block in (node_block([(a, CID1, CID1)]), node_block([(a, CID1, None), (b, CID1, CID1)]),
                       node_block([(a, CID1, None)], left=CID1)):
        s = {}
        with pytest.raises(MSTHeightError):
            MST.load(s, put(s, leaf_block))
        root = put(s, node_block([(top, CID1, None)], left=put(s, leaf_block)))
        with pytest.raises(MSTHeightError):
            MST.load(s, root).get(a)
    s = {}
    not_a_link = cbor.encode({"e": [{"k": a, "p": 0, "t": b"nope", "v": cbrrr.CID(CID1)}], "l": None})
    with pytest.raises(MSTBadNode):
        MST.load(s, put(s, not_a_link))
    s = {}
    assert MST.load(s, put(s, node_block([(a, CID1, None), (b, CID1, None)]))).get(b) == CID1


def test_empty_inner_node_and_bare_pointer_root():
    s: dict = {}
    empty = put(s, node_block([]))
    root = put(s, node_block([(K["D1"], CID1, None)], left=empty))
    with pytest.raises(MSTEmptyNodeError):
        MST.load(s, root).verify()
    leaf = put(s, node_block([(K["A0"], CID1, None)]))
    pointer = put(s, node_block([], left=leaf))
    with pytest.raises(MSTEmptyNodeError):
        MST.load(s, pointer).verify()


@pytest.mark.parametrize("bad", [
    b"\x01\x02",  # not CBOR
    cbor.encode([1, 2]),  # not a map
    cbor.encode({"l": None}),  # no entries
    cbor.encode({"e": "x", "l": None}),
    cbor.encode({"e": [{"k": "text", "p": 0, "t": None, "v": cbrrr.CID(CID1)}], "l": None}),  # k not bytes
    cbor.encode({"e": [{"k": b"a/b", "p": -1, "t": None, "v": cbrrr.CID(CID1)}], "l": None}),
    cbor.encode({"e": [{"k": b"a/b", "p": 0, "t": "x", "v": cbrrr.CID(CID1)}], "l": None}),  # t not a link
    cbor.encode({"e": [{"k": b"a/b", "p": 0, "t": None, "v": cbrrr.CID(CID1)}], "l": b"xx"}),  # l not a link
    cbor.encode({"e": [{"p": 0, "t": None, "v": cbrrr.CID(CID1)}], "l": None}),  # no key
])
def test_malformed_nodes(bad):
    s: dict = {}
    root = put(s, bad)
    with pytest.raises(MSTBadNode):
        MST.load(s, root).verify()


def test_bad_value_is_caught_by_verify():
    s: dict = {}
    root = put(s, cbor.encode({"e": [{"k": b"a/b", "p": 0, "t": None, "v": b"not a cid"}], "l": None}))
    with pytest.raises(MSTBadNode):
        MST.load(s, root).verify()


def test_key_and_value_limits():
    t = MST.empty()
    for k in (b"", b"a" * (MAX_KEY_BYTES + 1)):
        with pytest.raises(MSTKeyError):
            t.insert(k, CID1)
        with pytest.raises(MSTKeyError):
            t.get(k)
        with pytest.raises(MSTKeyError):
            t.remove(k)
    with pytest.raises(MSTKeyError):
        t.insert(b"a/b", b"\x01\x02")
    with pytest.raises(MSTKeyError):
        MST.build([(b"a/b", CID1), (b"a/b", CID1)])


# ----------------------------------------------------------------------------- partial trees


def _two_layer_tree():
    keys = [k for k in K.values() if key_height(k) <= 1]
    t = tree_of(keys)
    store, root = blocks_of(t)
    return keys, store, root


def test_missing_subtree_is_partial():
    keys, store, root = _two_layer_tree()
    t = MST.load(store, root)
    assert t.root.height == 1
    missing = next(s for s in t.root.full().subs if s is not None)
    del store[missing]
    t = MST.load(store, root)
    with pytest.raises(MSTPartialError):
        t.items()
    with pytest.raises(MSTPartialError):
        t.verify()
    seen = []
    got = list(t.walk(on_missing=seen.append))
    assert seen == [missing] and 0 < len(got) < len(keys)
    got2, n = t.verify_counted(allow_partial=True)
    assert n == 1 and got2 == got
    assert t.is_partial()
    # keys routed through the missing node cannot be read or edited; others can
    inside = [k for k in keys if k not in dict(got)]
    with pytest.raises(MSTPartialError):
        t.get(inside[0])
    with pytest.raises(MSTPartialError):
        t.copy().remove(inside[0])
    top = [k for k in keys if key_height(k) == 1]
    assert t.get(top[0]) == CID1


def test_missing_root_block():
    with pytest.raises(MSTPartialError):
        MST.load({}, CID1)


def test_bare_pointer_root_with_missing_child():
    """A (non-canonical) root that only points at a missing subtree: its height is unknown, so
    lookups and edits report a partial tree instead of guessing."""
    s: dict = {}
    leaf = cid_for_dag_cbor(node_block([(K["A0"], CID1, None)]))
    root = put(s, node_block([], left=leaf))
    t = MST.load(s, root)
    for op in (lambda: t.get(K["A0"]), lambda: t.copy().insert(K["C0"], CID1), lambda: t.copy().remove(K["A0"])):
        with pytest.raises(MSTPartialError):
            op()


def test_stub_root_rule():
    """Removing the only top-layer key leaves a bare pointer to an unavailable subtree:
    the tree becomes a stub whose root CID is that subtree's (Go's trimming for inversion)."""
    low = [K[f"{c}0"] for c in "ABCE"]
    top = next(k for k in sorted(K.values()) if key_height(k) == 1 and k > max(low))
    full = tree_of(low + [top])
    store, root = blocks_of(full)
    only_root = {root: store[root]}
    t = MST.load(only_root, root)
    assert t.remove(top) == CID1
    assert type(t.root) is bytes
    assert t.root_cid() == tree_of(low).root_cid()
    with pytest.raises(MSTPartialError):
        t.insert(top, CID1)
    # the same through the inversion of a create
    assert invert_ops(MST.load(only_root, root), [(top, CID1, None)]) == tree_of(low).root_cid()


def test_inversion_errors():
    keys = [K["A0"], K["B1"], K["C0"]]
    t = tree_of(keys)
    other = val(7)
    with pytest.raises(MSTInversionError):  # create of a key that is not there
        invert_ops(t.copy(), [(K["E0"], CID1, None)])
    with pytest.raises(MSTInversionError):  # create whose cid is not the tree's
        invert_ops(t.copy(), [(K["A0"], other, None)])
    with pytest.raises(MSTInversionError):  # delete of a key still present
        invert_ops(t.copy(), [(K["A0"], None, CID1)])
    with pytest.raises(MSTInversionError):  # update whose new value is not in the tree
        invert_ops(t.copy(), [(K["A0"], other, val(8))])
    with pytest.raises(MSTInversionError):  # update that changes nothing
        invert_ops(t.copy(), [(K["A0"], CID1, CID1)])
    with pytest.raises(MSTInversionError):  # neither value nor prev
        invert_ops(t.copy(), [(K["A0"], None, None)])
    # a well-formed multi-op inversion
    after = t.copy()
    after.insert(K["E0"], other)
    after.insert(K["A0"], val(9))
    after.remove(K["C0"])
    ops = [(K["E0"], other, None), (K["A0"], val(9), CID1), (K["C0"], None, CID1)]
    assert invert_ops(after.copy(), ops) == t.root_cid()


# ----------------------------------------------------------------------------- encodings


def test_key_suffix_that_looks_like_a_cid():
    """libipld would write such a byte string as a link; the exact encoder must be used."""
    k1 = b"a"
    k2 = b"a" + CID1  # suffix after the shared "a" is a valid binary CID
    t = MST.build([(k1, CID1), (k2, CID1)])
    store, root = blocks_of(t)
    for c, b in store.items():
        strict = cbrrr.decode_dag_cbor(b)
        assert cbrrr.encode_dag_cbor(strict) == b
        assert all(type(e["k"]) is bytes for e in strict["e"])
    loaded = MST.load(store, root)
    assert loaded.verify() == [(k1, CID1), (k2, CID1)]
    loaded.insert(b"b", CID1)
    assert loaded.root_cid() == MST.build([(k1, CID1), (k2, CID1), (b"b", CID1)]).root_cid()


def _canonical(store: dict) -> None:
    """Every block is canonical DAG-CBOR with the schema's types: links are links (tag 42), key
    suffixes byte strings, whatever encoder path (patch, decoded entries, fresh, exact) made it."""
    for c, b in store.items():
        assert cid_for_dag_cbor(b) == c
        d = cbrrr.decode_dag_cbor(b)
        assert cbrrr.encode_dag_cbor(d) == b
        assert set(d) == {"e", "l"} and (d["l"] is None or isinstance(d["l"], cbrrr.CID))
        for e in d["e"]:
            assert set(e) == {"k", "p", "t", "v"}
            assert type(e["k"]) is bytes and type(e["p"]) is int
            assert isinstance(e["v"], cbrrr.CID) and (e["t"] is None or isinstance(e["t"], cbrrr.CID))


# ----------------------------------------------------------------------------- properties

keys_st = st.sets(st.binary(min_size=1, max_size=12), max_size=60)
path_keys_st = st.sets(st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=10).map(
    lambda s: ("app.bsky.feed.post/" + s).encode()), max_size=60)


def _check_edit(base: set, k: bytes, loaded: bool) -> None:
    vals = {x: val(i) for i, x in enumerate(sorted(base | {k}))}
    t = MST.build([(x, vals[x]) for x in base])
    if loaded:
        store, root = blocks_of(t)
        t = MST.load(store, root)
    before = t.root_cid()
    t2 = t.copy()
    prev = t2.insert(k, vals[k])
    assert prev == (vals[k] if k in base else None)
    with_k = MST.build([(x, vals[x]) for x in base | {k}])
    new_blocks: dict = {}
    assert t2.root_cid(out=new_blocks) == with_k.root_cid()
    _canonical(new_blocks)  # the blocks the edit path produced (patched, re-encoded, fresh)
    assert t.root_cid() == before  # copy-on-write
    t3 = t2.copy()
    assert t3.remove(k) == vals[k]
    without = MST.build([(x, vals[x]) for x in base - {k}])
    new_blocks = {}
    assert t3.root_cid(out=new_blocks) == without.root_cid()
    _canonical(new_blocks)
    assert t3.remove(k) is None
    out: dict = {}
    t2.export_blocks(out)
    _canonical(out)


@settings(max_examples=150, deadline=None)
@given(keys_st, st.binary(min_size=1, max_size=12), st.booleans())
def test_insert_remove_match_build_any_bytes(base, k, loaded):
    _check_edit(base, k, loaded)


@settings(max_examples=150, deadline=None)
@given(path_keys_st, st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=10), st.booleans())
def test_insert_remove_match_build_paths(base, rk, loaded):
    _check_edit(base, ("app.bsky.feed.post/" + rk).encode(), loaded)


@settings(max_examples=80, deadline=None)
@given(path_keys_st, st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6)), max_size=25))
def test_random_edit_sequences(base, script):
    """Any sequence of edits on a loaded tree ends at the tree built from the final map."""
    cur = {k: val(i) for i, k in enumerate(sorted(base))}
    store, root = blocks_of(MST.build(cur.items()))
    t = MST.load(store, root)
    for op, n in script:
        if op == 0 or not cur:
            k = f"app.bsky.feed.like/{n:x}".encode()
            assert t.insert(k, val(n)) == cur.get(k)
            cur[k] = val(n)
        elif op == 1:
            k = sorted(cur)[n % len(cur)]
            assert t.remove(k) == cur.pop(k)
        else:
            k = sorted(cur)[n % len(cur)]
            assert t.insert(k, val(n + 1)) == cur[k]
            cur[k] = val(n + 1)
        if n % 3 == 0:
            assert t.root_cid() == MST.build(cur.items()).root_cid()
    out: dict = {}
    assert t.root_cid(out=out) == MST.build(cur.items()).root_cid()
    _canonical(out)
    assert t.items() == sorted(cur.items())


@settings(max_examples=100, deadline=None)
@given(path_keys_st, st.sets(st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=8), max_size=6),
       st.integers(0, 2**32))
def test_inversion_from_minimal_proof(base, new, seed):
    """Apply a commit to a full tree, keep only the nodes the forward edit touched plus what the
    inversion reads, and check the inversion from that partial tree gives the old root."""
    import random

    rng = random.Random(seed)
    before = {k: val(i) for i, k in enumerate(sorted(base))}
    old = MST.build(before.items())
    old_store, old_root = blocks_of(old)
    ops = []
    after = dict(before)
    for rk in sorted(new):
        k = ("app.bsky.graph.follow/" + rk).encode()
        after[k] = val(1000 + len(ops))
        ops.append((k, after[k], None))
    for k in sorted(before):
        if rng.random() < 0.2:
            ops.append((k, None, after.pop(k)))
    t = MST.load(old_store, old_root)
    for k, v, p in ops:
        if v is None:
            t.remove(k)
        else:
            t.insert(k, v)
    new_blocks: dict = {}
    new_root = t.root_cid(out=new_blocks)
    assert new_root == MST.build(after.items()).root_cid()

    class Rec(dict):
        def get(self, c, default=None):
            seen.add(c)
            return super().get(c, default)

    seen: set = set()
    everything = Rec({**old_store, **new_blocks})
    invert_ops(MST.load(everything, new_root), ops)
    proof = {c: everything[c] for c in seen if c in everything}
    assert invert_ops(MST.load(proof, new_root), ops) == old_root


def test_single_op_inversion_after_lookups():
    """A single op's inversion starts from the walk of the lookup that found its key (MST.trail):
    after a lookup of that key, of another key, or on a tree edited since, it gives the root a
    fresh tree gives, for creates, updates and deletes on every layer."""
    keys = sorted(("app.bsky.feed.post/" + "%05d" % i).encode() for i in range(300))
    before = {k: val(i) for i, k in enumerate(keys)}
    store, root = blocks_of(MST.build(before.items()))
    for n, k in enumerate(keys[::7]):
        other = keys[(n * 31 + 1) % len(keys)]  # never k (24n + 1 = 0 mod 300 has no solution)
        for op in ((k, before[k], None), (k, before[k], val(5000 + n))):  # create, update inverted
            expect = invert_ops(MST.load(store, root), [op])
            t = MST.load(store, root)
            assert t.get(k) == before[k]
            assert invert_ops(t.copy(), [op]) == expect  # the trail of k
            t = MST.load(store, root)
            assert t.get(other) == before[other]
            assert invert_ops(t.copy(), [op]) == expect  # a trail of another key: not used
        t = MST.load(store, root)
        assert t.get(k) == before[k]
        t.remove(other)  # the root changed since the lookup (and has its CID again)
        t.root_cid()
        gone = MST.load(store, root)
        gone.remove(other)
        assert invert_ops(t.copy(), [(k, before[k], None)]) == invert_ops(gone, [(k, before[k], None)])
        dstore, droot = blocks_of(MST.build((x, v) for x, v in before.items() if x != k))
        t = MST.load(dstore, droot)
        assert t.get(other) == before[other]
        assert invert_ops(t.copy(), [(k, None, before[k])]) == root  # a delete inverted after a lookup


# ----------------------------------------------------------------------------- hostile trees


def test_edits_of_a_tree_with_a_duplicated_entry_raise_mst_errors():
    """A node whose entry appears twice (keys not increasing) is never verified before an edit on
    the commit path: editing and encoding it must fail with an MSTError, not an IndexError."""
    keys = [K["A0"], K["B1"], K["C0"]]
    store, root = blocks_of(tree_of(keys))
    node = cbrrr.decode_dag_cbor(store[root])
    node["e"] = [node["e"][0], dict(node["e"][0])]
    block = cbor.encode(node)
    bad = put(store, block)
    for edit in (lambda t: t.insert(K["E0"], CID1), lambda t: t.insert(K["B1"], val(3))):
        t = MST.load(store, bad)
        with pytest.raises(MSTOrderError):
            edit(t)
            t.root_cid()
    t = MST.load(store, bad)  # removing one of the two leaves a tree that encodes
    assert t.remove(K["B1"]) == CID1 and t.root_cid()


_GARBAGE = [None, "str", 5, -1, True, b"", b"x" * 36, b"\x01\x71\x12\x20" + b"\x00" * 31, [1], {"a": 1}, 1.5,
            cbrrr.CID(cid_for_dag_cbor(b"raw") [:1] + b"\x55" + cid_for_dag_cbor(b"raw")[2:]), cbrrr.CID(CID1)]


def _mutated_store(rng, keys):
    """Blocks of the tree of ``keys`` with one or two nodes corrupted (and the links to them fixed)."""
    store, root = blocks_of(tree_of(keys))
    for _ in range(rng.randint(1, 2)):
        c = rng.choice(list(store))
        node = cbrrr.decode_dag_cbor(store[c])
        es = node["e"]
        m = rng.randrange(8)
        if m == 0 and es:
            es.append(dict(rng.choice(es)))
        elif m == 1 and len(es) > 1:
            i = rng.randrange(len(es) - 1)
            es[i], es[i + 1] = es[i + 1], es[i]
        elif m == 2 and es:
            rng.choice(es)[rng.choice("kptv")] = rng.choice(_GARBAGE)
        elif m == 3:
            node["l"] = rng.choice(_GARBAGE)
        elif m == 4 and es:
            rng.choice(es).pop(rng.choice("kptv"), None)
        elif m == 5 and es:
            rng.choice(es)["x"] = 1
        elif m == 6 and es:
            rng.choice(es)["p"] = rng.randrange(0, 40)
        else:
            node["e"] = []
        try:
            block = cbrrr.encode_dag_cbor(node)
        except Exception:
            continue
        new = cid_for_dag_cbor(block)
        del store[c]
        store[new] = block
        for c2, b2 in list(store.items()):  # relink the parent (links are unique 36-byte strings)
            if c in b2:
                nb = b2.replace(c, new)
                del store[c2]
                n2 = put(store, nb)
                root = n2 if c2 == root else root
        root = new if c == root else root
    return store, root


def test_hostile_trees_raise_only_mst_errors():
    """Random corruptions (duplicated or swapped entries, fields of any type, missing or extra
    fields, wrong prefixes, empty nodes): reading, verifying, editing, encoding and inverting
    raise MSTError subclasses and nothing else."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        keys = sorted({f"app.bsky.feed.post/{rng.randrange(10**6):x}" for _ in range(rng.randint(1, 40))})
        store, root = _mutated_store(rng, keys)
        bkeys = [k.encode() for k in keys]
        ops = []
        for k in rng.sample(bkeys, min(2, len(bkeys))):
            ops.append((k, CID1, None) if rng.random() < 0.6 else (k, CID1, val(2)))
        ops.append((b"app.bsky.feed.post/zz" + str(rng.randrange(99)).encode(), None, val(7)))
        for action in range(5):
            try:
                t = MST.load(store, root)
                if action == 0:
                    t.verify(allow_partial=True)
                elif action == 1:
                    list(t.walk(on_missing=lambda c: None))
                elif action == 2:
                    for k, _, _ in ops:
                        t.get(k)
                elif action == 3:
                    for k, v, _ in ops:
                        t.remove(k) if v is not None and rng.random() < 0.5 else t.insert(k, v or val(5))
                    t.root_cid({})
                else:
                    invert_ops(t, ops[:rng.randint(1, len(ops))])
            except MSTError:
                pass


def test_links_written_as_byte_strings_are_refused():
    """libipld reads a link and a 36-byte byte string alike; a node holding a CID as a byte string
    where a link belongs (or a key suffix written as a link) is refused, as Go's decoder refuses
    it: otherwise the same records would verify under two root CIDs."""
    keys = [K["A0"], K["B1"], K["C0"]]
    store, root = blocks_of(tree_of(keys))
    good = cbrrr.decode_dag_cbor(store[root])
    assert isinstance(good["l"], cbrrr.CID) and isinstance(good["e"][0]["v"], cbrrr.CID)
    left_bytes = dict(good, l=good["l"].cid_bytes)
    value_bytes = dict(good, e=[dict(good["e"][0], v=good["e"][0]["v"].cid_bytes)])
    right_bytes = dict(good, e=[dict(good["e"][0], t=good["e"][0]["t"].cid_bytes)])
    for node in (left_bytes, value_bytes, right_bytes):
        bad = put(store, cbor.encode(node))
        with pytest.raises(MSTBadNode):
            MST.load(store, bad).verify()
    # a leaf whose value is a byte string, below a well-formed root
    leaf_cid = good["l"].cid_bytes
    leaf = cbrrr.decode_dag_cbor(store[leaf_cid])
    leaf["e"][0]["v"] = leaf["e"][0]["v"].cid_bytes
    new_leaf = put(store, cbor.encode(leaf))
    bad_root = put(store, cbor.encode(dict(good, l=cbrrr.CID(new_leaf))))
    with pytest.raises(MSTBadNode):
        MST.load(store, bad_root).verify()
    # a key suffix written as a link (the bytes of a CID where a byte string belongs)
    k_link = dict(good, e=[dict(good["e"][0], k=cbrrr.CID(CID1))])
    with pytest.raises(MSTError):
        MST.load(store, put(store, cbor.encode(k_link))).verify()
    # a 36-byte key suffix that happens to look like a CID is fine as a byte string
    t = MST.build([(b"a", CID1), (b"a" + CID1, CID1)])
    s2, r2 = blocks_of(t)
    assert MST.load(s2, r2).verify() == [(b"a", CID1), (b"a" + CID1, CID1)]
