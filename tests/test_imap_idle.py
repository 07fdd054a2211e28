"""`atlas-milter idle` against the real Dovecot, as a subprocess: new mail is classified and
acted on within seconds; Dovecot stopped and started again -> the listener reconnects by
itself and handles what arrived meanwhile; the user's moves into and out of Junk are learned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from atlas_milter.classifier import load_model
from atlas_milter.message import parse_message

from tests.support.imap import (
    db_rows, folder_message_ids, hammy_spam, imap_config_toml, last_row, sample_message, stop_listener, unique_names,
    wait_for, with_message_id,
)

pytestmark = pytest.mark.integration

FAST_RECONNECT = "reconnect_initial = 0.5\nreconnect_max = 2.0\nkeepalive = 20.0\n"


def _start_idle(dovecot, tmp_path: Path, folder: str, junk: str, extra: str = "") -> tuple[subprocess.Popen, Path, Path]:
    db = tmp_path / "v.db"
    conf = tmp_path / "atlas.toml"
    conf.write_text(imap_config_toml(dovecot, db, junk, FAST_RECONNECT + extra))
    log = tmp_path / "idle.log"
    with dovecot.client() as c:
        c.create_folder(folder)
    proc = subprocess.Popen([sys.executable, "-m", "atlas_milter", "idle", folder, "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={**os.environ, "ENABLE_PARALLEL": "false"})
    wait_for(lambda: proc.poll() is not None or "imap: watching" in log.read_text(), 30, "the listener to start")
    assert proc.poll() is None, log.read_text()
    return proc, db, log


def test_idle_acts_within_seconds_and_reconnects_after_dovecot_restart(dovecot, tmp_path):
    tag, folder, junk = unique_names()
    proc, db, log = _start_idle(dovecot, tmp_path, folder, junk)
    try:
        spam, ham = f"<spam-{tag}@idle.test>", f"<ham-{tag}@idle.test>"
        with dovecot.client() as c:
            t0 = time.monotonic()
            c.append(folder, sample_message("07-crypto-scam.eml", spam))
            c.append(folder, sample_message("01-team-meeting.eml", ham))
        wait_for(lambda: last_row(db, spam) and last_row(db, ham), 10, "both verdicts", interval=0.05)
        with dovecot.client() as c:
            wait_for(lambda: spam in folder_message_ids(c, junk), 10, "the spam in Junk", interval=0.05)
            latency = time.monotonic() - t0
            assert folder_message_ids(c, folder) == [ham]
            c.select_folder(junk, readonly=True)
            assert c.search(["KEYWORD", "$Junk"]) and not c.search(["SEEN"])
        assert last_row(db, spam)[:2] == ("spam", "move") and last_row(db, ham)[:2] == ("ham", "none")
        assert latency < 5, f"acted on after {latency:.1f} s"

        # Dovecot goes away; mail is delivered to the Maildir meanwhile (as Postfix would).
        away, after = f"<away-{tag}@idle.test>", f"<after-{tag}@idle.test>"
        dovecot.stop()
        try:
            new = dovecot.maildir / f".{folder}" / "new"
            assert new.is_dir()
            dropped = new / f"{int(time.time())}.M{uuid.uuid4().int % 10**6}P1.atlas-test"
            dropped.write_bytes(sample_message("10-lottery.eml", away).replace(b"\r\n", b"\n"))
            os.chown(dropped, 65534, 65534)
            wait_for(lambda: "reconnecting" in log.read_text(), 15, "the listener to notice")
        finally:
            dovecot.start()
        with dovecot.client() as c:
            c.append(folder, sample_message("08-pharmacy.eml", after))
        wait_for(lambda: last_row(db, away) and last_row(db, after), 30, "the mail from while it was away")
        with dovecot.client() as c:
            wait_for(lambda: {away, after} <= set(folder_message_ids(c, junk)), 10, "both in Junk")
            assert folder_message_ids(c, folder) == [ham]
        rows = db_rows(db, "SELECT message_id, count(*) FROM processed_emails GROUP BY 1 HAVING count(*) > 1")
        assert rows == [], "nothing processed twice"
    finally:
        stop_listener(proc, log)
    assert proc.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert dovecot.password not in text


def test_learning_from_the_users_moves(dovecot, tmp_path, corpus_dir, corpus_index):
    tag, folder, junk = unique_names()
    # High cutoffs: this spam is scored "ham", as a model that has not seen its like would.
    proc, db, log = _start_idle(dovecot, tmp_path, folder, junk,
                                "[classifier]\nspam_cutoff = 0.995\nham_cutoff = 0.99\n")
    raw = hammy_spam(corpus_dir, corpus_index)
    try:
        first, second = f"<learn1-{tag}@idle.test>", f"<learn2-{tag}@idle.test>"
        with dovecot.client() as c:
            c.append(folder, with_message_id(raw, first))
        wait_for(lambda: last_row(db, first), 10, "the first verdict")
        verdict, action, score_before, _ = last_row(db, first)
        assert (verdict, action) == ("ham", "none")

        with dovecot.client() as c:  # the user disagrees: into Junk it goes
            c.select_folder(folder)
            c.move(c.search(["HEADER", "Message-ID", first]), junk)
        events = wait_for(lambda: db_rows(db, "SELECT label, previous_verdict, message_id FROM learning_events"), 10,
                          "the learning event")
        assert events == [("spam", "ham", first)]
        model_file = Path(str(db) + ".model.json.gz")
        assert model_file.exists()

        with dovecot.client() as c:  # the next copy scores higher
            c.append(folder, with_message_id(raw, second))
        wait_for(lambda: last_row(db, second), 10, "the second verdict")
        score_after = last_row(db, second)[2]
        assert score_after > score_before + 0.1, (score_before, score_after)
        assert load_model(model_file).score(parse_message(with_message_id(raw, second))).score == pytest.approx(score_after, abs=1e-6)

        # Our spam, rescued by the user from Junk: learned as ham, and left where the user put it.
        rescued = f"<rescued-{tag}@idle.test>"
        with dovecot.client() as c:
            c.append(folder, sample_message("07-crypto-scam.eml", rescued))
            wait_for(lambda: rescued in folder_message_ids(c, junk), 10, "our move to Junk")
            c.select_folder(junk)
            c.move(c.search(["HEADER", "Message-ID", rescued]), folder)
        wait_for(lambda: db_rows(db, "SELECT 1 FROM learning_events WHERE message_id = ? AND label = 'ham'", (rescued,)),
                 10, "learning the rescued message as ham")
        # The learning event is written at once; the verdict record goes through the bulk writer.
        wait_for(lambda: (last_row(db, rescued) or (None, None))[1] == "learned-ham", 10, "the learned-ham record")
        time.sleep(1.5)
        with dovecot.client() as c:
            assert rescued in folder_message_ids(c, folder) and rescued not in folder_message_ids(c, junk)
    finally:
        stop_listener(proc, log)
    assert proc.returncode == 0, log.read_text()[-2000:]
