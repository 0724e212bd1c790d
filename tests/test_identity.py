"""protocol.identity: DID documents, resolution against real local HTTP/DNS servers, the cache."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from protocol.identity import (
    INVALID_HANDLE,
    ChainHandleResolver,
    DidNotFound,
    DidResolutionFailed,
    DidWebResolver,
    Directory,
    DnsHandleResolver,
    HandleMismatch,
    HandleNotFound,
    HandleResolutionFailed,
    HttpClient,
    Identity,
    InvalidDid,
    PrivateHostRefused,
    UnsupportedDidMethod,
    WellKnownHandleResolver,
    XrpcHandleResolver,
    check_public_host,
    handle_allowed_tld,
    is_public_ip,
    is_valid_did,
    is_valid_handle,
    parse_did_doc,
    to_resolve_json,
)
from protocol.keys import K256, P256, PrivateKey

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # pragma: no cover
    SHARED = Path("/work/shared")
REAL = SHARED / "fixtures" / "real-network"


def load(name: str) -> dict:
    return json.loads((REAL / name).read_text())


# ------------------------------------------------------------------ parsing (no I/O)

EXPECTED = {
    "did_plc_doc.json": ("did:plc:ewvi7nxzyoun6zhxrhs64oiz", "atproto.com", "https://bsky.social", K256),
    "did_plc_doc_legacy.json": ("did:plc:ewvi7nxzyoun6zhxrhs64oiz", "atproto.com", "https://bsky.social", K256),
    "did_web_doc.json": ("did:web:discover.bsky.social", None, "", None),
    "fakermaker.didDoc.json": ("did:plc:dpg45vsnuir2vqqqadsn6afg", "ebert9014-89.test", "http://localhost:2583", P256),
    "greenground.didDoc.json": ("did:plc:wqgdnqlv2mwiio6pfchwtrff", "greenground.bsky.social", "https://bsky.social", K256),
    "paul_staging.didDoc.json": ("did:plc:cmpvykrzb2l22kj4ojlv3ox4", "paul.staging.bsky.dev", "https://pds.staging.bsky.dev", K256),
}


@pytest.mark.parametrize("fname", sorted(EXPECTED))
def test_parse_real_network_docs(fname):
    doc = load(fname)
    did, handle, pds, curve = EXPECTED[fname]
    ident = parse_did_doc(doc, did)
    assert ident.did == did
    assert ident.handle == INVALID_HANDLE  # not verified by parsing alone
    assert ident.declared_handle == handle
    assert ident.pds_endpoint == pds
    if curve is None:
        assert ident.signing_key is None and ident.key_error
        assert ident.signing_key_multibase() == ""
    else:
        assert ident.signing_key is not None and ident.signing_key.curve == curve
        assert ident.key_error == ""
        assert ident.signing_key_multibase().startswith("zQ3s" if curve == K256 else "zDna")
    assert ident.doc is doc


def test_legacy_and_current_docs_agree():
    a = parse_did_doc(load("did_plc_doc.json"))
    b = parse_did_doc(load("did_plc_doc_legacy.json"))
    assert a.signing_key == b.signing_key
    assert (a.did, a.declared_handle, a.pds_endpoint) == (b.did, b.declared_handle, b.pds_endpoint)


def test_parse_errors_and_edge_cases():
    doc = load("did_plc_doc.json")
    with pytest.raises(DidResolutionFailed):
        parse_did_doc(doc, "did:plc:someoneelse")
    with pytest.raises(DidResolutionFailed):
        parse_did_doc([doc])
    with pytest.raises(DidResolutionFailed):
        parse_did_doc({"alsoKnownAs": []})
    did = doc["id"]
    other = PrivateKey.generate(P256).public_key
    d = copy.deepcopy(doc)
    d["alsoKnownAs"] = ["https://example.com", "at://not a handle", "at://Alice.Example.COM", "at://second.com"]
    d["verificationMethod"] = [
        {"id": did + "#atproto", "type": "Multikey", "controller": "did:plc:other", "publicKeyMultibase": other.multibase()},
        "garbage",
        {"id": did + "#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": doc["verificationMethod"][0]["publicKeyMultibase"]},
        {"id": "#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": other.multibase()},
    ]
    d["service"] = [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "ftp://x"},
                    {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://second"}]
    ident = parse_did_doc(d, did)
    assert ident.declared_handle == "alice.example.com"  # first valid at:// entry, lowercased
    # a key controlled by someone else is ignored; then the first #atproto wins
    assert ident.signing_key.multibase() == doc["verificationMethod"][0]["publicKeyMultibase"]
    assert ident.pds_endpoint == ""  # first #atproto_pds wins, and it is not an http(s) URL
    d["verificationMethod"] = [{"id": "#atproto", "type": "Ed25519VerificationKey2020", "controller": did,
                                "publicKeyMultibase": "z6Mk"}]
    d["service"] = "nope"
    d["alsoKnownAs"] = None
    ident = parse_did_doc(d, did)
    assert ident.signing_key is None and "unsupported" in ident.key_error
    assert ident.pds_endpoint == "" and ident.declared_handle is None


def test_to_resolve_json_shape():
    legacy = parse_did_doc(load("did_plc_doc_legacy.json"))
    current = parse_did_doc(load("did_plc_doc.json"))
    out = to_resolve_json(legacy)
    assert out == to_resolve_json(current)
    assert out == {
        "id": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
        "alsoKnownAs": ["at://atproto.com"],
        "verificationMethod": [{"id": "did:plc:ewvi7nxzyoun6zhxrhs64oiz#atproto", "type": "Multikey",
                                "controller": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
                                "publicKeyMultibase": "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://bsky.social"}],
    }
    assert "@context" not in out
    raw = to_resolve_json(legacy, normalize_keys=False)
    assert raw["verificationMethod"][0]["type"] == "EcdsaSecp256k1VerificationKey2019"
    assert raw["verificationMethod"][0]["id"] == "did:plc:ewvi7nxzyoun6zhxrhs64oiz#atproto"
    web_out = to_resolve_json(parse_did_doc(load("did_web_doc.json")))
    assert web_out == {"id": "did:web:discover.bsky.social",
                       "service": [{"id": "#bsky_fg", "type": "BskyFeedGenerator",
                                    "serviceEndpoint": "https://discover.bsky.social"}]}
    # keys not controlled by the DID and ids without fragments are left out
    d = load("did_plc_doc.json")
    d["verificationMethod"].append({"id": "nofragment", "type": "Multikey", "controller": d["id"], "publicKeyMultibase": "z"})
    d["verificationMethod"].append({"id": "#other", "type": "Multikey", "controller": "did:plc:x", "publicKeyMultibase": "z"})
    d["verificationMethod"].append({"id": "#weird", "type": "Custom", "controller": d["id"], "publicKeyMultibase": "zzz"})
    d["service"].append({"id": "nofrag", "type": "X", "serviceEndpoint": "https://x"})
    out = to_resolve_json(parse_did_doc(d))
    assert [v["id"] for v in out["verificationMethod"]] == [d["id"] + "#atproto", d["id"] + "#weird"]
    assert out["verificationMethod"][1]["type"] == "Custom"  # unparseable keys pass through
    assert len(out["service"]) == 1
    json.dumps(out)


def test_syntax_helpers():
    assert is_valid_did("did:plc:ewvi7nxzyoun6zhxrhs64oiz")
    assert is_valid_did("did:web:example.com")
    for bad in ["", "did:plc:", "did:PLC:abc", "did:plc:abc\n", "did:plc:abc:", "did:plc:abc%", "plc:abc", "did:plc:a b", None, 5]:
        assert not is_valid_did(bad)
    assert is_valid_handle("alice.test") and is_valid_handle("a.b-c.example.com")
    for bad in ["", "alice", "alice.", ".alice.com", "alice.1com", "al ice.com", "-a.com", "a" * 64 + ".com"]:
        assert not is_valid_handle(bad)
    assert handle_allowed_tld("alice.test")
    for h in ["a.local", "a.arpa", "handle.invalid", "a.localhost", "a.internal", "a.example", "a.onion", "a.alt"]:
        assert not handle_allowed_tld(h)


def test_public_ip():
    for a in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]:
        assert is_public_ip(a)
    for a in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
              "0.0.0.0", "::1", "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1", "not-an-ip"]:
        assert not is_public_ip(a), a


async def test_check_public_host():
    await check_public_host("8.8.8.8")
    for h in ["127.0.0.1", "[::1]", "localhost", "10.0.0.1"]:
        with pytest.raises(PrivateHostRefused):
            await check_public_host(h)


# ------------------------------------------------------------------ a local PLC / well-known / XRPC server


class FakeNet:
    """One aiohttp server playing PLC (``/{did}``), did:web and handle well-known hosts (by Host
    header) and a PDS's ``resolveHandle``."""

    def __init__(self) -> None:
        self.docs: dict[str, object] = {}          # did -> doc (dict) or (status, body)
        self.web_docs: dict[str, object] = {}      # host -> doc
        self.well_known: dict[str, object] = {}    # handle host -> did string or (status, body)
        self.handles: dict[str, str] = {}          # xrpc resolveHandle table
        self.requests: list[str] = []
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        app = web.Application()
        app.router.add_get("/.well-known/did.json", self._did_web)
        app.router.add_get("/.well-known/atproto-did", self._atproto_did)
        app.router.add_get("/xrpc/com.atproto.identity.resolveHandle", self._resolve_handle)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/{did}", self._plc)
        self.app = app
        self.port = 0
        self.url = ""

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)

    @staticmethod
    def _answer(v):
        if isinstance(v, tuple):
            status, body = v
            return web.Response(status=status, body=body if isinstance(body, bytes) else body.encode())
        if isinstance(v, (dict, list)):
            return web.json_response(v)
        return web.Response(text=v)

    async def _plc(self, req: web.Request) -> web.Response:
        did = req.match_info["did"]
        self.requests.append("plc:" + did)
        doc = self.docs.get(did)  # what the directory held when the request arrived
        await self._wait()
        if doc is None:
            return web.json_response({"message": "DID not registered"}, status=404)
        return self._answer(doc)

    async def _did_web(self, req: web.Request) -> web.Response:
        host = req.host.split(":")[0]
        self.requests.append("web:" + host)
        await self._wait()
        if host not in self.web_docs:
            return web.Response(status=404)
        return self._answer(self.web_docs[host])

    async def _atproto_did(self, req: web.Request) -> web.Response:
        host = req.host.split(":")[0]
        self.requests.append("wk:" + host)
        await self._wait()
        if host not in self.well_known:
            return web.Response(status=404, text="no")
        return self._answer(self.well_known[host])

    async def _resolve_handle(self, req: web.Request) -> web.Response:
        h = req.query.get("handle", "")
        self.requests.append("xrpc:" + h)
        await self._wait()
        if h not in self.handles:
            return web.json_response({"error": "InvalidRequest", "message": "Unable to resolve handle"}, status=400)
        return web.json_response({"did": self.handles[h]})

    async def _redirect(self, req: web.Request) -> web.Response:
        raise web.HTTPFound(req.query["to"])

    def count(self, prefix: str) -> int:
        return sum(1 for r in self.requests if r.startswith(prefix))

    async def arrived(self, prefix: str, n: int) -> None:
        """Wait (up to 5 s) until ``n`` requests matching ``prefix`` reached the server."""
        for _ in range(500):
            if self.count(prefix) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{prefix}: {self.count(prefix)} requests, expected {n}")


