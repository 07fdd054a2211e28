"""`atlas-milter history` and `atlas-milter explain` on real SQLite databases written by the
product itself: the store writer (BulkOperationManager), `classify --db` for hostile
subjects, and the milter adapter (pymilter's TestCtx) for a reject found by the
reference in its 550 reply. Also: the history and lookup queries use an index for every
filter (EXPLAIN QUERY PLAN), and the 1,000,000-row benchmark script runs (on fewer rows)."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone

import Milter
import pytest

from atlas_milter import history, queries
from atlas_milter.cli import main
from atlas_milter.store import BulkOperationManager
from scripts import history_bench
from tests.test_milter_adapter import HAM, SPAM, feed, make_engine

NOW = datetime.now(timezone.utc)
VERDICTS = ("ham", "spam", "unsure")
ACTIONS = ("tag", "reject", "quarantine")
DOMAINS = ("a.example", "b.example", "c.example", "d.example")


def write(db, records):
    store = BulkOperationManager(batch_size=100, flush_interval=0.05, db_path=db)
    try:
        for record in records:
            assert store.add_email_record(record)
        assert store.flush_all(timeout=30)
    finally:
        store.close()


def record(i: int) -> dict:
    """The i-th of a spread of decisions: one every 10 minutes, going back in time as i grows
    (so ids and times run the same way, as they do in a live database)."""
    return {
        "source": "milter" if i % 2 else "imap",
        "account": None if i % 2 else "work",
        "folder": None if i % 2 else "INBOX",
        "uidvalidity": None if i % 2 else 7,
        "uid": None if i % 2 else 1000 - i,
        "queue_id": f"4Q{i:06d}" if i % 2 else None,
        "message_id": f"<m{i}@x.example>",
        "sender": f"s{i}@{DOMAINS[i % 4]}",
        "recipients_count": 1 + i % 3,
        "subject": f"subject {i}",
        "score": (i % 100) / 100,
        "verdict": VERDICTS[i % 3],
        "action": ACTIONS[i % 3] if i % 2 else "move",
        "reasons": [["feature-a", 0.5], ["feature-b", -0.25], ["feature-c", 0.1], ["feature-d", 0.05]],
        "model_version": "test-model-1",
        "note": f"ref=REF{i:07d}" if i % 2 and ACTIONS[i % 3] == "reject" else None,
        "created_at": (NOW - timedelta(minutes=10 * (300 - i))).isoformat(timespec="milliseconds"),
    }


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "v.db"
    write(path, [record(i) for i in range(300)])  # ids 1..300, id 300 the newest
    return path


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def history_json(capsys, db, *flags):
    rc, out, err = run(capsys, "history", "--db", str(db), "--json", *flags)
    assert rc == 0, err
    return json.loads(out)


def ids(page):
    return [row["id"] for row in page["rows"]]


# -- history -------------------------------------------------------------------------------

def test_first_page_is_the_newest_first_and_names_the_next_page(capsys, db):
    page = history_json(capsys, db, "--limit", "5")
    assert ids(page) == [300, 299, 298, 297, 296]
    assert page["next_before"] == 296
    row = page["rows"][0]
    assert set(row) == set(queries.HISTORY_COLUMNS)
    assert row["reasons"][0] == ["feature-a", 0.5]
    rc, out, err = run(capsys, "history", "--db", str(db), "--limit", "5")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 7 and lines[-1] == "next page: --before 296"
    assert "feature-a +0.50, feature-b -0.25, feature-c +0.10" in lines[1] and "feature-d" not in lines[1]


def test_keyset_pages_cover_every_row_once_even_while_rows_are_added(capsys, tmp_path):
    path = tmp_path / "v.db"
    write(path, [record(i) for i in range(120)])
    seen, before = [], None
    while True:
        page = history_json(capsys, path, "--limit", "25", *(["--before", str(before)] if before else []))
        seen += ids(page)
        if not seen[25:]:  # after the first page, newer rows arrive: they must not shift the pages
            write(path, [record(i) for i in range(120, 130)])
        before = page["next_before"]
        if before is None:
            break
    assert seen == list(range(120, 0, -1))


@pytest.mark.parametrize("flag, value, column", [
    ("--verdict", "spam", "verdict"), ("--action", "reject", "action"), ("--sender-domain", "B.example", "sender_domain"),
])
def test_each_filter_keeps_only_its_rows(capsys, db, flag, value, column):
    rows = history_json(capsys, db, flag, value, "--limit", "1000")["rows"]
    expected = [r for r in map(record, range(300))
                if (r["sender"].rpartition("@")[2] if column == "sender_domain" else r[column]) == value.lower()]
    assert len(rows) == len(expected) > 0
    assert all(r[column] == value.lower() for r in rows)
    assert ids({"rows": rows}) == sorted(ids({"rows": rows}), reverse=True)


def test_filters_combine_and_since_takes_ages_and_dates(capsys, db):
    rows = history_json(capsys, db, "--since", "1h", "--limit", "1000")["rows"]
    assert ids({"rows": rows}) == [300, 299, 298, 297, 296]  # one every 10 minutes, the newest 10 minutes ago
    both = history_json(capsys, db, "--since", "2d", "--verdict", "ham", "--action", "move", "--limit", "1000")["rows"]
    assert both and all(r["verdict"] == "ham" and r["action"] == "move" for r in both)
    day = (NOW - timedelta(hours=5)).isoformat()
    assert len(history_json(capsys, db, "--since", day, "--limit", "1000")["rows"]) == 30
    assert history_json(capsys, db, "--since", "30m", "--verdict", "nothing")["rows"] == []


@pytest.mark.parametrize("argv, message", [
    (["--since", "yesterday"], "Error: --since yesterday: use an age such as 30m, 1h, 2d, 1w or an ISO date"),
    (["--since", "5y"], "Error: --since 5y: use an age"),
    (["--limit", "0"], "Error: --limit 0: give 1 to"),
])
def test_wrong_values_are_one_error_line(capsys, db, argv, message):
    rc, out, err = run(capsys, "history", "--db", str(db), *argv)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith(message)


def test_missing_database_is_one_error_line(capsys, tmp_path):
    for command in (["history"], ["explain", "X"]):
        rc, out, err = run(capsys, *command, "--db", str(tmp_path / "none.db"))
        assert rc == 1 and err == f"Error: {tmp_path / 'none.db'}: no such database (give --db PATH)\n"


HOSTILE = {
    "c0": b"Subject: bell\x07 back\x08space\x00 nul\r\n",
    "ansi": b"Subject: \x1b[31mred\x1b[0m \x1b]0;title\x07 \x9b31m\r\n",
    "rlo": "Subject: invoice \u202egpj.exe\r\n".encode(),
    "encoded": b"Subject: =?utf-8?b?" + __import__("base64").b64encode(
        "<script>alert(1)</script> \x1b[2J \u202e\u2066 \u200f\u0007".encode()) + b"?=\r\n",
    "qp": b"Subject: =?iso-8859-1?q?caf=E9_=1B=5B31m_=9B?=\r\n",
}


def test_hostile_subjects_are_inert_on_the_terminal(capsys, tmp_path):
    for name, subject in HOSTILE.items():
        (tmp_path / f"{name}.eml").write_bytes(b"From: x@hostile.example\r\nTo: y@example.test\r\n" + subject
                                              + b"Message-ID: <" + name.encode() + b"@h>\r\n\r\nhello\r\n")
    db = tmp_path / "v.db"
    assert main(["classify", "--db", str(db), *sorted(str(p) for p in tmp_path.glob("*.eml"))]) == 0
    capsys.readouterr()
    rc, out, _ = run(capsys, "history", "--db", str(db))
    assert rc == 0 and len(out.splitlines()) == 1 + len(HOSTILE)
    stored = [r["subject"] for r in history_json(capsys, db)["rows"]]
    assert any("\x1b" in s for s in stored) and any("\u202e" in s for s in stored)  # stored as decoded
    for mid in HOSTILE:
        rc, text, _ = run(capsys, "explain", f"{mid}@h", "--db", str(db))
        assert rc == 0
        out += text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]", out), ascii(out)
    assert "[31mred" in out and "<script>alert(1)</script>" in out  # shown as inert text


def test_terminal_safe_replaces_every_unsafe_character():
    assert history.terminal_safe("a\x1b[1mb\u202ec\u2067d\x85e\tf\ng") == "a?[1mb?c?d?e?f?g"
    assert history.terminal_safe("x" * 10, 5) == "xxxx…"


# -- explain -------------------------------------------------------------------------------

def test_explain_by_queue_id_and_message_id_with_or_without_brackets(capsys, db):
    for key in ("4Q000151", "<m151@x.example>", "m151@x.example"):
        rc, out, err = run(capsys, "explain", key, "--db", str(db))
        assert rc == 0, err
        assert "decision      #152  " in out and "sender        s151@d.example" in out
        assert "model         test-model-1" in out and "recipients    2" in out
        assert re.search(r"\+0\.500  feature-a\n +-0\.250  feature-b\n", out)
    data = json.loads(run(capsys, "explain", "m151@x.example", "--db", str(db), "--json")[1])
    assert data["id"] == 152 and data["queue_id"] == "4Q000151" and data["reasons"][1] == ["feature-b", -0.25]


def test_explain_by_reference_in_any_case(capsys, db):
    [rec] = [record(i) for i in range(300) if record(i)["note"] == "ref=REF0000007"]
    rc, out, err = run(capsys, "explain", "ref0000007", "--db", str(db))
    assert rc == 0, err
    assert "reference     REF0000007" in out and "action        reject" in out and rec["queue_id"] in out


def test_no_match_is_one_error_line(capsys, db):
    rc, out, err = run(capsys, "explain", "<nobody@nowhere>", "--db", str(db))
    assert (rc, out) == (1, "")
    assert err == "Error: no decision recorded for <nobody@nowhere> (looked for a reply reference, a queue id and a Message-ID)\n"


def test_several_matches_are_listed_newest_first_and_one_is_picked_by_id(capsys, tmp_path):
    path = tmp_path / "v.db"
    same = [dict(record(i), message_id="<dup@x>") for i in (1, 3, 5)]
    write(path, same)
    rc, out, err = run(capsys, "explain", "dup@x", "--db", str(path))
    assert rc == 1 and err == "Error: 3 decisions match; pick one with --id ID\n" and "Traceback" not in err
    assert out.splitlines()[0] == "3 decisions match dup@x (newest first):"
    assert [int(line.split()[0]) for line in out.splitlines()[2:5]] == [3, 2, 1]
    assert out.splitlines()[-1] == "pick one: atlas-milter explain dup@x --id ID"
    rc, out, err = run(capsys, "explain", "dup@x", "--id", "2", "--db", str(path))
    assert rc == 0 and "decision      #2  " in out
    rc, out, err = run(capsys, "explain", "4Q000001", "--id", "2", "--db", str(path))  # id 2 is not 4Q000001
    assert rc == 1 and err.startswith("Error: no decision recorded for id 2 for 4Q000001")


def test_a_milter_reject_is_found_by_the_reference_in_its_550_reply(capsys, tmp_path):
    engine = make_engine(tmp_path, spam_action="reject", deny_senders=["@deny.example"])
    try:
        rc, ctx = feed(engine, SPAM, rcpts=("a@example.test", "b@example.test"))
        assert rc == Milter.REJECT
        ref = re.search(r"\(ref ([0-9A-F]{10})\)", ctx._reply[2]).group(1)
        assert feed(engine, HAM, sender="boss@deny.example")[0] == Milter.REJECT
        feed(engine, HAM)
        assert engine.pipeline.flush(timeout=10)
    finally:
        engine.close()
    db = str(tmp_path / "v.db")
    rc, out, err = run(capsys, "explain", ref, "--db", db)
    assert rc == 0, err
    fields = {line[:14].strip(): line[14:] for line in out.splitlines() if not line.startswith(" ")}
    assert fields["front door"] == "milter  4QID123ABC" and fields["action"] == "reject"
    assert fields["reference"] == ref and fields["recipients"] == "2"
    assert fields["score"].startswith("0.9") and fields["score"].endswith("verdict spam")
    assert fields["model"].startswith("default-")
    # Where the time went (migration 0008): parse, classify and the rest add up to the total.
    m = re.fullmatch(r"(\d+\.\d) ms: parse (\d+\.\d\d) ms, classify (\d+\.\d\d) ms, rest (\d+\.\d\d) ms",
                     fields["elapsed"])
    assert m, fields["elapsed"]
    assert sum(map(float, m.groups()[1:])) == pytest.approx(float(m.group(1)), abs=0.1)
    # The cutoffs the verdict was given with (migration 0006): the shipped model's own here.
    from atlas_milter.classifier import load_model

    shipped = load_model()
    assert fields["cutoffs"].startswith(f"spam >= {shipped.spam_cutoff:g}, ham < {shipped.ham_cutoff:g}")
    assert re.search(r"reasons       \d+\n +\+\d\.\d{3}  \S", out)
    rc, out, err = run(capsys, "explain", "--id", "2", "--db", db)  # the deny-listed one: the policy says so
    assert rc == 0 and "policy        deny-listed sender" in out
    assert "cutoffs       not recorded (not scored" in out
    page = history_json(capsys, db, "--action", "reject")
    assert [r["id"] for r in page["rows"]] == [2, 1] and page["next_before"] is None


# -- the indexes (migration 0005) ------------------------------------------------------------

def plan(db, sql, params) -> str:
    with sqlite3.connect(db) as conn:
        return " | ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


@pytest.mark.parametrize("filters, index", [
    ({}, "SCAN processed_emails"),  # the primary key, newest first: no sort
    ({"before": 100}, "USING INTEGER PRIMARY KEY"),
    ({"verdict": "spam"}, "idx_processed_emails_verdict"),
    ({"action": "reject"}, "idx_processed_emails_action"),
    ({"sender_domain": "a.example"}, "idx_processed_emails_sender_domain"),
    ({"since": "2026-01-01T00:00:00+00:00"}, "SCAN processed_emails"),  # a range of many rows: ids down
    ({"verdict": "spam", "before": 100}, "idx_processed_emails_verdict"),
    ({"since": "2026-01-01T00:00:00+00:00", "verdict": "spam"}, "idx_processed_emails_verdict"),
    ({"verdict": "ham", "action": "reject"}, "idx_processed_emails_verdict_action "),
    ({"sender_domain": "a.example", "verdict": "ham"}, "idx_processed_emails_verdict_domain"),
    ({"action": "tag", "sender_domain": "a.example", "before": 100}, "idx_processed_emails_action_domain"),
    ({"action": "tag", "sender_domain": "a.example", "verdict": "spam"}, "idx_processed_emails_verdict_action_domain"),
])
def test_every_history_filter_uses_an_index_and_no_sort(db, filters, index):
    found = plan(db, *queries.history_sql(filters, 50))
    assert index in found and "TEMP B-TREE" not in found, found


def test_a_since_range_of_few_rows_is_read_from_the_created_at_index(db, monkeypatch):
    since = {"since": "2026-01-01T00:00:00+00:00"}
    found = plan(db, *queries.history_sql(since, 50, by_time=True))
    assert "SEARCH processed_emails USING INDEX idx_processed_emails_created_at (created_at>?)" in found, found
    everything = [r["id"] for r in queries.history(db, limit=1000, **since)]
    monkeypatch.setattr(queries, "SMALL_RANGE", 1)  # the other plan: the same rows
    assert [r["id"] for r in queries.history(db, limit=1000, **since)] == everything == list(range(300, 0, -1))


def test_explain_lookups_use_their_indexes(db):
    found = plan(db, *queries.find_sql("REF0000007"))
    for index in ("idx_processed_emails_ref", "idx_processed_emails_queue_id", "idx_processed_emails_message_id"):
        assert index in found, found
    assert "SCAN processed_emails" not in found.replace("SCAN processed_emails USING", ""), found


def test_history_bench_builds_a_database_and_reports_every_page(capsys, tmp_path):
    assert history_bench.main(["--rows", "20000", "--runs", "2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in history_bench.PAGES:  # once from the library, once over HTTP from the console
        assert len(re.findall(rf"^  {re.escape(name)} +\d+\.\d+ ms  \(max [\d.]+ ms, \d+ rows\)", out, re.M)) == 2, out
    assert "20000 rows" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pages"]["first page"]["rows"] == 50
    # The console's pages hold the rows the command line's do.
    assert {k: v["rows"] for k, v in result["console"]["pages"].items()} == {k: v["rows"] for k, v in result["pages"].items()}
