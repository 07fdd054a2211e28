"""Owns every read of the verdict database outside the writer: the totals behind
`atlas-milter stats`, what resumable backfill has done, and the IMAP listener's lookups
(where it stopped in a folder, what it moved, our last verdict for a Message-ID, what it
has learned).

Threads: each call opens its own short-lived read-only connection (WAL: readers never
block the writer), so any thread may call anything here.

Must not: write (every write goes through `store.py`), build SQL from values, or know
what an adapter does with the answers: action names come in as parameters.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_milter.migrate import connect_readonly, store_error


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


def last_record(db: str | Path, message_id: str, except_action: str, *, account: str) -> PriorRecord | None:
    """Our latest verdict for this Message-ID in `account`'s mailboxes or from a front door
    without one (the milter), leaving out records whose action is `except_action` (the dry
    runs)."""
    rows = _lookup(
        db,
        "SELECT verdict, score, coalesce(action, ''), coalesce(folder, ''), uid, coalesce(sender_domain, '') "
        "FROM processed_emails WHERE message_id = ? AND coalesce(action, '') != ? "
        "AND (account = ? OR account IS NULL) ORDER BY id DESC LIMIT 1",
        (message_id, except_action, account),
    )
    return PriorRecord(*rows[0]) if rows else None


def already_learned(db: str | Path, message_id: str, label: str, *, account: str) -> bool:
    """Has `account`'s listener learned this message with this label already?"""
    return bool(_lookup(db, "SELECT 1 FROM learning_events WHERE message_id = ? AND label = ? AND account = ? LIMIT 1",
                        (message_id, label, account)))
