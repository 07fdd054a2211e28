"""migrate.py against real SQLite files in tmp_path, plus the sqlite3 command line."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from atlas_milter import migrate
from atlas_milter.errors import StoreError

REPO_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
PERF_INDEXES = {
    "idx_processed_emails_uid_folder",
    "idx_processed_emails_created_at",
    "idx_processed_emails_verdict",
    "idx_processed_emails_sender_domain",
    "idx_processed_emails_queue_id",
    "idx_domains_domain",
}
ALL_NAMES = ["0001_initial", "0002_add_performance_indexes", "0003_imap_lookups", "0004_imap_accounts",
             "0005_history_lookups", "0006_decision_cutoffs", "0007_quarantine_actions",
             "0008_decision_stages", "0009_cluster_outbox", "0010_ship_marks"]
IMAP_INDEXES = {"idx_processed_emails_message_id", "idx_learning_events_message_id"}


def names(db: Path, kind: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))}


def recorded(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_package_finds_the_numbered_files_only():
    found = migrate.available_migrations()
    assert [m.name for m in found] == ALL_NAMES
    assert [m.version for m in found] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    # In the checkout the package's directory is the top-level folder, through the symlink
    # (an installed wheel carries copies: tests/test_install.py).
    with resources.as_file(migrate.MIGRATIONS_DIR) as directory:
        assert directory.resolve() == REPO_MIGRATIONS.resolve()
    assert (REPO_MIGRATIONS / "add_performance_indexes.sql").read_text() == found[1].sql()


def test_fresh_database_gets_everything_and_rerun_applies_nothing(tmp_path):
    db = tmp_path / "v.db"
    assert migrate.apply_migrations(db) == ALL_NAMES
    assert {"processed_emails", "domains", "learning_events", "schema_migrations"} <= names(db, "table")
    assert PERF_INDEXES | {"uq_processed_emails_mailbox_uid"} <= names(db, "index")
    assert recorded(db) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert migrate.apply_migrations(db) == []
    assert recorded(db) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [s["status"] for s in migrate.migration_status(db)] == ["applied"] * 10


def test_connection_pragmas(tmp_path):
    conn = migrate.connect(tmp_path / "v.db", busy_timeout=2.5)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    finally:
        conn.close()


def test_rollback_0003_drops_the_imap_lookups_and_message_id_lookups_use_the_index(tmp_path):
    db = tmp_path / "v.db"
    migrate.apply_migrations(db)
    assert IMAP_INDEXES <= names(db, "index") and "imap_folder_marks" in names(db, "table")
    with sqlite3.connect(db) as conn:
        plan = " ".join(r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT verdict FROM processed_emails WHERE message_id = ? ORDER BY id DESC LIMIT 1",
            ("<x@y>",)))
    assert "idx_processed_emails_message_id" in plan, plan
    assert migrate.rollback_last(db) == "0010_ship_marks"
    assert migrate.rollback_last(db) == "0009_cluster_outbox"
    assert migrate.rollback_last(db) == "0008_decision_stages"
    assert migrate.rollback_last(db) == "0007_quarantine_actions"
    assert migrate.rollback_last(db) == "0006_decision_cutoffs"
    assert migrate.rollback_last(db) == "0005_history_lookups"
    assert migrate.rollback_last(db) == "0004_imap_accounts"
    assert migrate.rollback_last(db) == "0003_imap_lookups"
    assert not IMAP_INDEXES & names(db, "index") and "imap_folder_marks" not in names(db, "table")
    assert recorded(db) == [1, 2]
    assert migrate.apply_migrations(db) == ["0003_imap_lookups", "0004_imap_accounts", "0005_history_lookups",
                                                 "0006_decision_cutoffs",
                                                 "0007_quarantine_actions", "0008_decision_stages",
                                                 "0009_cluster_outbox", "0010_ship_marks"]


def test_rollback_last_drops_the_indexes_and_reapply_restores_them(tmp_path):
    db = tmp_path / "v.db"
    migrate.apply_migrations(db)
    assert migrate.rollback_last(db) == "0010_ship_marks"
    assert migrate.rollback_last(db) == "0009_cluster_outbox"
    assert migrate.rollback_last(db) == "0008_decision_stages"
    assert migrate.rollback_last(db) == "0007_quarantine_actions"
    assert migrate.rollback_last(db) == "0006_decision_cutoffs"
    assert migrate.rollback_last(db) == "0005_history_lookups"
    assert migrate.rollback_last(db) == "0004_imap_accounts"
    assert migrate.rollback_last(db) == "0003_imap_lookups"
    assert migrate.rollback_last(db) == "0002_add_performance_indexes"
    assert not PERF_INDEXES & names(db, "index")
    assert "uq_processed_emails_mailbox_uid" in names(db, "index")  # belongs to 0001
    assert recorded(db) == [1]
    assert [s["status"] for s in migrate.migration_status(db)] == ["applied"] + ["pending"] * 9

    assert migrate.apply_migrations(db) == ALL_NAMES[1:]
    assert PERF_INDEXES <= names(db, "index")
    assert recorded(db) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_rollback_everything_then_nothing_left(tmp_path):
    db = tmp_path / "v.db"
    migrate.apply_migrations(db)
    assert migrate.rollback_last(db) == "0010_ship_marks"
    assert migrate.rollback_last(db) == "0009_cluster_outbox"
    assert migrate.rollback_last(db) == "0008_decision_stages"
    assert migrate.rollback_last(db) == "0007_quarantine_actions"
    assert migrate.rollback_last(db) == "0006_decision_cutoffs"
    assert migrate.rollback_last(db) == "0005_history_lookups"
    assert migrate.rollback_last(db) == "0004_imap_accounts"
    assert migrate.rollback_last(db) == "0003_imap_lookups"
    assert migrate.rollback_last(db) == "0002_add_performance_indexes"
    assert migrate.rollback_last(db) == "0001_initial"
    assert names(db, "table") == {"schema_migrations"}
    assert migrate.rollback_last(db) is None


def test_every_migration_has_a_rollback_block():
    for m in migrate.available_migrations():
        rollback = m.rollback_sql()
        assert rollback.startswith(("DROP ", "ALTER TABLE ")), m.name  # drops what the migration made
        assert "--" not in rollback, m.name


def test_a_failing_migration_leaves_nothing_behind(tmp_path):
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    (mdir / "0001_ok.sql").write_text("CREATE TABLE a (x);\n")
    (mdir / "0002_bad.sql").write_text("CREATE TABLE b (x);\nINSERT INTO nowhere VALUES (1);\n")
    db = tmp_path / "v.db"
    with pytest.raises(StoreError, match="no such table: nowhere"):
        migrate.apply_migrations(db, directory=mdir)
    assert "b" not in names(db, "table")  # 0002 ran in its own transaction, rolled back
    assert "a" in names(db, "table")
    assert recorded(db) == [1]


def test_split_statements_respects_strings_and_comments():
    sql = "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('a;b'); -- c;\n-- rollback:\n-- DROP TABLE t;\n"
    assert migrate.split_statements(sql) == [
        "CREATE TABLE t (x TEXT);",
        "INSERT INTO t VALUES ('a;b');",
        "-- c;\n-- rollback:\n-- DROP TABLE t;",
    ]


def test_migration_status_of_a_missing_database_does_not_create_it(tmp_path):
    db = tmp_path / "absent.db"
    assert [s["status"] for s in migrate.migration_status(db)] == ["pending"] * len(ALL_NAMES)
    assert not db.exists()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command-line tool is not installed")
def test_add_performance_indexes_runs_with_the_sqlite3_cli(tmp_path):
    db = tmp_path / "v.db"
    migrate.apply_migrations(db)
    migrate.rollback_last(db)  # 0010
    migrate.rollback_last(db)  # 0009
    migrate.rollback_last(db)  # 0008
    migrate.rollback_last(db)  # 0007
    migrate.rollback_last(db)  # 0006
    migrate.rollback_last(db)  # 0005
    migrate.rollback_last(db)  # 0004
    migrate.rollback_last(db)  # 0003
    migrate.rollback_last(db)  # 0002
    assert not PERF_INDEXES & names(db, "index")
    script = REPO_MIGRATIONS / "add_performance_indexes.sql"
    for _ in range(2):  # running it again is harmless
        with open(script, "rb") as fh:
            done = subprocess.run(["sqlite3", str(db)], stdin=fh, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
        assert PERF_INDEXES <= names(db, "index")


def assert_one_line_locked(exc: StoreError, db: Path) -> None:
    text = str(exc)
    assert "\n" not in text
    assert text == f"database {db} is locked by another process; stop it or retry"


def test_locked_fresh_database_raises_store_error(tmp_path):
    db = tmp_path / "v.db"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError) as info:
            migrate.apply_migrations(db, busy_timeout=0.1)
        assert_one_line_locked(info.value, db)
    finally:
        holder.close()
    assert migrate.apply_migrations(db) == ALL_NAMES  # and it works once released


def test_locked_wal_database_with_pending_migration_raises_store_error(tmp_path):
    db = tmp_path / "v.db"
    migrate.apply_migrations(db)
    migrate.rollback_last(db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError) as info:
            migrate.apply_migrations(db, busy_timeout=0.1)
        assert_one_line_locked(info.value, db)
        with pytest.raises(StoreError, match="locked"):
            migrate.rollback_last(db, busy_timeout=0.1)
    finally:
        holder.close()
    assert recorded(db) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_not_a_database_raises_store_error(tmp_path):
    db = tmp_path / "v.db"
    db.write_bytes(b"this is not sqlite at all, just some text " * 100)
    with pytest.raises(StoreError, match=r"is not a usable SQLite database .*; move it aside"):
        migrate.apply_migrations(db)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        migrate.migration_status(db)


def test_missing_directory_raises_store_error(tmp_path):
    db = tmp_path / "no" / "such" / "dir" / "v.db"
    with pytest.raises(StoreError, match="cannot open database .*directory is writable"):
        migrate.apply_migrations(db)


ROW = "INSERT INTO processed_emails (source, folder, uidvalidity, uid, verdict, action, created_at) VALUES (?, ?, ?, ?, ?, ?, 't')"


def db_written_by_0003(tmp_path: Path) -> Path:
    """A database as the release before 0004 left it: one IMAP row, a Junk mark, a learning
    event, a milter row."""
    before = tmp_path / "up-to-0003"
    before.mkdir()
    for m in migrate.available_migrations()[:3]:
        (before / f"{m.name}.sql").write_text(m.sql())
    db = tmp_path / "v.db"
    migrate.apply_migrations(db, directory=before)
    with sqlite3.connect(db) as conn:
        conn.execute(ROW, ("imap", "INBOX", 7, 1, "spam", "move"))
        conn.execute(ROW, ("milter", None, None, None, "ham", "accept"))
        conn.execute("INSERT INTO imap_folder_marks VALUES ('Junk', 7, 40, 't')")
        conn.execute("INSERT INTO learning_events (created_at, source, label) VALUES ('t', 'imap', 'spam')")
    return db


def test_0004_keys_imap_rows_by_account_and_gives_old_rows_the_default_account(tmp_path):
    db = db_written_by_0003(tmp_path)
    row = ROW
    assert migrate.apply_migrations(db) == ["0004_imap_accounts", "0005_history_lookups", "0006_decision_cutoffs",
                                                 "0007_quarantine_actions", "0008_decision_stages",
                                                 "0009_cluster_outbox", "0010_ship_marks"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT source, account FROM processed_emails ORDER BY id").fetchall() == [
            ("imap", ""), ("milter", None)]
        assert conn.execute("SELECT account, folder, uidvalidity, last_uid FROM imap_folder_marks").fetchall() == [
            ("", "Junk", 7, 40)]
        assert conn.execute("SELECT account FROM learning_events").fetchall() == [("",)]
        # The same mailbox key under another account is another message; under the same, a duplicate.
        conn.execute(row.replace("(source,", "(account, source,").replace("VALUES (?,", "VALUES ('work', ?,"),
                     ("imap", "INBOX", 7, 1, "ham", "none"))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(row.replace("(source,", "(account, source,").replace("VALUES (?,", "VALUES ('', ?,"),
                         ("imap", "INBOX", 7, 1, "ham", "none"))
        conn.execute("INSERT INTO imap_folder_marks VALUES ('work', 'Junk', 7, 50, 't')")
        plan = " ".join(r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT max(uid) FROM processed_emails WHERE account = ? AND folder = ? "
            "AND uidvalidity = ? AND uid IS NOT NULL", ("", "INBOX", 7)))
    assert "uq_processed_emails_mailbox_uid" in plan, plan
    assert migrate.rollback_last(db) == "0010_ship_marks"
    assert migrate.rollback_last(db) == "0009_cluster_outbox"
    assert migrate.rollback_last(db) == "0008_decision_stages"
    assert migrate.rollback_last(db) == "0007_quarantine_actions"
    assert migrate.rollback_last(db) == "0006_decision_cutoffs"
    assert migrate.rollback_last(db) == "0005_history_lookups"
    assert migrate.rollback_last(db) == "0004_imap_accounts"
    with sqlite3.connect(db) as conn:
        # The old unique index holds one row per mailbox key: the older one stays.
        assert conn.execute("SELECT source, verdict FROM processed_emails ORDER BY id").fetchall() == [
            ("imap", "spam"), ("milter", "ham")]
        assert conn.execute("SELECT folder, uidvalidity, last_uid FROM imap_folder_marks").fetchall() == [("Junk", 7, 50)]
        assert "account" not in {r[1] for r in conn.execute("PRAGMA table_info(processed_emails)")}
        assert "account" not in {r[1] for r in conn.execute("PRAGMA table_info(learning_events)")}
    assert migrate.apply_migrations(db) == ["0004_imap_accounts", "0005_history_lookups", "0006_decision_cutoffs",
                                                 "0007_quarantine_actions", "0008_decision_stages",
                                                 "0009_cluster_outbox", "0010_ship_marks"]


def _db_upgraded_from_0003(tmp_path: Path) -> Path:
    db = db_written_by_0003(tmp_path)
    migrate.apply_migrations(db)
    return db


def accounts(db: Path) -> list:
    with sqlite3.connect(db) as conn:
        return [conn.execute(f"SELECT account FROM {t} ORDER BY rowid").fetchall()
                for t in ("processed_emails", "imap_folder_marks", "learning_events")]


def test_a_single_account_adopts_the_rows_written_before_0004(tmp_path):
    from atlas_milter.adapters.imap.actions import adopt_rows_written_before_accounts
    from atlas_milter.config import Config, ImapConfig, StoreConfig

    db = _db_upgraded_from_0003(tmp_path)
    two = Config(store=StoreConfig(db=str(db)), imap=ImapConfig(accounts={"alice": {}, "bob": {}}))
    adopt_rows_written_before_accounts(two, "alice")  # two accounts: whose rows they are is unknown
    assert accounts(db) == [[("",), (None,)], [("",)], [("",)]]
    one = Config(store=StoreConfig(db=str(db)), imap=ImapConfig(accounts={"alice": {}}))
    adopt_rows_written_before_accounts(one, None)  # [imap] itself: its rows are '' already
    assert accounts(db) == [[("",), (None,)], [("",)], [("",)]]
    adopt_rows_written_before_accounts(one, "alice")
    assert accounts(db) == [[("alice",), (None,)], [("alice",)], [("alice",)]]


def test_rows_are_not_adopted_while_another_account_has_rows_unless_the_admin_says(tmp_path):
    from atlas_milter.cli import main
    from atlas_milter.journal import adopt_unowned_imap_rows

    db = _db_upgraded_from_0003(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO imap_folder_marks VALUES ('bob', 'Junk', 7, 50, 't')")
    assert adopt_unowned_imap_rows(db, "alice") == 0
    assert main(["migrate", "--db", str(db), "--legacy-account", "alice"]) == 0
    assert accounts(db) == [[("alice",), (None,)], [("alice",), ("bob",)], [("alice",)]]


def _apply_after(barrier, db, results) -> None:
    barrier.wait()
    try:
        migrate.apply_migrations(db)
        results.put("ok")
    except Exception as exc:  # reported to the test, which fails on it
        results.put(repr(exc))


def test_daemons_starting_together_on_a_new_database_all_start(tmp_path):
    """Several processes opening a database that does not exist yet, at the same instant (two
    IMAP listeners, a milter and a listener at boot): each gets through, and each migration is
    applied once. Switching to WAL used to fail at once with "locked" for all but one."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(8):
        db = tmp_path / f"new-{attempt}.db"
        results, barrier = ctx.Queue(), ctx.Barrier(4)
        procs = [ctx.Process(target=_apply_after, args=(barrier, db, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4, attempt
        assert recorded(db) == list(range(1, len(ALL_NAMES) + 1))
