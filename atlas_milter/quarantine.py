"""Owns the admin's quarantine: the messages the milter put on hold, each beside the
decision that held it, and what an admin does with one: show it, release it, release it
and learn it as ham, delete it. Every action is recorded (quarantine_actions, through
journal.py) and logged with who did it and how it ended. `atlas-milter quarantine` and the
console's /quarantine page both come here.

Learning goes through learning.py into the model file learning writes (the milter runs
that file: `with_learned_model`), under a file lock, so the command line and a daemon never
learn over each other. A running milter takes the new model on its next reload (SIGUSR1).

Must not: talk to the MTA itself (mta_queue.py) or query the database itself (queries.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from atlas_milter import journal, queries
from atlas_milter.config import Config
from atlas_milter.errors import AtlasError
from atlas_milter.history import TOP_REASONS, explain_lines, reasons_of, reference, terminal_safe
from atlas_milter.mta_queue import Held, HoldQueue, PostfixQueue, check_queue_id
from atlas_milter.verdict import Action, format_reasons

log = logging.getLogger(__name__)

# Our own verdict headers (and the X-Spam-* ones we add) are taken off before learning:
# the model learns the message as it arrived, as the milter scored it.
_OUR_HEADERS = re.compile(rb"^(?:x-atlas-|x-spam-)[^:\n]*:.*\n(?:[ \t].*\n)*", re.IGNORECASE | re.MULTILINE)
RELEASE, RELEASE_LEARN, DELETE = "release", "release+learn", "delete"


def hold_queue(config: Config) -> HoldQueue:
    """The MTA's hold queue as [quarantine] describes it: through the queue helper's socket
    when `helper_socket` is set, else by running the MTA's tools here."""
    q = config.quarantine
    if q.helper_socket:  # not root: the queue helper runs the MTA's tools for us
        from atlas_milter.queue_helper import HelperQueue

        return HelperQueue(q.helper_socket, q.mta)
    return direct_queue(config)


def direct_queue(config: Config) -> HoldQueue:
    """The MTA's hold queue, its tools run by this process (as the queue helper does)."""
    q = config.quarantine
    if q.mta == "sendmail":
        from atlas_milter.mta_queue import SendmailQueue

        return SendmailQueue(q.sendmail_config, q.sendmail_queue, q.command_prefix)
    return PostfixQueue(q.postfix_config, q.command_prefix)


@dataclass(frozen=True)
class Entry:
    """A held message and the decision that held it (None: held by someone else, or the
    record is gone)."""

    held: Held
    decision: dict[str, Any] | None

    @property
    def ref(self) -> str | None:
        return reference(self.decision) if self.decision else None


