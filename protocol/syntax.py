"""atproto identifier syntax: DID, handle, NSID, record key, TID, AT-URI, datetime, CID, language.

The rules are the ones Tap (Go, indigo ``atproto/syntax``) applies, checked against the
atproto interop fixtures, so that we accept and reject the same firehose frames and
record paths. Each kind has ``is_valid_X(s) -> bool`` (cheap, for hot paths) and
``ensure_X(s) -> s`` raising :class:`InvalidSyntax`.

Regexes are precompiled and applied with ``fullmatch`` (Python's ``$`` would also match
before a trailing newline, Go's does not). Length limits are in bytes, as in Go; every
pattern is ASCII-only, so a non-ASCII string fails the pattern before a length could
differ.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "InvalidSyntax",
    "is_valid_did",
    "ensure_did",
    "is_valid_handle",
    "ensure_handle",
    "is_valid_nsid",
    "ensure_nsid",
    "is_valid_collection",
    "ensure_collection",
    "is_valid_record_key",
    "ensure_record_key",
    "is_valid_tid",
    "ensure_tid",
    "is_valid_at_identifier",
    "ensure_at_identifier",
    "is_valid_at_uri",
    "ensure_at_uri",
    "is_valid_datetime",
    "ensure_datetime",
    "parse_datetime",
    "is_valid_cid_syntax",
    "ensure_cid_syntax",
    "is_valid_language",
    "ensure_language",
    "is_valid_uri",
    "ensure_uri",
    "split_repo_path",
    "HANDLE_INVALID",
]

HANDLE_INVALID = "handle.invalid"


class InvalidSyntax(ValueError):
    """A string that is not a valid atproto identifier of the expected kind."""


# --- DID ---------------------------------------------------------------------------------

_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")


def is_valid_did(s: str) -> bool:
    """DID syntax (any method). did:plc has a fast path: it is most of the network."""
    if not isinstance(s, str):
        return False
    if len(s) == 32 and s.startswith("did:plc:") and s.isascii() and s[8:].isalnum():
        return True
    return 0 < len(s) <= 2048 and _DID_RE.fullmatch(s) is not None


def ensure_did(s: str) -> str:
    if not is_valid_did(s):
        raise InvalidSyntax(f"invalid DID: {s!r}")
    return s


# --- handle ------------------------------------------------------------------------------

_HANDLE_RE = re.compile(
    r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)


def is_valid_handle(s: str) -> bool:
    """Handle syntax (a DNS name with a non-numeric TLD). ``handle.invalid`` is syntactically valid."""
    if not isinstance(s, str):
        return False
    return 0 < len(s) <= 253 and _HANDLE_RE.fullmatch(s) is not None


def ensure_handle(s: str) -> str:
    if not is_valid_handle(s):
        raise InvalidSyntax(f"invalid handle: {s!r}")
    return s


# --- NSID / collection -------------------------------------------------------------------

_NSID_RE = re.compile(
    r"[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"(\.[a-zA-Z]([a-zA-Z0-9]{0,62})?)"
)


@lru_cache(maxsize=4096)
def _nsid_ok(s: str) -> bool:
    return 0 < len(s) <= 317 and _NSID_RE.fullmatch(s) is not None


def is_valid_nsid(s: str) -> bool:
    """NSID syntax: reversed domain authority plus a name segment (no hyphen in the name).

    Cached: every op of every commit names a collection, and there are few distinct ones.
    """
    if not isinstance(s, str):
        return False
    return _nsid_ok(s)


def ensure_nsid(s: str) -> str:
    if not is_valid_nsid(s):
        raise InvalidSyntax(f"invalid NSID: {s!r}")
    return s


def is_valid_collection(s: str) -> bool:
    """A repo collection is an NSID (what Go's ``ParseRepoPath`` requires of the first segment)."""
    return is_valid_nsid(s)


def ensure_collection(s: str) -> str:
    if not is_valid_nsid(s):
        raise InvalidSyntax(f"invalid collection NSID: {s!r}")
    return s


# --- record key --------------------------------------------------------------------------

_RKEY_RE = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")


def is_valid_record_key(s: str) -> bool:
    """Record key syntax: 1-512 of ``[a-zA-Z0-9_~.:-]``, but not ``.`` or ``..``."""
    if not isinstance(s, str):
        return False
    return s != "." and s != ".." and _RKEY_RE.fullmatch(s) is not None


def ensure_record_key(s: str) -> str:
    if not is_valid_record_key(s):
        raise InvalidSyntax(f"invalid record key: {s!r}")
    return s


# --- TID ---------------------------------------------------------------------------------

_TID_FIRST = "234567abcdefghij"  # the first character keeps the top bit zero
_TID_CHARS = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable


def is_valid_tid(s: str) -> bool:
    """TID syntax: 13 chars of base32-sortable, first char keeps the top bit zero.

    A set test (``strip``) rather than a regex: every ``#commit`` checks its rev.
    """
    if not isinstance(s, str):
        return False
    return len(s) == 13 and s[0] in _TID_FIRST and not s.strip(_TID_CHARS)


def ensure_tid(s: str) -> str:
    if not is_valid_tid(s):
        raise InvalidSyntax(f"invalid TID: {s!r}")
    return s


# --- AT identifier and AT-URI ------------------------------------------------------------


def is_valid_at_identifier(s: str) -> bool:
    """A DID (if it starts with ``did:``) or else a handle."""
    if not isinstance(s, str):
        return False
    if s.startswith("did:"):
        return is_valid_did(s)
    return is_valid_handle(s)


def ensure_at_identifier(s: str) -> str:
    if not is_valid_at_identifier(s):
        raise InvalidSyntax(f"invalid AT identifier: {s!r}")
    return s


_ATURI_RE = re.compile(r"at://([a-zA-Z0-9._:%-]+)(/([a-zA-Z0-9-.]+)(/([a-zA-Z0-9_~.:-]{1,512}))?)?")


def is_valid_at_uri(s: str) -> bool:
    """AT-URI as Go parses it: ``at://authority[/collection[/rkey]]``, no query or fragment."""
    if not isinstance(s, str):
        return False
    if len(s) > 8192:
        return False
    m = _ATURI_RE.fullmatch(s)
    if m is None:
        return False
    if not is_valid_at_identifier(m.group(1)):
        return False
    coll = m.group(3)
    if coll and not is_valid_nsid(coll):
        return False
    rkey = m.group(5)
    if rkey and not is_valid_record_key(rkey):
        return False
    return True


def ensure_at_uri(s: str) -> str:
    if not is_valid_at_uri(s):
        raise InvalidSyntax(f"invalid AT-URI: {s!r}")
    return s


# --- repo path ---------------------------------------------------------------------------


def split_repo_path(path: str) -> tuple[str, str]:
    """``"collection/rkey"`` -> ``(collection, rkey)``; exactly one slash, valid NSID and record key."""
    if not isinstance(path, str):
        raise InvalidSyntax(f"invalid repo path: {path!r}")
    coll, sep, rkey = path.partition("/")
    if not sep or "/" in rkey:
        raise InvalidSyntax(f"repo path must be collection/rkey: {path!r}")
    if not is_valid_nsid(coll):
        raise InvalidSyntax(f"repo path collection is not an NSID: {path!r}")
    if not is_valid_record_key(rkey):
        raise InvalidSyntax(f"repo path record key is invalid: {path!r}")
    return coll, rkey


# --- datetime ----------------------------------------------------------------------------

# Go's regex has an unescaped "." before the fraction; in effect Go also takes "," there
# (time.Parse accepts a comma). We follow the spec and the TS implementation: "." only.
_DATETIME_RE = re.compile(
    r"([0-9]{4})-([01][0-9])-([0-3][0-9])T([0-2][0-9]):([0-6][0-9]):([0-6][0-9])"
    r"(\.[0-9]{1,20})?(Z|([+-])([0-2][0-9]):([0-5][0-9]))"
)
_HAS_TZ_RE = re.compile(r".*(([+-][0-9][0-9]:?[0-9][0-9])|[a-zA-Z])")
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


# The form nearly every event's ``time`` has (UTC, a day of the month up to 28, which every month
# of every year has): one match accepts it; anything else, valid or not, takes the full check.
_DATETIME_FAST_RE = re.compile(
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,20})?Z"
)
_datetime_fast = _DATETIME_FAST_RE.fullmatch


