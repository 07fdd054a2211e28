"""Owns shipping a host's verdict records to PostgreSQL when [store] url is set: the local
SQLite database stays the durable outbox (every record is written there first, as
without PostgreSQL), and a background thread copies what is new to PostgreSQL in batches.

Exactly once: every row carries the database's own id (`db_id`, made once per SQLite file)
and its local row id, the primary key in PostgreSQL. A batch goes in with COPY into a
temporary table and one `INSERT ... ON CONFLICT DO NOTHING`; only then does the local
mark move. A crash between the two sends the batch again and the conflict drops what
arrived the first time. The per-domain counters are added from the rows that were really
inserted, in the same transaction, so a replay never counts twice.

While PostgreSQL is down, rows wait in SQLite and the breaker keeps calls away (one log
line per change of state); mail never waits for PostgreSQL.

The IMAP listener's folder marks (how far it looked at Junk) are shipped too, upserted
(a mark never moves back), for a host that takes an account over (shared_records.py).

Threads: one thread ("atlas-pg-ship"). Must not: be on the per-message path, or write the
verdict database except its shipping mark (journal.py).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, TypeVar

from atlas_milter import journal, queries
from atlas_milter.breaker import Breaker
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.signals import RELOAD_SIGNAL, STOP_SIGNALS, blocked
from atlas_milter.store import COLUMNS

log = logging.getLogger(__name__)
T = TypeVar("T")

TARGET = "postgresql"
GAUGE_BACKLOG = "store.pg_backlog"
GAUGE_PG_UP = "store.pg_up"
COUNTER_SHIPPED = "store.pg_rows_shipped"
CONNECT_TIMEOUT = 2  # seconds
FLEET_EVERY = 5.0  # seconds between refreshes of the every-host summary /performance shows
_current: "Shipper | None" = None  # the running daemon's, for /performance
STATEMENT_TIMEOUT_MS = 10000
STEP_LIMIT = 12.0  # seconds one batch (or connect) may take before its connection is cut: a hung server

# Column types in PostgreSQL for the SQLite columns (store.COLUMNS), in that order.
_PG_TYPES = {"uidvalidity": "BIGINT", "uid": "BIGINT", "recipients_count": "INTEGER", "score": "DOUBLE PRECISION",
             "cache_hit": "INTEGER", "elapsed_ms": "DOUBLE PRECISION", "spam_cutoff": "DOUBLE PRECISION",
             "ham_cutoff": "DOUBLE PRECISION", "created_at": "TIMESTAMPTZ"}
SHIPPED_COLUMNS = ("db_id", "local_id", "host", *COLUMNS)
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS verdicts (db_id TEXT NOT NULL, local_id BIGINT NOT NULL, host TEXT NOT NULL, "
    + ", ".join(f"{c} {_PG_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    + ", PRIMARY KEY (db_id, local_id))",
    "CREATE INDEX IF NOT EXISTS verdicts_created_at ON verdicts (created_at)",
    "CREATE INDEX IF NOT EXISTS verdicts_queue_id ON verdicts (queue_id)",
    "CREATE INDEX IF NOT EXISTS verdicts_message_id ON verdicts (message_id)",  # shared_records.py's lookups
    "CREATE INDEX IF NOT EXISTS verdicts_mailbox ON verdicts (account, folder, uidvalidity, uid)",
    "CREATE TABLE IF NOT EXISTS folder_marks (account TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity BIGINT NOT NULL, "
    "last_uid BIGINT NOT NULL, PRIMARY KEY (account, folder, uidvalidity))",
    "CREATE TABLE IF NOT EXISTS domains (domain TEXT PRIMARY KEY, ham BIGINT NOT NULL DEFAULT 0, "
    "spam BIGINT NOT NULL DEFAULT 0, unsure BIGINT NOT NULL DEFAULT 0, last_seen TIMESTAMPTZ)",
)
_INSERT = f"""
WITH new AS (
    INSERT INTO verdicts ({', '.join(SHIPPED_COLUMNS)}) SELECT {', '.join(SHIPPED_COLUMNS)} FROM incoming
    ON CONFLICT DO NOTHING RETURNING sender_domain, verdict, created_at
)
INSERT INTO domains (domain, ham, spam, unsure, last_seen)
SELECT sender_domain, count(*) FILTER (WHERE verdict = 'ham'), count(*) FILTER (WHERE verdict = 'spam'),
       count(*) FILTER (WHERE verdict = 'unsure'), max(created_at)
