"""Owns the small frozen value types that cross threads and module boundaries:
the classifier's `Score` and the policy's `Verdict`. Pure data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass

HAM = "ham"
UNSURE = "unsure"
SPAM = "spam"
VERDICTS = (HAM, UNSURE, SPAM)


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

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "score": round(self.score, 6),
            "reasons": [[name, round(weight, 4)] for name, weight in self.reasons],
            "model_version": self.model_version,
            "cache_hit": self.cache_hit,
            **({"error": self.error} if self.error else {}),
        }