def is_valid_datetime(s: str) -> bool:
    """atproto datetime: RFC 3339 / ISO 8601 intersection, timezone required, real calendar date.

    Beyond the pattern, rejects what Go's ``time.Parse`` rejects (month 13, day 31 of a
    30-day month, hour 24, second 60 ...) and instants before 0000-01-01T00:00:00Z.
    """
    if not isinstance(s, str):
        return False
    if _datetime_fast(s) is not None:  # every #commit checks its time: skip the calendar arithmetic
        return True
    return _is_valid_datetime_full(s)


def _is_valid_datetime_full(s: str) -> bool:
    """``is_valid_datetime`` without the fast path (tests check the fast path accepts no more)."""
    if not 0 < len(s) <= 64:
        return False
    m = _DATETIME_RE.fullmatch(s)
    if m is None:
        return False
    year, month, day, hour, minute, second, _, _, sign, tz_h, tz_m = m.groups()  # one call: every #commit
    month = int(month)
    day = int(day)
    if not 1 <= month <= 12:
        return False
    year = int(year)
    dim = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month]
    hour = int(hour)
    minute = int(minute)
    second = int(second)
    if not 1 <= day <= dim or hour > 23 or minute > 59 or second > 59:
        return False
    if sign is not None:
        if s.endswith("-00:00"):
            return False  # ISO 8601 forbids "-00:00" for UTC
        tz_h, tz_m = int(tz_h), int(tz_m)
        if tz_h > 24:  # Go's time.Parse takes offsets up to 24 hours
            return False
        if year == 0 and sign == "+":
            day_of_year = sum(_DAYS_IN_MONTH[1:month]) + (1 if month > 2 else 0) + day - 1  # year 0 is leap
            local = ((day_of_year * 24 + hour) * 60 + minute) * 60 + second
            if local < (tz_h * 60 + tz_m) * 60:
                return False  # before year zero once normalized to UTC
    return True


