"""End to end through a real Sendmail 8.17 on loopback: smtplib → sendmail → atlas-milter (a real
subprocess on a unix socket) → relay to smtp-sink. Sendmail is the Debian build, extracted into
.cache/sendmail/root by scripts/bootstrap.sh --system (it cannot be installed beside Postfix), and
the milter is wired in with the very lines of conf/sendmail.mc. Corpus spam is tagged, rejected
with 550 or quarantined by policy (`mailq -qQ` lists it, `sendmail -qQ -qI<id>` releases it, and
so do atlas_milter.quarantine's release and delete, beside each message's decision), the
verdict rows match what the client and the sink saw, and a killed milter gives F=T's tempfail."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.requirements import start_or_fail
from tests.support.servers import REPO_ROOT, find_binary, private_tmpdir, SendmailInstance, wait_until
from tests.support.corpus import load_corpus, pick
from tests.support.milter_process import db_rows, MilterProcess
from tests.support.smtp import TOKEN_HEADER, header, new_token, send_one, with_token

from atlas_milter import quarantine
from atlas_milter.config import load_config
from atlas_milter.mta_queue import SendmailQueue

pytestmark = pytest.mark.integration

SNIPPET = REPO_ROOT / "conf" / "sendmail.mc"
SNIPPET_SOCKET = "local:/run/atlas-milter/milter.sock"
BASE_CONFIG = "[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\n"
RCPT = "user@example.test"  # relayed to the sink like any other address
QUEUE_ID = re.compile(rb"by mx\.atlas\.test \(8\.[^)]*\)\s+with E?SMTP id (\w+)")
TOKEN = re.compile(rb"^" + TOKEN_HEADER.encode() + rb": ([0-9a-f]{32})", re.M)
REJECT_TEXT = re.compile(r"5\.7\.1 Message rejected as spam \(ref ([0-9A-F]{10})\)")


def snippet_mc(socket_path: Path, *, eom_macros: bool = True) -> str:
    """The m4 lines of conf/sendmail.mc (comments dropped), pointed at our socket."""
    lines = [line for line in SNIPPET.read_text().splitlines() if line.strip() and not line.startswith("dnl")]
    if not eom_macros:
        lines = [line for line in lines if "confMILTER_MACROS_EOM" not in line]
    text = "\n".join(lines) + "\n"
    assert SNIPPET_SOCKET in text, "conf/sendmail.mc no longer uses the socket this test replaces"
    return text.replace(SNIPPET_SOCKET, f"local:{socket_path}")


@pytest.fixture(scope="module")
def workdir(sendmail_root):
    path = private_tmpdir("atlas-sendmail-e2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mta(workdir):
    server = start_or_fail(SendmailInstance(workdir / "sendmail", milter_mc=snippet_mc(workdir / "milter.sock")),
                           "sendmail")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def messages(corpus_dir, corpus_index):
    return load_corpus(corpus_dir, pick(corpus_index, "test", 8, 8))


def start_milter(workdir: Path, name: str, extra: str = "") -> MilterProcess:
    return MilterProcess(workdir, f"unix:{workdir / 'milter.sock'}", config_text=BASE_CONFIG + extra, name=name).start()


def crlf(raw: bytes) -> bytes:
    """The message with CRLF line ends, as a real SMTP client sends it: smtplib passes bytes on as
    they are, and this Sendmail (8.17.1.9, Debian's SMTP smuggling fix) answers a bare LF with
    "421 4.5.0 Bare linefeed (LF) not allowed" (Postfix accepts it)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send(mta: SendmailInstance, raw: bytes, token: str) -> tuple[int, str]:
    return send_one(mta.host, mta.smtp_port, crlf(with_token(raw, token)), [RCPT])


def send_all(mta: SendmailInstance, raws: list[bytes]) -> dict[str, tuple[int, str]]:
    """Send each message (with a fresh token) in its own SMTP session, 4 at a time: {token: (code, text)}."""
    items = [(new_token(), raw) for raw in raws]

    def one(item):
        tok, raw = item
        return tok, send(mta, raw, tok)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, items))


def sunk(mta: SendmailInstance, tokens: set[str], timeout: float = 30.0) -> dict[str, bytes]:
    """Wait until every token arrived at the sink; {token: message as relayed}."""
    found: dict[str, bytes] = {}

    def ready() -> bool:
        for path in mta.sink_messages():
            data = path.read_bytes().replace(b"\r\n", b"\n")
            m = TOKEN.search(data)
            if m and m.group(1).decode() in tokens:
                found[m.group(1).decode()] = data
        return set(found) >= tokens

    wait_until(ready, timeout=timeout, what=f"{len(tokens)} messages at the sink", proc=mta.proc,
               logs=(mta.traffic_log, mta.debug_log, mta.sink_log))
    return found