def make_doc(did: str, handle: str | None, key=None, pds: str = "https://pds.example.com", legacy: bool = False) -> dict:
    key = key or PrivateKey.generate(K256).public_key
    if legacy:
        vm = {"id": "#atproto", "controller": did,
              "type": "EcdsaSecp256k1VerificationKey2019" if key.curve == K256 else "EcdsaSecp256r1VerificationKey2019"}
        from protocol.keys import b58encode
        vm["publicKeyMultibase"] = "z" + b58encode(key.uncompressed())
    else:
        vm = {"id": did + "#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": key.multibase()}
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "verificationMethod": [vm],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def net():
    n = FakeNet()
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def clock():
    return Clock()


@pytest.fixture
async def directory(net, clock):
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver(net.url), clock=clock, timeout=2.0)
    yield d
    await d.close()


ALICE = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
BOB = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"


# ------------------------------------------------------------------ resolution


async def test_resolve_plc_with_verified_handle(net, directory):
    key = PrivateKey.generate(K256).public_key
    net.docs[ALICE] = make_doc(ALICE, "Alice.Test", key=key, pds="http://localhost:2583")
    net.handles["alice.test"] = ALICE
    ident = await directory.resolve(ALICE)
    assert isinstance(ident, Identity)
    assert ident.did == ALICE
    assert ident.handle == "alice.test" and ident.declared_handle == "alice.test"
    assert ident.pds_endpoint == "http://localhost:2583"
    assert ident.signing_key == key
    assert net.requests == ["plc:" + ALICE, "xrpc:alice.test"]
    out = to_resolve_json(ident)
    assert out["verificationMethod"][0]["publicKeyMultibase"] == key.multibase()


