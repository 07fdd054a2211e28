"""The IMAP side over real TLS: a private Dovecot with a certificate for `localhost` signed by
a throw-away CA (tests/support/servers.py make_test_certificates). Backfill over --tls and --starttls
with --ca-file works and writes verdict rows; idle over --tls handles a new message; an
untrusted certificate, a host name the certificate does not carry and an unreadable
--ca-file each end in one clear line and a non-zero exit, before any password is sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import make_test_certificates
from tests.support.imap import last_row, sample_message, stop_listener
from tests.support.imap import db_rows, folder_message_ids, unique_names, wait_for

SAMPLE = Path(__file__).resolve().parents[1] / "atlas_milter" / "data" / "sample"
SAMPLES = sorted(p.name for p in SAMPLE.glob("*.eml"))
ENV = {**os.environ, "ENABLE_PARALLEL": "false"}


def _config(tmp_path: Path, junk: str) -> tuple[Path, Path]:
    db = tmp_path / "v.db"
    conf = tmp_path / "atlas.toml"
    conf.write_text(f'log_level = "info"\n[store]\ndb = "{db}"\n[statsd]\nenabled = false\n'
                    f'[imap]\njunk_folder = "{junk}"\nreconnect_initial = 0.5\nreconnect_max = 2.0\n')
    return conf, db


def _connection(server, security: str, host: str = "localhost", ca_file: Path | None = None) -> list[str]:
    port = server.imaps_port if security == "tls" else server.port
    flags = ["--host", host, "--port", str(port), f"--{security}", "--user", server.user,
             "--password-file", str(server.password_file)]
    return flags + (["--ca-file", str(ca_file)] if ca_file else [])


def _backfill(folder: str, conf: Path, flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_milter", "backfill", folder, "--config", str(conf), *flags],
                          capture_output=True, text=True, env=ENV, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def _tls_logins(server) -> int:
    """Logins Dovecot logged as made over TLS (implicit or STARTTLS); the fixture's own client is plain."""
    return sum(1 for line in server.log().splitlines() if "imap-login: Info: Login:" in line and ", TLS," in line)


def _log_count(server, text: str) -> int:
    return server.log().count(text)


def _fill(server, folder: str, tag: str) -> list[str]:
    mids = [f"<{tag}-{i}@tls.test>" for i in range(len(SAMPLES))]
    with server.client() as c:
        c.create_folder(folder)
        c.multiappend(folder, [sample_message(name, mid) for name, mid in zip(SAMPLES, mids)])
    return mids


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_backfill_over_tls_with_ca_file(dovecot_tls, tmp_path, security):
    tag, folder, junk = unique_names()
    mids = _fill(dovecot_tls, folder, tag)
    conf, db = _config(tmp_path, junk)
    tls_before = _tls_logins(dovecot_tls)
    done = _backfill(folder, conf, _connection(dovecot_tls, security, ca_file=dovecot_tls.ca_file))
    assert done.returncode == 0, done.stderr
    rows = db_rows(db, "SELECT message_id, verdict, action FROM processed_emails WHERE folder = ?", (folder,))
    assert sorted(r[0] for r in rows) == sorted(mids)
    spam = {r[0] for r in rows if r[1] == "spam"}
    assert spam and all(r[2] == "move" for r in rows if r[1] == "spam")
    with dovecot_tls.client() as c:
        assert set(folder_message_ids(c, junk)) == spam
    # Dovecot's log process writes a moment later; a plain login would say "secured", not "TLS".
    wait_for(lambda: _tls_logins(dovecot_tls) > tls_before, 5, "a TLS login in the Dovecot log")


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_untrusted_certificate_is_one_line_naming_ca_file(dovecot_tls, tmp_path, security):
    _tag, folder, junk = unique_names()
    conf, db = _config(tmp_path, junk)
    logins, no_auth = _log_count(dovecot_tls, "Info: Login: user="), _log_count(dovecot_tls, "(no auth attempts")
    failed = _backfill(folder, conf, _connection(dovecot_tls, security))
    line = _one_error_line(failed)
    # The server saw a connection end without any login attempt: the password was never sent.
    wait_for(lambda: _log_count(dovecot_tls, "(no auth attempts") > no_auth, 5, "Dovecot to log the aborted connection")
    assert _log_count(dovecot_tls, "Info: Login: user=") == logins
    assert "certificate" in line and "not trusted" in line and "--ca-file" in line, line
    assert "(unable to get local issuer certificate)" in line, line  # OpenSSL's reason, kept (Dovecot sends no chain)
    assert not db_rows(db, "SELECT 1 FROM processed_emails")


