"""Private, throw-away instances of the real servers the integration tests drive.

Nothing here imports pytest: the classes can be used from a script or a REPL as well
(``with PostfixInstance(dir) as pf: ...``).  Each instance lives entirely inside the
directory it is given, listens on 127.0.0.1 only, on a port picked at run time (bind
port 0) unless one is passed in, and leaves the system's own configuration alone.

Recipes and gotchas: shared/docs/infra-recipes.md (items 2, 5 and 6).

* ``PostfixInstance``  Postfix 3.7 configured with ``postfix -c DIR``, chroot off, virtual(8)
  delivery into a Maildir for user@example.test (uid/gid 65534), optional smtpd milter.
* ``DovecotInstance``  Dovecot 2.3 IMAP with its own base_dir/instance_name, one
  passwd-file user (user@example.test) whose password is also written to a file.
* ``StatsdInstance``   the npm ``statsd`` daemon (Etsy) with a long flush interval, read
  back through its admin TCP port.
* ``SendmailInstance`` Sendmail 8.17 run from the Debian packages extracted into
  ``.cache/sendmail/root`` (sendmail-bin conflicts with postfix, so it is never installed),
  with a private sendmail.cf built by m4, relaying everything to an smtp-sink.

Postfix, Dovecot and Sendmail must be started as root (their master processes drop privileges).
"""

from __future__ import annotations

import atexit
import contextlib
import imaplib
import json
import ipaddress
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator

LOCALHOST = "127.0.0.1"
MAIL_DOMAIN = "example.test"
MAIL_USER = "user@example.test"
VIRTUAL_UID = 65534  # nobody/nogroup: valid for virtual(8) (>= 100) and Dovecot (>= 500)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATSD_DIR = REPO_ROOT / ".cache" / "statsd"  # filled by scripts/bootstrap.sh --system
SENDMAIL_TREE = REPO_ROOT / ".cache" / "sendmail" / "root"  # likewise (dpkg-deb -x of sendmail-*)

# Debian puts the daemons in sbin, which a non-login PATH can lack.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ServerError(RuntimeError):
    """A private server failed to start, stop or answer; the message carries its log tail."""


# --------------------------------------------------------------------------- helpers


def find_binary(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def _binary(name: str) -> str:
    found = find_binary(name)
    if not found:
        raise ServerError(f"{name}: not installed (run scripts/bootstrap.sh --system)")
    return found


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that nothing is bound to right now (``kind`` is "tcp" or "udp")."""
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def tcp_port_open(port: int, host: str = LOCALHOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _proc_net_has(table: str, port: int, host: str, state: str | None) -> bool:
    want = "%s:%04X" % ("".join(f"{int(b):02X}" for b in reversed(host.split("."))), port)
    try:
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == want and (state is None or fields[3] == state):
            return True
    return False


def tcp_port_listening(port: int, host: str = LOCALHOST) -> bool:
    """True while a socket listens on ``host:port``/tcp (read from /proc/net/tcp; no connection made)."""
    return _proc_net_has("tcp", port, host, "0A")  # 0A = TCP_LISTEN


def udp_port_bound(port: int, host: str = LOCALHOST) -> bool:
    """True when some process has bound ``host:port``/udp (read from /proc/net/udp; no traffic sent)."""
    return _proc_net_has("udp", port, host, None)


def smtp_greets(host: str, port: int) -> bool:
    """An SMTP server on host:port greets and answers NOOP with 250."""
    if not tcp_port_listening(port, host):
        return False
    try:
        with smtplib.SMTP(host, port, timeout=5) as smtp:
            return smtp.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def pid_alive(pid: int) -> bool:
    """Like kill(pid, 0), but a zombie counts as dead (PID 1 here may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def log_tail(*paths: Path | None, lines: int = 40) -> str:
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        tail = text.splitlines()[-lines:]
        if tail:
            out.append(f"--- {path} (last {len(tail)} lines) ---")
            out.extend(tail)
    return "\n".join(out) if out else "(no log output)"


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    logs: tuple[Path | None, ...] = (),
    interval: float = 0.05,
) -> float:
    """Poll ``ready()`` until true; returns the seconds waited.

    Raises ServerError (with the log tail) on timeout, or as soon as ``proc`` exits.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if ready():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{what}: process exited with code {proc.returncode}\n{log_tail(*logs)}")
        if time.monotonic() > deadline:
            raise ServerError(f"{what}: not ready after {timeout:.0f}s\n{log_tail(*logs)}")
        time.sleep(interval)


def _prepare_base(tmpdir: Path) -> Path:
    """Create ``tmpdir`` and make it and its parents traversable.

    Postfix, Dovecot and virtual(8) run as unprivileged users (postfix, dovenull, 65534)
    that must reach their queue/run/mail directories inside it.  pytest's own tmp dirs
    (/tmp/pytest-of-root) are mode 0700, so pass a directory made with
    ``tempfile.mkdtemp()`` in /tmp instead.
    """
    tmpdir = Path(tmpdir).resolve()
    tmpdir.mkdir(parents=True, exist_ok=True)
    os.chmod(tmpdir, 0o755)
    for parent in tmpdir.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ServerError(
                f"{parent} is not world-traversable: private servers cannot reach {tmpdir}; "
                "use a directory under /tmp (tempfile.mkdtemp)"
            )
    return tmpdir


_live: "weakref.WeakSet[_Server]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # last resort, e.g. a script that forgot stop()
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


class _Server:
    """Common lifecycle: one Popen'd process in its own session, listening on some ports."""

    proc: subprocess.Popen | None = None
    name = "server"
    start_seconds: float | None = None

    def start(self, timeout: float = 30.0) -> "_Server":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _ports(self) -> list[tuple[str, int]]:
        """("tcp"|"udp", port) pairs this server binds."""
        return []

    def _process_groups(self) -> list[int]:
        """Process groups to SIGKILL if the server will not stop (besides our own child's)."""
        return []

    def _bound(self) -> list[str]:
        return [
            f"{LOCALHOST}:{port}/{kind}"
            for kind, port in self._ports()
            if (tcp_port_listening(port) if kind == "tcp" else udp_port_bound(port))
        ]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, argv: list[str], log: Path, cwd: Path | None = None) -> None:
        busy = self._bound()
        if busy:
            raise ServerError(f"{self.name}: {', '.join(busy)} already in use by another process")
        with open(log, "ab") as out:
            # Own session: a Ctrl-C aimed at pytest does not kill the server before its orderly stop,
            # and a server that will not stop can be killed with its whole process group.
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                start_new_session=True,
            )
        _live.add(self)

    def _launch(self, argv: list[str], log: Path, ready: Callable[[], bool], *, what: str,
                logs: tuple[Path | None, ...], timeout: float, cwd: Path | None = None,
                interval: float = 0.05, started: float | None = None) -> None:
        """Spawn the server and wait until ``ready()``; if it never is, stop it and raise
        ServerError with the log tails (and ``_diagnose()``). Sets ``start_seconds``, counted
        from ``started`` (default: now)."""
        t0 = time.monotonic() if started is None else started
        self._spawn(argv, log, cwd)
        try:
            wait_until(ready, timeout=timeout, what=what, proc=self.proc, logs=logs, interval=interval)
        except ServerError as exc:
            diag = self._diagnose()
            self.stop()
            raise ServerError(f"{exc}\n{diag}" if diag else str(exc)) from None
        self.start_seconds = time.monotonic() - t0

    def _diagnose(self) -> str:
        """More to say when the server did not come up, besides its log tails."""
        return ""

    def _reap(self, timeout: float, groups: list[int] | None = None) -> None:
        """Wait for our process to exit and for its ports to close (worker processes may outlive
        the master for a moment); SIGKILL the process groups if that takes longer than ``timeout``."""
        if self.proc is None:
            return
        groups = [self.proc.pid, *(groups or [])]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self._bound():
                break
            time.sleep(0.02)
        else:
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        _live.discard(self)