async def test_resolve_legacy_doc_p256(net, directory):
    key = PrivateKey.generate(P256).public_key
    net.docs[ALICE] = make_doc(ALICE, "alice.test", key=key, legacy=True)
    net.handles["alice.test"] = ALICE
    ident = await directory.resolve(ALICE)
    assert ident.signing_key == key and ident.handle == "alice.test"


async def test_handle_mismatch_and_failures_give_handle_invalid(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = BOB  # the handle points at someone else
    ident = await directory.resolve(ALICE)
    assert ident.handle == INVALID_HANDLE and ident.declared_handle == "alice.test"
    # not found
    net.docs[BOB] = make_doc(BOB, "bob.test")
    assert (await directory.resolve(BOB)).handle == INVALID_HANDLE
    # no handle declared at all: no handle request made
    carol = "did:plc:cccccccccccccccccccccccc"
    net.docs[carol] = make_doc(carol, None)
    n = len(net.requests)
    assert (await directory.resolve(carol)).handle == INVALID_HANDLE
    assert net.requests[n:] == ["plc:" + carol]
    # reserved TLD: handle.invalid without asking anyone (Go fails the whole lookup here)
    dave = "did:plc:dddddddddddddddddddddddd"
    net.docs[dave] = make_doc(dave, "dave.local")
    n = len(net.requests)
    assert (await directory.resolve(dave)).handle == INVALID_HANDLE
    assert net.requests[n:] == ["plc:" + dave]


async def test_handle_resolver_error_gives_handle_invalid(net, clock):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver("http://127.0.0.1:1"), clock=clock, timeout=1.0)
    try:
        ident = await d.resolve(ALICE)
        assert ident.handle == INVALID_HANDLE
    finally:
        await d.close()


