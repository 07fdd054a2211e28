"""Owns talking IMAP (the one module that imports imapclient): connecting with TLS,
STARTTLS or plain (plain only to loopback unless forced), logging in with a password
from a file, ATLAS_IMAP_PASSWORD or the systemd credential `imap-password`, finding the
Junk folder, fetching without setting \\Seen, moving and flagging in bulk, and the IDLE
listener (`run_idle`) that classifies new mail and learns from the user's Junk moves.

Threads: `run_idle` runs one watcher thread per folder, each with its own connection; the
pipeline and the model are shared and used under one lock. The SQLite reads and the
learning-event insert use their own short-lived connections (WAL), never the store's.

Must not: decide what is spam (the pipeline does), put a password in argv, a log line or
the Config, or lose a message: a move is MOVE, or COPY then \\Deleted then UID EXPUNGE,
so a crash leaves the message in one folder or the other. It records a verdict before it
acts on it, so a crash between the two is repaired at the next start (`pending_moves`).
"""

from __future__ import annotations

import copy
from array import array
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import random
import re
import signal
import ssl
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from atlas_milter.classifier import learn, load_model, save_model
from atlas_milter.config import Config, ImapConfig
from atlas_milter.errors import AtlasError
from atlas_milter.message import fingerprint, parse_message
from atlas_milter.migrate import connect, connect_readonly, now_iso
from atlas_milter.notify import sd_notify
from atlas_milter.pool import ItemError
from atlas_milter.reload import RELOAD_SIGNAL, run_reload
from atlas_milter.verdict import HAM, SPAM, UNSURE

log = logging.getLogger(__name__)

PASSWORD_ENV = "ATLAS_IMAP_PASSWORD"
CREDENTIAL_NAME = "imap-password"  # systemd LoadCredential=imap-password:/path

KEYWORD_JUNK = "$Junk"
KEYWORD_NOT_JUNK = "$NotJunk"
FLAG_DELETED = "\\Deleted"

# The `action` column of processed_emails, as written by the IMAP side.
ACTION_MOVE = "move"  # spam moved to the Junk folder (and flagged $Junk)
ACTION_FLAG = "flag"  # keyword set, message left in place
ACTION_RECORD = "record"  # verdict recorded, nothing done
ACTION_NONE = "none"  # ham/unsure under the move or record policy
ACTION_DRY_RUN = "dry-run"
ACTION_LEARNED_HAM = "learned-ham"  # the user moved our spam out of Junk: learned as ham, left there
DRY_RUN_SUFFIX = " [dry-run]"  # dry runs record under "<folder> [dry-run]", so a real run redoes them

READ_BUFFER = 1 << 20  # bytes read from the server at a time (see ImapSession._big_read_buffer)
_UID_RE = re.compile(rb"\bUID (\d+)")
_LITERAL_RE = re.compile(rb"\{(\d+)\}\r?\n$")
SEARCH_WINDOW = 10000  # UIDs per SEARCH command (see ImapSession.uids)
MOVE_BATCH = 500  # UIDs per MOVE / STORE command
QUICK_EMPTY_LIMIT = 3  # idle_check returning nothing at once this often = the server closed the socket

IMAP_COMMAND_ERROR = IMAPClientError  # a command the server answered NO/BAD (for callers without imapclient)

# What a lost or broken connection raises; all of them mean "reconnect".
RECOVERABLE = (OSError, IMAPClientError, IMAPClientAbortError, EOFError)


class ConnectionLost(Exception):
    """The server said BYE or closed the connection."""


# --- connection settings (pure, unit-tested) --------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_connection_settings(imap: ImapConfig, force_plain: bool = False) -> None:
    """Refuse, with one line, what would connect badly: no host or user, or a password sent
    unencrypted to a server that is not on this machine."""
    if not imap.host:
        raise AtlasError("no IMAP server: give --host HOST (or [imap] host in the config file)")
    if not imap.user:
        raise AtlasError("no IMAP user: give --user NAME (or [imap] user in the config file)")
    if imap.security == "plain" and not force_plain and not is_loopback(imap.host):
        raise AtlasError(
            f"--plain would send the password unencrypted to {imap.host}: plain IMAP is allowed only to "
            "loopback; use --tls or --starttls, or add --force-plain if you really mean it"
        )
    if imap.security != "plain":
        tls_context(imap)  # a bad --ca-file is said at start, not at the first connection


def tls_context(imap: ImapConfig) -> ssl.SSLContext:
    """The context for --tls and --starttls: the system's trusted CAs plus those in [imap]
    ca_file (--ca-file), certificate and host name always verified."""
    context = ssl.create_default_context()
    if imap.ca_file:
        path = Path(imap.ca_file).expanduser()
        try:
            context.load_verify_locations(cafile=str(path))
        except OSError as exc:  # ssl.SSLError (not PEM, no certificate in it) is an OSError too
            reason = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else _one_line(exc)
            reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", reason)
            raise AtlasError(f"CA file {path} (--ca-file, [imap] ca_file): cannot load it ({reason}); give a readable PEM file holding the "
                             "CA certificate that signed the server's certificate (or the self-signed certificate itself)") from None
    return context


