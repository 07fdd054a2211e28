"""Helpers shared by the IMAP and backfill tests (corpus messages with unique Message-IDs,
folder contents by Message-ID, a config for the session Dovecot, stopping a listener).

The Dovecot fixture is session-wide: every test works in folders of its own (bf-<hex>,
Junk-<hex>) so tests never see each other's mail.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from atlas_milter.classifier import load_model
from atlas_milter.message import parse_message

_MSGID_RE = re.compile(rb"(?im)^message-id:.*(?:\r?\n[ \t].*)*\r?\n")


def with_message_id(raw: bytes, message_id: str) -> bytes:
    """`raw` without its mbox From_ line and old Message-ID, with `message_id` instead."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    raw = _MSGID_RE.sub(b"", raw, count=1)
    return b"Message-ID: " + message_id.encode() + b"\r\n" + raw


def corpus_messages(corpus_dir: Path, corpus_index: list[dict], n: int, tag: str, step: int = 5) -> list[tuple[str, str, bytes]]:
    """n (message_id, label, raw) from the shared corpus, ham and spam mixed in a fixed
    shuffled order, each with a unique Message-ID."""
    rows = corpus_index[::step][:n]
    if len(rows) < n:
        rows = (rows + corpus_index)[:n]
    rows = list(rows)
    random.Random(n).shuffle(rows)
    out = []
    for i, row in enumerate(rows):
        mid = f"<{tag}-{i}@atlas.test>"
        out.append((mid, row["label"], with_message_id((corpus_dir / row["path"]).read_bytes(), mid)))
    return out


def append_all(client, folder: str, raws: list[bytes], batch: int = 200) -> None:
    """MULTIAPPEND in batches (one round trip per batch)."""
    for i in range(0, len(raws), batch):
        client.multiappend(folder, raws[i : i + batch])


def folder_message_ids(client, folder: str) -> list[str]:
    """Message-IDs of every message in `folder` (duplicates kept), without setting \\Seen."""
    if not client.folder_exists(folder):
        return []
    client.select_folder(folder, readonly=True)
    uids = client.search(["ALL"])
    out: list[str] = []
    for i in range(0, len(uids), 500):
        data = client.fetch(uids[i : i + 500], [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        for item in data.values():
            header = next(v for k, v in item.items() if k.startswith(b"BODY[HEADER"))
            m = re.search(rb"(?i)message-id:\s*(<[^>]*>)", header)
            out.append(m.group(1).decode() if m else "")
    return out


def unique_names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:10]
    return tag, f"bf-{tag}", f"Junk-{tag}"


def imap_config_toml(dovecot, db: Path, junk: str, extra: str = "") -> str:
    return (
        f'log_level = "info"\n[store]\ndb = "{db}"\n[statsd]\nenabled = false\n'
        f'[imap]\nhost = "{dovecot.host}"\nport = {dovecot.port}\nsecurity = "plain"\n'
        f'user = "{dovecot.user}"\npassword_file = "{dovecot.password_file}"\njunk_folder = "{junk}"\n'
        f"{extra}"
    )


def db_rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


SAMPLE_DIR = Path(__file__).resolve().parents[2] / "atlas_milter" / "data" / "sample"


def stop_listener(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("listener did not stop on SIGTERM\n" + log.read_text()[-2000:])


def last_row(db: Path, mid: str):
    rows = db_rows(db, "SELECT verdict, action, score, uid FROM processed_emails WHERE message_id = ? ORDER BY id", (mid,))
    return rows[-1] if rows else None


def sample_message(name: str, mid: str) -> bytes:
    return with_message_id((SAMPLE_DIR / name).read_bytes(), mid)


def hammy_spam(corpus_dir: Path, corpus_index: list[dict]) -> bytes:
    """A corpus spam the shipped model scores between 0.2 and 0.95 (not already certain)."""
    model = load_model(None)
    for row in corpus_index:
        if row["label"] == "spam":
            raw = (corpus_dir / row["path"]).read_bytes()
            if 0.2 < model.score(parse_message(raw)).score < 0.95:
                return raw
    pytest.skip("no moderately scored spam in the corpus")
