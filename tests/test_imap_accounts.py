"""Two IMAP accounts sharing one verdict database, on one real Dovecot, whose INBOXes have the
same name and the same UIDVALIDITY (so the same UIDs): each account's mail is classified
exactly once, by backfill and by two `atlas-milter idle --account NAME` listeners (the two
`atlas-milter-idle@NAME` units of one host). Keyed by mailbox alone, the second account took
the first one's UIDs as already processed and skipped its mail."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from atlas_milter.backfill import Summary, run_backfill
from atlas_milter.config import load_config

from tests.support.requirements import require_binary, require_root, start_or_fail
from tests.support.servers import DovecotInstance
from tests.support.imap import db_rows, sample_message, stop_listener, wait_for

pytestmark = pytest.mark.integration

ACCOUNTS = {"alice": "alice@example.test", "bob": "bob@example.test"}
UIDVALIDITY = 424242


@pytest.fixture
def two_accounts(servers_dir: Path, tmp_path: Path):
    """A Dovecot with two users whose INBOXes share UIDVALIDITY, and a config naming both."""
    require_binary("dovecot")
    require_binary("doveadm")
    require_root("dovecot")
    passwords = {user: uuid.uuid4().hex for user in ACCOUNTS.values()}
    server = start_or_fail(DovecotInstance(servers_dir / f"dovecot-accounts-{uuid.uuid4().hex[:6]}",
                                           extra_users=passwords), "dovecot (two accounts)")
    try:
        for user in ACCOUNTS.values():
            with server.client(user=user) as c:  # the first login creates the INBOX
                c.select_folder("INBOX")
            server.set_uidvalidity(user, "INBOX", UIDVALIDITY)
        db = tmp_path / "shared.db"
        text = (f'log_level = "info"\n[store]\ndb = "{db}"\n[statsd]\nenabled = false\n'
                f'[imap]\nhost = "{server.host}"\nport = {server.port}\nsecurity = "plain"\nspam_action = "flag"\n'
                'reconnect_initial = 0.5\nreconnect_max = 2.0\n')
        for name, user in ACCOUNTS.items():
            pw_file = tmp_path / f"{name}.password"
            pw_file.write_text(passwords[user] + "\n")
            pw_file.chmod(0o600)
            text += f'[imap.accounts.{name}]\nuser = "{user}"\npassword_file = "{pw_file}"\n'
        conf = tmp_path / "atlas.toml"
        conf.write_text(text)
        yield server, conf, db
    finally:
        server.stop()


def _append(server: DovecotInstance, account: str, mids: list[str]) -> list[int]:
    with server.client(user=ACCOUNTS[account]) as c:
        for i, mid in enumerate(mids):
            c.append("INBOX", sample_message("07-crypto-scam.eml" if i % 2 else "01-team-meeting.eml", mid))
        info = c.select_folder("INBOX", readonly=True)
        assert info[b"UIDVALIDITY"] == UIDVALIDITY
        return sorted(c.search(["ALL"]))


def _rows(db: Path) -> list[tuple]:
    return db_rows(db, "SELECT account, folder, uidvalidity, uid, message_id FROM processed_emails ORDER BY id")


def test_backfill_of_two_accounts_with_the_same_mailbox_keys(two_accounts):
    server, conf, db = two_accounts
    mids = {name: [f"<{name}-{i}-{uuid.uuid4().hex[:8]}@accounts.test>" for i in range(3)] for name in ACCOUNTS}
    uids = {name: _append(server, name, mids[name]) for name in ACCOUNTS}
    assert uids["alice"] == uids["bob"]  # the same (INBOX, UIDVALIDITY, UID) keys in both
    config = load_config(conf, env={"ENABLE_PARALLEL": "false"})
    for name in ACCOUNTS:
        summary = Summary()
        assert run_backfill(config, folders=["INBOX"], account=name, out=io.StringIO(), err=io.StringIO(),
                            summary=summary) == 0
        assert (summary.processed, summary.already_done) == (3, 0), name
    rows = _rows(db)
    assert Counter(r[4] for r in rows) == Counter(mids["alice"] + mids["bob"]), "each message recorded exactly once"
    for name in ACCOUNTS:
        assert sorted((r[3], r[4]) for r in rows if r[0] == name) == sorted(zip(uids[name], mids[name]))
    for name in ACCOUNTS:  # and a second run finds each account's mail done
        summary = Summary()
        run_backfill(config, folders=["INBOX"], account=name, out=io.StringIO(), err=io.StringIO(), summary=summary)
        assert (summary.processed, summary.already_done) == (0, 3), name


def test_two_listeners_with_the_same_mailbox_keys_each_classify_their_mail_once(two_accounts, tmp_path):
    server, conf, db = two_accounts
    procs = {}
    try:
        for name in ACCOUNTS:
            log = tmp_path / f"idle-{name}.log"
            procs[name] = (subprocess.Popen(
                [sys.executable, "-m", "atlas_milter", "idle", "--account", name, "--config", str(conf)],
                stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={**os.environ, "ENABLE_PARALLEL": "false"}), log)
        for name, (proc, log) in procs.items():
            wait_for(lambda: proc.poll() is not None or "imap: watching" in log.read_text(), 30, f"{name}'s listener")
            assert proc.poll() is None, log.read_text()
        expected: list[str] = []
        # Alice's mail first, then Bob's with the same UIDs: keyed by mailbox alone, Bob's
        # listener would find Alice's UIDs recorded and skip (and the insert ignore) his.
        for name in ("alice", "bob", "alice", "bob"):
            mids = [f"<{name}-{uuid.uuid4().hex[:8]}@accounts.test>" for _ in range(2)]
            _append(server, name, mids)
            expected += mids
            wait_for(lambda: {r[4] for r in _rows(db)} >= set(expected), 20,
                     f"{name}'s messages recorded\n" + procs[name][1].read_text()[-2000:])
        rows = _rows(db)
        assert Counter(r[4] for r in rows) == Counter(expected), "each message classified exactly once"
        for name in ACCOUNTS:
            mine = [r for r in rows if r[0] == name]
            assert {r[4] for r in mine} == {m for m in expected if m.startswith(f"<{name}-")}
            assert [r[1:3] for r in mine] == [("INBOX", UIDVALIDITY)] * 4
            assert sorted(r[3] for r in mine) == [1, 2, 3, 4]
    finally:
        for proc, log in procs.values():
            stop_listener(proc, log)
