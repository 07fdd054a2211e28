"""Owns the verdict cache: a TTL + LRU cache behind one lock, with hit/miss/eviction
counts. Thread-safe. The only module that imports `cachetools`. Knows nothing about how
verdicts are computed, and must not parse messages or compute digests itself.

The key is (sender, subject, body digest), normalised: sender lowercased and stripped,
subject with runs of whitespace collapsed to one space. The body digest is in the key
because sender + subject alone do not identify a message: a mailing list or a
notification sender repeats one subject with different bodies, and a spammer can reuse
a legitimate sender and subject; keyed on those two alone, the cache would hand one
message's verdict to a different message. The caller passes the digest of the
normalised body (`message.py` computes it). `body_digest=None` is accepted for the old
API; then only sender + subject identify the message, with the risk above.

Hits and misses are also counted in `atlas_milter.monitor` (`cache.hit`, `cache.miss`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable

import cachetools

from atlas_milter.monitor import COUNTER_CACHE_HIT, COUNTER_CACHE_MISS, PerformanceMetrics

CacheKey = tuple[str, str, "str | None"]


def make_key(sender: str | None, subject: str | None, body_digest: str | None = None) -> CacheKey:
    return ((sender or "").strip().lower(), " ".join((subject or "").split()), body_digest)


class _CountingTTLCache(cachetools.TTLCache):
    """A TTLCache that reports every item it drops: LRU evictions and expirations."""

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float], on_evict: Callable[[int], None]):
        super().__init__(maxsize, ttl, timer=timer)
        self._on_evict = on_evict

    def expire(self, time: float | None = None) -> list[tuple[Hashable, Any]]:
        expired = super().expire(time)
        if expired:
            self._on_evict(len(expired))
        return expired

    def popitem(self) -> tuple[Hashable, Any]:
        # TTLCache.popitem first calls expire() (counted there), then drops the LRU item.
        item = super().popitem()
        self._on_evict(1)
        return item


class ClassificationCache:
    """Verdicts by (sender, subject, body digest) for `ttl` seconds, at most `maxsize`."""

    def __init__(self, maxsize: int = 10000, ttl: float = 3600.0, timer: Callable[[], float] = time.monotonic):
        self.maxsize = maxsize
        self.ttl = ttl
        self._timer = timer
        self._lock = threading.Lock()
        self._cache = self._new_store()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def _new_store(self) -> _CountingTTLCache:
        return _CountingTTLCache(self.maxsize, self.ttl, self._timer, self._count_evictions)

    def _count_evictions(self, n: int) -> None:
        self.evictions += n  # called with self._lock held

    def get(self, sender: str | None, subject: str | None, body_digest: str | None = None) -> Any | None:
        key = make_key(sender, subject, body_digest)
        with self._lock:
            result = self._cache.get(key)
            if result is None:
                self.misses += 1
            else:
                self.hits += 1
        PerformanceMetrics.get_instance().incr(COUNTER_CACHE_MISS if result is None else COUNTER_CACHE_HIT)
        return result

    def set(self, sender: str | None, subject: str | None, result: Any, body_digest: str | None = None) -> None:
        if result is None or self.maxsize <= 0:
            return  # None reads back as a miss anyway; maxsize 0 means cache nothing
        key = make_key(sender, subject, body_digest)
        with self._lock:
            self._cache[key] = result

    def clear(self) -> None:
        """Drop every entry (e.g. after a new model is loaded). Not counted as evictions;
        the hit/miss/eviction counts are kept."""
        with self._lock:
            self._cache = self._new_store()

    def stats(self) -> dict[str, float]:
        with self._lock:
            size = len(self._cache)  # len() also expires stale items, so evictions are current
            hits, misses, evictions = self.hits, self.misses, self.evictions
        lookups = hits + misses
        return {
            "size": size,
            "maxsize": self.maxsize,
            "ttl": self.ttl,
            "hits": hits,
            "misses": misses,
            "evictions": evictions,
            "hit_rate": hits / lookups if lookups else 0.0,
        }


# The process-wide instance behind the module functions (replaced by configure_cache).
_default_cache = ClassificationCache()


def get_cache() -> ClassificationCache:
    return _default_cache


def configure_cache(maxsize: int, ttl: float) -> ClassificationCache:
    """Replace the process-wide cache with an empty one of this size and TTL."""
    global _default_cache
    _default_cache = ClassificationCache(maxsize, ttl)
    return _default_cache


def get_classification_cache(sender: str | None, subject: str | None, body_digest: str | None = None) -> Any | None:
    """The cached result for this message, or None."""
    return _default_cache.get(sender, subject, body_digest)


def set_classification_cache(
    sender: str | None, subject: str | None, result: Any, body_digest: str | None = None
) -> None:
    _default_cache.set(sender, subject, result, body_digest)
