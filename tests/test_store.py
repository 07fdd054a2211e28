"""store.py against real SQLite files in tmp_path: batching, duplicates, domain counters,
a full queue, a failing and recovering writer, the direct path, the read queries and a
SIGKILL in the middle of writing."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from atlas_milter import queries, store
from atlas_milter.errors import StoreError
from atlas_milter.migrate import apply_migrations
from atlas_milter.monitor import PerformanceMetrics


def count(db: Path, where: str = "1", params: tuple = ()) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM processed_emails WHERE {where}", params).fetchone()[0]


def domain_reputation(db: Path, domain: str) -> dict | None:
    """The domains row of `domain` with its total and spam ratio (what the store keeps per
    sender domain), None when never seen."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT domain, ham, spam, unsure, last_seen FROM domains WHERE domain = ?",
                           (domain.lower(),)).fetchone()
    if row is None:
        return None
    name, ham, spam, unsure, last_seen = row
    total = ham + spam + unsure
    return {"domain": name, "ham": ham, "spam": spam, "unsure": unsure, "total": total,
            "spam_ratio": spam / total if total else 0.0, "last_seen": last_seen}


def close_process_store(timeout: float) -> bool:
    """Flush and close the process-wide store and forget it, so later tests start clean."""
    with store._instance_lock:
        current, store._instance = store._instance, None
    return current.close(timeout) if current is not None else True


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def rec(i: int = 0, **extra) -> dict:
    return {"source": "bench", "sender": f"user{i}@example.org", "verdict": "ham", "score": 0.1, **extra}


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "verdicts.db"


@pytest.fixture
def manager_factory(db):
    made = []

    def make(**kwargs):
        kwargs.setdefault("db_path", db)
        m = store.BulkOperationManager(**kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close(timeout=5)


@pytest.fixture
def holder(db):
    """Another connection that can hold the write lock (BEGIN EXCLUSIVE) on the database."""
    apply_migrations(db)
    conn = sqlite3.connect(db, isolation_level=None)
    yield conn
    conn.close()


def test_batching_commits_few_transactions(db, manager_factory):
    m = manager_factory(batch_size=500, flush_interval=60.0)
    for i in range(1050):
        assert m.add_email_record(rec(i, note=str(i)))
    assert m.flush_all(timeout=30)
    stats = m.stats()
    assert 3 <= stats["commits"] <= 4  # 500 + 500 + 50, give or take one split
    assert stats["written"] == 1050 and stats["queued"] == 0
    assert count(db) == 1050
    with sqlite3.connect(db) as conn:
        notes = {int(n) for (n,) in conn.execute("SELECT note FROM processed_emails")}
    assert notes == set(range(1050))


def test_flush_interval_writes_a_lone_record(db, manager_factory):
    m = manager_factory(batch_size=500, flush_interval=0.1)
    assert m.add_email_record(rec())
    wait_until(lambda: count(db) == 1)  # no flush_all: the interval did it
    assert m.stats()["commits"] == 1


def test_record_is_normalised(db, manager_factory):
    m = manager_factory()
    m.add_email_record(
        {"sender": "Someone <Bob@Mail.Example.COM>", "reasons": [["url_count", 0.7]], "cache_hit": True,
         "subject": "bad \udcff header", "uid": 7}
    )
    assert m.flush_all(timeout=10)
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT sender_domain, reasons, cache_hit, subject, folder, uidvalidity, created_at FROM processed_emails"
        ).fetchone()
    domain, reasons, cache_hit, subject, folder, uidvalidity, created_at = row
    assert (domain, reasons, cache_hit, folder, uidvalidity) == ("mail.example.com", '[["url_count", 0.7]]', 1, "", 0)
    assert subject == "bad \ufffd header"
    assert created_at.endswith("+00:00") and "T" in created_at
    # No verdict: the domain is known, with nothing counted.
    assert domain_reputation(db, "mail.example.com")["total"] == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"verdict": "ham", "colour": "red"}, "unknown key"),
        ({"id": 5}, "unknown key"),
        ({"note": {"a": 1}}, "unsupported type dict"),
        ({"uid": 2**64}, "64 bits"),
        ({"reasons": [object()]}, "JSON"),
    ],
)
def test_bad_records_are_refused_in_the_callers_thread(manager_factory, bad, message):
    m = manager_factory()
    with pytest.raises(ValueError, match=message):
        m.add_email_record(bad)
    assert m.stats()["queued"] == 0


