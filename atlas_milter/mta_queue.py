"""Owns talking to an MTA's hold queue, where the milter's `quarantine` action puts mail:
list what is held, read one held message, release it for delivery, delete it. Postfix
through its own tools (`postqueue -j`, `postcat -bh -q`, `postsuper -H`, `postsuper -d ID
hold`); Sendmail through its quarantined queue files (hf<ID>, df<ID>) and `sendmail -Q -qQ -qI`.

Every MTA command runs with a time limit, and every failure is one AtlasError line that
says what went wrong (not held, not permitted, tool missing). The tools need the
privileges the MTA gives them: releasing and deleting are root's (or `command_prefix`, e.g.
["sudo", "-n"], for a daemon that is not root).

Must not: decide anything, record anything, or know about decisions (quarantine.py joins
the queue with the verdict database).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from atlas_milter.errors import AtlasError

COMMAND_TIMEOUT = 30.0  # seconds any one MTA command may take
_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{5,32}$")  # Postfix short/long ids, Sendmail's 14+ characters


@dataclass(frozen=True)
class Held:
    """One message in the hold queue, as the MTA lists it."""

    queue_id: str
    arrival: float  # seconds since the epoch
    size: int  # bytes, as the MTA counts them
    sender: str
    recipients: tuple[str, ...]
    reason: str = ""  # the quarantine reason, where the MTA keeps it (Sendmail)


class HoldQueue(Protocol):
    """What quarantine.py needs of an MTA."""

    name: str

    def held(self) -> list[Held]: ...

    def read(self, queue_id: str) -> bytes: ...

    def release(self, queue_id: str) -> None: ...

    def delete(self, queue_id: str) -> None: ...


def check_queue_id(queue_id: str) -> str:
    """`queue_id` if it looks like one (letters and digits); AtlasError otherwise, before
    anything reaches a command line."""
    if not _QUEUE_ID.fullmatch(queue_id or ""):
        shown = (queue_id or "")[:40].encode("unicode_escape").decode()
        raise AtlasError(f"{shown!r} is not a queue id (letters and digits, as `quarantine list` shows them)")
    return queue_id


def run_tool(argv: Sequence[str], what: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run an MTA tool; AtlasError when it is missing, hangs or exits non-zero."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AtlasError(f"{what}: {argv[0]} not found (is the MTA installed? set [quarantine] in the config)") from None
    except PermissionError:
        raise AtlasError(f"{what}: {argv[0]}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise AtlasError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise AtlasError(f"{what}: {tool_error(proc)}")
    return proc


def tool_error(proc: subprocess.CompletedProcess) -> str:
    """The last meaningful line a failed tool printed, with a hint for the usual cause."""
    text = (proc.stderr or b"").decode(errors="replace") + (proc.stdout or b"").decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    if "permission denied" in text.lower() or "superuser" in text.lower():
        last += (" (run as root; a daemon that is not root uses the queue helper: systemctl enable --now "
                 "atlas-milter-queue.socket and set [quarantine] helper_socket = \"/run/atlas-milter-queue.sock\")")
    return last


class PostfixQueue:
    """Postfix's hold queue. `config_dir`: the -c DIR of a non-default instance."""

    name = "postfix"

    def __init__(self, config_dir: str = "", command_prefix: Sequence[str] = (), timeout: float = COMMAND_TIMEOUT) -> None:
        self._c = ["-c", config_dir] if config_dir else []
        self._prefix = list(command_prefix)
        self._timeout = timeout

    def _run(self, tool: str, *args: str, what: str, privileged: bool = True) -> subprocess.CompletedProcess:
        argv = [*(self._prefix if privileged else ()), tool, *self._c, *args]
        return run_tool(argv, what, self._timeout)

    def held(self) -> list[Held]:
        proc = self._run("postqueue", "-j", what="listing the Postfix queue", privileged=False)
        out = []
        for line in proc.stdout.decode(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if item.get("queue_name") != "hold":
                continue
            out.append(Held(str(item.get("queue_id", "")), float(item.get("arrival_time") or 0),
                            int(item.get("message_size") or 0), str(item.get("sender", "")),
                            tuple(str(r.get("address", "")) for r in item.get("recipients") or ())))
        return out

    @staticmethod
    def _not_held(queue_id: str) -> AtlasError:
        return AtlasError(f"{queue_id}: not in the Postfix hold queue (released, deleted or delivered already?)")

    def read(self, queue_id: str) -> bytes:
        """The message as queued (headers and body, LF line ends), our verdict headers included."""
        check_queue_id(queue_id)
        if not any(h.queue_id == queue_id for h in self.held()):  # postcat would read any queue
            raise self._not_held(queue_id)
        return self._run("postcat", "-bh", "-q", queue_id, what=f"reading {queue_id}").stdout

    # postsuper acts on the hold queue only (-H; -d ID hold) and says how many it handled:
    # a message not held is its "0 messages", no listing of the queue first.
    def release(self, queue_id: str) -> None:
        proc = self._run("postsuper", "-H", check_queue_id(queue_id), what=f"releasing {queue_id}")
        if b"released from hold" not in proc.stderr + proc.stdout:
            raise self._not_held(queue_id)

    def delete(self, queue_id: str) -> None:
        proc = self._run("postsuper", "-d", check_queue_id(queue_id), "hold", what=f"deleting {queue_id}")
        if b"removed" not in proc.stderr + proc.stdout:
            raise self._not_held(queue_id)


_QUOTED_OR_MACRO = re.compile(rb"\xff(.)|[\x80-\x9f]", re.S)  # Sendmail's METAQUOTE + byte | an internal character
_HEADER_CONDITION = re.compile(rb"^\?[^?]*\?")  # H?P?Return-Path: the mailer flags (or macro) it depends on


def _queue_records(data: bytes) -> list[bytes]:
    """The lines of a Sendmail queue file (qf/hf), each with its continuation lines (those that
    start with a tab or a space) joined on with their newlines; the final "." line dropped."""
    records: list[bytes] = []
    for line in data.split(b"\n"):
        if line[:1] in (b"\t", b" ") and records:
            records[-1] += b"\n" + line
        elif line and line != b".":
            records.append(line)
    return records


def _unquote(value: bytes) -> bytes | None:
    """`value` as the client sent it: Sendmail writes an 8-bit byte that looks like one of its
    internal characters (0x80-0x9f) with a 0xff before it. None when the value holds an
    unquoted internal character, i.e. a macro Sendmail fills in only at delivery
    (Return-Path: <$g>)."""
    if any(m.group(1) is None for m in _QUOTED_OR_MACRO.finditer(value)):
        return None
    return _QUOTED_OR_MACRO.sub(lambda m: m.group(1), value)


def _text(value: bytes) -> str:
    unquoted = _unquote(value)
    return (value if unquoted is None else unquoted).decode(errors="replace")


def _address(value: bytes) -> str:
    """An envelope address without its angle brackets; "" for the null sender <>."""
    text = _text(value).strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


class SendmailQueue:
    """Sendmail's quarantine: the queue files whose control file is hf<ID> instead of qf<ID>
    (the reason on its `q` line), in `queue_dir` (its QueueDirectory; the qf/ df/ xf/
    subdirectories when they exist, one queue directory only). `config_file`: the -C FILE of
    a non-default instance; `sendmail`: the binary.

    Listing, reading and deleting work on the files directly and need read (and for delete
    write) access to the queue directory, which is root's; `command_prefix` applies to the
    sendmail commands of release only."""

    name = "sendmail"

    def __init__(self, config_file: str = "", queue_dir: str = "/var/spool/mqueue", command_prefix: Sequence[str] = (),
                 timeout: float = COMMAND_TIMEOUT, sendmail: str = "sendmail") -> None:
        self._c = ["-C", config_file] if config_file else []
        self._queue_dir = Path(queue_dir)
        self._prefix = list(command_prefix)
        self._timeout = timeout
        self._sendmail = sendmail

    def _run(self, *args: str, what: str) -> subprocess.CompletedProcess:
        return run_tool([*self._prefix, self._sendmail, *self._c, *args], what, self._timeout)

    def _dir(self, kind: str) -> Path:
        """Where Sendmail keeps `kind` ("qf": control files, hf included; "df": bodies; "xf":
        transcripts): its subdirectory of that name if there is one, else the queue directory."""
        sub = self._queue_dir / kind
        return sub if sub.is_dir() else self._queue_dir

    def _read_file(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except PermissionError:
            raise AtlasError(f"{what}: {path}: permission denied (run as root: the Sendmail queue is root's)") from None
        except OSError as exc:
            raise AtlasError(f"{what}: {path}: {exc.strerror or exc}") from None

    def _require_held(self, queue_id: str) -> Path:
        """The hf file of `queue_id`; AtlasError when it is not a queue id or not quarantined."""
        hf = self._dir("qf") / f"hf{check_queue_id(queue_id)}"
        try:
            hf.stat()
        except FileNotFoundError:
            raise AtlasError(f"{queue_id}: not in the Sendmail quarantine (released, deleted or delivered already?)") from None
        except PermissionError:
            raise AtlasError(f"{queue_id}: {hf}: permission denied (run as root: the Sendmail queue is root's)") from None
        return hf

    def held(self) -> list[Held]:
        qf_dir = self._dir("qf")
        try:
            names = sorted(p.name for p in qf_dir.iterdir())
        except PermissionError:
            raise AtlasError(f"listing the Sendmail quarantine: {qf_dir}: permission denied (run as root)") from None
        except OSError as exc:
            raise AtlasError(f"listing the Sendmail quarantine: {qf_dir}: {exc.strerror or exc} "
                             "(set [quarantine] sendmail_queue to Sendmail's QueueDirectory)") from None
        out = []
        for name in names:
            queue_id = name[2:]
            if not name.startswith("hf") or not _QUEUE_ID.fullmatch(queue_id):
                continue
            try:
                data = (qf_dir / name).read_bytes()
            except FileNotFoundError:
                continue  # released or deleted while we looked
            except PermissionError:
                raise AtlasError(f"listing the Sendmail quarantine: {qf_dir / name}: permission denied (run as root)") from None
            out.append(self._parse_held(queue_id, data, self._body_size(queue_id)))
        return sorted(out, key=lambda h: (h.arrival, h.queue_id))

    def _body_size(self, queue_id: str) -> int:
        """The size mailq shows: that of the df file (0 if it is missing)."""
        try:
            return (self._dir("df") / f"df{queue_id}").stat().st_size
        except OSError:
            return 0

    @staticmethod
    def _parse_held(queue_id: str, data: bytes, size: int) -> Held:
        """One Held from an hf file: T<arrival>, S<sender>, R<flags>:<recipient>, q<reason>."""
        arrival, sender, recipients, reason = 0.0, "", [], ""
        for record in _queue_records(data):
            kind, value = record[:1], record[1:]
            if kind == b"T" and value.isdigit():
                arrival = float(value)
            elif kind == b"S":
                sender = _address(value)
            elif kind == b"R":  # hf files are version 8 (Sendmail 8.13+): R lines always carry flags and a colon
                recipients.append(_address(value.partition(b":")[2]))
            elif kind == b"q":
                reason = " ".join(_text(value).split())
        return Held(queue_id, arrival, size, sender, tuple(recipients), reason)

    def read(self, queue_id: str) -> bytes:
        """The message as queued (headers and body, LF line ends), our verdict headers included.
        Headers Sendmail fills in per delivery (Return-Path: <$g>) are left out."""
        hf = self._require_held(queue_id)
        what = f"reading {queue_id}"
        headers = []
        for record in _queue_records(self._read_file(hf, what)):
            if record[:1] == b"H":
                header = _unquote(_HEADER_CONDITION.sub(b"", record[1:]))
                if header is not None:
                    headers.append(header + b"\n")
        body = self._read_file(self._dir("df") / f"df{queue_id}", what)
        return b"".join(headers) + b"\n" + body

    def release(self, queue_id: str) -> None:
        """Unquarantine (`sendmail -Q -qQ -qI<ID>`: -Q without a reason lifts the quarantine of
        the quarantined items -qQ -qI select), then deliver (`sendmail -qI<ID>`, a queue run
        for that id; should it fail, Sendmail's next queue run delivers the message)."""
        hf = self._require_held(queue_id)
        proc = self._run("-Q", "-qQ", f"-qI{queue_id}", what=f"releasing {queue_id}")
        if hf.exists():
            said = f" ({tool_error(proc)})" if (proc.stdout + proc.stderr).strip() else ""
            raise AtlasError(f"releasing {queue_id}: Sendmail released nothing, it is still quarantined{said}")
        if (self._dir("qf") / f"qf{queue_id}").exists():  # else a queue run has delivered it already
            try:
                self._run(f"-qI{queue_id}", what=f"delivering {queue_id}")
            except AtlasError as exc:
                raise AtlasError(f"{exc} (released from the quarantine: Sendmail's next queue run delivers it)") from None

    def delete(self, queue_id: str) -> None:
        """Remove the message's files: hf (the quarantined control file) first, then df and xf."""
        hf = self._require_held(queue_id)
        for path in (hf, self._dir("df") / f"df{queue_id}", self._dir("xf") / f"xf{queue_id}"):
            try:
                path.unlink()
            except FileNotFoundError:
                if path == hf:
                    raise AtlasError(f"deleting {queue_id}: not in the Sendmail quarantine any more") from None
            except PermissionError:
                raise AtlasError(f"deleting {queue_id}: {path}: permission denied (run as root)") from None
            except OSError as exc:
                raise AtlasError(f"deleting {queue_id}: {path}: {exc.strerror or exc}") from None