async def test_did_errors(net, directory):
    with pytest.raises(DidNotFound):
        await directory.resolve(ALICE)
    net.docs[BOB] = make_doc(ALICE, "alice.test")  # served under BOB, but id says ALICE
    with pytest.raises(DidResolutionFailed, match="does not match"):
        await directory.resolve(BOB)
    carol = "did:plc:cccccccccccccccccccccccc"
    net.docs[carol] = (500, "oops")
    with pytest.raises(DidResolutionFailed, match="500"):
        await directory.resolve(carol)
    dave = "did:plc:dddddddddddddddddddddddd"
    net.docs[dave] = (200, "{not json")
    with pytest.raises(DidResolutionFailed, match="not JSON"):
        await directory.resolve(dave)
    erin = "did:plc:eeeeeeeeeeeeeeeeeeeeeeee"
    net.docs[erin] = ["a", "list"]
    with pytest.raises(DidResolutionFailed):
        await directory.resolve(erin)
    frank = "did:plc:ffffffffffffffffffffffff"
    net.docs[frank] = (410, "tombstoned")
    with pytest.raises(DidNotFound):
        await directory.resolve(frank)
    with pytest.raises(InvalidDid):
        await directory.resolve("not-a-did")
    with pytest.raises(UnsupportedDidMethod):
        await directory.resolve("did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF")
    assert isinstance(InvalidDid("x"), ValueError)


async def test_doc_too_big_is_a_failure(net, directory):
    doc = make_doc(ALICE, None)
    doc["padding"] = "x" * (1 << 20)
    net.docs[ALICE] = doc
    with pytest.raises(DidResolutionFailed, match="too large|larger"):
        await directory.resolve(ALICE)


async def test_timeout(net, clock):
    net.docs[ALICE] = make_doc(ALICE, None)
    net.delay = 2.0
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver(net.url), clock=clock, timeout=0.2)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(DidResolutionFailed):
            await d.resolve(ALICE)
        assert asyncio.get_running_loop().time() - t0 < 1.5
    finally:
        await d.close()


