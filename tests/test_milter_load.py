"""Load test through the real Postfix: 12 concurrent SMTP clients send 2,000 shared-corpus
messages (each with a unique token) through atlas-milter, spam rejected with 550 by policy.
Every message is accounted for (delivered once with our headers, or refused with a code
the client saw), none lost, none duplicated, and the milter's memory stays flat."""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.corpus import load_corpus
from tests.support.milter_process import milter_workdir, MilterProcess, unix_spec, wait_milter_active
from tests.support.smtp import TOKEN_HEADER, accepted_and_refused, new_token, send_one, with_token

pytestmark = pytest.mark.integration

CLIENTS = 12
TOTAL = 2000
WARMUP = 300


def test_two_thousand_messages_none_lost_none_duplicated(postfix, corpus_dir, corpus_index):
    test_rows = [r for r in corpus_index if r["split"] == "test"]
    corpus = [raw for _, raw in load_corpus(corpus_dir, test_rows)]
    work = milter_workdir("atlas-milter-load-")
    proc = MilterProcess(work, unix_spec(work / "m.sock")[0], name="load",
                         config_text='[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\nspam_action = "reject"\n')
    proc.start()
    try:
        with postfix.milter_set(proc.socket_spec, default_action="tempfail"):
            wait_milter_active(postfix, corpus[0])
            items = [(new_token(), corpus[i % len(corpus)]) for i in range(TOTAL)]

            def one(item):
                tok, raw = item
                return tok, send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])

            with ThreadPoolExecutor(CLIENTS) as pool:
                first = dict(pool.map(one, items[:WARMUP]))
                rss_warm = proc.rss_kb()
                t0 = time.monotonic()
                rest = dict(pool.map(one, items[WARMUP:]))
                took = time.monotonic() - t0
            rss_end = proc.rss_kb()
        replies = {**first, **rest}
        assert len(replies) == TOTAL
        accepted, refused = accepted_and_refused(replies)

        # Every accepted message delivered exactly once, with our headers.
        pattern = re.compile(rb"^" + TOKEN_HEADER.encode() + rb": ([0-9a-f]{32})", re.M)
        deadline = time.monotonic() + 120
        while True:
            seen: dict[str, int] = {}
            tagged = 0
            for path in postfix.mailbox_messages():
                data = path.read_bytes()
                m = pattern.search(data)
                if m and m.group(1).decode() in replies:
                    tok = m.group(1).decode()
                    seen[tok] = seen.get(tok, 0) + 1
                    tagged += b"\nX-Atlas-Verdict: " in data.split(b"\n\n", 1)[0]
            if set(seen) >= accepted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(seen) == accepted, f"lost: {len(accepted - set(seen))}, unexpected: {len(set(seen) - accepted)}"
        assert all(n == 1 for n in seen.values()), "duplicates delivered"
        assert tagged == len(accepted)
    finally:
        assert proc.stop() == 0
    con = sqlite3.connect(proc.db)
    try:
        by_action = dict(con.execute("SELECT action, count(*) FROM processed_emails GROUP BY action").fetchall())
    finally:
        con.close()
    assert by_action.get("reject", 0) == len(refused)
    assert by_action.get("tag", 0) >= len(accepted)  # plus the probe(s)
    summary = proc.summary()
    assert summary["counters"]["milter.messages"] >= TOTAL
    assert "Traceback" not in proc.log()
    # Memory flat: the second 1,700 messages may not grow the milter beyond a generous bound.
    assert rss_end <= rss_warm * 1.25 + 16 * 1024, (rss_warm, rss_end)
    print(f"\nload: {TOTAL} messages, {CLIENTS} clients, {len(accepted)} delivered, {len(refused)} refused; "
          f"{(TOTAL - WARMUP) / took:.0f} msg/s after warm-up; RSS {rss_warm} kB -> {rss_end} kB; "
          f"milter.message {summary['timers_ms'].get('milter.message')}")
    shutil.rmtree(work, ignore_errors=True)