def sunk_tokens(mta: SendmailInstance) -> set[str]:
    return {m.group(1).decode() for p in mta.sink_messages() if (m := TOKEN.search(p.read_bytes()))}


@pytest.mark.parametrize("transport", ["loop", "libmilter"])
def test_corpus_tagged_by_default_and_rows_match(mta, workdir, messages, transport):
    proc = start_milter(workdir, f"tag-{transport}", f'transport = "{transport}"\n')
    try:
        replies = send_all(mta, [raw for _, raw in messages])
        assert {code for code, _ in replies.values()} == {250}, replies
        delivered = sunk(mta, set(replies))
    finally:
        assert proc.stop() == 0
    rows = {r["queue_id"]: r for r in db_rows(proc)}
    assert len(rows) == len(messages)
    seen = {"ham": 0, "spam": 0}
    for data in delivered.values():
        [verdict] = header(data, "X-Atlas-Verdict")  # exactly one: ours
        assert header(data, "X-Spam-Flag") == ["YES" if verdict == "spam" else "NO"]
        [score] = header(data, "X-Atlas-Score")
        row = rows[QUEUE_ID.search(data).group(1).decode()]  # sendmail's queue id, from its Received line
        assert (row["verdict"], row["action"], f"{row['score']:.3f}") == (verdict, "tag", score)
        # {client_addr} reaches the milter at end of message (confMILTER_MACROS_EOM in the snippet)
        assert row["client_ip"] == "127.0.0.1" and row["recipients_count"] == 1
        seen[verdict] = seen.get(verdict, 0) + 1
    assert seen["spam"] >= 5 and seen["ham"] >= 5, seen  # the model works on this mix
    assert "Traceback" not in proc.log()


def test_corpus_spam_rejected_with_550_when_configured(mta, workdir, messages):
    proc = start_milter(workdir, "reject", 'spam_action = "reject"\n')
    try:
        replies = send_all(mta, [raw for _, raw in messages])
        accepted = {tok for tok, (code, _) in replies.items() if code == 250}
        rejected = {tok: text for tok, (code, text) in replies.items() if code == 550}
        assert len(accepted) + len(rejected) == len(replies), replies
        assert len(rejected) >= 5, replies
        delivered = sunk(mta, accepted)
    finally:
        assert proc.stop() == 0
    rows = db_rows(proc)
    refs = {m.group(1) for m in (re.search(r"ref=([0-9A-F]{10})", r["note"] or "") for r in rows) if m}
    for text in rejected.values():
        m = REJECT_TEXT.fullmatch(text)
        assert m, text
        assert m.group(1) in refs  # the admin finds the row from the bounce
    assert sorted(r["action"] for r in rows) == sorted(["reject"] * len(rejected) + ["tag"] * len(accepted))
    assert all(r["verdict"] == "spam" for r in rows if r["action"] == "reject")
    assert not set(rejected) & sunk_tokens(mta)  # a rejected message is never relayed
    for data in delivered.values():
        assert header(data, "X-Spam-Flag") == ["NO"]


