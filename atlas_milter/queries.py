"""Owns every read of the verdict database outside the writer: the totals behind
`atlas-milter stats`, what resumable backfill has done, and the IMAP listener's lookups
(where it stopped in a folder, what it moved, our last verdict for a Message-ID, what it
has learned).

Threads: each call opens its own short-lived read-only connection (WAL: readers never
block the writer), so any thread may call anything here.

Must not: write (every write goes through `store.py` or `journal.py`), build SQL from values, or know
what an adapter does with the answers: action names come in as parameters.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_milter.errors import AtlasError
from atlas_milter.migrate import connect_readonly, store_error


def require_database(db_path: str | Path) -> None:
    """A command that only reads: one clear error for a database that is not there (opening
    it would create an empty one)."""
    if not Path(db_path).exists():
        raise AtlasError(f"{db_path}: no such database (give --db PATH)")


def _read(db_path: str | Path, fn: Any) -> Any:
    conn = connect_readonly(db_path)
    try:
        return fn(conn)
    except sqlite3.Error as exc:
        raise store_error(db_path, exc) from None
    finally:
        conn.close()


def query_stats(db_path: str | Path, top: int = 10) -> dict[str, Any]:
    """Totals by verdict and by action, the `top` sender domains (with their ham/spam/unsure
    counters), elapsed_ms percentiles (nearest rank) and the time span of the records."""

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        total, first, last = conn.execute(
            "SELECT count(*), min(created_at), max(created_at) FROM processed_emails"
        ).fetchone()
        by_verdict = dict(
            conn.execute(
                "SELECT coalesce(verdict, ''), count(*) FROM processed_emails GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        by_action = dict(
            conn.execute(
                "SELECT coalesce(action, ''), count(*) FROM processed_emails GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        domains = [
            {"domain": d, "count": ham + spam + unsure, "ham": ham, "spam": spam, "unsure": unsure, "last_seen": seen}
            for d, ham, spam, unsure, seen in conn.execute(
                "SELECT domain, ham, spam, unsure, last_seen FROM domains "
                "ORDER BY ham + spam + unsure DESC, domain LIMIT ?",
                (top,),
            )
        ]
        (timed,) = conn.execute("SELECT count(*) FROM processed_emails WHERE elapsed_ms IS NOT NULL").fetchone()
        latency: dict[str, float | None] = {"p50": None, "p95": None, "p99": None, "max": None}
        if timed:
            for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100)):
                offset = max(0, math.ceil(p / 100 * timed) - 1)
                (latency[name],) = conn.execute(
                    "SELECT elapsed_ms FROM processed_emails WHERE elapsed_ms IS NOT NULL "
                    "ORDER BY elapsed_ms LIMIT 1 OFFSET ?",
                    (offset,),
                ).fetchone()
        return {
            "total": total,
            "first": first,
            "last": last,
            "by_verdict": by_verdict,
            "by_action": by_action,
            "top_domains": domains,
            "latency_ms": latency,
        }

    return _read(db_path, run)


def processed_uids(db_path: str | Path, folder: str, uidvalidity: int, account: str = "") -> set[int]:
    """The UIDs already recorded for this mailbox of `account` ('' for [imap] without
    --account, and for local mailboxes); committed rows only: call flush_all() first if
    this process is still writing."""
    if not Path(db_path).exists():
        return set()
    return _read(
        db_path,
        lambda conn: {
            uid
            for (uid,) in conn.execute(
                "SELECT uid FROM processed_emails WHERE account = ? AND folder = ? AND uidvalidity = ? "
                "AND uid IS NOT NULL",
                (account, folder, uidvalidity),
            )
        },
    )


# -- the IMAP side's lookups: a missing database or table reads as "nothing yet" ----------
# Each takes the account (the --account NAME, '' for [imap] itself): accounts share the
# database, and two of them may have mailboxes with the same name and UIDVALIDITY.

def _lookup(db: str | Path, sql: str, params: tuple) -> list[tuple]:
    if not Path(db).exists():
        return []
    conn = connect_readonly(db)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def highest_uid(db: str | Path, folder: str, uidvalidity: int, *, account: str) -> int | None:
    """The highest UID of this mailbox with a recorded verdict, or None."""
    rows = _lookup(db, "SELECT max(uid) FROM processed_emails WHERE account = ? AND folder = ? AND uidvalidity = ? "
                   "AND uid IS NOT NULL", (account, folder, uidvalidity))
    return rows[0][0] if rows and rows[0][0] is not None else None


def folder_mark(db: str | Path, folder: str, uidvalidity: int, *, account: str) -> int | None:
    """The highest UID of `folder` the listener looked at in an earlier run (the Junk folder,
    whose arrivals are not recorded in processed_emails), or None."""
    rows = _lookup(db, "SELECT last_uid FROM imap_folder_marks WHERE account = ? AND folder = ? AND uidvalidity = ?",
                   (account, folder, uidvalidity))
    return rows[0][0] if rows else None


def all_folder_marks(db: str | Path) -> list[tuple[str, str, int, int]]:
    """(account, folder, uidvalidity, last_uid) of every folder mark, for shipping them."""
    return [tuple(row) for row in _lookup(db, "SELECT account, folder, uidvalidity, last_uid FROM imap_folder_marks", ())]


def uids_with_action(db: str | Path, folder: str, uidvalidity: int, action: str, *, account: str) -> dict[int, str]:
    """{uid: Message-ID} of this mailbox's records whose action is `action`."""
    return {
        uid: mid or ""
        for uid, mid in _lookup(
            db,
            "SELECT uid, message_id FROM processed_emails WHERE account = ? AND folder = ? AND uidvalidity = ? "
            "AND action = ? AND uid IS NOT NULL",
            (account, folder, uidvalidity, action),
        )
    }


