"""Owns `atlas-milter backfill`: classifying mail that is already in a mailbox - IMAP
folders, a Maildir or an mbox - through the pipeline's streaming path, resumably.

Every message is keyed by (account, folder, UIDVALIDITY, UID): an IMAP folder name with its
real UIDVALIDITY and UIDs, under the --account NAME ('' without one: accounts share the
database and may have same-named folders with the same UIDVALIDITY); a Maildir by its path, UIDVALIDITY 0 and a 63-bit hash of the file
name's unique part (stable across new/ -> cur/ and flag changes); an mbox by its path,
UIDVALIDITY 0 and a 63-bit hash of the message bytes (stable when the file is appended to
or has messages removed). A re-run skips every key already in the database, so nothing is
processed twice; a dry run records under "<folder> [dry-run]" so a later real run still
acts on everything.

IMAP messages are fetched with BODY.PEEK[] (never sets \\Seen), one chunk of UIDs per round
trip; spam is acted on per chunk, in bulk, after the chunk's records are committed (a crash
in between is repaired at the next run). Local sources are only recorded, never modified.

Must not: speak IMAP itself (the IMAP adapter does), decide verdicts, or hold more than a
chunk of messages in memory on the streaming path.
"""

from __future__ import annotations

import dataclasses
from array import array
import datetime as dt
import email.utils
import hashlib
import logging
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from atlas_milter.adapters.imap.actions import (
    DRY_RUN_SUFFIX,
    action_for,
    adopt_rows_written_before_accounts,
    apply_actions,
    redo_pending_moves,
)
from atlas_milter.adapters.imap.connection import IMAP_COMMAND_ERROR, account_key, resolve_account
from atlas_milter.adapters.imap.session import ImapSession, open_session
from atlas_milter.config import Config
from atlas_milter.errors import AtlasError, SourceError
from atlas_milter.sources import is_maildir, iter_mbox, maildir_names
from atlas_milter.learning import with_learned_model
from atlas_milter.queries import processed_uids, uids_with_action
from atlas_milter.stream import StreamStats, peak_rss_mb
from atlas_milter.verdict import Action

log = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL = 10.0  # seconds between progress lines when not on a terminal
PROGRESS_TTY_INTERVAL = 0.2
PREFETCH_CHUNKS = 2  # IMAP chunks fetched ahead while the pool scores the current one


