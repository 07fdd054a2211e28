"""The IMAP adapter's pieces that need no server: backoff, password sources, transport
checks, Junk folder choice, account tables, the action policy."""

from __future__ import annotations

import logging
import os
import random
import ssl
import subprocess
import sys

import pytest

from atlas_milter.adapters.imap import listener as imapmod
from atlas_milter.adapters.imap.actions import action_for
from atlas_milter.adapters.imap.connection import (
    backoff_delay,
    check_connection_settings,
    read_password,
    resolve_port,
    tls_context,
    tls_failure,
)
from atlas_milter.adapters.imap.session import choose_folder
from atlas_milter.netaddr import is_loopback
from atlas_milter.config import ImapConfig, load_config
from atlas_milter.errors import AtlasError, ConfigError
from atlas_milter.verdict import Action


def test_backoff_doubles_caps_and_jitters():
    rng = random.Random(7)
    delays = [backoff_delay(a, 1.0, 60.0, rng) for a in range(10)]
    for attempt, delay in enumerate(delays):
        base = min(60.0, 2.0**attempt)
        assert base / 2 <= delay <= base
    assert max(delays) <= 60.0
    assert delays[6] >= 30.0  # 64 capped to 60, jittered to at least half
    # jitter: two listeners with different random streams do not retry in lockstep
    other = [backoff_delay(a, 1.0, 60.0, random.Random(8)) for a in range(10)]
    assert other != delays
    assert backoff_delay(1000, 1.0, 60.0, rng) <= 60.0  # no overflow on long outages


def test_password_from_file_env_and_systemd_credential(tmp_path, caplog):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = ImapConfig(host="h", user="u", password_file=str(pw))
    with caplog.at_level(logging.WARNING):
        assert read_password(cfg, env={})[0] == "s3cret"
    assert not caplog.records
    cfg = ImapConfig(host="h", user="u")
    assert read_password(cfg, env={"ATLAS_IMAP_PASSWORD": "from-env"})[0] == "from-env"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "imap-password").write_text("from-cred\n")
    (creds / "imap-password-work").write_text("work-cred\n")
    assert read_password(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})[0] == "from-cred"
    assert read_password(cfg, "work", env={"CREDENTIALS_DIRECTORY": str(creds)})[0] == "work-cred"
    with pytest.raises(AtlasError, match="no IMAP password"):
        read_password(cfg, env={})


def test_world_readable_password_file_warns_without_the_password(tmp_path, caplog):
    pw = tmp_path / "pw"
    pw.write_text("topsecret")
    pw.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_password(ImapConfig(host="h", user="u", password_file=str(pw)), env={})[0] == "topsecret"
    assert any("readable by every user" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)
    assert all("topsecret" not in r.getMessage() for r in caplog.records)


def test_missing_or_empty_password_file_is_one_line_error(tmp_path):
    with pytest.raises(AtlasError, match="password file .*No such file"):
        read_password(ImapConfig(host="h", user="u", password_file=str(tmp_path / "nope")), env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AtlasError, match="is empty"):
        read_password(ImapConfig(host="h", user="u", password_file=str(tmp_path / "empty")), env={})


def test_plain_only_to_loopback_unless_forced():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert is_loopback(host)
        check_connection_settings(ImapConfig(host=host, user="u", security="plain"))
    for host in ("imap.example.org", "10.0.0.1", "192.168.1.5"):
        assert not is_loopback(host)
        with pytest.raises(AtlasError) as exc:
            check_connection_settings(ImapConfig(host=host, user="u", security="plain"))
        assert "\n" not in str(exc.value) and "--force-plain" in str(exc.value)
        check_connection_settings(ImapConfig(host=host, user="u", security="plain"), force_plain=True)
        check_connection_settings(ImapConfig(host=host, user="u", security="tls"))
    with pytest.raises(AtlasError, match="no IMAP server"):
        check_connection_settings(ImapConfig(user="u"))
    with pytest.raises(AtlasError, match="no IMAP user"):
        check_connection_settings(ImapConfig(host="h"))


def test_plain_to_remote_host_cli_is_one_line_error(tmp_path):
    env = {**os.environ, "ATLAS_IMAP_PASSWORD": "x"}
    for cmd in ("idle", "backfill"):
        argv = [sys.executable, "-m", "atlas_milter", cmd, *(["INBOX"] if cmd == "backfill" else []),
                "--host", "imap.example.org", "--plain", "--user", "u", "--db", str(tmp_path / "x.db")]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --plain would send the password unencrypted"), proc.stderr


def test_ports():
    assert resolve_port(ImapConfig(host="h")) == 993
    assert resolve_port(ImapConfig(host="h", security="starttls")) == 143
    assert resolve_port(ImapConfig(host="h", security="plain", port=10143)) == 10143


def test_junk_folder_by_special_use_else_configured_name():
    listing = [((b"\\HasNoChildren",), b"/", "INBOX"), ((b"\\HasNoChildren", b"\\Junk"), b"/", "Spam"),
               ((b"\\Trash",), b"/", "Deleted Items")]
    assert choose_folder(listing, b"\\Junk", "Junk") == ("Spam", True)
    assert choose_folder(listing, b"\\Trash", "Trash") == ("Deleted Items", True)
    plain = [((), b"/", "INBOX"), ((), b"/", "junk")]
    assert choose_folder(plain, b"\\Junk", "Junk") == ("junk", True)
    assert choose_folder([((), b"/", "INBOX")], b"\\Junk", "Junk") == ("Junk", False)  # to be created
    assert choose_folder([((b"\\junk",), b".", "Bulk")], b"\\Junk", "Junk") == ("Bulk", True)


