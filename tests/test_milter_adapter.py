"""Fast tests of the milter adapter with pymilter's own test context (Milter.testctx):
negotiation, tag headers, reject/tempfail/quarantine/discard, reference ids, forged header
removal, sanitising, skips, deny list, per-recipient policy and every failure path. The
pipeline is real (shipped model, SQLite in tmp_path); failures are injected by replacing
`Pipeline.classify` on the instance, since the adapter is what is under test."""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from importlib import resources

import Milter
import pytest
from Milter.testctx import TestCtx

TestCtx.__test__ = False  # not a pytest test class

from atlas_milter.adapters import milter as am
from atlas_milter.adapters.milter import metrics
from atlas_milter.cli import main as cli_main
from atlas_milter.config import load_config
from atlas_milter.errors import AtlasError, ConfigError
from atlas_milter.message import Summary
from atlas_milter.pipeline import Result
from atlas_milter.verdict import Verdict

SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
HAM = SAMPLE.joinpath("03-family.eml").read_bytes()  # scores ~0.03 with the shipped model
SPAM = SAMPLE.joinpath("10-lottery.eml").read_bytes()  # scores ~1.0


class Ctx(TestCtx):
    """TestCtx that honours no-reply steps (NOREPLY means CONTINUE to the MTA) and records
    header changes and quarantine calls instead of raising."""

    def __init__(self):
        super().__init__()
        self.changes: list[tuple] = []
        self.quarantined: str | None = None

    def _nr(self, rc):
        return Milter.CONTINUE if rc == Milter.NOREPLY else rc

    def _envfrom(self, *s):
        return self._nr(super()._envfrom(*s))

    def _envrcpt(self, s):
        return self._nr(super()._envrcpt(s))

    def _header(self, f, v):
        return self._nr(super()._header(f, v))

    def _feed_body(self, bfp):
        # libmilter: SKIP from body() stops the body chunks; end of message still follows.
        rc = super()._feed_body(bfp)
        return Milter.CONTINUE if rc == Milter.SKIP and self._protocol & Milter.P_SKIP else rc

    def addheader(self, field, value, idx):
        self.changes.append(("add", field, value))
        return super().addheader(field, value, idx)

    def chgheader(self, field, idx, value):
        self.changes.append(("chg", field, idx, value))
        return super().chgheader(field, idx, value)

    def quarantine(self, reason):
        self.quarantined = reason

    def added(self) -> dict[str, str]:
        return {c[1]: c[2] for c in self.changes if c[0] == "add"}


def make_engine(tmp_path, **milter):
    over = {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False}
    over.update({f"milter.{k}": v for k, v in milter.items()})
    config = load_config(None, over, env={})
    pipeline, err = am.make_pipeline(config)
    pipeline.metrics.reset()  # process-wide metrics: count from zero in each test
    return am.MilterEngine(config, pipeline, err)


@pytest.fixture
def engines(tmp_path):
    made = []

    def make(**milter):
        engine = make_engine(tmp_path, **milter)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def feed(engine, raw, sender="sender@remote.test", rcpts=("user@example.test",), macros=None):
    Milter.factory = functools.partial(am.AtlasMilter, engine)
    ctx = Ctx()
    assert ctx._connect() == Milter.CONTINUE
    for name, value in {"{i}": "4QID123ABC", **(macros or {})}.items():
        ctx._setsymval(name, value)
    rc = ctx._feedFile(io.BytesIO(raw), sender, *rcpts)
    return rc, ctx


def rows(engine):
    engine.pipeline.flush(timeout=10)
    con = sqlite3.connect(engine.config.store.db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM processed_emails ORDER BY id")]
    finally:
        con.close()


# --- negotiation ------------------------------------------------------------------------


def test_negotiates_only_what_it_uses(engines):
    engine = engines()
    Milter.factory = functools.partial(am.AtlasMilter, engine)
    ctx = Ctx()
    ctx._connect()
    prot = ctx._protocol
    for skipped in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOEOH, Milter.P_NOUNKNOWN):
        assert prot & skipped, hex(skipped)
    assert not prot & (Milter.P_NODATA | Milter.P_NR_DATA)  # DATA answered: see the module docstring
    for wanted in (Milter.P_NOMAIL, Milter.P_NORCPT, Milter.P_NOHDRS, Milter.P_NOBODY):
        assert not prot & wanted, hex(wanted)
    for no_reply in (Milter.P_NR_MAIL, Milter.P_NR_RCPT, Milter.P_NR_HDR):
        assert prot & no_reply, hex(no_reply)
    assert prot & Milter.P_SKIP
    assert ctx._opts[0] == Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
    assert ctx._symlist[Milter.M_EOM] == {b"{i}", b"{auth_authen}", b"{client_addr}"}


