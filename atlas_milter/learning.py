"""Owns learning a message someone labelled into a model: the update, saving the model file
atomically, and swapping it into a running pipeline; and which model file learning writes
(`learned_model_path`) and reads back at start (`with_learned_model`). The IMAP listener
(the user's Junk moves) and `atlas-milter learn` both come here.

Threads: `learn_and_swap` updates a copy, never the model in use: other threads keep
scoring with the old model until the swap. Callers serialise learn_and_swap calls (two at
once would each start from the same model and the second would drop the first's update).

Must not: decide what the label is, or record anything (the caller records the event).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from atlas_milter.classifier import Model, features, learn, load_model, save_model
from atlas_milter.config import Config
from atlas_milter.message import parse_message


class ModelUser(Protocol):
    """What learn_and_swap needs of a pipeline: its model, the cutoffs in force, a swap."""

    @property
    def model(self) -> Model: ...

    @property
    def cutoffs(self) -> Any: ...

    def reload_model(self, model: Model) -> None: ...


@dataclass(frozen=True)
class Learned:
    model: Model  # the updated model, saved and in use
    before: float  # the message's score before and after the update
    after: float


def learned_model_path(config: Config) -> str:
    """The model file learning updates: [classifier] model, else [imap] learn_model, else
    `<db>.model.json.gz` (started from the shipped model)."""
    return config.classifier.model or config.imap.learn_model or f"{config.store.db}.model.json.gz"


def with_learned_model(config: Config) -> Config:
    """`config` using the model learning wrote, when [classifier] model is unset and that file
    exists. Not with [cluster]: every host then starts from the same configured or shipped
    model and learns through the shared stream (cluster_sync.py)."""
    if config.classifier.model or config.cluster.enabled:
        return config
    path = learned_model_path(config)
    if not Path(path).exists():
        return config
    return dataclasses.replace(config, classifier=dataclasses.replace(config.classifier, model=path))


def model_to_learn(path: str | Path) -> Model:
    """The model at `path` to learn into; the shipped model when there is no file there yet."""
    return load_model(path if Path(path).exists() else None)


def learn_message(model: Model, raw: bytes, is_spam: bool, max_bytes: int,
                  cutoffs: tuple[float, float] | None = None) -> tuple[float, float]:
    """Update `model` in place from one labelled message; its score (before, after)."""
    parsed = parse_message(raw, max_bytes)
    before = model.probability(model.margin(features(parsed, model.trusted_authserv)))
    return before, learn(model, parsed, is_spam, cutoffs=cutoffs)


def learn_and_swap(user: ModelUser, raw: bytes, is_spam: bool, max_bytes: int, path: str | Path) -> Learned:
    """Learn one message into a copy of `user`'s model, save it to `path` and make it the
    model in use. Learns toward the cutoffs in force (the config may override the model's),
    so a message learned as spam is then called spam; the file keeps its own cutoffs."""
    model = copy.deepcopy(user.model)
    in_force = user.cutoffs
    before, after = learn_message(model, raw, is_spam, max_bytes, (in_force.spam, in_force.ham))
    save_model(model, path)  # atomic: a reader sees the old file or the new, never half
    user.reload_model(model)
    return Learned(model, before, after)