# ------------------------------------------------------------------ cache


async def test_cache_hit_and_ttl(net, directory, clock):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    assert directory.get_cached(ALICE) is None
    a = await directory.resolve(ALICE)
    b = await directory.resolve(ALICE)
    assert a is b and directory.get_cached(ALICE) is a
    assert net.count("plc:") == 1
    assert (directory.hits, directory.misses, directory.lookups) == (1, 1, 1)
    clock.t += 24 * 3600 - 1
    await directory.resolve(ALICE)
    assert net.count("plc:") == 1
    clock.t += 2  # past 24 h since the lookup
    assert directory.get_cached(ALICE) is None
    await directory.resolve(ALICE)
    assert net.count("plc:") == 2
    assert directory.lookups == 2


async def test_negative_cache_retried_after_two_minutes(net, directory, clock):
    with pytest.raises(DidNotFound):
        await directory.resolve(ALICE)
    net.docs[ALICE] = make_doc(ALICE, None)
    clock.t += 60
    with pytest.raises(DidNotFound):  # still the cached error
        await directory.resolve(ALICE)
    assert directory.get_cached(ALICE) is None
    assert net.count("plc:") == 1
    clock.t += 61
    assert (await directory.resolve(ALICE)).did == ALICE
    assert net.count("plc:") == 2


async def test_invalid_handle_re_resolved_after_five_minutes(net, directory, clock):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.docs[BOB] = make_doc(BOB, "bob.test")
    net.handles["bob.test"] = BOB
    assert (await directory.resolve(ALICE)).handle == INVALID_HANDLE
    assert (await directory.resolve(BOB)).handle == "bob.test"
    clock.t += 299
    await directory.resolve(ALICE)
    assert net.count("plc:" + ALICE) == 1
    net.handles["alice.test"] = ALICE  # the handle gets fixed
    clock.t += 2
    assert (await directory.resolve(ALICE)).handle == "alice.test"
    assert net.count("plc:" + ALICE) == 2
    await directory.resolve(BOB)  # a valid handle stays cached
    assert net.count("plc:" + BOB) == 1


async def test_coalescing(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    net.gate = asyncio.Event()
    tasks = [asyncio.create_task(directory.resolve(ALICE)) for _ in range(50)]
    await net.arrived("plc:", 1)
    await asyncio.sleep(0.05)
    assert net.count("plc:") == 1
    net.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r is results[0] for r in results)
    assert net.count("plc:") == 1 and net.count("xrpc:") == 1
    assert directory.coalesced == 49 and directory.lookups == 1
    assert directory.misses == 50


async def test_coalesced_errors_and_cancelled_leader(net, directory):
    net.gate = asyncio.Event()
    tasks = [asyncio.create_task(directory.resolve(ALICE)) for _ in range(10)]
    await net.arrived("plc:", 1)
    tasks[0].cancel()  # the first caller gives up: the others still get the answer
    net.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, DidNotFound) for r in results[1:])
    assert net.count("plc:") == 1


async def test_purge_and_refresh(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    await directory.resolve(ALICE)
    net.docs[ALICE] = make_doc(ALICE, "alice2.test")
    net.handles["alice2.test"] = ALICE
    assert (await directory.resolve(ALICE)).handle == "alice.test"
    assert (await directory.refresh(ALICE)).handle == "alice2.test"
    assert net.count("plc:") == 2
    directory.purge(ALICE)
    await directory.resolve(ALICE)
    assert net.count("plc:") == 3


async def test_purge_during_lookup_is_not_cached(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "old.test")
    net.gate = asyncio.Event()
    first = asyncio.create_task(directory.resolve(ALICE))
    await net.arrived("plc:", 1)
    directory.purge(ALICE)  # e.g. an #identity event arrives mid-lookup
    net.docs[ALICE] = make_doc(ALICE, "new.test")
    second = asyncio.create_task(directory.resolve(ALICE))  # must not join the stale lookup
    await net.arrived("plc:", 2)
    net.gate.set()
    a, b = await asyncio.gather(first, second)
    assert a.declared_handle == "old.test" and b.declared_handle == "new.test"
    assert net.count("plc:") == 2
    assert (await directory.resolve(ALICE)).declared_handle == "new.test"
    assert net.count("plc:") == 2


async def test_lru_capacity(net, clock):
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver(net.url), clock=clock, capacity=2)
    try:
        dids = [f"did:plc:{c * 24}" for c in "abc"]
        for did in dids:
            net.docs[did] = make_doc(did, None)
        await d.resolve(dids[0])
        await d.resolve(dids[1])
        await d.resolve(dids[0])  # dids[0] is now the most recent
        await d.resolve(dids[2])  # evicts dids[1]
        assert d.cache_size()[0] == 2
        await d.resolve(dids[0])
        assert net.count("plc:" + dids[0]) == 1
        await d.resolve(dids[1])
        assert net.count("plc:" + dids[1]) == 2
    finally:
        await d.close()


