"""Owns learning as events that several hosts can share: one learn as a `LearnEvent` (the
message's fingerprint, the label, and the additive weight changes it made), and
`SharedModel`, the model a host scores with when it shares learning: the base model, plus
every event of the shared stream applied in stream order, plus this host's own events that
have not reached the stream yet.

Every host applies the same events in the same order to the same base, so after
convergence all hosts hold the same weights and report the same version
(`<base version>@<stream position>`). A host's own event counts locally at once, and once
it comes back on the stream it is applied there, in stream order, and stops counting
locally: it is never applied twice. A snapshot (`SharedModel.snapshot()`, stored by the
compactor) is the stream's part at a position; a host that starts from it and applies the
rest of the stream holds exactly what the others hold.

Threads: a SharedModel is not locked; its one owner (cluster_sync.py's thread) calls it.
Must not: talk to Redis or the database, or know how events travel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Mapping

from atlas_milter.classifier import WEIGHT_DECIMALS, Model, features, learn
from atlas_milter.message import fingerprint, parse_message

LABELS = ("spam", "ham")
SNAPSHOT_FORMAT = "atlas-learn-snapshot-1"
DEDUP_WINDOW_MS = 3_600_000  # an event the stream holds twice within an hour counts once


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
    before = model.probability(model.margin(features(parsed, model.trusted_authserv)))
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
    not yet on the stream.

    The stream's part is kept as `totals`, each feature's deltas summed in stream order, and
    a weight is the base's plus its total (rounded as the model file keeps weights). Every
    host adds the same numbers in the same order, so a snapshot of the totals at a position
    (what the compactor stores, `snapshot()`) is bit for bit what a host that applied the
    stream up to there holds: a new host that starts from it (`adopt()`) and applies the
    tail ends with the same weights as the hosts that saw every event."""

    def __init__(self, base: Model, host: str) -> None:
        self.host = host
        self.base = base  # never changed here
        self.base_version = base.version
        self.totals: dict[str, float] = {}  # feature -> the stream's deltas summed, up to `position`
        self._weights = dict(base.weights)  # base + totals, rounded
        self.position = "0"  # the last stream entry applied ("0": none)
        self.pending: dict[str, LearnEvent] = {}  # event id -> own event not seen on the stream yet
        self.shipped: dict[str, str] = {}  # own pending event id -> its stream entry, once Redis took it
        self.applied_count = 0
        # Recently applied events (id -> entry time, ms): an event the stream holds twice
        # (published again after a failover lost the first copy's replication, which a host
        # had read) counts once. Kept for DEDUP_WINDOW_MS of stream time.
        self.recent_ids: dict[str, int] = {}
        # Features whose weight changed since take_changes() (None: more than that, e.g. an
        # own event dropped, which may remove a feature), so a model's compiled table can be
        # the previous one's with these few weights set instead of a new build.
        self._changed: set[str] | None = None

    @property
    def version(self) -> str:
        local = f"+{len(self.pending)}local" if self.pending else ""
        return f"{self.base_version}@{self.position}{local}"

    def add_local(self, event: LearnEvent) -> None:
        """This host's own learn: counts at once, until it comes back on the stream."""
        self.pending[event.event_id] = event
        self._note_changes(event.deltas)

    def drop_pending(self, event_id: str) -> None:
        """An own event that will not come back on the stream (another host's learn of the
        same message counts instead)."""
        if self.pending.pop(event_id, None) is not None:
            self._changed = None
        self.shipped.pop(event_id, None)

    def apply_stream(self, entry_id: str, event: LearnEvent) -> None:
        """The next stream entry, in order (entries at or before `position` are ignored)."""
        if stream_key(entry_id) <= stream_key(self.position):
            return
        self.position = entry_id
        self.pending.pop(event.event_id, None)
        self.shipped.pop(event.event_id, None)
        if event.event_id in self.recent_ids:
            return
        at = stream_key(entry_id)[0]
        self.recent_ids[event.event_id] = at
        if len(self.recent_ids) > 1024 and next(iter(self.recent_ids.values())) < at - DEDUP_WINDOW_MS:
            self.recent_ids = {i: t for i, t in self.recent_ids.items() if t >= at - DEDUP_WINDOW_MS}
        self._note_changes(event.deltas)
        base = self.base.weights
        for feature, delta in event.deltas.items():
            total = self.totals[feature] = self.totals.get(feature, 0.0) + delta
            self._weights[feature] = round(base.get(feature, 0.0) + total, WEIGHT_DECIMALS)
        self.applied_count += 1

    def mark_position(self, entry_id: str) -> None:
        """Move past a stream entry that is not an event (skipped, and logged by the caller)."""
        if stream_key(entry_id) > stream_key(self.position):
            self.position = entry_id

    def snapshot(self) -> bytes:
        """The stream's part at `position`, as the compactor stores it (compressed JSON)."""
        data = {"format": SNAPSHOT_FORMAT, "position": self.position, "applied": self.applied_count,
                "totals": self.totals, "recent_ids": self.recent_ids, "base_version": self.base_version}
        return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)

    def adopt(self, blob: bytes) -> bool:
        """Start over from a snapshot that is ahead of `position` (a new host, or one that fell
        behind the trimmed stream): False, nothing changed, when it is not ahead. This host's
        own events stay pending unless the snapshot holds them already. ValueError for a blob
        that is not a snapshot."""
        try:
            data = json.loads(zlib.decompress(blob))
            if data.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            position = str(data["position"])
            totals = {str(f): float(t) for f, t in data["totals"].items()}
            recent = {str(i): int(t) for i, t in data["recent_ids"].items()}
            applied = int(data["applied"])
            stream_key(position)
        except (zlib.error, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a learning snapshot: {exc}") from None
        if stream_key(position) <= stream_key(self.position):
            return False
        self.position, self.totals, self.recent_ids, self.applied_count = position, totals, recent, applied
        self._changed = None
        base = self.base.weights
        self._weights = dict(base)
        for feature, total in totals.items():
            self._weights[feature] = round(base.get(feature, 0.0) + total, WEIGHT_DECIMALS)
        for event_id in list(self.pending):  # own events the snapshot folded in already
            entry = self.shipped.get(event_id)
            if event_id in recent or (entry and stream_key(entry) <= stream_key(position)):
                self.pending.pop(event_id)
                self.shipped.pop(event_id, None)
        return True

    def _note_changes(self, deltas: Mapping[str, float]) -> None:
        if self._changed is not None:
            self._changed.update(deltas)

    def take_changes(self) -> set[str] | None:
        """The features whose weight changed since the last call (None: rebuild the whole table)."""
        changed, self._changed = self._changed, set()
        return changed

    def model(self) -> Model:
        """A new Model to score with: the stream's weights plus the pending own events, with
        the version that names them. Prepared by the caller (it may be compiled)."""
        current = dataclasses.replace(self.base, weights=dict(self._weights),
                                      meta={**self.base.meta, "version": self.version})
        for event in self.pending.values():
            apply_deltas(current.weights, event.deltas)
        return current


def _own_copy(model: Model) -> Model:
    """`model` with weights and meta of its own (changing them leaves `model` as it is) and
    no compiled table yet (dataclasses.replace leaves out the init=False field)."""
    return dataclasses.replace(model, weights=dict(model.weights), meta=dict(model.meta))


def stream_key(entry_id: str) -> tuple[int, int]:
    """A Redis stream id ("1700000000000-3", or "0") as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