# --------------------------------------------------------------------------- Postfix


class PostfixInstance(_Server):
    """A private Postfix: SMTP on 127.0.0.1:``smtp_port``, Maildir delivery for user@example.test.

    ``milter`` is a Postfix milter spec (``inet:127.0.0.1:8894``, note the Postfix syntax,
    not libmilter's ``inet:8894@127.0.0.1``) or None.  ``mail_root`` defaults to
    ``tmpdir/mail``; point it at ``DovecotInstance.mail_root`` to have Dovecot serve what
    Postfix delivers (both use the ``<domain>/<user>`` layout and uid 65534).
    """

    name = "postfix"

    def __init__(
        self,
        tmpdir: Path | str,
        smtp_port: int | None = None,
        milter: str | None = None,
        milter_default_action: str = "tempfail",
        *,
        mail_root: Path | str | None = None,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self.base = _prepare_base(Path(tmpdir))
        self.smtp_port = smtp_port or free_port()
        self.milter = milter
        self.milter_default_action = milter_default_action
        self.conf_dir = self.base / "conf"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.mail_root = Path(mail_root) if mail_root else self.base / "mail"
        self.maillog_path = self.base / "maillog"
        self.stdout_path = self.base / "postfix.out"
        self.extra_config = dict(extra_config or {})
        self.user = MAIL_USER
        self.host = LOCALHOST
        self._configured = False

    # -- paths
    @property
    def maildir(self) -> Path:
        """The Maildir of user@example.test (``new/`` and ``cur/`` below it)."""
        local, domain = self.user.split("@")
        return self.mail_root / domain / local

    # -- configuration
    def _postconf(self, *args: str) -> None:
        self._run([_binary("postconf"), "-c", str(self.conf_dir), *args])
        self._age_config()

    def _age_config(self) -> None:
        """Backdate the config files by 2 s.  Postfix programs that read a file modified in the
        current second poll it every 0.3 s until it is older (about 1.8 s per reload/start)."""
        past = time.time() - 2
        for f in self.conf_dir.iterdir():
            os.utime(f, (past, past))

    def _run(self, argv: list[str], check: bool = True) -> int:
        # Output goes to a file, not a pipe: `postfix reload` leaves `postsuper &` running with our
        # stdout, and reading a pipe to EOF would wait ~2 s for it.
        with tempfile.TemporaryFile() as out:
            rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            out.seek(0)
            text = out.read().decode(errors="replace")
        if check and rc != 0:
            raise ServerError(
                f"{' '.join(argv)}: exit {rc}\n{text}\n"
                f"{self._diagnose()}\n{log_tail(self.maillog_path, self.stdout_path)}"
            )
        return rc

    def _diagnose(self) -> str:
        """Postfix prints errors only to a TTY (else to syslog, absent here): rerun check under script(1)."""
        script = find_binary("script")
        postfix = find_binary("postfix")
        if not (script and postfix):
            return ""
        res = subprocess.run(
            [script, "-qec", f"{postfix} -c {self.conf_dir} check", "/dev/null"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        )
        return f"postfix check (via script): exit {res.returncode}\n{res.stdout}{res.stderr}".strip()

    def configure(self) -> None:
        if self._configured:
            return
        for d in (self.conf_dir, self.queue_dir, self.data_dir, self.mail_root):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, user="postfix")
        os.chown(self.mail_root, VIRTUAL_UID, VIRTUAL_UID)
        shutil.copy("/etc/postfix/master.cf", self.conf_dir / "master.cf")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.base}",
            "myhostname": "mx.atlas.test",
            "mydomain": "atlas.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": LOCALHOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "no",
            "virtual_mailbox_domains": MAIL_DOMAIN,
            "virtual_mailbox_base": str(self.mail_root),
            "virtual_mailbox_maps": f"texthash:{self.conf_dir}/vmailbox",
            "virtual_uid_maps": f"static:{VIRTUAL_UID}",
            "virtual_gid_maps": f"static:{VIRTUAL_UID}",
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": "",
            "milter_default_action": self.milter_default_action,
            "milter_connect_timeout": "5s",
            # A dead SMTP client must not hold a test for Postfix's default 300 s.
            "smtpd_timeout": "30s",
            # Deliver at once; never sit in the deferred queue longer than a test.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        settings.update(self.extra_config)
        (self.conf_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        local, domain = self.user.split("@")
        (self.conf_dir / "vmailbox").write_text(f"{self.user} {domain}/{local}/\n")  # trailing / = Maildir
        addr = f"{LOCALHOST}:{self.smtp_port}"
        self._postconf("-M#", "smtp/inet")  # no port 25
        self._postconf("-M", f"{addr}/inet={addr} inet n - n - - smtpd")
        self._postconf("-F", "*/*/chroot = n")
        self._configured = True

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> "PostfixInstance":
        if self.running:
            return self
        self.configure()
        # start-fg keeps `postfix-script` (and under it master -s) as our child: no daemon to chase.
        self._launch([_binary("postfix"), "-c", str(self.conf_dir), "start-fg"], self.stdout_path, self._greets,
                     what=f"postfix on {LOCALHOST}:{self.smtp_port}", logs=(self.maillog_path, self.stdout_path),
                     timeout=timeout)
        return self

    def _ports(self) -> list[tuple[str, int]]:
        return [("tcp", self.smtp_port)]

    def _greets(self) -> bool:
        """Ready = smtpd answers 220 (master listens before any smtpd has started)."""
        return smtp_greets(self.host, self.smtp_port)

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        master = self._master_pid()  # master(8) calls setsid(): its workers are in its own group
        if self.proc.poll() is None:
            self._run([_binary("postfix"), "-c", str(self.conf_dir), "stop"], check=False)
        self._reap(timeout=15, groups=[master] if master else [])
        if master:
            wait_until(lambda: not pid_alive(master), timeout=10, what="postfix master exit")

    def reload(self, timeout: float = 10.0) -> None:
        """``postfix reload``, wait until the master logged it, then until the smtpd processes of the
        old configuration have exited: an idle one can still accept the next connection in the moment
        before it notices the reload, and would serve it with the old milter settings."""
        before = self.maillog().count("reload -- version")
        old_smtpd = self._smtpd_pids()
        self._run([_binary("postfix"), "-c", str(self.conf_dir), "reload"])
        wait_until(
            lambda: self.maillog().count("reload -- version") > before,
            timeout=timeout, what="postfix reload", proc=self.proc, logs=(self.maillog_path,),
        )
        wait_until(lambda: not any(pid_alive(pid) for pid in old_smtpd), timeout=timeout,
                   what="smtpd processes of the old configuration to exit", proc=self.proc)

    def _smtpd_pids(self) -> list[int]:
        """The master's smtpd children (from /proc: their parent and their command name)."""
        master = self._master_pid()
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            name, _, rest = text[text.index("(") + 1:].rpartition(")")
            if name == "smtpd" and int(rest.split()[1]) == master:
                pids.append(int(stat.parent.name))
        return pids

    def postconf(self, **settings: str) -> None:
        """Edit main.cf (``postconf -e``); call reload() afterwards when running."""
        self._postconf("-e", *(f"{k}={v}" for k, v in settings.items()))

    def set_milter(self, spec: str | None, default_action: str | None = None) -> None:
        """Point smtpd_milters at ``spec`` (Postfix syntax, e.g. ``inet:127.0.0.1:8894``; None = no milter)."""
        self.milter = spec
        settings = {"smtpd_milters": spec or ""}
        if default_action:
            self.milter_default_action = default_action
            settings["milter_default_action"] = default_action
        self.postconf(**settings)
        if self.running:
            self.reload()

    @contextlib.contextmanager
    def milter_set(self, spec: str | None, default_action: str | None = None) -> Iterator["PostfixInstance"]:
        """Use ``spec`` inside the block, then restore the previous milter settings."""
        old_spec, old_action = self.milter, self.milter_default_action
        self.set_milter(spec, default_action)
        try:
            yield self
        finally:
            self.set_milter(old_spec, old_action)

    # -- observation
    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mailbox_messages(self) -> list[Path]:
        """Delivered message files of user@example.test (Maildir new/ and cur/), oldest first."""
        files = [p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def wait_for_message(
        self, needle: str | bytes | None = None, timeout: float = 15.0, *, count: int = 1
    ) -> list[Path]:
        """Wait until ``count`` delivered messages contain ``needle`` (any message when None); returns them."""
        if isinstance(needle, str):
            needle = needle.encode()
        found: list[Path] = []

        def ready() -> bool:
            nonlocal found
            found = [p for p in self.mailbox_messages() if needle is None or needle in p.read_bytes()]
            return len(found) >= count

        wait_until(ready, timeout=timeout, what=f"delivery of {needle!r} to {self.maildir}",
                   proc=self.proc, logs=(self.maillog_path,))
        return found

    def clear_mailbox(self) -> None:
        for p in self.mailbox_messages():
            p.unlink(missing_ok=True)

    def held_ids(self) -> set[str]:
        """Queue ids in the hold queue (postqueue -j)."""
        out = subprocess.run([_binary("postqueue"), "-c", str(self.conf_dir), "-j"], capture_output=True, text=True,
                             timeout=30)
        return {item["queue_id"] for item in map(json.loads, out.stdout.splitlines()) if item["queue_name"] == "hold"}

    def delete_held(self) -> None:
        """Delete whatever is on hold (a test that quarantines leaves the session's Postfix as it found it)."""
        for queue_id in self.held_ids():
            subprocess.run([_binary("postsuper"), "-c", str(self.conf_dir), "-d", queue_id, "hold"], capture_output=True)


# --------------------------------------------------------------------------- Dovecot


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def make_test_certificates(directory: Path, names: tuple[str, ...] = ("localhost", LOCALHOST)) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate it signed for ``names`` (DNS names and IP
    addresses, as subjectAltName; the first is also the CN), made with the openssl CLI.
    Returns (ca.pem, server.pem, server.key); valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    sans = ",".join(f"{'IP' if _is_ip(n) else 'DNS'}:{n}" for n in names)
    ext.write_text(f"subjectAltName = {sans}\nbasicConstraints = critical, CA:FALSE\n"
                   "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
                   "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")
    openssl = _binary("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=atlas-milter test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={names[0]}"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", ext, "-out", cert],
    ):
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise ServerError(f"openssl {cmd[1]} failed: {done.stderr.strip()[-500:]}")
    os.chmod(key, 0o600)
    os.chmod(ca_key, 0o600)
    return ca, cert, key


class DovecotInstance(_Server):
    """A private Dovecot IMAP server on 127.0.0.1:``port`` with one user, user@example.test.

    The password is random; it is in ``password`` and in the file ``password_file``.
    Mail lives in ``mail_root/<domain>/<user>`` (Maildir), owned by uid 65534.

    With ``tls=True`` it also speaks TLS: STARTTLS on ``port`` and implicit TLS (imaps) on
    ``imaps_port``, with a server certificate for ``tls_names`` signed by a throw-away CA made
    at start (``ca_file``, the file a client passes as --ca-file). Plain LOGIN stays allowed.
    """

    name = "dovecot"

    def __init__(self, tmpdir: Path | str, port: int | None = None, *, password: str | None = None,
                 extra_conf: str = "", tls: bool = False,
                 tls_names: tuple[str, ...] = ("localhost", LOCALHOST),
                 extra_users: dict[str, str] | None = None) -> None:
        self.base = _prepare_base(Path(tmpdir))
        self.extra_users = dict(extra_users or {})  # more logins: {"name@example.test": password}
        self.extra_conf = extra_conf  # appended to dovecot.conf, e.g. an imap_capability without MOVE
        self.port = port or free_port()
        self.tls = tls
        self.tls_names = tls_names
        self.imaps_port = free_port() if tls else 0
        self.ca_file = self.base / "tls" / "ca.pem"
        self.host = LOCALHOST
        self.user = MAIL_USER
        self.password = password or secrets.token_urlsafe(12)
        self.conf_path = self.base / "dovecot.conf"
        self.run_dir = self.base / "run"
        self.mail_root = self.base / "mail"
        self.users_path = self.base / "users"
        self.password_file = self.base / "password"
        self.log_path = self.base / "dovecot.log"
        self.stdout_path = self.base / "dovecot.out"
        self.instance_name = f"atlas-dovecot-{self.port}"
        self._configured = False

    @property
    def maildir(self) -> Path:
        """Maildir of user@example.test (INBOX; other folders are ``.Name`` subdirectories)."""
        local, domain = self.user.split("@")
        return self.mail_root / domain / local

    def configure(self) -> None:
        if self._configured:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_root, VIRTUAL_UID, VIRTUAL_UID)
        users = {self.user: self.password, **self.extra_users}
        self.users_path.write_text("".join(f"{name}:{{PLAIN}}{pw}\n" for name, pw in users.items()))
        self.password_file.write_text(self.password + "\n")
        os.chmod(self.password_file, 0o600)
        if self.tls:
            _ca, cert, key = make_test_certificates(self.base / "tls", self.tls_names)
            ssl_conf = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
        else:
            ssl_conf = "ssl = no"
        self.conf_path.write_text(f"""\
protocols = imap
listen = {LOCALHOST}
base_dir = {self.run_dir}
instance_name = {self.instance_name}
log_path = {self.log_path}
{ssl_conf}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
# No stats process: its handshake timeout otherwise slows every shutdown by 3-5 s.
stats_writer_socket_path =
mail_location = maildir:{self.mail_root}/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_path}
}}
userdb {{
  driver = static
  args = uid={VIRTUAL_UID} gid={VIRTUAL_UID} home={self.mail_root}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {LOCALHOST}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {LOCALHOST}
    port = {self.imaps_port}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
{self.extra_conf}""")
        self._configured = True

    def start(self, timeout: float = 30.0) -> "DovecotInstance":
        if self.running:
            return self
        self.configure()
        self._launch([_binary("dovecot"), "-F", "-c", str(self.conf_path)], self.stdout_path, self._login_works,
                     what=f"dovecot on {LOCALHOST}:{self.port}", logs=(self.log_path, self.stdout_path),
                     timeout=timeout, interval=0.1)
        return self

    def _ports(self) -> list[tuple[str, int]]:
        return [("tcp", self.port)] + ([("tcp", self.imaps_port)] if self.tls else [])

    def stop(self) -> None:
        if self.proc is None:
            return
        group = self.proc.pid  # dovecot -F runs in the session _spawn gave it, with its imap workers
        if self.proc.poll() is None:
            # doveadm stop signals master.pid and then polls kill(pid, 0) until it fails.  The master
            # is our child, so it stays a zombie (still "alive" to kill(0)) until we reap it: run
            # doveadm alongside our own wait, or it would always sit out its 3 s timeout.
            doveadm = subprocess.Popen(
                [_binary("doveadm"), "-c", str(self.conf_path), "stop"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )
            self._reap(timeout=15)
            try:
                doveadm.wait(10)
            except subprocess.TimeoutExpired:
                doveadm.kill()
                doveadm.wait()
        self._reap(timeout=15)
        # Stopped means no client connection lives on either: once (under load in CI) an imap
        # worker outlived its master and kept serving an IDLE session for 15 s and more.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)

    def _login_works(self) -> bool:
        """Ready = a full IMAP LOGIN succeeds (the port opens before auth and imap workers are up)."""
        if not tcp_port_listening(self.port) or (self.tls and not tcp_port_listening(self.imaps_port)):
            return False
        try:
            with imaplib.IMAP4(self.host, self.port, timeout=5) as imap:
                imap.login(self.user, self.password)
                imap.logout()
            return True
        except (OSError, imaplib.IMAP4.error):
            return False

    def restart(self, timeout: float = 30.0) -> "DovecotInstance":
        self.stop()
        return self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self, login: bool = True, timeout: float = 10.0, user: str | None = None):
        """An ``imapclient.IMAPClient`` connected (and by default logged in) as user@example.test,
        or as `user`, one of ``extra_users``."""
        from imapclient import IMAPClient

        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=timeout)
        if login:
            c.login(user or self.user, self.extra_users[user] if user else self.password)
        return c

    def set_uidvalidity(self, user: str, mailbox: str, uidvalidity: int) -> None:
        """Give `mailbox` of `user` this UIDVALIDITY (doveadm mailbox update), e.g. to make two
        users' INBOXes look alike to a client."""
        subprocess.run([_binary("doveadm"), "-c", str(self.conf_path), "mailbox", "update", "-u", user,
                        "--uid-validity", str(uidvalidity), mailbox], check=True, capture_output=True, timeout=30)