# --- tagging -------------------------------------------------------------------------------


def test_ham_is_tagged_and_recorded(engines):
    engine = engines()
    rc, ctx = feed(engine, HAM)
    assert rc == Milter.ACCEPT
    added = ctx.added()
    assert added["X-Atlas-Verdict"] == "ham"
    assert added["X-Spam-Flag"] == "NO"
    assert re.fullmatch(r"No, score=0\.\d{3} required=0\.\d{3}", added["X-Spam-Status"])
    assert float(added["X-Atlas-Score"]) < 0.5
    [row] = rows(engine)
    assert row["source"] == "milter" and row["queue_id"] == "4QID123ABC"
    assert row["verdict"] == "ham" and row["action"] == "tag" and row["recipients_count"] == 1
    assert row["message_id"] and row["message_id"] in HAM.decode("latin-1")


def test_spam_is_tagged_by_default(engines):
    engine = engines()
    rc, ctx = feed(engine, SPAM)
    assert rc == Milter.ACCEPT
    added = ctx.added()
    assert added["X-Atlas-Verdict"] == "spam"
    assert added["X-Spam-Flag"] == "YES"
    assert added["X-Spam-Status"].startswith("Yes, score=")
    assert added["X-Atlas-Reasons"]
    assert rows(engine)[0]["action"] == "tag"


def test_reject_carries_a_reference_recorded_in_the_row(engines):
    engine = engines(spam_action="reject")
    rc, ctx = feed(engine, SPAM)
    assert rc == Milter.REJECT
    code, xcode, text = ctx._reply
    assert (code, xcode) == ("550", "5.7.1")
    ref = re.fullmatch(r"Message rejected as spam \(ref ([0-9A-F]{10})\)", text).group(1)
    [row] = rows(engine)
    assert row["action"] == "reject" and f"ref={ref}" in row["note"]
    assert not ctx.added()


def test_reject_text_is_configurable_and_percent_safe(engines):
    engine = engines(spam_action="reject", reject_text="100% spam: see https://help.example/{ref}")
    rc, ctx = feed(engine, SPAM)
    assert rc == Milter.REJECT
    assert re.fullmatch(r"100%% spam: see https://help\.example/[0-9A-F]{10}", ctx._reply[2])


@pytest.mark.parametrize("action,rc", [("tempfail", Milter.TEMPFAIL), ("discard", Milter.DISCARD),
                                       ("quarantine", Milter.ACCEPT), ("accept", Milter.ACCEPT)])
def test_other_spam_actions(engines, action, rc):
    engine = engines(spam_action=action)
    got, ctx = feed(engine, SPAM)
    assert got == rc
    if action == "tempfail":
        assert ctx._reply[:2] == ("451", "4.7.1")
    if action == "quarantine":
        assert "ref" in ctx.quarantined and ctx.added()["X-Atlas-Verdict"] == "spam"
    if action in ("accept", "discard"):
        assert not ctx.added()
    assert rows(engine)[0]["action"] == action


def test_forged_headers_are_removed_before_ours_are_added(engines):
    engine = engines()
    forged = (b"X-Atlas-Verdict: ham\nX-Spam-Flag: NO\nX-Atlas-Verdict: ham\n"
              b"X-Spam-Status: No, score=0.0\nX-Other: kept\n") + HAM
    rc, ctx = feed(engine, forged)
    assert rc == Milter.ACCEPT
    chg = [c for c in ctx.changes if c[0] == "chg"]
    assert sorted(chg) == sorted([("chg", "X-Atlas-Verdict", 2, ""), ("chg", "X-Atlas-Verdict", 1, ""),
                                  ("chg", "X-Spam-Flag", 1, ""), ("chg", "X-Spam-Status", 1, "")])
    # highest index of a name first, and every removal before the first addition
    assert chg.index(("chg", "X-Atlas-Verdict", 2, "")) < chg.index(("chg", "X-Atlas-Verdict", 1, ""))
    first_add = next(i for i, c in enumerate(ctx.changes) if c[0] == "add")
    assert all(i < first_add for i, c in enumerate(ctx.changes) if c[0] == "chg")
    assert engine.metrics.get_counters()[metrics.COUNTER_FORGED] >= 4


