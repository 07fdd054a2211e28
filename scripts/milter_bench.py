#!/usr/bin/env python3
"""Throughput and latency of the atlas-milter inside a real Postfix, on loopback.

One private Postfix (tests/support/servers.py) relays to smtp-sink; the same messages (test
split of the shared corpus, one SMTP session each, N concurrent clients) go through it
without a milter, with the milter on a unix socket and with it on inet, in one run and
in rounds (none, unix, inet, none, unix, inet, ...) so machine noise hits all alike. The
milter's own time per message comes from its `milter.message` timer, which it logs as
JSON when it stops. Needs root (Postfix) and the corpus.

    python -m scripts.milter_bench --messages 1000 --clients 16 --rounds 2
    python -m scripts.milter_bench --classify thread        # or inline / pool
    python -m scripts.milter_bench --corpus-check            # all 6,046 messages, grep the log
    python -m scripts.milter_bench --modes none,ref-noop,ref-parse,unix   # with the yardsticks
    python -m scripts.milter_bench --modes none,unix,ref-noop --stub-classifier   # the milter's own cost

Modes: none (Postfix alone), unix and inet (atlas-milter on either socket), and the two
reference milters of shared/docs/performance-notes.md on a unix socket (scripts/
reference_milter.py): ref-noop (pymilter doing nothing but answer end-of-message) and
ref-parse (buffer, compat32 parse, add one header). They show what any pymilter milter
costs inside Postfix on the machine of the run. unix and inet run atlas-milter on its default
transport (the protocol loop); unix-libmilter and inet-libmilter on libmilter's threads
([milter] transport = "libmilter"), to compare the two in one run. unix-pure and inet-pure run
it with ENABLE_COMPILED=false: the pure-Python classifier, the yardstick of the compiled one.
unix-cluster runs it with [cluster] on a private Redis (issue 18: throughput with Redis
configured >= 0.95 of without); with --cluster-learns N another "host" publishes N learns a
second to the shared stream during that mode's rounds (events made beforehand, as on another
machine), so every milter keeps applying them.

    python -m scripts.milter_bench --modes none,unix,unix-cluster --rounds 5 --cluster-learns 2

Two rates per round: accepted (the clients' time to get their replies) and relayed (from
the first message sent until the queue is empty, delivery included). Postfix alone accepts
faster than it delivers and leaves part of its delivery after the clients are done; with a
milter, delivery keeps up inside the window.

Bars (issue 4): unix/none >= 0.60, inet/unix >= 0.90, milter p50 <= 5 ms, p99 <= 25 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.servers import find_binary, free_port, PostfixInstance, wait_until
from tests.support.corpus import load_corpus, read_index
from tests.support.milter_process import inet_spec, milter_workdir, MilterProcess, unix_spec
from tests.support.smtp import send_one, wait_queue_empty

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CORPUS = REPO.parent / "shared" / "corpus" / "spamassassin"
RCPT = "someone@remote.test"  # relayed to smtp-sink


# Run in the milter process (--stub-classifier): every message gets a fixed ham score without
# being parsed or scored, so a run measures the milter's own cost (protocol, fingerprint, cache,
# record, headers) beside the real one.
STUB_CLASSIFIER = """
import atlas_milter.pipeline as _pipeline
from atlas_milter.verdict import Score as _Score
_STUB = _pipeline.Analysis(_Score(score=0.1, reasons=(("stub", -1.0),), model_version="stub"))
_pipeline.analyse = lambda raw, model, max_bytes: _STUB
"""


class ReferenceMilter(MilterProcess):
    """scripts/reference_milter.py in place of atlas-milter (same start/stop/CPU accounting)."""

    stop_signal = signal.SIGTERM  # a plain pymilter milter: SIGUSR2 would kill it

    def __init__(self, workdir: Path, socket_spec: str, kind: str, name: str) -> None:
        super().__init__(workdir, socket_spec, name=name)
        self.kind = kind

    def argv(self) -> list[str]:
        return [sys.executable, str(REPO / "scripts" / "reference_milter.py"), self.kind, self.socket_spec]


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process (the SMTP clients)."""
    t = os.times()
    return t.user + t.system


class PeerLearner:
    """Another host of the cluster: publishes `rate` learns a second (each message of the
    corpus in turn, as ham) to the shared stream from a thread, between start() and stop().
    The events are made before start(), the way another machine makes them: what this host
    pays for them is applying them, not learning them."""

    def __init__(self, url: str, messages: list[bytes], rate: float, seconds: float = 60.0) -> None:
        from atlas_milter.classifier import load_model
        from atlas_milter.learn_events import make_event
        from atlas_milter.redis_link import RedisLink

        self.link = RedisLink(url)
        model = load_model()
        self.events = [make_event(model, messages[i % len(messages)] + f"\npeer learn {uuid.uuid4().hex}\n".encode(),
                                  False, 512 * 1024, "bench-peer")[0] for i in range(int(rate * seconds))]
        self.rate = rate
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "PeerLearner":
        self._thread.start()
        return self

    def _run(self) -> None:
        for event in self.events:
            if self._stop.wait(1.0 / self.rate):
                return
            if self.link.publish(event)[0]:
                self.published += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.published


