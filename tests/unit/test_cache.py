import numpy as np
import pytest

from python_backend.features.cache import EntityCache


class FakeTimer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_hit_and_miss_are_counted() -> None:
    cache = EntityCache(timer=FakeTimer())
    cache.put("features:user:a", row(1.0, 2.0))
    found = cache.lookup(["features:user:a", "features:user:b"])
    assert list(found) == ["features:user:a"]
    np.testing.assert_array_equal(found["features:user:a"], row(1.0, 2.0))
    assert (cache.hits, cache.misses) == (1, 1)


def test_missing_entity_is_cached_as_none() -> None:
    cache = EntityCache(timer=FakeTimer())
    cache.put("features:user:ghost", None)
    assert cache.lookup(["features:user:ghost"]) == {"features:user:ghost": None}
    assert cache.hits == 1


def test_entries_expire_after_ttl() -> None:
    timer = FakeTimer()
    cache = EntityCache(ttl_s=5.0, timer=timer)
    cache.put("k", row(1.0))
    cache.put("ghost", None)
    timer.now = 4.9
    assert set(cache.lookup(["k", "ghost"])) == {"k", "ghost"}
    timer.now = 5.0
    assert cache.lookup(["k", "ghost"]) == {}
    assert cache.misses == 2


def test_least_recently_used_entry_is_evicted() -> None:
    cache = EntityCache(max_entities=2, timer=FakeTimer())
    cache.put("a", row(1.0))
    cache.put("b", row(2.0))
    cache.lookup(["a"])  # a is now more recent than b
    cache.put("c", row(3.0))
    assert set(cache.lookup(["a", "b", "c"])) == {"a", "c"}
    assert len(cache) == 2


def test_cached_rows_are_read_only() -> None:
    cache = EntityCache(timer=FakeTimer())
    cache.put("a", row(1.0))
    with pytest.raises(ValueError):
        cache.lookup(["a"])["a"][0] = 5.0


@pytest.mark.parametrize(("size", "ttl"), [(-1, 5.0), (10, -0.5)])
def test_rejects_bad_settings(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        EntityCache(max_entities=size, ttl_s=ttl)


@pytest.mark.parametrize(("size", "ttl"), [(0, 5.0), (10, 0.0)])
def test_zero_size_or_ttl_disables_the_cache(size: int, ttl: float) -> None:
    cache = EntityCache(max_entities=size, ttl_s=ttl, timer=FakeTimer())
    cache.put("a", row(1.0))
    assert cache.lookup(["a", "b"]) == {}
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 0)
