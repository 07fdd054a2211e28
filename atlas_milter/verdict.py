"""Owns the small frozen value types that cross threads and module boundaries:
the classifier's `Score`, the policy's `Verdict` and the `Action` a front door takes,
and the one way reasons are written as text (CLI output, milter header). Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Sequence

HAM = "ham"
UNSURE = "unsure"
SPAM = "spam"
VERDICTS = (HAM, UNSURE, SPAM)
# Labels recorded for messages the classifier did not score.
UNCHECKED = "unchecked"  # classification failed: the failure action applied
SKIPPED = "skipped"  # not scored by policy (authenticated, trusted network, allow list)


class Action(StrEnum):
    """What a front door did with a message, as written to the `action` column and named in
    the config. A StrEnum: each member *is* its string, so config values, comparisons,
    metric names and database rows stay exactly today's strings."""

    # the milter ([milter] spam_action, unsure_action, on_error, on_busy)
    TAG = "tag"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    # the IMAP side ([imap] spam_action and what it records)
    MOVE = "move"
    FLAG = "flag"
    RECORD = "record"
    NONE = "none"
    DRY_RUN = "dry-run"
    LEARNED_HAM = "learned-ham"


@dataclass(frozen=True, slots=True)
class Score:
    """What the classifier says about one message."""

    score: float  # calibrated probability of spam, 0..1
    reasons: tuple[tuple[str, float], ...] = ()  # (feature, weight), strongest first
    model_version: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the core decided about one message: the score, its label and why."""

    verdict: str  # one of VERDICTS
    score: float
    reasons: tuple[tuple[str, float], ...] = ()
    model_version: str = ""
    cache_hit: bool = False
    error: str = ""  # non-empty when the message could not be classified normally
    # The cutoffs the label was given with (the scorer's in force, before any per-recipient
    # rule of the milter); 0 when nothing was scored.
    spam_cutoff: float = 0.0
    ham_cutoff: float = 0.0

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "score": round(self.score, 6),
            "reasons": [[name, round(weight, 4)] for name, weight in self.reasons],
            "model_version": self.model_version,
            "cache_hit": self.cache_hit,
            **({"error": self.error} if self.error else {}),
            **({"spam_cutoff": self.spam_cutoff, "ham_cutoff": self.ham_cutoff} if self.spam_cutoff else {}),
        }


def format_reasons(reasons: Sequence[tuple[str, float]], n: int = 3) -> str:
    """The `n` strongest reasons as "feature +0.42, other -0.10" (CLI lines, X-Atlas-Reasons)."""
    return ", ".join(f"{name} {weight:+.2f}" for name, weight in reasons[:n])