# OpenSSL verify codes (X509_V_ERR_*) for "issued by a CA you do not trust": fixed by --ca-file.
_UNTRUSTED_ISSUER = {2, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH


def tls_failure(imap: ImapConfig, exc: ssl.SSLError) -> str:
    """One line for a failed TLS handshake: what is wrong with the certificate and what to do."""
    where = f"{imap.host}:{resolve_port(imap)}"
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS with {where} failed: {_one_line(exc)} (is it a TLS port? try --starttls or --port)"
    reason = (exc.verify_message or _one_line(exc)).rstrip(".")
    if exc.verify_code in _NAME_MISMATCH:
        return (f"the TLS certificate of {where} is not valid for the name {imap.host!r} ({reason}): "
                "give --host the name the certificate was issued for")
    if exc.verify_code in _UNTRUSTED_ISSUER:
        if imap.ca_file:
            todo = f"--ca-file {imap.ca_file} does not hold the CA that signed it; give the right CA certificate"
        else:
            todo = ("if the server uses a private CA or a self-signed certificate, give that CA certificate "
                    "with --ca-file FILE ([imap] ca_file)")
        return f"the TLS certificate of {where} is not trusted ({reason}): {todo}"
    return f"the TLS certificate of {where} was rejected ({reason}): the server's certificate needs fixing"


def resolve_port(imap: ImapConfig) -> int:
    return imap.port or (993 if imap.security == "tls" else 143)


def read_password(
    imap: ImapConfig, account: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(password, where it came from). Order: the password file, ATLAS_IMAP_PASSWORD, the
    systemd credential (`imap-password-<account>`, then `imap-password`). A password file
    that every user can read is used, with a warning."""
    env = os.environ if env is None else env
    if imap.password_file:
        path = Path(imap.password_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AtlasError(f"password file {path}: {exc.strerror or exc}") from None
        if mode & stat.S_IROTH:
            log.warning("password file %s is readable by every user (mode %03o); run: chmod 600 %s",
                        path, stat.S_IMODE(mode), path)
        password = text.rstrip("\r\n")
        if not password:
            raise AtlasError(f"password file {path} is empty")
        return password, f"file {path}"
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV], f"environment {PASSWORD_ENV}"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        names = ([f"{CREDENTIAL_NAME}-{account}"] if account else []) + [CREDENTIAL_NAME]
        for name in names:
            path = Path(cred_dir) / name
            try:
                password = path.read_text(encoding="utf-8").rstrip("\r\n")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise AtlasError(f"systemd credential {path}: {exc.strerror or exc}") from None
            if password:
                return password, f"systemd credential {name}"
    raise AtlasError(
        f"no IMAP password: give --password-file FILE, set {PASSWORD_ENV}, "
        f"or pass the systemd credential {CREDENTIAL_NAME} (LoadCredential=)"
    )


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect number `attempt` (0-based): initial * 2**attempt, capped at
    `maximum`, then jittered to between half and all of it, so many listeners that lost the
    same server do not come back in lockstep."""
    base = min(maximum, initial * (2 ** min(attempt, 30)))
    return base * (0.5 + 0.5 * (rng or random).random())


def choose_folder(
    folders: Iterable[tuple[Sequence[bytes], Any, str]], special_use: bytes, configured: str
) -> tuple[str, bool]:
    """(name, exists) of the folder marked `special_use` (e.g. b"\\\\Junk") in a LIST
    answer, else of the configured name (matched case-insensitively for INBOX-like names)."""
    want = special_use.lower()
    names = []
    for flags, _delim, name in folders:
        if any(bytes(f).lower() == want for f in flags):
            return name, True
        names.append(name)
    if configured in names:
        return configured, True
    for name in names:
        if name.lower() == configured.lower():
            return name, True
    return configured, False


# --- the database: reads and learning events (own connections) ---------------------------

def _read(db: str, sql: str, params: tuple) -> list[tuple]:
    if not Path(db).exists():
        return []
    conn = connect_readonly(db)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def highest_uid(db: str, folder: str, uidvalidity: int) -> int | None:
    rows = _read(db, "SELECT max(uid) FROM processed_emails WHERE folder = ? AND uidvalidity = ?", (folder, uidvalidity))
    return rows[0][0] if rows and rows[0][0] is not None else None


def folder_mark(db: str, folder: str, uidvalidity: int) -> int | None:
    """The highest UID of `folder` the listener looked at in an earlier run (the Junk folder,
    whose arrivals are not recorded in processed_emails), or None."""
    rows = _read(db, "SELECT last_uid FROM imap_folder_marks WHERE folder = ? AND uidvalidity = ?", (folder, uidvalidity))
    return rows[0][0] if rows else None


def save_folder_mark(db: str, folder: str, uidvalidity: int, last_uid: int) -> None:
    conn = connect(db)
    try:
        with conn:
            conn.execute(
                "INSERT INTO imap_folder_marks (folder, uidvalidity, last_uid, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (folder, uidvalidity) DO UPDATE SET last_uid = max(last_uid, excluded.last_uid), "
                "updated_at = excluded.updated_at",
                (folder, uidvalidity, last_uid, now_iso()),
            )
    finally:
        conn.close()


def pending_moves(db: str, folder: str, uidvalidity: int) -> dict[int, str]:
    """{uid: Message-ID} recorded as moved to Junk from this mailbox: any still in it missed
    its move (or, on a server without MOVE, its EXPUNGE after the COPY)."""
    return {
        uid: mid or ""
        for uid, mid in _read(
            db,
            "SELECT uid, message_id FROM processed_emails WHERE folder = ? AND uidvalidity = ? AND action = ? "
            "AND uid IS NOT NULL",
            (folder, uidvalidity, ACTION_MOVE),
        )
    }


@dataclass(frozen=True)
class PriorRecord:
    verdict: str
    score: float
    action: str
    folder: str
    uid: int | None
    sender_domain: str


def last_record(db: str, message_id: str) -> PriorRecord | None:
    """Our latest real (not dry-run) verdict for this Message-ID."""
    rows = _read(
        db,
        "SELECT verdict, score, coalesce(action, ''), coalesce(folder, ''), uid, coalesce(sender_domain, '') "
        "FROM processed_emails WHERE message_id = ? AND coalesce(action, '') != ? ORDER BY id DESC LIMIT 1",
        (message_id, ACTION_DRY_RUN),
    )
    return PriorRecord(*rows[0]) if rows else None


def already_learned(db: str, message_id: str, label: str) -> bool:
    return bool(_read(db, "SELECT 1 FROM learning_events WHERE message_id = ? AND label = ? LIMIT 1", (message_id, label)))


def add_learning_event(db: str, event: Mapping[str, Any]) -> None:
    conn = connect(db)
    try:
        with conn:
            conn.execute(
                "INSERT INTO learning_events (created_at, source, message_id, sender_domain, label, "
                "previous_verdict, previous_score, folder, uid, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now_iso(), event.get("source", "imap"), event.get("message_id"), event.get("sender_domain"),
                 event["label"], event.get("previous_verdict"), event.get("previous_score"),
                 event.get("folder"), event.get("uid"), event.get("note")),
            )
    finally:
        conn.close()


def learned_model_path(config: Config) -> str:
    """The model file learning updates: [classifier] model, else [imap] learn_model, else
    `<db>.model.json.gz` (started from the shipped model)."""
    return config.classifier.model or config.imap.learn_model or f"{config.store.db}.model.json.gz"


def with_learned_model(config: Config) -> Config:
    """`config` using the model learning wrote, when [classifier] model is unset and that file exists."""
    if config.classifier.model:
        return config
    path = learned_model_path(config)
    if not Path(path).exists():
        return config
    return dataclasses.replace(config, classifier=dataclasses.replace(config.classifier, model=path))


# --- one connection ------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderState:
    name: str
    uidvalidity: int
    uidnext: int
    exists: int


class ImapSession:
    """One logged-in connection. Not thread-safe: one owner thread."""

    def __init__(self, imap: ImapConfig, password: str, force_plain: bool = False) -> None:
        check_connection_settings(imap, force_plain)
        self.imap = imap
        self._password = password
        self.client: IMAPClient | None = None
        self.selected: str | None = None
        self._junk: str | None = None
        self._keywords_ok = True
        self._uidnext = 0  # of the selected folder, when it was selected

    def __repr__(self) -> str:  # never shows the password
        return f"ImapSession({self.imap.user}@{self.imap.host}:{resolve_port(self.imap)})"

    def connect(self) -> "ImapSession":
        imap = self.imap
        context = tls_context(imap) if imap.security != "plain" else None
        client = IMAPClient(imap.host, port=resolve_port(imap), ssl=imap.security == "tls",
                            ssl_context=context if imap.security == "tls" else None, timeout=imap.timeout)
        try:
            if imap.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    raise AtlasError(f"IMAP server {imap.host}:{resolve_port(imap)} does not offer STARTTLS: use --tls "
                                     "with its TLS port (993 unless --port), or ask its admin to enable STARTTLS")
                client.starttls(context)
            client.login(imap.user, self._password)
        except BaseException:
            _quietly(client.shutdown)
            raise
        self.client = client
        self.selected = None
        log.debug("imap: logged in to %s:%d as %s (%s)", imap.host, resolve_port(imap), imap.user, imap.security)
        return self

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            _quietly(client.logout)
            _quietly(client.shutdown)

    def __enter__(self) -> "ImapSession":
        return self.connect() if self.client is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def c(self) -> IMAPClient:
        if self.client is None:
            raise ConnectionLost("not connected")
        return self.client

    def has(self, capability: str) -> bool:
        return self.c.has_capability(capability)

    def select(self, folder: str, readonly: bool = False) -> FolderState:
        info = self.c.select_folder(folder, readonly=readonly)
        self.selected = folder
        state = FolderState(folder, int(info.get(b"UIDVALIDITY", 0)), int(info.get(b"UIDNEXT", 0)), int(info.get(b"EXISTS", 0)))
        self._uidnext = state.uidnext
        return state

    def uids(self, since: dt.date | None = None, low: int | None = None) -> Sequence[int]:
        """UIDs in the selected folder (from `low` on, arrived `since`), ascending. Searched in
        windows of SEARCH_WINDOW UIDs: imapclient parses a SEARCH answer into many small
        objects, and one answer for a 50,000-message folder raised the peak memory by 10 MB."""
        first = max(1, low or 1)
        top = max(first, getattr(self, "_uidnext", 0) or 0)
        found = array("L")  # 4 bytes a UID: a 50,000-message folder costs 200 KB, not megabytes
        for start in range(first, top + 1, SEARCH_WINDOW):
            end = start + SEARCH_WINDOW - 1
            criteria: list[Any] = ["UID", f"{start}:{end}" if end < top else f"{start}:*"]
            if since is not None:
                criteria += ["SINCE", since]
            # Windows are disjoint and ascending, so sorting each window sorts the whole;
            # `n:*` always matches the last message, hence the filter.
            found.extend(sorted({u for u in self.c.search(criteria) if u >= start}))
        return found

    def fetch_raw(self, uids: Sequence[int]) -> dict[int, bytes]:
        """BODY.PEEK[] of `uids` in one round trip (never sets \\Seen); expunged ones are missing.

        Reads the answer straight off the connection (`_read_fetch`): every body comes as a
        literal and all we need from its line is the UID. imapclient's parser tokenises
        every line and imaplib matches several patterns and files each piece as an untagged
        response; together they cost more than scoring a cached message. An answer we do
        not recognise (a body sent as a quoted string or NIL) falls back to imapclient."""
        if not uids:
            return {}
        found = self._read_fetch(uids)
        if found is None:
            data = self.c.fetch(list(uids), [b"BODY.PEEK[]"])
            found = {uid: item[b"BODY[]"] for uid, item in data.items() if b"BODY[]" in item}
        return found

    def _read_fetch(self, uids: Sequence[int]) -> dict[int, bytes] | None:
        imap = self.c._imap  # the imaplib connection under imapclient
        if imap.state != "SELECTED":
            raise IMAPClientError(f"UID FETCH illegal in state {imap.state}")
        self._big_read_buffer(imap)
        tag = imap._new_tag()
        try:
            imap.send(b"%s UID FETCH %s (UID BODY.PEEK[])\r\n" % (tag, _uid_set(uids).encode()))
        except OSError as exc:
            raise IMAPClientAbortError(f"socket error: {exc}") from None
        try:
            return _read_fetch_answer(imap.file, tag, set(uids))
        except OSError as exc:
            raise IMAPClientAbortError(f"socket error: {exc}") from None
        finally:
            imap.tagged_commands.pop(tag, None)

    @staticmethod
    def _big_read_buffer(imap: Any) -> None:
        """Read the connection through a 1 MiB buffer instead of 8 KiB: a FETCH answer of a
        chunk is megabytes, and every small read gives up the GIL, which another busy thread
        of this process (scoring, the store writer) then holds for up to 5 ms. Swapped only
        when nothing is buffered or waiting, so no byte of the stream is lost."""
        old = getattr(imap, "file", None)
        sock = getattr(imap, "sock", None)
        if old is None or sock is None or getattr(imap, "_atlas_big_buffer", False):
            return
        imap._atlas_big_buffer = True
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0)
            try:
                pending = old.peek(1)
            except ssl.SSLWantReadError:  # TLS: no decrypted byte waiting either
                pending = b""
            except (OSError, ValueError):
                return
            finally:
                sock.settimeout(timeout)
            if pending:
                return
            imap.file = sock.makefile("rb", buffering=READ_BUFFER)
            old.close()  # releases its hold on the socket, not the socket
        except OSError:
            return

    def list_folders(self) -> list[tuple[Sequence[bytes], Any, str]]:
        return self.c.list_folders()

    def junk_folder(self) -> str:
        """The \\Junk folder, else the configured one, created when missing."""
        if self._junk is None:
            name, exists = choose_folder(self.list_folders(), b"\\Junk", self.imap.junk_folder)
            if not exists:
                try:
                    self.c.create_folder(name)
                    log.info("imap: created folder %s", name)
                except IMAPClientError as exc:
                    if "exist" not in str(exc).lower():  # a race with another client is fine
                        raise
            self._junk = name
        return self._junk

    def trash_folder(self) -> str:
        return choose_folder(self.list_folders(), b"\\Trash", self.imap.trash_folder)[0]

    def add_keywords(self, uids: Sequence[int], keywords: Sequence[str]) -> bool:
        if not uids or not self._keywords_ok:
            return False
        try:
            for part in _batches(uids, MOVE_BATCH):
                self.c.add_flags(part, list(keywords), silent=True)
            return True
        except IMAPClientError as exc:  # e.g. PERMANENTFLAGS without \*
            self._keywords_ok = False
            log.warning("imap: the server refused keywords %s (%s); not setting keywords any more", keywords, exc)
            return False

    def move(self, uids: Sequence[int], dest: str) -> None:
        """Move `uids` from the selected folder to `dest`, in bulk. MOVE when the server has
        it (atomic); else COPY, \\Deleted, UID EXPUNGE of just those UIDs (UIDPLUS) - the
        message is in one folder or both at every step, never in none."""
        if not uids:
            return
        use_move = self.has("MOVE")
        for part in _batches(sorted(uids), MOVE_BATCH):
            if use_move:
                self.c.move(part, dest)
                continue
            self.c.copy(part, dest)
            self.remove(part, f"copied to {dest}")

    def remove(self, uids: Sequence[int], why: str) -> None:
        """\\Deleted, then UID EXPUNGE of just `uids` from the selected folder (callers make
        sure a copy exists elsewhere). Without UIDPLUS they are only marked \\Deleted."""
        self.c.add_flags(list(uids), [FLAG_DELETED], silent=True)
        if self.has("UIDPLUS"):
            self.c.uid_expunge(list(uids))
        else:  # a plain EXPUNGE would also remove what the user marked deleted
            log.warning("imap: server lacks UIDPLUS: %d message(s) %s and marked \\Deleted, "
                        "left for the mail client to expunge", len(uids), why)

    def copies_in(self, folder: str, wanted: Mapping[int, str]) -> set[int]:
        """Those of `wanted` ({uid in the selected folder: Message-ID}) that already have a
        copy in `folder`: same Message-ID and same size. Re-selects the current folder after."""
        wanted = {uid: mid for uid, mid in wanted.items() if mid}
        if not wanted:
            return set()
        back = self.selected
        sizes = {uid: d.get(b"RFC822.SIZE") for uid, d in self.c.fetch(sorted(wanted), [b"RFC822.SIZE"]).items()}
        found: set[int] = set()
        try:
            self.select(folder, readonly=True)
            for mid in set(wanted.values()):
                there = self.c.search(["HEADER", "Message-ID", mid])
                if not there:
                    continue
                there_sizes = {d.get(b"RFC822.SIZE") for d in self.c.fetch(there, [b"RFC822.SIZE"]).values()}
                found |= {uid for uid, m in wanted.items() if m == mid and sizes.get(uid) in there_sizes}
        finally:
            if back is not None:
                self.select(back)
        return found

    def contains_message_id(self, folder: str, message_id: str) -> bool:
        """Is a message with this Message-ID in `folder`? Re-selects the current folder after."""
        back = self.selected
        try:
            self.select(folder, readonly=True)
            return bool(self.c.search(["HEADER", "Message-ID", message_id]))
        finally:
            if back is not None:
                self.select(back)