async def test_resolve_handle(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    net.docs[BOB] = make_doc(BOB, "bob.test")
    net.handles["mallory.test"] = BOB  # mallory.test points at bob, who does not claim it
    assert await directory.resolve_handle("Alice.TEST") == ALICE
    assert await directory.resolve_handle("alice.test") == ALICE
    assert directory.handle_hits == 1
    with pytest.raises(HandleMismatch):
        await directory.resolve_handle("mallory.test")
    with pytest.raises(HandleNotFound):
        await directory.resolve_handle("nobody.test")
    n = net.count("xrpc:nobody.test")
    with pytest.raises(HandleNotFound):  # negative-cached
        await directory.resolve_handle("nobody.test")
    assert net.count("xrpc:nobody.test") == n
    for bad in ["handle.invalid", "x.local", "not a handle"]:
        with pytest.raises(HandleResolutionFailed):
            await directory.resolve_handle(bad)
    # a DID lookup with a verified handle fills the handle cache
    carol = "did:plc:cccccccccccccccccccccccc"
    net.docs[carol] = make_doc(carol, "carol.test")
    net.handles["carol.test"] = carol
    await directory.resolve(carol)
    n = len(net.requests)
    assert await directory.resolve_handle("carol.test") == carol
    assert len(net.requests) == n


async def test_resolve_handle_coalescing(net, directory):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    net.gate = asyncio.Event()
    tasks = [asyncio.create_task(directory.resolve_handle("alice.test")) for _ in range(20)]
    await net.arrived("xrpc:", 1)
    net.gate.set()
    assert set(await asyncio.gather(*tasks)) == {ALICE}
    assert directory.handle_coalesced == 19
    # one handle->DID request, one from the DID lookup's own two-way check; not 20 of each
    assert net.count("xrpc:alice.test") == 2 and net.count("plc:") == 1


async def test_skip_handle_verification(net, clock):
    net.docs[ALICE] = make_doc(ALICE, "alice.test")
    net.handles["alice.test"] = ALICE
    d = Directory(plc_url=net.url, handle_resolver=XrpcHandleResolver(net.url), clock=clock,
                  skip_handle_verification=True)
    try:
        ident = await d.resolve(ALICE)
        assert ident.handle == INVALID_HANDLE and ident.declared_handle == "alice.test"
        assert net.count("xrpc:") == 0
    finally:
        await d.close()


# ------------------------------------------------------------------ did:web


async def test_did_web(net, clock):
    did = "did:web:alice.test"
    net.web_docs["alice.test"] = make_doc(did, "alice.test")
    net.well_known["alice.test"] = did + "\n"
    http = HttpClient(timeout=2.0)
    d = Directory(plc_url=net.url, http=http, clock=clock,
                  did_web=DidWebResolver(scheme="http", port=net.port, connect_host="127.0.0.1"),
                  handle_resolver=WellKnownHandleResolver(http, scheme="http", port=net.port, connect_host="127.0.0.1"))
    try:
        ident = await d.resolve(did)
        assert ident.did == did and ident.handle == "alice.test"
        assert net.requests == ["web:alice.test", "wk:alice.test"]
        with pytest.raises(DidNotFound):
            await d.resolve("did:web:nobody.test")
        net.web_docs["wrong.test"] = make_doc("did:web:other.test", None)
        with pytest.raises(DidResolutionFailed, match="does not match"):
            await d.resolve("did:web:wrong.test")
        n = len(net.requests)
        for bad in ["did:web:localhost", "did:web:foo.local", "did:web:127.0.0.1",
                    "did:web:alice.test%3A8080", "did:web:alice.test:path"]:
            with pytest.raises(DidResolutionFailed):
                await d.resolve(bad)
        assert len(net.requests) == n  # host rules are checked before any request
    finally:
        await d.close()


def test_did_web_urls():
    r = DidWebResolver()
    assert r.request_for(r.host_for("did:web:Example.COM")) == ("https://example.com/.well-known/did.json", None)
    r = DidWebResolver(scheme="http", port=8080, connect_host="127.0.0.1")
    assert r.request_for("a.test") == ("http://127.0.0.1:8080/.well-known/did.json", {"Host": "a.test"})


async def test_did_web_public_only_refuses_loopback(net, clock):
    did = "did:web:alice.test"
    net.web_docs["alice.test"] = make_doc(did, None)
    d = Directory(plc_url=net.url, clock=clock, public_only=True,
                  did_web=DidWebResolver(scheme="http", port=net.port, connect_host="127.0.0.1"),
                  handle_resolver=XrpcHandleResolver(net.url))
    try:
        with pytest.raises(DidResolutionFailed, match="not a public address"):
            await d.resolve(did)
        assert net.requests == []
        # the PLC URL is configuration, not document data: it is not guarded
        net.docs[ALICE] = make_doc(ALICE, None)
        assert (await d.resolve(ALICE)).did == ALICE
    finally:
        await d.close()


async def test_http_client_public_only(net):
    http = HttpClient(public_only=True, timeout=2.0)
    try:
        with pytest.raises(PrivateHostRefused):
            await http.get(net.url + "/x", guard=True)
        with pytest.raises(PrivateHostRefused):  # a name that resolves to loopback
            await http.get(f"http://localhost:{net.port}/x", guard=True)
        # a redirect from an allowed request to a private address is caught at the hop
        status, _ = await http.get(net.url + "/" + ALICE)  # unguarded requests go through
        assert status == 404
    finally:
        await http.close()


# ------------------------------------------------------------------ handle resolvers


async def test_well_known_resolver(net):
    http = HttpClient(timeout=2.0)
    r = WellKnownHandleResolver(http, scheme="http", port=net.port, connect_host="127.0.0.1")
    try:
        net.well_known["a.test"] = "  " + ALICE + "\n"
        assert await r.resolve("a.test") == ALICE
        assert await r.resolve("missing.test") is None
        net.well_known["big.test"] = ALICE + " " * 3000
        with pytest.raises(HandleResolutionFailed):
            await r.resolve("big.test")
        net.well_known["junk.test"] = "hello"
        with pytest.raises(HandleResolutionFailed):
            await r.resolve("junk.test")
        net.well_known["err.test"] = (503, "busy")
        with pytest.raises(HandleResolutionFailed):
            await r.resolve("err.test")
    finally:
        await http.close()


async def test_redirects_followed(net):
    http = HttpClient(timeout=2.0)
    try:
        net.docs[ALICE] = {"id": ALICE}
        status, body = await http.get(f"{net.url}/redirect?to=/{ALICE}")
        assert status == 200 and json.loads(body) == {"id": ALICE}
    finally:
        await http.close()


async def test_xrpc_resolver(net):
    r = XrpcHandleResolver(net.url + "/")
    net.handles["a.test"] = ALICE
    assert await r.resolve("a.test") == ALICE
    assert await r.resolve("b.test") is None
    net.handles["bad.test"] = "not-a-did"
    with pytest.raises(HandleResolutionFailed):
        await r.resolve("bad.test")
    dead = XrpcHandleResolver("http://127.0.0.1:1")
    with pytest.raises(HandleResolutionFailed):
        await dead.resolve("a.test")
    await r.http.close()
    await dead.http.close()


class _Fixed:
    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    async def resolve(self, handle):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_chain_semantics():
    fail = HandleResolutionFailed("boom")
    assert await ChainHandleResolver([_Fixed(None), _Fixed(ALICE)]).resolve("a.test") == ALICE
    assert await ChainHandleResolver([_Fixed(fail), _Fixed(ALICE)]).resolve("a.test") == ALICE
    first = _Fixed(BOB)
    second = _Fixed(ALICE)
    assert await ChainHandleResolver([first, second]).resolve("a.test") == BOB and second.calls == 0
    assert await ChainHandleResolver([_Fixed(None), _Fixed(None)]).resolve("a.test") is None
    with pytest.raises(HandleResolutionFailed):
        await ChainHandleResolver([_Fixed(None), _Fixed(fail)]).resolve("a.test")


# ------------------------------------------------------------------ DNS (a real UDP DNS server on loopback)


class _DnsServer(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.queries: list[str] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text().rstrip(".").lower()
        self.queries.append(name)
        resp = dns.message.make_response(q)
        if name in self.records:
            if q.question[0].rdtype == dns.rdatatype.TXT:
                txts = ['"%s"' % t for t in self.records[name]]
                resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "TXT", *txts))
        else:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(resp.to_wire(), addr)


