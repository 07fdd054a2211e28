"""Helpers for the milter tests and scripts/milter_bench.py (no tests in this module):
run `atlas-milter milter` as a real subprocess, wait for its socket, stop it, read its
log and its RSS; load shared-corpus messages; send mail over SMTP with a unique token."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import free_port, tcp_port_listening, wait_until  # noqa: E402

TOKEN_HEADER = "X-Test-Token"  # not X-Atlas-*: the milter removes those as forged
_SUMMARY_RE = re.compile(r"atlas-milter stopped: (\{.*\})")


def inet_spec(port: int) -> tuple[str, str]:
    """(libmilter spec, Postfix spec) for a loopback TCP port."""
    return f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"


def unix_spec(path: Path | str) -> tuple[str, str]:
    return f"unix:{path}", f"unix:{path}"


class MilterProcess:
    """`python -m atlas_milter milter ...` in its own session, logging to a file.

    `prelude` is Python run before the CLI in the same process (tests use it to make the
    classifier slow or failing without any test hook in the product code)."""

    def __init__(self, workdir: Path, socket_spec: str, *, config_text: str = "", db: Path | None = None,
                 prelude: str = "", env: dict | None = None, name: str = "milter") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_spec = socket_spec
        self.db = Path(db) if db else self.workdir / f"{name}.db"
        self.config_path = self.workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / f"{name}.log"
        self.prelude = prelude
        self.env = env
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        args = ["milter", "--socket", self.socket_spec, "--db", str(self.db), "--config", str(self.config_path),
                "--log-level", "info"]
        if self.prelude:
            code = self.prelude + "\nimport sys\nfrom atlas_milter.cli import main\nsys.exit(main(sys.argv[1:]))\n"
            return [sys.executable, "-c", code, *args]
        return [sys.executable, "-m", "atlas_milter", *args]

    def start(self, timeout: float = 30.0) -> "MilterProcess":
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", str(REPO_ROOT))
        env.update(self.env or {})
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=env, start_new_session=True)
        wait_until(self.ready, timeout=timeout, what=f"milter on {self.socket_spec}", proc=self.proc,
                   logs=(self.log_path,), interval=0.02)
        return self

    def ready(self) -> bool:
        kind, _, rest = self.socket_spec.partition(":")
        if kind == "unix":
            if not os.path.exists(rest):
                return False
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(rest)
                return "listening on" in self.log()
            except OSError:
                return False
        port = int(rest.partition("@")[0])
        return tcp_port_listening(port) and "listening on" in self.log()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    stop_signal = signal.SIGUSR2  # as systemd stops it; SIGTERM waits up to 5 s for libmilter's listener

    def stop(self, timeout: float = 20.0) -> int:
        """Send stop_signal and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self) -> dict:
        """The JSON the milter logs when it stops: {"timers_ms": {...}, "counters": {...}}."""
        found = _SUMMARY_RE.findall(self.log())
        return json.loads(found[-1]) if found else {}

    def cpu_seconds(self) -> float:
        """User + system CPU time the milter process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        """Resident memory of the milter process (kB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def __enter__(self) -> "MilterProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------- corpus and SMTP


def read_index(corpus_dir: Path, split: str | None = None) -> list[dict]:
    """The rows of the corpus's index.csv (of `split` when given), ordered by content hash:
    ham and spam mixed, in the same order on every run."""
    with open(Path(corpus_dir) / "index.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split]
    rows.sort(key=lambda r: r["path"].rsplit("/", 1)[-1].split(".")[-1])
    return rows


def load_corpus(corpus_dir: Path, rows: Iterable[dict]) -> list[tuple[dict, bytes]]:
    """(row, raw bytes) with any mbox "From " line removed (it is not a header)."""
    out = []
    for row in rows:
        raw = (Path(corpus_dir) / row["path"]).read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
        out.append((row, raw))
    return out


def pick(rows: list[dict], split: str, n_ham: int, n_spam: int) -> list[dict]:
    """A deterministic mix: every k-th message of each label in `split`."""
    out = []
    for label, n in (("ham", n_ham), ("spam", n_spam)):
        cand = [r for r in rows if r["split"] == split and r["label"] == label]
        step = max(1, len(cand) // max(n, 1))
        out.extend(cand[::step][:n])
    return out


def with_token(raw: bytes, token: str) -> bytes:
    """The message with a first header carrying a unique token (to find it after delivery)."""
    eol = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    return f"{TOKEN_HEADER}: {token}".encode() + eol + raw


def new_token() -> str:
    return uuid.uuid4().hex


def send_one(host: str, port: int, raw: bytes, rcpts: list[str], sender: str = "sender@remote.test",
             timeout: float = 60.0) -> tuple[int, str]:
    """One SMTP session, one message. Returns (code, text) of the final reply: 250 when
    accepted, the milter's 5xx/4xx when refused at end of data or earlier."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            refused = smtp.sendmail(sender, rcpts, raw)
            if refused:
                code, text = next(iter(refused.values()))
                return code, text.decode(errors="replace")
            return 250, "ok"
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode(errors="replace")
    except smtplib.SMTPSenderRefused as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")


def wait_milter_active(postfix, raw: bytes, timeout: float = 20.0) -> None:
    """After `postfix.milter_set(...)`: smtpd processes started before the reload may take
    one more connection without the milter. Send probes until one comes back tagged."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rb"^X-Atlas-Verdict: ", re.M)
    while time.monotonic() < deadline:
        tok = new_token()
        code, _ = send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])
        if code == 250:
            for path in postfix.wait_for_message(tok, timeout=15):
                if pattern.search(path.read_bytes().split(b"\n\n", 1)[0]):
                    return
        time.sleep(0.1)
    raise AssertionError("milter never became active in Postfix")


def wait_queue_empty(queue_dir: Path, timeout: float = 120.0, interval: float = 0.1) -> None:
    """Wait until Postfix has no message left in incoming/active/deferred/maildrop/hold."""
    def empty() -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = Path(queue_dir) / sub
            if d.is_dir() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True

    wait_until(empty, timeout=timeout, what="postfix queue to drain", interval=interval)


def delivered_by_token(postfix, tokens: set[str], timeout=60.0) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    pattern = re.compile(rb"^" + TOKEN_HEADER.encode() + rb": ([0-9a-f]{32})", re.M)
    while time.monotonic() < deadline:
        for path in postfix.mailbox_messages():
            data = path.read_bytes()
            m = pattern.search(data)
            if m and m.group(1).decode() in tokens:
                tok = m.group(1).decode()
                assert tok not in found or found[tok] == data, f"message {tok} delivered twice"
                found[tok] = data
        if len(found) == len(tokens):
            break
        time.sleep(0.2)
    return found


def db_rows(proc: MilterProcess) -> list[dict]:
    con = sqlite3.connect(proc.db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM processed_emails WHERE source = 'milter'")]
    finally:
        con.close()


def header(data: bytes, name: str) -> list[str]:
    head = data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    return [m.decode().strip() for m in re.findall(rb"^" + name.encode() + rb": (.*)$", head, re.M | re.I)]


def accepted_and_refused(replies: dict[str, tuple[int, str]]) -> tuple[set[str], set[str]]:
    """Tokens answered 250 and tokens refused with 550 + a reference id; any other answer
    (a tempfail, a surprise) fails the test."""
    codes: dict[int, int] = {}
    for code, _ in replies.values():
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {250, 550}, codes  # nothing tempfailed, nothing odd
    accepted = {tok for tok, (code, _) in replies.items() if code == 250}
    refused = {tok for tok, (code, _) in replies.items() if code == 550}
    assert all(re.search(r"ref [0-9A-F]{10}", replies[t][1]) for t in refused)
    return accepted, refused


def milter_workdir(prefix: str) -> Path:
    """A fresh 0755 directory under /tmp for a milter's socket, config, log and database:
    Postfix's smtpd and cleanup (user postfix) must be able to reach the socket in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


__all__ = [
    "MilterProcess", "free_port", "inet_spec", "unix_spec", "load_corpus", "pick", "with_token", "new_token",
    "send_one", "wait_queue_empty", "wait_milter_active", "TOKEN_HEADER",
    "delivered_by_token", "db_rows", "header", "accepted_and_refused", "milter_workdir", "read_index",
]