# --------------------------------------------------------------------------- StatsD


# util.inspect output of the admin port, e.g. "{ 'atlas.x': [ 5, 7.5 ], foo: 3 }".
_INSPECT_ENTRY = re.compile(
    r"""(?:'(?P<sq>(?:[^'\\]|\\.)*)'|"(?P<dq>(?:[^"\\]|\\.)*)"|(?P<id>[A-Za-z_$][\w$]*))"""
    r"""\s*:\s*(?P<value>\[[^\]]*\]|[-+\w.]+)"""
)
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|-?Infinity|NaN")
_MORE_ITEMS = re.compile(r"\.\.\. (\d+) more items?")


def _inspect_number(text: str) -> float:
    return float(text.replace("Infinity", "inf"))


def _inspect_entries(reply: str) -> Iterator[tuple[str, str]]:
    for m in _INSPECT_ENTRY.finditer(reply):
        key = next(g for g in (m.group("sq"), m.group("dq"), m.group("id")) if g is not None)
        yield re.sub(r"\\(.)", r"\1", key), m.group("value")


def parse_inspect(reply: str) -> dict[str, object]:
    """Parse a flat Node util.inspect object of numbers or number arrays into a dict.

    Arrays become lists of floats.  Node prints at most 100 array items and then
    ``... N more items``; such lists are truncated (see StatsdInstance.timer_counts()).
    """
    result: dict[str, object] = {}
    for key, value in _inspect_entries(reply):
        if value.startswith("["):
            result[key] = [_inspect_number(n) for n in _NUMBER.findall(_MORE_ITEMS.sub("", value))]
        elif _NUMBER.fullmatch(value):
            result[key] = _inspect_number(value)
    return result


