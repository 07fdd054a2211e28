"""SendmailQueue against a real Sendmail 8.17 (the extracted Debian build, as in
test_sendmail_e2e.py). Messages are submitted with -odq (queued, not delivered) and put in the
quarantine with `sendmail -Q<reason> -qI<id>`, the hf file the milter's quarantine action
also produces. Then: held() lists them with sender, recipients and reason; read() gives the
headers and body; release() gets one to the smtp-sink exactly once; delete() removes one that
is then never delivered; unknown ids and ids that are not ids are refused, the latter before
any sendmail command runs (every command goes through a logging prefix)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import SendmailQueue
from tests.support.requirements import start_or_fail
from tests.support.servers import find_binary, private_tmpdir, SendmailInstance, wait_until

pytestmark = pytest.mark.integration

SENDER = "sender@example.test"
RCPTS = ["user@example.test", "other@example.test"]  # both relayed to the sink


@pytest.fixture(scope="module")
def workdir(sendmail_root):
    path = private_tmpdir("atlas-mta-queue-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mta(workdir):
    server = start_or_fail(SendmailInstance(workdir / "sendmail"), "sendmail")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def command_log(workdir) -> Path:
    return workdir / "commands.log"


@pytest.fixture(scope="module")
def prefix(mta, command_log) -> list[str]:
    """Runs sendmail in a UTS namespace named like the daemon's (a host name without a dot costs
    Sendmail a 60 s sleep), writing each command line to `command_log` first."""
    script = f'hostname {mta.HOSTNAME} && echo "$*" >> {command_log} && exec "$@"'
    return [find_binary("unshare"), "--uts", "sh", "-c", script, "sh"]


@pytest.fixture(scope="module")
def queue(mta, prefix) -> SendmailQueue:
    return SendmailQueue(config_file=str(mta.cf_path), queue_dir=str(mta.queue_dir), command_prefix=prefix,
                         timeout=20, sendmail=str(mta.binary))


def sendmail(mta: SendmailInstance, prefix: list[str], *args: str, stdin: bytes = b"") -> None:
    proc = subprocess.run([*prefix, str(mta.binary), "-C", str(mta.cf_path), *args], input=stdin,
                          capture_output=True, timeout=20)
    assert proc.returncode == 0, (args, proc.stderr, mta.log_tail())


def queue_ids(mta: SendmailInstance, kind: str) -> set[str]:
    return {p.name[2:] for p in mta.queue_dir.iterdir() if p.name.startswith(kind)}


def submit(mta: SendmailInstance, prefix: list[str], token: str) -> str:
    """Queue a message (sendmail -odq: not delivered) whose subject carries `token`; its queue id."""
    raw = (f"From: Sender <{SENDER}>\nTo: {', '.join(RCPTS)}\nSubject: quarantine test {token}\n"
           f"X-Folded: first part\n\tsecond part\n\nbody line {token}\nsecond body line\n").encode()
    before = queue_ids(mta, "qf")
    sendmail(mta, prefix, "-odq", "-f", SENDER, *RCPTS, stdin=raw)
    [qid] = queue_ids(mta, "qf") - before
    return qid


def quarantined(mta: SendmailInstance, prefix: list[str], token: str, reason: str) -> str:
    qid = submit(mta, prefix, token)
    sendmail(mta, prefix, f"-Q{reason}", f"-qI{qid}")  # quarantine a normal queue item
    assert qid in queue_ids(mta, "hf") and qid not in queue_ids(mta, "qf")
    return qid


def at_sink(mta: SendmailInstance, token: str) -> list[bytes]:
    found = []
    for path in mta.sink_messages():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if f"quarantine test {token}".encode() in data:
            found.append(data.replace(b"\r\n", b"\n"))
    return found


def files_of(mta: SendmailInstance, qid: str) -> list[str]:
    return sorted(p.name for p in mta.queue_dir.iterdir() if p.name[2:] == qid)


def test_held_lists_quarantined_messages(mta, prefix, queue):
    t0 = time.time()
    token_a, token_b = secrets.token_hex(8), secrets.token_hex(8)
    qid_a = quarantined(mta, prefix, token_a, "atlas-milter: spam score 0.991 (ref 0123456789)")
    qid_b = quarantined(mta, prefix, token_b, "manual hold")
    normal = submit(mta, prefix, secrets.token_hex(8))  # queued, not quarantined
    held = {h.queue_id: h for h in queue.held()}
    assert {qid_a, qid_b} <= set(held) and normal not in held
    a = held[qid_a]
    assert (a.sender, a.recipients, a.reason) == (SENDER, tuple(RCPTS), "atlas-milter: spam score 0.991 (ref 0123456789)")
    assert held[qid_b].reason == "manual hold"
    assert t0 - 2 <= a.arrival <= time.time() + 1
    assert a.size == (mta.queue_dir / f"df{qid_a}").stat().st_size > 0
    # what Sendmail itself lists as quarantined (mailq -qQ) agrees
    listing = mta.sendmail_cmd("-bp", "-qQ")
    assert qid_a in listing.stdout and qid_b in listing.stdout and normal not in listing.stdout, listing


def test_read_gives_headers_and_body(mta, prefix, queue):
    token = secrets.token_hex(8)
    qid = quarantined(mta, prefix, token, "to read")
    data = queue.read(qid)
    head, sep, body = data.partition(b"\n\n")
    assert sep and b"\r" not in data
    assert f"Subject: quarantine test {token}\n".encode() in head + b"\n"
    assert f"From: Sender <{SENDER}>".encode() in head
    assert b"X-Folded: first part\n\tsecond part" in head  # continuation line kept
    assert f"id {qid}".encode() in head  # Sendmail's own Received header
    assert not any(line.startswith(b"Return-Path:") for line in head.splitlines())  # <$g>: filled at delivery only
    assert body == f"body line {token}\nsecond body line\n".encode()
    assert qid in {h.queue_id for h in queue.held()}  # reading leaves it held


def test_release_delivers_exactly_once(mta, prefix, queue, command_log):
    token = secrets.token_hex(8)
    qid = quarantined(mta, prefix, token, "to release")
    mark = command_log.read_text() if command_log.exists() else ""
    queue.release(qid)
    ran = command_log.read_text()[len(mark):].splitlines()
    assert [line.split(str(mta.cf_path) + " ", 1)[1] for line in ran] == [f"-Q -qQ -qI{qid}", f"-qI{qid}"]
    assert qid not in {h.queue_id for h in queue.held()}
    wait_until(lambda: at_sink(mta, token), timeout=20, what=f"released {qid} at the sink", proc=mta.proc,
               logs=(mta.traffic_log, mta.sink_log))
    # delivered: the queue run removes its files just after the sink has the message
    wait_until(lambda: not files_of(mta, qid), timeout=10, what=f"{qid} gone from the queue", logs=(mta.traffic_log,))
    [data] = at_sink(mta, token)  # once, for both recipients
    assert f"body line {token}\n".encode() in data
    assert f"with ESMTP id".encode() in data and f"id {qid}".encode() in data
    with pytest.raises(AtlasError, match=f"^{qid}: not in the Sendmail quarantine"):
        queue.release(qid)


def test_delete_removes_it_for_good(mta, prefix, queue):
    token_gone, token_kept = secrets.token_hex(8), secrets.token_hex(8)
    gone = quarantined(mta, prefix, token_gone, "to delete")
    kept = quarantined(mta, prefix, token_kept, "to release after the delete")
    queue.delete(gone)
    assert files_of(mta, gone) == []
    assert gone not in {h.queue_id for h in queue.held()} and kept in {h.queue_id for h in queue.held()}
    for args in (["-qQ", f"-qI{gone}"], [f"-qI{gone}"]):  # queue runs over either queue find nothing
        sendmail(mta, prefix, *args)
    queue.release(kept)  # a later message gets through, the deleted one does not
    wait_until(lambda: at_sink(mta, token_kept), timeout=20, what=f"released {kept} at the sink", proc=mta.proc,
               logs=(mta.traffic_log, mta.sink_log))
    assert at_sink(mta, token_gone) == []
    for call in (queue.read, queue.release, queue.delete):
        with pytest.raises(AtlasError, match=f"^{gone}: not in the Sendmail quarantine"):
            call(gone)


def test_unknown_and_unquarantined_ids_are_refused(mta, prefix, queue, command_log):
    normal = submit(mta, prefix, secrets.token_hex(8))  # in the normal queue: nothing to release
    mark = command_log.read_text()
    for qid in ("ZZZZZZZZ999999", normal):
        for call in (queue.read, queue.release, queue.delete):
            with pytest.raises(AtlasError, match=f"^{qid}: not in the Sendmail quarantine"):
                call(qid)
    assert command_log.read_text() == mark  # refused without running sendmail
    assert files_of(mta, normal) == [f"df{normal}", f"qf{normal}"]


@pytest.mark.parametrize("bad", ["../x", "a;b", "", "-C/tmp/evil.cf", "ABCDE12345 -qQ", "ABCDE12345\n"])
def test_invalid_ids_refused_before_any_command(mta, prefix, queue, command_log, bad):
    qid = quarantined(mta, prefix, secrets.token_hex(8), "stays held")
    mark = command_log.read_text()
    for call in (queue.read, queue.release, queue.delete):
        with pytest.raises(AtlasError, match="is not a queue id"):
            call(bad)
    assert command_log.read_text() == mark
    assert files_of(mta, qid) == [f"df{qid}", f"hf{qid}"]
