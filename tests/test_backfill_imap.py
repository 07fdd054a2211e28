"""`atlas-milter backfill FOLDER` against the real Dovecot: 1,000+ shared-corpus messages,
spam to Junk, rows match, nothing lost; kill -9 in the middle and run again: every message
processed exactly once and still in exactly one folder."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from atlas_milter.backfill import Summary, run_backfill
from atlas_milter.config import load_config

from tests.support.imap import (
    append_all,
    corpus_messages,
    db_rows,
    folder_message_ids,
    imap_config_toml,
    unique_names,
    wait_for,
)

pytestmark = pytest.mark.integration


def _check_mailbox(dovecot, db: Path, folder: str, junk: str, appended: list[tuple[str, str, bytes]]):
    """Rows, verdicts and folder contents agree, and every appended message is in exactly one place."""
    expected = {mid for mid, _, _ in appended}
    rows = db_rows(db, "SELECT message_id, verdict, action, uid FROM processed_emails WHERE folder = ?", (folder,))
    assert len(rows) == len(appended), "one row per appended message"
    assert Counter(r[0] for r in rows) == Counter(expected), "each message recorded exactly once"
    assert len({r[3] for r in rows}) == len(rows)
    with dovecot.client() as c:
        in_folder = folder_message_ids(c, folder)
        in_junk = folder_message_ids(c, junk)
    assert Counter(in_folder + in_junk) == Counter(expected), "INBOX + Junk hold exactly the messages appended"
    spam_rows = {r[0] for r in rows if r[1] == "spam"}
    assert set(in_junk) == spam_rows, "spam (and only spam) ended in Junk"
    assert all(r[2] == "move" for r in rows if r[1] == "spam")
    assert all(r[2] == "none" for r in rows if r[1] != "spam")
    return rows, in_folder, in_junk


def test_backfill_1000_corpus_messages(dovecot, corpus_dir, corpus_index, tmp_path):
    tag, folder, junk = unique_names()
    appended = corpus_messages(corpus_dir, corpus_index, 1000, tag, step=6)
    with dovecot.client() as c:
        c.create_folder(folder)
        t0 = time.monotonic()
        append_all(c, folder, [raw for _, _, raw in appended])
        append_s = time.monotonic() - t0
        c.select_folder(folder, readonly=True)
        assert len(c.search(["ALL"])) == 1000
        assert not c.search(["SEEN"])
    db = tmp_path / "v.db"
    config = load_config(None, {
        "store.db": str(db), "statsd.enabled": False, "imap.host": dovecot.host, "imap.port": dovecot.port,
        "imap.security": "plain", "imap.user": dovecot.user, "imap.password_file": str(dovecot.password_file),
        "imap.junk_folder": junk,
    }, env={})
    out, summary = io.StringIO(), Summary()
    assert run_backfill(config, folders=[folder], out=out, err=io.StringIO(), summary=summary) == 0
    print(f"appended 1000 in {append_s:.2f} s; {out.getvalue()}")
    assert summary.processed == 1000 and summary.errors == 0
    rows, in_folder, in_junk = _check_mailbox(dovecot, db, folder, junk, appended)
    labels = {mid: label for mid, label, _ in appended}
    spam = [m for m, l in labels.items() if l == "spam"]
    assert len(set(spam) & set(in_junk)) >= 0.95 * len(spam)  # the classifier does its job
    assert len([m for m in in_junk if labels[m] == "ham"]) <= 5
    assert summary.verdicts["spam"] == len(in_junk) and summary.actions["move"] == len(in_junk)
    with dovecot.client() as c:  # BODY.PEEK[]: nothing was marked \Seen
        c.select_folder(folder, readonly=True)
        assert not c.search(["SEEN"])
        c.select_folder(junk, readonly=True)
        assert not c.search(["SEEN"])
        assert len(c.search(["KEYWORD", "$Junk"])) == len(in_junk)

    # A second run finds nothing to do.
    out, summary = io.StringIO(), Summary()
    assert run_backfill(config, folders=[folder], out=out, err=io.StringIO(), summary=summary) == 0
    assert summary.processed == 0 and summary.already_done == len(in_folder)


def _backfill_cmd(dovecot, db: Path, folder: str, conf: Path) -> list[str]:
    return [sys.executable, "-m", "atlas_milter", "backfill", folder, "--config", str(conf),
            "--host", "127.0.0.1", "--port", str(dovecot.port), "--plain", "--user", dovecot.user,
            "--password-file", str(dovecot.password_file), "--db", str(db), "--chunk-size", "25"]


def test_kill_9_mid_backfill_then_resume(dovecot, corpus_dir, corpus_index, tmp_path):
    tag, folder, junk = unique_names()
    total = 1500
    appended = corpus_messages(corpus_dir, corpus_index, total, tag, step=4)
    with dovecot.client() as c:
        c.create_folder(folder)
        append_all(c, folder, [raw for _, _, raw in appended])
    db = tmp_path / "v.db"
    conf = tmp_path / "atlas.toml"
    conf.write_text(imap_config_toml(dovecot, db, junk))
    env = {**os.environ, "ENABLE_PARALLEL": "false"}  # slower, so there is a middle to kill in
    proc = subprocess.Popen(_backfill_cmd(dovecot, db, folder, conf), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: proc.poll() is not None or
                 (db_rows(db, "SELECT count(*) FROM processed_emails") or [(0,)])[0][0] >= 300,
                 timeout=120, what="the first 300 rows", interval=0.01)
        assert proc.poll() is None, "backfill finished before it could be killed: " + proc.stderr.read().decode()[-500:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done_before = db_rows(db, "SELECT count(*) FROM processed_emails")[0][0]
    assert 300 <= done_before < total
    with dovecot.client() as c:  # nothing lost at the moment of the kill
        assert Counter(folder_message_ids(c, folder) + folder_message_ids(c, junk)) == Counter(m for m, _, _ in appended)

    again = subprocess.run(_backfill_cmd(dovecot, db, folder, conf), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    print(f"killed after {done_before} rows; second run: {again.stdout}")
    assert f"{total - done_before} messages" in again.stdout
    _check_mailbox(dovecot, db, folder, junk, appended)


def test_fetch_raw_reads_the_same_bytes_as_imapclient(dovecot, corpus_dir, corpus_index):
    """The direct FETCH reader gives exactly imapclient's bodies: odd bytes, a body line that
    looks like a literal, expunged and unknown UIDs, a folder changed under it."""
    from atlas_milter.adapters.imap.session import ImapSession
    from atlas_milter.config import ImapConfig

    tag, folder, _junk = unique_names()
    appended = corpus_messages(corpus_dir, corpus_index, 120, tag, step=37)
    odd = [b"Subject: odd\r\nMessage-ID: <odd-%s@t>\r\n\r\nfoo {12}\r\n\xe9\xff\x00 binary\r\n" % tag.encode(),
           b"Subject: empty body\r\nMessage-ID: <empty-%s@t>\r\n\r\n" % tag.encode()]
    with dovecot.client() as c:
        c.create_folder(folder)
        append_all(c, folder, [raw for _, _, raw in appended] + odd)
    imap = ImapConfig(host=dovecot.host, port=dovecot.port, user=dovecot.user, security="plain")
    with ImapSession(imap, dovecot.password) as s, dovecot.client() as other:
        s.select(folder)
        uids = list(s.uids())
        other.select_folder(folder)
        other.delete_messages(uids[3:5])
        other.expunge()  # gone before our FETCH: the session sees EXPUNGE responses in its answer
        want = uids[::2] + uids[-2:] + [uids[-1] + 1000]
        got = s.fetch_raw(want)
        ref = {u: d[b"BODY[]"] for u, d in s.c.fetch(want, [b"BODY.PEEK[]"]).items() if b"BODY[]" in d}
        assert got == ref and uids[4] not in got and len(got) == len(set(want)) - 2
        assert s.c.noop()  # the connection is in step after the direct read
        s.select(folder, readonly=True)
        assert not s.c.search(["SEEN"])


HOSTILE = ["nested_1000", "nested_rfc822_1000", "parts_10000", "line_10mb_only", "nul_everywhere",
           "invalid_utf8_headers", "encoded_words_every_charset", "base64_garbage", "header_1mb",
           "headers_100000", "zip_bomb", "empty", "only_headers", "binary_garbage", "boundary_storm",
           "html_tag_storm"]


def test_backfill_of_crafted_hostile_messages(dovecot, tmp_path):
    """The crafted messages of test_hostile_input that Dovecot takes (APPEND), backfilled
    over IMAP: each one gets a verdict or a logged reason, in bounded time and memory."""
    import resource

    from imapclient.exceptions import IMAPClientError
    from tests.test_hostile_input import CRAFTED

    tag, folder, junk = unique_names()
    accepted, refused = [], {}
    with dovecot.client(timeout=60) as c:
        c.create_folder(folder)
        for name in HOSTILE:
            try:
                c.append(folder, CRAFTED[name]())
                accepted.append(name)
            except IMAPClientError as exc:
                refused[name] = str(exc)
    print(f"Dovecot took {len(accepted)} of {len(HOSTILE)}; refused: {refused}")
    assert len(accepted) >= 12, refused
    db, conf = tmp_path / "v.db", tmp_path / "atlas.toml"
    conf.write_text(imap_config_toml(dovecot, db, junk))
    t0 = time.monotonic()
    done = subprocess.run(_backfill_cmd(dovecot, db, folder, conf), capture_output=True, text=True, timeout=180)
    took = time.monotonic() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    print(f"backfill of {len(accepted)} hostile messages: {took:.1f} s, children's peak RSS {peak_mb:.0f} MB; "
          f"{done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    rows = db_rows(db, "SELECT uid, verdict, error FROM processed_emails WHERE folder = ?", (folder,))
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(rows) + len(errors) >= len(accepted), (rows, errors)
    assert len({uid for uid, _, _ in rows}) == len(rows)
    assert all(verdict in ("ham", "unsure", "spam") or error for _, verdict, error in rows), rows
    assert took < 60
    assert peak_mb < 1024
    with dovecot.client() as c:  # nothing lost
        placed = sum(len(c.search(["ALL"])) for f in (folder, junk) if c.folder_exists(f)
                     and c.select_folder(f, readonly=True))
    assert placed == len(accepted)