def test_action_policy():
    assert action_for("spam", "move") == Action.MOVE
    assert action_for("ham", "move") == Action.NONE
    assert action_for("unsure", "move") == Action.NONE
    assert action_for("spam", "flag") == Action.FLAG
    assert action_for("ham", "flag") == Action.FLAG  # $NotJunk
    assert action_for("spam", "record") == Action.RECORD


def test_accounts_table_and_flag_precedence(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[imap]\nhost = "default.example"\nuser = "me"\n'
        '[imap.accounts.work]\nhost = "imap.work.example"\nuser = "me@work"\nfolders = ["INBOX", "Lists"]\n'
        'spam_action = "flag"\n'
    )
    config = load_config(conf, env={})
    work = config.imap.for_account("work")
    assert (work.host, work.user, work.folders, work.spam_action) == ("imap.work.example", "me@work", ("INBOX", "Lists"), "flag")
    assert work.accounts == {}
    flagged = config.imap.for_account("work", {"host": "override.example", "user": None, "folders": ["X"]})
    assert (flagged.host, flagged.user, flagged.folders) == ("override.example", "me@work", ("X",))
    assert config.imap.for_account(None).host == "default.example"
    with pytest.raises(ConfigError, match="no account 'home'"):
        config.imap.for_account("home")
    conf.write_text('[imap.accounts.work]\nhots = "x"\n')
    with pytest.raises(ConfigError, match=r"\[imap.accounts.work\] hots: unknown key"):
        load_config(conf, env={})
    conf.write_text('[imap.accounts.work]\nport = "x"\n')
    with pytest.raises(ConfigError, match="port"):
        load_config(conf, env={}).imap.for_account("work")


def test_imap_config_validation():
    with pytest.raises(ConfigError, match="idle_renew"):
        ImapConfig(idle_renew=1800)
    with pytest.raises(ConfigError, match="keepalive"):
        ImapConfig(keepalive=0)


def test_only_the_imap_adapter_imports_imapclient():
    root = os.path.join(os.path.dirname(__file__), "..", "atlas_milter")
    offenders = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                text = open(path, encoding="utf-8").read()
                if ("import imapclient" in text or "from imapclient" in text) and os.path.join("adapters", "imap", "") not in path:
                    offenders.append(path)
    assert not offenders, offenders


def test_model_reload_keeps_the_current_model_when_the_file_is_garbage(tmp_path, caplog):
    from atlas_milter.classifier import load_model, save_model
    from atlas_milter.reload import COUNTER_RELOAD_FAILED, COUNTER_RELOAD_OK, GAUGE_RELOAD_FAILING

    model_path = tmp_path / "m.json"
    save_model(load_model(), model_path)
    config = load_config(None, {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False,
                                "classifier.model": str(model_path), "imap.host": "127.0.0.1", "imap.user": "u",
                                "imap.security": "plain"}, env={"ENABLE_PARALLEL": "false"})
    listener = imapmod.Listener(config, None, False, env={"ATLAS_IMAP_PASSWORD": "pw"})
    try:
        metrics = listener.pipeline.metrics
        metrics.reset()
        shipped = listener.pipeline.model.version
        model_path.write_bytes(b"\x1f\x8b garbage")
        with caplog.at_level(logging.ERROR, logger="atlas_milter"):
            assert not listener.reload_model()
        assert listener.pipeline.model.version == shipped
        assert [r.getMessage() for r in caplog.records if "imap reload failed" in r.getMessage()]
        assert metrics.get_counters()[COUNTER_RELOAD_FAILED] == 1 and metrics.get_gauges()[GAUGE_RELOAD_FAILING] == 1
        model = load_model()
        model.meta["version"] = "imap-reloaded-1"
        save_model(model, model_path)
        assert listener.reload_model()
        assert listener.pipeline.model.version == "imap-reloaded-1"
        assert metrics.get_counters()[COUNTER_RELOAD_OK] == 1 and metrics.get_gauges()[GAUGE_RELOAD_FAILING] == 0
    finally:
        listener.pipeline.close()


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_code, exc.verify_message = code, message
    return exc


def test_tls_failure_lines_say_what_to_do():
    imap = ImapConfig(host="imap.example.org", user="u")
    untrusted = tls_failure(imap, _verify_error(20, "unable to get local issuer certificate"))
    assert untrusted == ("the TLS certificate of imap.example.org:993 is not trusted (unable to get local issuer "
                         "certificate): if the server uses a private CA or a self-signed certificate, give that CA "
                         "certificate with --ca-file FILE ([imap] ca_file)")
    wrong_ca = tls_failure(ImapConfig(host="h", user="u", ca_file="/etc/ca.pem"), _verify_error(18, "self-signed certificate"))
    assert "--ca-file /etc/ca.pem does not hold the CA that signed it" in wrong_ca
    mismatch = tls_failure(imap, _verify_error(62, "Hostname mismatch, certificate is not valid for 'imap.example.org'."))
    assert "not valid for the name 'imap.example.org'" in mismatch and "--host" in mismatch
    expired = tls_failure(imap, _verify_error(10, "certificate has expired"))
    assert "was rejected (certificate has expired)" in expired and "--ca-file" not in expired
    not_tls = tls_failure(imap, ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    assert "is it a TLS port?" in not_tls
    assert all("\n" not in line for line in (untrusted, wrong_ca, mismatch, expired, not_tls))


def test_tls_context_always_verifies_the_certificate_and_name():
    context = tls_context(ImapConfig(host="h", user="u"))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
