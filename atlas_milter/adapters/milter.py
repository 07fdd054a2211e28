"""Owns the milter front door: a pymilter `Milter.Base` subclass that collects one message
per MAIL FROM (envelope, headers, body up to the analysis cap), classifies it at end of
message through the pipeline with a deadline, and turns the verdict into a milter reply
by policy: tag (headers), reject (550 5.7.1 + reference id), tempfail (451 4.7.1),
quarantine (Postfix hold / Sendmail quarantine) or discard. Also `serve()`, which runs
the milter on a unix or inet socket with one of two transports ([milter] transport: our
protocol loop, adapters/milter_loop.py, or libmilter through pymilter) until
SIGTERM/SIGINT/SIGHUP (SIGHUP stops, as libmilter's signal thread has it), and
`MilterEngine.reload()`, run on SIGUSR1: the config file and the model are read again and
swapped in for the next messages.

Threads: the loop reads every connection on one thread and runs end of message on a fixed
set of worker threads; libmilter calls each SMTP connection on a thread of its pool. One
`AtlasMilter` instance per connection holds that connection's message state and nothing else. Shared
state lives in `MilterEngine` (the start config, a semaphore bounding work in flight, a
locked byte budget for buffered messages, and the reloadable `MilterState`: policy and
scorer in one immutable object that a message reads once at end of message, so it is
decided wholly by the old or wholly by the new one) and in the pipeline (pool, store).

Must not: let an exception reach libmilter (every callback is wrapped; a failure becomes
the configured on_error action), hold more than `max_in_flight` classifications or
`max_buffered_mb` of message bytes at once, put message bytes unsanitised into a header
or an SMTP reply, or decide thresholds itself (scores and cutoffs come from the core;
this module maps verdicts to replies through the tables below).

Wire economy (see conf/postfix-main.cf): only envfrom, envrcpt, header (all no-reply),
DATA, body and eom are negotiated; only the actions used are requested; the only macros asked
for are {i}, {auth_authen} and {client_addr}, at end of message (Sendmail needs its
confMILTER_MACROS_EOM for them, see negotiate()).

No Nagle stalls on inet: the listening socket gets TCP_NODELAY, so that our several small
replies at end of message (one per header change, then the verdict) go out at once; and
the DATA step is negotiated *with* a reply (`data()`), because the MTA's side of the same
pattern stalled every message ~40 ms: Postfix writes the DATA-stage macros as a small
packet that gets no answer, then its first header waits under Nagle's algorithm for our
kernel's delayed ACK. Answering DATA sends that ACK at once (measured with one client:
inet 22 -> 217 messages/s, the same as unix).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import grp
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import Milter
import milter as _libmilter

from atlas_milter import signals
from atlas_milter.adapters import header_writer
from atlas_milter.adapters.milter_loop import LoopServer
from atlas_milter.classifier import load_model
from atlas_milter.config import Config, MilterConfig
from atlas_milter.errors import AtlasError, ModelError
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.notify import sd_notify
from atlas_milter.pipeline import Pipeline, Result, Scorer
from atlas_milter.policy import (
    Decision,
    MessagePolicy,
    deny_listed_verdict,
    skipped_verdict,
    unchecked_verdict,
)
from atlas_milter.pool import PoolBusy
from atlas_milter.reload import GAUGE_RELOAD_FAILING, run_reload, start_reload_thread
from atlas_milter.signals import FAST_STOP_SIGNAL, RELOAD_SIGNAL, STOP_SIGNALS
from atlas_milter.throttle import LogThrottle
from atlas_milter.verdict import SPAM, UNCHECKED, Action, Verdict, format_reasons

log = logging.getLogger(__name__)

MILTER_NAME = "atlas-milter"

# --- headers we add (and remove when they arrive forged) -------------------------------
HDR_VERDICT = "X-Atlas-Verdict"
HDR_SCORE = "X-Atlas-Score"
HDR_REASONS = "X-Atlas-Reasons"
HDR_SPAM_FLAG = "X-Spam-Flag"
HDR_SPAM_STATUS = "X-Spam-Status"
FORGED_PREFIXES = ("x-atlas-", "x-spam-")
REASONS_SHOWN = 3  # reasons in X-Atlas-Reasons
HEADER_VALUE_MAX = 200  # characters of any header value we write

# --- actions and the replies they map to -------------------------------------------------
REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.1")
QUARANTINE_REASON = "atlas-milter: spam score {score:.3f} (ref {ref})"

# --- metric names ------------------------------------------------------------------------
STAGE_MILTER_EOM = "milter.eom"  # the end-of-message callback: classify, decide, reply
STAGE_MILTER_MESSAGE = "milter.message"  # all callback time spent on one message
COUNTER_MESSAGES = "milter.messages"
COUNTER_SKIP_PREFIX = "milter.skip."  # + authenticated | trusted_network | allow_listed
COUNTER_DENY_LISTED = "milter.deny_listed"
COUNTER_ERROR_PREFIX = "milter.error."  # + classify | timeout | busy | model | internal
COUNTER_ACTION_PREFIX = "milter.action."  # + the action taken
COUNTER_MIXED = "milter.mixed_recipients"
COUNTER_FORGED = "milter.forged_headers_removed"
COUNTER_TRUNCATED = "milter.truncated"
COUNTER_RECORD_REFUSED = "milter.record_refused"

ERR_CLASSIFY = "classify"
ERR_TIMEOUT = "timeout"
ERR_BUSY = "busy"
ERR_MODEL = "model"
ERR_INTERNAL = "internal"

EOM_MACROS = ("{i}", "{auth_authen}", "{client_addr}")
WANTED_ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
BUSY_WAIT = 0.05  # seconds eom waits for a free classification slot before on_busy
MAX_RECIPIENTS = 1000  # recipients remembered per message (Postfix's default limit)
ERROR_LOG_INTERVAL = 60.0  # seconds between log lines for the same kind of failure
LIBMILTER_TIMEOUT = 600  # seconds libmilter (and the loop transport) waits on a silent MTA before dropping it
LISTEN_BACKLOG = 256  # pending MTA connections (the loop transport's listening socket)

_CTRL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_header_value(text: str, limit: int = HEADER_VALUE_MAX) -> str:
    """One line of printable ASCII: no CR/LF or other control characters from message
    content can reach a header we write (header injection), nothing non-ASCII either."""
    text = _CTRL.sub(" ", text).encode("ascii", "replace").decode("ascii").strip()
    return text[:limit]


def clean_reply_text(text: str) -> str:
    # libmilter treats the reply as a format string: a lone % would make it drop the reply.
    return clean_header_value(text, 400).replace("%", "%%")


def new_ref() -> str:
    """A short reference id for a rejected or deferred message, recorded in the verdict
    row's note (`ref=...`) so an admin can find the row from the bounce text."""
    return secrets.token_hex(5).upper()


