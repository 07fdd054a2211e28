"""Owns the database schema and how a connection to it is opened.

Applies `migrations/NNNN_name.sql` (shipped inside the package) in order, each in its own
transaction, records them in `schema_migrations`, and undoes the last one from the
`-- rollback:` comment block at the end of its file. `connect()` opens every read-write
connection with the same pragmas (WAL, synchronous=FULL, busy timeout), so every writer
has the same durability.

Must not: know about records, queues or threads (that is `store.py`), or build SQL from
values. Every sqlite3 error leaves as a one-line `StoreError` saying what to do.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Iterator

from atlas_milter.errors import StoreError

# Found through importlib.resources, never relative to a checkout: in an installed wheel the
# files are wherever the package is (package-data in pyproject.toml).
MIGRATIONS_DIR: Traversable = resources.files("atlas_milter").joinpath("migrations")
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a statement waits for another process's lock
_MIGRATION_FILE = re.compile(r"^(\d{4})_\w+\.sql$")
_ROLLBACK_MARKER = "-- rollback:"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without .sql, e.g. "0002_add_performance_indexes"
    path: Traversable  # importlib.resources' view of the file (a Path when the package is on disk)

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def rollback_sql(self) -> str:
        """The statements commented out after the `-- rollback:` line, uncommented."""
        lines = self.sql().splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip().lower() == _ROLLBACK_MARKER)
        except StopIteration:
            return ""
        body = []
        for line in lines[start + 1 :]:
            stripped = line.strip()
            if stripped.startswith("--"):
                body.append(stripped[2:].strip())
        return "\n".join(body).strip()


def now_iso() -> str:
    """The current time as UTC ISO-8601 with milliseconds, the format of every timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def store_error(db_path: str | Path, exc: BaseException) -> StoreError:
    """Translate a sqlite3/OS error into a one-line StoreError that says what to do."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = msg.lower()
    if "locked" in low or "busy" in low:
        text = f"database {db_path} is locked by another process; stop it or retry"
    elif "not a database" in low or "malformed" in low:
        text = f"{db_path} is not a usable SQLite database ({msg}); move it aside or point [store] db elsewhere"
    elif "unable to open" in low:
        text = f"cannot open database {db_path}; check that it exists and its directory is writable"
    elif "readonly" in low or "read-only" in low:
        text = f"database {db_path} is read-only; check the permissions of the file and its directory"
    elif "disk is full" in low or "disk full" in low:
        text = f"disk full while writing database {db_path}; free some space and retry"
    else:
        text = f"database {db_path}: {msg}"
    return StoreError(text)


def connect(db_path: str | Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open `db_path` read-write (creating it) with WAL, synchronous=FULL and a busy timeout."""
    try:
        conn = sqlite3.connect(str(db_path), timeout=busy_timeout, check_same_thread=check_same_thread)
    except sqlite3.Error as exc:
        raise store_error(db_path, exc) from None
    try:
        _use_wal(conn, busy_timeout)
        # FULL: a COMMIT is on disk when it returns; flush_all() promises exactly that.
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise store_error(db_path, exc) from None
    return conn


def _use_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Put the database in WAL mode (it stays so: a file in WAL mode needs nothing). Switching
    needs the database to itself, and SQLite answers "locked" at once, without waiting
    out the busy timeout, when another process has it open in a transaction: several
    daemons starting on a new database at once. So retry until the busy timeout."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def connect_readonly(db_path: str | Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> sqlite3.Connection:
    """Open an existing `db_path` read-only (a `file:...?mode=ro` URI)."""
    path = Path(db_path)
    if not path.exists():
        raise StoreError(f"database {db_path} does not exist; classify some mail first or check [store] db")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise store_error(db_path, exc) from None
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "not a database" shows here
    except sqlite3.Error as exc:
        conn.close()
        raise store_error(db_path, exc) from None
    return conn