def _with_reasons(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is not None:
        row["reasons"] = reasons_of(row)
        row["ref"] = reference(row)
    return row


def entries(config: Config, queue: HoldQueue) -> list[Entry]:
    """Every held message, oldest first, with its decision."""
    held = sorted(queue.held(), key=lambda h: (h.arrival, h.queue_id))
    decisions = queries.holding_decisions(config.store.db, [h.queue_id for h in held], Action.QUARANTINE)
    return [Entry(h, _with_reasons(decisions.get(h.queue_id))) for h in held]


def find(config: Config, queue: HoldQueue, key: str) -> Entry:
    """The held message with queue id `key`, or the one whose decision has reference `key`."""
    key = key.strip()
    for entry in entries(config, queue):
        if key in (entry.held.queue_id, entry.ref or ""):
            return entry
    check_queue_id(key)
    raise AtlasError(f"{key}: not in the {queue.name} hold queue (see `atlas-milter quarantine list`)")


def strip_our_headers(raw: bytes) -> bytes:
    """`raw` without the X-Atlas-* and X-Spam-* headers (only in the header block)."""
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        return _OUR_HEADERS.sub(b"", raw)
    return _OUR_HEADERS.sub(b"", head + b"\n") + b"\n" + body


@dataclass(frozen=True)
class Outcome:
    action: str
    queue_id: str
    detail: str  # one line for the admin: what happened
    score_before: float | None = None  # release+learn: the message's score before and after learning
    score_after: float | None = None


def _record(config: Config, actor: str, action: str, entry: Entry, outcome: str, detail: str) -> None:
    decision_id = entry.decision["id"] if entry.decision else None
    log.info("quarantine: %s %s %s by %s: %s", action, entry.held.queue_id, outcome, actor, detail)
    try:
        journal.add_quarantine_action(config.store.db, {"actor": actor, "action": action, "queue_id": entry.held.queue_id,
                                                      "decision_id": decision_id, "outcome": outcome, "detail": detail})
    except AtlasError as exc:  # the action happened; say that its record did not
        log.error("quarantine: recording %s of %s failed: %s", action, entry.held.queue_id, exc)


@contextlib.contextmanager
def _audited(config: Config, actor: str, action: str, entry: Entry) -> Iterator[list[str]]:
    """Run an action; record it as done (with the detail the block appends) or as failed
    (with what was done before the failure: a release-and-learn may have released)."""
    details: list[str] = []
    try:
        yield details
    except AtlasError as exc:
        _record(config, actor, action, entry, "failed", "; ".join([*details, str(exc)]))
        raise
    _record(config, actor, action, entry, "done", "; ".join(details))


def release(config: Config, queue: HoldQueue, key: str, actor: str) -> Outcome:
    entry = find(config, queue, key)
    with _audited(config, actor, RELEASE, entry) as details:
        queue.release(entry.held.queue_id)
        details.append("released for delivery")
    return Outcome(RELEASE, entry.held.queue_id, details[0])


def delete(config: Config, queue: HoldQueue, key: str, actor: str) -> Outcome:
    entry = find(config, queue, key)
    with _audited(config, actor, DELETE, entry) as details:
        queue.delete(entry.held.queue_id)
        details.append("deleted from the queue")
    return Outcome(DELETE, entry.held.queue_id, details[0])


def release_and_learn(config: Config, queue: HoldQueue, key: str, actor: str) -> Outcome:
    """Read the held message, release it, then learn it as ham into the model learning
    writes. Released first: a learning failure must not keep wanted mail on hold."""
    entry = find(config, queue, key)
    with _audited(config, actor, RELEASE_LEARN, entry) as details:
        raw = strip_our_headers(queue.read(entry.held.queue_id))
        queue.release(entry.held.queue_id)
        details.append("released for delivery")
        before, after, where = learn_ham(config, raw)
        details.append(f"learned as ham {where}: score {before:.3f} -> {after:.3f}")
        decision = entry.decision or {}
        journal.add_learning_event(config.store.db, {
            "source": "quarantine", "message_id": decision.get("message_id"), "sender_domain": decision.get("sender_domain"),
            "label": "ham", "previous_verdict": decision.get("verdict"), "previous_score": decision.get("score"),
            "note": f"queue id {entry.held.queue_id}, by {actor}"})
    return Outcome(RELEASE_LEARN, entry.held.queue_id, "; ".join(details), before, after)


def learn_ham(config: Config, raw: bytes) -> tuple[float, float, str]:
    """Learn `raw` as ham toward the cutoffs in force: through shared learning when this
    process runs it ([cluster]: every host learns it), else into the model file learning
    writes (the shipped model when there is none yet), under a file lock. (score before,
    after, where it went)."""
    from atlas_milter import cluster_sync
    from atlas_milter.classifier import save_model
    from atlas_milter.learning import learn_message, learned_model_path, model_to_learn
    from atlas_milter.policy import resolve_cutoffs

    cluster = cluster_sync.current()
    if cluster is not None:
        cutoffs = resolve_cutoffs(config.classifier, cluster.base)
        before, after = cluster.learn(raw, False, (cutoffs.spam, cutoffs.ham))
        return before, after, "for every host ([cluster])"
    if config.cluster.enabled:  # the command line: published at once (the model files are not used)
        before, after, _ = cluster_sync.learn_for_every_host(config, [raw], False)[0]
        return before, after, "for every host ([cluster])"
    path = learned_model_path(config)
    with _file_lock(Path(path + ".lock")):
        model = model_to_learn(path)
        model.trusted_authserv = config.classifier.trusted_authserv_id
        cutoffs = resolve_cutoffs(config.classifier, model)
        before, after = learn_message(model, raw, False, config.classifier.max_bytes, (cutoffs.spam, cutoffs.ham))
        save_model(model, path)
    return before, after, f"into {path}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        fh = open(path, "a")
    except OSError as exc:
        raise AtlasError(f"learning: cannot lock {path}: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def show(config: Config, queue: HoldQueue, key: str, with_body: bool) -> dict[str, Any]:
    """One held message: the queue's view, its decision, its headers as queued, and the
    body only when `with_body` ([http] show_bodies or the command line's --body)."""
    entry = find(config, queue, key)
    raw = queue.read(entry.held.queue_id)
    head, _, body = raw.partition(b"\n\n")
    return {
        "queue_id": entry.held.queue_id,
        "arrival": entry.held.arrival,
        "size": entry.held.size,
        "sender": entry.held.sender,
        "recipients": list(entry.held.recipients),
        "reason": entry.held.reason,
        "decision": entry.decision,
        "headers": head.decode("utf-8", "replace"),
        "body": body.decode("utf-8", "replace") if with_body else None,
        "actions": queries.quarantine_actions(config.store.db, queue_id=entry.held.queue_id),
    }


def local_actor() -> str:
    """Who runs a command on this machine: the login name (via sudo: the user who ran sudo)."""
    import getpass
    import os

    user = getpass.getuser()
    return f"{os.environ['SUDO_USER']} (sudo, as {user})" if os.environ.get("SUDO_USER") else user


# -- for a terminal ---------------------------------------------------------------------------

def utc_time(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def entry_record(entry: Entry) -> dict[str, Any]:
    d = entry.decision or {}
    return {"queue_id": entry.held.queue_id, "arrival": entry.held.arrival, "size": entry.held.size,
            "sender": entry.held.sender, "recipients": list(entry.held.recipients), "reason": entry.held.reason,
            "decision_id": d.get("id"), "ref": entry.ref, "subject": d.get("subject"), "score": d.get("score"),
            "verdict": d.get("verdict"), "reasons": d.get("reasons") or []}


def render_entries(found: list[Entry], as_json: bool) -> str:
    if as_json:
        return json.dumps([entry_record(e) for e in found])
    lines = [f"{'queue id':14} {'held since (UTC)':19} {'ref':12} {'score':>6} {'sender':30} {'subject':50} top reasons"]
    for e in found:
        d = e.decision or {}
        score = f"{d['score']:.3f}" if isinstance(d.get("score"), (int, float)) else "-"
        lines.append(" ".join((f"{e.held.queue_id:14}", f"{utc_time(e.held.arrival):19}", f"{e.ref or '-':12}", f"{score:>6}",
                               f"{terminal_safe(e.held.sender or '<>', 30):30}",
                               f"{terminal_safe(d.get('subject') or '' if d else '(no decision recorded)', 50):50}",
                               terminal_safe(format_reasons(d.get("reasons") or [], TOP_REASONS)))))
    lines.append(f"{len(found)} held" if found else "nothing held")
    return "\n".join(lines)


def render_shown(shown: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(shown)
    lines = [f"queue id      {shown['queue_id']}  held since {utc_time(shown['arrival'])} UTC, {shown['size']} bytes",
             f"envelope      from {terminal_safe(shown['sender'] or '<>')} to "
             f"{terminal_safe(', '.join(shown['recipients']))}"]
    if shown["reason"]:
        lines.append(f"reason        {terminal_safe(shown['reason'])}")
    if shown["decision"]:
        lines += explain_lines(shown["decision"])
    else:
        lines.append("decision      none recorded for this queue id (held by another filter or by hand?)")
    lines.append("headers as queued:")
    lines += [f"  {terminal_safe(line)}" for line in shown["headers"].splitlines()]
    if shown["body"] is not None:
        lines.append("body:")
        lines += [f"  {terminal_safe(line)}" for line in shown["body"].splitlines()]
    for act in shown["actions"]:
        lines.append(f"action        {act['created_at'][:19]} {act['action']} by {terminal_safe(act['actor'])}: "
                     f"{act['outcome']} {terminal_safe(act.get('detail') or '')}")
    return "\n".join(lines)
