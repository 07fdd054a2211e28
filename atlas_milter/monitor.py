"""Owns performance measurement: the `performance_monitor` timer, the in-process
`PerformanceMetrics` (counts, errors, p50/p95/p99 per stage, counters, gauges) and the
StatsD client. The only module that imports `statsd`.

Must not: decide anything about mail, block or raise on the hot path, or send a network
packet from the caller's thread. `record`/`incr`/`set_gauge` only touch in-memory
structures under one short lock; a daemon flusher thread packs what accumulated into
StatsD pipelines (many metrics per UDP datagram) every `flush_interval` seconds, and on
`flush()`/`shutdown()`. StatsD is fire-and-forget: no server listening is not an error,
a failed send is counted as `statsd.errors`, an unresolvable host disables StatsD with
one warning at configure time.

Threads: any thread may record; the flusher thread owns the StatsD socket.
Until `PerformanceMetrics.configure` (or `configure_from_config`) is called, metrics are kept in memory and StatsD is off.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import statsd

if TYPE_CHECKING:
    from atlas_milter.config import Config

log = logging.getLogger(__name__)

# Stage (timer) names.
STAGE_PARSE = "parse"
STAGE_CACHE_LOOKUP = "cache"
STAGE_CLASSIFY = "classify"
STAGE_STORE_FLUSH = "store.flush"
STAGE_TOTAL = "total"
# Counter names.
COUNTER_CACHE_HIT = "cache.hit"
COUNTER_CACHE_MISS = "cache.miss"
COUNTER_VERDICT_PREFIX = "verdict."  # + verdict kind, see verdict_counter()
COUNTER_STATSD_ERRORS = "statsd.errors"
# Gauge names.
GAUGE_WRITER_QUEUE = "store.queue_depth"
GAUGE_POOL_INFLIGHT = "pool.in_flight"

WINDOW_SIZE = 4096  # most recent samples per stage kept for percentiles
MAX_PENDING = 100_000  # timings waiting for the flusher; the oldest are dropped beyond this
STATSD_MAX_UDP = 1432  # bytes per datagram: fits an Ethernet MTU without fragmenting

F = TypeVar("F", bound=Callable[..., Any])


def verdict_counter(kind: str) -> str:
    """The counter name for one verdict kind, e.g. `verdict.spam`."""
    return COUNTER_VERDICT_PREFIX + kind


class _Stage:
    __slots__ = ("count", "errors", "total", "max", "window")

    def __init__(self, window: int) -> None:
        self.count = 0
        self.errors = 0
        self.total = 0.0
        self.max = 0.0
        self.window: deque[float] = deque(maxlen=window)


class _StatsClient(statsd.StatsClient):
    """statsd's UDP client swallows send errors silently; this one reports them."""

    def __init__(self, on_error: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_error = on_error

    def _send(self, data: str) -> None:
        try:
            self._sock.sendto(data.encode("ascii"), self._addr)
        except (OSError, RuntimeError, UnicodeEncodeError):
            self._on_error()


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile: always a value that was actually observed."""
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def _statsd_name(name: str) -> str:
    # ':', '|' and '@' are separators in the StatsD wire format.
    return name.replace(":", "_").replace("|", "_").replace("@", "_")


class PerformanceMetrics:
    """Per-stage timings, counters and gauges for this process; one instance via
    `get_instance()` (a separate instance is fine in tests)."""

    _instance: ClassVar[PerformanceMetrics | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, window: int = WINDOW_SIZE) -> None:
        self.enabled = True
        self._window = window
        self._lock = threading.Lock()
        self._stages: dict[str, _Stage] = {}
        self._counters: dict[str, int] = {}
        self._gauges: dict[str, float] = {}
        self._started = time.monotonic()
        # What the flusher has not sent yet; only filled while StatsD is on.
        self._to_statsd = False
        self._pending_timings: deque[tuple[str, float]] = deque(maxlen=MAX_PENDING)
        self._pending_counters: dict[str, int] = {}
        self._pending_gauges: dict[str, float] = {}
        self._client: _StatsClient | None = None
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._atexit_registered = False

    @classmethod
    def get_instance(cls) -> PerformanceMetrics:
        inst = cls._instance
        if inst is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
                inst = cls._instance
        return inst

    # -- hot path: memory only ---------------------------------------------------------

    def record(self, name: str, seconds: float, error: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            stage = self._stages.get(name)
            if stage is None:
                stage = self._stages[name] = _Stage(self._window)
            stage.count += 1
            stage.total += seconds
            if seconds > stage.max:
                stage.max = seconds
            if error:
                stage.errors += 1
            stage.window.append(seconds)
            if self._to_statsd:
                self._pending_timings.append((name, seconds))

    def incr(self, name: str, n: int = 1) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n
            if self._to_statsd:
                self._pending_counters[name] = self._pending_counters.get(name, 0) + n

    def set_gauge(self, name: str, value: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._gauges[name] = value
            if self._to_statsd:
                self._pending_gauges[name] = value

    # -- reading -----------------------------------------------------------------------

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per stage: count, errors, mean and max (ms, since start/reset), p50/p95/p99
        (ms, over the last `window` samples) and rate (count per second since start/reset)."""
        with self._lock:
            snapshot = [(name, s.count, s.errors, s.total, s.max, list(s.window)) for name, s in self._stages.items()]
            elapsed = time.monotonic() - self._started
        stats: dict[str, dict[str, float]] = {}
        for name, count, errors, total, maximum, window in snapshot:
            window.sort()
            stats[name] = {
                "count": count,
                "errors": errors,
                "mean": round(total / count * 1000.0, 3),
                "p50": round(_percentile(window, 50) * 1000.0, 3),
                "p95": round(_percentile(window, 95) * 1000.0, 3),
                "p99": round(_percentile(window, 99) * 1000.0, 3),
                "max": round(maximum * 1000.0, 3),
                "rate": round(count / elapsed, 3) if elapsed > 0 else 0.0,
            }
        return stats

    def get_counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def get_gauges(self) -> dict[str, float]:
        with self._lock:
            return dict(self._gauges)

    def reset(self) -> None:
        """Forget the in-memory statistics (not what is still waiting for StatsD)."""
        with self._lock:
            self._stages.clear()
            self._counters.clear()
            self._gauges.clear()
            self._started = time.monotonic()

    def uptime(self) -> float:
        """Seconds since these metrics were started or last reset."""
        return time.monotonic() - self._started

    # -- StatsD ------------------------------------------------------------------------

    def configure(
        self,
        enabled: bool,
        statsd_host: str | None = "127.0.0.1",
        statsd_port: int = 8125,
        prefix: str = "atlas",
        flush_interval: float = 1.0,
    ) -> None:
        """Switch recording on/off and (re)connect StatsD; `statsd_host=None` means none."""
        self.shutdown()
        self.enabled = enabled
        if not (enabled and statsd_host):
            return
        try:
            client = _StatsClient(
                self._count_send_error, statsd_host, statsd_port, prefix=prefix or None, maxudpsize=STATSD_MAX_UDP
            )
        except OSError as exc:  # socket.gaierror: the host does not resolve
            log.warning("statsd: cannot use %s:%s (%s); StatsD disabled", statsd_host, statsd_port, exc)
            return
        stop = threading.Event()
        with self._lock:
            self._client = client
            self._stop = stop
            self._to_statsd = True
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(stop, flush_interval), name="atlas-statsd-flusher", daemon=True
        )
        self._flusher.start()
        if not self._atexit_registered:
            atexit.register(self.shutdown)
            self._atexit_registered = True

    def flush(self) -> None:
        """Send everything recorded since the last flush to StatsD now (no-op without it)."""
        with self._flush_lock:
            with self._lock:
                client = self._client
                if client is None:
                    return
                timings, self._pending_timings = self._pending_timings, deque(maxlen=MAX_PENDING)
                counters, self._pending_counters = self._pending_counters, {}
                gauges, self._pending_gauges = self._pending_gauges, {}
            if not (timings or counters or gauges):
                return
            try:
                pipe = client.pipeline()
                for name, seconds in timings:
                    pipe.timing(_statsd_name(name), seconds * 1000.0)
                for name, n in counters.items():
                    pipe.incr(_statsd_name(name), n)
                for name, value in gauges.items():
                    pipe.gauge(_statsd_name(name), value)
                pipe.send()
            except Exception:  # never let a metrics bug reach the flusher's caller
                log.debug("statsd: flush failed", exc_info=True)
                self._count_send_error()

    def shutdown(self) -> None:
        """Stop the flusher, send what is left and close the StatsD socket."""
        thread = self._flusher
        if thread is not None:
            self._stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
            self._flusher = None
        self.flush()
        with self._lock:
            client, self._client = self._client, None
            self._to_statsd = False
            self._pending_timings.clear()
            self._pending_counters.clear()
            self._pending_gauges.clear()
        if client is not None:
            client.close()

    def _flush_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            self.flush()

    def _count_send_error(self) -> None:
        self.incr(COUNTER_STATSD_ERRORS)


