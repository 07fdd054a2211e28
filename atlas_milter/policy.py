"""Owns turning a score into a verdict: the two cutoffs give ham / unsure / spam.
Pure functions over frozen values; no I/O, no state. Front doors map the verdict to their
own actions (milter reply, IMAP move) through their policy tables."""

from __future__ import annotations

from dataclasses import dataclass

from atlas_milter.verdict import HAM, SPAM, UNSURE, Score, Verdict


@dataclass(frozen=True, slots=True)
class Cutoffs:
    spam: float  # score >= spam  -> spam
    ham: float  # score < ham    -> ham; in between -> unsure

    def __post_init__(self) -> None:
        if not 0.0 <= self.ham <= self.spam <= 1.0:
            raise ValueError(f"cutoffs out of order: ham {self.ham}, spam {self.spam}")


def label_for(score: float, cutoffs: Cutoffs) -> str:
    if score >= cutoffs.spam:
        return SPAM
    if score < cutoffs.ham:
        return HAM
    return UNSURE


def decide(score: Score, cutoffs: Cutoffs, cache_hit: bool = False) -> Verdict:
    return Verdict(
        verdict=label_for(score.score, cutoffs),
        score=score.score,
        reasons=score.reasons,
        model_version=score.model_version,
        cache_hit=cache_hit,
    )
