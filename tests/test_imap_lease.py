"""Two IMAP listeners ("hosts") configured for the same account with [cluster] on one real
Redis, against a real Dovecot: exactly one watches (it holds the lease), the other stands
by; mail is classified and moved once; when the watcher is killed (SIGKILL) the standby
takes over within the lease's time to live and classifies what arrives next; no message
is moved twice; a clean stop gives the lease up at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.imap import (
    db_rows, folder_message_ids, imap_config_toml, last_row, sample_message, stop_listener, unique_names, wait_for,
)
from tests.support.requirements import require_binary
from tests.support.servers import RedisInstance, pg_rows, private_tmpdir

pytestmark = pytest.mark.integration

TTL = 2.0


def start_listener(dovecot, tmp_path, name: str, folder: str, junk: str, redis_url: str, store: str = ""):
    db = tmp_path / f"{name}.db"
    conf = tmp_path / f"{name}.toml"
    extra = (f"reconnect_initial = 0.5\nreconnect_max = 2.0\n[cluster]\nredis = \"{redis_url}\"\nhost = \"{name}\"\n"
             f"lease_ttl = {TTL}\n")
    conf.write_text(imap_config_toml(dovecot, db, junk, extra).replace("[store]\n", f"[store]\n{store}", 1))
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "atlas_milter", "idle", folder, "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            env={**os.environ, "ENABLE_PARALLEL": "false"})
    return proc, db, log


def test_one_listener_watches_an_account_and_a_standby_takes_over(dovecot, tmp_path):
    require_binary("redis-server")
    redis = RedisInstance(private_tmpdir("atlas-lease-redis-")).start()
    tag, folder, junk = unique_names()
    with dovecot.client() as c:
        c.create_folder(folder)
    a = b = None
    try:
        a, db_a, log_a = start_listener(dovecot, tmp_path, "imap1", folder, junk, redis.url)
        wait_for(lambda: a.poll() is not None or "imap: watching" in log_a.read_text(), 30, "imap1 watching")
        b, db_b, log_b = start_listener(dovecot, tmp_path, "imap2", folder, junk, redis.url)
        wait_for(lambda: b.poll() is not None or "standing by" in log_b.read_text(), 30, "imap2 standing by")
        assert a.poll() is None and b.poll() is None, log_a.read_text() + log_b.read_text()
        assert "imap: watching" not in log_b.read_text()

        first = f"<first-{tag}@lease.test>"
        with dovecot.client() as c:
            c.append(folder, sample_message("07-crypto-scam.eml", first))
        wait_for(lambda: last_row(db_a, first), 10, "imap1 classifies the first")
        with dovecot.client() as c:
            wait_for(lambda: first in folder_message_ids(c, junk), 10, "the first in Junk")
        assert last_row(db_b, first) is None  # the standby does nothing

        # The watcher dies without giving its lease up: the standby takes over within the TTL.
        killed = time.monotonic()
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        wait_for(lambda: "imap: watching" in log_b.read_text(), TTL + 10, "imap2 takes over")
        took = time.monotonic() - killed
        assert took <= TTL + 5, took
        second = f"<second-{tag}@lease.test>"
        with dovecot.client() as c:
            c.append(folder, sample_message("09-phishing.eml", second))
        wait_for(lambda: last_row(db_b, second), 15, "imap2 classifies the second")
        with dovecot.client() as c:
            wait_for(lambda: second in folder_message_ids(c, junk), 10, "the second in Junk")
            assert sorted(folder_message_ids(c, junk)) == sorted([first, second])  # each moved once
            assert folder_message_ids(c, folder) == []
        assert db_rows(db_b, "SELECT count(*) FROM processed_emails WHERE message_id = ?", (first,)) == [(0,)]

        # A clean stop gives the lease up at once.
        stop_listener(b, log_b)
        import redis as redis_py

        assert redis_py.Redis.from_url(redis.url).keys("{atlas}:lease:*") == []
    finally:
        for proc, log in ((a, locals().get("log_a")), (b, locals().get("log_b"))):
            if proc is not None and proc.poll() is None:
                stop_listener(proc, log)
        redis.stop()


def test_with_a_shared_store_the_new_watcher_resumes_where_the_old_one_stopped(dovecot, tmp_path, postgres):
    """[store] url on both hosts: the standby that takes over resumes after the last UID the
    dead watcher recorded, so mail that arrived while nobody watched is classified; and a
    message the dead watcher called ham, moved to Junk by the user afterwards, is learned as
    spam by the new watcher (it reads the other host's verdict from PostgreSQL)."""
    require_binary("redis-server")
    redis = RedisInstance(private_tmpdir("atlas-lease-redis-")).start()
    tag, folder, junk = unique_names()
    store = f'url = "{postgres.url}"\nship_interval = 0.2\n'
    with dovecot.client() as c:
        c.create_folder(folder)
    a = b = None
    try:
        a, db_a, log_a = start_listener(dovecot, tmp_path, "imap1", folder, junk, redis.url, store)
        wait_for(lambda: a.poll() is not None or "imap: watching" in log_a.read_text(), 30, "imap1 watching")
        b, db_b, log_b = start_listener(dovecot, tmp_path, "imap2", folder, junk, redis.url, store)
        wait_for(lambda: b.poll() is not None or "standing by" in log_b.read_text(), 30, "imap2 standing by")

        wanted, spam = f"<wanted-{tag}@lease.test>", f"<spam-{tag}@lease.test>"
        with dovecot.client() as c:
            c.append(folder, sample_message("01-team-meeting.eml", wanted))
            c.append(folder, sample_message("07-crypto-scam.eml", spam))
            wait_for(lambda: spam in folder_message_ids(c, junk), 15, "imap1 moves the spam")
        assert last_row(db_a, wanted)[:2] == ("ham", "none")
        wait_for(lambda: pg_rows(postgres.url, "SELECT count(*) FROM verdicts") == [(2,)]
                 and pg_rows(postgres.url, "SELECT 1 FROM folder_marks LIMIT 1"), 10, "imap1's records shipped")

        a.send_signal(signal.SIGKILL)
        a.wait(10)
        unwatched = f"<unwatched-{tag}@lease.test>"
        with dovecot.client() as c:  # arrives before imap2 can hold the lease
            c.append(folder, sample_message("09-phishing.eml", unwatched))
        assert "imap: watching" not in log_b.read_text()
        wait_for(lambda: "imap: watching" in log_b.read_text(), TTL + 10, "imap2 takes over")
        wait_for(lambda: last_row(db_b, unwatched), 15, "imap2 classifies what arrived while nobody watched")
        with dovecot.client() as c:
            wait_for(lambda: unwatched in folder_message_ids(c, junk), 10, "the unwatched spam in Junk")
            c.select_folder(folder)
            c.move(c.search(["HEADER", "Message-ID", wanted]), junk)  # the user disagrees with imap1
        events = wait_for(lambda: db_rows(db_b, "SELECT label, previous_verdict, message_id FROM learning_events"), 10,
                          "imap2 learns from the move")
        assert events == [("spam", "ham", wanted)]
        with dovecot.client() as c:
            assert sorted(folder_message_ids(c, junk)) == sorted([spam, unwatched, wanted])  # each once
        assert last_row(db_b, spam) is None and last_row(db_b, wanted) is None  # imap1's, not redone
    finally:
        for proc, log in ((a, locals().get("log_a")), (b, locals().get("log_b"))):
            if proc is not None and proc.poll() is None:
                stop_listener(proc, log)
        redis.stop()
