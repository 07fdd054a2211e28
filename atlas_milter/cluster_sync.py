"""Owns one host's part in shared learning ([cluster]): a learn made here becomes an event
in the local outbox (durable, in the verdict database), counts on this host at once, and
is shipped to the shared Redis stream; a background thread reads the stream and applies
every host's events, in stream order, to this host's `SharedModel`, and hands the daemon a
new model to score with (`use_model`) whenever it changed.

The stream does not grow without end: after `compact_every` new entries one host (elected by
a lease in Redis) stores a snapshot of the stream's part of the model and trims the stream up
to it (keeping `keep_stream` seconds for hosts still reading them). A host starts from the
latest snapshot and the stream after it; a host that finds a snapshot ahead of its own
position after a read (it fell behind, and the entries it has not read may be trimmed)
starts over from the snapshot. The check after the read makes it exact: snapshots only move
forward and a trim never passes its snapshot, so a snapshot at or before the position read
from means the read missed nothing. The snapshot position is also polled once a second
while the stream is quiet.

Redis is never on the per-message path: messages are scored with the model in memory.
While Redis is down (or hung), learns wait in the outbox and count locally; when it
returns they are shipped, each exactly once (the publish script's seen-set), and a learn of
a message another host had learned already is dropped here in favour of that host's.

Threads: one thread ("atlas-cluster") does all shipping, reading, applying and swapping;
`learn()` and `current_model()` may be called from any thread (they take the lock briefly,
and never call back into the daemon).
Must not: score messages, or block a caller on Redis (learn() returns without waiting).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

from atlas_milter import journal, queries
from atlas_milter.classifier import Model
from atlas_milter.leases import Lease
from atlas_milter.learn_events import LearnEvent, SharedModel, make_event, stream_key
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.redis_link import RedisDown, RedisLink, link_from_config
from atlas_milter.signals import RELOAD_SIGNAL, STOP_SIGNALS, blocked

log = logging.getLogger(__name__)

GAUGE_REDIS_UP = "cluster.redis_up"
GAUGE_OUTBOX = "cluster.outbox"
COUNTER_PUBLISHED = "cluster.learns_published"
COUNTER_DUPLICATE = "cluster.learns_duplicate"
COUNTER_APPLIED = "cluster.events_applied"
COUNTER_BAD_ENTRY = "cluster.bad_entries"
COUNTER_SNAPSHOTS_STORED = "cluster.snapshots_stored"
COUNTER_SNAPSHOTS_ADOPTED = "cluster.snapshots_adopted"
IDLE_WAIT = 0.2  # seconds between tries while Redis is down
SNAPSHOT_POLL_S = 1.0  # seconds between looks at the snapshot position while the stream is quiet
COMPACTOR_LEASE_S = 30.0  # the elected compactor's lease (released when done)
_current: "ClusterLearning | None" = None  # the running daemon's, for the console and /performance


def current() -> "ClusterLearning | None":
    """The shared learning this process runs, or None ([cluster] off, or not started)."""
    return _current


class ClusterLearning:
    """Shared learning for one daemon. `base`: the model every host starts from (the
    configured or shipped one, never a host's own learned file); `use_model(model)`: put a
    new model in force for the next messages."""

    def __init__(self, link: RedisLink, db: str, base: Model, use_model: Callable[[Model], None],
                 host: str = "", max_bytes: int = 0, metrics: PerformanceMetrics | None = None,
                 compact_every: int = 1000, keep_stream: float = 600.0) -> None:
        self.link = link
        self.db = db
        self.host = host or socket.gethostname()
        self.max_bytes = max_bytes
        self.use_model = use_model
        self.metrics = metrics or PerformanceMetrics.get_instance()
        self.base = base  # its cutoffs are every host's (learning changes weights only)
        self.shared = SharedModel(base, self.host)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._compiled = base.compiled
        self._unshipped: dict[str, LearnEvent] = {}  # in the outbox, not yet accepted by Redis
        self._dirty = False  # a learn or a dropped duplicate not yet in the model in force
        self._in_force = ""  # the version of the model the daemon scores with (the last swap)
        self._swapped: Model | None = None  # that model
        self.compact_every = compact_every
        self.keep_stream_ms = int(keep_stream * 1000)
        self._compactor = Lease(link, "compactor", COMPACTOR_LEASE_S, link.prefix)
        self._snapshot_position = "0"  # the latest snapshot seen in Redis
        self._since_snapshot = 0  # stream entries applied since this host saw that snapshot
        self._next_snapshot_check = 0.0  # monotonic time of the next look while the stream is quiet
        for event in queries.outbox_events(db):  # learns a crash left unshipped count again
            self.shared.add_local(event)
            self._unshipped[event.event_id] = event
        self.metrics.set_gauge(GAUGE_OUTBOX, len(self._unshipped))

    # -- the daemon's side --------------------------------------------------------------------

    def start(self) -> None:
        """Put the shared model in force (the base and any learns the outbox kept) and start
        the thread that ships, reads and applies."""
        global _current
        self._stop.clear()
        self._swap()
        self._thread = threading.Thread(target=self._run, name="atlas-cluster", daemon=True)
        with blocked(STOP_SIGNALS | {RELOAD_SIGNAL}):  # signals stay with the daemon's own threads
            self._thread.start()
        _current = self

    def stop(self, timeout: float = 5.0) -> None:
        global _current
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if _current is self:
            _current = None

    def current_model(self) -> Model:
        """The shared model as it stands, prepared (for a swap, or a reload of the daemon)."""
        with self._lock:
            model = self.shared.model()
        model.compiled = self._compiled
        model.prepare()
        return model

    def learn(self, raw: bytes, is_spam: bool, cutoffs: tuple[float, float] | None = None) -> tuple[float, float]:
        """Learn one message here and for every host: (its score before, after). The thread
        puts it in force here within a moment (the next swap) and ships it."""
        with self._lock:
            current = self.shared.model()
            event, before, after = make_event(current, raw, is_spam, self.max_bytes, self.host, cutoffs)
            journal.add_outbox_event(self.db, event)
            self.shared.add_local(event)
            self._unshipped[event.event_id] = event
            self._dirty = True
        self._wake.set()
        return before, after

    def learn_now(self, raw: bytes, is_spam: bool,
                  cutoffs: tuple[float, float] | None = None) -> tuple[float, float, bool]:
        """For a process that runs no sync thread (the command line): catch up with the
        shared stream, learn one message and publish it at once, not through the outbox:
        (score before, after, whether it counts: False when another host had learned that
        message with that label already). RedisDown when Redis cannot take it (nothing was
        learned)."""
        self._apply(block=False)
        with self._lock:
            event, before, after = make_event(self.shared.model(), raw, is_spam, self.max_bytes, self.host, cutoffs)
        entry, first, _ = self.link.publish(event)
        if not (entry or first == event.event_id):
            return before, before, False
        with self._lock:
            self.shared.add_local(event)  # counts here for the next message of this run
        return before, after, True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"host": self.host, "version": self.shared.version, "in_force": self._in_force,
                    "position": self.shared.position, "snapshot": self._snapshot_position,
                    "applied": self.shared.applied_count, "outbox": len(self._unshipped),
                    "waiting_for_stream": len(self.shared.pending),
                    "redis_up": not self.link.breaker.is_open}

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            down = False
            changed = False
            try:
                shipped = self._ship()
                changed = self._apply(block=not shipped and not self._dirty)
                if self._since_snapshot >= self.compact_every:
                    self._compact()
                self.metrics.set_gauge(GAUGE_REDIS_UP, 1)
            except RedisDown:
                down = True
                self.metrics.set_gauge(GAUGE_REDIS_UP, 0)
            except Exception:  # a bug must not end shared learning for this host's run
                log.exception("cluster: the sync thread failed; retrying")
                down = True
            if changed or self._dirty:
                self._swap()
            if down:
                self._wake.wait(IDLE_WAIT)
                self._wake.clear()

    def _ship(self) -> bool:
        """Publish what waits in the outbox; True if anything was shipped."""
        with self._lock:
            waiting = list(self._unshipped.values())
        for event in waiting:
            entry, first, replicated = self.link.publish(event)
            if (entry or first == event.event_id) and not replicated:
                continue  # on the primary only: kept, and published again (a no-op) until replicated
            journal.remove_outbox_event(self.db, event.event_id)
            with self._lock:
                self._unshipped.pop(event.event_id, None)
                if entry or first == event.event_id:  # on the stream (the reply may have been lost before)
                    self.metrics.incr(COUNTER_PUBLISHED)
                    if entry and event.event_id in self.shared.pending:
                        self.shared.shipped[event.event_id] = entry
                else:  # another host learned this message first: its event counts, not ours
                    self.metrics.incr(COUNTER_DUPLICATE)
                    self.shared.drop_pending(event.event_id)
                    self._dirty = True
        with self._lock:
            self.metrics.set_gauge(GAUGE_OUTBOX, len(self._unshipped))
        return bool(waiting)

    def _apply(self, block: bool) -> bool:
        """Apply the stream's new entries; True when the model changed."""
        changed = False
        while True:
            with self._lock:
                after = self.shared.position
            entries = self.link.read(after, block=block and not changed)
            # After a read, not before: a snapshot at or before `after` now means nothing
            # after `after` had been trimmed when the read ran.
            if (entries or time.monotonic() >= self._next_snapshot_check) and self._catch_up(after):
                changed = True
                continue  # read again, from the snapshot's position
            if not entries:
                return changed
            with self._lock:
                for entry_id, data in entries:
                    try:
                        event = LearnEvent.from_fields(data)
                    except ValueError as exc:
                        self.metrics.incr(COUNTER_BAD_ENTRY)
                        log.warning("cluster: stream entry %s skipped: %s", entry_id, exc)
                        self.shared.mark_position(entry_id)
                        continue
                    self.shared.apply_stream(entry_id, event)
                    self.metrics.incr(COUNTER_APPLIED)
                    changed = True
                self._since_snapshot += len(entries)

    def _catch_up(self, after: str) -> bool:
        """Start over from the latest snapshot if it is ahead of `after`; True if it was."""
        self._next_snapshot_check = time.monotonic() + SNAPSHOT_POLL_S
        position = self.link.snapshot_position()
        if position != self._snapshot_position:
            self._snapshot_position = position
            self._since_snapshot = 0  # another host folded the stream: count from here
        if stream_key(position) <= stream_key(after):
            return False
        found = self.link.read_snapshot()
        if found is None:
            return False
        with self._lock:
            try:
                adopted = self.shared.adopt(found[1])
            except ValueError as exc:
                self.metrics.incr(COUNTER_BAD_ENTRY)
                log.error("cluster: the snapshot at %s is unreadable (%s); reading the stream on", found[0], exc)
                self._snapshot_position = after  # not again until the next snapshot
                return False
            applied = self.shared.applied_count
        if adopted:
            self.metrics.incr(COUNTER_SNAPSHOTS_ADOPTED)
            log.info("cluster: %s the snapshot at %s (%d learns); reading the stream after it",
                     "started from" if after == "0" else "behind the trimmed stream, started over from", found[0], applied)
        return adopted

    def _compact(self) -> None:
        """Fold the stream up to this host's position into a snapshot, if this host is elected
        (another host that is doing it already makes one that covers these entries)."""
        self._since_snapshot = 0  # this snapshot, or the elected host's, covers them: count again
        if not self._compactor.acquire():
            return
        try:
            with self._lock:
                position, blob, applied = self.shared.position, self.shared.snapshot(), self.shared.applied_count
            if self.link.store_snapshot(position, blob, self.host, self.keep_stream_ms):
                self._snapshot_position = position
                self.metrics.incr(COUNTER_SNAPSHOTS_STORED)
                log.info("cluster: folded the stream up to %s into a snapshot (%d learns, %d bytes) and trimmed it",
                         position, applied, len(blob))
        finally:
            self._compactor.release()

    def _swap(self) -> None:
        """Put the shared model in force. Only the thread (and start(), before it) swaps, and
        never while holding the lock: use_model takes the daemon's own locks, and the daemon
        may hold those while it calls learn() or current_model()."""
        with self._lock:
            self._dirty = False  # a learn after this point is in the model below, or swaps again
            model, changed = self.shared.model(), self.shared.take_changes()
        model.compiled = self._compiled
        model.prepare(self._swapped, changed)  # the model in force's table with the few changed weights set
        self.use_model(model)
        self._in_force = model.version
        self._swapped = model


def from_config(config: Any, base: Model, use_model: Callable[[Model], None] = lambda model: None
                ) -> ClusterLearning | None:
    """The daemon's shared learning as [cluster] configures it (the command line's, with no
    `use_model` and no thread: `learn_now`); None when it is off."""
    if not config.cluster.enabled:
        return None
    cc = config.cluster
    return ClusterLearning(link_from_config(cc), config.store.db, base, use_model, cc.host, config.classifier.max_bytes,
                           compact_every=cc.compact_every, keep_stream=cc.keep_stream)


def learn_for_every_host(config: Any, raws: list[bytes], is_spam: bool) -> list[tuple[float, float, bool]]:
    """The command line's learns with [cluster]: each message learned on the shared model as
    it stands (the latest snapshot and the stream after it, toward the cutoffs in force) and
    published for every host at once: (score before, after, counted) per message. AtlasError
    when Redis cannot take them (what was published before stays; nothing else was learned)."""
    from atlas_milter.classifier import load_model
    from atlas_milter.errors import AtlasError
    from atlas_milter.policy import resolve_cutoffs

    base = load_model(config.classifier.model or None)
    base.trusted_authserv = config.classifier.trusted_authserv_id
    cutoffs = resolve_cutoffs(config.classifier, base)
    cluster = from_config(config, base)
    cluster.link.breaker.quiet = True  # the one error line below says it
    results = []
    for raw in raws:
        try:
            results.append(cluster.learn_now(raw, is_spam, (cutoffs.spam, cutoffs.ham)))
        except RedisDown as exc:
            raise AtlasError(f"{cluster.link.breaker.name} unreachable ({exc}): {len(raws) - len(results)} of "
                             f"{len(raws)} message(s) not learned; run it again when Redis is back") from None
    return results
