"""Verdicts shipped to a real PostgreSQL ([store] url): every SQLite row arrives exactly once,
with the per-domain counters added once; a batch sent again (a crash between PostgreSQL's
commit and the local mark) changes nothing; PostgreSQL stopped under load: the rows wait
and all arrive once after it returns (a minute, 50 verdicts a second); a milter killed with SIGKILL while shipping, then
started again on the same database: no row lost or doubled."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from importlib import resources

import pytest

from tests.support.milter_process import MilterProcess, milter_workdir, unix_spec, wait_milter_active
from tests.support.servers import pg_rows, wait_until
from tests.support.smtp import new_token, send_one, with_token

from atlas_milter import journal
from atlas_milter.migrate import apply_migrations
from atlas_milter.pg_ship import TARGET, Shipper
from atlas_milter.store import DirectRecordWriter

pytestmark = pytest.mark.integration

SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
DOMAINS = ("a.example", "b.example", "c.example")


def write_records(db, start: int, n: int) -> None:
    writer = DirectRecordWriter(db)
    for i in range(start, start + n):
        writer.add_email_record({"source": "milter", "queue_id": f"Q{i:06d}", "sender": f"s{i}@{DOMAINS[i % 3]}",
                                 "verdict": ("ham", "spam", "unsure")[i % 3], "score": 0.5, "action": "tag",
                                 "subject": f"message {i}"})
    writer.close()


def local_count(db) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM processed_emails").fetchone()[0]


def test_every_row_once_and_a_replayed_batch_changes_nothing(tmp_path, postgres):
    db = tmp_path / "v.db"
    apply_migrations(db)
    write_records(db, 0, 250)
    shipper = Shipper(str(db), postgres.url, "mx1", batch=100)
    assert [shipper.ship_once() for _ in range(4)] == [100, 100, 50, 0]
    assert pg_rows(postgres.url, "SELECT count(*), count(DISTINCT local_id), min(host) FROM verdicts") == [(250, 250, "mx1")]
    domains = pg_rows(postgres.url, "SELECT domain, ham, spam, unsure FROM domains ORDER BY domain")
    assert domains == [("a.example", 84, 0, 0), ("b.example", 0, 83, 0), ("c.example", 0, 0, 83)]
    # A crash after PostgreSQL committed but before the local mark moved: everything is sent again.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ship_marks SET last_id = 0 WHERE target = ?", (TARGET,))
    assert [shipper.ship_once() for _ in range(4)] == [100, 100, 50, 0]
    assert pg_rows(postgres.url, "SELECT count(*) FROM verdicts") == [(250,)]
    assert pg_rows(postgres.url, "SELECT domain, ham, spam, unsure FROM domains ORDER BY domain") == domains
    # The subject and the time arrive as written.
    assert pg_rows(postgres.url, "SELECT subject FROM verdicts WHERE local_id = 7") == [("message 6",)]
    shipper.stop()

    # `atlas-milter stats` with [store] url: every host's verdicts, from PostgreSQL.
    conf = tmp_path / "pg.toml"
    conf.write_text(f'[store]\ndb = "{tmp_path / "other.db"}"\nurl = "{postgres.url}"\n')
    out = subprocess.run([sys.executable, "-m", "atlas_milter", "stats", "--json", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["total"] == 250 and data["by_host"] == {"mx1": 250} and data["source"] == "postgresql"
    assert data["by_verdict"] == {"ham": 84, "spam": 83, "unsure": 83}
    assert [d["domain"] for d in data["top_domains"]] == ["a.example", "b.example", "c.example"]
    postgres.stop()
    out = subprocess.run([sys.executable, "-m", "atlas_milter", "stats", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("Error: PostgreSQL at ") and "Traceback" not in out.stderr
    postgres.start()


def test_postgresql_stopped_under_load_every_row_arrives_once(tmp_path, postgres):
    db = tmp_path / "v.db"
    apply_migrations(db)
    shipper = Shipper(str(db), postgres.url, "mx1", interval=0.2, cooldown=0.5).start()
    stop = threading.Event()
    written = [0]

    def load() -> None:  # 50 verdicts a second while PostgreSQL goes away and comes back
        while not stop.is_set():
            write_records(db, written[0], 5)
            written[0] += 5
            time.sleep(0.1)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        time.sleep(1.0)
        postgres.stop()
        time.sleep(60)  # a minute without PostgreSQL
        assert shipper.breaker.is_open
        waiting = local_count(db) - journal.ship_mark(db, TARGET)[1]
        assert waiting > 1500  # piled up locally meanwhile
        postgres.start()
        time.sleep(1.0)
    finally:
        stop.set()
        writer.join()
    total = local_count(db)
    wait_until(lambda: pg_rows(postgres.url, "SELECT count(*) FROM verdicts") == [(total,)], timeout=20,
               what="every row in PostgreSQL after it returned")
    shipper.stop()
    assert pg_rows(postgres.url, "SELECT count(DISTINCT local_id), max(local_id) FROM verdicts") == [(total, total)]
    assert pg_rows(postgres.url, "SELECT sum(ham + spam + unsure) FROM domains") == [(total,)]


def test_a_hung_postgresql_is_cut_off_and_every_row_arrives_once_after(tmp_path, postgres, monkeypatch):
    """PostgreSQL frozen (SIGSTOP: connections open, no answers, no statement_timeout) while
    a batch is on its way: the shipper cuts the connection after STEP_LIMIT, the breaker
    opens, rows wait locally; after the thaw every row arrives exactly once."""
    from atlas_milter import pg_ship

    monkeypatch.setattr(pg_ship, "STEP_LIMIT", 2.0)
    db = tmp_path / "v.db"
    apply_migrations(db)
    write_records(db, 0, 100)
    shipper = Shipper(str(db), postgres.url, "mx1", interval=0.2, cooldown=1.0).start()
    try:
        wait_until(lambda: pg_rows(postgres.url, "SELECT count(*) FROM verdicts") == [(100,)], timeout=10,
                   what="the first rows shipped")
        try:
            postgres.freeze()
            frozen = time.monotonic()
            write_records(db, 100, 100)
            wait_until(lambda: shipper.breaker.is_open, timeout=10, what="the breaker open after the cut")
            assert time.monotonic() - frozen <= 2.0 + 0.2 + 2.0  # the limit, one interval, slack
            assert shipper._thread.is_alive()
        finally:
            postgres.thaw()
        wait_until(lambda: pg_rows(postgres.url, "SELECT count(*) FROM verdicts") == [(200,)], timeout=20,
                   what="every row after the thaw")
    finally:
        shipper.stop()
    assert pg_rows(postgres.url, "SELECT count(DISTINCT local_id), sum(1) FROM verdicts") == [(200, 200)]
    assert pg_rows(postgres.url, "SELECT sum(ham + spam + unsure) FROM domains") == [(200,)]


def test_a_milter_killed_while_shipping_loses_and_doubles_nothing(postfix, postgres):
    work = milter_workdir("atlas-pg-milter-")
    config = (f"[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\n"
              f"[store]\nurl = \"{postgres.url}\"\nship_interval = 0.1\n")
    lib, _ = unix_spec(work / "m.sock")
    raws = [(SAMPLE / name).read_bytes() for name in sorted(p.name for p in SAMPLE.iterdir())]
    proc = MilterProcess(work, lib, config_text=config, name="pgm").start()
    sent = 0
    try:
        with postfix.milter_set(proc.socket_spec, default_action="accept"):
            wait_milter_active(postfix, raws[0])
            for round_ in range(3):
                before = local_count(proc.db) if proc.db.exists() else 0
                for i in range(40):
                    send_one(postfix.host, postfix.smtp_port, with_token(raws[i % len(raws)], new_token()), [postfix.user])
                    sent += 1
                # The records are in SQLite (the bulk writer commits within a second); the
                # shipper sends every 0.1 s: the kill lands wherever it is.
                wait_until(lambda: local_count(proc.db) >= before + 40, timeout=15, what="the round's records committed")
                proc.proc.send_signal(signal.SIGKILL)
                proc.proc.wait(10)
                proc.start()  # the same database: it ships what is left
                wait_milter_active(postfix, raws[0])
    finally:
        proc.stop()
    total = local_count(proc.db)
    assert total >= 120  # every round's records, committed before its kill
    with sqlite3.connect(proc.db) as conn:
        local = {row[0] for row in conn.execute("SELECT id FROM processed_emails")}
    shipped = pg_rows(postgres.url, "SELECT local_id FROM verdicts")
    assert sorted(r[0] for r in shipped) == sorted(local)  # every row once: none lost, none doubled
