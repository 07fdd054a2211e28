"""`backfill --maildir` / `--mbox`: no server needed; resumable by (path, 0, stable id);
summary counts; dry runs do not block real runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_milter.backfill import Progress, Summary, maildir_unique, run_backfill, stable_id
from atlas_milter.config import load_config
from atlas_milter.errors import AtlasError

from tests.support.imap import corpus_messages, db_rows


def _config(db: Path, **extra):
    return load_config(None, {"store.db": str(db), "statsd.enabled": False, **extra}, env={})


def _maildir(path: Path, messages: list[bytes], start: int = 0) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for i, raw in enumerate(messages, start):
        (path / "new" / f"17000000{i:02d}.M{i}P1.test,S={len(raw)}").write_bytes(raw)
    return path


def _run(config, **kw) -> tuple[int, Summary, str]:
    out, err, summary = io.StringIO(), io.StringIO(), Summary()
    rc = run_backfill(config, out=out, err=err, summary=summary, **kw)
    return rc, summary, out.getvalue()


@pytest.fixture
def sixty(corpus_dir, corpus_index):
    return corpus_messages(corpus_dir, corpus_index, 60, "local", step=97)


def test_maildir_backfill_counts_and_resume(tmp_path, sixty):
    db = tmp_path / "v.db"
    md = _maildir(tmp_path / "Maildir", [raw for _, _, raw in sixty[:50]])
    config = _config(db)
    rc, s, text = _run(config, maildir=str(md))
    assert rc == 0 and s.processed == 50 and s.already_done == 0 and s.errors == 0
    assert sum(s.verdicts.values()) == 50 and s.actions["record"] + s.actions["none"] == 50
    assert "50 messages" in text and "verdicts:" in text and "msg/s" in text and "peak memory" in text
    rows = db_rows(db, "SELECT folder, uidvalidity, uid, source, message_id FROM processed_emails")
    assert len(rows) == 50 and {r[0] for r in rows} == {str(md.resolve())} and {r[1] for r in rows} == {0}
    assert {r[4] for r in rows} == {mid for mid, _, _ in sixty[:50]}
    spam_ids = {mid for mid, label, _ in sixty[:50] if label == "spam"}
    verdict_spam = {r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails WHERE verdict = 'spam'")}
    assert len(verdict_spam & spam_ids) >= 0.9 * len(spam_ids)

    # A mail client reads some: new/ -> cur/ with flags. Still the same messages.
    for f in sorted((md / "new").iterdir())[:10]:
        f.rename(md / "cur" / (f.name + ":2,S"))
    rc, s, _ = _run(config, maildir=str(md))
    assert (rc, s.processed, s.already_done) == (0, 0, 50)

    _maildir(md, [raw for _, _, raw in sixty[50:]], start=50)  # new mail arrives
    rc, s, _ = _run(config, maildir=str(md))
    assert (s.processed, s.already_done) == (10, 50)
    assert len(db_rows(db, "SELECT id FROM processed_emails")) == 60


def test_maildir_limit_and_dry_run_do_not_block_a_real_run(tmp_path, sixty):
    db = tmp_path / "v.db"
    md = _maildir(tmp_path / "Maildir", [raw for _, _, raw in sixty[:30]])
    config = _config(db)
    rc, s, text = _run(config, maildir=str(md), dry_run=True, limit=12)
    assert s.processed == 12 and s.actions == {"dry-run": 12} and "dry run" in text
    rc, s, _ = _run(config, maildir=str(md), dry_run=True)
    assert (s.processed, s.already_done) == (18, 12)  # dry runs resume too
    rc, s, _ = _run(config, maildir=str(md))
    assert (s.processed, s.already_done) == (30, 0)  # the real run is not blocked by the dry runs
    folders = dict(db_rows(db, "SELECT folder, count(*) FROM processed_emails GROUP BY folder"))
    assert folders == {str(md.resolve()) + " [dry-run]": 30, str(md.resolve()): 30}


def _mbox(path: Path, messages: list[bytes], mode: str = "wb") -> Path:
    with open(path, mode) as fh:
        for raw in messages:
            body = b"\n".join((b">" + line if line.startswith(b"From ") else line) for line in raw.replace(b"\r\n", b"\n").split(b"\n"))
            fh.write(b"From sender@example.test Mon Jan  1 00:00:00 2024\n" + body.rstrip(b"\n") + b"\n\n")
    return path


def test_mbox_backfill_resume_after_append(tmp_path, sixty):
    db = tmp_path / "v.db"
    mbox = _mbox(tmp_path / "old.mbox", [raw for _, _, raw in sixty[:40]])
    config = _config(db)
    rc, s, _ = _run(config, mbox=str(mbox))
    assert (rc, s.processed, s.errors) == (0, 40, 0)
    assert {r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails")} == {m for m, _, _ in sixty[:40]}
    _mbox(mbox, [raw for _, _, raw in sixty[40:]], mode="ab")
    rc, s, _ = _run(config, mbox=str(mbox))
    assert (s.processed, s.already_done) == (20, 40)
    rc, s, _ = _run(config, mbox=str(mbox))
    assert (s.processed, s.already_done) == (0, 60)
    rows = db_rows(db, "SELECT folder, uid, count(*) FROM processed_emails GROUP BY 1, 2 HAVING count(*) > 1")
    assert rows == []


def test_mbox_cli_prints_summary(tmp_path, sixty):
    mbox = _mbox(tmp_path / "a.mbox", [raw for _, _, raw in sixty[:15]])
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_milter", "backfill", "--mbox", str(mbox), "--db", str(tmp_path / "c.db")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "ENABLE_PARALLEL": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"backfill {mbox.resolve()}: 15 messages in ")
    assert "verdicts:" in proc.stdout and "actions:" in proc.stdout


def test_backfill_argument_errors(tmp_path):
    config = _config(tmp_path / "v.db")
    with pytest.raises(AtlasError, match="one of them"):
        run_backfill(config)
    with pytest.raises(AtlasError, match="one of them"):
        run_backfill(config, folders=["INBOX"], maildir=str(tmp_path))
    with pytest.raises(AtlasError, match="not a Maildir"):
        run_backfill(config, maildir=str(tmp_path), out=io.StringIO())
    with pytest.raises(AtlasError, match="--since"):
        run_backfill(config, maildir=str(tmp_path), since="yesterday")


def test_stable_ids():
    assert maildir_unique("1700.M1P2.host,S=10:2,RS") == "1700.M1P2.host,S=10"
    assert stable_id("a") == stable_id(b"a") and 0 <= stable_id("a") < 2**63
    assert stable_id("a") != stable_id("b")


def test_progress_bar_and_log_lines():
    tty = io.StringIO()
    p = Progress("INBOX", 200, tty, tty=True)
    p.update(50, force=True)
    assert "\r" in tty.getvalue() and "50/200" in tty.getvalue() and "ETA" in tty.getvalue() and "msg/s" in tty.getvalue()
    log = io.StringIO()
    p = Progress("INBOX", None, log, tty=False)
    p.update(10, force=True)
    assert log.getvalue().endswith("\n") and "\r" not in log.getvalue() and "10 messages" in log.getvalue()


def test_imap_source_fetches_a_chunk_per_round_trip_or_one_on_the_plain_path():
    from atlas_milter.backfill import ImapFolderSource

    class FakeSession:
        def __init__(self):
            self.calls = []

        def fetch_raw(self, uids):
            self.calls.append(list(uids))
            return {u: b"Subject: %d\r\n\r\nx" % u for u in uids if u != 5}  # 5 was expunged meanwhile

    s = FakeSession()
    src = ImapFolderSource(s, list(range(1, 11)), batch=4)
    got = iter(src.iter_messages("INBOX"))
    assert next(got)[0] == "1" and s.calls == [[1, 2, 3, 4]]  # lazy: one chunk fetched at a time
    assert [k for k, _ in got] == ["2", "3", "4", "6", "7", "8", "9", "10"]
    assert s.calls == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]] and src.vanished == 1
    s = FakeSession()
    assert len(list(ImapFolderSource(s, [1, 2, 3], batch=1).iter_messages("INBOX"))) == 3
    assert s.calls == [[1], [2], [3]]


def test_imap_source_prefetches_a_bounded_number_of_chunks_in_order():
    import threading
    import time

    from atlas_milter.backfill import ImapFolderSource

    class FakeSession:
        def __init__(self, fail_at=None):
            self.calls = []
            self.fail_at = fail_at

        def fetch_raw(self, uids):
            assert threading.current_thread().name == "atlas-imap-prefetch"
            if self.fail_at in uids:
                raise ConnectionError("lost")
            self.calls.append(list(uids))
            return {u: b"Subject: %d\r\n\r\nx" % u for u in uids if u != 5}

    s = FakeSession()
    src = ImapFolderSource(s, list(range(1, 41)), batch=4, prefetch=2)
    got = iter(src.iter_messages("INBOX"))
    assert next(got)[0] == "1"
    time.sleep(0.3)
    # the chunk being consumed, two queued, one fetched and waiting for room: never more
    assert 2 <= len(s.calls) <= 4
    assert [k for k, _ in got] == [str(u) for u in range(2, 41) if u != 5]
    assert src.vanished == 1 and src._thread is None  # the thread is joined at the end

    # the fetch thread's error reaches the consumer; close() stops the thread
    s = FakeSession(fail_at=10)
    src = ImapFolderSource(s, list(range(1, 41)), batch=4, prefetch=1)
    keys = []
    with pytest.raises(ConnectionError):
        for key, _ in src.iter_messages("INBOX"):
            keys.append(key)
    assert keys == ["1", "2", "3", "4", "6", "7", "8"]
    # abandoned half-way: close() stops the fetcher and frees the session
    s = FakeSession()
    src = ImapFolderSource(s, list(range(1, 401)), batch=4, prefetch=1)
    got = iter(src.iter_messages("INBOX"))
    next(got)
    src.close()
    assert src._thread is None and len(s.calls) < 100
    # the plain path (batch 1) never starts a thread
    assert ImapFolderSource(FakeSession(), [1, 2], batch=1, prefetch=2).prefetch == 0
