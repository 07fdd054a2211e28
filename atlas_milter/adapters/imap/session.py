"""Owns one logged-in IMAP connection (`ImapSession`): selecting, searching UIDs in
windows, fetching without setting \\Seen, finding the Junk and Trash folders, keywords,
and moving in bulk; and `open_session`, which reads the password and connects for an
account with one-line errors.

Threads: a session is not thread-safe; it has one owner thread at a time.

Must not: decide what is spam, touch the database, or lose a message: a move is MOVE, or
COPY then \\Deleted then UID EXPUNGE, so a crash leaves the message in one folder or the
other.
"""

from __future__ import annotations

import datetime as dt
import logging
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from atlas_milter.adapters.imap.connection import (
    ConnectionLost,
    check_connection_settings,
    connect_failure,
    quiet_imapclient_logs,
    quietly,
    read_password,
    resolve_account,
    resolve_port,
    tls_context,
)
from atlas_milter.adapters.imap.fetch import read_fetch
from atlas_milter.config import Config, ImapConfig
from atlas_milter.errors import AtlasError

log = logging.getLogger("atlas_milter.adapters.imap")

FLAG_DELETED = "\\Deleted"
SEARCH_WINDOW = 10000  # UIDs per SEARCH command (see ImapSession.uids)
MOVE_BATCH = 500  # UIDs per MOVE / STORE command


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


def batches(items: Sequence[int], size: int) -> Iterable[list[int]]:
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i : i + size]


def open_session(config: Config, account: str | None = None, force_plain: bool = False,
                 env: Mapping[str, str] | None = None) -> ImapSession:
    """A connected, logged-in session for `account` (or [imap]); one-line AtlasErrors for
    bad settings, a refused login or an unreachable server."""
    quiet_imapclient_logs()
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
            quietly(client.shutdown)
            raise
        self.client = client
        self.selected = None
        log.debug("imap: logged in to %s:%d as %s (%s)", imap.host, resolve_port(imap), imap.user, imap.security)
        return self

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            quietly(client.logout)
            quietly(client.shutdown)

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

        Reads the answer straight off the connection (`fetch.read_fetch`, much cheaper than
        imapclient's parser). An answer it does not recognise (a body sent as a quoted
        string or NIL) falls back to imapclient."""
        if not uids:
            return {}
        found = read_fetch(self.c._imap, uids)  # the imaplib connection under imapclient
        if found is None:
            data = self.c.fetch(list(uids), [b"BODY.PEEK[]"])
            found = {uid: item[b"BODY[]"] for uid, item in data.items() if b"BODY[]" in item}
        return found

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
            for part in batches(uids, MOVE_BATCH):
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
        for part in batches(sorted(uids), MOVE_BATCH):
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

