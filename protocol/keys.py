"""atproto public keys: did:key / Multikey parsing and low-S ECDSA verification (pure, no I/O).

atproto signs with ECDSA over SHA-256 on two curves:

========  ==================  ===========  =====================================
curve     multicodec (varint)  JWT alg     legacy DID-document type
========  ==================  ===========  =====================================
``k256``  0xe7   (e7 01)       ``ES256K``  ``EcdsaSecp256k1VerificationKey2019``
``p256``  0x1200 (80 24)       ``ES256``   ``EcdsaSecp256r1VerificationKey2019``
========  ==================  ===========  =====================================

Encodings accepted:

- ``did:key:z...`` and Multikey ``z...``: multibase base58btc of the multicodec varint followed by
  the 33-byte compressed SEC1 point.
- Legacy verification methods (``EcdsaSecp256{k,r}1VerificationKey2019``): ``publicKeyMultibase`` is
  base58btc of the raw SEC1 point with *no* multicodec prefix; older PLC documents serve the
  65-byte uncompressed form, the interop fixtures the 33-byte compressed one. Both are accepted.

Signatures are the 64-byte compact ``r || s`` form only. DER or any other length is rejected, and
so is a high-S signature on either curve (libsecp256k1 enforces low-S itself; for P-256 it is
checked here because ``cryptography`` accepts both).

Parsed keys are cached (constructing a secp256k1 point costs a square root), so parsing the same
``did:key`` or Multikey string again is a dict lookup.

Example::

    from protocol.keys import PrivateKey, parse_did_key
    priv = PrivateKey.generate("k256")
    sig = priv.sign(b"hello")
    key = parse_did_key(priv.public_key.did_key())
    assert key.verify(b"hello", sig)
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import coincurve
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT as _K256_CTX
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "K256",
    "P256",
    "InvalidKey",
    "PublicKey",
    "PrivateKey",
    "parse_did_key",
    "parse_multikey",
    "parse_public_bytes",
    "key_from_verification_method",
    "b58encode",
    "b58decode",
]

K256 = "k256"
P256 = "p256"

# multicodec varints
_MC_K256 = b"\xe7\x01"  # secp256k1-pub 0xe7
_MC_P256 = b"\x80\x24"  # p256-pub 0x1200
_MC_PREFIX = {K256: _MC_K256, P256: _MC_P256}

_N_K256 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HALF_N_P256 = _N_P256 >> 1
_HALF_N_K256 = _N_K256 >> 1

_LEGACY_TYPES = {
    "EcdsaSecp256k1VerificationKey2019": K256,
    "EcdsaSecp256r1VerificationKey2019": P256,
}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class InvalidKey(ValueError):
    """A key string, byte string or verification method that is not a usable atproto key."""


# Alias under the name the brief used; prefer InvalidKey.
KeyError_ = InvalidKey


# ---------------------------------------------------------------- base58btc

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (what multibase ``z`` uses)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; raises :class:`InvalidKey` on a character outside the alphabet."""
    n = 0
    try:
        for c in text:
            n = n * 58 + _B58_INDEX[c]
    except KeyError:
        raise InvalidKey(f"invalid base58 character {c!r}") from None
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


def _multibase_b58_decode(s: str) -> bytes:
    if not isinstance(s, str) or len(s) < 2 or s[0] != "z":
        raise InvalidKey("not a multibase base58btc string (expected a 'z' prefix)")
    if len(s) > 200:  # a 65-byte key is about 90 characters
        raise InvalidKey("multibase key string too long")
    return b58decode(s[1:])


# ---------------------------------------------------------------- public keys


