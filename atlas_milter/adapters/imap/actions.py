"""Owns acting on verdicts in a mailbox, shared by the IDLE listener and backfill: the
action names written to processed_emails by the IMAP side, which action a verdict gets
under [imap] spam_action, carrying out a chunk's actions in bulk, redoing the moves a
crash interrupted (`redo_pending_moves`), and giving a single account the rows written
before accounts were part of the key.

Must not: decide verdicts, or act before the verdict is recorded (callers flush the store
first, so a crash between the two is repaired at the next start).
"""

from __future__ import annotations

import logging
from typing import Mapping

from atlas_milter.adapters.imap.connection import account_key
from atlas_milter.adapters.imap.session import FolderState, ImapSession
from atlas_milter.config import Config
from atlas_milter.journal import adopt_unowned_imap_rows
from atlas_milter.verdict import HAM, SPAM, Action

log = logging.getLogger("atlas_milter.adapters.imap")

KEYWORD_JUNK = "$Junk"
KEYWORD_NOT_JUNK = "$NotJunk"
FLAG_DELETED = "\\Deleted"

# The `action` column of processed_emails holds verdict.Action values (move, flag, record, none,
# dry-run, learned-ham on this side).
DRY_RUN_SUFFIX = " [dry-run]"  # dry runs record under "<folder> [dry-run]", so a real run redoes them


def action_for(verdict: str, spam_action: str) -> str:
    if verdict == SPAM:
        return {"move": Action.MOVE, "flag": Action.FLAG, "record": Action.RECORD}[spam_action]
    if spam_action == "flag" and verdict == HAM:
        return Action.FLAG
    return Action.NONE


def apply_actions(session: ImapSession, actions: Mapping[int, tuple[str, str]]) -> None:
    """Carry out recorded actions for the selected folder: {uid: (action, verdict)}. Bulk:
    one STORE per keyword and one MOVE for the spam of the chunk."""
    to_move = sorted(u for u, (a, _) in actions.items() if a == Action.MOVE)
    junk_kw = sorted(u for u, (a, v) in actions.items() if a in (Action.MOVE, Action.FLAG) and v == SPAM)
    ham_kw = sorted(u for u, (a, v) in actions.items() if a == Action.FLAG and v == HAM)
    if junk_kw:
        session.add_keywords(junk_kw, [KEYWORD_JUNK])  # set before the move: it travels with the message
    if ham_kw:
        session.add_keywords(ham_kw, [KEYWORD_NOT_JUNK])
    if to_move:
        session.move(to_move, session.junk_folder())


def redo_pending_moves(session: ImapSession, state: FolderState, recorded: Mapping[int, str]) -> int:
    """Move what we recorded as moved but is still in the folder (a crash between the
    record and the move): `recorded` is {uid: Message-ID} of the folder's records whose
    action is move (any still in the folder missed its move, or on a server without MOVE
    its EXPUNGE after the COPY). UIDs are never reused within a UIDVALIDITY, so a message
    the user moved back has a new UID and is left alone."""
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



def adopt_rows_written_before_accounts(config: Config, account: str | None) -> None:
    """After the upgrade that made the account part of every mailbox key (migration 0004),
    the rows written before belong to no account. On a host whose config has exactly one
    [imap.accounts.NAME], they are that account's: give them to it, so its listener resumes
    where it stopped and backfill does not redo them. With several accounts only the admin
    knows (`atlas-milter migrate --legacy-account NAME`)."""
    if not account or len(config.imap.accounts) != 1:
        return
    moved = adopt_unowned_imap_rows(config.store.db, account_key(account))
    if moved:
        log.info("imap: %d rows recorded before accounts were part of the key now belong to account %s", moved, account)