@dataclass(frozen=True)
class PriorRecord:
    verdict: str
    score: float
    action: str
    folder: str
    uid: int | None
    sender_domain: str
    created_at: str = ""  # ISO-8601


def last_record(db: str | Path, message_id: str, except_action: str, *, account: str) -> PriorRecord | None:
    """Our latest verdict for this Message-ID in `account`'s mailboxes or from a front door
    without one (the milter), leaving out records whose action is `except_action` (the dry
    runs)."""
    rows = _lookup(
        db,
        "SELECT verdict, score, coalesce(action, ''), coalesce(folder, ''), uid, coalesce(sender_domain, ''), "
        "coalesce(created_at, '') FROM processed_emails WHERE message_id = ? AND coalesce(action, '') != ? "
        "AND (account = ? OR account IS NULL) ORDER BY id DESC LIMIT 1",
        (message_id, except_action, account),
    )
    return PriorRecord(*rows[0]) if rows else None


def already_learned(db: str | Path, message_id: str, label: str, *, account: str) -> bool:
    """Has `account`'s listener learned this message with this label already?"""
    return bool(_lookup(db, "SELECT 1 FROM learning_events WHERE message_id = ? AND label = ? AND account = ? LIMIT 1",
                        (message_id, label, account)))


# -- history and explain: the admin's questions about past decisions ----------------------
# Pages are keyset-paginated on id, newest first: a page is "the `limit` rows with id below
# `before`", so rows written while someone pages never shift a page or repeat a row.
# Every filter is an equality or a range on an indexed column (migration 0005).

HISTORY_COLUMNS = ("id", "created_at", "source", "account", "folder", "uidvalidity", "uid", "queue_id", "message_id",
                   "sender", "sender_domain", "recipients_count", "subject", "score", "verdict", "action", "reasons")
_HISTORY_FILTERS = {  # option -> the clause it adds; the value is always a parameter
    "since": "created_at >= ?",
    "verdict": "verdict = ?",
    "action": "action = ?",
    "sender_domain": "sender_domain = ?",
    "before": "id < ?",
}
# The same expression and WHERE as idx_processed_emails_ref (0005), so the index serves it.
_REF_MATCH = "instr(note, 'ref=') > 0 AND substr(note, instr(note, 'ref=') + 4) = ?"
MATCH_LIMIT = 20  # rows `find_decisions` returns at most
SMALL_RANGE = 2000  # a `since` range of fewer rows is read through the created_at index


def _rows(conn: sqlite3.Connection, sql: str, params: tuple) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def history_sql(filters: dict[str, Any], limit: int, by_time: bool = False) -> tuple[str, tuple]:
    """The history query for these filters ({option: value}, None values left out). With
    `by_time`, it reads the created_at index (the `since` range) and sorts what it finds."""
    used = [(k, v) for k, v in filters.items() if v is not None]
    for key, _ in used:
        if key not in _HISTORY_FILTERS:
            raise ValueError(f"history: unknown filter {key}")
    where = " AND ".join(_HISTORY_FILTERS[k] for k, _ in used) or "1"
    source = "processed_emails INDEXED BY idx_processed_emails_created_at" if by_time else "processed_emails"
    sql = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM {source} WHERE {where} ORDER BY id DESC LIMIT ?"
    return sql, (*(v for _, v in used), limit)


