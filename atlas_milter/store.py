"""Owns the verdict database at run time: `BulkOperationManager` (a bounded queue and the
single writer thread that commits N rows or every T seconds, with `flush_all()`), the
plain one-commit-per-record `DirectRecordWriter`, the process-wide store instance, and the
read queries behind `atlas-milter stats` and resumable backfill.

Threads: any thread may add records; the writer's SQLite connection belongs to the writer
thread alone. Read queries open their own short-lived read-only connection.

Must not: block a caller beyond a bounded wait, drop a record without counting and
logging it, lose a committed row, build SQL from values, or know how verdicts are made.
The schema and the connection pragmas live in `migrate.py`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import sqlite_utils

from atlas_milter.config import StoreConfig
from atlas_milter.migrate import DEFAULT_BUSY_TIMEOUT, apply_migrations, connect, now_iso, store_error
from atlas_milter.monitor import GAUGE_WRITER_QUEUE, STAGE_STORE_FLUSH, PerformanceMetrics, performance_monitor
from atlas_milter.throttle import LogThrottle

log = logging.getLogger(__name__)

# The keys a record may have: the columns of processed_emails except `id` (SQLite assigns it).
COLUMNS = (
    "source",  # milter | imap | backfill | classify | bench
    "account",  # IMAP/backfill: the --account NAME, '' for [imap] itself and for local mailboxes
    "folder",
    "uidvalidity",
    "uid",
    "queue_id",
    "message_id",
    "client_ip",
    "sender",
    "sender_domain",  # derived from `sender` when missing
    "recipients_count",
    "subject",
    "score",
    "verdict",
    "action",
    "reasons",  # a list of [feature, weight] is stored as JSON
    "model_version",
    "cache_hit",
    "elapsed_ms",
    "error",
    "note",
    "stage_ms",  # JSON: where the time went, e.g. {"parse": 0.4, "classify": 0.2, "rest": 0.1} (0008)
    "spam_cutoff",  # the cutoffs the verdict was given with (NULL: not scored, or written before 0006)
    "ham_cutoff",
    "created_at",  # filled with the current UTC time when missing
)
_COLUMN_SET = frozenset(COLUMNS)

COUNTER_ROWS_WRITTEN = "store.rows_written"
COUNTER_COMMITS = "store.commits"
COUNTER_DROPPED = "store.dropped"
COUNTER_DUPLICATES = "store.duplicates_ignored"
COUNTER_WRITE_ERRORS = "store.write_errors"
COUNTER_DB_REPLACED = "store.db_replaced"  # the file was deleted or replaced under us: writing to a new one

PUT_WAIT = 0.05  # seconds add_email_record waits for room in a full queue
DROP_LOG_INTERVAL = 10.0  # seconds between "queue full" warnings
ERROR_LOG_INTERVAL = 60.0  # seconds between repeated "write failed" lines during one outage
MAX_BACKOFF = 5.0  # seconds between retries of a failing flush, at most

# Adds the rows inserted by this flush (id > ?) to the per-domain counters.
# `IS` rather than `=`: a row without a verdict must count 0, not make the sum NULL.
_DOMAIN_UPSERT = """
INSERT INTO domains (domain, ham, spam, unsure, last_seen)
SELECT sender_domain, sum(verdict IS 'ham'), sum(verdict IS 'spam'), sum(verdict IS 'unsure'), max(created_at)
FROM processed_emails
WHERE id > ? AND sender_domain IS NOT NULL AND sender_domain != ''
GROUP BY sender_domain
ON CONFLICT(domain) DO UPDATE SET
    ham = ham + excluded.ham,
    spam = spam + excluded.spam,
    unsure = unsure + excluded.unsure,
    last_seen = max(coalesce(last_seen, ''), excluded.last_seen)
