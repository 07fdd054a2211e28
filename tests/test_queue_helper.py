"""Privilege separation for the quarantine: `atlas-milter queue-helper` (a real subprocess, as
root) serves a private Postfix's hold queue on a unix socket (root:nogroup 0660), and a
process that has dropped to nobody (as the milter runs unprivileged) lists, reads,
releases and deletes held mail through it, while running postsuper itself is refused.
Also: a user outside the socket's group is refused by the socket, and bad requests get one
error line, never an action."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.console import MemoryQueue
from tests.support.requirements import require_root
from tests.support.servers import PostfixInstance, private_tmpdir, wait_until
from tests.support.smtp import new_token, send_one

from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import run_tool
from atlas_milter.queue_helper import HelperQueue, answer

pytestmark = pytest.mark.integration

NOBODY, NOGROUP, DAEMON_GID = 65534, 65534, 1


@pytest.fixture(scope="module")
def holding_postfix():
    require_root("postfix")
    base = private_tmpdir("atlas-qhelper-")
    # Every message is put on hold at RCPT time: a hold queue without a milter.
    pf = PostfixInstance(base, extra_config={"smtpd_recipient_restrictions": "check_recipient_access static:HOLD"})
    pf.start()
    yield pf
    pf.stop()


@pytest.fixture
def helper(holding_postfix, tmp_path):
    sock = private_tmpdir("atlas-qhelper-sock-") / "queue.sock"  # a path nobody can reach (not pytest's 0700 dirs)
    config = tmp_path / "helper.toml"
    config.write_text(f"[quarantine]\npostfix_config = \"{holding_postfix.conf_dir}\"\n")
    log = tmp_path / "helper.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atlas_milter", "queue-helper", "--socket", str(sock),
                                 "--socket-group", "nogroup", "--config", str(config), "--log-level", "info"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(sock.exists, timeout=20, what="the queue helper's socket", proc=proc, logs=(log,))
        yield sock, log
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean stop
        shutil.rmtree(sock.parent, ignore_errors=True)


def as_user(uid: int, gid: int, work) -> dict:
    """Run `work()` in a forked child that dropped to uid/gid (no supplementary groups), as a
    daemon started by systemd with User= would be; return what it returned (or its error)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                result = {"ok": work()}
            except AtlasError as exc:
                result = {"error": str(exc)}
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_an_unprivileged_process_releases_and_deletes_through_the_helper(holding_postfix, helper):
    pf = holding_postfix
    sock, log = helper
    tokens = [new_token(), new_token()]
    for token in tokens:
        raw = f"From: a@remote.test\nTo: {pf.user}\nSubject: held {token}\nX-Test-Token: {token}\n\nbody\n".encode()
        assert send_one(pf.host, pf.smtp_port, raw, [pf.user])[0] == 250
    wait_until(lambda: len(pf.held_ids()) >= 2, timeout=20, what="two messages on hold")
    ids = sorted(pf.held_ids())

    # As nobody: postsuper itself is refused; the helper's socket is not.
    direct = as_user(NOBODY, NOGROUP, lambda: run_tool(["postsuper", "-c", str(pf.conf_dir), "-H", ids[0]], "releasing"))
    assert "superuser" in direct["error"] and "helper_socket" in direct["error"], direct  # the hint: the helper
    queue = HelperQueue(str(sock))
    listed = as_user(NOBODY, NOGROUP, lambda: [h.queue_id for h in queue.held()])
    assert sorted(listed.get("ok", [])) == ids, listed
    texts = {qid: as_user(NOBODY, NOGROUP, lambda qid=qid: queue.read(qid).decode())["ok"] for qid in ids}
    release = next(qid for qid in ids if tokens[0] in texts[qid])
    delete = next(qid for qid in ids if tokens[1] in texts[qid])
    assert as_user(NOBODY, NOGROUP, lambda: queue.release(release)) == {"ok": None}
    assert as_user(NOBODY, NOGROUP, lambda: queue.delete(delete)) == {"ok": None}
    again = as_user(NOBODY, NOGROUP, lambda: queue.delete(delete))
    assert "not in the Postfix hold queue" in again["error"]

    pf.wait_for_message(tokens[0], timeout=30)
    assert not pf.held_ids() & {release, delete}
    time.sleep(1.5)  # a queue run: the deleted one never arrives, the released one once
    assert len([p for p in pf.mailbox_messages() if tokens[0].encode() in p.read_bytes()]) == 1
    assert not [p for p in pf.mailbox_messages() if tokens[1].encode() in p.read_bytes()]
    # Every request is logged with who asked.
    assert f"uid {NOBODY} pid" in Path(log).read_text()

    # Outside the socket's group: the socket refuses, and the error says what to do.
    refused = as_user(NOBODY, DAEMON_GID, lambda: queue.held())
    assert "permission denied" in refused["error"] and "group" in refused["error"]


def test_a_stopped_helper_is_one_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="not running .*atlas-milter-queue.socket"):
        HelperQueue(str(tmp_path / "absent.sock")).held()


@pytest.mark.parametrize("request_line, error", [
    (b"not json\n", "not a request"),
    (b'{"op": "shell", "queue_id": "ABCDE12345"}\n', "not a request"),
    (b'{"op": "release", "queue_id": ["x"]}\n', "not a request"),
    (b'{"op": "release", "queue_id": "../../etc/passwd"}\n', "is not a queue id"),
    (b'{"op": "delete", "queue_id": "ABCDE; rm -rf /"}\n', "is not a queue id"),
    (b'{"op": "release", "queue_id": "NOTHELD123"}\n', "NOTHELD123: not held"),
])
def test_bad_requests_get_one_error_line_and_no_action(request_line, error):
    queue = MemoryQueue({"4QAAA00000": b"Subject: x\n\nbody\n"})
    reply = answer(queue, request_line)
    assert error in reply["error"] and "ok" not in reply
    assert queue.released == [] and queue.deleted == [] and len(queue.messages) == 1


def test_good_requests_answer_with_the_queue():
    queue = MemoryQueue({"4QAAA00000": b"Subject: x\n\nbody\n"})
    assert answer(queue, b'{"op": "held"}\n')["ok"][0]["queue_id"] == "4QAAA00000"
    assert answer(queue, b'{"op": "release", "queue_id": "4QAAA00000"}\n') == {"ok": True}
    assert queue.released == ["4QAAA00000"]
