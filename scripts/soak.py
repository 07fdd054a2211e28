#!/usr/bin/env python3
"""Soak test of atlas-milter inside a real Postfix (issue 7): sustained load for a long
time, then every message accounted for and the milter's memory, file descriptors,
threads and latency checked against fixed bars.

What it does, in order:

1. **Probe** (skipped with --rate): 16 clients send test-split corpus messages as fast as
   they can for --probe-seconds; the maximum is messages / (time until the last one was
   delivered or refused).
2. **Idle baseline**: open fds and threads of the milter process with no SMTP session.
3. **Soak**: --clients clients (16) send at --load x maximum (default 0.75, rate-limited,
   open loop: each message has its slot on a fixed schedule) for --duration seconds
   (default 1800). A sampler reads the milter's VmRSS, /proc/PID/fd, Threads and its
   /performance.json (milter.eom / milter.message p99) every --sample-interval seconds.
4. **Drain and idle again**; fds and threads read once more.

Every message carries a unique X-Test-Token header (and, by default, its token in the
body too, so no two messages share a cache entry and each one is really classified).
A collector thread reads each delivered file in the Maildir, counts its token and
whether it carries X-Atlas-Verdict, and deletes it (the disk stays small on a long run).

Warm-up is the first --warmup fraction (10%) of the soak duration. The bars (exit code 1
when one fails, the JSON summary says which):

* every message sent got 250 (delivered exactly once, with our headers) or 550 (refused
  as spam, never delivered); nothing lost, duplicated, tempfailed or broken off;
* memory: median VmRSS of the last 10% of the samples <= (1 + --max-memory-growth) x the
  median of the 10% right after warm-up (growth <= 10%);
* fds and threads at idle after the soak <= at idle before it;
* p99 of the milter's own milter.eom / milter.message timers (worst window seen after
  warm-up) and p99 of what the clients measured from end of DATA to the reply, all <= the
  milter's timeout ([milter] timeout, 5 s);
* achieved rate >= 0.70 x maximum (when the maximum was measured).

    python -m scripts.soak                              # the full 30 minutes
    python -m scripts.soak --duration 240               # a short check
    python -m scripts.soak --rate 120 --duration 600    # skip the probe

Needs root (Postfix) and the shared corpus. tests/test_soak.py runs the same code for
about a minute in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import smtplib
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tests.support.servers import free_port, PostfixInstance
from tests.support.corpus import load_corpus, read_index
from tests.support.milter_process import milter_workdir, MilterProcess, unix_spec, wait_milter_active
from tests.support.smtp import TOKEN_HEADER, new_token, with_token

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CORPUS = REPO.parent / "shared" / "corpus" / "spamassassin"
MIN_RATE_FRACTION = 0.70  # the soak must run at >= 70% of the measured maximum
VERDICT_HEADER = b"\nX-Atlas-Verdict: "
_TOKEN_RE = re.compile(rb"^" + TOKEN_HEADER.encode() + rb": ([0-9a-f]{32})", re.M)


@dataclass
class SoakOptions:
    duration: float = 1800.0  # seconds of sustained load
    clients: int = 16
    rate: float | None = None  # messages/s; None: measure the maximum first and use load x it
    load: float = 0.75  # fraction of the measured maximum to drive
    probe_seconds: float = 20.0
    sample_interval: float = 5.0  # seconds between two samples of the milter process
    warmup: float = 0.10  # fraction of the duration before the reference window
    window: float = 0.10  # fraction of the samples in the reference and the final window
    max_memory_growth: float = 0.10
    timeout: float = 5.0  # the milter's deadline ([milter] timeout) and the p99 bar
    unique_bodies: bool = True  # the token in the body too: every message a cache miss
    cache_size: int | None = None  # [performance] cache_size of the milter (None: its default, 10,000)
    drain_seconds: float = 120.0


# --------------------------------------------------------------------- sending


def send_timed(host: str, port: int, raw: bytes, rcpt: str, sender: str = "sender@remote.test",
               timeout: float = 60.0) -> tuple[int, str, float | None]:
    """One SMTP session, one message: (code, text, seconds from sending DATA to the final
    reply). Code 0 means the session broke off (connection refused or dropped)."""
    took = None
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(sender)
            if code != 250:
                return code, text.decode(errors="replace"), None
            code, text = smtp.rcpt(rcpt)
            if code not in (250, 251):
                return code, text.decode(errors="replace"), None
            t0 = time.perf_counter()
            code, text = smtp.data(raw)
            took = time.perf_counter() - t0
            return code, text.decode(errors="replace"), took
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace"), took
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace"), took
    except (OSError, smtplib.SMTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}", took


def unique_body(raw: bytes, token: str) -> bytes:
    """The message with the token as its last body line (a new body digest, so no cache hit)."""
    eol = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    return raw + (b"" if raw.endswith(eol) else eol) + f"soak {token}".encode() + eol


class Ledger:
    """What happened to every message: the reply its client saw, and how many times it
    arrived in the mailbox (and whether with X-Atlas-Verdict)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replies: dict[str, tuple[int, str]] = {}
        self.sent_at: dict[str, float] = {}
        self.data_latency: list[tuple[float, float]] = []  # (monotonic send time, seconds)
        self.delivered: dict[str, int] = {}
        self.untagged: set[str] = set()

    def reply(self, token: str, started: float, code: int, text: str, took: float | None) -> None:
        with self.lock:
            self.replies[token] = (code, text)
            self.sent_at[token] = started
            if took is not None:
                self.data_latency.append((started, took))

    def deliver(self, token: str, tagged: bool) -> None:
        with self.lock:
            self.delivered[token] = self.delivered.get(token, 0) + 1
            if not tagged:
                self.untagged.add(token)

    def knows(self, token: str) -> bool:
        with self.lock:
            return token in self.replies

    def outstanding(self) -> int:
        """Messages accepted (250) but not delivered yet."""
        with self.lock:
            return sum(1 for t, (c, _) in self.replies.items() if c == 250 and t not in self.delivered)

    def account(self) -> dict:
        """The tally and what is wrong with it (empty lists when every message is accounted for)."""
        with self.lock:
            codes: dict[str, int] = {}
            for code, _ in self.replies.values():
                codes[str(code)] = codes.get(str(code), 0) + 1
            accepted = {t for t, (c, _) in self.replies.items() if c == 250}
            refused = {t for t, (c, _) in self.replies.items() if c == 550}
            other = sorted(f"{c} {txt}"[:120] for t, (c, txt) in self.replies.items() if c not in (250, 550))
            return {
                "sent": len(self.replies),
                "codes": codes,
                "delivered": len(accepted & set(self.delivered)),
                "refused": len(refused),
                "lost": len(accepted - set(self.delivered)),
                "duplicated": sum(1 for t, n in self.delivered.items() if n > 1),
                "refused_but_delivered": len(refused & set(self.delivered)),
                "delivered_without_verdict": len(self.untagged),
                "other_replies": other[:10],
            }