def _read_fetch_answer(file: Any, tag: bytes, wanted: set[int]) -> dict[int, bytes] | None:
    """Read lines up to the tagged completion of a `UID FETCH ... (UID BODY.PEEK[])`;
    {uid: body} of the wanted UIDs, or None (after reading the whole answer) when a body
    came in a form other than a literal. Untagged lines without a body (EXPUNGE, EXISTS,
    unsolicited FLAGS) are skipped: the caller re-reads folder state when it needs it."""
    out: dict[int, bytes] = {}
    odd = False
    done = tag + b" "
    while True:
        line = file.readline()
        if not line:
            raise IMAPClientAbortError("the server closed the connection during FETCH")
        if line.startswith(done):
            status = line[len(done):].split(b" ", 1)[0].upper()
            if status != b"OK":
                raise IMAPClientError(f"UID FETCH failed: {line.decode('utf-8', 'replace').strip()}")
            return None if odd else out
        if line.startswith(b"* BYE"):
            raise IMAPClientAbortError(line.decode("utf-8", "replace").strip())
        uid = None
        while True:  # one response: its line, and for each literal the literal and the rest of the line
            m = _LITERAL_RE.search(line)
            if m is None:
                if b"BODY[]" in line:
                    odd = True
                break
            size = int(m.group(1))
            body = file.read(size)
            if len(body) != size:
                raise IMAPClientAbortError("the server closed the connection during FETCH")
            head = line[: m.start()]
            if uid is None:
                u = _UID_RE.search(head)
                uid = int(u.group(1)) if u else None
            line = file.readline()
            if not line:
                raise IMAPClientAbortError("the server closed the connection during FETCH")
            if head.endswith(b"BODY[] ") or head.endswith(b"BODY[]"):
                if uid is None:
                    u = _UID_RE.search(line)  # "BODY[] {n} ... UID 5)"
                    uid = int(u.group(1)) if u else None
                if uid is None:
                    odd = True
                elif uid in wanted:
                    out[uid] = body


