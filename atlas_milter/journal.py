"""Owns the synchronous writes beside the verdict record queue (store.py): each committed
before the function returns, on a connection of its own, because the caller's next step
relies on it being durable: a folder mark ("learned from, not again after a restart"), a
learning event (looked up by the next message), an admin's quarantine action, a learn
waiting in the cluster outbox for Redis, and giving old IMAP rows to an account.

Must not: build SQL from values, or know what its callers do with the rows.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Mapping

from atlas_milter.migrate import connect, now_iso


@contextlib.contextmanager
def _committed(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own whose statements are committed when the block ends (rolled
    back when it raises), closed after."""
    conn = connect(db_path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def save_folder_mark(db_path: str | Path, folder: str, uidvalidity: int, last_uid: int, *, account: str) -> None:
    """Remember that the listener of `account` looked at `folder` up to `last_uid` (never
    moves back)."""
    with _committed(db_path) as conn:
        conn.execute(
            "INSERT INTO imap_folder_marks (account, folder, uidvalidity, last_uid, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, folder, uidvalidity) DO UPDATE SET "
            "last_uid = max(last_uid, excluded.last_uid), updated_at = excluded.updated_at",
            (account, folder, uidvalidity, last_uid, now_iso()),
        )


def add_learning_event(db_path: str | Path, event: Mapping[str, Any]) -> None:
    """Record that a message the user labelled was learned (see `learning.py`)."""
    with _committed(db_path) as conn:
        conn.execute(
            "INSERT INTO learning_events (created_at, source, account, message_id, sender_domain, label, "
            "previous_verdict, previous_score, folder, uid, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now_iso(), event.get("source", "imap"), event.get("account"), event.get("message_id"),
             event.get("sender_domain"),
             event["label"], event.get("previous_verdict"), event.get("previous_score"),
             event.get("folder"), event.get("uid"), event.get("note")),
        )


# Tables whose IMAP rows carry the account (migration 0004_imap_accounts).
_ACCOUNT_TABLES = ("processed_emails", "imap_folder_marks", "learning_events")


def adopt_unowned_imap_rows(db_path: str | Path, account: str, *, only_if_alone: bool = True) -> int:
    """Give the IMAP rows recorded before accounts were part of the key (account '', see
    migration 0004) to `account`, in one transaction; returns how many rows moved. With
    `only_if_alone`, nothing moves while another named account has rows: then they may be
    that account's, and only the admin can say (`atlas-milter migrate --legacy-account`)."""
    if not account:
        return 0
    with _committed(db_path) as conn:
        if only_if_alone:
            for table in _ACCOUNT_TABLES:
                if conn.execute(f"SELECT 1 FROM {table} WHERE account NOT IN ('', ?) LIMIT 1", (account,)).fetchone():
                    return 0
        moved = 0
        for table in _ACCOUNT_TABLES:
            # processed_emails' unique key includes the account: a row this account also has is left.
            moved += conn.execute(f"UPDATE OR IGNORE {table} SET account = ? WHERE account = ''", (account,)).rowcount
        return moved


def add_quarantine_action(db_path: str | Path, event: Mapping[str, Any]) -> None:
    """Record what an admin did to a held message (see `quarantine.py`)."""
    with _committed(db_path) as conn:
        conn.execute(
            "INSERT INTO quarantine_actions (created_at, actor, action, queue_id, decision_id, outcome, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now_iso(), event["actor"], event["action"], event["queue_id"], event.get("decision_id"),
             event["outcome"], event.get("detail")),
        )


def add_outbox_event(db_path: str | Path, event: Any) -> None:
    """Keep a learn event (learn_events.LearnEvent) until Redis has taken it (cluster_sync.py)."""
    with _committed(db_path) as conn:
        conn.execute("INSERT OR IGNORE INTO cluster_outbox (event_id, created_at, event) VALUES (?, ?, ?)",
                     (event.event_id, now_iso(), json.dumps(event.fields())))


def remove_outbox_event(db_path: str | Path, event_id: str) -> None:
    """Redis has the event: it leaves the outbox."""
    with _committed(db_path) as conn:
        conn.execute("DELETE FROM cluster_outbox WHERE event_id = ?", (event_id,))


def ship_mark(db_path: str | Path, target: str) -> tuple[str, int]:
    """(this database's id, the last row id shipped to `target`); made at the first call."""
    import uuid

    with _committed(db_path) as conn:
        conn.execute("INSERT OR IGNORE INTO ship_marks (target, db_id, last_id) VALUES (?, ?, 0)",
                     (target, uuid.uuid4().hex))
        db_id, last_id = conn.execute("SELECT db_id, last_id FROM ship_marks WHERE target = ?", (target,)).fetchone()
    return db_id, last_id


def set_ship_mark(db_path: str | Path, target: str, last_id: int) -> None:
    """Rows up to `last_id` are committed at `target` (never moves back)."""
    with _committed(db_path) as conn:
        conn.execute("UPDATE ship_marks SET last_id = max(last_id, ?) WHERE target = ?", (last_id, target))