@pytest.fixture
async def dns_server():
    loop = asyncio.get_running_loop()
    proto = _DnsServer({
        "_atproto.alice.test": ["did=" + ALICE],
        "_atproto.multi.test": ["v=spf1 -all", "did=" + BOB],
        "_atproto.bad.test": ["did=nonsense"],
        "_atproto.none.test": ["hello"],
        "_atproto.x.bsky.social": ["did=" + ALICE],
    })
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield proto, port
    transport.close()


async def test_dns_resolver(dns_server):
    proto, port = dns_server
    r = DnsHandleResolver(f"127.0.0.1:{port}", timeout=2.0)
    assert await r.resolve("alice.test") == ALICE
    assert await r.resolve("multi.test") == BOB
    assert await r.resolve("nobody.test") is None  # NXDOMAIN
    assert await r.resolve("none.test") is None  # TXT without did=
    with pytest.raises(HandleResolutionFailed):
        await r.resolve("bad.test")
    n = len(proto.queries)
    assert await r.resolve("x.bsky.social") is None  # DNS skipped for *.bsky.social
    assert len(proto.queries) == n


async def test_dns_resolver_unreachable():
    # a UDP port nobody listens on: a timeout / refusal becomes a resolution failure
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = DnsHandleResolver(f"127.0.0.1:{port}", timeout=0.3)
    with pytest.raises(HandleResolutionFailed):
        await r.resolve("alice.test")