def _uid_set(uids: Sequence[int]) -> str:
    """A compact UID set: runs of consecutive UIDs as first:last."""
    ordered = sorted(set(uids))
    runs: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid != prev + 1:
            runs.append(str(start) if start == prev else f"{start}:{prev}")
            start = uid
        prev = uid
    runs.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(runs)


def _batches(items: Sequence[int], size: int) -> Iterable[list[int]]:
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass


def open_session(config: Config, account: str | None = None, force_plain: bool = False,
                 env: Mapping[str, str] | None = None) -> ImapSession:
    """A connected, logged-in session for `account` (or [imap]); one-line AtlasErrors for
    bad settings, a refused login or an unreachable server."""
    _quiet_imapclient_logs()
    imap = resolve_account(config, account)
    check_connection_settings(imap, force_plain)
    password, _where = read_password(imap, account, env)
    session = ImapSession(imap, password, force_plain)
    try:
        return session.connect()
    except Exception as exc:
        error = connect_failure(imap, exc)
        if error is None:
            raise
        raise error from None


def connect_failure(imap: ImapConfig, exc: BaseException) -> AtlasError | None:
    """The one-line error for a failed connect and login to `imap`, or None when `exc` is
    not such a failure (a bug: let it propagate)."""
    if isinstance(exc, AtlasError):
        return exc
    if isinstance(exc, LoginError):
        return AtlasError(f"IMAP login as {imap.user} on {imap.host} refused: {_one_line(exc)}")
    if isinstance(exc, ssl.SSLError):
        return AtlasError(tls_failure(imap, exc))
    if isinstance(exc, (OSError, IMAPClientError)):
        return AtlasError(f"cannot reach IMAP server {imap.host}:{resolve_port(imap)}: {_one_line(exc)}")
    return None


