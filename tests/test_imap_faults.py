"""The IMAP listener under faults, against real Dovecot: kill -9 in the middle of its moves
(with MOVE, and on a server without MOVE, where a move is COPY + \\Deleted + UID EXPUNGE)
and restarts: every message ends in exactly one of the folder and Junk, recorded once.

A private Dovecot without MOVE is started for the COPY path (`dovecot_no_move`); the rest
use the session `dovecot` fixture, each test in folders of its own."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.requirements import require_binary, require_root, start_or_fail
from tests.support.servers import DovecotInstance
from tests.support.imap import (
    with_message_id,
    append_all,
    corpus_messages,
    db_rows,
    folder_message_ids,
    imap_config_toml,
    unique_names,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = "reconnect_initial = 0.5\nreconnect_max = 2.0\nkeepalive = 20.0\n"
# Dovecot's default capabilities minus MOVE: our move() must fall back to COPY + UID EXPUNGE.
NO_MOVE_CONF = (
    "protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE UIDPLUS "
    "MULTIAPPEND UNSELECT CHILDREN ESEARCH\n}\n"
)


@pytest.fixture(scope="module")
def dovecot_no_move(servers_dir: Path):
    for name in ("dovecot", "doveadm"):
        require_binary(name)
    require_root("dovecot")
    server = start_or_fail(DovecotInstance(servers_dir / "dovecot-no-move", extra_conf=NO_MOVE_CONF),
                           "dovecot without MOVE")
    yield server
    server.stop()


class IdleProcess:
    """`atlas-milter idle FOLDER` as a subprocess; its log appended to one file across restarts."""

    def __init__(self, conf: Path, folder: str, log: Path) -> None:
        self.conf, self.folder, self.log = conf, folder, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "IdleProcess":
        mark = len(self.log.read_text()) if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atlas_milter", "idle", self.folder, "--config", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env={**os.environ, "ENABLE_PARALLEL": "false"})
        wait_for(lambda: self.proc.poll() is not None or "imap: watching" in self.log.read_text()[mark:], 30,
                 "the listener to start")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("listener did not stop on SIGTERM\n" + self.log.read_text()[-2000:])
        return self.proc.returncode


def _recorded(db: Path) -> int:
    return (db_rows(db, "SELECT count(*) FROM processed_emails") or [(0,)])[0][0]


def _kill_9_during_moves(server, corpus_dir, corpus_index, tmp_path, total: int, kills: int) -> dict:
    """Append `total` corpus messages while the listener runs, kill -9 it `kills` times at
    random points of its work, restart it each time, then check exactly-once placement."""
    tag, folder, junk = unique_names()
    db, conf, log = tmp_path / "v.db", tmp_path / "atlas.toml", tmp_path / "idle.log"
    conf.write_text(imap_config_toml(server, db, junk, FAST))
    spam = [r for r in corpus_index if r["label"] == "spam"]
    ham = [r for r in corpus_index if r["label"] == "ham"]
    mix = spam[:: max(1, len(spam) * 4 // (total * 3))][: total * 3 // 4] + ham[:: max(1, len(ham) * 4 // total)]
    appended = corpus_messages(corpus_dir, mix, total, tag, step=1)  # three quarters spam, shuffled
    expected = Counter(mid for mid, _, _ in appended)
    with server.client() as c:
        c.create_folder(folder)
    idle = IdleProcess(conf, folder, log).start()
    rng = random.Random()
    seen_both = 0
    try:
        with server.client() as c:
            append_all(c, folder, [raw for _, _, raw in appended])
        for k in range(kills):
            # Somewhere in the middle of the work, not before it started or after it ended.
            threshold = int(total * (k + 1) / (kills + 2))
            wait_for(lambda: _recorded(db) >= threshold, 120, f"{threshold} records")
            time.sleep(rng.uniform(0.0, 0.3))
            idle.kill9()
            with server.client() as c:  # at the moment of the kill: nothing lost
                in_folder, in_junk = folder_message_ids(c, folder), folder_message_ids(c, junk)
            placed = Counter(in_folder + in_junk)
            assert set(placed) == set(expected), "a message vanished at a kill -9"
            seen_both += sum(n - 1 for n in placed.values())  # a COPY not yet expunged
            # systemd restarts the listener RestartSec=15s later: by then Dovecot has finished
            # the command the killed client had in flight (a COPY it has not answered yet). An
            # instant restart could look at the folders before that COPY lands and copy again.
            time.sleep(1.0)
            idle.start()
        # The last run finishes: every record written, every recorded move done.
        wait_for(lambda: _recorded(db) >= total, 120, "all records")

        def settled():
            with server.client() as c:
                in_junk = folder_message_ids(c, junk)
                placed = Counter(folder_message_ids(c, folder) + in_junk)
            spam = {r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails WHERE verdict = 'spam'")}
            return placed == expected and set(in_junk) == spam
        try:
            wait_for(settled, 30, "every message in exactly one folder, the spam in Junk")
        except AssertionError:
            with server.client() as c:
                in_folder, in_junk = folder_message_ids(c, folder), folder_message_ids(c, junk)
            placed = Counter(in_folder + in_junk)
            spam = {r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails WHERE verdict = 'spam'")}
            raise AssertionError(
                f"twice: {[m for m, n in placed.items() if n > 1][:5]}; missing: {list(expected - placed)[:5]}; "
                f"spam not in Junk: {list(spam - set(in_junk))[:5]}; in Junk, not spam: {list(set(in_junk) - spam)[:5]}"
                "\n" + log.read_text()[-3000:]) from None
    finally:
        rc = idle.stop()
    assert rc == 0, log.read_text()[-2000:]
    rows = db_rows(db, "SELECT message_id, verdict, action FROM processed_emails WHERE folder = ?", (folder,))
    assert Counter(r[0] for r in rows) == expected, "each message recorded exactly once"
    with server.client() as c:
        in_junk = set(folder_message_ids(c, junk))
    assert in_junk == {r[0] for r in rows if r[1] == "spam"}, "spam, and only spam, in Junk"
    assert db_rows(db, "SELECT count(*) FROM learning_events") == [(0,)], "our own moves were not learned"
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return {"spam": len(in_junk), "seen_in_both_at_a_kill": seen_both,
            "redone": text.count("recorded as moved before an interruption"),
            "deduplicated": text.count("already copied to")}


def test_kill_9_during_moves_with_move(dovecot, corpus_dir, corpus_index, tmp_path):
    stats = _kill_9_during_moves(dovecot, corpus_dir, corpus_index, tmp_path, total=400, kills=3)
    print("MOVE:", stats)
    assert stats["spam"] >= 250
    assert stats["seen_in_both_at_a_kill"] == 0  # MOVE is atomic


def test_kill_9_during_moves_with_copy_and_expunge(dovecot_no_move, corpus_dir, corpus_index, tmp_path):
    stats = _kill_9_during_moves(dovecot_no_move, corpus_dir, corpus_index, tmp_path, total=400, kills=3)
    print("COPY+EXPUNGE:", stats)
    assert stats["spam"] >= 250


class CommandTrap:
    """A TCP relay between the listener and Dovecot that, the first time the listener sends
    `command`, calls `on_command` (kill -9 the listener) and drops the command: exactly the
    state a crash just before that command leaves. Later connections are relayed untouched."""

    def __init__(self, upstream_port: int, command: bytes, on_command) -> None:
        import socket
        import threading

        self.upstream_port, self.command, self.on_command = upstream_port, command.upper(), on_command
        self.fired = threading.Event()  # set once on_command has returned
        self._lock, self._armed = threading.Lock(), True
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            for src, dst, watch in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src, dst, watch: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if watch and self.command in data.upper():
                    with self._lock:
                        first, self._armed = self._armed, False
                    if first:
                        self.on_command()
                        self.fired.set()
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_crash_between_copy_and_expunge_leaves_no_duplicate(dovecot_no_move, corpus_dir, corpus_index, tmp_path):
    """Without MOVE a crash after COPY and before UID EXPUNGE leaves the spam in both
    folders; the restarted listener removes the originals instead of copying them again."""
    server = dovecot_no_move
    tag, folder, junk = unique_names()
    spam = [r for r in corpus_index if r["label"] == "spam"][::40][:40]
    appended = corpus_messages(corpus_dir, spam, len(spam), tag, step=1)
    expected = Counter(mid for mid, _, _ in appended)
    holder: dict = {}
    trap = CommandTrap(server.port, b"UID EXPUNGE", lambda: holder["idle"].kill9())
    db, conf, log = tmp_path / "v.db", tmp_path / "atlas.toml", tmp_path / "idle.log"
    conf.write_text(imap_config_toml(server, db, junk, FAST).replace(f"port = {server.port}", f"port = {trap.port}"))
    with server.client() as c:
        c.create_folder(folder)
    idle = holder["idle"] = IdleProcess(conf, folder, log).start()
    try:
        with server.client() as c:
            append_all(c, folder, [raw for _, _, raw in appended])
        wait_for(trap.fired.is_set, 60, "the listener's first UID EXPUNGE")
        assert idle.proc.returncode == -signal.SIGKILL
        with server.client() as c:
            in_folder, in_junk = folder_message_ids(c, folder), folder_message_ids(c, junk)
        both = set(in_folder) & set(in_junk)
        assert both, "the kill did not land between COPY and EXPUNGE"
        assert set(in_folder + in_junk) == set(expected)
        recorded_spam = {r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails WHERE action = 'move'")}
        assert both <= recorded_spam  # recorded before acted on

        idle.start()

        def settled():
            with server.client() as c:
                return Counter(folder_message_ids(c, folder) + folder_message_ids(c, junk)) == expected
        wait_for(settled, 30, "every message in exactly one folder")
    finally:
        rc = idle.stop()
        trap.close()
    assert rc == 0
    with server.client() as c:
        assert Counter(folder_message_ids(c, junk)) == Counter(
            r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails WHERE verdict = 'spam'"))
    assert Counter(r[0] for r in db_rows(db, "SELECT message_id FROM processed_emails")) == expected
    text = log.read_text()
    assert f"removing {len(both)} spam already copied to {junk}" in text, text[-3000:]
    print(f"in both folders after the kill: {len(both)} of {len(expected)}; deduplicated at restart")


# Microsecond log times (to measure the gaps between attempts) and no auth penalty: Dovecot
# would otherwise slow every failed login down itself, hiding how often the listener tries.
AUTH_TEST_CONF = (
    'log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "\n'
    "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
)
_LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) "


@pytest.fixture
def dovecot_private(servers_dir: Path, tmp_path: Path):
    """A Dovecot of this test's own, whose user's password the test changes."""
    for name in ("dovecot", "doveadm"):
        require_binary(name)
    require_root("dovecot")
    server = start_or_fail(DovecotInstance(servers_dir / f"dovecot-{tmp_path.name}", extra_conf=AUTH_TEST_CONF),
                           "private dovecot")
    yield server
    server.stop()


def _set_server_password(server, password: str) -> None:
    server.users_path.write_text(f"{server.user}:{{PLAIN}}{password}\n")
    server.password = password  # for server.client()
    # passwd-file is re-read when its mtime changes, checked at most once a second.
    time.sleep(1.1)


def _login_events(server, since: float) -> list[tuple[float, bool]]:
    """(time, succeeded) of every login attempt in Dovecot's log after `since` (epoch)."""
    import datetime as dt
    import re

    out = []
    for line in server.log().splitlines():
        m = re.match(_LOG_TIME, line)
        if not m or "imap-login:" not in line:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if t < since:
            continue
        if "Login: user=" in line:
            out.append((t, True))
        elif "auth failed" in line:
            out.append((t, False))
    return out


