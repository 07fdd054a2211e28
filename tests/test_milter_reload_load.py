"""Reloading the milter under load, through the real Postfix: 8 concurrent SMTP clients send
480 shared-corpus messages (each with a unique token) while the test rewrites the config and
sends SIGUSR1 over and over (0.2 s after each reload is logged), cycling through policy A (shipped model, spam tagged), policy B
(a copy of the model with its own version and spam cutoff 0.8, spam rejected with 550) and,
every fifth time, policy G: a garbage model file with spam_action = "discard", which must
never take (had it, a message would be accepted and never delivered).

Checked: every message accounted for exactly once (delivered once with our headers, or
refused with the 550 the client saw; nothing tempfailed, lost or duplicated); every
message decided wholly by A or wholly by B (its model version, the cutoff in its
X-Spam-Status and its action belong to the same policy); every reload logged, the garbage
ones as failures; no traceback; the milter never died. Also: SIGHUP stops the milter
cleanly (libmilter's meaning), which is why reload is SIGUSR1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest

from atlas_milter.classifier import load_model, save_model
from tests.support.servers import wait_until
from tests.support.corpus import load_corpus, pick
from tests.support.milter_process import milter_workdir, MilterProcess, unix_spec, wait_milter_active
from tests.support.smtp import TOKEN_HEADER, accepted_and_refused, new_token, send_one, with_token

CLIENTS = 8
N_HAM, N_SPAM = 240, 240
RELOAD_EVERY = 0.2  # seconds between SIGUSR1s
RECEIVED_ID = re.compile(rb"Received: from .*?\n\s+by mx\.atlas\.test \(Postfix\) with E?SMTP id ([0-9A-F]+)", re.S)
RELOADED = re.compile(r"milter reloaded in ([0-9.]+) ms")
FAILED = "milter reload failed"
MODEL_B_VERSION = "reload-test-copy-b"


def policy_text(work: Path, name: str) -> str:
    base = "[statsd]\nenabled = false\n"
    if name == "A":
        return base + f'[classifier]\nmodel = "{work / "model-a.json.gz"}"\n[milter]\nsocket_mode = 0o666\nspam_action = "tag"\n'
    if name == "B":
        return base + (f'[classifier]\nmodel = "{work / "model-b.json.gz"}"\nspam_cutoff = 0.8\n'
                       '[milter]\nsocket_mode = 0o666\nspam_action = "reject"\n')
    return base + f'[classifier]\nmodel = "{work / "garbage.json.gz"}"\n[milter]\nsocket_mode = 0o666\nspam_action = "discard"\n'


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.integration
def test_reload_under_load_loses_and_duplicates_nothing(postfix, corpus_dir, corpus_index):
    corpus = [raw for _, raw in load_corpus(corpus_dir, pick(corpus_index, "test", N_HAM, N_SPAM))]
    work = milter_workdir("atlas-milter-reload-")
    with resources.as_file(resources.files("atlas_milter").joinpath("data", "default-model.json.gz")) as shipped:
        shutil.copyfile(shipped, work / "model-a.json.gz")
    model_a_version = load_model(work / "model-a.json.gz").version
    model_b = load_model(work / "model-a.json.gz")
    model_b.meta["version"] = MODEL_B_VERSION
    save_model(model_b, work / "model-b.json.gz")
    good = (work / "model-b.json.gz").read_bytes()
    (work / "garbage.json.gz").write_bytes(good[: len(good) // 3])  # a copy cut short
    proc = MilterProcess(work, unix_spec(work / "m.sock")[0], name="reload", config_text=policy_text(work, "A"))
    proc.start()
    cycle = ["B", "A", "B", "A", "G"]
    reload_log: list[tuple[str, float]] = []  # (policy written, seconds from SIGUSR1 to its log line)
    stop = threading.Event()

    def reloader() -> None:
        while not stop.is_set():
            name = cycle[len(reload_log) % len(cycle)]
            write_atomically(proc.config_path, policy_text(work, name))
            log = proc.log()
            done_before = len(RELOADED.findall(log)) + log.count(FAILED)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGUSR1)
            while time.monotonic() - t0 < 10:
                log = proc.log()
                if len(RELOADED.findall(log)) + log.count(FAILED) > done_before:
                    break
                time.sleep(0.005)
            else:
                raise AssertionError(f"no reload logged 10 s after SIGUSR1 #{len(reload_log) + 1}")
            reload_log.append((name, time.monotonic() - t0))
            assert proc.alive(), "the milter died during a reload"
            stop.wait(RELOAD_EVERY)

    try:
        with postfix.milter_set(proc.socket_spec, default_action="tempfail"):
            wait_milter_active(postfix, corpus[0])
            items = [(new_token(), raw) for raw in corpus]

            def one(item):
                tok, raw = item
                return tok, send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])

            reloads = ThreadPoolExecutor(1).submit(reloader)
            t0 = time.monotonic()
            with ThreadPoolExecutor(CLIENTS) as pool:
                replies = dict(pool.map(one, items))
            took = time.monotonic() - t0
            stop.set()
            reloads.result(30)  # re-raises a failed reload wait or a dead milter
        assert proc.alive()
    finally:
        stop.set()
        code = proc.stop()
    assert code == 0
    assert len(reload_log) >= len(cycle), f"only {len(reload_log)} reloads during the load"

    # Every message accounted for exactly once.
    accepted, refused = accepted_and_refused(replies)
    pattern = re.compile(rb"^" + TOKEN_HEADER.encode() + rb": ([0-9a-f]{32})", re.M)
    deadline = time.monotonic() + 60
    while True:
        delivered: dict[str, list[bytes]] = {}
        for path in postfix.mailbox_messages():
            data = path.read_bytes()
            m = pattern.search(data)
            if m and m.group(1).decode() in replies:
                delivered.setdefault(m.group(1).decode(), []).append(data)
        if set(delivered) >= accepted or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(delivered) == accepted, f"lost: {len(accepted - set(delivered))}, unexpected: {len(set(delivered) - accepted)}"
    assert all(len(copies) == 1 for copies in delivered.values()), "duplicates delivered"

    # Every message decided wholly by one policy: its model, its cutoff and its action agree.
    con = sqlite3.connect(proc.db)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute("SELECT * FROM processed_emails WHERE source = 'milter'")]
    finally:
        con.close()
    by_qid = {r["queue_id"]: r for r in rows}
    assert len(by_qid) == len(rows), "a message recorded twice"
    model_a_cutoff = load_model(work / "model-a.json.gz").spam_cutoff
    assert model_a_cutoff != 0.8  # the two policies must be told apart by their cutoffs
    required = {model_a_version: f"{model_a_cutoff:.3f}", MODEL_B_VERSION: "0.800"}
    seen_versions: set[str] = set()
    for tok, [data] in delivered.items():
        head = data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
        assert len(re.findall(rb"^X-Atlas-Verdict: ", head, re.M)) == 1, head[:2000]
        qid = RECEIVED_ID.search(head).group(1).decode()
        row = by_qid[qid]
        [status] = re.findall(rb"^X-Spam-Status: (.*)$", head, re.M)
        assert status.decode().endswith(f"required={required[row['model_version']]}"), (row["model_version"], status)
        assert row["action"] == "tag"
        if row["verdict"] == "spam":
            assert row["model_version"] == model_a_version  # policy B would have rejected it
        seen_versions.add(row["model_version"])
    rejected_rows = [r for r in rows if r["action"] == "reject"]
    assert len(rejected_rows) == len(refused)
    assert all(r["verdict"] == "spam" and r["model_version"] == MODEL_B_VERSION for r in rejected_rows)
    assert not any(r["action"] == "discard" for r in rows)
    assert seen_versions == {model_a_version, MODEL_B_VERSION}

    # The log shows every reload; the garbage ones failed; nothing crashed.
    log = proc.log()
    assert "Traceback" not in log
    took_ms = [float(x) for x in RELOADED.findall(log)]
    n_garbage = sum(name == "G" for name, _ in reload_log)
    assert n_garbage >= 1 and log.count(FAILED) == n_garbage
    assert len(took_ms) == len(reload_log) - n_garbage
    counters = proc.summary()["counters"]
    assert counters["reload.ok"] == len(took_ms) and counters["reload.failed"] == n_garbage
    outside = [s * 1000 for _, s in reload_log]
    print(f"\nreload under load: {len(replies)} messages from {CLIENTS} clients in {took:.1f} s, "
          f"{len(accepted)} delivered, {len(refused)} rejected; {len(reload_log)} reloads "
          f"({n_garbage} with a garbage model, refused); reload {statistics.median(took_ms):.0f} ms median, "
          f"{max(took_ms):.0f} ms max in the milter; SIGUSR1 to log line {statistics.median(outside):.0f} ms median, "
          f"{max(outside):.0f} ms max")
    shutil.rmtree(work, ignore_errors=True)


def test_sighup_stops_the_milter_cleanly(tmp_path):
    """libmilter's signal thread takes SIGHUP as stop: exit 0, records flushed. (Reload is SIGUSR1.)"""
    proc = MilterProcess(tmp_path, f"unix:{tmp_path / 'm.sock'}", config_text="[statsd]\nenabled = false\n").start()
    try:
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.proc.wait(20) == 0
    finally:
        proc.kill()
    log = proc.log()
    assert "atlas-milter stopping" in log and "atlas-milter stopped" in log and "Traceback" not in log
    assert not (tmp_path / "m.sock").exists()


@pytest.mark.parametrize("classify", ["inline", "pool"])
def test_reload_then_sigterm_in_every_classify_mode(tmp_path, classify):
    """SIGUSR1 reloads and SIGTERM stops cleanly (exit 0, summary logged) whichever thread
    the kernel picks; with classify = "pool" too, whose worker pool starts multiprocessing's
    resource tracker (that unblocks SIGTERM in the starting thread)."""
    conf = f'[statsd]\nenabled = false\n[milter]\nclassify = "{classify}"\n'
    proc = MilterProcess(tmp_path, f"unix:{tmp_path / 'm.sock'}", config_text=conf).start()
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(lambda: "milter reloaded" in proc.log(), timeout=20, what="reload logged")
        assert proc.alive()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.proc.wait(20) == 0, proc.log()[-2000:]
    finally:
        proc.kill()
    log = proc.log()
    assert "atlas-milter stopped" in log and "Traceback" not in log
