"""Owns what every milter connection shares: `MilterEngine` (the pipeline, the reloadable
`MilterState`, a semaphore bounding classifications in flight, a locked byte budget for
buffered messages, classification with a deadline, failure counting and log throttling)
and `reload()`, run on SIGUSR1: the config file and the model are read again and swapped
in for the next messages. Also `make_pipeline`, the pipeline the milter runs on.

Threads: the engine is called from every connection's thread (libmilter's pool, or the
loop transport's end-of-message workers) and is thread-safe. The reloadable state (policy
and scorer in one immutable object) is read once per message at end of message, so a
message is decided wholly by the old or wholly by the new one.

Must not: hold more than `max_in_flight` classifications or `max_buffered_mb` of message
bytes at once, or decide anything about a message (that is the policy's)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from atlas_milter.adapters.milter.metrics import ERR_BUSY, ERR_CLASSIFY, ERR_MODEL, ERR_TIMEOUT
from atlas_milter.classifier import Model, load_model
from atlas_milter.config import Config, MilterConfig
from atlas_milter.errors import AtlasError, ModelError
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.pipeline import Pipeline, Result, Scorer, UnavailableModel
from atlas_milter.policy import MessagePolicy
from atlas_milter.pool import PoolBusy
from atlas_milter.reload import run_reload
from atlas_milter.throttle import LogThrottle

log = logging.getLogger(__name__)

BUSY_WAIT = 0.05  # seconds eom waits for a free classification slot before on_busy
ERROR_LOG_INTERVAL = 60.0  # seconds between log lines for the same kind of failure


class ClassifyFailed(Exception):
    """Classification gave no verdict; `kind` is one of the ERR_* names."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class MilterState:
    """Everything a reload may change, swapped as one object: the [milter] policy (actions,
    lists, per-recipient rules, timeout, texts) and the scorer (model, cutoffs). A message
    reads `engine.state` once at end of message and uses nothing else."""

    mc: MilterConfig
    scorer: Scorer
    model_error: str  # the model could not be loaded: every message gets on_error
    policy: MessagePolicy  # the core's decisions, with the scorer's cutoffs

    @classmethod
    def build(cls, mc: MilterConfig, scorer: Scorer, model_error: str = "") -> "MilterState":
        return cls(mc, scorer, model_error, MessagePolicy(mc, scorer.cutoffs))


# Settings read once at start (sockets, threads, pools, files): a reload names them in a
# warning when they changed, and applies the rest.
RESTART_ONLY_MILTER = ("socket", "transport", "socket_mode", "socket_group", "classify", "max_in_flight",
                       "max_buffered_mb")
RESTART_ONLY_SECTIONS = ("store", "statsd", "performance", "features", "http")


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """The names (never the values) of settings in `new` that differ from `running` and
    that only a restart applies."""
    changed = [f"milter.{k}" for k in RESTART_ONLY_MILTER if getattr(running.milter, k) != getattr(new.milter, k)]
    if running.classifier.max_bytes != new.classifier.max_bytes:
        changed.append("classifier.max_bytes")
    if running.log_level != new.log_level:
        changed.append("log_level")
    for section in RESTART_ONLY_SECTIONS:
        old, now = getattr(running, section), getattr(new, section)
        changed += [f"{section}.{f.name}" for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(now, f.name)]
    return changed


