"""Mail through a real MTA in the tests and the bench scripts: a unique token header to find a
message after delivery, one SMTP session per message, waiting for Postfix's queue to drain
and for delivery, reading headers, and sorting replies into accepted and refused."""

from __future__ import annotations

import re
import smtplib
import time
import uuid
from pathlib import Path

from tests.support.servers import wait_until

TOKEN_HEADER = "X-Test-Token"  # not X-Atlas-*: the milter removes those as forged


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