FROM new WHERE sender_domain IS NOT NULL GROUP BY sender_domain
ON CONFLICT (domain) DO UPDATE SET ham = domains.ham + excluded.ham, spam = domains.spam + excluded.spam,
    unsure = domains.unsure + excluded.unsure, last_seen = greatest(domains.last_seen, excluded.last_seen)
"""


class Shipper:
    """Copies new verdict rows of `db` to PostgreSQL at `url` every `interval` seconds."""

    def __init__(self, db: str, url: str, host: str, password: str = "", interval: float = 1.0, batch: int = 1000,
                 cooldown: float = 2.0, metrics: PerformanceMetrics | None = None) -> None:
        self.db = db
        self.url = url
        self.host = host
        self.password = password
        self.interval = interval
        self.batch = batch
        self.metrics = metrics or PerformanceMetrics.get_instance()
        where = url.split("@")[-1]  # never the password
        self.breaker = Breaker(cooldown, f"store: PostgreSQL at {where}", "verdicts wait in the local database")
        self._conn: Any = None
        self._marks_shipped: dict[tuple, int] = {}  # (account, folder, uidvalidity) -> last_uid in PostgreSQL
        self.fleet: dict[str, Any] | None = None  # every host's last hour, as of the last refresh_fleet()
        self._fleet_due = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Shipper":
        global _current
        self._thread = threading.Thread(target=self._run, name="atlas-pg-ship", daemon=True)
        with blocked(STOP_SIGNALS | {RELOAD_SIGNAL}):
            self._thread.start()
        _current = self
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after one last round (what the daemon wrote before stopping is shipped if it can be)."""
        global _current
        if _current is self:
            _current = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            if self.breaker.allow():
                try:
                    while self._guarded(self.ship_once) == self.batch:  # a backlog: keep going
                        pass
                    self._guarded(self.ship_folder_marks)
                    if time.monotonic() >= self._fleet_due:
                        self.fleet = self._guarded(self.refresh_fleet)
                    self.breaker.success()
                    self.metrics.set_gauge(GAUGE_PG_UP, 1)
                except Exception as exc:  # psycopg.Error, OSError: PostgreSQL down or refusing
                    self._drop_connection()
                    self.breaker.failure(type(exc).__name__)
                    self.metrics.set_gauge(GAUGE_PG_UP, 0)
            if stopping:
                return

    def _guarded(self, step: Callable[[], T]) -> T:
        """`step()`, its connection's socket cut if it takes longer than STEP_LIMIT: a hung
        server (frozen, or a network that drops packets) answers no statement_timeout, and
        libpq would wait on it for as long as TCP lets it. The blocked call then fails, the
        breaker opens, and the rows wait locally (the batch goes again: written once)."""
        def cut() -> None:
            conn = self._conn
            if conn is not None and not conn.closed:
                try:
                    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:
                        sock.shutdown(socket.SHUT_RDWR)  # a duplicate descriptor of the same socket
                except OSError:
                    pass
                log.warning("store: PostgreSQL gave no answer within %g s; cutting the connection", STEP_LIMIT)

        timer = threading.Timer(STEP_LIMIT, cut)
        timer.daemon = True
        timer.start()
        try:
            return step()
        finally:
            timer.cancel()

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, self.password)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def ship_once(self) -> int:
        """Ship the next batch of rows; how many were sent (0: nothing new)."""
        db_id, after = journal.ship_mark(self.db, TARGET)
        rows = queries.rows_after(self.db, after, self.batch, COLUMNS)
        self.metrics.set_gauge(GAUGE_BACKLOG, queries.rows_waiting(self.db, after))
        if not rows:
            return 0
        conn = self._connect()
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS incoming (LIKE verdicts) ON COMMIT DELETE ROWS")
            with conn.cursor().copy(f"COPY incoming ({', '.join(SHIPPED_COLUMNS)}) FROM STDIN") as copy:
                for local_id, *values in rows:
                    copy.write_row((db_id, local_id, self.host, *values))
            conn.execute(_INSERT)
        journal.set_ship_mark(self.db, TARGET, rows[-1][0])  # after the commit: a crash here only resends
        self.metrics.incr(COUNTER_SHIPPED, len(rows))
        return len(rows)

    def refresh_fleet(self) -> dict[str, Any]:
        """Every host's verdicts of the last hour in PostgreSQL (read through the created_at
        index), for /performance: per host, messages in the last 5 minutes and hour, spam
        among them, and its latest record."""
        self._fleet_due = time.monotonic() + FLEET_EVERY
        rows = self._connect().execute(
            "SELECT host, count(*) FILTER (WHERE created_at > now() - interval '5 minutes'), "
            "count(*) FILTER (WHERE created_at > now() - interval '5 minutes' AND verdict = 'spam'), "
            "count(*), count(*) FILTER (WHERE verdict = 'spam'), max(created_at) "
            "FROM verdicts WHERE created_at > now() - interval '1 hour' GROUP BY host ORDER BY host").fetchall()
        self._conn.rollback()  # a read: leave no transaction open
        hosts = {host: {"last_5m": m5, "spam_5m": s5, "last_hour": h, "spam_hour": sh, "latest": latest.isoformat()}
                 for host, m5, s5, h, sh, latest in rows}
        return {"as_of": round(time.time(), 3), "this_host": self.host, "hosts": hosts}

    def ship_folder_marks(self) -> None:
        """The IMAP listener's folder marks (a handful of rows): upserted, never moving back."""
        marks = [m for m in queries.all_folder_marks(self.db) if self._marks_shipped.get(m[:3]) != m[3]]
        if not marks:
            return
        conn = self._connect()
        with conn.transaction():
            conn.cursor().executemany(
                "INSERT INTO folder_marks (account, folder, uidvalidity, last_uid) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (account, folder, uidvalidity) DO UPDATE SET "
                "last_uid = greatest(folder_marks.last_uid, excluded.last_uid)", marks)
        self._marks_shipped.update((m[:3], m[3]) for m in marks)