class PublicKey:
    """An atproto signing public key (secp256k1 or P-256). Immutable; compare with ``==``.

    ``verify(data, sig)`` hashes ``data`` with SHA-256 and checks a 64-byte compact low-S ECDSA
    signature; it never raises on a bad signature, it returns False.
    """

    __slots__ = ("curve", "compressed", "_k256", "_p256", "_multibase")

    def __init__(self, curve: str, compressed: bytes, native) -> None:
        # Use parse_public_bytes / parse_multikey / parse_did_key rather than this constructor.
        self.curve = curve
        self.compressed = compressed  # 33-byte SEC1 compressed point
        self._k256 = native if curve == K256 else None
        self._p256 = native if curve == P256 else None
        self._multibase = "z" + b58encode(_MC_PREFIX[curve] + compressed)

    @property
    def jwt_alg(self) -> str:
        return "ES256K" if self.curve == K256 else "ES256"

    def verify(self, data: bytes, sig: bytes) -> bool:
        """True iff ``sig`` is a valid 64-byte compact low-S ECDSA signature of sha256(data)."""
        if len(sig) != 64:
            return False
        if self._k256 is not None:
            raw = _ffi.new("secp256k1_ecdsa_signature *")
            # parse_compact rejects r or s >= n; verify rejects r or s == 0 and high S.
            if not _lib.secp256k1_ecdsa_signature_parse_compact(_K256_CTX.ctx, raw, sig):
                return False
            digest = hashlib.sha256(data).digest()
            return _lib.secp256k1_ecdsa_verify(_K256_CTX.ctx, raw, digest, self._k256.public_key) == 1
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:], "big")
        if not (0 < r < _N_P256 and 0 < s <= _HALF_N_P256):
            return False
        try:
            self._p256.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True

    def verify_lenient(self, data: bytes, sig: bytes) -> bool:
        """Like :meth:`verify` but also accepts high-S (still 64-byte compact only).

        Not for repo commits (atproto requires low-S); useful for diagnostics and JWT-style checks.
        """
        if len(sig) != 64:
            return False
        if self._k256 is not None:
            raw = _ffi.new("secp256k1_ecdsa_signature *")
            if not _lib.secp256k1_ecdsa_signature_parse_compact(_K256_CTX.ctx, raw, sig):
                return False
            low = _ffi.new("secp256k1_ecdsa_signature *")
            _lib.secp256k1_ecdsa_signature_normalize(_K256_CTX.ctx, low, raw)
            digest = hashlib.sha256(data).digest()
            return _lib.secp256k1_ecdsa_verify(_K256_CTX.ctx, low, digest, self._k256.public_key) == 1
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:], "big")
        if not (0 < r < _N_P256 and 0 < s < _N_P256):
            return False
        try:
            self._p256.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True

    def multibase(self) -> str:
        """Multikey form: ``z`` + base58btc(multicodec varint + compressed key)."""
        return self._multibase

    def did_key(self) -> str:
        return "did:key:" + self._multibase

    def uncompressed(self) -> bytes:
        """The 65-byte SEC1 uncompressed point (``04 || x || y``)."""
        if self._k256 is not None:
            return self._k256.format(compressed=False)
        return self._p256.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.curve == self.curve and other.compressed == self.compressed

    def __hash__(self) -> int:
        return hash((self.curve, self.compressed))

    def __repr__(self) -> str:
        return f"PublicKey({self.did_key()})"


def _check_sec1(curve: str, raw: bytes) -> None:
    if len(raw) == 33 and raw[0] in (2, 3):
        return
    if len(raw) == 65 and raw[0] == 4:
        return
    raise InvalidKey(f"{curve} public key must be 33 compressed or 65 uncompressed SEC1 bytes (got {len(raw)})")