def test_corpus_spam_quarantined_in_sendmail_queue(mta, workdir, messages):
    proc = start_milter(workdir, "quarantine", 'spam_action = "quarantine"\n')
    try:
        replies = send_all(mta, [raw for row, raw in messages if row["label"] == "spam"])
    finally:
        assert proc.stop() == 0  # also flushes the verdict rows
    assert {code for code, _ in replies.values()} == {250}, replies  # the client sees a normal accept
    rows = db_rows(proc)
    held = {r["queue_id"] for r in rows if r["action"] == "quarantine"}
    assert len(held) >= 5, rows
    assert all(r["verdict"] == "spam" for r in rows if r["action"] == "quarantine")
    # the others are relayed; the held ones stay in the queue as hf files
    wait_until(lambda: len(sunk_tokens(mta) & set(replies)) == len(replies) - len(held), timeout=30,
               what="the messages that were not quarantined at the sink", proc=mta.proc, logs=(mta.traffic_log,))
    assert {p.name[2:] for p in mta.queued() if p.name.startswith("hf")} == held
    listing = mta.sendmail_cmd("-bp", "-qQ")  # mailq -qQ with the private config
    assert listing.returncode == 0, listing.stderr
    for qid in held:
        block = re.search(rf"^{qid}\b.*?(?=^\S|\Z)", listing.stdout, re.M | re.S)
        assert block, listing.stdout
        assert re.search(r"QUARANTINE: atlas-milter: spam score \d\.\d{3} \(ref [0-9A-F]{10}\)", block.group(0)), \
            block.group(0)
    # the admin releases one (sendmail -qQ -qI<id>: a queue run over quarantined items matching the id)
    first, *rest = sorted(held)
    before = set(sunk_tokens(mta))
    release = mta.sendmail_cmd("-qQ", f"-qI{first}")
    assert release.returncode == 0, release.stderr
    wait_until(lambda: len(sunk_tokens(mta) - before) == 1, timeout=30, what=f"released {first} at the sink",
               proc=mta.proc, logs=(mta.traffic_log,))
    [data] = [p.read_bytes().replace(b"\r\n", b"\n") for p in mta.sink_messages()
              if (m := TOKEN.search(p.read_bytes())) and m.group(1).decode() not in before]
    assert QUEUE_ID.search(data).group(1).decode() == first
    assert header(data, "X-Atlas-Verdict") == ["spam"] and header(data, "X-Spam-Flag") == ["YES"]
    # the delivery run removes its queue file just after the sink has the message
    wait_until(lambda: {p.name[2:] for p in mta.queued()} == set(rest), timeout=10,
               what=f"{first} gone from the queue, the others still held", logs=(mta.traffic_log,))
    assert all(p.name.startswith("hf") for p in mta.queued())

    # atlas-milter's own quarantine ([quarantine] mta = "sendmail"): each held message beside
    # the decision that held it; one released by its reference, one deleted by its queue id.
    config = load_config(None, {"store.db": str(proc.db), "quarantine.mta": "sendmail"}, env={})
    in_uts = [find_binary("unshare"), "--uts", "sh", "-c", f'hostname {mta.HOSTNAME} && exec "$@"', "sh"]
    queue = SendmailQueue(str(mta.cf_path), str(mta.queue_dir), in_uts, sendmail=str(mta.binary))
    entries = {e.held.queue_id: e for e in quarantine.entries(config, queue)}
    assert set(entries) == set(rest)
    assert all(e.decision["action"] == "quarantine" and e.ref and e.ref in e.held.reason for e in entries.values())
    release, delete, *kept = sorted(rest)
    before = set(sunk_tokens(mta))
    quarantine.release(config, queue, entries[release].ref, "e2e-admin")
    wait_until(lambda: len(sunk_tokens(mta) - before) == 1, timeout=30, what=f"released {release} at the sink",
               proc=mta.proc, logs=(mta.traffic_log,))
    quarantine.delete(config, queue, delete, "e2e-admin")
    wait_until(lambda: {p.name[2:] for p in mta.queued()} == set(kept), timeout=10,
               what="the released and the deleted one gone from the queue", logs=(mta.traffic_log,))
    time.sleep(1)
    assert len(sunk_tokens(mta) - before) == 1  # the deleted one never arrives


def test_killed_milter_tempfails_with_f_t(mta, workdir, messages):
    proc = start_milter(workdir, "killed")
    _, raw = messages[0]
    code, text = send(mta, raw, new_token())
    assert code == 250, (code, text)
    proc.kill()
    tok = new_token()
    code, text = send(mta, raw, tok)
    assert (code, text) == (451, "4.3.2 Please try again later")  # F=T: the client keeps it and retries
    assert tok not in sunk_tokens(mta)


def test_without_the_snippet_define_mail_flows_and_the_milter_says_what_is_missing(workdir, messages):
    """Sendmail 8.17 honours a milter's own end-of-message macro list only when the milter also
    set an end-of-header list, which atlas-milter does not (Postfix would send those macros with
    every header). Without the snippet's confMILTER_MACROS_EOM line the message is still tagged
    and recorded, and the milter logs once what is missing and which line to add."""
    base = workdir / "no-eom-define"
    base.mkdir()
    server = SendmailInstance(base / "sendmail", milter_mc=snippet_mc(base / "milter.sock", eom_macros=False))
    try:
        server.start()
        proc = MilterProcess(base, f"unix:{base / 'milter.sock'}", config_text=BASE_CONFIG, name="symlist").start()
        try:
            toks = [new_token(), new_token()]
            for tok, (_, raw) in zip(toks, messages[:2]):
                assert send(server, raw, tok) == (250, "ok")
            found = sunk(server, set(toks))
        finally:
            assert proc.stop() == 0
    finally:
        server.stop()
    assert "\nO Milter.macros.eom={msg_id}\n" in server.cf_path.read_text()  # the cf default, no {client_addr}
    assert all(b"X-Atlas-Verdict: " in data for data in found.values()) and len(found) == 2
    rows = db_rows(proc)
    assert len(rows) == 2 and all(row["client_ip"] is None for row in rows)
    log = proc.log()
    assert log.count("the MTA sent no {client_addr} at end of message") == 1, log[-2000:]
    assert "confMILTER_MACROS_EOM" in log