def test_mailbox_duplicates_are_ignored_and_counted(db, manager_factory):
    m = manager_factory(batch_size=500, flush_interval=60.0)
    key = {"folder": "INBOX", "uidvalidity": 42, "uid": 7}
    assert m.add_email_record(rec(1, verdict="spam", **key))
    assert m.add_email_record(rec(1, verdict="spam", **key))  # same flush
    assert m.flush_all(timeout=10)
    assert m.add_email_record(rec(1, verdict="spam", **key))  # a later flush
    assert m.add_email_record(rec(1, verdict="spam", folder="INBOX", uidvalidity=43, uid=7))  # new uidvalidity
    assert m.add_email_record(rec(1, verdict="spam"))  # milter rows have no uid: never duplicates
    assert m.add_email_record(rec(1, verdict="spam"))
    assert m.flush_all(timeout=10)
    stats = m.stats()
    assert stats["duplicates_ignored"] == 2
    assert stats["written"] == 4
    assert count(db) == 4
    # Ignored duplicates do not count towards the domain either.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT domain, ham, spam, unsure FROM domains").fetchall() == [("example.org", 0, 4, 0)]


def test_domain_counters_add_up(db, manager_factory):
    m = manager_factory(batch_size=37, flush_interval=60.0)
    expected: Counter = Counter()
    verdicts = ["ham", "spam", "unsure"]
    for i in range(400):
        domain = f"d{i % 9}.example"
        verdict = verdicts[(i * 7) % 3]
        m.add_email_record({"sender": f"x{i}@{domain}", "verdict": verdict})
        expected[(domain, verdict)] += 1
    m.add_email_record({"sender": "nobody", "verdict": "spam"})  # no domain: not counted
    assert m.flush_all(timeout=10)
    assert m.stats()["commits"] >= 400 // 37
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT domain, ham, spam, unsure FROM domains").fetchall()
    got = Counter()
    for domain, ham, spam, unsure in rows:
        got[(domain, "ham")], got[(domain, "spam")], got[(domain, "unsure")] = ham, spam, unsure
    assert +got == expected
    rep = domain_reputation(db, "D3.Example")
    assert rep["total"] == sum(n for (d, _), n in expected.items() if d == "d3.example")
    assert rep["spam_ratio"] == pytest.approx(expected[("d3.example", "spam")] / rep["total"])
    assert domain_reputation(db, "never.seen") is None


def test_full_queue_refuses_and_counts(db, manager_factory, holder):
    metrics = PerformanceMetrics.get_instance()
    before = metrics.get_counters().get(store.COUNTER_DROPPED, 0)
    holder.execute("BEGIN EXCLUSIVE")  # the writer cannot commit anything
    m = manager_factory(batch_size=1, flush_interval=0.01, queue_size=3, busy_timeout=0.05)
    assert [m.add_email_record(rec(i)) for i in range(3)] == [True, True, True]
    started = time.monotonic()
    assert m.add_email_record(rec(3)) is False
    assert time.monotonic() - started < 1.0  # a bounded wait, not a block
    assert m.add_email_record(rec(4)) is False
    stats = m.stats()
    assert stats["dropped"] == 2 and stats["queued"] == 3
    assert metrics.get_counters()[store.COUNTER_DROPPED] - before == 2
    holder.execute("ROLLBACK")
    assert m.flush_all(timeout=20)
    assert count(db) == 3
    assert m.stats()["dropped"] == 2


