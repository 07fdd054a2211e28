"""Owns the IMAP listener's questions about earlier records when several hosts share one
verdict store ([store] url): the latest verdict of a Message-ID in an account, the highest
UID with a verdict in a mailbox, the Junk folder's mark, and the UIDs recorded as moved.

Each answer merges the local database's (rows not shipped yet are only there) with what
every host shipped to PostgreSQL (pg_ship.py). So a listener that took an account over from
another host (leases.py) resumes where that host stopped, and a message the user moves into
Junk is judged against the verdict the other host gave it.

PostgreSQL down, refusing or hung: the local answer alone, at once. Every query runs on one
worker thread and is waited for at most LOOKUP_TIMEOUT; a breaker keeps queries away for a
cool-down after a failure (one log line per change of state), and while a query hangs no
other is sent.

Must not: write anything, or be on the milter's path.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from datetime import datetime, timezone
from typing import Any

from atlas_milter import queries
from atlas_milter.breaker import Breaker
from atlas_milter.queries import PriorRecord

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 1.0  # seconds a lookup waits for PostgreSQL before answering from the local database


class SharedRecords:
    """Every host's records in PostgreSQL at `url`; `query()` answers None when it cannot."""

    def __init__(self, url: str, password: str = "", cooldown: float = 5.0) -> None:
        self.url = url
        self.password = password
        self.breaker = Breaker(cooldown, f"store: PostgreSQL at {url.split('@')[-1]}",
                               "the IMAP listener reads this host's records only", "reading every host's records")
        self._conn: Any = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="atlas-pg-lookup")
        self._running: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    def query(self, sql: str, params: tuple) -> list[tuple] | None:
        """The rows of `sql`, or None when PostgreSQL cannot answer within LOOKUP_TIMEOUT."""
        with self._lock:  # one at a time (the listener's watchers ask from their own threads)
            return self._query(sql, params)

    def _query(self, sql: str, params: tuple) -> list[tuple] | None:
        if self._running is not None and not self._running.done():
            return None  # the last query still hangs: do not queue behind it
        if not self.breaker.allow():
            return None
        self._running = self._worker.submit(self._run, sql, params)
        try:
            rows = self._running.result(LOOKUP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            self.breaker.failure(f"no answer within {LOOKUP_TIMEOUT:g} s")
            return None
        except Exception as exc:  # psycopg.Error, OSError: down or refusing
            self._conn = None
            self.breaker.failure(type(exc).__name__)
            return None
        self.breaker.success()
        return rows

    def _run(self, sql: str, params: tuple) -> list[tuple]:
        from atlas_milter.pg_ship import connect

        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, self.password, autocommit=True, statement_timeout_ms=2000)
        return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._conn is not None and (self._running is None or self._running.done()):
            self._conn.close()


class Lookups:
    """The listener's lookups for one account (`account`: connection.account_key): the local
    database's answer, merged with every host's when `shared` is set."""

    def __init__(self, db: str, account: str, shared: SharedRecords | None = None) -> None:
        self.db = db
        self.account = account
        self.shared = shared

    def last_record(self, message_id: str, except_action: str) -> PriorRecord | None:
        """queries.last_record, the newest of this host's and every host's."""
        local = queries.last_record(self.db, message_id, except_action, account=self.account)
        rows = self._shared(
            "SELECT verdict, score, coalesce(action, ''), coalesce(folder, ''), uid, coalesce(sender_domain, ''), "
            "created_at FROM verdicts WHERE message_id = %s AND coalesce(action, '') != %s "
            "AND (account = %s OR account IS NULL) ORDER BY created_at DESC LIMIT 1",
            (message_id, except_action, self.account))
        if not rows:
            return local
        *fields, created = rows[0]
        shared = PriorRecord(*fields, created_at=created.isoformat())
        return shared if local is None or _when(shared.created_at) > _when(local.created_at) else local

    def highest_uid(self, folder: str, uidvalidity: int) -> int | None:
        local = queries.highest_uid(self.db, folder, uidvalidity, account=self.account)
        rows = self._shared("SELECT max(uid) FROM verdicts WHERE account = %s AND folder = %s AND uidvalidity = %s",
                            (self.account, folder, uidvalidity))
        return _highest(local, rows[0][0] if rows else None)

    def folder_mark(self, folder: str, uidvalidity: int) -> int | None:
        local = queries.folder_mark(self.db, folder, uidvalidity, account=self.account)
        rows = self._shared("SELECT last_uid FROM folder_marks WHERE account = %s AND folder = %s AND uidvalidity = %s",
                            (self.account, folder, uidvalidity))
        return _highest(local, rows[0][0] if rows else None)

    def uids_with_action(self, folder: str, uidvalidity: int, action: str) -> dict[int, str]:
        found = dict(self._shared(
            "SELECT uid, coalesce(message_id, '') FROM verdicts WHERE account = %s AND folder = %s AND uidvalidity = %s "
            "AND action = %s AND uid IS NOT NULL", (self.account, folder, uidvalidity, action)) or [])
        found.update(queries.uids_with_action(self.db, folder, uidvalidity, action, account=self.account))
        return found

    def already_learned(self, message_id: str, label: str) -> bool:
        """This host's learns only: with [cluster] the shared stream counts a message learned
        on two hosts once (its seen keys)."""
        return queries.already_learned(self.db, message_id, label, account=self.account)

    def _shared(self, sql: str, params: tuple) -> list[tuple] | None:
        return self.shared.query(sql, params) if self.shared is not None else None


def _highest(*values: int | None) -> int | None:
    found = [v for v in values if v is not None]
    return max(found) if found else None


def _when(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def from_config(config: Any) -> SharedRecords | None:
    """Every host's records as [store] url configures them; None without one."""
    from atlas_milter.pg_ship import PG_PASSWORD_CREDENTIAL, PG_PASSWORD_ENV
    from atlas_milter.secrets import read_secret

    if not config.store.url:
        return None
    password = read_secret(config.store.password_file, PG_PASSWORD_ENV, PG_PASSWORD_CREDENTIAL, "[store] password_file")
    return SharedRecords(config.store.url, password)
