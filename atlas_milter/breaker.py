"""Owns the circuit breaker in front of a shared server (Redis, PostgreSQL): after a failure,
calls are kept away for a cool-down, then one may try again. Each change of state is
logged once (never a line per message or per call); the caller counts and gauges.

Threads: any thread may use a Breaker.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Breaker:
    """Closed: calls go through. A failure opens it for `cooldown` seconds (calls fail at
    once); then one call may try (half-open): success closes it, failure opens it again."""

    def __init__(self, cooldown: float, name: str = "redis", while_down: str = "classifying with the local model, "
                 "learns wait in the outbox", when_back: str = "shipping what waited") -> None:
        self.cooldown = cooldown
        self.name = name
        self.while_down = while_down
        self.when_back = when_back
        self.quiet = False  # True: no log lines (a one-shot caller reports the failure itself)
        self.open_until = 0.0
        self.is_open = False
        self.opened = 0  # times it opened (counted)
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            return not self.is_open or time.monotonic() >= self.open_until

    def success(self) -> None:
        with self._lock:
            if self.is_open:
                self.is_open = False
                if not self.quiet:
                    log.warning("%s is back; %s", self.name, self.when_back)

    def failure(self, why: str) -> None:
        with self._lock:
            self.open_until = time.monotonic() + self.cooldown
            if not self.is_open:
                self.is_open = True
                self.opened += 1
                if not self.quiet:
                    log.warning("%s unreachable (%s); %s", self.name, why, self.while_down)