def resolve_account(config: Config, account: str | None) -> ImapConfig:
    # A config already resolved for an account has no account tables left.
    return config.imap.for_account(account) if account and config.imap.accounts else config.imap


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text.splitlines()[0]


# --- acting on verdicts (shared with backfill) ---------------------------------------------

def action_for(verdict: str, spam_action: str) -> str:
    if verdict == SPAM:
        return {"move": ACTION_MOVE, "flag": ACTION_FLAG, "record": ACTION_RECORD}[spam_action]
    if spam_action == "flag" and verdict == HAM:
        return ACTION_FLAG
    return ACTION_NONE


def apply_actions(session: ImapSession, actions: Mapping[int, tuple[str, str]]) -> None:
    """Carry out recorded actions for the selected folder: {uid: (action, verdict)}. Bulk:
    one STORE per keyword and one MOVE for the spam of the chunk."""
    to_move = sorted(u for u, (a, _) in actions.items() if a == ACTION_MOVE)
    junk_kw = sorted(u for u, (a, v) in actions.items() if a in (ACTION_MOVE, ACTION_FLAG) and v == SPAM)
    ham_kw = sorted(u for u, (a, v) in actions.items() if a == ACTION_FLAG and v == HAM)
    if junk_kw:
        session.add_keywords(junk_kw, [KEYWORD_JUNK])  # set before the move: it travels with the message
    if ham_kw:
        session.add_keywords(ham_kw, [KEYWORD_NOT_JUNK])
    if to_move:
        session.move(to_move, session.junk_folder())