# --- the shared engine -------------------------------------------------------------------


class ClassifyFailed(Exception):
    """Classification gave no verdict; `kind` is one of the ERR_* names."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _UnavailableModel:
    """Stands in for a model that could not be loaded at start: every message then gets
    the on_error action, and the pipeline still records verdict rows."""

    spam_cutoff = 0.9
    ham_cutoff = 0.1
    meta: dict = {"version": "unavailable"}
    version = "unavailable"
    scorable = False  # the pipeline starts no worker pool for it

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def score(self, msg: Any) -> Any:
        raise ModelError(self.reason)


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
            model = load_model(model_path or None)
            scorer = self.pipeline.make_scorer(model, config.classifier)
            # One assignment: the next message sees the new policy and model together.
            self.state = MilterState.build(config.milter, scorer, "")
            # Old workers live on for a deadline: a message that read the old state just
            # before the swap may still hand them its work.
            self.pipeline.use(scorer, retire_after=self.config.milter.timeout + 1.0)
        pending = restart_only_changes(self.config, config)
        if pending:
            log.warning("milter reload: %s changed; a restart applies them (systemctl restart atlas-milter), "
                        "the rest of the new config is in force now", ", ".join(pending))
        mc = config.milter
        return (f"model {model.version} ({model_path or 'shipped'}), cutoffs spam {scorer.cutoffs.spam:g} "
                f"ham {scorer.cutoffs.ham:g}, spam_action={mc.spam_action}, unsure_action={mc.unsure_action}, "
                f"on_error={mc.on_error}, timeout {mc.timeout:g}s")

    def close(self) -> None:
        with self._reload_lock:
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.pipeline.flush(timeout=10.0)
        self.pipeline.close()


# --- one connection ------------------------------------------------------------------


class AtlasMilter(Milter.Base):
    """One SMTP connection; one message at a time (state reset at MAIL FROM)."""

    def __init__(self, engine: MilterEngine) -> None:
        self.engine = engine
        self._held = 0  # bytes reserved from the engine's budget
        self._reset()

    def _reset(self) -> None:
        if self._held:
            self.engine.release(self._held)
            self._held = 0
        self.sender = ""
        self.recipients: list[str] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.over_budget = False
        self.forged: list[tuple[str, int]] = []  # (header name, 1-based index among that name)
        self._name_counts: dict[str, int] = {}
        self.failed = ""
        self.cb_seconds = 0.0
        self.in_body = False
        self._state = self.engine.state  # replaced at end of message by the state then in force

    # -- negotiation ----------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        try:
            offered_actions, offered_protocol = opts[0], opts[1]
            self._actions = offered_actions & WANTED_ACTIONS
            if self._actions & Milter.SETSYMLIST:
                # Straight to the context: pymilter 1.0.5's Base.setsymlist hands the C
                # module bytes where it wants str.
                # No end-of-header list, although Sendmail (8.17.1) honours this one only when a
                # milter sets both: Postfix sends the end-of-header macros with *every header*,
                # one more packet each (~0.1 ms of milter CPU per message). Sendmail gets the
                # macros from conf/sendmail.mc's confMILTER_MACROS_EOM; without it, eom warns.
                self._ctx.setsymlist(Milter.M_EOM, " ".join(EOM_MACROS))
            opts[0] = self._actions
            opts[1] = self._protocol = offered_protocol & ~self.protocol_mask()
            opts[2] = opts[3] = 0
            if self.engine.negotiated is None:
                self.engine.negotiated = (opts[0], opts[1])
                log.info("milter negotiated actions 0x%x, protocol 0x%x (MTA offered 0x%x, 0x%x)",
                         opts[0], opts[1], offered_actions, offered_protocol)
            return Milter.CONTINUE
        except Exception as exc:  # never leave libmilter with an exception
            self.engine.log_failure(ERR_INTERNAL, f"negotiate: {exc}", exc_info=True)
            return Milter.ALL_OPTS

    def _fail(self, where: str, exc: BaseException) -> None:
        self.failed = self.failed or f"{where}: {type(exc).__name__}: {exc}"
        self.engine.log_failure(ERR_INTERNAL, f"{where}: {type(exc).__name__}: {exc}", exc_info=True)

    # -- envelope (no reply: Postfix sends them on without waiting) ----------------------------
    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        t0 = time.perf_counter()
        try:
            self._reset()
            self.sender = mailfrom
        except Exception as exc:
            self._fail("envfrom", exc)
        self.cb_seconds += time.perf_counter() - t0
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to: str, *params: str) -> int:
        t0 = time.perf_counter()
        try:
            if len(self.recipients) < MAX_RECIPIENTS:
                self.recipients.append(to)
        except Exception as exc:
            self._fail("envrcpt", exc)
        self.cb_seconds += time.perf_counter() - t0
        return Milter.CONTINUE

    # -- content ------------------------------------------------------------------------------
    def data(self) -> int:
        """Negotiated only for its reply, which ends the inet stall (see the module docstring)."""
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: Any) -> int:
        """Negotiates the header step (no reply); the work is in header_bytes."""
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        self._header(name, value)
        return Milter.CONTINUE

    def header_bytes(self, name: Any, value: bytes) -> int:
        # Called by pymilter with the raw value: skips its decode/encode round trip.
        self._header(name, value)
        return Milter.NOREPLY if self._protocol & Milter.P_NR_HDR else Milter.CONTINUE

    def _header(self, name: Any, value: bytes) -> None:
        t0 = time.perf_counter()
        try:
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            lname = name.lower()
            if lname.startswith(FORGED_PREFIXES):
                n = self._name_counts.get(lname, 0) + 1
                self._name_counts[lname] = n
                self.forged.append((name, n))
            if not self.truncated:
                # Folded values arrive with bare LF between lines; mail wants CRLF.
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                self._add(name.encode("latin-1", "replace") + b": " + value + b"\r\n")
        except Exception as exc:
            self._fail("header", exc)
        self.cb_seconds += time.perf_counter() - t0

    def _add(self, data: bytes) -> None:
        room = self.engine.max_bytes - self.size
        if len(data) >= room:
            data = data[: max(room, 0)]
            self.truncated = True
        if not data:
            return
        if not self.engine.reserve(len(data)):
            self.over_budget = True
            self.truncated = True
            return
        self._held += len(data)
        self.parts.append(data)
        self.size += len(data)

    def body(self, chunk: bytes) -> int:
        t0 = time.perf_counter()
        try:
            if not self.in_body:
                self.in_body = True
                if not self.truncated:
                    self._add(b"\r\n")
            if not self.truncated:
                self._add(chunk)
        except Exception as exc:
            self._fail("body", exc)
            self.truncated = True
        self.cb_seconds += time.perf_counter() - t0
        if self.truncated and self._protocol & Milter.P_SKIP:
            return Milter.SKIP  # enough to classify: the MTA stops sending body chunks
        return Milter.CONTINUE

    # -- end of message --------------------------------------------------------------------
    def eom(self, busy: str = "") -> int:
        """End of message: classify, decide, reply. `busy` (from the loop transport: no
        end-of-message thread was free in time) says why classification fails as busy, as when
        no classification slot is free: skips and the deny list still apply, then on_busy."""
        t0 = time.perf_counter()
        engine = self.engine
        try:
            rc = self._eom(t0, busy)
        except Exception as exc:  # a bug here must still give the MTA an answer
            self._fail("eom", exc)
            try:
                rc = self._apply_error(ERR_INTERNAL, self.failed, t0)
            except Exception as exc2:
                engine.log_failure(ERR_INTERNAL, f"eom fallback: {exc2}", exc_info=True)
                rc = Milter.TEMPFAIL if self._state.mc.on_error == Action.TEMPFAIL else Milter.ACCEPT
        took = time.perf_counter() - t0
        metrics = engine.metrics
        metrics.record(STAGE_MILTER_EOM, took)
        metrics.record(STAGE_MILTER_MESSAGE, self.cb_seconds + took)
        try:
            self._reset()
        except Exception as exc:
            engine.log_failure(ERR_INTERNAL, f"reset: {exc}", exc_info=True)
        return rc

    def _raw(self) -> bytes:
        if not self.in_body and not self.truncated:
            self._add(b"\r\n")  # header-only message: still a valid RFC 5322 shape
        return b"".join(self.parts)

    def _eom(self, t0: float, busy: str = "") -> int:
        engine = self.engine
        state = self._state = engine.state  # this message's policy and model, whatever reloads meanwhile
        engine.incr(COUNTER_MESSAGES)
        raw = self._raw()
        if self.truncated:
            engine.incr(COUNTER_TRUNCATED)
        if self.failed:
            return self._apply_error(ERR_INTERNAL, self.failed, t0)
        if self.over_budget:
            return self._apply_error(ERR_BUSY, f"over max_buffered_mb ({engine.config.milter.max_buffered_mb} MB in memory)", t0)
        queue_id = self.getsymval("{i}") or ""
        client_addr = self.getsymval("{client_addr}")
        if client_addr is None:
            engine.warn_missing_macros()
        policy = state.policy
        model_version = state.scorer.model.version
        skip = policy.skip_reason(self.sender, bool(self.getsymval("{auth_authen}")), client_addr)
        if skip:
            engine.incr(COUNTER_SKIP_PREFIX + skip)
            result = engine.pipeline.unscored(raw, queue_id, skipped_verdict(model_version), t0)
            self._record(result, Action.ACCEPT, f"skipped: {skip}")
            engine.incr(COUNTER_ACTION_PREFIX + Action.ACCEPT)
            return Milter.ACCEPT
        if policy.deny_listed(self.sender):
            engine.incr(COUNTER_DENY_LISTED)
            result = engine.pipeline.unscored(raw, queue_id, deny_listed_verdict(model_version), t0)
            note = "deny-listed sender"
        else:
            try:
                result = engine.classify(raw, queue_id, state, busy)
            except ClassifyFailed as exc:
                if exc.kind != ERR_CLASSIFY:  # classify failures were logged with their traceback
                    engine.log_failure(exc.kind, exc.detail)
                return self._apply_error(exc.kind, exc.detail, t0)
            note = ""
        verdict = result.verdict
        decision = policy.decide(self.recipients, verdict.score)
        if decision.mixed:
            engine.incr(COUNTER_MIXED)
        return self._act(decision, result, queue_id, _join(note, decision.note))

    def _act(self, decision: Decision, result: Result, queue_id: str, note: str) -> int:
        engine = self.engine
        mc = self._state.mc
        verdict = result.verdict
        action = decision.action
        engine.incr(COUNTER_ACTION_PREFIX + action)
        if action == Action.REJECT:
            ref = new_ref()
            self.setreply(*REPLY_REJECT, clean_reply_text(mc.reject_text.format(ref=ref)))
            self._record(result, action, _join(note, f"ref={ref}"))
            return Milter.REJECT
        if action == Action.TEMPFAIL:
            ref = new_ref()
            self.setreply(*REPLY_TEMPFAIL, clean_reply_text(mc.tempfail_text.format(ref=ref)))
            self._record(result, action, _join(note, f"ref={ref}"))
            return Milter.TEMPFAIL
        if action == Action.DISCARD:
            self._record(result, action, note)
            return Milter.DISCARD
        if action == Action.ACCEPT:
            self._record(result, action, note)
            return Milter.ACCEPT
        # tag, or quarantine (which tags too: the held copy says why it was held)
        if action == Action.QUARANTINE and not self._actions & Milter.QUARANTINE:
            engine.log_failure("quarantine", "the MTA did not offer SMFIF_QUARANTINE; tagging instead")
            action, note = Action.TAG, _join(note, "quarantine not offered by the MTA: tagged")
        self._remove_forged()
        self._add_verdict_headers(verdict, decision.required)
        if action == Action.QUARANTINE:
            ref = new_ref()
            self.quarantine(clean_header_value(QUARANTINE_REASON.format(score=verdict.score, ref=ref)))
            note = _join(note, f"ref={ref}")
        self._record(result, action, note)
        return Milter.ACCEPT

    def _add_verdict_headers(self, verdict: Verdict, required: float) -> None:
        is_spam = verdict.verdict == SPAM
        reasons = format_reasons(verdict.reasons, REASONS_SHOWN)
        self._add_header(HDR_VERDICT, clean_header_value(verdict.verdict))
        self._add_header(HDR_SCORE, f"{verdict.score:.3f}")
        if reasons:
            self._add_header(HDR_REASONS, clean_header_value(reasons))
        self._add_header(HDR_SPAM_FLAG, "YES" if is_spam else "NO")
        self._add_header(HDR_SPAM_STATUS, f"{'Yes' if is_spam else 'No'}, score={verdict.score:.3f} required={required:.3f}")

    def _add_header(self, name: str, value: str) -> None:
        """addheader, through libmilter with the GIL held where possible (header_writer)."""
        if not (self._actions & Milter.ADDHDRS and header_writer.add(self._ctx, name, value)):
            self.addheader(name, value)

    def _remove_forged(self) -> None:
        if not self.forged or not self._actions & Milter.CHGHDRS:
            return
        # Highest index first: deleting one occurrence never renumbers those still to delete.
        for name, index in sorted(self.forged, key=lambda item: (item[0].lower(), -item[1])):
            self.chgheader(name, index, "")
        self.engine.metrics.incr(COUNTER_FORGED, len(self.forged))

    def _apply_error(self, kind: str, detail: str, t0: float) -> int:
        """The on_error (or on_busy) action for a message we could not classify."""
        engine = self.engine
        mc = self._state.mc
        engine.incr(COUNTER_ERROR_PREFIX + kind)
        action = self._state.policy.failure_action(busy=kind == ERR_BUSY)
        queue_id = ""
        try:
            queue_id = self.getsymval("{i}") or ""
        except Exception:
            pass
        try:
            verdict = unchecked_verdict(f"{kind}: {detail}"[:500], self._state.scorer.model.version)
            result = engine.pipeline.unscored(b"".join(self.parts), queue_id, verdict, t0)
        except Exception:
            result = None
        engine.incr(COUNTER_ACTION_PREFIX + action)
        if action == Action.TEMPFAIL:
            ref = new_ref()
            self.setreply(*REPLY_TEMPFAIL, clean_reply_text(mc.tempfail_text.format(ref=ref)))
            if result is not None:
                self._record(result, Action.TEMPFAIL, f"{kind}; ref={ref}")
            return Milter.TEMPFAIL
        if self._actions & Milter.CHGHDRS:
            self._remove_forged()
        self._add_header(HDR_VERDICT, UNCHECKED)
        self._add_header(HDR_REASONS, clean_header_value(f"not checked: {kind}"))
        if result is not None:
            self._record(result, Action.ACCEPT, f"{kind}; delivered unchecked")
        return Milter.ACCEPT

    def _record(self, result: Result, action: Action, note: str) -> None:
        try:
            client = self.getsymval("{client_addr}")
            ok = self.engine.pipeline.record(
                result, source="milter", action=action,
                queue_id=result.key or None,
                client_ip=client or None,
                recipients_count=len(self.recipients),
                note=note or None,
            )
            if not ok:
                self.engine.incr(COUNTER_RECORD_REFUSED)
        except Exception as exc:  # the reply matters more than the record
            self.engine.log_failure("record", f"{type(exc).__name__}: {exc}", exc_info=True)

    # -- end of connection ---------------------------------------------------------------------
    def abort(self) -> int:
        try:
            self._reset()
        except Exception as exc:
            self.engine.log_failure(ERR_INTERNAL, f"abort: {exc}", exc_info=True)
        return Milter.CONTINUE

    def close(self) -> int:
        try:
            self._reset()
        except Exception as exc:
            self.engine.log_failure(ERR_INTERNAL, f"close: {exc}", exc_info=True)
        return Milter.CONTINUE


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


# --- running libmilter -----------------------------------------------------------------


@dataclass(frozen=True)
class SocketSpec:
    kind: str  # unix | inet | inet6
    path: str = ""
    host: str = ""
    port: int = 0
    spec: str = ""


def parse_socket(spec: str) -> SocketSpec:
    """Check a libmilter socket spec before libmilter sees it: unix:/path (local:/path) or
    inet:PORT@HOST / inet6:PORT@HOST. Raises AtlasError with what to fix."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec.startswith("/"):
            kind, rest = "unix", spec
        else:
            raise AtlasError(f"--socket {spec}: use unix:/path/milter.sock or inet:PORT@HOST (e.g. inet:8894@127.0.0.1)")
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise AtlasError(f"--socket {spec}: the unix socket path must be absolute")
        parent = os.path.dirname(rest)
        if not os.path.isdir(parent):
            raise AtlasError(f"--socket {spec}: directory {parent} does not exist (create it, e.g. systemd RuntimeDirectory=)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise AtlasError(f"--socket {spec}: cannot create a socket in {parent} (permission denied)")
        if os.path.lexists(rest) and not stat.S_ISSOCK(os.lstat(rest).st_mode):
            raise AtlasError(f"--socket {spec}: {rest} exists and is not a socket (remove it or choose another path)")
        return SocketSpec("unix", path=rest, spec=f"unix:{rest}")
    if kind in ("inet", "inet6"):
        port_s, at, host = rest.partition("@")
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise AtlasError(f"--socket {spec}: {port_s!r} is not a port number (libmilter syntax is inet:PORT@HOST)")
        if at and host:
            try:
                socket.getaddrinfo(host, int(port_s), socket.AF_INET6 if kind == "inet6" else socket.AF_INET)
            except OSError:
                raise AtlasError(f"--socket {spec}: host {host!r} does not resolve") from None
        return SocketSpec(kind, host=host, port=int(port_s), spec=f"{kind}:{port_s}@{host}" if host else f"{kind}:{port_s}")
    raise AtlasError(f"--socket {spec}: unknown socket type {kind!r} (use unix: or inet:)")


def set_nodelay_on_listener(port: int) -> bool:
    """Set TCP_NODELAY on libmilter's listening socket (found among our open descriptors
    after smfi_opensocket); Linux copies it to every accepted connection. Without it each
    of our back-to-back small replies at end of message waits on the MTA's delayed ACK."""
    done = False
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done = True
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libmilter's
    return done


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
        return Pipeline(cfg, model=_UnavailableModel(str(exc))), str(exc)  # type: ignore[arg-type]


def _register(engine: MilterEngine) -> None:
    Milter.factory = functools.partial(AtlasMilter, engine)
    _libmilter.set_flags(WANTED_ACTIONS)
    _libmilter.set_exception_policy(Milter.TEMPFAIL)  # never reached: every callback catches
    _libmilter.set_connect_callback(Milter.connect_callback)
    _libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    _libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    _libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    _libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    _libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    _libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    _libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    _libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    _libmilter.set_close_callback(Milter.close_callback)


def socket_gid(group: str) -> int:
    """The gid of `[milter] socket_group` (a name or a number), or a one-line AtlasError."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AtlasError(f"[milter] socket_group: no group named {group!r} on this machine") from None


MALLOC_ARENAS = 2  # glibc malloc arenas of the milter process (see limit_malloc_arenas)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (mallopt M_ARENA_MAX) unless MALLOC_ARENA_MAX is set in the
    environment (then glibc already applied it). libmilter runs every SMTP connection on a
    new thread and glibc hands new threads arenas of their own, up to 8 per core, where
    freed memory fragments: under sustained load (scripts/soak.py, 150 messages/s) the
    milter's RSS crept up ~5 MB a minute with the default and stayed flat with 2 arenas, at
    the same latency. False where this does not apply (not glibc, or mallopt refused)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_ARENA_MAX, arenas) == 1


# Every signal the milter acts on: libmilter's stop signals (its sigwait thread, or ours
# with the loop transport), our reload and our fast stop.
MILTER_SIGNALS = STOP_SIGNALS | {RELOAD_SIGNAL, FAST_STOP_SIGNAL}
LISTENER_POLL_S = 5.0  # libmilter's listener polls its socket this long between looks at the stop flag


def block_signals() -> set[int]:
    """Block the stop signals and the reload signal in the calling thread, and so in every
    thread started after it (store writer, StatsD flusher, classify workers, the HTTP
    page): only libmilter's sigwait thread sees a stop, only our reload thread SIGUSR1.
    Unblocked in any thread, SIGTERM or SIGUSR1 could land there and kill the process.
    Call before starting any thread; returns the previous mask."""
    return signals.block(MILTER_SIGNALS)


def stop_now(sock: SocketSpec) -> None:
    """What SIGUSR2 does: libmilter's stop, as on SIGTERM (no new connections, those in
    progress finish), without its wait of up to 5 s. smfi_stop() sets the stop flag and then
    waits for the listener, which holds its lock while it polls the listening socket with a
    5 s timeout; a connection to our own socket ends that poll, the listener sees the flag
    and lets go. (The wake-up connection closes at once; libmilter drops it.)"""
    log.info("atlas-milter: stop requested (SIGUSR2)")
    stopper = threading.Thread(target=_libmilter.stop, name="atlas-stop", daemon=True)
    stopper.start()
    deadline = time.monotonic() + 2 * LISTENER_POLL_S
    while stopper.is_alive() and time.monotonic() < deadline:
        stopper.join(0.05)
        if stopper.is_alive():
            _connect_once(sock)


def _connect_once(sock: SocketSpec) -> None:
    if sock.kind == "unix":
        family, address = socket.AF_UNIX, sock.path
    else:
        family, address = (socket.AF_INET6 if sock.kind == "inet6" else socket.AF_INET), (sock.host, sock.port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as wake:
            wake.settimeout(0.5)
            wake.connect(address)
    except OSError:
        pass  # closed already: the listener has let go


def _listening(engine: MilterEngine, sock: SocketSpec) -> None:
    mc = engine.config.milter
    log.info("atlas-milter %s listening on %s (transport=%s, classify=%s, timeout %gs, spam_action=%s, on_error=%s)",
             MILTER_NAME, sock.spec, mc.transport, mc.classify, mc.timeout, mc.spam_action, mc.on_error)
    sd_notify("READY=1")  # systemd Type=notify: the socket is open


def _serve_libmilter(engine: MilterEngine, sock: SocketSpec) -> None:
    """libmilter (through pymilter) runs the protocol: a thread per connection from its pool."""
    mc = engine.config.milter
    _register(engine)
    _libmilter.setconn(sock.spec)
    _libmilter.settimeout(LIBMILTER_TIMEOUT)
    _libmilter.register(MILTER_NAME, data=lambda ctx: ctx.getpriv().data(),
                        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                        negotiate=Milter.negotiate_callback)
    try:
        _libmilter.opensocket(True)
    except _libmilter.error as exc:
        raise AtlasError(f"--socket {mc.socket}: cannot listen ({exc}); is another milter using it?") from None
    if sock.kind == "unix":
        _own_socket(sock, mc)
    else:
        if not set_nodelay_on_listener(sock.port):
            log.warning("milter: could not set TCP_NODELAY on %s; expect ~40 ms stalls per message", sock.spec)
    start_reload_thread(lambda: stop_now(sock), signals=(FAST_STOP_SIGNAL,))
    _listening(engine, sock)
    try:
        _libmilter.main()
    except _libmilter.error as exc:
        raise AtlasError(f"milter on {mc.socket} failed: {exc}") from None


def _serve_loop(engine: MilterEngine, sock: SocketSpec) -> None:
    """Our own protocol loop (adapters/milter_loop.py) on the same socket spec."""
    listener = _listen(sock)
    if sock.kind == "unix":
        _own_socket(sock, engine.config.milter)
    server = LoopServer(listener, functools.partial(AtlasMilter, engine), workers=engine.max_in_flight + 4,
                        idle_timeout=LIBMILTER_TIMEOUT, nodelay=sock.kind != "unix", busy_wait=BUSY_WAIT)

    def stop(why: str) -> None:
        log.info("atlas-milter: stop requested (%s)", why)
        server.stop()

    start_reload_thread(lambda: stop("SIGTERM, SIGINT or SIGHUP"), signals=STOP_SIGNALS)
    start_reload_thread(lambda: stop("SIGUSR2"), signals=(FAST_STOP_SIGNAL,))
    _listening(engine, sock)
    server.serve()


def _own_socket(sock: SocketSpec, mc: MilterConfig) -> None:
    """Give a unix socket the configured group and mode (the MTA's user must be able to write it)."""
    if mc.socket_group:
        os.chown(sock.path, -1, socket_gid(mc.socket_group))
    os.chmod(sock.path, mc.socket_mode)


def _listen(sock: SocketSpec) -> socket.socket:
    """The listening socket for `sock` (a stale unix socket file is replaced, as libmilter does)."""
    try:
        if sock.kind == "unix":
            if os.path.lexists(sock.path):
                os.unlink(sock.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock.path)
        else:
            listener = socket.socket(socket.AF_INET6 if sock.kind == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((sock.host, sock.port))
        listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        raise AtlasError(f"--socket {sock.spec}: cannot listen ({exc.strerror or exc}); is another milter using it?") from None
    return listener


def serve(config: Config, read_config: Callable[[], Config] | None = None) -> int:
    """Run the milter on config.milter.socket until SIGTERM/SIGINT/SIGHUP or SIGUSR2 (a
    signal thread catches them and stops accepting; messages in progress are answered).
    SIGUSR1 reloads: `read_config()` (default: `config` again) and the model it names are
    read and swapped in (MilterEngine.reload). Exit code 0 on a clean stop. Bad socket
    spec or unusable path: AtlasError."""
    mc = config.milter
    sock = parse_socket(mc.socket)
    old_mask = block_signals()
    limit_malloc_arenas()  # before the store writer and libmilter's threads (cmd_milter may have started /performance)
    pipeline, model_error = make_pipeline(config)
    # Again: starting a worker pool starts multiprocessing's resource tracker, which unblocks
    # SIGINT and SIGTERM in this thread when done; the reload thread must not inherit that.
    block_signals()
    if model_error:
        log.error("milter: %s; every message gets on_error=%s until the model is fixed", model_error, mc.on_error)
    engine = MilterEngine(config, pipeline, model_error)
    engine.metrics.set_gauge(GAUGE_RELOAD_FAILING, 0)
    start_reload_thread(lambda: engine.reload(read_config or (lambda: config)))
    try:
        if mc.transport == "loop":
            _serve_loop(engine, sock)
        else:
            _serve_libmilter(engine, sock)
        log.info("atlas-milter stopping: finishing records")
        sd_notify("STOPPING=1")
    finally:
        try:
            engine.close()
        finally:
            signals.restore(old_mask)
            _log_summary(engine)
            if sock.kind == "unix":
                try:
                    os.unlink(sock.path)
                except OSError:
                    pass
    return 0


def _log_summary(engine: MilterEngine) -> None:
    stats = engine.metrics.get_stats()
    keep = {k: v for k, v in stats.items() if k in (STAGE_MILTER_EOM, STAGE_MILTER_MESSAGE, "total", "parse", "classify")}
    counters = {k: v for k, v in engine.metrics.get_counters().items() if k.startswith(("milter.", "verdict.", "cache.", "reload."))}
    log.info("atlas-milter stopped: %s", json.dumps({"timers_ms": keep, "counters": counters}, sort_keys=True))
