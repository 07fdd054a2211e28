"""Shared fixtures: the SpamAssassin corpus and real Postfix / Dovecot / StatsD servers.

Server fixtures are session-scoped (one instance per test run, on free ports picked at run
time) and built on tests/support/servers.py.  A missing server binary SKIPS the test, except when
ATLAS_REQUIRE_SERVERS=1 (set by .ci/run), where it FAILS: CI must never pass on a skip.
Likewise a missing corpus skips unless ATLAS_REQUIRE_CORPUS=1.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.requirements import _unavailable, require_binary, require_root, start_or_fail
from tests.support.servers import (
    REPO_ROOT,
    DovecotInstance,
    PostfixInstance,
    PostgresInstance,
    StatsdInstance,
    postgres_bin,
    private_tmpdir,
    sendmail_missing,
    sendmail_tree,
    statsd_js_path,
)
SERVER_FIXTURES = {"postfix", "dovecot", "dovecot_tls", "statsd_daemon", "sendmail_root", "postgres"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: drives real servers (Postfix, Dovecot, StatsD, Sendmail); run alone with -m integration",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses a real-server fixture is an integration test whether or not it says so.
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def metrics():
    """The process-wide PerformanceMetrics, recording, StatsD off, empty before and after."""
    from atlas_milter.monitor import PerformanceMetrics

    m = PerformanceMetrics.get_instance()
    m.configure(enabled=True, statsd_host=None)
    m.reset()
    yield m
    m.configure(enabled=True, statsd_host=None)
    m.reset()


# ------------------------------------------------------------------ corpus


def _corpus_candidates() -> list[Path]:
    cands = []
    if os.environ.get("ATLAS_CORPUS"):
        cands.append(Path(os.environ["ATLAS_CORPUS"]))
    # /work/main/tests/conftest.py -> /work/shared/...; in CI the clone has shared/ beside it.
    cands.append(REPO_ROOT.parent / "shared" / "corpus" / "spamassassin")
    return cands


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The SpamAssassin public corpus (read-only): $ATLAS_CORPUS, else <repo>/../shared/corpus/spamassassin."""
    cands = _corpus_candidates()
    for cand in cands:
        if (cand / "index.csv").is_file():
            return cand.resolve()
    _unavailable(
        "shared corpus not found at " + " or ".join(str(c) for c in cands) + " (set ATLAS_CORPUS)",
        require_env="ATLAS_REQUIRE_CORPUS",
    )


@pytest.fixture(scope="session")
def corpus_index(corpus_dir: Path) -> list[dict]:
    """Rows of index.csv: dicts with path (relative to corpus_dir), label (ham/spam), group, split, bytes (int)."""
    with open(corpus_dir / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["bytes"] = int(row["bytes"])
    return rows


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="session")
def servers_dir():
    """A session temp dir for server instances: under /tmp and mode 0755, because Postfix/Dovecot
    workers (postfix, dovenull, uid 65534) must traverse it; pytest's own tmp dirs are 0700."""
    path = Path(tempfile.mkdtemp(prefix="atlas-servers-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix(servers_dir: Path):
    """A running PostfixInstance with no milter; SMTP on 127.0.0.1:postfix.smtp_port, delivering to
    postfix.maildir (user@example.test).  Session-wide: find your message by a unique header
    (wait_for_message), and change the milter only inside ``with postfix.milter_set(spec):``."""
    for name in ("postfix", "postconf"):
        require_binary(name)
    require_root("postfix")
    server = start_or_fail(PostfixInstance(servers_dir / "postfix"), "postfix")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot(servers_dir: Path):
    """A running DovecotInstance: IMAP on 127.0.0.1:dovecot.port, login dovecot.user / dovecot.password
    (also in dovecot.password_file); mail under dovecot.mail_root."""
    for name in ("dovecot", "doveadm"):
        require_binary(name)
    require_root("dovecot")
    server = start_or_fail(DovecotInstance(servers_dir / "dovecot"), "dovecot")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot_tls(servers_dir: Path):
    """A running DovecotInstance with TLS: STARTTLS on dovecot_tls.port, implicit TLS on
    dovecot_tls.imaps_port; its certificate names only ``localhost`` (not 127.0.0.1) and is
    signed by a throw-away CA in dovecot_tls.ca_file, which no system store trusts."""
    for name in ("dovecot", "doveadm", "openssl"):
        require_binary(name)
    require_root("dovecot")
    server = start_or_fail(DovecotInstance(servers_dir / "dovecot-tls", tls=True, tls_names=("localhost",)), "dovecot (TLS)")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def statsd_daemon(servers_dir: Path):
    """A running StatsdInstance: metrics to 127.0.0.1:statsd_daemon.udp_port; read back with
    timers() / counters() / gauges() (flush interval 24 h, so nothing is cleared mid-run)."""
    require_binary("node")
    js = statsd_js_path()
    if not js.is_file():
        _unavailable(f"npm statsd is not installed at {js} (run: bash scripts/bootstrap.sh --system)")
    server = start_or_fail(StatsdInstance(servers_dir / "statsd"), "statsd")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sendmail_root() -> Path:
    """The extracted Sendmail packages (.cache/sendmail/root) for tests that build a SendmailInstance,
    plus the m4, unshare and smtp-sink it needs; skips (fails under ATLAS_REQUIRE_SERVERS=1) when absent."""
    why = sendmail_missing()
    if why:
        _unavailable(why)
    require_root("sendmail")
    return sendmail_tree()


@pytest.fixture
def postgres():
    """A private PostgreSQL (Debian's, run as the postgres user); its `url` has no password."""
    if postgres_bin("postgres") is None:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresInstance(private_tmpdir("atlas-pg-")).start()
    yield server
    server.stop()
