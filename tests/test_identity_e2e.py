"""protocol.identity against the real PLC + PDS harness (legacy PLC document format).

Every handle resolver is exercised: XRPC resolveHandle at the PDS, the PDS's
``/.well-known/atproto-did`` (with ``Host: <handle>``), and DNS via the harness's handle-dns.py.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest

from protocol import cbor
from protocol.identity import (
    INVALID_HANDLE,
    DidNotFound,
    Directory,
    DnsHandleResolver,
    HttpClient,
    WellKnownHandleResolver,
    XrpcHandleResolver,
    to_resolve_json,
)
from tests.e2e_support import HARNESS, HARNESS_HOME, free_port
from tests.test_keys import _car_root_block

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scenario(pds):
    return pds.script("scenario.mjs")


@pytest.fixture
def handle_dns(pds):
    py = HARNESS_HOME / "pds" / "venv" / "bin" / "python"
    if not py.exists():
        pytest.skip("harness venv missing")
    port = free_port()
    proc = subprocess.Popen([str(py), str(HARNESS / "pds" / "handle-dns.py"), "--port", str(port), "--pds", pds.url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        line = proc.stdout.readline()
        while "handle DNS on" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        if "handle DNS on" not in line:
            pytest.skip(f"handle-dns.py did not start: {line!r}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _check(directory: Directory, pds, scenario) -> None:
    names = scenario["names"]
    for who in ("alice", "bob"):
        did = names[who]
        ident = await directory.resolve(did)
        assert ident.handle == scenario["repos"][did]["handle"], who
        assert ident.pds_endpoint == pds.public_url
        assert ident.signing_key is not None
        # the repo's current commit verifies with the resolved key
        car = urllib.request.urlopen(f"{pds.url}/xrpc/com.atproto.sync.getRepo?did={did}", timeout=30).read()
        commit = cbor.decode_strict(_car_root_block(car))
        sig = commit.pop("sig")
        assert ident.signing_key.verify(cbor.encode(commit), sig)
        out = to_resolve_json(ident)
        assert out["verificationMethod"][0]["publicKeyMultibase"] == ident.signing_key.multibase()
        assert await directory.resolve_handle(ident.handle) == did
    # carol's account was deleted: the PLC still has her document, her handle no longer resolves
    carol = await directory.resolve(names["carol"])
    assert carol.handle == INVALID_HANDLE and carol.declared_handle
    with pytest.raises(DidNotFound):
        await directory.resolve("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")


async def test_harness_xrpc_resolver(pds, scenario):
    d = Directory(plc_url=pds.plc_url, handle_resolver=XrpcHandleResolver(pds.url))
    try:
        await _check(d, pds, scenario)
    finally:
        await d.close()


async def test_harness_well_known_resolver(pds, scenario):
    http = HttpClient()
    d = Directory(plc_url=pds.plc_url, http=http, handle_resolver=WellKnownHandleResolver(
        http, scheme="http", port=pds.pds_port, connect_host="127.0.0.1"))
    try:
        await _check(d, pds, scenario)
    finally:
        await d.close()


async def test_harness_dns_resolver(pds, scenario, handle_dns):
    d = Directory(plc_url=pds.plc_url, handle_resolver=DnsHandleResolver(handle_dns, timeout=5.0))
    try:
        await _check(d, pds, scenario)
    finally:
        await d.close()