def test_header_values_never_carry_cr_lf_from_content(engines):
    engine = engines()
    evil = Result(key="", verdict=Verdict("spam", 0.99, reasons=(("evil\r\nBcc: victim@x", 1.0), ("ok\x00\x7f", 0.5))),
                  summary=Summary("a", "b", "c", "d"), elapsed_ms=1.0)
    engine.pipeline.classify = lambda raw, key="", timeout=None, **kw: evil
    rc, ctx = feed(engine, SPAM)
    for change in ctx.changes:
        for part in change[1:]:
            assert not re.search(r"[\r\n\x00-\x1f\x7f]", str(part)), change
    assert "Bcc: victim" in ctx.added()["X-Atlas-Reasons"]  # shown, but as text on one line
    assert am.clean_header_value("a\r\nb\u00e9") == "a b?"


# --- skips and lists -----------------------------------------------------------------------


def _explode(*a, **k):
    raise AssertionError("classify must not be called")


@pytest.mark.parametrize("setting,macros,sender,counter", [
    ({}, {"{auth_authen}": "alice"}, "alice@example.test", "authenticated"),
    ({"trusted_networks": ["10.0.0.0/8"]}, {"{client_addr}": "10.1.2.3"}, "x@remote.test", "trusted_network"),
    ({"trusted_networks": ["2001:db8::/32"]}, {"{client_addr}": "IPv6:2001:db8::5"}, "x@remote.test", "trusted_network"),
    ({"allow_senders": ["partner.example"]}, {}, "news@partner.example", "allow_listed"),
    ({"allow_senders": [".corp.example"]}, {}, "<a@mail.corp.example>", "allow_listed"),
])
def test_skips_are_accepted_untouched_and_counted(engines, setting, macros, sender, counter):
    engine = engines(**setting)
    engine.pipeline.classify = _explode
    rc, ctx = feed(engine, SPAM, sender=sender, macros=macros)
    assert rc == Milter.ACCEPT and not ctx.changes
    assert engine.metrics.get_counters()[metrics.COUNTER_SKIP_PREFIX + counter] == 1
    [row] = rows(engine)
    assert row["verdict"] == "skipped" and counter in row["note"]


def test_authenticated_is_scored_when_skip_is_off(engines):
    engine = engines(skip_authenticated=False)
    rc, ctx = feed(engine, SPAM, macros={"{auth_authen}": "alice"})
    assert ctx.added()["X-Atlas-Verdict"] == "spam"


def test_untrusted_client_is_scored(engines):
    engine = engines(trusted_networks=["10.0.0.0/8"])
    rc, ctx = feed(engine, HAM, macros={"{client_addr}": "192.0.2.7"})
    assert ctx.added()["X-Atlas-Verdict"] == "ham"


def test_deny_listed_sender_is_spam_without_scoring(engines):
    engine = engines(deny_senders=["@spammer.example"], spam_action="reject")
    engine.pipeline.classify = _explode
    rc, ctx = feed(engine, HAM, sender="<boss@SPAMMER.example>")
    assert rc == Milter.REJECT
    [row] = rows(engine)
    assert row["verdict"] == "spam" and row["score"] == 1.0 and "deny-listed" in row["note"]
    assert engine.metrics.get_counters()[metrics.COUNTER_DENY_LISTED] == 1


# --- per-recipient policy ---------------------------------------------------------------------


def test_mixed_recipients_never_reject_mail_one_of_them_wants(engines):
    engine = engines(spam_action="reject", recipients={"keepall@example.test": {"opt_out": True}})
    rc, ctx = feed(engine, SPAM, rcpts=("user@example.test", "keepall@example.test"))
    assert rc == Milter.ACCEPT
    assert ctx.added()["X-Atlas-Verdict"] == "spam"
    [row] = rows(engine)
    assert row["action"] == "tag" and row["recipients_count"] == 2
    assert "mixed recipients" in row["note"] and "keepall@example.test=accept" in row["note"]
    assert engine.metrics.get_counters()[metrics.COUNTER_MIXED] == 1


def test_recipient_alone_gets_its_own_policy(engines):
    engine = engines(spam_action="tag", domains={"strict.example": {"spam_action": "reject", "spam_cutoff": 0.001}})
    rc, _ = feed(engine, HAM, rcpts=("ceo@strict.example",))
    assert rc == Milter.REJECT  # stricter cutoff: even this ham counts as spam there
    rc, _ = feed(engine, HAM, rcpts=("ceo@sub.strict.example",))
    assert rc == Milter.REJECT  # domain rules cover subdomains
    rc, ctx = feed(engine, HAM, rcpts=("user@example.test",))
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "ham"


