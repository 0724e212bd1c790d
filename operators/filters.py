"""Collection filters (spec/tap-behavior.md §8.6), compiled once.

A filter list is Tap's ``TAP_COLLECTION_FILTERS``: an empty list matches every collection;
an item ending in ``*`` matches any collection that starts with the text before the ``*``
(``app.bsky.*``, ``app.bsky.feed.*``, ``*``); any other item must match exactly. As in Tap,
wildcards are not restricted to period boundaries (``app.bsky*`` matches ``app.bskyx.y``).
Items are trimmed; empty items are ignored.

Example::

    from operators.filters import CollectionFilter
    f = CollectionFilter(["app.bsky.feed.*", "com.example.thing"])
    assert f("app.bsky.feed.post") and not f("app.bsky.graph.follow")
    assert CollectionFilter([]).matches_all

Matching is a set lookup for exact names plus one ``str.startswith`` with a tuple of
prefixes; results are memoised per collection (the network has a few thousand distinct
NSIDs), so the hot path is one dict lookup.
"""

from __future__ import annotations

from typing import Iterable

_CACHE_LIMIT = 100_000


class CollectionFilter:
    """Callable ``collection -> bool``; build once from the configured list."""

    __slots__ = ("_exact", "_prefixes", "_all", "_memo", "patterns")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        pats = tuple(p.strip() for p in patterns if p and p.strip())
        self.patterns: tuple[str, ...] = pats
        self._exact = frozenset(p for p in pats if not p.endswith("*"))
        self._prefixes = tuple(sorted({p[:-1] for p in pats if p.endswith("*")}))
        # "*" (empty prefix) matches everything, as does an empty list
        self._all = not pats or "" in self._prefixes
        self._memo: dict[str, bool] = {}

    @property
    def matches_all(self) -> bool:
        """True when every collection passes (no filters, or a bare ``*``)."""
        return self._all

    def __call__(self, collection: str) -> bool:
        if self._all:
            return True
        hit = self._memo.get(collection)
        if hit is None:
            hit = collection in self._exact or (bool(self._prefixes) and collection.startswith(self._prefixes))
            if len(self._memo) >= _CACHE_LIMIT:
                self._memo.clear()
            self._memo[collection] = hit
        return hit

    matches = __call__

    def path_matches(self, path: str) -> bool:
        """Match a record path ``collection/rkey`` by its collection."""
        return self(path.split("/", 1)[0])

    def __repr__(self) -> str:
        return f"CollectionFilter({list(self.patterns)!r})"
