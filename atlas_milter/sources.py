"""Owns reading mail from local sources, lazily and in bounded memory: a single message
file, a directory of message files (recursively), a Maildir, an mbox file, an `index.csv`
like the shared corpus's (with a split), or `-` for one message on standard input.

Every reader yields `MailItem`s one at a time; nothing holds a whole folder in memory.
Unreadable inputs are reported through `on_error` (or raised as `SourceError`), never as a
traceback. It knows nothing about classification. IMAP lives in the IMAP adapter.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from atlas_milter.errors import SourceError

MBOX_SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class MailItem:
    key: str  # path, path:N for the Nth message of an mbox, or "-" for stdin
    raw: bytes
    label: str | None = None  # "ham"/"spam" when the source says (index.csv)


ErrorHandler = Callable[[str], None]


def _raise(msg: str) -> None:
    raise SourceError(msg)


def _describe_os_error(path: str | Path, exc: OSError) -> str:
    return f"cannot read {path}: {exc.strerror or exc}"


def is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


def looks_like_mbox(head: bytes) -> bool:
    """An mbox starts with a `From ` line and holds more than one message; a single message
    file that starts with a `From ` line (as the shared corpus's do) is read as one message."""
    return head.startswith(b"From ") and b"\nFrom " in head


def iter_mbox(fh: BinaryIO, key: str) -> Iterator[MailItem]:
    """Split an mbox on `From ` lines that follow a blank line (or start the file)."""
    lines: list[bytes] = []
    index = 0
    previous_blank = True
    for line in fh:
        if line.startswith(b"From ") and previous_blank and lines:
            yield MailItem(f"{key}:{index}", b"".join(lines))
            index += 1
            lines = []
        if line.startswith(b">From "):
            line = line[1:]  # mboxrd/mboxo escaping
        lines.append(line)
        previous_blank = line in (b"\n", b"\r\n")
    if lines and any(l.strip() for l in lines):
        yield MailItem(f"{key}:{index}", b"".join(lines))


def iter_file(path: Path, on_error: ErrorHandler = _raise) -> Iterator[MailItem]:
    """One message file, or every message of an mbox file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(MBOX_SNIFF_BYTES)
            if looks_like_mbox(head):
                fh.seek(0)
                yield from iter_mbox(fh, str(path))
                return
            rest = fh.read()
    except OSError as exc:
        on_error(_describe_os_error(path, exc))
        return
    yield MailItem(str(path), head + rest)


def maildir_names(path: str | os.PathLike, on_error: ErrorHandler = _raise) -> Iterator[tuple[str, str]]:
    """(folder, file name) of each message in a Maildir's cur/ and new/, sorted, dot files left out."""
    for sub in ("cur", "new"):
        folder = os.path.join(path, sub)
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            on_error(_describe_os_error(folder, exc))
            continue
        for name in names:
            if not name.startswith("."):
                yield folder, name


def iter_maildir(path: Path, on_error: ErrorHandler = _raise) -> Iterator[MailItem]:
    for folder, name in maildir_names(path, on_error):
        file = os.path.join(folder, name)
        try:
            with open(file, "rb") as fh:
                yield MailItem(file, fh.read())
        except FileNotFoundError:
            continue  # moved by a mail client meanwhile: it is not ours to report
        except OSError as exc:
            on_error(_describe_os_error(file, exc))


def iter_directory(path: Path, on_error: ErrorHandler = _raise) -> Iterator[MailItem]:
    """Every regular file below `path`, recursively, in a stable order."""
    def walk_error(exc: OSError) -> None:
        on_error(_describe_os_error(exc.filename or path, exc))

    for root, dirs, files in os.walk(path, onerror=walk_error):
        dirs.sort()
        for name in sorted(files):
            file = Path(root) / name
            if name.startswith(".") or not file.is_file():
                continue
            yield from iter_file(file, on_error)


def index_rows(path: Path, split: str | None, columns: frozenset[str] = frozenset({"path", "label"})) -> Iterator[tuple[dict[str, str], str, Path]]:
    """(row, label, file) for each ham or spam row of an index.csv (`path,label,...,split`),
    in the `split` when given; `file` is the row's path relative to the index's folder."""
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise SourceError(_describe_os_error(path, exc)) from None
    with fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not columns <= set(reader.fieldnames):
            raise SourceError(f"{path}: an index needs the columns {', '.join(sorted(columns))}"
                              + ("" if "split" in columns else " (and split)"))
        if split and "split" not in reader.fieldnames:
            raise SourceError(f"{path}: --split {split} given but the index has no split column")
        for row in reader:
            if split and row.get("split") != split:
                continue
            label = (row.get("label") or "").strip().lower()
            if label in ("ham", "spam"):
                yield row, label, path.parent / row["path"]


def iter_index(path: Path, split: str | None, on_error: ErrorHandler = _raise) -> Iterator[MailItem]:
    """Messages listed in an index.csv (`path,label,...,split`), relative to its folder."""
    for _row, label, file in index_rows(path, split):
        try:
            yield MailItem(str(file), file.read_bytes(), label)
        except OSError as exc:
            on_error(_describe_os_error(file, exc))


def source_kind(spec: str) -> str:
    """One of: stdin, index, maildir, directory, file (a file may turn out to be an mbox)."""
    if spec == "-":
        return "stdin"
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{spec}: no such file or directory")
    if path.is_dir():
        return "maildir" if is_maildir(path) else "directory"
    if path.name.endswith(".csv"):
        return "index"
    return "file"


def iter_source(
    spec: str,
    split: str | None = None,
    on_error: ErrorHandler = _raise,
    stdin: BinaryIO | None = None,
) -> Iterator[MailItem]:
    """Messages of one source, auto-detected. `split` applies to an index.csv."""
    kind = source_kind(spec)
    if split and kind != "index":
        raise SourceError(f"--split applies to an index.csv source, not to {spec}")
    if kind == "stdin":
        yield MailItem("-", (stdin or sys.stdin.buffer).read())
    elif kind == "index":
        yield from iter_index(Path(spec), split, on_error)
    elif kind == "maildir":
        yield from iter_maildir(Path(spec), on_error)
    elif kind == "directory":
        yield from iter_directory(Path(spec), on_error)
    else:
        yield from iter_file(Path(spec), on_error)


class LocalSource:
    """Adapter for the streaming processor: `iter_messages(folder)` over a local source,
    where `folder` is a path (file, directory, Maildir, mbox) or "-"."""

    def __init__(self, on_error: ErrorHandler = _raise, split: str | None = None) -> None:
        self.on_error = on_error
        self.split = split

    def iter_messages(self, folder: str) -> Iterator[tuple[str, bytes]]:
        for item in iter_source(folder, self.split, self.on_error):
            yield item.key, item.raw