PG_PASSWORD_ENV = "ATLAS_PG_PASSWORD"
PG_PASSWORD_CREDENTIAL = "pg-password"


def connect(url: str, password: str = "", *, autocommit: bool = False,
            statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> Any:
    """A psycopg connection to the shared store with its limits (CONNECT_TIMEOUT to connect,
    `statement_timeout_ms` per statement, 0 = none), the tables created if missing: no host
    may have shipped yet."""
    import psycopg

    conn = psycopg.connect(url, password=password or None, connect_timeout=CONNECT_TIMEOUT, autocommit=autocommit,
                           options=f"-c statement_timeout={statement_timeout_ms}")
    with conn.transaction():
        for statement in SCHEMA:
            conn.execute(statement)
    return conn


def current() -> Shipper | None:
    """The shipper this process runs, or None ([store] url not set, or not started)."""
    return _current


def from_config(config: Any) -> Shipper | None:
    """The daemon's shipper as [store] url configures it; None without one."""
    import socket

    from atlas_milter.secrets import read_secret

    sc = config.store
    if not sc.url:
        return None
    password = read_secret(sc.password_file, PG_PASSWORD_ENV, PG_PASSWORD_CREDENTIAL, "[store] password_file")
    host = config.cluster.host or socket.gethostname()
    return Shipper(sc.db, sc.url, host, password, sc.ship_interval)


def query_stats(url: str, password: str = "", top: int = 10) -> dict[str, Any]:
    """`atlas-milter stats` over every host's verdicts in PostgreSQL: the same figures as
    queries.query_stats gives for one SQLite database, and per host. AtlasError when
    PostgreSQL cannot be reached."""
    import psycopg

    from atlas_milter.errors import AtlasError

    try:
        with connect(url, password, statement_timeout_ms=0) as conn:
            total, first, last = conn.execute("SELECT count(*), min(created_at), max(created_at) FROM verdicts").fetchone()
            by = {}
            for column in ("verdict", "action", "host"):  # fixed names, never user input
                by[column] = dict(conn.execute(f"SELECT coalesce({column}, ''), count(*) FROM verdicts "
                                               f"GROUP BY 1 ORDER BY 2 DESC, 1").fetchall())
            domains = [{"domain": d, "count": ham + spam + unsure, "ham": ham, "spam": spam, "unsure": unsure,
                        "last_seen": seen.isoformat() if seen else None}
                       for d, ham, spam, unsure, seen in conn.execute(
                           "SELECT domain, ham, spam, unsure, last_seen FROM domains "
                           "ORDER BY ham + spam + unsure DESC, domain LIMIT %s", (top,))]
            p50, p95, p99, top_ms = conn.execute(
                "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY elapsed_ms), "
                "percentile_disc(0.95) WITHIN GROUP (ORDER BY elapsed_ms), "
                "percentile_disc(0.99) WITHIN GROUP (ORDER BY elapsed_ms), max(elapsed_ms) FROM verdicts").fetchone()
    except psycopg.Error as exc:
        where = url.split("@")[-1]
        raise AtlasError(f"PostgreSQL at {where}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    return {"total": total, "first": first.isoformat() if first else None, "last": last.isoformat() if last else None,
            "by_verdict": by["verdict"], "by_action": by["action"], "by_host": by["host"], "top_domains": domains,
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "max": top_ms}, "source": "postgresql"}