class _StageTimer:
    """What `performance_monitor(name)` returns: a context manager and a decorator."""

    __slots__ = ("name", "_start", "_metrics")

    def __init__(self, name: str) -> None:
        self.name = name
        self._start: float | None = None
        self._metrics = PerformanceMetrics._instance or PerformanceMetrics.get_instance()

    def __enter__(self) -> _StageTimer:
        self._start = time.perf_counter() if self._metrics.enabled else None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if self._start is not None:
            self._metrics.record(self.name, time.perf_counter() - self._start, exc_type is not None)
        return False

    def __call__(self, fn: F) -> F:
        name = self.name

        # A fresh start time per call (not on self) so one decorated function may run
        # on many threads at once.
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            metrics = PerformanceMetrics._instance or PerformanceMetrics.get_instance()
            if not metrics.enabled:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                metrics.record(name, time.perf_counter() - start, True)
                raise
            metrics.record(name, time.perf_counter() - start)
            return result

        return wrapper  # type: ignore[return-value]


def performance_monitor(name: str) -> _StageTimer:
    """Time a stage: `@performance_monitor("parse")` or `with performance_monitor("store.flush"):`.
    An exception inside counts as an error for the stage and propagates."""
    return _StageTimer(name)


def configure_from_config(config: Config) -> PerformanceMetrics:
    """Configure the process-wide metrics from `[features] monitoring` and the `[statsd]`
    section; returns them."""
    sd = config.statsd
    metrics = PerformanceMetrics.get_instance()
    metrics.configure(
        enabled=config.features.monitoring,
        statsd_host=sd.host if sd.enabled else None,
        statsd_port=sd.port,
        prefix=sd.prefix,
    )
    return metrics