def redo_pending_moves(session: ImapSession, db: str, state: FolderState) -> int:
    """Move what we recorded as moved but is still in the folder (a crash between the
    record and the move). UIDs are never reused within a UIDVALIDITY, so a message the user
    moved back has a new UID and is left alone."""
    recorded = pending_moves(db, state.name, state.uidvalidity)
    if not recorded:
        return 0
    present = sorted(set(session.uids()) & recorded.keys())
    if not present:
        return 0
    junk = session.junk_folder()
    # A crash between COPY and EXPUNGE (servers without MOVE) left a copy in Junk already:
    # remove the original instead of copying it a second time.
    copied = session.copies_in(junk, {uid: recorded[uid] for uid in present})
    if copied:
        log.info("imap: %s: removing %d spam already copied to %s before an interruption", state.name,
                 len(copied), junk)
        session.remove(sorted(copied), f"already in {junk}")
    rest = [uid for uid in present if uid not in copied]
    if rest:
        log.info("imap: %s: moving %d spam recorded as moved before an interruption", state.name, len(rest))
        session.add_keywords(rest, [KEYWORD_JUNK])
        session.move(rest, junk)
    return len(present)


# --- the IDLE listener -----------------------------------------------------------------------

class Listener:
    """Shared state of `run_idle`: the pipeline (under `lock`), the config, the stop event."""

    def __init__(self, config: Config, account: str | None, force_plain: bool, env: Mapping[str, str] | None = None) -> None:
        from atlas_milter.pipeline import Pipeline

        self.imap = resolve_account(config, account)
        config = with_learned_model(dataclasses.replace(config, imap=self.imap))
        check_connection_settings(self.imap, force_plain)
        self.config = config
        self.account = account
        self.force_plain = force_plain
        self.env = env
        self.password, self.password_source = read_password(self.imap, account, env)
        log.info("imap: password from %s", self.password_source)
        self.db = config.store.db
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.logged_in_once = threading.Event()
        # Refused logins after the start (password rotated, the server's auth down): shared
        # by every watcher, so the server sees one attempt per backoff delay, not one per folder.
        self.login_lock = threading.Lock()
        self.login_refusals = 0
        self.next_login = 0.0  # time.monotonic() before which nobody tries again
        self.rng = random.Random()
        self.pipeline = Pipeline(config)

    def new_session(self) -> ImapSession:
        """A logged-in session. After a refused login every watcher waits for the same
        backoff delay, and the password is read again from its source before each retry
        (the admin may have put the new one there). Raises LoginError while refused."""
        with self.login_lock:
            refused = self.login_refusals > 0
            if refused:
                return self._retry_login()
        try:
            return ImapSession(self.imap, self.password, self.force_plain).connect()
        except LoginError as exc:
            with self.login_lock:
                if self.login_refusals == 0:  # the other watchers' simultaneous failures count once
                    self._refused(exc)
            raise

    def _retry_login(self) -> ImapSession:
        """Under `login_lock`: wait out the shared delay, re-read the password, try once."""
        if self.stop.wait(max(0.0, self.next_login - time.monotonic())):
            raise ConnectionLost("stopping")
        try:
            self.password, self.password_source = read_password(self.imap, self.account, self.env)
            session = ImapSession(self.imap, self.password, self.force_plain).connect()
        except (LoginError, AtlasError) as exc:
            self._refused(exc)
            raise LoginError(str(exc)) from None
        log.warning("imap: login as %s on %s works again after %d refused attempt(s)", self.imap.user,
                    self.imap.host, self.login_refusals)
        self.login_refusals, self.next_login = 0, 0.0
        return session

    def _refused(self, exc: BaseException) -> None:
        imap = self.imap
        delay = backoff_delay(self.login_refusals, imap.reconnect_initial, imap.reconnect_max, self.rng)
        self.login_refusals += 1
        self.next_login = time.monotonic() + delay
        if self.password_source.startswith("file "):
            todo = f"put the new one in the {self.password_source} (read again before every attempt)"
        else:  # the environment and systemd credentials are fixed for the life of the process
            todo = f"update the {self.password_source} and restart the listener"
        log.error("imap: login as %s on %s refused (%s), attempt %d; trying again in %.1f s. If the password "
                  "changed, %s", imap.user, imap.host, _one_line(exc), self.login_refusals, delay, todo)

    def reload_model(self) -> bool:
        """SIGHUP or SIGUSR1: the model file again (a bad one keeps the current model;
        logged and counted like the milter's reloads, see atlas_milter/reload.py)."""
        return run_reload("imap", self._reload_model, self.pipeline.metrics)

    def _reload_model(self) -> str:
        path = learned_model_path(self.config)
        if not Path(path).exists():
            return f"no model file {path} yet; the current model {self.pipeline.model.version} stays"
        model = load_model(path)
        with self.lock:
            self.pipeline.reload_model(model)
        return f"model {model.version} from {path}"

    def learn(self, raw: bytes, is_spam: bool, prior: PriorRecord | None, folder: str, uid: int, message_id: str) -> float:
        """Update the model from one message the user labelled; save it atomically, switch
        the pipeline to it and record the event. Call with `lock` held."""
        label = SPAM if is_spam else HAM
        parsed = parse_message(raw, self.config.classifier.max_bytes)
        model = copy.deepcopy(self.pipeline.model)
        before = model.probability(model.margin(_features(parsed)))
        # Learn toward the cutoffs in force (the config may override the model's), so a
        # message learned as spam is then called spam here; the file keeps its own cutoffs.
        own = model.spam_cutoff, model.ham_cutoff
        model.spam_cutoff, model.ham_cutoff = self.pipeline.cutoffs.spam, self.pipeline.cutoffs.ham
        try:
            after = learn(model, parsed, is_spam)
        finally:
            model.spam_cutoff, model.ham_cutoff = own
        path = learned_model_path(self.config)
        save_model(model, path)
        self.pipeline.reload_model(model)
        add_learning_event(self.db, {
            "source": "imap", "message_id": message_id, "sender_domain": prior.sender_domain if prior else None,
            "label": label, "previous_verdict": prior.verdict if prior else None,
            "previous_score": prior.score if prior else None, "folder": folder, "uid": uid,
            "note": f"user moved it {'into' if is_spam else 'out of'} Junk; score {before:.3f} -> {after:.3f}; model {model.version}",
        })
        log.info("learned %s as %s (score %.3f -> %.3f); model %s saved to %s", message_id, label, before, after,
                 model.version, path)
        return after