class MilterEngine:
    """What every connection shares: the pipeline, the reloadable state, the bounds on
    work in flight and the failure logging. Thread-safe."""

    def __init__(self, config: Config, pipeline: Pipeline, model_error: str = "") -> None:
        self.config = config  # as started: what the sockets, threads and budgets were made from
        self.pipeline = pipeline
        self.metrics: PerformanceMetrics = pipeline.metrics
        self.state = MilterState.build(config.milter, pipeline.scorer, model_error)
        self.max_bytes = config.classifier.max_bytes
        self.mode = config.milter.classify
        self.max_in_flight = config.milter.max_in_flight
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._executor = (
            ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="atlas-milter-classify")
            if self.mode == "thread" else None
        )
        self._budget = config.milter.max_buffered_mb * 2**20
        self._buffered = 0
        self._lock = threading.Lock()
        self._failure_log = LogThrottle(ERROR_LOG_INTERVAL)  # per ERR_* kind
        self.negotiated: tuple[int, int] | None = None
        self._macros_warned = False
        self._reload_lock = threading.Lock()  # a reload and close() never overlap
        self._closed = False
        self._classifier = config.classifier  # the cutoffs in force (a reload may change them)
        # With [cluster]: the shared model now (a reload keeps it instead of reading the file).
        self.shared_model: Callable[[], Model] | None = None

    # The current state's parts (for logging and tests; a message uses one `state` throughout).
    mc = property(lambda self: self.state.mc)
    policy = property(lambda self: self.state.policy)
    model_error = property(lambda self: self.state.model_error)

    # -- memory bound ------------------------------------------------------------------
    def reserve(self, n: int) -> bool:
        with self._lock:
            if self._buffered + n > self._budget:
                return False
            self._buffered += n
            return True

    def release(self, n: int) -> None:
        if n:
            with self._lock:
                self._buffered -= n

    @property
    def buffered(self) -> int:
        return self._buffered

    # -- classification with a deadline and bounded concurrency ---------------------------
    def classify(self, raw: bytes, key: str, state: MilterState | None = None, busy: str = "") -> Result:
        """The verdict for `raw`, or ClassifyFailed. `busy`: the transport already found no
        room for this message (why), so it fails as busy without waiting for a slot."""
        state = state or self.state
        if state.model_error:
            raise ClassifyFailed(ERR_MODEL, state.model_error)
        if busy:
            raise ClassifyFailed(ERR_BUSY, busy)
        timeout = state.mc.timeout
        if not self._slots.acquire(timeout=min(BUSY_WAIT, timeout / 2)):
            raise ClassifyFailed(ERR_BUSY, f"{self.max_in_flight} messages already in classification")
        handed_off = False
        try:
            if self.mode == "thread":
                assert self._executor is not None
                future = self._executor.submit(self.pipeline.classify, raw, key, scorer=state.scorer)
                # The slot stays taken until the work is really done, even after a timeout.
                future.add_done_callback(lambda _f: self._slots.release())
                handed_off = True
                try:
                    return future.result(timeout=timeout)
                except TimeoutError:
                    raise ClassifyFailed(ERR_TIMEOUT, f"no verdict within {timeout:g} s") from None
            if self.mode == "pool":
                try:
                    return self.pipeline.classify(raw, key, timeout=timeout, scorer=state.scorer)
                except TimeoutError:
                    raise ClassifyFailed(ERR_TIMEOUT, f"no verdict within {timeout:g} s") from None
                except PoolBusy as exc:
                    raise ClassifyFailed(ERR_BUSY, f"worker pool busy ({exc})") from None
            started = time.perf_counter()
            result = self.pipeline.classify(raw, key, scorer=state.scorer)
            took = time.perf_counter() - started
            if took > timeout:  # inline cannot be interrupted: the verdict is late, not trusted
                raise ClassifyFailed(ERR_TIMEOUT, f"verdict took {took:.2f} s, over the {timeout:g} s deadline")
            return result
        except ClassifyFailed:
            raise
        except ModelError as exc:
            raise ClassifyFailed(ERR_MODEL, str(exc)) from None
        except Exception as exc:
            self.log_failure(ERR_CLASSIFY, f"{type(exc).__name__}: {exc}", exc_info=True)
            raise ClassifyFailed(ERR_CLASSIFY, f"{type(exc).__name__}: {exc}") from None
        finally:
            if not handed_off:
                self._slots.release()

    # -- failures: counted always, logged once per kind and interval ----------------------
    def log_failure(self, kind: str, detail: str, exc_info: bool = False) -> None:
        suppressed = self._failure_log.due(kind)
        if suppressed is None:
            return
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.error("milter %s failure: %s%s; applying the configured action", kind, detail, more, exc_info=exc_info)

    def incr(self, name: str) -> None:
        self.metrics.incr(name)

    def warn_missing_macros(self) -> None:
        """Once per process: the MTA sent no {client_addr} (Postfix does for SMTP mail; Sendmail
        only with confMILTER_MACROS_EOM), so records lack the client IP and trusted_networks
        cannot match."""
        with self._lock:
            if self._macros_warned:
                return
            self._macros_warned = True
        log.warning("milter: the MTA sent no {client_addr} at end of message, so verdict records lack the client "
                    "IP and trusted_networks cannot match (expected for mail submitted locally); on Sendmail "
                    "add the confMILTER_MACROS_EOM line of conf/sendmail.mc to sendmail.mc and rebuild")

    # -- reload -------------------------------------------------------------------------
    def reload(self, read_config: Callable[[], Config]) -> bool:
        """Read the config (`read_config()`) and its model again and put them in force for
        the next messages; messages already at end of message finish with the old ones.
        A bad config or model file leaves everything as it was (logged, counted, gauged).
        Settings only a restart applies are named in a warning; the rest applies."""
        return run_reload("milter", lambda: self._reload(read_config), self.metrics)

    def _reload(self, read_config: Callable[[], Config]) -> str:
        with self._reload_lock:
            if self._closed:
                raise AtlasError("the milter is stopping")
            config = read_config()
            model_path = config.classifier.model
            if self.shared_model is not None:  # shared learning: the stream's model, not the file
                model, model_path = self.shared_model(), "shared through [cluster]"
            else:
                model = load_model(model_path or None)
            scorer = self.pipeline.make_scorer(model, config.classifier)
            self._classifier = config.classifier
            # One assignment: the next message sees the new policy and model together.
            self.state = MilterState.build(config.milter, scorer, "")
            # Old workers live on for a deadline: a message that read the old state just
            # before the swap may still hand them its work.
            self.pipeline.use(scorer, retire_after=self.config.milter.timeout + 1.0)
        pending = restart_only_changes(self.config, config)
        if pending:
            log.warning("milter reload: %s changed; a restart applies them (systemctl restart atlas-milter), "
                        "the rest of the new config is in force now", ", ".join(pending))
        return f"model {model.version} ({model_path or 'shipped'}), {self.state.policy.describe()}"

    def use_model(self, model: Model) -> None:
        """Score the next messages with `model` (a swap of shared learning); the policy and
        the cutoffs in force stay. A message already at end of message finishes with the
        model it started with."""
        with self._reload_lock:
            if self._closed:
                return
            scorer = self.pipeline.make_scorer(model, self._classifier)
            self.state = MilterState.build(self.state.mc, scorer, "")
            self.pipeline.use(scorer, retire_after=self.state.mc.timeout + 1.0)

    def close(self) -> None:
        with self._reload_lock:
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.pipeline.flush(timeout=10.0)
        self.pipeline.close()


def make_pipeline(config: Config) -> tuple[Pipeline, str]:
    """The pipeline for the milter; with an unreadable model, one that records every
    message as unchecked (the error text is returned so serve() can log it once)."""
    cfg = config
    if config.milter.classify != "pool" and config.features.parallel:
        # inline/thread: no process pool (and none of its start-up cost or memory)
        cfg = dataclasses.replace(config, features=dataclasses.replace(config.features, parallel=False))
    if not cfg.features.bulk_ops:
        # The direct writer commits in the caller's thread: a locked or slow database would
        # hold every end of message for up to the busy timeout. The milter always queues.
        log.warning("milter: ENABLE_BULK_OPS=false ignored: the milter always queues its verdict records "
                    "(a direct write would make each message wait on the database)")
        cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, bulk_ops=True))
    try:
        # Every message the milter lets into classification may wait for a worker.
        return Pipeline(cfg, pool_in_flight=config.milter.max_in_flight), ""
    except ModelError as exc:
        cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, parallel=False))
        return Pipeline(cfg, model=UnavailableModel(str(exc))), str(exc)  # type: ignore[arg-type]
