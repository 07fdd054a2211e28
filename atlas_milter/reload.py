"""Owns what the daemons' reloads have in common: the reload signal (SIGUSR1, as OpenDKIM
does, because libmilter's own signal thread takes SIGHUP as "stop"), the thread that waits
for it, systemd's RELOADING=1 / READY=1 around a reload, and reporting the outcome: one log
line, the counters `reload.ok` / `reload.failed` and the gauge `reload.failing` (1 while
the last reload failed, 0 after a good one), which reach StatsD so an alert can fire.

What a reload re-reads and swaps is the daemon's business: it passes a callable that
either puts the new state in force and describes it, or raises and leaves the old state
untouched. Reloads never overlap (one lock for the process).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from atlas_milter.errors import AtlasError
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.notify import sd_notify
from atlas_milter.signals import RELOAD_SIGNAL, wait

log = logging.getLogger(__name__)

COUNTER_RELOAD_OK = "reload.ok"
COUNTER_RELOAD_FAILED = "reload.failed"
GAUGE_RELOAD_FAILING = "reload.failing"

_one_at_a_time = threading.Lock()


def run_reload(who: str, apply: Callable[[], str], metrics: PerformanceMetrics) -> bool:
    """Run one reload of daemon `who`: `apply()` returns what is now in force (for the log
    line) or raises, in which case the old state stays. True when the reload took."""
    with _one_at_a_time:
        started = time.perf_counter()
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
        try:
            what = apply()
        except Exception as exc:
            detail = str(exc) if isinstance(exc, AtlasError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, AtlasError):  # a bug, not a bad file: keep its traceback at debug
                log.debug("%s reload failed", who, exc_info=True)
            metrics.incr(COUNTER_RELOAD_FAILED)
            metrics.set_gauge(GAUGE_RELOAD_FAILING, 1)
            log.error("%s reload failed: %s; still running with the previous configuration and model", who, detail)
            sd_notify(f"READY=1\nSTATUS=last reload failed: {detail[:200]}")
            return False
        took_ms = (time.perf_counter() - started) * 1000.0
        metrics.incr(COUNTER_RELOAD_OK)
        metrics.set_gauge(GAUGE_RELOAD_FAILING, 0)
        log.info("%s reloaded in %.1f ms: %s", who, took_ms, what)
        sd_notify(f"READY=1\nSTATUS=reloaded: {what[:200]}")
        return True


def start_reload_thread(on_signal: Callable[[], object], signals: Iterable[int] = (RELOAD_SIGNAL,)) -> threading.Thread:
    """A daemon thread that waits for `signals` and calls `on_signal()` for each (several
    arriving during one reload count once). The signals must be blocked in every thread
    (pthread_sigmask before any thread starts), or one may kill the process instead."""
    wanted = set(signals)

    def loop() -> None:
        while True:
            wait(wanted)
            try:
                on_signal()
            except Exception:  # on_signal reports its own failures; this is a last resort
                log.exception("reload handler failed")

    thread = threading.Thread(target=loop, name="atlas-reload", daemon=True)
    thread.start()
    return thread
