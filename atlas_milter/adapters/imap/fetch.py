"""Owns reading the answer to `UID FETCH ... (UID BODY.PEEK[])` straight off the
connection: every body comes as a literal and all we need from its line is the UID.
imapclient's parser tokenises every line and imaplib matches several patterns and files
each piece as an untagged response; together they cost more than scoring a cached message.

Must not: interpret anything but the bodies and their UIDs (folder state is re-read by the
caller), or lose a byte of the stream: an answer it does not recognise is read to its end
and reported as None, so the caller can ask imapclient instead.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Sequence

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

READ_BUFFER = 1 << 20  # bytes read from the server at a time (see big_read_buffer)
_UID_RE = re.compile(rb"\bUID (\d+)")
_LITERAL_RE = re.compile(rb"\{(\d+)\}\r?\n$")


def read_fetch(imap: Any, uids: Sequence[int]) -> dict[int, bytes] | None:
    """Send `UID FETCH uids (UID BODY.PEEK[])` on the imaplib connection under imapclient
    and read its answer with `read_fetch_answer` (None: ask imapclient instead)."""
    if imap.state != "SELECTED":
        raise IMAPClientError(f"UID FETCH illegal in state {imap.state}")
    big_read_buffer(imap)
    tag = imap._new_tag()
    try:
        imap.send(b"%s UID FETCH %s (UID BODY.PEEK[])\r\n" % (tag, uid_set(uids).encode()))
    except OSError as exc:
        raise IMAPClientAbortError(f"socket error: {exc}") from None
    try:
        return read_fetch_answer(imap.file, tag, set(uids))
    except OSError as exc:
        raise IMAPClientAbortError(f"socket error: {exc}") from None
    finally:
        imap.tagged_commands.pop(tag, None)


def big_read_buffer(imap: Any) -> None:
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


def read_fetch_answer(file: Any, tag: bytes, wanted: set[int]) -> dict[int, bytes] | None:
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


def uid_set(uids: Sequence[int]) -> str:
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

