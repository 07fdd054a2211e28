"""Owns the admin's view of past decisions on the command line: `atlas-milter history` (the
latest decisions, newest first, a keyset page at a time) and `atlas-milter explain` (all
that is recorded about one decision, found by the reference of a 550 reply, the queue id
or the Message-ID), as records and as lines for a terminal.

Everything shown comes from the verdict database as recorded; nothing is recomputed.
Text from mail (subjects, senders, reasons) passes `terminal_safe` before it is printed:
no control character, escape sequence or bidi override from a message reaches the
terminal.

Must not: query the database itself (the SQL lives in `queries.py`) or write to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from atlas_milter import queries
from atlas_milter.errors import AtlasError
from atlas_milter.verdict import format_reasons

DEFAULT_LIMIT = 50
MAX_LIMIT = 10000
TOP_REASONS = 3
SUBJECT_WIDTH = 60
_SINCE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# C0 and C1 controls, DEL, and the characters that reorder or hide text on a terminal:
# bidi embeddings/overrides/isolates, directional marks, zero-width and BOM characters.
REORDERING = "\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"  # a character class's inside
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{REORDERING}]")
_REF = re.compile(r"(?:^|;\s*)ref=([0-9A-Za-z]+)\s*$")


def terminal_safe(text: object, width: int | None = None) -> str:
    """`text` with every control and bidi character replaced by '?', cut to `width`."""
    s = _UNSAFE.sub("?", "" if text is None else str(text))
    return s if width is None or len(s) <= width else s[: width - 1] + "…"


def parse_since(text: str, now: datetime | None = None) -> str:
    """`--since` as the ISO UTC time it means: 30m, 1h, 2d, 1w ago, or an ISO date/time
    (UTC unless it says otherwise)."""
    value = text.strip()
    match = _SINCE.match(value.lower())
    if match:
        moment = (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise AtlasError(f"--since {terminal_safe(text)}: use an age such as 30m, 1h, 2d, 1w or an ISO date such as "
                             f"{date.today().isoformat()}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def reasons_of(row: dict[str, Any]) -> list[tuple[str, float]]:
    try:
        return [(str(name), float(weight)) for name, weight in json.loads(row.get("reasons") or "[]")]
    except (TypeError, ValueError):
        return []


def front_door(row: dict[str, Any]) -> str:
    """milter, imap:ACCOUNT, backfill:ACCOUNT, classify...: where the message came in."""
    source = row.get("source") or "?"
    return f"{source}:{row['account']}" if row.get("account") else source


def where(row: dict[str, Any]) -> str:
    """The queue id (milter) or folder/UID (IMAP, backfill) of a decision."""
    if row.get("uid") is not None:
        return f"{row.get('folder') or ''}/{row['uid']}"
    return row.get("queue_id") or row.get("folder") or "-"


# -- history ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    next_before: int | None  # --before for the next page; None when this one is the last


def history(db: str | Path, *, limit: int = DEFAULT_LIMIT, since: str | None = None, verdict: str | None = None,
            action: str | None = None, sender_domain: str | None = None, before: int | None = None) -> Page:
    """One page of the latest decisions, newest first (see queries.history)."""
    queries.require_database(db)
    if not 1 <= limit <= MAX_LIMIT:
        raise AtlasError(f"--limit {limit}: give 1 to {MAX_LIMIT}")
    rows = queries.history(db, limit=limit, since=parse_since(since) if since else None, verdict=verdict,
                           action=action, sender_domain=sender_domain.lower() if sender_domain else None,
                           before=before)
    for row in rows:
        row["reasons"] = reasons_of(row)
    return Page(rows, rows[-1]["id"] if len(rows) == limit else None)


def history_line(row: dict[str, Any]) -> str:
    score = f"{row['score']:.3f}" if isinstance(row.get("score"), (int, float)) else "-"
    cells = (
        f"{row['id']:>8}",
        (row.get("created_at") or "")[:19].replace("T", " "),
        f"{terminal_safe(front_door(row), 14):14}",
        f"{terminal_safe(where(row), 18):18}",
        f"{terminal_safe(row.get('sender') or '-', 30):30}",
        f"{row.get('recipients_count') if row.get('recipients_count') is not None else '-':>3}",
        f"{terminal_safe(row.get('subject') or '', SUBJECT_WIDTH):{SUBJECT_WIDTH}}",
        f"{score:>6}",
        f"{terminal_safe(row.get('verdict') or '-'):7}",
        f"{terminal_safe(row.get('action') or '-'):10}",
        terminal_safe(format_reasons(row["reasons"], TOP_REASONS)),
    )
    return " ".join(cells)


HISTORY_HEADER = " ".join((f"{'id':>8}", f"{'time (UTC)':19}", f"{'front door':14}", f"{'queue id / UID':18}",
                           f"{'sender':30}", "rcp", f"{'subject':{SUBJECT_WIDTH}}", f"{'score':>6}",
                           f"{'verdict':7}", f"{'action':10}", "top reasons"))


def history_lines(page: Page) -> list[str]:
    lines = [HISTORY_HEADER, *map(history_line, page.rows)]
    if not page.rows:
        lines.append("no decisions match")
    if page.next_before is not None:
        lines.append(f"next page: --before {page.next_before}")
    return lines


# -- explain ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Explained:
    key: str
    matches: list[dict[str, Any]] = field(default_factory=list)  # newest first; one when found


def explain(db: str | Path, key: str | None, row_id: int | None = None) -> Explained:
    """The decision(s) recorded for `key` (reply reference, queue id or Message-ID), or the
    one with `row_id`, which also picks among several matches of `key`. None found is an
    AtlasError."""
    queries.require_database(db)
    if row_id is not None:
        row = queries.decision(db, row_id)
        matches = [row] if row and (key is None or row in queries.find_decisions(db, key)) else []
        label = f"id {row_id}" + (f" for {key}" if key else "")
    elif key and key.strip():
        matches = queries.find_decisions(db, key)
        label = key
    else:
        raise AtlasError("explain: give a reference, queue id or Message-ID (or --id ID)")
    if not matches:
        raise AtlasError(f"no decision recorded for {terminal_safe(label)} "
                         "(looked for a reply reference, a queue id and a Message-ID)")
    for row in matches:
        row["reasons"] = reasons_of(row)
        row["ref"] = reference(row)
    return Explained(label, matches)


def reference(row: dict[str, Any]) -> str | None:
    """The reference id of the reply (or quarantine) the note records, if any."""
    match = _REF.search(row.get("note") or "")
    return match.group(1) if match else None


def policy_notes(row: dict[str, Any]) -> str:
    """The note without its reference: which policy applied (skip, deny list, mixed
    recipients, a failure) where the record says so."""
    return _REF.sub("", row.get("note") or "").strip(" ;")


def cutoffs_text(row: dict[str, Any]) -> str:
    if row.get("spam_cutoff") is None:
        return "not recorded (not scored, or decided before cutoffs were recorded)"
    return (f"spam >= {row['spam_cutoff']:g}, ham < {row['ham_cutoff']:g}"
            " (the scorer's; a per-recipient rule of the milter may apply its own)")


def time_taken(row: dict[str, Any]) -> str:
    """How long the decision took, and each stage where the record says (migration 0008)."""
    total = f"{row['elapsed_ms']:.1f} ms" if isinstance(row.get("elapsed_ms"), (int, float)) else "-"
    try:
        stages = json.loads(row.get("stage_ms") or "{}")
        parts = [f"{name} {float(ms):.2f} ms" for name, ms in stages.items()]
    except (TypeError, ValueError, AttributeError):
        parts = []
    if not parts:
        return f"{total}  (cache hit: {'yes' if row.get('cache_hit') else 'no'}; stages not recorded)"
    return f"{total}: {', '.join(parts)}"


def explain_lines(row: dict[str, Any]) -> list[str]:
    def line(name: str, value: object) -> str:
        return f"{name:14}{terminal_safe(value)}"

    score = f"{row['score']:.3f}" if isinstance(row.get("score"), (int, float)) else "not scored"
    lines = [
        line("decision", f"#{row['id']}  {row.get('created_at') or ''}"),
        line("front door", f"{front_door(row)}  {where(row)}" + (f"  (UIDVALIDITY {row['uidvalidity']})"
                                                                   if row.get("uid") is not None else "")),
        line("client", row.get("client_ip") or "-"),
        line("message-id", row.get("message_id") or "-"),
        line("sender", row.get("sender") or "-"),
        line("recipients", row.get("recipients_count") if row.get("recipients_count") is not None else "-"),
        line("subject", row.get("subject") or ""),
        line("score", f"{score}  verdict {row.get('verdict') or '-'}"),
        line("cutoffs", cutoffs_text(row)),
        line("model", row.get("model_version") or "not recorded"),
        line("action", row.get("action") or "-"),
        line("policy", policy_notes(row) or "no note recorded (skips, the deny list, mixed recipients and failures "
                                            "are noted; a rule applying to every recipient is not)"),
        line("reference", row.get("ref") or "-"),
    ]
    if row.get("error"):
        lines.append(line("error", row["error"]))
    lines.append(line("elapsed", time_taken(row)))
    lines.append(line("reasons", f"{len(row['reasons'])}" if row["reasons"] else "none recorded"))
    lines += [f"  {weight:+8.3f}  {terminal_safe(name)}" for name, weight in row["reasons"]]
    return lines


def matches_lines(found: Explained) -> list[str]:
    """The several decisions `found.key` names, newest first, and how to pick one."""
    return [f"{len(found.matches)} decisions match {terminal_safe(found.key)} (newest first):", HISTORY_HEADER,
            *map(history_line, found.matches),
            f"pick one: atlas-milter explain {terminal_safe(found.key)} --id ID"]


def render_history(page: Page, as_json: bool) -> str:
    return json.dumps({"rows": page.rows, "next_before": page.next_before}) if as_json else "\n".join(history_lines(page))


def render_explain(found: Explained, as_json: bool) -> str:
    """One decision in full, or the several that match and how to pick one."""
    one = found.matches[0] if len(found.matches) == 1 else None
    if as_json:
        return json.dumps(one if one is not None else {"matches": found.matches})
    return "\n".join(explain_lines(one) if one is not None else matches_lines(found))
