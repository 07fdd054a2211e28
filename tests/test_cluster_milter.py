"""Three milters (three "MX hosts", each its own process and verdict database) behind one real
Postfix (smtpd_milters lists all three, so every message passes each of them) and one
real Redis. Host mx1 quarantines spam; an admin releases a held message and learns it as
ham on mx1's console; every host has that learn within a second (their /performance.json
names the same stream position and model version), and the same message sent again is
scored ham by all three."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import pytest

from tests.support.milter_process import MilterProcess, milter_workdir, unix_spec, wait_milter_active
from tests.support.requirements import require_binary
from tests.support.servers import RedisInstance, free_port, private_tmpdir, wait_until
from tests.support.smtp import delivered_by_token, new_token, send_one, with_token

pytestmark = pytest.mark.integration

TOKEN = "cluster-e2e-token"
SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
SPAM = (SAMPLE / "09-phishing.eml").read_bytes()
HAM = (SAMPLE / "03-family.eml").read_bytes()


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def post(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, headers={"Authorization": f"Bearer {TOKEN}"})
        return conn.getresponse().status
    finally:
        conn.close()


def cluster_state(port: int) -> dict:
    return json.loads(get(port, "/performance.json")[2])["cluster"]


def rows_for(db, token_queue_id: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT verdict, score, action FROM processed_emails WHERE queue_id = ?",
                            (token_queue_id,)).fetchall()


@contextlib.contextmanager
def running_hosts(postfix, actions: tuple[str, ...]):
    """A private Redis and one milter per action (mx1, mx2, ...), all in Postfix's
    smtpd_milters; yields (redis, [(MilterProcess, http port), ...])."""
    require_binary("redis-server")
    redis = RedisInstance(private_tmpdir("atlas-cluster-redis-")).start()
    workdir = milter_workdir("atlas-cluster-")
    (workdir / "token").write_text(TOKEN)
    hosts = []
    try:
        for i, action in enumerate(actions, 1):
            port = free_port()
            config = (f"[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\nspam_action = \"{action}\"\n"
                      f"[quarantine]\npostfix_config = \"{postfix.conf_dir}\"\n"
                      f"[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{workdir / 'token'}\"\n"
                      f"[cluster]\nredis = \"{redis.url}\"\nhost = \"mx{i}\"\n")
            lib, _ = unix_spec(workdir / f"mx{i}.sock")
            proc = MilterProcess(workdir, lib, config_text=config, name=f"mx{i}").start()
            hosts.append((proc, port))
        # mx1 last: once a milter has asked Postfix to hold a message, the milters after it do not see it.
        with postfix.milter_set(" ".join(proc.socket_spec for proc, _ in hosts[1:] + hosts[:1]),
                                default_action="tempfail"):
            wait_milter_active(postfix, HAM)
            yield redis, hosts
    finally:
        for proc, _ in hosts:
            proc.stop()
        redis.stop()
        postfix.delete_held()  # leave the session's Postfix as we found it


@pytest.fixture
def three_hosts(postfix):
    with running_hosts(postfix, ("quarantine", "tag", "tag")) as (_, hosts):
        yield hosts


def test_a_learn_on_one_mx_reaches_the_others_within_a_second(postfix, three_hosts, capsys):
    (mx1, port1), (mx2, port2), (mx3, port3) = three_hosts
    token = new_token()
    assert send_one(postfix.host, postfix.smtp_port, with_token(SPAM, token), [postfix.user])[0] == 250

    def held() -> list[dict]:
        listing = json.loads(get(port1, "/quarantine.json")[2])
        return [e for e in listing if e["decision_id"]]

    wait_until(lambda: len(held()) == 1, timeout=20, what="the spam held by mx1, its decision recorded")
    queue_id = held()[0]["queue_id"]
    wait_until(lambda: all(rows_for(p.db, queue_id) for p in (mx2, mx3)), timeout=10, what="mx2 and mx3's records")
    for proc in (mx2, mx3):
        assert rows_for(proc.db, queue_id)[0][0] == "spam"
    start = [cluster_state(p) for p in (port1, port2, port3)]
    assert len({s["version"] for s in start}) == 1 and all(s["redis_up"] for s in start)

    # The admin releases it and learns it as ham on mx1: every host has the learn within 1 s.
    t0 = time.monotonic()
    assert post(port1, f"/quarantine/{queue_id}/learn") == 303

    def everywhere() -> bool:  # the learn is on the stream, and every host has applied it
        states = [cluster_state(p) for p in (port1, port2, port3)]
        return (len({s["position"] for s in states}) == 1 and states[0]["position"] != "0" and not states[0]["outbox"]
                and all(s["in_force"] == s["version"] for s in states))  # and scoring with it

    wait_until(everywhere, timeout=5, what="the learn on every host", interval=0.01)
    took = time.monotonic() - t0
    assert took <= 1.0, took
    with capsys.disabled():  # shown in the CI log even without -s
        print(f"\ncluster: release+learn on mx1 to applied on mx1, mx2 and mx3: {took * 1000:.0f} ms")
    states = [cluster_state(p) for p in (port1, port2, port3)]
    assert len({(s["version"], s["position"]) for s in states}) == 1, states
    postfix.wait_for_message(token, timeout=30)  # released, delivered

    # The same message again: every host scores it ham now.
    again = new_token()
    assert send_one(postfix.host, postfix.smtp_port, with_token(SPAM, again), [postfix.user])[0] == 250
    (delivered,) = postfix.wait_for_message(again, timeout=30)
    queue_id = re.search(rb"with E?SMTP id ([0-9A-F]+)", delivered.read_bytes()).group(1).decode()
    wait_until(lambda: all(rows_for(p.db, queue_id) for p in (mx1, mx2, mx3)), timeout=10,
               what="every host's record of the second copy")
    for proc in (mx1, mx2, mx3):
        verdict, score, _ = rows_for(proc.db, queue_id)[0]
        assert verdict == "ham" and score < 0.3, (proc.db, verdict, score)


@pytest.mark.parametrize("outage", ["kill", "freeze"])
def test_redis_killed_or_frozen_under_load_costs_no_mail(postfix, corpus_dir, corpus_index, outage):
    """Redis dies (SIGKILL) or hangs (SIGSTOP) while 8 clients send 240 messages through the
    three milters: every message is accepted and delivered once, none tempfailed, no milter
    takes near its deadline, and every host is back on Redis within 10 s of its return."""
    from tests.support.corpus import load_corpus

    corpus = [raw for _, raw in load_corpus(corpus_dir, [r for r in corpus_index if r["split"] == "test"][:240])]
    with running_hosts(postfix, ("tag", "tag", "tag")) as (redis, hosts):
        items = [(new_token(), raw) for raw in corpus]

        def one(item):
            tok, raw = item
            return tok, send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(one, items[:60]))
            redis.kill() if outage == "kill" else redis.freeze()
            rest = list(pool.map(one, items[60:]))
            down = [cluster_state(port)["redis_up"] for _, port in hosts]
        replies = dict(first + rest)
        assert {code for code, _ in replies.values()} == {250}, [r for r in replies.values() if r[0] != 250][:3]
        assert down == [False, False, False]  # every breaker noticed (the sync threads do poll)
        delivered = delivered_by_token(postfix, set(replies), timeout=120)
        assert set(delivered) == set(replies)
        for proc, port in hosts:
            stages = json.loads(get(port, "/performance.json")[2])["stages"]
            assert stages["milter.message"]["max"] < 2500, (proc.db, stages["milter.message"])  # deadline 5 s
        back = time.monotonic()
        redis.start() if outage == "kill" else redis.thaw()
        wait_until(lambda: all(cluster_state(port)["redis_up"] for _, port in hosts), timeout=10,
                   what="every host back on Redis")
        assert time.monotonic() - back <= 10