class DeliveryCollector(threading.Thread):
    """Reads each delivered file of ours in the Maildir, tells the ledger, deletes it."""

    def __init__(self, maildir: Path, ledger: Ledger, interval: float = 0.2) -> None:
        super().__init__(name="soak-collector", daemon=True)
        self.maildir = Path(maildir)
        self.ledger = ledger
        self.interval = interval
        self.stop_event = threading.Event()
        self.foreign: set[str] = set()  # files of other tests (session-wide Postfix): left alone
        self.pass_lock = threading.Lock()

    def collect(self) -> int:
        """One pass over new/ and cur/; safe to call from any thread (one pass at a time,
        or two passes would count the same file twice)."""
        with self.pass_lock:
            return self._collect()

    def _collect(self) -> int:
        n = 0
        for sub in ("new", "cur"):
            d = self.maildir / sub
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if name in self.foreign:
                    continue
                path = d / name
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                head = data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
                m = _TOKEN_RE.search(head)
                token = m.group(1).decode() if m else None
                if token is None or not self.ledger.knows(token):
                    # Delivered before its client saw the 250: ours too, read it again next time.
                    # Without a token, or unknown for a minute: another test's, left alone.
                    if token is None or time.time() - path.stat().st_mtime > 60:
                        self.foreign.add(name)
                    continue
                self.ledger.deliver(token, VERDICT_HEADER in head)
                path.unlink(missing_ok=True)
                n += 1
        return n

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.collect()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.collect()