def test_policy_ranks_actions_that_keep_mail():
    from atlas_milter.policy import Cutoffs, RecipientPolicy

    config = load_config(None, {"milter.spam_action": "discard", "milter.recipients": {
        "q@x.org": {"spam_action": "quarantine"}, "r@x.org": {"spam_action": "reject"}}}, env={})
    policy = RecipientPolicy(config.milter)
    d = policy.decide(["<q@x.org>", "<r@x.org>", "<d@x.org>"], 0.99, Cutoffs(0.9, 0.1))
    assert d.action == "quarantine" and d.mixed
    assert policy.decide(["<r@x.org>"], 0.99, Cutoffs(0.9, 0.1)).action == "reject"
    assert policy.decide(["<r@x.org>"], 0.5, Cutoffs(0.9, 0.1)).action == "tag"  # unsure_action default


@pytest.mark.parametrize("table,message", [
    ({"recipients": {"a@x.org": {"spam_acton": "reject"}}}, "unknown key"),
    ({"domains": {"x.org": {"spam_action": "bounce"}}}, "is not one of"),
    ({"domains": {"x.org": {"spam_cutoff": 2}}}, "between 0 and 1"),
    ({"domains": {"x.org": {"opt_out": "yes"}}}, "true or false"),
    ({"domains": {"x.org": "reject"}}, "expected a table"),
    ({"reject_text": "spam {reff}"}, "only {ref}"),
    ({"trusted_networks": ["10.0.0.0/33"]}, "not an IP network"),
    ({"classify": "gpu"}, "is not one of"),
    ({"on_busy": "reject"}, "is not one of"),
])
def test_bad_milter_config_is_a_config_error(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {f"milter.{k}": v for k, v in table.items()}, env={})


def test_config_file_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[milter]\nspam_action = "reject"\n[milter.recipients."Boss@Example.TEST"]\nspam_action = "tag"\n'
                    '[milter.domains."lists.example"]\nopt_out = true\n')
    config = load_config(path, env={})
    assert config.milter.recipients == {"boss@example.test": {"spam_action": "tag"}}
    assert config.milter.domains == {"lists.example": {"opt_out": True}}


# --- size cap --------------------------------------------------------------------------------


def test_body_over_the_cap_is_skipped(engines, tmp_path):
    config = load_config(None, {"store.db": str(tmp_path / "cap.db"), "statsd.enabled": False,
                                "classifier.max_bytes": 2048}, env={})
    pipeline, _ = am.make_pipeline(config)
    engine = am.MilterEngine(config, pipeline)
    try:
        Milter.factory = functools.partial(am.AtlasMilter, engine)
        ctx = Ctx()
        ctx._connect()
        m = ctx._priv
        m.envfrom("<a@b.c>")
        m.header_bytes("Subject", b"big")
        assert m.body(b"x" * 1000 + b"\r\n") == Milter.CONTINUE
        assert m.body(b"y" * 5000 + b"\r\n") == Milter.SKIP
        assert m.size <= 2048 and m.truncated
        ctx._body, ctx._msg, ctx._stage = io.BytesIO(), None, Milter.M_EOM
        ctx._msg = __import__("email").message_from_bytes(b"Subject: big\n\nx")
        assert m.eom() == Milter.ACCEPT
        assert engine.buffered == 0  # everything reserved was given back
        assert engine.metrics.get_counters()[metrics.COUNTER_TRUNCATED] == 1
    finally:
        engine.close()


# --- failure paths ---------------------------------------------------------------------------


def _boom(raw, key="", timeout=None, **kw):
    raise ValueError("classifier bug")


def test_classifier_error_accepts_unchecked_logged_once(engines, caplog):
    engine = engines()
    engine.pipeline.classify = _boom
    with caplog.at_level(logging.ERROR, logger="atlas_milter.adapters.milter"):
        for _ in range(3):
            rc, ctx = feed(engine, HAM)
            assert rc == Milter.ACCEPT
            assert ctx.added()["X-Atlas-Verdict"] == "unchecked"
    assert len([r for r in caplog.records if "classify failure" in r.getMessage()]) == 1
    assert engine.metrics.get_counters()[metrics.COUNTER_ERROR_PREFIX + "classify"] == 3
    recorded = rows(engine)
    assert len(recorded) == 3 and all(r["verdict"] == "unchecked" and "classifier bug" in r["error"] for r in recorded)


