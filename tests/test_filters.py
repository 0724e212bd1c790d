"""Collection filters (spec §8.6)."""

from operators.filters import CollectionFilter


def test_empty_matches_everything():
    f = CollectionFilter([])
    assert f.matches_all
    assert f("app.bsky.feed.post") and f("x.y.z") and f("")


def test_exact_and_prefix():
    f = CollectionFilter(["app.bsky.feed.*", "com.example.thing"])
    assert f("app.bsky.feed.post")
    assert f("app.bsky.feed.like")
    assert not f("app.bsky.graph.follow")
    assert f("com.example.thing")
    assert not f("com.example.thing2")
    assert not f("com.example")
    assert not f.matches_all


def test_star_alone_matches_all():
    assert CollectionFilter(["*"]).matches_all
    assert CollectionFilter(["com.x.y", "*"])("anything.at.all")


def test_wildcard_not_limited_to_period_boundary_like_tap():
    f = CollectionFilter(["app.bsky*"])
    assert f("app.bskyx.y")
    assert f("app.bsky.feed.post")


def test_items_trimmed_and_empty_items_ignored():
    f = CollectionFilter([" app.bsky.feed.post ", "", "  "])
    assert f.patterns == ("app.bsky.feed.post",)
    assert f("app.bsky.feed.post")
    assert not f("app.bsky.feed.like")


def test_path_matches_and_memo_consistent():
    f = CollectionFilter(["app.bsky.feed.post"])
    for _ in range(3):
        assert f.path_matches("app.bsky.feed.post/3k2abc")
        assert not f.path_matches("app.bsky.feed.like/3k2abc")


def test_memo_is_bounded():
    from operators import filters

    f = CollectionFilter(["a.b.*"])
    for i in range(filters._CACHE_LIMIT + 10):
        f(f"x.y.c{i}")
    assert len(f._memo) <= filters._CACHE_LIMIT
    assert f("a.b.c")
