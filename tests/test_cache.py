import threading

import pytest

from atlas_milter import cache
from atlas_milter.cache import ClassificationCache
from atlas_milter.verdict import SPAM, Verdict


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_and_miss_are_counted(metrics):
    c = ClassificationCache()
    verdict = Verdict(SPAM, 0.99)
    assert c.get("a@example.org", "Hello", "d1") is None
    c.set("a@example.org", "Hello", verdict, "d1")
    assert c.get("a@example.org", "Hello", "d1") is verdict
    stats = c.stats()
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 1, 1)
    assert stats["hit_rate"] == pytest.approx(0.5)
    assert metrics.get_counters() == {"cache.hit": 1, "cache.miss": 1}


def test_key_is_normalised():
    c = ClassificationCache()
    c.set("  Alice@Example.ORG ", "Your   invoice\n\tis ready", "v", "d")
    assert c.get("alice@example.org", "Your invoice is ready", "d") == "v"
    assert c.get("alice@example.org", "your invoice is ready", "d") is None  # subject case matters


def test_different_body_digest_is_a_miss():
    c = ClassificationCache()
    c.set("list@example.org", "Weekly digest", "ham-verdict", "digest-1")
    assert c.get("list@example.org", "Weekly digest", "digest-2") is None
    assert c.get("list@example.org", "Weekly digest") is None  # old API: no digest is its own key
    c.set("list@example.org", "Weekly digest", "old-api", None)
    assert c.get("list@example.org", "Weekly digest") == "old-api"
    assert c.get("list@example.org", "Weekly digest", "digest-1") == "ham-verdict"


def test_size_bound_evictions_are_counted():
    c = ClassificationCache(maxsize=3)
    for i in range(5):
        c.set("s", f"subject {i}", i, "d")
    stats = c.stats()
    assert stats["size"] == 3
    assert stats["evictions"] == 2
    assert c.get("s", "subject 0", "d") is None  # least recently used went first
    assert c.get("s", "subject 4", "d") == 4


def test_ttl_expiry_with_fake_clock():
    clock = FakeClock()
    c = ClassificationCache(maxsize=10, ttl=60.0, timer=clock)
    c.set("s", "a", "va", "d")
    clock.now += 30
    c.set("s", "b", "vb", "d")
    clock.now += 29.9
    assert c.get("s", "a", "d") == "va"
    clock.now += 0.2  # "a" is now 60.1 s old, "b" 30.1 s
    assert c.get("s", "a", "d") is None
    assert c.get("s", "b", "d") == "vb"
    stats = c.stats()
    assert stats["size"] == 1
    assert stats["evictions"] == 1
    clock.now += 100
    assert c.stats()["evictions"] == 2


def test_clear_empties_but_keeps_counts():
    c = ClassificationCache()
    c.set("s", "a", 1, "d")
    c.get("s", "a", "d")
    c.clear()
    assert c.get("s", "a", "d") is None
    stats = c.stats()
    assert (stats["size"], stats["hits"], stats["misses"], stats["evictions"]) == (0, 1, 1, 0)


def test_zero_maxsize_caches_nothing():
    c = ClassificationCache(maxsize=0)
    c.set("s", "a", 1, "d")
    assert c.get("s", "a", "d") is None


def test_module_functions_use_the_configured_default(monkeypatch):
    monkeypatch.setattr(cache, "_default_cache", cache.get_cache())  # put the original back afterwards
    first = cache.configure_cache(maxsize=2, ttl=10.0)
    assert cache.get_cache() is first
    cache.set_classification_cache("A@x.org", "Hi", "v", body_digest="d")
    assert cache.get_classification_cache("a@x.org", "Hi", body_digest="d") == "v"
    second = cache.configure_cache(maxsize=5, ttl=1.0)
    assert cache.get_cache() is second
    assert cache.get_classification_cache("a@x.org", "Hi", body_digest="d") is None
    assert second.stats()["maxsize"] == 5 and second.stats()["ttl"] == 1.0


def test_threads_hammering_the_cache_keep_consistent_counts():
    c = ClassificationCache(maxsize=50)
    threads_n, per_thread = 8, 2000
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        start.wait()
        try:
            for i in range(per_thread):
                key = f"subject {tid}-{i % 15}"  # per thread, so no two threads store one key
                if c.get("s", key, "d") is None:
                    c.set("s", key, i, "d")
        except BaseException as exc:  # a corrupted linked list shows up as an exception
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = c.stats()
    assert stats["hits"] + stats["misses"] == threads_n * per_thread
    assert stats["size"] <= 50
    # every miss stored one new entry; each is either still there or was evicted
    assert stats["misses"] == stats["size"] + stats["evictions"]