def available_migrations(directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    """The NNNN_*.sql files in `directory`, in version order (other names are ignored)."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"migrations: {path.name} and {found[version].path.name} share version {version}")
        found[version] = Migration(version, path.name.removesuffix(".sql"), path)
    return [found[v] for v in sorted(found)]


def split_statements(sql: str) -> list[str]:
    """Split a script into single statements (comments and string literals respected), so
    a script can run inside a transaction we control: sqlite3's executescript() would
    commit first."""
    statements, start = [], 0
    for i, ch in enumerate(sql):
        if ch == ";" and sqlite3.complete_statement(sql[start : i + 1]):
            statements.append(sql[start : i + 1].strip())
            start = i + 1
    rest = sql[start:].strip()
    if rest:  # trailing comments (a no-op) or an unterminated statement (sqlite reports it)
        statements.append(rest)
    return statements


def _run_script(conn: sqlite3.Connection, sql: str) -> None:
    for statement in split_statements(sql):
        conn.execute(statement)


def _ensure_migrations_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )


def _applied(conn: sqlite3.Connection) -> dict[int, tuple[str, str]]:
    rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    return {version: (name, applied_at) for version, name, applied_at in rows}


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock up front) … COMMIT, or ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def apply_migrations(
    db_path: str | Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, directory: Traversable = MIGRATIONS_DIR
) -> list[str]:
    """Apply the pending migrations in order, one transaction each; return their names.

    Safe when several processes start at once: each migration is re-checked after the
    write lock is taken, so it is applied exactly once.
    """
    migrations = available_migrations(directory)
    conn = connect(db_path, busy_timeout)
    done: list[str] = []
    try:
        _ensure_migrations_table(conn)
        applied = _applied(conn)
        for migration in migrations:
            if migration.version in applied:
                continue
            with _write_transaction(conn):
                exists = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
                ).fetchone()
                if not exists:
                    _run_script(conn, migration.sql())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.name, now_iso()),
                    )
                    done.append(migration.name)
    except sqlite3.Error as exc:
        raise store_error(db_path, exc) from None
    finally:
        conn.close()
    return done


def rollback_last(
    db_path: str | Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, directory: Traversable = MIGRATIONS_DIR
) -> str | None:
    """Undo the most recently applied migration (its rollback block and its record) in one
    transaction; return its name, or None when nothing is applied."""
    by_version = {m.version: m for m in available_migrations(directory)}
    conn = connect(db_path, busy_timeout)
    try:
        _ensure_migrations_table(conn)
        with _write_transaction(conn):
            row = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchone()
            if row is None:
                return None
            version, name = row
            migration = by_version.get(version)
            if migration is None:
                raise StoreError(f"migration {name} is recorded in {db_path} but its file is missing; reinstall atlas-milter")
            rollback = migration.rollback_sql()
            if not rollback:
                raise StoreError(f"migration {name} has no '-- rollback:' block; undo it by hand")
            _run_script(conn, rollback)
            conn.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))
            return name
    except sqlite3.Error as exc:
        raise store_error(db_path, exc) from None
    finally:
        conn.close()


def migration_status(db_path: str | Path, directory: Traversable = MIGRATIONS_DIR) -> list[dict]:
    """Every known migration with its state: {"version", "name", "status": "applied" |
    "pending", "applied_at"}. Read-only; a database that does not exist yet has all pending."""
    applied: dict[int, tuple[str, str]] = {}
    if Path(db_path).exists():
        conn = connect_readonly(db_path)
        try:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            if has_table:
                applied = _applied(conn)
        except sqlite3.Error as exc:
            raise store_error(db_path, exc) from None
        finally:
            conn.close()
    status = []
    for migration in available_migrations(directory):
        _, applied_at = applied.get(migration.version, (None, None))
        status.append(
            {
                "version": migration.version,
                "name": migration.name,
                "status": "applied" if applied_at else "pending",
                "applied_at": applied_at,
            }
        )
    return status