def ensure_datetime(s: str) -> str:
    if not is_valid_datetime(s):
        raise InvalidSyntax(f"invalid datetime: {s!r}")
    return s


def parse_datetime(s: str, lenient: bool = False) -> str:
    """Validate a datetime and return it (normalized when ``lenient``); raises ``InvalidSyntax``.

    Lenient mode mirrors Go's ``ParseDatetimeLenient``: ``-00:00``, ``-0000`` and ``+0000``
    become ``+00:00``, and a missing timezone gets ``Z``. It never rescues a datetime that
    is semantically wrong (month zero, hour 25 ...).
    """
    if not isinstance(s, str):
        raise InvalidSyntax(f"invalid datetime: {s!r}")
    if is_valid_datetime(s):
        return s
    if lenient:
        for bad in ("-00:00", "-0000", "+0000"):
            if s.endswith(bad):
                return ensure_datetime(s.replace(bad, "+00:00", 1))
        if _HAS_TZ_RE.fullmatch(s) is None and is_valid_datetime(s + "Z"):
            return s + "Z"
    raise InvalidSyntax(f"invalid datetime: {s!r}")


# --- CID (string syntax only) ------------------------------------------------------------

_CID_RE = re.compile(r"[a-zA-Z0-9+=]{8,256}")


def is_valid_cid_syntax(s: str) -> bool:
    """Loose CID string syntax (as Go's ``syntax.ParseCID``): 8-256 of ``[a-zA-Z0-9+=]``, not CIDv0 ``Qmb...``.

    Syntax only: decoding (and the atproto restriction to CIDv1 sha2-256) is
    ``protocol.cid.cid_from_str``.
    """
    if not isinstance(s, str):
        return False
    return _CID_RE.fullmatch(s) is not None and not s.startswith("Qmb")


def ensure_cid_syntax(s: str) -> str:
    if not is_valid_cid_syntax(s):
        raise InvalidSyntax(f"invalid CID syntax: {s!r}")
    return s


# --- language ----------------------------------------------------------------------------

_LANG_RE = re.compile(r"(i|[a-z]{2,3})(-[a-zA-Z0-9]+)*|[xX](-[a-zA-Z0-9]+)+")


def is_valid_language(s: str) -> bool:
    """BCP 47 language tag, loose syntax as Go checks it, plus a private-use-only tag (``x-...``).

    No registry and no duplicate-subtag check (``de-DE-1901-1901`` passes, as in Go).
    """
    if not isinstance(s, str):
        return False
    return 0 < len(s) <= 128 and _LANG_RE.fullmatch(s) is not None


def ensure_language(s: str) -> str:
    if not is_valid_language(s):
        raise InvalidSyntax(f"invalid language tag: {s!r}")
    return s


# --- generic URI (lexicon string format "uri") ---------------------------------------------

_URI_RE = re.compile(r"[a-z][a-z.-]{0,80}:[!-~]+")


def is_valid_uri(s: str) -> bool:
    """Generic URI, loosely: a lowercase scheme, a colon, then printable ASCII without spaces."""
    if not isinstance(s, str):
        return False
    return 0 < len(s) <= 8192 and _URI_RE.fullmatch(s) is not None


def ensure_uri(s: str) -> str:
    if not is_valid_uri(s):
        raise InvalidSyntax(f"invalid URI: {s!r}")
    return s