def test_refused_logins_after_start_back_off_and_recover(dovecot_private, tmp_path):
    """The password is changed on the server while the listener runs: it keeps running,
    tries again once per backoff delay (for all its folders together, capped at
    reconnect_max), says what to do in one line per attempt, and logs in again by itself
    once the new password is in its password file."""
    server = dovecot_private
    tag, folder, junk = unique_names()
    initial, cap, window = 0.5, 4.0, 14.0
    pw_file = tmp_path / "password"
    pw_file.write_text(server.password + "\n")
    pw_file.chmod(0o600)
    db, conf, log = tmp_path / "v.db", tmp_path / "atlas.toml", tmp_path / "idle.log"
    conf.write_text(imap_config_toml(server, db, junk, f"reconnect_initial = {initial}\nreconnect_max = {cap}\n"
                                     "keepalive = 20.0\n").replace(str(server.password_file), str(pw_file)))
    with server.client() as c:
        c.create_folder(folder)
    idle = IdleProcess(conf, folder, log).start()
    old_password = server.password
    try:
        _set_server_password(server, "rotated-" + tag)
        t0 = time.time()
        kick = subprocess.run(["doveadm", "-c", str(server.conf_path), "kick", server.user],
                              capture_output=True, text=True, timeout=30)
        assert kick.returncode == 0, kick.stderr
        time.sleep(window)
        assert idle.proc.poll() is None, "the listener died on refused logins:\n" + log.read_text()[-2000:]
        events = _login_events(server, t0)
        failed = [t for t, ok in events if not ok]
        assert not any(ok for _, ok in events)
        refusals = [line for line in log.read_text().splitlines() if "imap: login as" in line and " refused (" in line]
        print(f"{len(failed)} refused logins in {window:.0f} s; gaps "
              f"{[round(b - a, 2) for a, b in zip(failed, failed[1:])]}")
        # Every folder's connection drops at once: their first failures may coincide, then
        # one attempt per delay for the whole listener.
        assert failed and failed[0] - t0 < 2.0
        later = [t for t in failed if t - failed[0] > 0.2]
        gaps = [b - a for a, b in zip([failed[0], *later], later)]
        bases = [min(cap, initial * 2**k) for k in range(len(gaps))]
        for gap, base in zip(gaps, bases):  # plus up to 1 s: Dovecot takes ~0.5 s to refuse a login
            assert base / 2 - 0.05 <= gap <= base + 1.0, (gaps, bases)
        # With no backoff the listener would have tried hundreds of times; with a backoff
        # per folder instead of one shared, about twice this.
        assert 4 <= len(failed) <= 10, failed
        assert 1 <= len(refusals) <= len(failed) and all("put the new one in the file" in r for r in refusals)
        assert old_password not in log.read_text() and "rotated-" not in log.read_text()

        # The admin puts the new password in the listener's password file.
        pw_file.write_text("rotated-" + tag + "\n")
        t1 = time.time()
        wait_for(lambda: any(ok for _, ok in _login_events(server, t1)), cap + 5, "a successful login")
        recovered = min(t for t, ok in _login_events(server, t1) if ok) - t1
        print(f"logged in again {recovered:.2f} s after the password file was updated")
        assert recovered <= cap + 1.0
        wait_for(lambda: "works again" in log.read_text(), 5, "the recovery line")
        spam_mid = f"<after-{tag}@faults.test>"
        sample = Path(__file__).resolve().parents[1] / "atlas_milter" / "data" / "sample" / "07-crypto-scam.eml"
        with server.client() as c:
            c.append(folder, with_message_id(sample.read_bytes(), spam_mid))
            wait_for(lambda: spam_mid in folder_message_ids(c, junk), 20, "new spam moved after recovery")
    finally:
        rc = idle.stop()
    assert rc == 0, log.read_text()[-2000:]