def parse_public_bytes(curve: str, raw: bytes) -> PublicKey:
    """A key from raw SEC1 bytes (33-byte compressed or 65-byte uncompressed; hybrid rejected)."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidKey("public key bytes expected")
    return _parse_public_cached(curve, bytes(raw))


@lru_cache(maxsize=1 << 16)
def _parse_public_cached(curve: str, raw: bytes) -> PublicKey:
    _check_sec1(curve, raw)
    if curve == K256:
        try:
            native = coincurve.PublicKey(raw)
        except Exception as e:
            raise InvalidKey(f"invalid secp256k1 public key: {e}") from None
        compressed = native.format(compressed=True)
    elif curve == P256:
        try:
            native = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except Exception as e:
            raise InvalidKey(f"invalid P-256 public key: {e}") from None
        compressed = native.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    else:
        raise InvalidKey(f"unsupported curve {curve!r}")
    return PublicKey(curve, compressed, native)


@lru_cache(maxsize=1 << 16)
def parse_multikey(s: str) -> PublicKey:
    """Parse a Multikey ``publicKeyMultibase`` (``zQ3s...`` k256, ``zDna...`` p256)."""
    data = _multibase_b58_decode(s)
    if len(data) < 3:
        raise InvalidKey("multikey too short")
    prefix, body = data[:2], data[2:]
    if prefix == _MC_K256:
        curve = K256
    elif prefix == _MC_P256:
        curve = P256
    else:
        raise InvalidKey("unsupported key type (unknown multicodec prefix)")
    if len(body) != 33 or body[0] not in (2, 3):
        raise InvalidKey(f"multikey must hold a 33-byte compressed key (got {len(body)} bytes)")
    return parse_public_bytes(curve, body)


def parse_did_key(s: str) -> PublicKey:
    """Parse ``did:key:z...`` (k256 or p256)."""
    if not isinstance(s, str) or not s.startswith("did:key:z"):
        raise InvalidKey(f"not a did:key: {s!r}"[:120])
    return parse_multikey(s[8:])


def key_from_verification_method(vm: dict, did: str | None = None) -> PublicKey:
    """Parse a DID document verification method into a key.

    ``Multikey`` uses the multicodec form; the legacy ``EcdsaSecp256{k,r}1VerificationKey2019``
    types carry the raw SEC1 point (compressed or uncompressed) in base58btc. When ``did`` is given,
    the method's ``controller`` must equal it (as atproto DID-document parsing requires).
    """
    if not isinstance(vm, dict):
        raise InvalidKey("verification method must be an object")
    if did is not None and vm.get("controller") != did:
        raise InvalidKey("verification method controller does not match the DID")
    typ = vm.get("type")
    mb = vm.get("publicKeyMultibase")
    if not isinstance(mb, str):
        raise InvalidKey("verification method has no publicKeyMultibase")
    if typ == "Multikey":
        return parse_multikey(mb)
    curve = _LEGACY_TYPES.get(typ)
    if curve is None:
        raise InvalidKey(f"unsupported verification method type {typ!r}")
    return _parse_legacy(curve, mb)


@lru_cache(maxsize=1 << 16)
def _parse_legacy(curve: str, mb: str) -> PublicKey:
    return parse_public_bytes(curve, _multibase_b58_decode(mb))


# ---------------------------------------------------------------- private keys (tests, benchmarks)


class PrivateKey:
    """A signing key for tests and benchmarks: ``sign(data)`` returns a 64-byte low-S compact signature."""

    __slots__ = ("curve", "_k256", "_p256", "public_key")

    def __init__(self, curve: str, secret: bytes) -> None:
        if len(secret) != 32:
            raise InvalidKey("private key must be 32 bytes")
        self.curve = curve
        self._k256 = self._p256 = None
        if curve == K256:
            try:
                self._k256 = coincurve.PrivateKey(secret)
            except Exception as e:
                raise InvalidKey(f"invalid secp256k1 private key: {e}") from None
            pub = self._k256.public_key.format(compressed=True)
        elif curve == P256:
            try:
                self._p256 = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
            except Exception as e:
                raise InvalidKey(f"invalid P-256 private key: {e}") from None
            pub = self._p256.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        else:
            raise InvalidKey(f"unsupported curve {curve!r}")
        self.public_key: PublicKey = parse_public_bytes(curve, pub)

    @classmethod
    def generate(cls, curve: str = K256) -> "PrivateKey":
        if curve == K256:
            return cls(K256, coincurve.PrivateKey().secret)
        if curve == P256:
            k = ec.generate_private_key(ec.SECP256R1())
            return cls(P256, k.private_numbers().private_value.to_bytes(32, "big"))
        raise InvalidKey(f"unsupported curve {curve!r}")

    @classmethod
    def from_bytes(cls, curve: str, secret: bytes) -> "PrivateKey":
        return cls(curve, secret)

    def secret(self) -> bytes:
        if self._k256 is not None:
            return self._k256.secret
        return self._p256.private_numbers().private_value.to_bytes(32, "big")

    def sign(self, data: bytes) -> bytes:
        """ECDSA over sha256(data), as 64-byte compact r || s with low S."""
        if self._k256 is not None:
            # libsecp256k1 always produces low-S; recoverable form is r || s || recid.
            return self._k256.sign_recoverable(data)[:64]
        r, s = decode_dss_signature(self._p256.sign(data, _ECDSA_SHA256))
        if s > _HALF_N_P256:
            s = _N_P256 - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"PrivateKey({self.curve}, public={self.public_key.did_key()})"