def test_classifier_error_tempfails_when_configured(engines):
    engine = engines(on_error="tempfail")
    engine.pipeline.classify = _boom
    rc, ctx = feed(engine, HAM)
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.7.1")
    assert "ref" in rows(engine)[0]["note"]


def test_timeout_answers_within_the_deadline(engines):
    engine = engines(classify="thread", timeout=0.2)
    real = engine.pipeline.classify
    engine.pipeline.classify = lambda raw, key="", timeout=None, **kw: (time.sleep(1.0), real(raw, key))[1]
    t0 = time.perf_counter()
    rc, ctx = feed(engine, HAM)
    took = time.perf_counter() - t0
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "unchecked"
    assert took < 0.6, took
    assert engine.metrics.get_counters()[metrics.COUNTER_ERROR_PREFIX + "timeout"] == 1


def test_inline_late_verdict_counts_as_timeout(engines):
    engine = engines(classify="inline", timeout=0.05, on_error="tempfail")
    real = engine.pipeline.classify
    engine.pipeline.classify = lambda raw, key="", timeout=None, **kw: (time.sleep(0.1), real(raw, key))[1]
    rc, _ = feed(engine, HAM)
    assert rc == Milter.TEMPFAIL


def test_burst_beyond_max_in_flight_is_back_pressure(engines):
    engine = engines(classify="thread", max_in_flight=1, timeout=2.0)
    release = threading.Event()
    real = engine.pipeline.classify
    engine.pipeline.classify = lambda raw, key="", timeout=None, **kw: (release.wait(5), real(raw, key))[1]
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("rc", feed(engine, HAM)[0]))
    t.start()
    time.sleep(0.2)  # the first message holds the only slot
    rc, ctx = feed(engine, HAM)
    release.set()
    t.join(5)
    assert rc == Milter.TEMPFAIL and ctx._reply[:2] == ("451", "4.7.1")
    assert first["rc"] == Milter.ACCEPT
    assert engine.metrics.get_counters()[metrics.COUNTER_ERROR_PREFIX + "busy"] == 1


def test_pool_busy_from_the_process_pool_is_back_pressure(engines):
    from atlas_milter.pool import PoolBusy

    engine = engines()
    engine.mode = "pool"

    def busy(raw, key="", timeout=None, **kw):
        raise PoolBusy("8 in flight")

    engine.pipeline.classify = busy
    rc, _ = feed(engine, HAM)
    assert rc == Milter.TEMPFAIL


def test_pool_mode_takes_as_many_messages_at_once_as_max_in_flight(tmp_path):
    """The worker pool queues up to [milter] max_in_flight calls (not its own default of 4
    per worker): 16 messages at end of message together all get a verdict, none on_busy."""
    config = load_config(None, {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False,
                                "milter.classify": "pool", "milter.max_in_flight": 16,
                                "performance.workers": 2}, env={})
    pipeline, err = am.make_pipeline(config)
    engine = am.MilterEngine(config, pipeline, err)
    try:
        start = threading.Barrier(16)

        def one(i):
            start.wait()
            return engine.classify(HAM + b"\n%d" % i, f"Q{i}")

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(one, range(16)))
        assert len(results) == 16 and all(r.verdict.verdict for r in results)
    finally:
        engine.close()


def test_buffer_budget_is_back_pressure(engines):
    engine = engines(max_buffered_mb=1)
    engine.reserve(2**20 - 10)  # someone else holds nearly all of it
    rc, _ = feed(engine, HAM)
    assert rc == Milter.TEMPFAIL
    engine.release(2**20 - 10)
    assert engine.buffered == 0


def test_unreadable_model_at_start_gives_on_error(engines, tmp_path, caplog):
    bad = tmp_path / "model.json"
    bad.write_text("not json")
    config = load_config(None, {"store.db": str(tmp_path / "m.db"), "statsd.enabled": False,
                                "classifier.model": str(bad)}, env={})
    pipeline, err = am.make_pipeline(config)
    assert "not an atlas-milter model" in err
    engine = am.MilterEngine(config, pipeline, err)
    try:
        rc, ctx = feed(engine, HAM)
        assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "unchecked"
        assert rows(engine)[0]["error"].startswith("model")
    finally:
        engine.close()