"""

_INT64 = (-(2**63), 2**63 - 1)
_SURROGATES = re.compile("[\ud800-\udfff]")


def normalise_record(record: dict[str, Any]) -> dict[str, Any]:
    """The row to insert for `record`: every column present, JSON for `reasons`, values of
    types SQLite stores. Raises ValueError for an unknown key or an unstorable value, here
    in the caller's thread, so a bad record can never block the writer."""
    unknown = record.keys() - _COLUMN_SET
    if unknown:
        raise ValueError(f"record: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(COLUMNS)})")
    row = dict.fromkeys(COLUMNS)  # every column, in order
    row.update(record)
    if row["reasons"] is not None and not isinstance(row["reasons"], str):
        try:
            row["reasons"] = json.dumps(row["reasons"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record: reasons is not JSON-serialisable: {exc}") from None
    row["cache_hit"] = int(bool(row["cache_hit"]))
    if not row["created_at"]:
        row["created_at"] = now_iso()
    if not row["sender_domain"] and isinstance(row["sender"], str) and "@" in row["sender"]:
        row["sender_domain"] = row["sender"].rpartition("@")[2].strip(" <>")
    if isinstance(row["sender_domain"], str):
        row["sender_domain"] = row["sender_domain"].lower()
    if row["uid"] is not None:
        # NULLs never collide in a UNIQUE index: give mailbox rows concrete keys.
        row["account"] = row["account"] or ""
        row["folder"] = row["folder"] or ""
        row["uidvalidity"] = row["uidvalidity"] or 0
    for column, value in row.items():
        kind = type(value)
        if value is None or kind is float or (kind is str and value.isascii()):  # most values: nothing to check
            continue
        if isinstance(value, float):
            continue
        if isinstance(value, int):  # bool included
            if not _INT64[0] <= value <= _INT64[1]:
                raise ValueError(f"record: {column}={value} does not fit in 64 bits")
        elif isinstance(value, str):
            if value.isascii():  # the common case: nothing to check
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # e.g. surrogates from a badly encoded header
                row[column] = _SURROGATES.sub("\ufffd", value)
        else:
            raise ValueError(f"record: {column} has unsupported type {type(value).__name__}")
    return row


def _describe(db_path: str, exc: BaseException) -> str:
    return str(store_error(db_path, exc)) if isinstance(exc, sqlite3.Error) else str(exc)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Writer:
    """One read-write connection and the file it was opened on. In WAL mode SQLite keeps
    writing happily into a database file that was deleted, so each write first checks
    that the path still names the same file."""

    def __init__(self, db_path: str, busy_timeout: float, check_same_thread: bool = True) -> None:
        self.db_path = db_path
        apply_migrations(db_path, busy_timeout)  # brings a new or re-created file up to date
        self.conn = connect(db_path, busy_timeout, check_same_thread=check_same_thread)
        self.file_id = _file_id(db_path)
        self.table = sqlite_utils.Database(self.conn, execute_plugins=False).table("processed_emails")

    def same_file(self) -> bool:
        return self.file_id is not None and _file_id(self.db_path) == self.file_id

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Insert `rows` (duplicates ignored) and update the domain counters in ONE
        transaction; return how many rows were inserted. Rolls back and raises on failure."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")  # take the write lock up front (waits busy_timeout)
        try:
            before = conn.execute("SELECT coalesce(max(id), 0) FROM processed_emails").fetchone()[0]
            # Inside our transaction sqlite-utils uses savepoints, so nothing commits early.
            self.table.insert_all(rows, ignore=True, batch_size=len(rows))
            inserted = conn.execute("SELECT count(*) FROM processed_emails WHERE id > ?", (before,)).fetchone()[0]
            if inserted:
                conn.execute(_DOMAIN_UPSERT, (before,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the caller drops this connection anyway
            raise
        return inserted

    def close(self) -> None:
        self.conn.close()


def _usable_writer(writer: _Writer | None, db_path: str, busy_timeout: float, check_same_thread: bool = True) -> _Writer:
    """`writer` if it is still writing to the file at `db_path`, else a new one."""
    if writer is not None and writer.same_file():
        return writer
    if writer is not None:
        log.warning("store: database %s was deleted or replaced; writing to a new one", db_path)
        writer.close()
    return _Writer(db_path, busy_timeout, check_same_thread)


class BulkOperationManager:
    """Queues records and commits them in batches from one writer thread.

    A flush happens when `batch_size` rows are waiting, when the oldest waiting row is
    `flush_interval` seconds old, or on `flush_all()`. A failed flush keeps its rows and is
    retried with backoff; while it fails, the queue (waiting + in-flight rows, at most
    `queue_size`) fills and further records are refused: counted, logged, False returned.
    """

    def __init__(
        self,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        queue_size: int = 10000,
        db_path: str | Path | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if batch_size < 1 or queue_size < 1 or flush_interval <= 0:
            raise ValueError("batch_size and queue_size must be at least 1, flush_interval positive")
        self.db_path = str(db_path if db_path is not None else StoreConfig().db)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.busy_timeout = busy_timeout
        self._metrics = PerformanceMetrics.get_instance()
        self._cond = threading.Condition()
        self._pending: deque[dict[str, Any]] = deque()
        self._inflight: list[dict[str, Any]] = []  # taken by the writer, not yet committed
        self._first_pending_at = 0.0
        self._added = 0  # records accepted since start
        self._done = 0  # of those, committed (inserted or ignored as duplicate)
        self._flush_target = 0  # flush_all() wants _done to reach this
        self._closed = False  # close() called: refuse new records
        self._stopping = False  # the writer should exit
        self._counts = {"written": 0, "commits": 0, "dropped": 0, "duplicates_ignored": 0, "write_errors": 0,
                        "db_replaced": 0}
        self._last_error = ""
        self._drop_log = LogThrottle(DROP_LOG_INTERVAL)
        apply_migrations(self.db_path, busy_timeout)  # fail here, loudly, if the db is unusable
        self._thread = threading.Thread(target=self._run, name="atlas-store-writer", daemon=True)
        self._thread.start()

    @classmethod
    def get_instance(cls) -> BulkOperationManager | DirectRecordWriter:
        """The process-wide store (see `configure_store`); created with defaults on first use."""
        global _instance
        with _instance_lock:
            if _instance is None:
                _instance = cls()
            return _instance

    # -- callers' side -----------------------------------------------------------------

    def add_email_record(self, record: dict[str, Any]) -> bool:
        """Queue one record; True when accepted. False when the queue stayed full for
        PUT_WAIT seconds or the store is closed (the record is counted as dropped)."""
        row = normalise_record(record)
        with self._cond:
            if not self._closed and self._depth() >= self.queue_size:
                self._cond.wait_for(lambda: self._closed or self._depth() < self.queue_size, PUT_WAIT)
            if self._closed or self._depth() >= self.queue_size:
                self._count_drop_locked("store closed" if self._closed else f"queue full ({self.queue_size} records)")
                return False
            self._pending.append(row)
            self._added += 1
            if len(self._pending) == 1:  # the writer starts the flush_interval clock
                self._first_pending_at = time.monotonic()
                self._cond.notify_all()
            elif len(self._pending) == self.batch_size:
                self._cond.notify_all()
        return True

    def flush_all(self, timeout: float | None = None) -> bool:
        """Commit every record accepted before this call; True once they are durable,
        False on timeout (or if the writer has stopped)."""
        with self._cond:
            target = self._added
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)
            return self._done >= target

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush (waiting at most `timeout` seconds) and stop the writer; True when nothing
        was lost. Records still unwritten after the timeout are counted as dropped."""
        with self._cond:
            self._closed = True
        flushed = self.flush_all(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(self.busy_timeout + 1.0)
        return flushed

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"mode": "bulk", "queued": self._depth(), **self._counts, "last_error": self._last_error}

    def _depth(self) -> int:
        return len(self._pending) + len(self._inflight)

    def _count_drop_locked(self, reason: str) -> None:
        self._counts["dropped"] += 1
        self._metrics.incr(COUNTER_DROPPED)
        if self._drop_log.due() is not None:
            log.warning(
                "store: %s, record dropped; %d dropped so far (last write error: %s); "
                "fix the write error, or raise [performance] queue_size to ride out longer outages",
                reason,
                self._counts["dropped"],
                self._last_error or "none",
            )

    # -- the writer thread -------------------------------------------------------------

    def _next_batch(self) -> list[dict[str, Any]] | None:
        """Wait until a flush is due; the rows to write, or None to stop."""
        with self._cond:
            while not self._stopping:
                if self._inflight:  # a failed batch, retried first and unchanged
                    return self._inflight
                n = len(self._pending)
                wait: float | None = None  # nothing waiting: sleep until a record arrives
                if n:
                    wait = self._first_pending_at + self.flush_interval - time.monotonic()
                    if n >= self.batch_size or self._flush_target > self._done or wait <= 0:
                        self._inflight = [self._pending.popleft() for _ in range(min(n, self.batch_size))]
                        if self._pending:
                            self._first_pending_at = time.monotonic()
                        return self._inflight
                self._cond.wait(wait)
            return None

    def _run(self) -> None:
        writer: _Writer | None = None  # this thread's alone
        failures = 0
        failing_since = 0.0
        error_log = LogThrottle(ERROR_LOG_INTERVAL)
        last_logged = ""  # a new cause (e.g. locked, then read-only) is logged at once
        try:
            while (rows := self._next_batch()) is not None:
                try:
                    with performance_monitor(STAGE_STORE_FLUSH):
                        previous, writer = writer, _usable_writer(writer, self.db_path, self.busy_timeout)
                        if previous is not None and writer is not previous:
                            with self._cond:
                                self._counts["db_replaced"] += 1
                            self._metrics.incr(COUNTER_DB_REPLACED)
                        inserted = writer.write(rows)
                except Exception as exc:
                    failures += 1
                    error = _describe(self.db_path, exc)
                    if writer is not None:  # reopen next time: the cause may be a replaced file
                        writer.close()
                        writer = None
                    with self._cond:
                        self._counts["write_errors"] += 1
                        self._last_error = error
                        self._metrics.incr(COUNTER_WRITE_ERRORS)
                        depth = self._depth()
                        self._metrics.set_gauge(GAUGE_WRITER_QUEUE, depth)
                    now = time.monotonic()
                    if failures == 1:
                        failing_since = now
                    # The first failure and a new cause (e.g. locked, then read-only) are logged at once.
                    if error_log.due(force=failures == 1 or error != last_logged) is not None:
                        last_logged = error
                        log.error(
                            "store: writing %d rows failed (attempt %d, will retry; %d records queued, at most %d): %s",
                            len(rows), failures, depth, self.queue_size, error,
                        )
                    with self._cond:
                        self._cond.wait_for(lambda: self._stopping, min(MAX_BACKOFF, 0.05 * 2**failures))
                    continue
                if failures:
                    log.warning(
                        "store: writing to %s resumed after %d failed attempts (%.1f s); queued records are being written",
                        self.db_path, failures, time.monotonic() - failing_since,
                    )
                    failures, last_logged = 0, ""
                with self._cond:
                    self._inflight = []
                    self._done += len(rows)
                    self._counts["written"] += inserted
                    self._counts["duplicates_ignored"] += len(rows) - inserted
                    self._counts["commits"] += 1
                    depth = self._depth()
                    self._cond.notify_all()
                self._metrics.incr(COUNTER_ROWS_WRITTEN, inserted)
                self._metrics.incr(COUNTER_COMMITS)
                if len(rows) > inserted:
                    self._metrics.incr(COUNTER_DUPLICATES, len(rows) - inserted)
                self._metrics.set_gauge(GAUGE_WRITER_QUEUE, depth)
        except BaseException:
            log.exception("store: writer thread crashed")
            raise
        finally:
            if writer is not None:
                writer.close()
            with self._cond:
                lost = self._depth()
                if lost:
                    self._pending.clear()
                    self._inflight = []
                    self._counts["dropped"] += lost
                    self._metrics.incr(COUNTER_DROPPED, lost)
                    log.error("store: stopped with %d records unwritten (last error: %s)", lost, self._last_error)
                self._stopping = True
                self._cond.notify_all()


class DirectRecordWriter:
    """The plain path (ENABLE_BULK_OPS off): one INSERT and one COMMIT per record in the
    caller's thread, same schema and pragmas as the bulk writer. A lock serialises callers."""

    def __init__(self, db_path: str | Path | None = None, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.db_path = str(db_path if db_path is not None else StoreConfig().db)
        self.busy_timeout = busy_timeout
        self._metrics = PerformanceMetrics.get_instance()
        self._lock = threading.Lock()
        self._counts = {"written": 0, "commits": 0, "dropped": 0, "duplicates_ignored": 0, "write_errors": 0}
        self._last_error = ""
        self._closed = False
        # Shared by the callers' threads, one at a time under self._lock.
        self._writer: _Writer | None = _Writer(self.db_path, busy_timeout, check_same_thread=False)

    def add_email_record(self, record: dict[str, Any]) -> bool:
        """Write one record now; True when committed. A failed write is logged and the
        record counted as dropped (there is no queue to keep it in)."""
        row = normalise_record(record)
        with self._lock:
            if self._closed:
                self._counts["dropped"] += 1
                self._metrics.incr(COUNTER_DROPPED)
                log.warning("store: closed, record dropped")
                return False
            try:
                with performance_monitor(STAGE_STORE_FLUSH):
                    self._writer = _usable_writer(self._writer, self.db_path, self.busy_timeout, False)
                    inserted = self._writer.write([row])
            except Exception as exc:
                error = _describe(self.db_path, exc)
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                self._counts["write_errors"] += 1
                self._counts["dropped"] += 1
                self._last_error = error
                self._metrics.incr(COUNTER_WRITE_ERRORS)
                self._metrics.incr(COUNTER_DROPPED)
                log.error("store: writing a record failed, record dropped: %s", error)
                return False
            self._counts["commits"] += 1
            self._counts["written"] += inserted
            self._counts["duplicates_ignored"] += 1 - inserted
        self._metrics.incr(COUNTER_COMMITS)
        self._metrics.incr(COUNTER_ROWS_WRITTEN, inserted)
        if not inserted:
            self._metrics.incr(COUNTER_DUPLICATES)
        return True

    def flush_all(self, timeout: float | None = None) -> bool:
        """Every accepted record is already committed."""
        return True

    def close(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": "direct", "queued": 0, **self._counts, "last_error": self._last_error}


# -- the process-wide store ------------------------------------------------------------

_instance: BulkOperationManager | DirectRecordWriter | None = None
_instance_lock = threading.Lock()


def configure_store(
    db_path: str | Path,
    batch_size: int = 500,
    flush_interval: float = 1.0,
    queue_size: int = 10000,
    bulk: bool = True,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> BulkOperationManager | DirectRecordWriter:
    """Create the process-wide store (bulk writer, or the direct one when `bulk` is False),
    closing any previous one first; raises StoreError if the database is unusable."""
    global _instance
    with _instance_lock:
        old, _instance = _instance, None
    if old is not None:
        old.close()
    store: BulkOperationManager | DirectRecordWriter
    if bulk:
        store = BulkOperationManager(batch_size, flush_interval, queue_size, db_path, busy_timeout)
    else:
        store = DirectRecordWriter(db_path, busy_timeout)
    with _instance_lock:
        _instance = store
    return store


def current_store() -> BulkOperationManager | DirectRecordWriter | None:
    """The process-wide store if one was configured, else None (never creates one)."""
    return _instance