# --------------------------------------------------------------------- sampling the milter


def proc_status(pid: int) -> dict:
    """VmRSS (kB), Threads and open fds of a process, from /proc."""
    out = {"rss_kb": 0, "threads": 0, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_kb"] = int(line.split()[1])
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    return out


def milter_timers(http_port: int | None) -> dict:
    """p50/p99 (ms, over the last 4,096 messages) of milter.eom and milter.message from
    the milter's /performance.json; {} when it does not answer."""
    if not http_port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/performance.json", timeout=5) as resp:
            stages = json.load(resp).get("stages", {})
    except (OSError, ValueError):
        return {}
    return {name: {k: stages[name][k] for k in ("count", "p50", "p99", "max")}
            for name in ("milter.eom", "milter.message") if name in stages}


class Sampler(threading.Thread):
    """Every `interval` seconds: the milter's RSS, fds, threads (read before the HTTP
    request, which itself adds a thread and a socket for a moment) and its timers."""

    def __init__(self, pid: int, http_port: int | None, interval: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid = pid
        self.http_port = http_port
        self.interval = interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        s = {"t": round(time.monotonic() - self.t0, 1), **proc_status(self.pid), "timers": milter_timers(self.http_port)}
        self.samples.append(s)
        return s

    def run(self) -> None:
        self.sample()
        while not self.stop_event.wait(self.interval):
            try:
                self.sample()
            except FileNotFoundError:  # the milter died: the summary will say so
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


# --------------------------------------------------------------------- driving the load


def drive(host: str, port: int, rcpt: str, next_message: Callable[[], tuple[str, bytes]], ledger: Ledger,
          clients: int, seconds: float, rate: float | None) -> tuple[int, float]:
    """`clients` threads send until `seconds` have passed; at `rate` messages/s (message i
    in its slot t0 + i/rate, open loop) or as fast as they can (rate None).
    Returns (messages sent, seconds taken)."""
    lock = threading.Lock()
    counter = iter(range(10**12))
    t0 = time.monotonic()
    end = t0 + seconds

    def worker() -> None:
        while True:
            with lock:
                i = next(counter)
                token, raw = next_message()
            slot = t0 + i / rate if rate else time.monotonic()
            if slot >= end:
                return
            delay = slot - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started = time.monotonic()
            code, text, took = send_timed(host, port, raw, rcpt)
            ledger.reply(token, started, code, text, took)

    threads = [threading.Thread(target=worker, name=f"soak-client-{n}", daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    with lock:
        sent = next(counter) - len(threads)  # each worker drew one index it did not send
    return sent, took


def wait_delivered(ledger: Ledger, collector: DeliveryCollector, timeout: float) -> float:
    """Wait until every accepted message arrived (or `timeout`); returns the seconds waited."""
    t0 = time.monotonic()
    while ledger.outstanding() and time.monotonic() - t0 < timeout:
        collector.collect()
        time.sleep(0.1)
    return time.monotonic() - t0


def messages_from(corpus: list[bytes], unique_bodies: bool) -> Callable[[], tuple[str, bytes]]:
    """A (token, raw) source cycling through `corpus`; call it under a lock."""
    it: Iterator[bytes] = (corpus[i % len(corpus)] for i in range(10**12))

    def next_message() -> tuple[str, bytes]:
        token = new_token()
        raw = next(it)
        if unique_bodies:
            raw = unique_body(raw, token)
        return token, with_token(raw, token)

    return next_message


def window_median(samples: list[dict], key: str, start: float, end: float) -> float | None:
    vals = [s[key] for s in samples if start <= s["t"] < end]
    return statistics.median(vals) if vals else None


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0.0


def soak(postfix, milter: MilterProcess, corpus: list[bytes], opts: SoakOptions, http_port: int | None,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Probe (unless opts.rate), soak, drain; returns the summary with its "failures"
    (empty when every bar holds). `postfix` already routes through `milter`."""
    ledger = Ledger()
    collector = DeliveryCollector(postfix.maildir, ledger)
    collector.start()
    next_message = messages_from(corpus, opts.unique_bodies)
    send = lambda seconds, rate: drive(postfix.host, postfix.smtp_port, postfix.user, next_message,  # noqa: E731
                                       ledger, opts.clients, seconds, rate)
    summary: dict = {"options": asdict(opts)}
    try:
        if opts.rate:
            max_rate, target = None, opts.rate
        else:
            log(f"soak: probing the maximum for {opts.probe_seconds:.0f} s with {opts.clients} clients")
            sent, took = send(opts.probe_seconds, None)
            drained = wait_delivered(ledger, collector, opts.drain_seconds)
            max_rate = sent / (took + drained)
            target = opts.load * max_rate
            summary["probe"] = {"messages": sent, "seconds": round(took + drained, 1), "max_rate": round(max_rate, 1)}
            log(f"soak: maximum {max_rate:.1f} msg/s ({sent} in {took + drained:.1f} s); target {target:.1f} msg/s")
        time.sleep(2)  # sessions closed: the milter's connection threads are gone
        idle_before = proc_status(milter.pid)
        probe_latency_n = len(ledger.data_latency)

        sampler = Sampler(milter.pid, http_port, opts.sample_interval)
        sampler.start()
        soak_t0 = time.monotonic()
        log(f"soak: {opts.clients} clients at {target:.1f} msg/s for {opts.duration:.0f} s, "
            f"sampling every {opts.sample_interval:g} s")
        sent, took = send(opts.duration, target)
        sampler.stop()
        drained = wait_delivered(ledger, collector, opts.drain_seconds)
        time.sleep(2)
        idle_after = proc_status(milter.pid) if milter.alive() else {}
    finally:
        collector.stop()

    samples = sampler.samples
    warm_end = opts.duration * opts.warmup
    span = opts.duration * opts.window
    ref = (warm_end, warm_end + span)
    final = (opts.duration - span, opts.duration + opts.sample_interval)
    rss_ref = window_median(samples, "rss_kb", *ref)
    rss_final = window_median(samples, "rss_kb", *final)
    growth = (rss_final - rss_ref) / rss_ref if rss_ref and rss_final is not None else None
    after_warm = [s for s in samples if s["t"] >= warm_end]
    worst = {name: max((s["timers"].get(name, {}).get("p99", 0.0) for s in after_warm), default=0.0)
             for name in ("milter.eom", "milter.message")}
    soak_latency = [took for started, took in ledger.data_latency[probe_latency_n:] if started - soak_t0 >= warm_end]
    achieved = sent / took if took else 0.0
    account = ledger.account()
    milter_alive = milter.alive()

    summary.update({
        "soak": {"messages": sent, "seconds": round(took, 1), "target_rate": round(target, 1),
                 "achieved_rate": round(achieved, 1),
                 "fraction_of_max": round(achieved / max_rate, 3) if max_rate else None,
                 "drain_seconds": round(drained, 1)},
        "accounting": account,
        "memory": {"warmup_s": round(warm_end, 1), "reference_window_s": [round(x, 1) for x in ref],
                   "final_window_s": [round(final[0], 1), round(opts.duration, 1)],
                   "rss_reference_kb": rss_ref, "rss_final_kb": rss_final,
                   "reference_samples": sum(1 for x in samples if ref[0] <= x["t"] < ref[1]),
                   "final_samples": sum(1 for x in samples if final[0] <= x["t"] < final[1]),
                   "rss_min_kb": min((s["rss_kb"] for s in samples), default=None),
                   "rss_max_kb": max((s["rss_kb"] for s in samples), default=None),
                   "growth": round(growth, 4) if growth is not None else None},
        "fds": {"idle_before": idle_before["fds"], "idle_after": idle_after.get("fds"),
                "max_under_load": max((s["fds"] for s in samples), default=None)},
        "threads": {"idle_before": idle_before["threads"], "idle_after": idle_after.get("threads"),
                    "max_under_load": max((s["threads"] for s in samples), default=None)},
        "latency_ms": {"milter_p99_worst_window": worst,
                       "milter_last": samples[-1]["timers"] if samples else {},
                       "client_data_to_reply_p50": round(statistics.median(soak_latency) * 1000, 1) if soak_latency else None,
                       "client_data_to_reply_p99": round(p99(soak_latency) * 1000, 1) if soak_latency else None,
                       "client_data_to_reply_max": round(max(soak_latency) * 1000, 1) if soak_latency else None,
                       "deadline": opts.timeout * 1000},
        "samples": len(samples),
        "milter_alive": milter_alive,
    })
    summary["failures"] = check_bars(summary, opts, http_port)
    summary["rss_series_kb"] = [(s["t"], s["rss_kb"]) for s in samples]
    return summary


def check_bars(summary: dict, opts: SoakOptions, http_port: int | None) -> list[str]:
    """One line per bar that failed."""
    fail = []
    acc = summary["accounting"]
    for key in ("lost", "duplicated", "refused_but_delivered", "delivered_without_verdict"):
        if acc[key]:
            fail.append(f"{acc[key]} message(s) {key.replace('_', ' ')}")
    odd = {c: n for c, n in acc["codes"].items() if c not in ("250", "550")}
    if odd:
        fail.append(f"replies other than 250/550: {odd} e.g. {acc['other_replies'][:3]}")
    if not summary["milter_alive"]:
        fail.append("the milter process died")
    mem = summary["memory"]
    if min(mem["reference_samples"], mem["final_samples"]) < 3:
        fail.append(f"{mem['reference_samples']} and {mem['final_samples']} memory samples in the reference and "
                    "final windows (need 3 each): longer --duration or shorter --sample-interval")
    elif mem["growth"] is None:
        fail.append("memory growth could not be computed (empty window)")
    elif mem["growth"] > opts.max_memory_growth:
        fail.append(f"memory grew {mem['growth']:.1%} after warm-up ({mem['rss_reference_kb']} -> "
                    f"{mem['rss_final_kb']} kB), bar {opts.max_memory_growth:.0%}")
    for what in ("fds", "threads"):
        d = summary[what]
        if d["idle_after"] is None or d["idle_after"] > d["idle_before"]:
            fail.append(f"{what} grew at idle: {d['idle_before']} before the soak, {d['idle_after']} after")
    lat = summary["latency_ms"]
    deadline = opts.timeout * 1000
    if http_port and not any(lat["milter_p99_worst_window"].values()):
        fail.append("no milter timers read from /performance.json")
    for name, value in lat["milter_p99_worst_window"].items():
        if value > deadline:
            fail.append(f"{name} p99 {value:.0f} ms > deadline {deadline:.0f} ms")
    if lat["client_data_to_reply_p99"] is None:
        fail.append("no client latency measured after warm-up")
    elif lat["client_data_to_reply_p99"] > deadline:
        fail.append(f"client end-of-DATA to reply p99 {lat['client_data_to_reply_p99']:.0f} ms > deadline")
    frac = summary["soak"]["fraction_of_max"]
    if frac is not None and frac < MIN_RATE_FRACTION:
        fail.append(f"achieved {frac:.0%} of the maximum, bar {MIN_RATE_FRACTION:.0%}")
    return fail


# --------------------------------------------------------------------- the command


def milter_config(opts: SoakOptions, http_port: int) -> str:
    """The milter's config for a soak: reject spam (both outcomes exercised), the /performance
    JSON on loopback, no StatsD."""
    text = (f'[milter]\nsocket_mode = 0o666\nspam_action = "reject"\ntimeout = {opts.timeout}\n'
            f'[http]\nlisten = "127.0.0.1:{http_port}"\n[statsd]\nenabled = false\n')
    if opts.cache_size:
        text += f"[performance]\ncache_size = {opts.cache_size}\n"
    return text


def load_test_split(corpus_dir: Path) -> tuple[list[bytes], bytes]:
    """The test split's messages, ham and spam mixed, and one ham (to probe the milter with)."""
    loaded = load_corpus(corpus_dir, read_index(corpus_dir, "test"))
    return [raw for _, raw in loaded], next(raw for row, raw in loaded if row["label"] == "ham")


def main(argv: list[str] | None = None) -> int:
    d = SoakOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=d.duration, help="seconds of load (default 1800)")
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--rate", type=float, help="messages/s to drive (default: --load x the measured maximum)")
    ap.add_argument("--load", type=float, default=d.load, help="fraction of the measured maximum (default 0.75)")
    ap.add_argument("--probe-seconds", type=float, default=d.probe_seconds)
    ap.add_argument("--sample-interval", type=float, default=d.sample_interval)
    ap.add_argument("--warmup", type=float, default=d.warmup, help="fraction of the duration (default 0.10)")
    ap.add_argument("--max-memory-growth", type=float, default=d.max_memory_growth)
    ap.add_argument("--timeout", type=float, default=d.timeout, help="the milter's [milter] timeout (default 5)")
    ap.add_argument("--cache-size", type=int, help="the milter's verdict cache size (default: its own, 10,000)")
    ap.add_argument("--repeat-bodies", action="store_true",
                    help="send corpus bodies unchanged (cache hits after the first pass) instead of unique ones")
    ap.add_argument("--corpus", default=os.environ.get("ATLAS_CORPUS", str(DEFAULT_CORPUS)))
    ap.add_argument("--out", help="also write the JSON summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (milter log, Postfix maillog)")
    ap.add_argument("--prelude", default="", help="Python run in the milter process first (investigations)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (it runs a private Postfix)", file=sys.stderr)
        return 2
    if not (Path(args.corpus) / "index.csv").is_file():
        print(f"soak: no corpus at {args.corpus} (give --corpus DIR or set ATLAS_CORPUS)", file=sys.stderr)
        return 2
    opts = SoakOptions(duration=args.duration, clients=args.clients, rate=args.rate, load=args.load,
                       probe_seconds=args.probe_seconds, sample_interval=args.sample_interval, warmup=args.warmup,
                       max_memory_growth=args.max_memory_growth, timeout=args.timeout,
                       unique_bodies=not args.repeat_bodies, cache_size=args.cache_size)
    corpus, ham = load_test_split(Path(args.corpus))
    work = milter_workdir("atlas-soak-")
    http_port = free_port()
    lib_spec, pf_spec = unix_spec(work / "milter.sock")
    milter = MilterProcess(work, lib_spec, config_text=milter_config(opts, http_port), name="soak", prelude=args.prelude)
    pf = PostfixInstance(work / "postfix", milter=pf_spec, milter_default_action="tempfail", extra_config={
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "milter_protocol": "6",
    })
    try:
        milter.start()
        pf.start()
        wait_milter_active(pf, ham)
        pf.clear_mailbox()
        summary = soak(pf, milter, corpus, opts, http_port)
        rc = milter.stop()
        summary["milter_exit"] = rc
        summary["milter_tracebacks"] = milter.log().count("Traceback")
        summary["milter_stop_summary"] = milter.summary().get("timers_ms", {})
        if rc != 0:
            summary["failures"].append(f"milter exit code {rc}")
        if summary["milter_tracebacks"]:
            summary["failures"].append(f"{summary['milter_tracebacks']} traceback(s) in the milter log")
    finally:
        milter.stop()
        pf.stop()
        if args.keep:
            print(f"soak: work dir {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for line in summary["failures"]:
        print(f"soak: FAIL {line}", file=sys.stderr)
    print(f"soak: {'FAILED' if summary['failures'] else 'passed'}", file=sys.stderr)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