class StatsdInstance(_Server):
    """The npm ``statsd`` daemon: metrics on UDP ``udp_port``, admin commands on TCP ``mgmt_port``.

    The flush interval is 24 h, so timers and counters stay readable for a whole test
    session (statsd clears them at each flush).  ``stats_js`` defaults to the copy that
    ``scripts/bootstrap.sh --system`` installs in ``.cache/statsd``.
    """

    name = "statsd"

    def __init__(
        self,
        tmpdir: Path | str,
        udp_port: int | None = None,
        mgmt_port: int | None = None,
        *,
        stats_js: Path | str | None = None,
        flush_interval_ms: int = 24 * 3600 * 1000,
    ) -> None:
        self.base = Path(tmpdir).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.host = LOCALHOST
        self.udp_port = udp_port or free_port("udp")
        self.mgmt_port = mgmt_port or free_port("tcp")
        self.stats_js = Path(stats_js) if stats_js else statsd_js_path()
        self.flush_interval_ms = flush_interval_ms
        self.config_path = self.base / "config.js"
        self.log_path = self.base / "statsd.log"

    def start(self, timeout: float = 30.0) -> "StatsdInstance":
        if self.running:
            return self
        if not self.stats_js.is_file():
            raise ServerError(f"statsd not installed at {self.stats_js} (run scripts/bootstrap.sh --system)")
        self.config_path.write_text(
            "{\n"
            f'  address: "{LOCALHOST}", port: {self.udp_port},\n'
            f'  mgmt_address: "{LOCALHOST}", mgmt_port: {self.mgmt_port},\n'
            '  backends: ["./backends/console"],\n'
            f"  flushInterval: {self.flush_interval_ms}, dumpMessages: true, deleteIdleStats: false\n"
            "}\n"
        )
        # cwd = the statsd package, so "./backends/console" resolves.
        self._launch([_binary("node"), str(self.stats_js), str(self.config_path)], self.log_path,
                     lambda: tcp_port_open(self.mgmt_port) and udp_port_bound(self.udp_port),
                     what=f"statsd on {LOCALHOST}:{self.udp_port}/udp+{self.mgmt_port}/tcp", logs=(self.log_path,),
                     timeout=timeout, cwd=self.stats_js.parent)
        return self

    def _ports(self) -> list[tuple[str, int]]:
        return [("udp", self.udp_port), ("tcp", self.mgmt_port)]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # statsd flushes once more and exits (about 1 s)
        self._reap(timeout=10)

    # -- admin port
    def admin(self, command: str, timeout: float = 5.0) -> str:
        """Send one admin command and return its reply up to (not including) the END line."""
        with socket.create_connection((LOCALHOST, self.mgmt_port), timeout=timeout) as s:
            s.sendall(command.encode() + b"\n")
            buf = b""
            while not re.search(rb"(^|\n)END\r?\n", buf):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        text = buf.decode(errors="replace")
        return re.split(r"(?:^|\n)END\r?\n", text, maxsplit=1)[0]

    def timers(self) -> dict[str, list[float]]:
        """{name: [sample, ...]} for every timer received since the last flush."""
        return parse_inspect(self.admin("timers"))  # type: ignore[return-value]

    def counters(self) -> dict[str, float]:
        """{name: value}; includes statsd's own statsd.bad_lines_seen / statsd.packets_received."""
        return parse_inspect(self.admin("counters"))  # type: ignore[return-value]

    def gauges(self) -> dict[str, float]:
        return parse_inspect(self.admin("gauges"))  # type: ignore[return-value]

    def timer_counts(self) -> dict[str, int]:
        """Number of samples per timer, exact even past Node's 100-item display limit."""
        counts: dict[str, int] = {}
        for key, value in _inspect_entries(self.admin("timers")):
            if value.startswith("["):
                more = sum(int(n) for n in _MORE_ITEMS.findall(value))
                counts[key] = len(_NUMBER.findall(_MORE_ITEMS.sub("", value))) + more
        return counts

    def delete(self, kind: str, *names: str) -> None:
        """Forget metrics: ``kind`` is "timers", "counters" or "gauges"."""
        if names:
            self.admin(f"del{kind} {' '.join(names)}")

    def send(self, *lines: str) -> None:
        """Send raw StatsD lines (``name:value|type``) over UDP, one datagram each."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for line in lines:
                s.sendto(line.encode(), (LOCALHOST, self.udp_port))

    def wait_for(self, kind: str, name: str, timeout: float = 5.0):
        """Wait until metric ``name`` shows up in timers()/counters()/gauges(); returns its value."""
        reader = getattr(self, kind)
        box: dict = {}

        def ready() -> bool:
            box.update(reader())
            return name in box

        wait_until(ready, timeout=timeout, what=f"statsd {kind} {name!r}", proc=self.proc, logs=(self.log_path,))
        return box[name]


def statsd_js_path() -> Path:
    """Where stats.js is: $ATLAS_STATSD_JS, else <repo>/.cache/statsd/node_modules/statsd/stats.js."""
    env = os.environ.get("ATLAS_STATSD_JS")
    return Path(env) if env else STATSD_DIR / "node_modules" / "statsd" / "stats.js"


# --------------------------------------------------------------------------- Sendmail


def sendmail_tree() -> Path:
    """Root of the extracted sendmail-bin/-base/-cf packages: $ATLAS_SENDMAIL_TREE, else .cache/sendmail/root."""
    env = os.environ.get("ATLAS_SENDMAIL_TREE")
    return Path(env) if env else SENDMAIL_TREE


def sendmail_missing(tree: Path | None = None) -> str | None:
    """Why a SendmailInstance cannot run here (None when it can)."""
    tree = tree or sendmail_tree()
    if not (tree / SendmailInstance.BINARY).is_file() or not (tree / SendmailInstance.CF_DIR / "m4/cf.m4").is_file():
        return f"sendmail is not extracted in {tree} (run: bash scripts/bootstrap.sh --system)"
    for name in ("m4", "unshare", "smtp-sink"):
        if not find_binary(name):
            return f"{name} is not installed (run: bash scripts/bootstrap.sh --system)"
    return None


def private_tmpdir(prefix: str) -> Path:
    """A fresh 0755 directory whose whole path is writable by root only.

    Sendmail refuses a milter socket, queue or config below a group- or world-writable
    directory such as /tmp ("local socket name ... unsafe: World writable directory"),
    so its instances live under /run (or the repo's .cache when /run will not do).
    """
    for parent in (Path("/run"), REPO_ROOT / ".cache"):
        try:
            parent.mkdir(parents=True, exist_ok=True)
            chain = [parent, *parent.parents]
            if all(os.stat(d).st_uid == 0 and not os.stat(d).st_mode & 0o022 for d in chain):
                path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
                os.chmod(path, 0o755)
                return path
        except OSError:
            continue
    raise ServerError("no root-owned, non-group/world-writable directory for a private sendmail (tried /run, .cache)")


class SendmailInstance(_Server):
    """A private Sendmail: SMTP on 127.0.0.1:``smtp_port``; every message is relayed to an
    smtp-sink on 127.0.0.1:``sink_port`` that writes one file per message into ``sink_dir``.

    ``milter_mc`` is m4 text added to the .mc (the INPUT_MAIL_FILTER lines of
    conf/sendmail.mc, say).  The binary, the cf macros and the helpfile come from the
    extracted Debian packages (``tree``); m4 is the system one.  Sendmail runs in its own
    UTS namespace with the host name mx.atlas.test: on a host whose name has no dot it
    otherwise sleeps 60 s at every start ("My unqualified host name ... sleeping for retry").
    Nothing goes to syslog (there is none here): ``traffic_log`` has the SMTP transcripts
    (-X) and ``debug_log`` the milter conversation (-d64.5); ``log_tail`` shows both.
    ``tmpdir`` must be root-owned all the way up: use ``private_tmpdir()``.
    """

    name = "sendmail"
    BINARY = "usr/libexec/sendmail/sendmail"
    CF_DIR = "usr/share/sendmail/cf"
    HOSTNAME = "mx.atlas.test"

    def __init__(
        self,
        tmpdir: Path | str,
        smtp_port: int | None = None,
        *,
        milter_mc: str = "",
        sink_port: int | None = None,
        tree: Path | str | None = None,
    ) -> None:
        self.base = _prepare_base(Path(tmpdir))
        self.tree = Path(tree) if tree else sendmail_tree()
        self.binary = self.tree / self.BINARY
        self.smtp_port = smtp_port or free_port()
        self.sink_port = sink_port or free_port()
        self.milter_mc = milter_mc
        self.host = LOCALHOST
        self.mc_path = self.base / "sendmail.mc"
        self.cf_path = self.base / "sendmail.cf"
        self.queue_dir = self.base / "queue"
        self.sink_dir = self.base / "sink"
        self.traffic_log = self.base / "traffic.log"
        self.debug_log = self.base / "debug.log"
        self.stdout_path = self.base / "sendmail.out"
        self.sink_log = self.base / "smtp-sink.log"
        self.sink_proc: subprocess.Popen | None = None
        self._configured = False

    # -- configuration
    def mc_text(self) -> str:
        b = self.base
        return f"""\
divert(-1)
Private atlas-milter test instance (tests/support/servers.py SendmailInstance); built with
m4 -D_CF_DIR_={self.tree / self.CF_DIR}/ cf.m4 sendmail.mc > sendmail.cf
divert(0)dnl
VERSIONID(`atlas-milter test instance')dnl
OSTYPE(`linux')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`accept_unresolvable_domains')dnl
define(`confDOMAIN_NAME', `{self.HOSTNAME}')dnl
define(`QUEUE_DIR', `{self.queue_dir}')dnl
define(`STATUS_FILE', `{b}/statistics')dnl
define(`confPID_FILE', `{b}/sendmail.pid')dnl
define(`ALIAS_FILE', `{b}/aliases')dnl
define(`HELP_FILE', `{self.tree}/etc/mail/helpfile')dnl
define(`confSERVICE_SWITCH_FILE', `{b}/service.switch')dnl
define(`confHOSTS_FILE', `{b}/hosts')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0s')dnl
define(`confDEF_USER_ID', `{VIRTUAL_UID}:{VIRTUAL_UID}')dnl
dnl a busy shared machine must not make it queue or refuse (defaults: 8 and 12 per CPU)
define(`confQUEUE_LA', `1000')dnl
define(`confREFUSE_LA', `1000')dnl
define(`confMILTER_LOG_LEVEL', `9')dnl
dnl everything goes to the smtp-sink
define(`SMART_HOST', `esmtp:[{LOCALHOST}]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {self.sink_port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {self.sink_port}')dnl
DAEMON_OPTIONS(`Port={self.smtp_port}, Addr={LOCALHOST}, Name=MTA')dnl
{self.milter_mc.rstrip()}
MAILER(`local')dnl
MAILER(`smtp')dnl
"""

    def configure(self) -> None:
        if self._configured:
            return
        self.queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sink_dir.mkdir(exist_ok=True)
        shutil.chown(self.sink_dir, user="postfix")  # smtp-sink -u postfix writes here
        (self.base / "aliases").write_text("")
        (self.base / "statistics").write_text("")
        (self.base / "service.switch").write_text("hosts files\naliases files\n")
        (self.base / "hosts").write_text(f"{LOCALHOST} localhost {self.HOSTNAME}\n")
        self.mc_path.write_text(self.mc_text())
        cf_dir = self.tree / self.CF_DIR
        res = subprocess.run(
            [_binary("m4"), f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"), str(self.mc_path)],
            capture_output=True, stdin=subprocess.DEVNULL, timeout=60,
        )
        if res.returncode != 0 or res.stderr.strip():
            raise ServerError(f"m4 {self.mc_path}: exit {res.returncode}\n{res.stderr.decode(errors='replace')}")
        self.cf_path.write_bytes(res.stdout)
        self._configured = True

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> "SendmailInstance":
        if self.running:
            return self
        if not self.binary.is_file():
            raise ServerError(f"sendmail not extracted at {self.binary} (run scripts/bootstrap.sh --system)")
        self.configure()
        t0 = time.monotonic()
        self._start_sink(timeout)
        daemon = [str(self.binary), "-C", str(self.cf_path), "-bD", "-X", str(self.traffic_log),
                  "-D", str(self.debug_log), "-d64.5"]
        # exec: the Popen'd pid is sendmail itself, in its own UTS namespace and our new session.
        script = f"hostname {self.HOSTNAME} && exec " + " ".join(shlex.quote(a) for a in daemon)
        self._launch([_binary("unshare"), "--uts", "sh", "-c", script], self.stdout_path, self._greets,
                     what=f"sendmail on {LOCALHOST}:{self.smtp_port}", logs=self._logs(), timeout=timeout,
                     started=t0)
        return self

    def _start_sink(self, timeout: float) -> None:
        if tcp_port_listening(self.sink_port):
            raise ServerError(f"smtp-sink: {LOCALHOST}:{self.sink_port} already in use by another process")
        with open(self.sink_log, "ab") as out:
            self.sink_proc = subprocess.Popen(
                [_binary("smtp-sink"), "-u", "postfix", "-d", f"{self.sink_dir}/msg.",
                 f"{LOCALHOST}:{self.sink_port}", "50"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        wait_until(lambda: tcp_port_listening(self.sink_port), timeout=timeout,
                   what=f"smtp-sink on {LOCALHOST}:{self.sink_port}", proc=self.sink_proc, logs=(self.sink_log,))

    def _logs(self) -> tuple[Path, ...]:
        return (self.stdout_path, self.debug_log, self.traffic_log, self.sink_log)

    def _ports(self) -> list[tuple[str, int]]:
        return [("tcp", self.smtp_port)]

    def _greets(self) -> bool:
        return smtp_greets(self.host, self.smtp_port)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # the daemon passes it on to its SMTP children
            self._reap(timeout=10)
        if self.sink_proc is not None:
            if self.sink_proc.poll() is None:
                self.sink_proc.send_signal(signal.SIGTERM)
            try:
                self.sink_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.sink_proc.kill()
                self.sink_proc.wait(5)
            self.sink_proc = None

    # -- observation
    def log_tail(self, lines: int = 40) -> str:
        return log_tail(*self._logs(), lines=lines)

    def sendmail_cmd(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run the extracted sendmail with the private config, e.g. ``sendmail_cmd("-bp", "-qQ")``
        (= ``mailq -qQ``, the quarantined messages).  It runs in a UTS namespace like the daemon."""
        argv = [str(self.binary), "-C", str(self.cf_path), *args]
        script = f"hostname {self.HOSTNAME} && exec " + " ".join(shlex.quote(a) for a in argv)
        return subprocess.run([_binary("unshare"), "--uts", "sh", "-c", script], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def sink_messages(self) -> list[Path]:
        """Files smtp-sink wrote, one per relayed message, oldest first."""
        files = [p for p in self.sink_dir.glob("msg.*") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def queued(self) -> list[Path]:
        """Queue control files still in the queue: qf = waiting, hf = quarantined (held)."""
        return sorted(p for p in self.queue_dir.iterdir() if p.name[:2] in ("qf", "hf"))


# --------------------------------------------------------------------------- Redis


class RedisInstance(_Server):
    """Debian's ``redis-server`` on 127.0.0.1:``port``, its data in ``tmpdir``. With ``aof``
    every write is in the append-only file before the reply (appendfsync always), so a
    killed server restarts with everything it acknowledged. ``sentinel_of`` (host, port)
    runs it as a Sentinel watching that primary under the name ``service`` instead."""

    name = "redis"

    def __init__(self, tmpdir: Path | str, port: int | None = None, *, aof: bool = True,
                 replica_of: tuple[str, int] | None = None, sentinel_of: tuple[str, int] | None = None,
                 service: str = "atlas", cluster: bool = False) -> None:
        self.base = Path(tmpdir).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.host = LOCALHOST
        self.port = port or free_port()
        self.aof = aof
        self.replica_of = replica_of
        self.sentinel_of = sentinel_of
        self.service = service
        self.cluster = cluster
        self.log_path = self.base / f"redis-{self.port}.log"
        self.url = f"redis://{LOCALHOST}:{self.port}/0"

    def _conf(self) -> Path:
        lines = [f"port {self.port}", f"bind {LOCALHOST}", f"dir {self.base}", "daemonize no", "protected-mode no",
                 f"logfile {self.log_path}"]
        if self.sentinel_of:
            host, port = self.sentinel_of
            lines += [f"sentinel monitor {self.service} {host} {port} 2",
                      f"sentinel down-after-milliseconds {self.service} 1000",
                      f"sentinel failover-timeout {self.service} 3000",
                      f"sentinel parallel-syncs {self.service} 1"]
        else:
            lines += ['save ""', f"dbfilename dump-{self.port}.rdb", "repl-diskless-sync-delay 0"]
            if self.aof:
                lines += ["appendonly yes", "appendfsync always", f"appenddirname aof-{self.port}"]
            if self.replica_of:
                lines.append(f"replicaof {self.replica_of[0]} {self.replica_of[1]}")
            if self.cluster:
                lines += ["cluster-enabled yes", f"cluster-config-file nodes-{self.port}.conf", "cluster-node-timeout 2000"]
        conf = self.base / f"redis-{self.port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 30.0) -> "RedisInstance":
        if self.running:
            return self
        argv = [_binary("redis-server"), str(self._conf())]
        if self.sentinel_of:
            argv.append("--sentinel")
        self._launch(argv, self.log_path, self._answers, what=f"redis on {LOCALHOST}:{self.port}",
                     logs=(self.log_path,), timeout=timeout)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _ports(self) -> list[tuple[str, int]]:
        return [("tcp", self.port)]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen server must be able to stop
            self.proc.send_signal(signal.SIGTERM)
        self._reap(timeout=10)

    def kill(self) -> None:
        """SIGKILL: gone at once, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self._reap(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the port stays open and every call hangs (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def _cluster_port() -> int:
    """A free port for a Redis Cluster node: at most 55535, with its bus port (+10000) free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOCALHOST, port))
                b.bind((LOCALHOST, port + 10000))
            return port
        except OSError:
            continue
    raise ServerError("no free port pair for a Redis Cluster node")


def start_redis_cluster(tmpdir: Path | str, nodes: int = 3) -> list[RedisInstance]:
    """A Redis Cluster of `nodes` primaries (no replicas) on loopback, every slot covered:
    `redis-cli --cluster create`, then wait until every node says cluster_state:ok."""
    servers = [RedisInstance(tmpdir, _cluster_port(), cluster=True).start() for _ in range(nodes)]
    try:
        subprocess.run([_binary("redis-cli"), "--cluster", "create", *[f"{LOCALHOST}:{s.port}" for s in servers],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)

        def ready() -> bool:
            for server in servers:
                out = subprocess.run([_binary("redis-cli"), "-p", str(server.port), "cluster", "info"],
                                     capture_output=True, text=True, timeout=10).stdout
                if "cluster_state:ok" not in out:
                    return False
            return True

        wait_until(ready, timeout=30, what="the Redis Cluster ok on every node")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


# --------------------------------------------------------------------------- PostgreSQL


def pg_rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """The rows of `sql` on the PostgreSQL at `url`; [] while its table does not exist yet."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (initdb, postgres, pg_ctl) of Debian's newest installed version."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(found[-1]) if found else None


class PostgresInstance(_Server):
    """A private PostgreSQL on 127.0.0.1:``port``: its cluster in ``tmpdir`` owned by the
    postgres user (PostgreSQL refuses to run as root), trust authentication on loopback,
    database ``postgres``. ``stop()`` is a fast shutdown; ``kill()`` a SIGKILL."""

    name = "postgresql"

    def __init__(self, tmpdir: Path | str, port: int | None = None) -> None:
        self.base = Path(tmpdir).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base, user="postgres", group="postgres")
        self.data = self.base / "data"
        self.port = port or free_port()
        self.log_path = self.base / "postgres.log"
        self.url = f"postgresql://postgres@{LOCALHOST}:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> list[str]:
        return [_binary("runuser"), "-u", "postgres", "--", *argv]

    def start(self, timeout: float = 60.0) -> "PostgresInstance":
        if self.running:
            return self
        if not (self.data / "PG_VERSION").exists():
            initdb = postgres_bin("initdb")
            if initdb is None:
                raise ServerError("PostgreSQL is not installed (apt-get install postgresql)")
            subprocess.run(self._as_postgres(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                             "--no-sync", "-E", "UTF8"),
                           check=True, capture_output=True, timeout=120)
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(f"listen_addresses = '{LOCALHOST}'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.base}'\nfsync = off\nmax_connections = 40\n")
        self._launch(self._as_postgres(postgres_bin("postgres") or "postgres", "-D", str(self.data)), self.log_path,
                     lambda: tcp_port_open(self.port), what=f"postgresql on {LOCALHOST}:{self.port}",
                     logs=(self.log_path,), timeout=timeout)
        wait_until(self._accepts, timeout=timeout, what="postgresql accepting queries", proc=self.proc,
                   logs=(self.log_path,))
        return self

    def _accepts(self) -> bool:
        ready = postgres_bin("pg_isready")
        return ready is not None and subprocess.run([ready, "-h", LOCALHOST, "-p", str(self.port)],
                                                    capture_output=True).returncode == 0

    def _ports(self) -> list[tuple[str, int]]:
        return [("tcp", self.port)]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # runuser passes the signal on; SIGINT is PostgreSQL's fast shutdown
            os.killpg(self.proc.pid, signal.SIGINT)
        self._reap(timeout=30)

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self._reap(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP every PostgreSQL process: a hung server that still holds its connections
        open. Each backend is a process group of its own (PostgreSQL calls setsid), so they
        are found as the server's descendants."""
        self._signal_all(signal.SIGSTOP, self._processes()[1:])  # not runuser: it stops itself when its child stops

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT, self._processes())

    @staticmethod
    def _signal_all(signum: int, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # a backend that ended since it was listed

    def _processes(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile
        found = [self.proc.pid]
        for pid in found:  # grows while walking: children, grandchildren, ...
            found.extend(child for child, parent in parents.items() if parent == pid)
        return found