async def test_directory_dns_then_https(net, dns_server, clock):
    _, dport = dns_server
    http = HttpClient(timeout=2.0)
    chain = ChainHandleResolver([
        DnsHandleResolver(f"127.0.0.1:{dport}", timeout=2.0),
        WellKnownHandleResolver(http, scheme="http", port=net.port, connect_host="127.0.0.1"),
    ])
    d = Directory(plc_url=net.url, http=http, handle_resolver=chain, clock=clock)
    try:
        net.docs[ALICE] = make_doc(ALICE, "alice.test")  # answered by DNS
        net.docs[BOB] = make_doc(BOB, "bob.test")  # DNS NXDOMAIN, then well-known
        net.well_known["bob.test"] = BOB
        assert (await d.resolve(ALICE)).handle == "alice.test"
        assert net.count("wk:") == 0
        assert (await d.resolve(BOB)).handle == "bob.test"
        assert net.count("wk:bob.test") == 1
    finally:
        await d.close()


# ------------------------------------------------------------------ config


async def test_from_config(net, dns_server):
    import config

    _, dport = dns_server
    cfg = config.Config(plc_url=net.url, ident_cache_size=10,
                        handle_resolver=("dns", "https", "xrpc:" + net.url),
                        dns_nameserver=f"127.0.0.1:{dport}")
    d = Directory.from_config(cfg, timeout=2.0)
    try:
        assert d.plc_url == net.url and d._ids.capacity == 10
        kinds = [type(r).__name__ for r in d.handle_resolver.resolvers]
        assert kinds == ["DnsHandleResolver", "WellKnownHandleResolver", "XrpcHandleResolver"]
        net.docs[BOB] = make_doc(BOB, "bob.test")
        net.handles["bob.test"] = BOB  # DNS: NXDOMAIN; https: no such host; xrpc answers
        assert (await d.resolve(BOB)).handle == "bob.test"
    finally:
        await d.close()
