"""Owns log throttling: the one rule for a failure that may repeat many times a second
(a refused accept, a full queue, a broken model): log it at most once per interval per
kind, and count what was held back so the next line can say so. Thread-safe; knows
nothing about logging itself, callers write their own lines."""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable


class LogThrottle:
    """`due(key)` says whether a line for `key` may be logged now."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval  # seconds between two lines for the same key
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def due(self, key: Hashable = "", force: bool = False) -> int | None:
        """None when a line for `key` went out less than `interval` seconds ago (this one is
        counted as held back). Otherwise the line is due: returns how many were held back
        since the last one (0 the first time) and starts the interval again. `force`: due
        whatever the interval (e.g. a new cause worth reporting at once)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if not force and last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)
