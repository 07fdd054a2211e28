"""learning.py: the one way a labelled message reaches a model (the IMAP listener and
`atlas-milter learn` both use it)."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

from atlas_milter.classifier import load_model
from atlas_milter.config import load_config
from atlas_milter.learning import learn_and_swap, learn_message, learned_model_path, model_to_learn, with_learned_model

Cutoffs = namedtuple("Cutoffs", "spam ham")  # the shape of the pipeline's cutoffs
SAMPLE = Path(__file__).resolve().parents[1] / "atlas_milter" / "data" / "sample"


@dataclass
class Holder:
    """What a pipeline offers learn_and_swap: its model, the cutoffs in force, a swap."""

    model: object
    cutoffs: Cutoffs
    swapped: list

    def reload_model(self, model) -> None:
        self.swapped.append(model)
        self.model = model


def test_learn_and_swap_updates_a_copy_saves_it_and_swaps_it_in(tmp_path):
    shipped = load_model()
    weights_before = dict(shipped.weights)
    raw = (SAMPLE / "01-team-meeting.eml").read_bytes()
    # Cutoffs in force far below the model's own: learning as spam aims past them, not past the model's.
    holder = Holder(shipped, Cutoffs(spam=0.3, ham=0.1), [])
    path = tmp_path / "learned.json.gz"
    done = learn_and_swap(holder, raw, True, 1 << 20, path)
    assert holder.swapped == [done.model] and holder.model is done.model
    assert shipped.weights == weights_before and done.model is not shipped  # the model in use was not touched
    assert done.before < 0.3 <= done.after < shipped.spam_cutoff
    assert (done.model.spam_cutoff, done.model.ham_cutoff) == (shipped.spam_cutoff, shipped.ham_cutoff)
    saved = load_model(path)
    assert saved.version == done.model.version and saved.version != shipped.version


def test_learn_message_is_what_the_cli_uses(tmp_path):
    path = tmp_path / "m.json"
    model = model_to_learn(path)  # no file yet: the shipped model
    assert model.version == load_model().version
    before, after = learn_message(model, (SAMPLE / "07-crypto-scam.eml").read_bytes(), False, 1 << 20)
    assert after < before and after <= max(0.01, model.ham_cutoff - 0.05) + 1e-9


def test_learned_model_path_and_with_learned_model(tmp_path):
    db = tmp_path / "v.db"
    config = load_config(None, {"store.db": str(db)}, env={})
    assert learned_model_path(config) == f"{db}.model.json.gz"
    assert with_learned_model(config) is config  # nothing learned yet
    Path(f"{db}.model.json.gz").write_bytes(b"")
    assert with_learned_model(config).classifier.model == f"{db}.model.json.gz"
