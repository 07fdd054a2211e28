"""Owns what the milter writes into mail and SMTP replies: the names of the headers it adds
(and removes when they arrive forged), the SMTP reply codes, sanitising of any text taken
from a message before it reaches a header or a reply, reference ids, and `REPLIES`, the
table that maps the core's `Action` to a milter reply. Decides nothing: which Action a
message gets is the policy's (atlas_milter/policy.py)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import Milter

from atlas_milter.verdict import Action

# --- headers we add (and remove when they arrive forged) -------------------------------
HDR_VERDICT = "X-Atlas-Verdict"
HDR_SCORE = "X-Atlas-Score"
HDR_REASONS = "X-Atlas-Reasons"
HDR_SPAM_FLAG = "X-Spam-Flag"
HDR_SPAM_STATUS = "X-Spam-Status"
FORGED_PREFIXES = ("x-atlas-", "x-spam-")
REASONS_SHOWN = 3  # reasons in X-Atlas-Reasons
HEADER_VALUE_MAX = 200  # characters of any header value we write

# --- SMTP replies ---------------------------------------------------------------------------
REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.1")
QUARANTINE_REASON = "atlas-milter: spam score {score:.3f} (ref {ref})"


@dataclass(frozen=True, slots=True)
class Reply:
    """How the milter answers one Action."""

    code: int  # what the end-of-message callback returns (Milter.ACCEPT, Milter.REJECT, ...)
    smtp: tuple[str, str] | None = None  # SMTP code and enhanced status code of a refusal or deferral
    text: str = ""  # the [milter] setting with its text ({ref} filled in)
    tag: bool = False  # add the verdict headers (and remove forged ones)
    quarantine: bool = False  # ask the MTA to hold the message


REPLIES = {
    Action.REJECT: Reply(Milter.REJECT, REPLY_REJECT, "reject_text"),
    Action.TEMPFAIL: Reply(Milter.TEMPFAIL, REPLY_TEMPFAIL, "tempfail_text"),
    Action.DISCARD: Reply(Milter.DISCARD),
    Action.ACCEPT: Reply(Milter.ACCEPT),
    Action.TAG: Reply(Milter.ACCEPT, tag=True),
    # Quarantine tags too: the held copy says why it was held.
    Action.QUARANTINE: Reply(Milter.ACCEPT, tag=True, quarantine=True),
}

_CTRL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_header_value(text: str, limit: int = HEADER_VALUE_MAX) -> str:
    """One line of printable ASCII: no CR/LF or other control characters from message
    content can reach a header we write (header injection), nothing non-ASCII either."""
    text = _CTRL.sub(" ", text).encode("ascii", "replace").decode("ascii").strip()
    return text[:limit]


def clean_reply_text(text: str) -> str:
    # libmilter treats the reply as a format string: a lone % would make it drop the reply.
    return clean_header_value(text, 400).replace("%", "%%")


def new_ref() -> str:
    """A short reference id for a rejected or deferred message, recorded in the verdict
    row's note (`ref=...`) so an admin can find the row from the bounce text."""
    return secrets.token_hex(5).upper()



def join_notes(a: str, b: str) -> str:
    """Two parts of a record's note, "; " between them when both are there."""
    return f"{a}; {b}" if a and b else a or b
