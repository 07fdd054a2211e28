"""Owns learning as events that several hosts can share: one learn as a `LearnEvent` (the
message's fingerprint, the label, and the additive weight changes it made), and
`SharedModel`, the model a host scores with when it shares learning: the base model, plus
every event of the shared stream applied in stream order, plus this host's own events that
have not reached the stream yet.

Every host applies the same events in the same order to the same base, so after
convergence all hosts hold the same weights and report the same version
(`<base version>@<stream position>`). A host's own event counts locally at once, and once
it comes back on the stream it is applied there, in stream order, and stops counting
locally: it is never applied twice.

Threads: a SharedModel is not locked; its one owner (cluster_sync.py's thread) calls it.
Must not: talk to Redis or the database, or know how events travel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Mapping

from atlas_milter.classifier import WEIGHT_DECIMALS, Model, features, learn
from atlas_milter.message import fingerprint, parse_message

LABELS = ("spam", "ham")


@dataclass(frozen=True)
class LearnEvent:
    """One learn: by `host`, `event_id` unique across hosts, `deltas` {feature: weight change}."""

    host: str
    event_id: str
    fingerprint: str  # the same message learned on three hosts has one fingerprint
    label: str  # spam | ham
    deltas: Mapping[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        """The event as the flat string fields of a stream entry."""
        return {"host": self.host, "event_id": self.event_id, "fingerprint": self.fingerprint, "label": self.label,
                "deltas": json.dumps(self.deltas, separators=(",", ":"), sort_keys=True)}

    @classmethod
    def from_fields(cls, data: Mapping[str, str]) -> "LearnEvent":
        """The event of a stream entry; ValueError for one that is not an event."""
        try:
            deltas = json.loads(data["deltas"])
            event = cls(str(data["host"]), str(data["event_id"]), str(data["fingerprint"]), str(data["label"]),
                        {str(k): float(v) for k, v in deltas.items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a learn event: {exc}") from None
        if event.label not in LABELS:
            raise ValueError(f"not a learn event: label {event.label!r}")
        return event


def message_fingerprint(raw: bytes, max_bytes: int) -> str:
    """The identity of a message across hosts and deliveries: From, Subject, Message-ID and
    the body (white space and case aside), as the verdict cache sees it; not the headers a
    relay adds on the way, so the copy on host B is the same message as the copy on host A."""
    fp = fingerprint(raw, max_bytes)
    return hashlib.sha256("\0".join((fp.sender, fp.subject, fp.message_id, fp.body_digest)).encode()).hexdigest()[:32]


def make_event(model: Model, raw: bytes, is_spam: bool, max_bytes: int, host: str,
               cutoffs: tuple[float, float] | None = None) -> tuple[LearnEvent, float, float]:
    """Learn `raw` on a copy of `model` and return what changed as an event, with the
    message's score before and after. `model` itself is not touched."""
    parsed = parse_message(raw, max_bytes)
    trial = _own_copy(model)
    before = model.probability(model.margin(features(parsed)))
    after = learn(trial, parsed, is_spam, cutoffs=cutoffs)
    deltas = {f: round(w - model.weights.get(f, 0.0), WEIGHT_DECIMALS + 2)
              for f, w in trial.weights.items() if w != model.weights.get(f, 0.0)}
    event = LearnEvent(host, uuid.uuid4().hex, message_fingerprint(raw, max_bytes), "spam" if is_spam else "ham", deltas)
    return event, before, after


def apply_deltas(weights: dict[str, float], deltas: Mapping[str, float]) -> None:
    """Add an event's changes, rounded as the model file keeps weights."""
    for feature, delta in deltas.items():
        weights[feature] = round(weights.get(feature, 0.0) + delta, WEIGHT_DECIMALS)


class SharedModel:
    """The base model plus the shared stream (applied in order) plus this host's own events
    not yet on the stream."""

    def __init__(self, base: Model, host: str) -> None:
        self.host = host
        self.base_version = base.version
        self._applied = _own_copy(base)  # base + the stream up to `position`
        self.position = "0"  # the last stream entry applied ("0": none)
        self.pending: dict[str, LearnEvent] = {}  # event id -> own event not seen on the stream yet
        self.applied_count = 0
        # Every event applied: an event the stream holds twice (published again after a
        # failover lost the first copy's replication, which a host had read) counts once.
        self.applied_ids: set[str] = set()

    @property
    def version(self) -> str:
        local = f"+{len(self.pending)}local" if self.pending else ""
        return f"{self.base_version}@{self.position}{local}"

    def add_local(self, event: LearnEvent) -> None:
        """This host's own learn: counts at once, until it comes back on the stream."""
        self.pending[event.event_id] = event

    def apply_stream(self, entry_id: str, event: LearnEvent) -> None:
        """The next stream entry, in order (entries at or before `position` are ignored)."""
        if _stream_key(entry_id) <= _stream_key(self.position):
            return
        self.position = entry_id
        self.pending.pop(event.event_id, None)
        if event.event_id in self.applied_ids:
            return
        self.applied_ids.add(event.event_id)
        apply_deltas(self._applied.weights, event.deltas)
        self.applied_count += 1

    def model(self) -> Model:
        """A new Model to score with: the stream's weights plus the pending own events, with
        the version that names them. Prepared by the caller (it may be compiled)."""
        current = _own_copy(self._applied, {**self._applied.meta, "version": self.version})
        for event in self.pending.values():
            apply_deltas(current.weights, event.deltas)
        return current


def _own_copy(model: Model, meta: dict | None = None) -> Model:
    """`model` with weights and meta of its own (changing them leaves `model` as it is) and
    no compiled table yet (dataclasses.replace leaves out the init=False field)."""
    return dataclasses.replace(model, weights=dict(model.weights), meta=dict(model.meta if meta is None else meta))


def _stream_key(entry_id: str) -> tuple[int, int]:
    """A Redis stream id ("1700000000000-3", or "0") as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
