"""protocol.syntax against every line of the atproto interop syntax fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import syntax as sx
from protocol.syntax import InvalidSyntax

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # pragma: no cover - layout fallback
    SHARED = Path("/work/shared")
SYNTAX = SHARED / "fixtures" / "atproto-interop" / "syntax"


def _lines(name: str) -> list[str]:
    """Fixture lines as Go's test reads them: only the newline is stripped (leading and
    trailing spaces are part of the case); blank lines and ``#`` comments are skipped."""
    out = []
    for line in (SYNTAX / name).read_text(encoding="utf-8").split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        if not line or line.startswith("#"):
            continue
        out.append(line)
    assert out, name
    return out


KINDS = {
    "did": (sx.is_valid_did, sx.ensure_did),
    "handle": (sx.is_valid_handle, sx.ensure_handle),
    "nsid": (sx.is_valid_nsid, sx.ensure_nsid),
    "recordkey": (sx.is_valid_record_key, sx.ensure_record_key),
    "tid": (sx.is_valid_tid, sx.ensure_tid),
    "aturi": (sx.is_valid_at_uri, sx.ensure_at_uri),
    "atidentifier": (sx.is_valid_at_identifier, sx.ensure_at_identifier),
    "datetime": (sx.is_valid_datetime, sx.ensure_datetime),
    "cid": (sx.is_valid_cid_syntax, sx.ensure_cid_syntax),
    "language": (sx.is_valid_language, sx.ensure_language),
    "uri": (sx.is_valid_uri, sx.ensure_uri),
}


def _cases(suffix: str) -> list[tuple[str, str]]:
    return [(kind, line) for kind in KINDS for line in _lines(f"{kind}_syntax_{suffix}.txt")]


VALID = _cases("valid")
INVALID = _cases("invalid")


def _id(case: tuple[str, str]) -> str:
    kind, line = case
    return f"{kind}:{line[:60]!r}"


@pytest.mark.parametrize("case", VALID, ids=_id)
def test_valid_fixture(case: tuple[str, str]) -> None:
    kind, line = case
    is_valid, ensure = KINDS[kind]
    assert is_valid(line), line
    assert ensure(line) == line


@pytest.mark.parametrize("case", INVALID, ids=_id)
def test_invalid_fixture(case: tuple[str, str]) -> None:
    kind, line = case
    is_valid, ensure = KINDS[kind]
    assert not is_valid(line), line
    with pytest.raises(InvalidSyntax):
        ensure(line)


def test_fixture_counts() -> None:
    # every file was read; guards against a silently empty parametrization
    assert len(VALID) > 200 and len(INVALID) > 250


@pytest.mark.parametrize("line", _lines("datetime_parse_invalid.txt"))
def test_datetime_semantically_invalid(line: str) -> None:
    """Datetime-shaped but not real instants (month zero, hour 25): rejected strictly and leniently."""
    assert not sx.is_valid_datetime(line)
    with pytest.raises(InvalidSyntax):
        sx.parse_datetime(line)
    with pytest.raises(InvalidSyntax):
        sx.parse_datetime(line, lenient=True)


@pytest.mark.parametrize("line", _lines("datetime_syntax_valid.txt"))
def test_parse_datetime_returns_valid_unchanged(line: str) -> None:
    assert sx.parse_datetime(line) == line
    assert sx.parse_datetime(line, lenient=True) == line


@pytest.mark.parametrize(
    "raw,expected",
    [  # Go's TestParseDatetimeLenient cases, with what ParseDatetimeLenient returns
        ("1985-04-12T23:20:50.123Z", "1985-04-12T23:20:50.123Z"),
        ("1985-04-12T23:20:50.123", "1985-04-12T23:20:50.123Z"),
        ("2023-08-27T19:07:00.186173", "2023-08-27T19:07:00.186173Z"),
        ("1985-04-12T23:20:50.123-00:00", "1985-04-12T23:20:50.123+00:00"),
        ("1985-04-12T23:20:50.123+00:00", "1985-04-12T23:20:50.123+00:00"),
        ("1985-04-12T23:20:50.123+0000", "1985-04-12T23:20:50.123+00:00"),
        ("1985-04-12T23:20:50.123-0000", "1985-04-12T23:20:50.123+00:00"),
        ("2023-11-12T11:20:01+0000", "2023-11-12T11:20:01+00:00"),
    ],
)
def test_parse_datetime_lenient(raw: str, expected: str) -> None:
    assert sx.parse_datetime(raw, lenient=True) == expected


@pytest.mark.parametrize("raw", ["1985-04-", "", "blah", "1985-04-12T23:20:50.123+05", "1985-13-12T23:20:50"])
def test_parse_datetime_lenient_invalid(raw: str) -> None:
    with pytest.raises(InvalidSyntax):
        sx.parse_datetime(raw, lenient=True)


def test_strict_rejects_what_lenient_fixes() -> None:
    for raw in ("1985-04-12T23:20:50.123", "1985-04-12T23:20:50.123+0000", "1985-04-12T23:20:50.123-00:00"):
        with pytest.raises(InvalidSyntax):
            sx.parse_datetime(raw)