def paired_ratios(rates: dict[str, list[float]]) -> dict[str, float]:
    """Per mode, the median over rounds of that round's rate divided by the same round's
    rate without a milter: the host's speed drifts between rounds, within one much less."""
    return {m: round(statistics.median(r / n for r, n in zip(v, rates["none"])), 3)
            for m, v in rates.items() if m != "none"}


def run_load(host: str, port: int, messages: list[bytes], clients: int) -> tuple[float, dict[int, int]]:
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def one(raw: bytes) -> None:
        code, _ = send_one(host, port, raw, [RCPT])
        with lock:
            codes[code] = codes.get(code, 0) + 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, messages))
    return time.perf_counter() - t0, codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--classify", default="inline", choices=("inline", "thread", "pool"))
    ap.add_argument("--spam-action", default="tag")
    ap.add_argument("--corpus", default=os.environ.get("ATLAS_CORPUS", str(DEFAULT_CORPUS)))
    ap.add_argument("--modes", default="none,unix,inet")
    ap.add_argument("--corpus-check", action="store_true",
                    help="push every corpus message through Postfix + milter and count unhandled exceptions")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--prelude", default="", help="Python run in the milter process first (experiments)")
    ap.add_argument("--stub-classifier", action="store_true",
                    help="atlas-milter with classification stubbed out (STUB_CLASSIFIER): what the milter costs without it")
    ap.add_argument("--milter-config", default="", help="more [milter] lines for atlas-milter, e.g. 'max_in_flight = 32'")
    ap.add_argument("--cluster-learns", type=float, default=0.0,
                    help="unix-cluster: learns per second another host publishes during the load")
    args = ap.parse_args()
    if args.stub_classifier:
        args.prelude = STUB_CLASSIFIER + "\n" + args.prelude

    corpus = Path(args.corpus)
    if args.corpus_check:
        chosen = read_index(corpus)
    else:
        test = read_index(corpus, "test")
        chosen = (test * (args.messages // max(1, len(test)) + 1))[: args.messages]
    messages = [raw for _, raw in load_corpus(corpus, chosen)]

    work = milter_workdir("atlas-bench-")
    sink_port = free_port()
    sink = subprocess.Popen([find_binary("smtp-sink") or "smtp-sink", "-u", "postfix", f"127.0.0.1:{sink_port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pf = PostfixInstance(work / "postfix", milter_default_action="tempfail", extra_config={
        "relayhost": f"[127.0.0.1]:{sink_port}",
        "smtp_tls_security_level": "none",
        "default_process_limit": "100",
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "milter_protocol": "6",
        # as documented in conf/postfix-main.cf: no macros at the stages the milter skips
        "milter_end_of_data_macros": "i {auth_authen} {client_addr}",
        **{f"milter_{stage}_macros": "" for stage in ("connect", "helo", "mail", "rcpt", "data", "end_of_header",
                                                       "unknown_command")},
    })
    results: dict[str, list[float]] = {}
    timers: dict[str, list[dict]] = {}
    relayed: dict[str, list[float]] = {}  # accepted and delivered (queue empty), msg/s
    cfg = (f'[milter]\nclassify = "{args.classify}"\nspam_action = "{args.spam_action}"\nsocket_mode = 0o666\n'
           f'{args.milter_config}\n[statsd]\nenabled = false\n')
    redis = None
    try:
        if any("cluster" in m for m in args.modes.split(",")):
            from tests.support.servers import RedisInstance

            redis = RedisInstance(work / "redis").start()
        pf.start()
        wait_until(lambda: True, timeout=1, what="noop")
        # warm-up (Postfix process pool, page cache)
        run_load(pf.host, pf.smtp_port, messages[:200], args.clients)
        wait_queue_empty(pf.queue_dir)
        modes = args.modes.split(",")
        for rnd in range(args.rounds):
            for mode in modes:
                milter = None
                if mode == "none":
                    pf.set_milter(None)
                    time.sleep(0.5)
                else:
                    if mode.startswith("inet"):
                        lib, post = inet_spec(free_port())
                    else:
                        lib, post = unix_spec(work / f"milter-{mode}-{rnd}.sock")
                    if mode.startswith("ref-"):
                        milter = ReferenceMilter(work, lib, mode[4:], name=f"milter-{mode}-{rnd}").start()
                    else:
                        transport = 'transport = "libmilter"\n' if mode.endswith("-libmilter") else ""
                        cluster = f'[cluster]\nredis = "{redis.url}"\nhost = "bench"\n' if "cluster" in mode else ""
                        milter = MilterProcess(work, lib, config_text=cfg.replace("[milter]\n", "[milter]\n" + transport, 1) + cluster,
                                               name=f"milter-{mode}-{rnd}", prelude=args.prelude,
                                               env={"ENABLE_COMPILED": "false"} if mode.endswith("-pure") else None).start()
                    pf.set_milter(post)
                    run_load(pf.host, pf.smtp_port, messages[:50], args.clients)  # warm the milter
                    wait_queue_empty(pf.queue_dir)
                time.sleep(0.5)  # idle smtpd processes from before the reload exit
                peer = PeerLearner(redis.url, messages, args.cluster_learns) if "cluster" in mode and args.cluster_learns else None
                cpu0 = milter.cpu_seconds() if milter is not None else 0.0
                machine0, own0 = machine_cpu_seconds(), own_cpu_seconds()
                if peer is not None:
                    peer.start()
                try:
                    started = time.perf_counter()
                    took, codes = run_load(pf.host, pf.smtp_port, messages, args.clients)
                    if peer is not None:
                        print(f"  peer learns published during the load: {peer.stop()}", flush=True)
                    per_msg = 1000.0 / len(messages)
                    machine_ms = (machine_cpu_seconds() - machine0) * per_msg
                    client_ms = (own_cpu_seconds() - own0) * per_msg
                    milter_ms = (milter.cpu_seconds() - cpu0) * per_msg if milter is not None else 0.0
                    print(f"  CPU ms/message: machine {machine_ms:.2f} = milter {milter_ms:.2f} + SMTP clients "
                          f"{client_ms:.2f} + Postfix and the rest {machine_ms - milter_ms - client_ms:.2f}", flush=True)
                    wait_queue_empty(pf.queue_dir, timeout=600, interval=0.02)
                    relay_took = time.perf_counter() - started
                    relayed.setdefault(mode, []).append(len(messages) / relay_took)
                    print(f"  relayed (accepted and delivered): {relay_took:6.2f} s = {len(messages) / relay_took:6.1f} msg/s, "
                          f"machine CPU {(machine_cpu_seconds() - machine0) * per_msg:.2f} ms/message", flush=True)
                finally:
                    if milter is not None:
                        pf.set_milter(None)
                        rc = milter.stop()
                        summ = milter.summary()
                        timers.setdefault(mode, []).append(summ.get("timers_ms", {}).get("milter.message", {}))
                        if args.corpus_check:
                            log = milter.log()
                            print(json.dumps({
                                "corpus_messages": len(messages), "codes": codes, "milter_exit": rc,
                                "tracebacks": log.count("Traceback"), "errors": log.count(" ERROR "),
                                "counters": summ.get("counters", {}),
                            }, indent=1))
                rate = len(messages) / took
                results.setdefault(mode, []).append(rate)
                print(f"round {rnd + 1} {mode:5}: {len(messages)} msgs in {took:6.2f} s = {rate:6.1f} msg/s  replies {codes}",
                      flush=True)
        if args.corpus_check:
            return 0
        best = {m: max(v) for m, v in results.items()}
        med = {m: statistics.median(v) for m, v in results.items()}
        print("\nthroughput msg/s (best / median of rounds):", {m: (round(best[m], 1), round(med[m], 1)) for m in best})
        if "none" in best and "unix" in best:
            print(f"unix/none  = {med['unix'] / med['none']:.3f} (median)  {best['unix'] / best['none']:.3f} (best)   bar >= 0.60")
        if "none" in results:
            print("per-round ratio to none, median of rounds:", paired_ratios(results))
        if "none" in relayed:
            print("relayed (until the queue is empty) msg/s, median:", {m: round(statistics.median(v), 1) for m, v in relayed.items()},
                  " per-round ratio to none:", paired_ratios(relayed))
        for ref, what in (("ref-noop", "a pymilter milter that only answers"),
                          ("ref-parse", "a pymilter milter that parses and adds a header")):
            if "none" in best and ref in best:
                print(f"{ref}/none = {med[ref] / med['none']:.3f} (median)  {best[ref] / best['none']:.3f} (best)   "
                      f"(yardstick: {what})")
        if "unix" in results and "unix-cluster" in results:
            paired = statistics.median(c / u for c, u in zip(results["unix-cluster"], results["unix"]))
            spread = [round(c / u, 3) for c, u in zip(results["unix-cluster"], results["unix"])]
            print(f"unix-cluster/unix = {paired:.3f} (median of rounds, each {spread})   bar >= 0.95")
        if "unix" in best and "inet" in best:
            print(f"inet/unix  = {med['inet'] / med['unix']:.3f} (median)  {best['inet'] / best['unix']:.3f} (best)   bar >= 0.90")
        for mode, ts in timers.items():
            for t in ts:
                if t:
                    print(f"milter.message ({mode}): p50 {t['p50']} ms  p95 {t['p95']} ms  p99 {t['p99']} ms  "
                          f"max {t['max']} ms  n={t['count']}   bars p50 <= 5, p99 <= 25")
        return 0
    finally:
        pf.stop()
        if redis is not None:
            redis.stop()
        sink.terminate()
        try:
            sink.wait(5)
        except subprocess.TimeoutExpired:
            sink.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("work dir:", work)


if __name__ == "__main__":
    sys.exit(main())
