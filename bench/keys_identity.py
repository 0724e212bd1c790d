"""Signature verification and identity-cache costs, one core.

    python bench/keys_identity.py

Prints microseconds per operation (best of 5 runs): k256 and p256 verify of a ~200-byte commit
(the signature input is the DAG-CBOR commit without ``sig``), parse of a cached and an uncached
Multikey, and a Directory cache hit.
"""

from __future__ import annotations

import asyncio
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol import keys  # noqa: E402
from protocol.identity import Directory, Identity, _Entry  # noqa: E402


def best(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    data = os.urandom(200)
    for curve in (keys.K256, keys.P256):
        priv = keys.PrivateKey.generate(curve)
        pub = keys.parse_multikey(priv.public_key.multibase())
        sig = priv.sign(data)
        assert pub.verify(data, sig)
        print(f"verify {curve}: {best(lambda: pub.verify(data, sig), 3000):.1f} us")
        print(f"sign   {curve}: {best(lambda: priv.sign(data), 1000):.1f} us")
        mb = pub.multibase()
        print(f"parse_multikey {curve} (cached): {best(lambda: keys.parse_multikey(mb), 100000):.2f} us")

        def uncached():
            keys.parse_multikey.cache_clear()
            keys._parse_public_cached.cache_clear()
            keys.parse_multikey(mb)

        print(f"parse_multikey {curve} (uncached): {best(uncached, 2000):.1f} us")

    async def cache_hit() -> None:
        d = Directory(plc_url="http://127.0.0.1:9")
        did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
        ident = Identity(did=did, handle="a.test", declared_handle="a.test", pds_endpoint="", signing_key=None, doc={})
        d._ids.put(did, _Entry(d.clock(), ident, None))
        n = 100000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(n):
            await d.resolve(did)
        print(f"Directory.resolve cache hit: {(loop.time() - t0) / n * 1e6:.2f} us")
        await d.close()

    asyncio.run(cache_hit())


if __name__ == "__main__":
    main()
