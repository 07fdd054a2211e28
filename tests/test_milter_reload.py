"""Reloading the milter (SIGUSR1): a changed config file or model changes the next decisions;
a garbage model or an invalid config keeps the old ones and is counted (reload.failed) and
gauged (reload.failing); settings only a restart applies are named in a warning; a message
already at end of message finishes wholly with the state it started with.

Fast, in-process: pymilter's test context (the adapter tests' Ctx) with a real pipeline,
config files and model files in tmp_path. The reload through a real Postfix under load is
tests/test_milter_reload_load.py."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import threading
import time

import Milter
import pytest

from atlas_milter.adapters import milter as am
from atlas_milter.classifier import load_model, save_model
from atlas_milter.config import load_config
from atlas_milter.reload import COUNTER_RELOAD_FAILED, COUNTER_RELOAD_OK, GAUGE_RELOAD_FAILING

from tests.test_milter_adapter import HAM, SPAM, feed, rows  # noqa: E402 - the adapter tests' helpers


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    """The shipped model as a plain JSON model file (written once: it is 130,000 weights)."""
    path = tmp_path_factory.mktemp("model") / "model.json"
    save_model(load_model(), path)
    return path.read_bytes()


class Setup:
    """A config file, a model file next to it and an engine started from them."""

    def __init__(self, tmp_path, model_bytes: bytes, milter: str = "", model_path=None, other: str = "") -> None:
        self.tmp = tmp_path
        self.config_path = tmp_path / "atlas.toml"
        self.model_path = model_path or tmp_path / "model.json"
        if model_path is None:
            self.model_path.write_bytes(model_bytes)
        self.write(milter, other=other)
        config = self.read()
        pipeline, err = am.make_pipeline(config)
        pipeline.metrics.reset()
        self.engine = am.MilterEngine(config, pipeline, err)

    def write(self, milter: str = "", classifier: str = "", other: str = "") -> None:
        text = f'{other}\n[classifier]\nmodel = "{self.model_path}"\n{classifier}\n[milter]\n{milter}\n'
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def read(self):
        return load_config(self.config_path, {"store.db": str(self.tmp / "v.db"), "statsd.enabled": False}, env={})

    def reload(self) -> bool:
        return self.engine.reload(self.read)

    def counters(self) -> dict:
        return self.engine.metrics.get_counters()

    def failing(self) -> float | None:
        return self.engine.metrics.get_gauges().get(GAUGE_RELOAD_FAILING)


@pytest.fixture
def setup(tmp_path, model_bytes):
    made = []

    def make(**kw):
        s = Setup(tmp_path, model_bytes, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.engine.close()


def test_reload_with_a_changed_policy_changes_the_decision(setup):
    s = setup(milter='spam_action = "tag"')
    rc, ctx = feed(s.engine, SPAM)
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "spam"
    s.write(milter='spam_action = "reject"\nreject_text = "go away (ref {ref})"')
    assert s.reload()
    rc, ctx = feed(s.engine, SPAM)
    assert rc == Milter.REJECT and ctx._reply[2].startswith("go away (ref ")
    rc, ctx = feed(s.engine, HAM)
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "ham"
    assert s.counters()[COUNTER_RELOAD_OK] == 1 and s.failing() == 0
    # and back: lists and per-recipient rules are part of the policy too
    s.write(milter='spam_action = "reject"\ndeny_senders = ["bad.example"]\n'
                   '[milter.recipients."keep@example.test"]\nopt_out = true')
    assert s.reload()
    assert feed(s.engine, HAM, sender="x@bad.example")[0] == Milter.REJECT
    assert feed(s.engine, SPAM, rcpts=("keep@example.test",))[0] == Milter.ACCEPT


def test_reload_with_a_new_model_and_cutoffs(setup, tmp_path):
    s = setup()
    other = load_model()
    other.meta["version"] = "other-model-1"
    other_path = tmp_path / "other.json.gz"
    save_model(other, other_path)
    s.model_path = other_path
    s.write(classifier="spam_cutoff = 0.999\nham_cutoff = 0.998")
    assert s.reload()
    rc, ctx = feed(s.engine, HAM)
    assert ctx.added()["X-Spam-Status"].endswith("required=0.999")
    assert rows(s.engine)[-1]["model_version"] == "other-model-1"


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(os.urandom(4096))


def _wrong_schema(path):
    path.write_text('{"format": "atlas-milter-model", "format_version": 1, "weights": "all of them"}')


def _gzip_of_garbage(path):
    path.write_bytes(gzip.compress(b"\x00\x01 not json"))


def _missing(path):
    path.unlink()


@pytest.mark.parametrize("spoil", [_truncated, _random_bytes, _wrong_schema, _gzip_of_garbage, _missing])
def test_garbage_model_keeps_the_old_model_and_policy(setup, model_bytes, spoil, caplog):
    s = setup(milter='spam_action = "tag"')
    before = s.engine.state
    spoil(s.model_path)
    s.write(milter='spam_action = "reject"')  # must not apply without its model either
    with caplog.at_level(logging.INFO, logger="atlas_milter"):
        assert not s.reload()
    assert s.engine.state is before
    rc, ctx = feed(s.engine, SPAM)
    assert rc == Milter.ACCEPT and ctx.added()["X-Atlas-Verdict"] == "spam"  # old model, old policy
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "reload failed" in errors[0].getMessage() and str(s.model_path) in errors[0].getMessage()
    assert errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert s.counters()[COUNTER_RELOAD_FAILED] == 1 and s.failing() == 1
    # The admin fixes the file: the next reload takes, and the gauge clears.
    s.model_path.write_bytes(model_bytes)
    assert s.reload()
    assert feed(s.engine, SPAM)[0] == Milter.REJECT
    assert s.failing() == 0 and s.counters()[COUNTER_RELOAD_OK] == 1


@pytest.mark.parametrize("text,named", [
    ('[milter]\nspam_action = "bounce"\n', "spam_action"),
    ('[milter]\nspam_actoin = "reject"\n', "spam_actoin"),
    ('[milter\nspam_action = "reject"\n', "not valid TOML"),
    ('[milter]\ntrusted_networks = ["10.0.0.300/8"]\n', "trusted_networks"),
])
def test_invalid_config_keeps_the_old_one(setup, text, named, caplog):
    s = setup(milter='spam_action = "tag"')
    before = s.engine.state
    s.config_path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="atlas_milter"):
        assert not s.reload()
        assert not s.reload()  # still bad: counted again
    assert s.engine.state is before
    assert feed(s.engine, SPAM)[0] == Milter.ACCEPT
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 2 and all(named in m and "previous configuration" in m for m in messages)
    assert s.counters()[COUNTER_RELOAD_FAILED] == 2 and s.failing() == 1


def test_settings_needing_a_restart_are_named_and_the_rest_applies(setup, caplog):
    s = setup(milter='spam_action = "tag"')
    s.config_path.write_text(
        f'[classifier]\nmodel = "{s.model_path}"\n[milter]\nspam_action = "reject"\nclassify = "thread"\n'
        'socket = "inet:9999@127.0.0.1"\nmax_in_flight = 3\n[performance]\nworkers = 7\n')
    with caplog.at_level(logging.WARNING, logger="atlas_milter"):
        assert s.reload()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("milter.socket", "milter.classify", "milter.max_in_flight", "performance.workers"):
        assert name in warning
    assert "spam_action" not in warning
    assert feed(s.engine, SPAM)[0] == Milter.REJECT
    assert s.engine.mode == "inline" and s.engine.max_in_flight == 32  # as started


def test_a_message_in_flight_finishes_with_the_state_it_started_with(setup, tmp_path):
    s = setup(milter='spam_action = "tag"')
    old_cutoff = s.engine.state.scorer.cutoffs.spam
    new_model = load_model()
    new_model.meta["version"] = "new-model-2"
    save_model(new_model, tmp_path / "new.json")
    real = s.engine.pipeline.classify
    in_classify, release = threading.Event(), threading.Event()

    def held(raw, key="", timeout=None, scorer=None):
        in_classify.set()
        assert release.wait(10)
        return real(raw, key, timeout=timeout, scorer=scorer)

    s.engine.pipeline.classify = held
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("first", feed(s.engine, SPAM)))
    t.start()
    assert in_classify.wait(10)
    s.model_path = tmp_path / "new.json"
    s.write(milter='spam_action = "reject"', classifier="spam_cutoff = 0.9\nham_cutoff = 0.1")
    assert s.reload()  # does not wait for the message in flight
    release.set()
    t.join(10)
    rc, ctx = out["first"]
    assert rc == Milter.ACCEPT  # the old action ...
    assert ctx.added()["X-Spam-Status"].endswith(f"required={old_cutoff:.3f}")  # ... the old cutoffs ...
    assert rows(s.engine)[-1]["model_version"] == load_model().version  # ... and the old model
    s.engine.pipeline.classify = real
    rc, ctx = feed(s.engine, SPAM)
    assert rc == Milter.REJECT
    assert rows(s.engine)[-1]["model_version"] == "new-model-2"


def test_a_model_missing_at_start_is_picked_up_by_a_reload(setup, model_bytes, tmp_path):
    s = setup(model_path=tmp_path / "not-yet.json")
    assert s.engine.model_error
    rc, ctx = feed(s.engine, SPAM)
    assert ctx.added()["X-Atlas-Verdict"] == "unchecked"
    (tmp_path / "not-yet.json").write_bytes(model_bytes)
    assert s.reload()
    rc, ctx = feed(s.engine, SPAM)
    assert ctx.added()["X-Atlas-Verdict"] == "spam"


def test_restart_only_changes_names_never_values():
    base = load_config(None, {"http.token": "old-secret"}, env={})
    new = dataclasses.replace(base, http=dataclasses.replace(base.http, token="new-secret"))
    assert am.restart_only_changes(base, new) == ["http.token"]
    assert am.restart_only_changes(base, base) == []


def test_pool_mode_reload_starts_new_workers_and_retires_the_old_after_the_deadline(setup):
    pool_mode = 'classify = "pool"\ntimeout = 0.5\n'
    s = setup(milter=pool_mode, other="[performance]\nworkers = 2")
    old = s.engine.state.scorer
    assert old.pool is not None
    assert feed(s.engine, SPAM)[0] == Milter.ACCEPT
    s.write(milter=pool_mode + 'spam_action = "reject"', other="[performance]\nworkers = 2")
    assert s.reload()
    assert s.engine.state.scorer.pool not in (None, old.pool)
    assert feed(s.engine, SPAM)[0] == Milter.REJECT
    # A message that read the old state just before the swap still gets its verdict ...
    assert s.engine.pipeline.classify(SPAM, "late", timeout=5, scorer=old).verdict.verdict == "spam"
    # ... and the old workers stop once no such message can be left (timeout + 1 s).
    time.sleep(0.5 + 1.0 + 0.5)
    with pytest.raises(RuntimeError):
        s.engine.pipeline.classify(HAM, "too-late", timeout=5, scorer=old)