@pytest.mark.parametrize(
    "raw,ok",
    [
        ("2024-02-29T00:00:00Z", True),  # leap year
        ("2023-02-29T00:00:00Z", False),
        ("1900-02-29T00:00:00Z", False),  # not leap (century)
        ("2000-02-29T00:00:00Z", True),  # leap (400)
        ("0000-02-29T00:00:00Z", True),  # year zero is leap (proleptic Gregorian, as Go)
        ("1985-04-31T00:00:00Z", False),
        ("1985-04-12T24:00:00Z", False),
        ("1985-04-12T23:59:60Z", False),  # no leap seconds
        ("1985-04-12T23:20:50.123+24:00", True),  # Go's time.Parse accepts offsets up to 24h
        ("1985-04-12T23:20:50.123+25:00", False),
        ("0000-01-01T00:30:00+00:30", True),  # exactly year zero in UTC
        ("0000-01-01T00:29:59.999+00:30", False),  # before year zero in UTC
        ("0000-01-01T00:00:00-01:00", True),
        ("1985-04-12T23:20:50,123Z", False),  # comma: spec and TS reject (Go would take it)
        ("1985-04-12T23:20:50.123Z\n", False),  # Python's $ would have matched here
    ],
)
def test_datetime_edges(raw: str, ok: bool) -> None:
    assert sx.is_valid_datetime(raw) is ok


def test_language_parse_invalid_is_only_a_registry_rule() -> None:
    """Duplicate subtags are well-formed BCP 47; Go's ParseLanguage (syntax only) accepts them, so do we."""
    for line in _lines("language_parse_invalid.txt"):
        assert sx.is_valid_language(line)


@pytest.mark.parametrize(
    "path,expected",
    [
        ("app.bsky.feed.post/3jzfcijpj2z2a", ("app.bsky.feed.post", "3jzfcijpj2z2a")),
        ("app.bsky.actor.profile/self", ("app.bsky.actor.profile", "self")),
        ("com.example.thing/a:b~c_d.e-f", ("com.example.thing", "a:b~c_d.e-f")),
    ],
)
def test_split_repo_path(path: str, expected: tuple[str, str]) -> None:
    assert sx.split_repo_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "",
        "app.bsky.feed.post",
        "app.bsky.feed.post/",
        "/3jzfcijpj2z2a",
        "app.bsky.feed.post/a/b",
        "app.bsky.feed.post/.",
        "app.bsky.feed.post/..",
        "not an nsid/abc",
        "post/abc",
        "app.bsky.feed.post/a b",
        "app.bsky.feed.post/" + "a" * 513,
        None,
        b"app.bsky.feed.post/abc",
    ],
)
def test_split_repo_path_invalid(path) -> None:
    with pytest.raises(InvalidSyntax):
        sx.split_repo_path(path)


def test_collection_is_nsid() -> None:
    assert sx.is_valid_collection("app.bsky.feed.post")
    assert not sx.is_valid_collection("app.bsky.feed.post/abc")
    assert sx.ensure_collection("com.example.fooBar") == "com.example.fooBar"
    with pytest.raises(InvalidSyntax):
        sx.ensure_collection("com.example")


@pytest.mark.parametrize("fn", [f for f, _ in KINDS.values()])
def test_non_strings_are_invalid(fn) -> None:
    for bad in (None, 123, b"did:plc:abc", ["x"]):
        assert fn(bad) is False


def test_did_plc_fast_path_agrees_with_regex() -> None:
    for s in ("did:plc:ewvi7nxzyoun6zhxrhs64oiz", "did:plc:EWVI7NXZYOUN6ZHXRHS64OIZ", "did:plc:ewvi7nxzyoun6zhxrhs64oi_"):
        assert sx.is_valid_did(s) == (sx._DID_RE.fullmatch(s) is not None)
    assert not sx.is_valid_did("did:plc:ewvi7nxzyoun6zhxrhs64oi\u0661")  # non-ASCII digit is alnum in Python


def test_invalid_syntax_is_value_error() -> None:
    assert issubclass(InvalidSyntax, ValueError)


def test_datetime_fast_path_accepts_only_valid() -> None:
    """The one-regex fast path of ``is_valid_datetime`` takes a subset of what the full check takes:
    every month/day/hour/minute/second in and out of range, leap and century years, fractions."""
    taken = 0
    for year in ("0000", "1900", "2000", "2023", "2024"):
        for month in range(0, 14):
            for day in range(0, 33):
                for hms in ("00:00:00", "23:59:59", "24:00:00", "23:60:00", "23:59:60", "19:07:00.186173"):
                    s = f"{year}-{month:02d}-{day:02d}T{hms}Z"
                    if sx._DATETIME_FAST_RE.fullmatch(s) is not None:
                        taken += 1
                        assert sx._is_valid_datetime_full(s), s
                    assert sx.is_valid_datetime(s) is sx._is_valid_datetime_full(s), s
    assert taken > 1000  # the fast path takes the common form