def test_failing_writes_are_counted_and_retried_until_they_succeed(db, manager_factory, holder):
    holder.execute("BEGIN EXCLUSIVE")
    m = manager_factory(batch_size=500, flush_interval=0.01, busy_timeout=0.05)
    for i in range(20):
        assert m.add_email_record(rec(i))
    wait_until(lambda: m.stats()["write_errors"] >= 2)
    stats = m.stats()
    assert stats["written"] == 0 and stats["queued"] == 20
    assert stats["last_error"] == f"database {db} is locked by another process; stop it or retry"
    assert m.flush_all(timeout=0.2) is False  # still locked
    holder.execute("ROLLBACK")
    assert m.flush_all(timeout=20)
    assert count(db) == 20
    assert m.stats()["written"] == 20 and m.stats()["dropped"] == 0


def test_a_flush_is_one_transaction_with_the_domain_counters(db, manager_factory):
    apply_migrations(db)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON domains BEGIN SELECT RAISE(ABORT, 'refused'); END")
    m = manager_factory(batch_size=500, flush_interval=0.01)
    for i in range(120):  # more than one sqlite-utils chunk (999 variables / 21 columns)
        m.add_email_record(rec(i))
    wait_until(lambda: m.stats()["write_errors"] >= 1)
    assert count(db) == 0  # the rows went back with the failed counter update
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute("DROP TRIGGER refuse")
    assert m.flush_all(timeout=20)
    assert count(db) == 120
    assert domain_reputation(db, "example.org")["ham"] == 120


def test_deleted_database_is_recreated(db, manager_factory):
    m = manager_factory(flush_interval=60.0)
    m.add_email_record(rec(1))
    assert m.flush_all(timeout=10)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    m.add_email_record(rec(2, note="after"))
    assert m.flush_all(timeout=10)
    assert count(db) == 1 and count(db, "note = 'after'") == 1
    assert m.stats()["db_replaced"] == 1 and m.stats()["write_errors"] == 0


def test_close_flushes_and_refuses_more(db, manager_factory):
    m = manager_factory(flush_interval=60.0)
    for i in range(10):
        m.add_email_record(rec(i))
    assert m.close(timeout=10)
    assert count(db) == 10
    assert m.add_email_record(rec(11)) is False
    assert m.stats()["dropped"] == 1


def test_direct_writer_commits_once_per_record(db):
    w = store.DirectRecordWriter(db)
    try:
        for i in range(5):
            assert w.add_email_record(rec(i, folder="INBOX", uidvalidity=1, uid=i))
            assert count(db) == i + 1  # visible to another connection at once: committed
        assert w.add_email_record(rec(0, folder="INBOX", uidvalidity=1, uid=0))  # duplicate
        assert w.flush_all() is True
        stats = w.stats()
        assert (stats["commits"], stats["written"], stats["duplicates_ignored"]) == (6, 5, 1)
        assert count(db) == 5
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT ham FROM domains").fetchall() == [(5,)]
    finally:
        w.close()


def test_direct_writer_counts_a_failed_write(db, holder):
    w = store.DirectRecordWriter(db, busy_timeout=0.05)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        assert w.add_email_record(rec()) is False
        holder.execute("ROLLBACK")
        assert w.add_email_record(rec()) is True
        stats = w.stats()
        assert (stats["write_errors"], stats["dropped"], stats["written"]) == (1, 1, 1)
        assert "locked" in stats["last_error"]
    finally:
        w.close()


def test_configure_store_installs_the_chosen_writer(db):
    try:
        direct = store.configure_store(db, bulk=False)
        assert isinstance(direct, store.DirectRecordWriter)
        assert store.BulkOperationManager.get_instance() is direct
        bulk = store.configure_store(db, batch_size=10, flush_interval=60.0, queue_size=100)
        assert isinstance(bulk, store.BulkOperationManager)
        assert store.BulkOperationManager.get_instance() is bulk
        assert bulk.add_email_record(rec())
    finally:
        assert close_process_store(timeout=10)
    assert count(db) == 1


