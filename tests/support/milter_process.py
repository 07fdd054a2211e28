"""Run `atlas-milter milter` as a real subprocess for the tests and the bench scripts: its
socket spec for libmilter and Postfix, start and wait for its socket, stop it, read its log,
summary and RSS; its verdict rows; a private work directory Postfix can reach."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.servers import REPO_ROOT, tcp_port_listening, wait_until
from tests.support.smtp import new_token, send_one, with_token

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


def db_rows(proc: MilterProcess) -> list[dict]:
    con = sqlite3.connect(proc.db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM processed_emails WHERE source = 'milter'")]
    finally:
        con.close()


def milter_workdir(prefix: str) -> Path:
    """A fresh 0755 directory under /tmp for a milter's socket, config, log and database:
    Postfix's smtpd and cleanup (user postfix) must be able to reach the socket in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path