def test_wrong_host_name_is_one_line(dovecot_tls, tmp_path):
    # The certificate says localhost only; 127.0.0.1 is the same server but not a name it carries.
    _tag, folder, junk = unique_names()
    conf, _db = _config(tmp_path, junk)
    failed = _backfill(folder, conf, _connection(dovecot_tls, "tls", host="127.0.0.1", ca_file=dovecot_tls.ca_file))
    line = _one_error_line(failed)
    assert "not valid for the name '127.0.0.1'" in line and "IP address mismatch" in line and "--host" in line, line


def test_ca_file_that_does_not_hold_the_signer(dovecot_tls, tmp_path):
    other, _cert, _key = make_test_certificates(tmp_path / "other")  # a CA, just not the one that signed it
    _tag, folder, junk = unique_names()
    conf, _db = _config(tmp_path, junk)
    line = _one_error_line(_backfill(folder, conf, _connection(dovecot_tls, "tls", ca_file=other)))
    assert "not trusted" in line and f"--ca-file {other} does not hold the CA that signed it" in line, line


def test_idle_over_tls_handles_a_new_message(dovecot_tls, tmp_path):
    tag, folder, junk = unique_names()
    conf, db = _config(tmp_path, junk)
    with dovecot_tls.client() as c:
        c.create_folder(folder)
    log = tmp_path / "idle.log"
    proc = subprocess.Popen([sys.executable, "-m", "atlas_milter", "idle", folder, "--config", str(conf),
                             *_connection(dovecot_tls, "tls", ca_file=dovecot_tls.ca_file)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=ENV)
    try:
        wait_for(lambda: proc.poll() is not None or "imap: watching" in log.read_text(), 30, "the listener to start")
        assert proc.poll() is None, log.read_text()
        spam = f"<spam-{tag}@tls.test>"
        with dovecot_tls.client() as c:
            c.append(folder, sample_message("07-crypto-scam.eml", spam))
        wait_for(lambda: last_row(db, spam), 10, "the verdict", interval=0.05)
        assert last_row(db, spam)[:2] == ("spam", "move")
    finally:
        stop_listener(proc, log)


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_unreadable_ca_file_is_one_line(tmp_path, content):
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    _tag, folder, junk = unique_names()
    conf, _db = _config(tmp_path, junk)
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    failed = _backfill(folder, conf, ["--host", "imap.example.org", "--user", "u", "--password-file", str(pw),
                                      "--ca-file", str(ca)])
    line = _one_error_line(failed)
    assert line.startswith(f"Error: CA file {ca} (--ca-file, [imap] ca_file): cannot load it (") and "PEM file" in line, line
    assert ("No such file or directory" if content is None else "no certificate or crl found") in line, line


@pytest.mark.parametrize("security, expected", [
    ("starttls", "does not offer STARTTLS: use --tls"),
    ("tls", "(is it a TLS port? try --starttls or --port)"),
])
def test_tls_to_a_server_without_tls_is_one_line(dovecot, tmp_path, security, expected):
    # The session Dovecot has ssl = no: no STARTTLS capability, and its port speaks plain IMAP.
    _tag, folder, junk = unique_names()
    conf, _db = _config(tmp_path, junk)
    flags = ["--host", "localhost", "--port", str(dovecot.port), f"--{security}", "--user", dovecot.user,
             "--password-file", str(dovecot.password_file)]
    line = _one_error_line(_backfill(folder, conf, flags))
    assert expected in line and f"localhost:{dovecot.port}" in line, line