def _features(parsed: Any) -> Any:
    from atlas_milter.classifier import features

    return features(parsed)


class FolderWatcher(threading.Thread):
    """Watches one folder with IDLE on its own connection; reconnects with backoff."""

    def __init__(self, listener: Listener, folder: str, junk_role: bool = False) -> None:
        super().__init__(name=f"imap-idle-{folder}", daemon=True)
        self.listener = listener
        self.folder = folder
        self.junk_role = junk_role  # watching Junk to learn from what the user puts there
        self.high: int | None = None  # highest UID handled (kept across reconnects)
        self.uidvalidity: int | None = None
        self.rng = random.Random()

    def run(self) -> None:
        lst = self.listener
        attempt = 0
        while not lst.stop.is_set():
            session: ImapSession | None = None
            try:
                session = lst.new_session()
                lst.logged_in_once.set()
                attempt = 0
                self.watch(session)
            except LoginError as exc:
                if not lst.logged_in_once.is_set():
                    lst.fatal = str(connect_failure(lst.imap, exc))
                    lst.stop.set()
                    return
                # Logged, and the next try delayed, by new_session for all watchers at once.
            # AtlasError: a CA file gone or STARTTLS withdrawn since the start: one warning line, retried.
            except (ConnectionLost, AtlasError, *RECOVERABLE) as exc:
                if lst.stop.is_set():
                    break
                self._wait(attempt, exc)
                attempt += 1
            except Exception as exc:  # a bug: keep the listener alive, but say so loudly
                log.exception("imap %s: unexpected error", self.folder)
                self._wait(attempt, exc)
                attempt += 1
            finally:
                if session is not None:
                    session.close()

    def _wait(self, attempt: int, exc: BaseException) -> None:
        imap = self.listener.imap
        delay = backoff_delay(attempt, imap.reconnect_initial, imap.reconnect_max, self.rng)
        log.warning("imap %s: connection lost or refused (%s); reconnecting in %.1f s", self.folder, _one_line(exc), delay)
        self.listener.stop.wait(delay)

    def watch(self, session: ImapSession) -> None:
        lst = self.listener
        imap = lst.imap
        state = session.select(self.folder)
        if not self.junk_role and imap.spam_action == "move":
            with lst.lock:
                lst.pipeline.flush()
            redo_pending_moves(session, lst.db, state)
            session.select(self.folder)
        self.catch_up(session, state)
        cycle = min(imap.keepalive, imap.idle_renew)
        while not lst.stop.is_set():
            session.c.idle()
            started = time.monotonic()
            news = False
            quick_empty = 0
            while not lst.stop.is_set() and time.monotonic() - started < cycle:
                t0 = time.monotonic()
                responses = session.c.idle_check(timeout=1.0)
                if not responses and time.monotonic() - t0 < 0.2:
                    quick_empty += 1  # readable but nothing parsed: the server closed the socket
                    if quick_empty >= QUICK_EMPTY_LIMIT:
                        raise ConnectionLost("connection closed by the server")
                    continue
                quick_empty = 0
                for resp in responses:
                    if resp and resp[0] == b"BYE":
                        raise ConnectionLost(f"server said BYE: {resp[1:]!r}")
                    if len(resp) >= 2 and resp[1] in (b"EXISTS", b"RECENT"):
                        news = True
                if news:
                    break
            # DONE and NOOP must both be answered within the timeout, else the link is dead.
            session.c.idle_done()
            if lst.stop.is_set():
                break
            session.c.noop()
            state = session.select(self.folder)
            self.catch_up(session, state)

    def catch_up(self, session: ImapSession, state: FolderState) -> None:
        """Handle every message above the highest UID handled (in memory or in the DB)."""
        lst = self.listener
        if self.uidvalidity != state.uidvalidity:
            if self.uidvalidity is not None:
                log.warning("imap %s: UIDVALIDITY changed (%s -> %s); starting over from new mail",
                            self.folder, self.uidvalidity, state.uidvalidity)
            self.uidvalidity, self.high = state.uidvalidity, None
        db_high = None
        if not self.junk_role:
            with lst.lock:
                lst.pipeline.flush()
            db_high = highest_uid(lst.db, self.folder, state.uidvalidity)
        if self.high is None:
            # First look at this folder (or a new UIDVALIDITY): earlier mail is backfill's
            # job, unless the DB says where we stopped last time.
            self.high = db_high if db_high is not None else state.uidnext - 1
        low = max(self.high, db_high or 0) + 1
        uids = session.uids(low=low)
        chunk_size = lst.config.performance.chunk_size
        for part in _batches(uids, chunk_size):
            raws = session.fetch_raw(part)
            items = [(uid, raws[uid]) for uid in part if uid in raws]
            if self.junk_role:
                self.handle_junk(session, items)
            else:
                self.handle_new(session, state, items)
            self.high = max(self.high, part[-1])
            if self.junk_role:  # learned from: not again after a restart
                save_folder_mark(lst.db, self.folder, state.uidvalidity, self.high)

    def handle_new(self, session: ImapSession, state: FolderState, items: list[tuple[int, bytes]]) -> None:
        lst = self.listener
        imap = lst.imap
        actions: dict[int, tuple[str, str]] = {}
        with lst.lock:
            results = lst.pipeline.process_batch([(str(uid), raw) for uid, raw in items])
            for (uid, raw), result in zip(items, results):
                if isinstance(result, ItemError):
                    log.error("imap %s: UID %d could not be classified: %s", self.folder, uid, result.error)
                    continue
                verdict = result.verdict.verdict
                action = action_for(verdict, imap.spam_action)
                mid = result.summary.message_id
                if imap.learn and mid and imap.spam_action == "move":
                    prior = last_record(lst.db, mid)
                    if (prior is not None and prior.action == ACTION_MOVE and prior.verdict == SPAM
                            and (prior.folder, prior.uid) != (self.folder, uid)
                            and self.folder != session.junk_folder()
                            and not session.contains_message_id(session.junk_folder(), mid)):
                        lst.learn(raw, False, prior, self.folder, uid, mid)
                        action = ACTION_LEARNED_HAM
                lst.pipeline.record(result, source="imap", action=action, folder=self.folder,
                                    uidvalidity=state.uidvalidity, uid=uid)
                actions[uid] = (action, verdict)
                log.info("imap %s: UID %d %s %.3f -> %s (%s)", self.folder, uid, verdict, result.verdict.score,
                         action, result.summary.subject[:60])
            lst.pipeline.flush()  # the record is durable before we act on it
        apply_actions(session, actions)

    def handle_junk(self, session: ImapSession, items: list[tuple[int, bytes]]) -> None:
        """New arrivals in Junk: the ones we did not move there and had not called spam
        were put there by the user - learn them as spam."""
        lst = self.listener
        for uid, raw in items:
            mid = fingerprint(raw, lst.config.classifier.max_bytes).message_id.strip()
            if not mid:
                continue
            prior = last_record(lst.db, mid)
            if prior is None:
                continue  # never scored by us (e.g. filed there by the server): not ours to judge
            if prior.action == ACTION_MOVE:
                continue  # we moved it
            if prior.verdict == SPAM and prior.action != ACTION_LEARNED_HAM:
                continue  # we already called it spam: nothing to learn
            if prior.verdict not in (HAM, UNSURE, SPAM) or already_learned(lst.db, mid, SPAM):
                continue
            with lst.lock:
                lst.learn(raw, True, prior, self.folder, uid, mid)