def test_junk_moves_made_while_the_listener_was_stopped_are_learned(dovecot, corpus_dir, corpus_index, tmp_path):
    """Stopped, the user moves a message we called ham into Junk and our spam out of it;
    started again, the listener learns both (and each once)."""
    from tests.support.imap import hammy_spam

    tag, folder, junk = unique_names()
    db, conf, log = tmp_path / "v.db", tmp_path / "atlas.toml", tmp_path / "idle.log"
    # High cutoffs: this spam is scored "ham", as a model that has not seen its like would.
    conf.write_text(imap_config_toml(dovecot, db, junk, FAST + "[classifier]\nspam_cutoff = 0.995\nham_cutoff = 0.99\n"))
    missed, rescued = f"<missed-{tag}@faults.test>", f"<rescued-{tag}@faults.test>"
    sample = Path(__file__).resolve().parents[1] / "atlas_milter" / "data" / "sample" / "07-crypto-scam.eml"
    with dovecot.client() as c:
        c.create_folder(folder)
    idle = IdleProcess(conf, folder, log).start()
    try:
        with dovecot.client() as c:
            c.append(folder, with_message_id(hammy_spam(corpus_dir, corpus_index), missed))
            c.append(folder, with_message_id(sample.read_bytes(), rescued))
            wait_for(lambda: rescued in folder_message_ids(c, junk), 15, "our spam in Junk")
        wait_for(lambda: len(db_rows(db, "SELECT 1 FROM processed_emails")) == 2, 10, "both verdicts")
        assert db_rows(db, "SELECT verdict FROM processed_emails WHERE message_id = ?", (missed,)) == [("ham",)]
        assert idle.stop() == 0

        with dovecot.client() as c:  # the user, while the listener is stopped
            c.select_folder(folder)
            c.move(c.search(["HEADER", "Message-ID", missed]), junk)
            c.select_folder(junk)
            c.move(c.search(["HEADER", "Message-ID", rescued]), folder)

        idle.start()
        events = wait_for(lambda: sorted(db_rows(db, "SELECT message_id, label FROM learning_events")) if len(
            db_rows(db, "SELECT 1 FROM learning_events")) >= 2 else None, 15, "both learning events")
        assert events == sorted([(missed, "spam"), (rescued, "ham")])
        assert idle.stop() == 0
        idle.start()  # a third run learns nothing again
        time.sleep(2.0)
    finally:
        idle.stop()
    assert len(db_rows(db, "SELECT 1 FROM learning_events")) == 2
    with dovecot.client() as c:  # and moved nothing back
        assert folder_message_ids(c, junk) == [missed] and folder_message_ids(c, folder) == [rescued]