def test_internal_bug_in_a_callback_still_answers(engines, monkeypatch):
    engine = engines()
    monkeypatch.setattr(engine, "reserve", lambda n: 1 / 0)
    rc, ctx = feed(engine, HAM)
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "unchecked"
    assert engine.metrics.get_counters()[metrics.COUNTER_ERROR_PREFIX + "internal"] == 1


def test_state_is_reset_for_the_next_message_on_the_connection(engines):
    engine = engines()
    Milter.factory = functools.partial(am.AtlasMilter, engine)
    ctx = Ctx()
    ctx._connect()
    ctx._setsymval("{i}", "Q1")
    ctx._feedFile(io.BytesIO(SPAM), "a@b.c", "x@example.test", "y@example.test")
    ctx._setsymval("{i}", "Q2")
    ctx.changes.clear()
    ctx._feedFile(io.BytesIO(HAM), "c@d.e", "z@example.test")
    assert ctx.added()["X-Atlas-Verdict"] == "ham"
    got = rows(engine)
    assert [(r["queue_id"], r["recipients_count"]) for r in got] == [("Q1", 2), ("Q2", 1)]
    assert engine.buffered == 0


# --- sockets and the command ------------------------------------------------------------------


@pytest.mark.parametrize("spec,message", [
    ("tcp:8894", "unknown socket type"),
    ("inet:99999@127.0.0.1", "not a port number"),
    ("inet:port@127.0.0.1", "not a port number"),
    ("unix:relative.sock", "must be absolute"),
    ("unix:/nonexistent-dir/milter.sock", "does not exist"),
    ("8894", "use unix:"),
])
def test_bad_socket_specs(spec, message):
    with pytest.raises(AtlasError, match=re.escape(message)):
        am.parse_socket(spec)


def test_socket_path_that_is_not_a_socket(tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(AtlasError, match="is not a socket"):
        am.parse_socket(f"unix:{f}")
    assert am.parse_socket("inet:8894@127.0.0.1").port == 8894
    assert am.parse_socket(f"unix:{tmp_path}/m.sock").path == f"{tmp_path}/m.sock"


def test_cli_bad_socket_is_one_error_line(tmp_path, capsys):
    rc = cli_main(["milter", "--socket", "unix:/nonexistent-dir/m.sock", "--db", str(tmp_path / "x.db")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: --socket unix:/nonexistent-dir/m.sock")


def test_quarantine_without_mta_support_tags_instead(engines, monkeypatch):
    engine = engines(spam_action="quarantine")
    # TestCtx._negotiate reads TestCtx.default_opts by class name: an MTA without QUARANTINE
    monkeypatch.setattr(TestCtx, "default_opts", [Milter.CURR_ACTS & ~Milter.QUARANTINE, 0x1FFFFF, 0, 0])
    Milter.factory = functools.partial(am.AtlasMilter, engine)
    ctx = Ctx()
    ctx._connect()
    ctx._setsymval("{i}", "QNOQ")
    rc = ctx._feedFile(io.BytesIO(SPAM), "a@b.c", "user@example.test")
    assert rc == Milter.ACCEPT and ctx.quarantined is None
    assert ctx.added()["X-Atlas-Verdict"] == "spam"
    [row] = rows(engine)
    assert row["action"] == "tag" and "quarantine not offered" in row["note"]


def test_locked_database_never_holds_end_of_message(tmp_path, caplog):
    """Even with ENABLE_BULK_OPS=false the milter queues its records: with the database
    write-locked by another process, eom answers at once and the row lands after release."""
    config = load_config(None, {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False},
                         env={"ENABLE_BULK_OPS": "false"})
    pipeline, err = am.make_pipeline(config)
    engine = am.MilterEngine(config, pipeline, err)
    try:
        assert "ENABLE_BULK_OPS=false ignored" in caplog.text
        holder = sqlite3.connect(config.store.db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        rc, _ = feed(engine, HAM)
        took = time.monotonic() - t0
        holder.execute("ROLLBACK")
        holder.close()
        assert rc == Milter.ACCEPT and took < 1.0, took  # the busy timeout is 5 s
        [row] = rows(engine)
        assert row["action"] == "tag"
    finally:
        engine.close()


def test_malloc_arenas_capped_unless_the_environment_says(tmp_path):
    """serve() caps glibc's arenas (RSS crept under sustained load without it; see
    scripts/soak.py); MALLOC_ARENA_MAX in the environment wins. In a subprocess: mallopt
    changes the whole process."""
    code = "from atlas_milter.adapters.milter import limit_malloc_arenas as f; print(f())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