def run_idle(config: Config, account: str | None = None, force_plain: bool = False,
             env: Mapping[str, str] | None = None) -> int:
    """Watch the configured folders (and Junk, to learn) until SIGTERM/SIGINT; SIGHUP (or
    SIGUSR1, as for the milter) reloads the model file. Returns the exit status."""
    _quiet_imapclient_logs()
    listener = Listener(config, account, force_plain, env)
    imap = listener.imap
    # Fail fast on a wrong password or an unreachable server at start; later losses are retried.
    try:
        probe = listener.new_session()
    except Exception as exc:
        listener.pipeline.close()
        error = connect_failure(imap, exc)
        if error is None:
            raise
        raise error from None
    try:
        if not probe.has("IDLE"):
            raise AtlasError(f"IMAP server {imap.host} does not support IDLE")
        junk = probe.junk_folder() if imap.spam_action == "move" else None
        trash = probe.trash_folder()
        folders = list(dict.fromkeys(imap.folders))
        watchers = [FolderWatcher(listener, f) for f in folders if f not in (junk, trash)]
        if imap.learn and junk is not None:
            watchers.append(FolderWatcher(listener, junk, junk_role=True))
        for w in watchers:  # mail that arrives from now on is ours, even before the watcher connects
            try:
                state = probe.select(w.folder, readonly=True)
            except IMAPClientError as exc:
                raise AtlasError(f"IMAP folder {w.folder!r}: {_one_line(exc)}") from None
            # Where the last run stopped (catch up on what came meanwhile, including what the
            # user moved into Junk while we were stopped), else from now on.
            if w.junk_role:
                stored = folder_mark(listener.db, w.folder, state.uidvalidity)
            else:
                stored = highest_uid(listener.db, w.folder, state.uidvalidity)
            w.uidvalidity, w.high = state.uidvalidity, stored if stored is not None else state.uidnext - 1
            if w.junk_role and stored is None:
                save_folder_mark(listener.db, w.folder, state.uidvalidity, w.high)
    except BaseException:
        listener.pipeline.close()
        raise
    finally:
        probe.close()
    listener.logged_in_once.set()
    sd_notify("READY=1")  # systemd Type=notify: logged in, folders found

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("imap: signal %d, stopping", signum)
        listener.stop.set()

    previous = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_stop)
        for sig in (signal.SIGHUP, RELOAD_SIGNAL):
            previous[sig] = signal.signal(sig, lambda s, f: threading.Thread(target=listener.reload_model, daemon=True).start())
    log.info("imap: watching %s on %s as %s (spam: %s%s)", ", ".join(w.folder for w in watchers), imap.host,
             imap.user, imap.spam_action, f" to {junk}" if junk else "")
    try:
        for w in watchers:
            w.start()
        while not listener.stop.wait(0.5):
            pass
        for w in watchers:
            w.join(imap.timeout + 5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with listener.lock:
            listener.pipeline.close()
    if listener.fatal:
        raise AtlasError(listener.fatal)
    return 0


def _quiet_imapclient_logs() -> None:
    # imapclient logs every command and response at DEBUG: message bodies (and, were its
    # redaction ever to miss, a secret) must not reach our logs; at INFO it says "Connection
    # closed" for every reconnect, which our own lines already say.
    logging.getLogger("imapclient").setLevel(max(logging.WARNING, logging.getLogger("imapclient").level))