def test_unusable_database_fails_at_start(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        store.BulkOperationManager(db_path=bad)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        store.DirectRecordWriter(bad)


def test_query_stats(db):
    w = store.DirectRecordWriter(db)
    try:
        for i in range(1, 101):  # elapsed_ms 1..100, so percentiles are known exactly
            verdict = "spam" if i <= 20 else ("unsure" if i <= 30 else "ham")
            action = "reject" if verdict == "spam" else "accept"
            domain = "a.example" if i % 2 else ("b.example" if i % 4 else "c.example")
            w.add_email_record(
                {"sender": f"s@{domain}", "verdict": verdict, "action": action, "elapsed_ms": float(i),
                 "created_at": f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}.000+00:00"}
            )
        w.add_email_record({"verdict": "ham", "action": "accept", "created_at": "2024-01-01T00:00:00.000+00:00"})
    finally:
        w.close()
    stats = queries.query_stats(db, top=2)
    assert stats["total"] == 101
    assert stats["first"] == "2024-01-01T00:00:00.000+00:00"
    assert stats["last"] == "2024-01-01T00:01:40.000+00:00"
    assert stats["by_verdict"] == {"ham": 71, "spam": 20, "unsure": 10}
    assert stats["by_action"] == {"accept": 81, "reject": 20}
    assert stats["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    top = stats["top_domains"]
    assert [d["domain"] for d in top] == ["a.example", "b.example"]
    # a.example = the odd i: spam 1..19 odd (10), unsure 21..29 odd (5), ham the other 35
    assert (top[0]["count"], top[0]["spam"], top[0]["unsure"], top[0]["ham"]) == (50, 10, 5, 35)
    assert top[1]["count"] == 25


def test_query_stats_on_empty_and_missing_databases(db, tmp_path):
    apply_migrations(db)
    stats = queries.query_stats(db)
    assert stats["total"] == 0 and stats["by_verdict"] == {} and stats["top_domains"] == []
    assert stats["latency_ms"] == {"p50": None, "p95": None, "p99": None, "max": None}
    with pytest.raises(StoreError, match="does not exist"):
        queries.query_stats(tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()


def test_processed_uids(db, manager_factory):
    assert queries.processed_uids(db, "INBOX", 5) == set()  # no database yet
    m = manager_factory(flush_interval=60.0)
    for uid in (3, 4, 9):
        m.add_email_record(rec(uid, folder="INBOX", uidvalidity=5, uid=uid))
    m.add_email_record(rec(10, folder="INBOX", uidvalidity=6, uid=10))
    m.add_email_record(rec(11, folder="Junk", uidvalidity=5, uid=11))
    m.add_email_record(rec(12))
    assert m.flush_all(timeout=10)
    assert queries.processed_uids(db, "INBOX", 5) == {3, 4, 9}


CRASH_WRITER = """
import sys, time
from atlas_milter.store import BulkOperationManager
m = BulkOperationManager(batch_size=50, flush_interval=0.01, db_path=sys.argv[1])
for i in range(300):
    assert m.add_email_record({"source": "bench", "note": "before", "folder": "INBOX", "uidvalidity": 1, "uid": i})
assert m.flush_all(timeout=30)
print("FLUSHED", flush=True)
while True:
    m.add_email_record({"source": "bench", "note": "after", "sender": "a@b.example", "verdict": "spam"})
    time.sleep(0.0001)
"""


def test_sigkill_loses_nothing_committed(db):
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        line = proc.stdout.readline()
        assert line == b"FLUSHED\n", proc.stderr.read().decode() if proc.poll() is not None else line
        wait_until(lambda: count(db, "note = 'after'") >= 200)  # killed while it keeps writing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        uids = {u for (u,) in conn.execute("SELECT uid FROM processed_emails WHERE note = 'before'")}
        after, spam = conn.execute(
            "SELECT (SELECT count(*) FROM processed_emails WHERE note = 'after'), "
            "(SELECT spam FROM domains WHERE domain = 'b.example')"
        ).fetchone()
    assert uids == set(range(300))
    assert after >= 200
    assert spam == after  # the counters were committed with exactly those rows