def history(db_path: str | Path, limit: int = 50, **filters: Any) -> list[dict[str, Any]]:
    """The latest decisions, newest first: at most `limit` rows matching every filter given
    (since: an ISO time, created_at >= it; verdict; action; sender_domain; before: an id)."""

    def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        # SQLite walks the ids down and tests created_at on each row: quick when the range
        # holds many rows (the newest are in it), a scan of the table when it holds none
        # (a quiet hour). A range of few rows is read from its index and sorted instead.
        by_time = filters.get("since") is not None and conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM processed_emails WHERE created_at >= ? LIMIT ?)",
            (filters["since"], SMALL_RANGE)).fetchone()[0] < SMALL_RANGE
        return _rows(conn, *history_sql(filters, limit, by_time))

    return _read(db_path, run)


def find_sql(key: str) -> tuple[str, tuple]:
    """One query for the decisions whose reply reference, queue id or Message-ID is `key`."""
    bare = key.strip().strip("<>")
    sql = (f"SELECT * FROM processed_emails WHERE id IN ("
           f"SELECT id FROM processed_emails WHERE {_REF_MATCH} "
           f"UNION SELECT id FROM processed_emails WHERE queue_id = ? "
           f"UNION SELECT id FROM processed_emails WHERE message_id IN (?, ?)) ORDER BY id DESC LIMIT ?")
    return sql, (bare.upper(), key.strip(), f"<{bare}>", bare, MATCH_LIMIT)


def find_decisions(db_path: str | Path, key: str) -> list[dict[str, Any]]:
    """Every column of the decisions (newest first, at most MATCH_LIMIT) found by the
    reference printed in a 550/451 reply, the MTA queue id, or the Message-ID (with or
    without <>)."""
    sql, params = find_sql(key)
    return _read(db_path, lambda conn: _rows(conn, sql, params))


def decision(db_path: str | Path, row_id: int) -> dict[str, Any] | None:
    """Every column of the decision with this id, or None."""
    rows = _read(db_path, lambda conn: _rows(conn, "SELECT * FROM processed_emails WHERE id = ?", (row_id,)))
    return rows[0] if rows else None


# -- the quarantine: which decision held a message, and what admins did since -------------

def holding_decisions(db_path: str | Path, queue_ids: list[str], action: str) -> dict[str, dict[str, Any]]:
    """{queue id: every column of the latest decision with that queue id and `action`}
    (the decision that put the message on hold). Queue ids are reused over months: the
    latest is the one that held the message now in the queue."""
    if not queue_ids or not Path(db_path).exists():
        return {}
    found: dict[str, dict[str, Any]] = {}

    def run(conn: sqlite3.Connection) -> None:
        for queue_id in dict.fromkeys(queue_ids):
            rows = _rows(conn, "SELECT * FROM processed_emails WHERE queue_id = ? AND action = ? ORDER BY id DESC LIMIT 1",
                         (queue_id, action))
            if rows:
                found[queue_id] = rows[0]

    _read(db_path, run)
    return found


def quarantine_actions(db_path: str | Path, limit: int = 20, queue_id: str | None = None) -> list[dict[str, Any]]:
    """The latest admin actions on held messages, newest first (all, or one queue id's)."""
    if not Path(db_path).exists():
        return []
    where, params = ("WHERE queue_id = ?", (queue_id, limit)) if queue_id else ("", (limit,))
    sql = f"SELECT * FROM quarantine_actions {where} ORDER BY id DESC LIMIT ?"
    try:
        return _read(db_path, lambda conn: _rows(conn, sql, params))
    except AtlasError:  # the table comes with migration 0007: nothing recorded before it
        return []


def outbox_events(db_path: str | Path) -> list[Any]:
    """The learn events waiting for Redis, oldest first (cluster_sync.py)."""
    from atlas_milter.learn_events import LearnEvent

    rows = _lookup(db_path, "SELECT event FROM cluster_outbox ORDER BY created_at, event_id", ())
    return [LearnEvent.from_fields(json.loads(event)) for (event,) in rows]


# -- shipping to PostgreSQL (pg_ship.py) ----------------------------------------------------

def rows_after(db_path: str | Path, after: int, limit: int, columns: tuple[str, ...]) -> list[tuple]:
    """(id, *columns) of the next `limit` verdict rows with id above `after`, in id order.
    `columns` are the store's own column names (never user input)."""
    sql = f"SELECT id, {', '.join(columns)} FROM processed_emails WHERE id > ? ORDER BY id LIMIT ?"
    return _read(db_path, lambda conn: conn.execute(sql, (after, limit)).fetchall())


def rows_waiting(db_path: str | Path, after: int) -> int:
    """How many verdict rows have an id above `after` (the shipping backlog)."""
    return _read(db_path, lambda conn: conn.execute("SELECT count(*) FROM processed_emails WHERE id > ?",
                                                    (after,)).fetchone()[0])