def stable_id(data: bytes | str) -> int:
    """A positive 63-bit id (fits SQLite's INTEGER) for a local message."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & (2**63 - 1)


def maildir_unique(name: str) -> str:
    """The unique part of a Maildir file name: everything before the ':2,FLAGS' info."""
    return name.split(":", 1)[0]


def parse_since(since: str | dt.date | None) -> dt.date | None:
    if since is None or isinstance(since, dt.date):
        return since
    try:
        return dt.date.fromisoformat(since)
    except ValueError:
        raise AtlasError(f"--since {since}: use a date like 2024-01-31") from None


def _date_header(raw: bytes) -> dt.date | None:
    head = raw[:65536].split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for line in head.splitlines():
        if line[:5].lower() == b"date:":
            try:
                return email.utils.parsedate_to_datetime(line[5:].decode("latin-1").strip()).date()
            except (TypeError, ValueError, IndexError):
                return None
    return None


# --- sources: iter_messages(folder) -> (key, raw), lazily ----------------------------------

class ImapFolderSource:
    """UIDs of one selected folder not yet processed, fetched a chunk per round trip (or
    one per round trip on the plain path, `batch=1`).

    With `prefetch` > 0, a background thread fetches the next chunk(s) while the pipeline
    scores the current one, through a queue of at most `prefetch` chunks (memory stays
    bounded: that many chunks, plus the one being fetched and the one being scored). The
    session is shared with whoever acts on verdicts between chunks: both hold `lock`
    while they use it. `close()` stops and joins the thread (the generator's end does too)."""

    def __init__(self, session: ImapSession, todo: Sequence[int], batch: int, prefetch: int = 0) -> None:
        self.session = session
        self.todo = todo
        self.batch = max(1, batch)
        self.prefetch = max(0, prefetch) if self.batch > 1 else 0
        self.total: int | None = len(todo)
        self.vanished = 0  # expunged by someone else between SEARCH and FETCH
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _parts(self) -> Iterator[list[int]]:
        for i in range(0, len(self.todo), self.batch):
            yield self.todo[i : i + self.batch]

    def _fetch(self, part: list[int]) -> dict[int, bytes]:
        with self.lock:
            return self.session.fetch_raw(part)

    def iter_messages(self, folder: str) -> Iterator[tuple[str, bytes]]:
        fetched = self._prefetched() if self.prefetch and len(self.todo) > self.batch else (
            (part, self._fetch(part)) for part in self._parts())
        for part, raws in fetched:
            for uid in part:
                raw = raws.pop(uid, None)
                if raw is None:
                    self.vanished += 1
                    continue
                yield str(uid), raw

    def _prefetched(self) -> Iterator[tuple[list[int], dict[int, bytes]]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = self._stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def fetcher() -> None:
            try:
                for part in self._parts():
                    if stop.is_set() or not put((part, self._fetch(part))):
                        return
            except BaseException as exc:  # handed to the consuming thread, raised there
                put(exc)
                return
            put(None)

        thread = self._thread = threading.Thread(target=fetcher, name="atlas-imap-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                item = None  # do not keep a consumed chunk alive while waiting for the next
        finally:
            self.close()

    def close(self) -> None:
        """Stop prefetching and wait for a fetch in progress: the session is then free."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class MaildirSource:
    """Messages of a Maildir's cur/ and new/ not yet processed (file mtime for --since)."""

    def __init__(self, path: Path, skip: set[int], since: dt.date | None, limit: int | None) -> None:
        self.path = path
        self.files: list[tuple[int, str, Path]] = []
        self.skipped = 0
        for folder, name in maildir_names(path):  # an unreadable cur/ or new/ raises SourceError
            uid = stable_id(maildir_unique(name))
            if uid in skip:
                self.skipped += 1
                continue
            file = Path(folder) / name
            if since is not None:
                try:
                    if dt.date.fromtimestamp(file.stat().st_mtime) < since:
                        continue
                except OSError:
                    continue
            self.files.append((uid, maildir_unique(name), file))
        if limit is not None:
            self.files = self.files[:limit]
        self.total: int | None = len(self.files)
        self.vanished = 0

    def iter_messages(self, folder: str) -> Iterator[tuple[str, bytes]]:
        for uid, unique, file in self.files:
            try:
                raw = file.read_bytes()
            except FileNotFoundError:
                # A mail client renamed it (flags) or moved it meanwhile: look for it by its unique part.
                moved = [p for sub in ("cur", "new") for p in (self.path / sub).glob(f"{unique}*")]
                if not moved:
                    self.vanished += 1
                    continue
                raw = moved[0].read_bytes()
            yield f"{uid}:{unique}", raw


class MboxSource:
    """Messages of an mbox file not yet processed, read one at a time (Date: for --since)."""

    def __init__(self, path: Path, skip: set[int], since: dt.date | None, limit: int | None) -> None:
        self.path = path
        self.skip = skip
        self.since = since
        self.limit = limit
        self.total: int | None = None  # unknown without reading the whole file
        self.skipped = 0
        self.vanished = 0

    def iter_messages(self, folder: str) -> Iterator[tuple[str, bytes]]:
        given = 0
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with fh:
            for index, item in enumerate(iter_mbox(fh, str(self.path))):
                if self.limit is not None and given >= self.limit:
                    return
                uid = stable_id(item.raw)
                if uid in self.skip:
                    self.skipped += 1
                    continue
                if self.since is not None:
                    date = _date_header(item.raw)
                    if date is not None and date < self.since:
                        continue
                self.skip.add(uid)  # an identical copy later in the file is the same message
                given += 1
                yield f"{uid}:message {index}", item.raw


# --- progress ------------------------------------------------------------------------------

class Progress:
    """A bar with rate and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, label: str, total: int | None, stream: TextIO, tty: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.last = 0.0
        self.done = 0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last < (PROGRESS_TTY_INTERVAL if self.tty else PROGRESS_LOG_INTERVAL):
            return
        self.last = now
        self.stream.write(self.line(now) if not self.tty else "\r" + self.line(now) + "\x1b[K")
        if not self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        if self.total:
            frac = min(1.0, self.done / self.total)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            bar = "#" * int(frac * 30)
            eta_s = _duration(eta) if eta != float("inf") else "?"
            return f"{self.label} [{bar:30}] {self.done}/{self.total} {frac:4.0%} {rate:7.1f} msg/s ETA {eta_s}"
        return f"{self.label} {self.done} messages {rate:7.1f} msg/s"

    def finish(self) -> None:
        if self.tty and self.last:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


# --- the run -------------------------------------------------------------------------------

@dataclass
class Summary:
    processed: int = 0
    already_done: int = 0
    errors: int = 0
    vanished: int = 0
    elapsed: float = 0.0
    peak_memory_mb: float = 0.0
    verdicts: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    folders: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdicts"], d["actions"], d["rate"] = dict(self.verdicts), dict(self.actions), round(self.rate, 1)
        return d

    def text(self, dry_run: bool) -> str:
        lines = [
            f"backfill {', '.join(self.folders)}{' (dry run: nothing acted on)' if dry_run else ''}: "
            f"{self.processed} messages in {self.elapsed:.1f} s ({self.rate:.1f} msg/s); "
            f"{self.already_done} already done, {self.errors} errors"
            + (f", {self.vanished} gone before they were read" if self.vanished else ""),
            "  verdicts: " + (", ".join(f"{k} {self.verdicts[k]}" for k in ("spam", "unsure", "ham") if self.verdicts[k]) or "none"),
            "  actions:  " + (", ".join(f"{k} {v}" for k, v in self.actions.most_common()) or "none"),
            f"  peak memory {self.peak_memory_mb:.0f} MB (this process)",
        ]
        return "\n".join(lines)


def run_backfill(
    config: Config,
    folders: Sequence[str] = (),
    maildir: str | None = None,
    mbox: str | None = None,
    dry_run: bool = False,
    since: str | dt.date | None = None,
    limit: int | None = None,
    account: str | None = None,
    force_plain: bool = False,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    summary: Summary | None = None,
) -> int:
    """Backfill IMAP `folders`, or a `maildir`, or an `mbox`; print a summary to `out`.
    Returns 0, or 1 when some messages could not be classified."""
    out = out or sys.stdout
    err = err or sys.stderr
    chosen = [bool(folders), bool(maildir), bool(mbox)]
    if sum(chosen) != 1:
        raise AtlasError("backfill needs IMAP folders (e.g. INBOX), or --maildir DIR, or --mbox FILE (one of them)")
    if limit is not None and limit < 1:
        raise AtlasError(f"--limit {limit}: must be at least 1")
    since_date = parse_since(since)
    as_configured = config
    config = with_learned_model(config)
    summary = summary if summary is not None else Summary()
    if folders:
        imap = resolve_account(config, account)
        config = dataclasses.replace(config, imap=imap)
        session = open_session(config, account, force_plain, env)  # AtlasError before any work
    from atlas_milter.pipeline import Pipeline

    pipeline = Pipeline(config)  # the database exists and is migrated from here on
    if folders:
        adopt_rows_written_before_accounts(as_configured, account)
    started = time.monotonic()
    _warm_up(pipeline)
    try:
        if folders:
            try:
                for folder in folders:
                    remaining = None if limit is None else limit - summary.processed
                    if remaining is not None and remaining <= 0:
                        break
                    _backfill_imap_folder(pipeline, session, config, account_key(account), folder, dry_run, since_date,
                                          remaining, summary, err)
            finally:
                session.close()
        else:
            path = Path(maildir or mbox).expanduser()
            if maildir and not is_maildir(path):
                raise AtlasError(f"{path}: not a Maildir (needs cur/ and new/)")
            if mbox and not path.is_file():
                raise AtlasError(f"{path}: no such mbox file")
            _backfill_local(pipeline, path, bool(maildir), dry_run, since_date, limit, summary, err)
        pipeline.flush()
    finally:
        pipeline.close()
    summary.elapsed = time.monotonic() - started
    summary.peak_memory_mb = max(summary.peak_memory_mb, peak_rss_mb())
    print(summary.text(dry_run), file=out)
    return 1 if summary.errors else 0


def _warm_up(pipeline: Any) -> None:
    """Start the worker processes now, in the background: spawning them (and sending each
    the model) takes a good part of a second, which then overlaps with SELECT, SEARCH and
    the first fetch instead of stalling the first chunk."""
    pool = getattr(pipeline, "pool", None)
    if pool is None:
        return

    def start() -> None:
        try:
            pool.run(int)
        except Exception as exc:  # the first real batch will meet (and report) the same problem
            log.debug("backfill: warming up the worker pool failed: %s", exc)

    threading.Thread(target=start, name="atlas-pool-warm-up", daemon=True).start()


def _run_source(pipeline: Any, source: Any, label: str, folder_key: str, uidvalidity: int, spam_action: str,
                dry_run: bool, summary: Summary, err: TextIO,
                act: Any = None, account: str = "") -> StreamStats:
    """Stream `source` through the pipeline; record each verdict; `act(actions)` per chunk."""
    progress = Progress(label, source.total, err)
    pending: dict[int, tuple[str, str]] = {}
    done_before = summary.processed

    def on_result(result: Any) -> Any:
        uid_text, _, note = result.key.partition(":")
        uid = int(uid_text)
        verdict = result.verdict.verdict
        action = Action.DRY_RUN if dry_run else action_for(verdict, spam_action)
        pipeline.record(result, source="backfill", action=action, account=account, folder=folder_key,
                        uidvalidity=uidvalidity, uid=uid, note=note or None)
        summary.verdicts[verdict] += 1
        summary.actions[action] += 1
        summary.processed += 1
        if act is not None and action in ("move", "flag"):
            pending[uid] = (action, verdict)
        return result

    def on_chunk(stats: StreamStats) -> None:
        if act is not None and pending:
            if not pipeline.flush():  # the records are durable before we act on them
                raise AtlasError("the verdict database did not accept the records; stopping before acting")
            act(dict(pending))
            pending.clear()
        summary.peak_memory_mb = max(summary.peak_memory_mb, stats.peak_memory_mb)
        progress.update(summary.processed - done_before)

    stats = pipeline.process_source(source, label, on_result, on_chunk)
    summary.errors += stats.errors
    summary.peak_memory_mb = max(summary.peak_memory_mb, stats.peak_memory_mb)
    summary.vanished += getattr(source, "vanished", 0)
    progress.update(summary.processed - done_before, force=not progress.tty)
    progress.finish()
    return stats


def _backfill_imap_folder(pipeline: Any, session: ImapSession, config: Config, account: str, folder: str,
                          dry_run: bool, since: dt.date | None, limit: int | None, summary: Summary,
                          err: TextIO) -> None:
    try:
        state = session.select(folder)
    except IMAP_COMMAND_ERROR as exc:
        raise AtlasError(f"IMAP folder {folder!r}: {exc}") from None
    db = config.store.db
    key = folder + (DRY_RUN_SUFFIX if dry_run else "")
    spam_action = config.imap.spam_action
    if not dry_run and spam_action == "move":
        pipeline.flush()
        moved = uids_with_action(db, folder, state.uidvalidity, Action.MOVE, account=account)
        if redo_pending_moves(session, state, moved):
            state = session.select(folder)
    pipeline.flush()
    done = processed_uids(db, key, state.uidvalidity, account)
    uids = session.uids(since=since)
    todo = array("L", (u for u in uids if u not in done))
    summary.already_done += len(uids) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    features = config.features
    plain = not (features.streaming or features.parallel)
    batch = 1 if plain else config.performance.chunk_size
    source = ImapFolderSource(session, todo, batch, prefetch=0 if plain else PREFETCH_CHUNKS)
    summary.folders.append(folder)
    log.info("backfill %s: UIDVALIDITY %d, %d messages, %d already done, %d to do", folder, state.uidvalidity,
             len(uids), len(uids) - len(todo), len(todo))

    def act(actions: dict[int, tuple[str, str]]) -> None:
        with source.lock:  # the prefetch thread may be fetching on the same connection
            apply_actions(session, actions)

    try:
        _run_source(pipeline, source, folder, key, state.uidvalidity, spam_action, dry_run, summary, err,
                    act=None if dry_run or spam_action == "record" else act, account=account)
    finally:
        source.close()


def _backfill_local(pipeline: Any, path: Path, is_maildir_: bool, dry_run: bool, since: dt.date | None,
                    limit: int | None, summary: Summary, err: TextIO) -> None:
    folder = str(path.resolve())
    key = folder + (DRY_RUN_SUFFIX if dry_run else "")
    pipeline.flush()
    done = processed_uids(pipeline.config.store.db, key, 0)
    source: MaildirSource | MboxSource
    source = MaildirSource(path, done, since, limit) if is_maildir_ else MboxSource(path, set(done), since, limit)
    summary.folders.append(folder)
    # Local mailboxes are recorded only: we never rewrite someone's Maildir or mbox.
    _run_source(pipeline, source, path.name or folder, key, 0, "record", dry_run, summary, err)
    summary.already_done += source.skipped
