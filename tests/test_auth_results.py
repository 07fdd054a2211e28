"""Authentication-Results from the admin's own verifier (auth_results.py, [classifier]
trusted_authserv_id): which fields count and what they say, as features; that they reach
the score (compiled and reference alike) and the learn path; that nothing changes without
the setting; and, as a user runs it, `atlas-milter learn` then `classify` with a config."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter import auth_results, classifier
from atlas_milter.classifier import features, load_model
from atlas_milter.config import load_config
from atlas_milter.errors import ConfigError
from atlas_milter.learning import learn_message
from atlas_milter.message import parse_message
from tests.test_cli import run

TRUSTED = ("mx.example.org",)


def message(*results: str, sender: str = "billing@shop.example") -> bytes:
    fields = "".join(f"Authentication-Results: {r}\n" for r in results)
    return (f"{fields}From: Shop <{sender}>\nTo: you@example.org\nSubject: Your invoice 4711\n"
            "Message-ID: <1@shop.example>\nDate: Wed, 2 Dec 2026 10:00:00 +0000\n\n"
            "Your invoice for order 4711 is attached. Thank you for your order.\n").encode()


def auth_features(raw: bytes, trusted=TRUSTED) -> set[str]:
    msg = parse_message(raw)
    return auth_results.features(msg.headers, msg.sender_domain, trusted, classifier._domain_tail)


def test_the_trusted_verifiers_results_become_features():
    raw = message("mx.example.org; dkim=pass (2048-bit key) header.d=mail.shop.example header.s=s1;\n"
                  " spf = softfail smtp.mailfrom=bounce.example; dmarc=pass (p=reject) header.from=shop.example")
    assert auth_features(raw) == {"auth:dkim-pass", "auth:dkim-pass-from-domain", "auth:spf-softfail", "auth:dmarc-pass"}


def test_a_signature_of_another_domain_is_not_the_senders():
    raw = message("MX.Example.ORG 1; dkim/1=pass header.i=@esp.example; arc=none; x-custom=pass")
    assert auth_features(raw) == {"auth:dkim-pass", "auth:arc-none"}


def test_other_servers_results_and_untrusted_setups_are_ignored():
    forged_elsewhere = message("mx.other.example; dkim=pass header.d=shop.example; dmarc=pass",
                               "mx.example.org.evil.example; spf=pass")
    assert auth_features(forged_elsewhere) == set()
    trusted_field = message("mx.example.org; dmarc=fail header.from=shop.example")
    assert auth_features(trusted_field, trusted=()) == set()
    assert auth_features(message("mx.example.org; none")) == set()
    assert auth_features(message("mx.example.org (no results); dkim=bogus; spf")) == set()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.lists(st.sampled_from(["mx.example.org", "MX.example.org", "", "a b"]), max_size=3))
def test_any_field_value_gives_features_or_none_never_an_error(value, trusted):
    headers = [("authentication-results", "mx.example.org;" + value), ("authentication-results", value)]
    for name in auth_results.features(headers, "shop.example", tuple(trusted), classifier._domain_tail):
        assert name.startswith("auth:")


def test_the_features_move_the_score_the_same_compiled_and_reference():
    raw = message("mx.example.org; dkim=pass header.d=shop.example; spf=pass; dmarc=pass")
    msg = parse_message(raw)
    compiled, reference = load_model(), load_model()
    reference.compiled = False
    plain = compiled.score(msg).score
    for model in (compiled, reference):
        model.weights.update({"auth:dmarc-pass": -2.0, "auth:dkim-pass-from-domain": -1.0})
        assert model.score(msg).score == pytest.approx(plain, abs=1e-12)  # not trusted: not read
        model.trusted_authserv = TRUSTED
    scores = [model.score(msg) for model in (compiled, reference)]
    assert scores[0].score == pytest.approx(scores[1].score, abs=1e-12)
    assert scores[0].score < plain - 0.01
    assert scores[0].reasons == scores[1].reasons


def test_learning_weighs_them_where_configured():
    raw = message("mx.example.org; dkim=fail header.d=shop.example; spf=fail; dmarc=fail")
    plain, site = load_model(), load_model()
    assert not any(name.startswith("auth:") for name in plain.weights)  # the shipped model never saw any
    before = learn_message(plain, raw, True, 512 * 1024)[0]
    assert before < plain.spam_cutoff  # so learning it changes weights
    assert not any(name.startswith("auth:") for name in plain.weights)
    site.trusted_authserv = TRUSTED
    assert {"auth:dmarc-fail", "auth:spf-fail"} <= features(parse_message(raw), TRUSTED)[1]
    learn_message(site, raw, True, 512 * 1024)
    assert site.weights["auth:dmarc-fail"] > 0 and site.weights["auth:dkim-fail"] > 0


def test_the_setting_is_checked():
    config = load_config(None, {"classifier.trusted_authserv_id": ["mx.example.org", "auth.example.org"]}, env={})
    assert config.classifier.trusted_authserv_id == ("mx.example.org", "auth.example.org")
    for bad in (["mx example"], [""], ["mx.example.org;"]):
        with pytest.raises(ConfigError, match="trusted_authserv_id"):
            load_config(None, {"classifier.trusted_authserv_id": bad}, env={})
    with pytest.raises(ConfigError, match="expected a list"):
        load_config(None, {"classifier.trusted_authserv_id": "mx.example.org"}, env={})


def test_learn_then_classify_from_the_command_line(tmp_path):
    """A site whose verifier is mx.example.org teaches atlas-milter a failing sender; the
    same results then push that mail toward spam, and only under that config."""
    failing = tmp_path / "failing.eml"
    failing.write_bytes(message("mx.example.org; dkim=fail header.d=shop.example; spf=fail; dmarc=fail"))
    cfg = tmp_path / "atlas-milter.toml"
    cfg.write_text('[classifier]\ntrusted_authserv_id = ["mx.example.org"]\n')
    model = tmp_path / "site-model.json"
    proc = run("learn", "--config", str(cfg), "--model", str(model), "--spam", str(failing))
    assert proc.returncode == 0, proc.stderr
    weights = json.loads(model.read_text())["weights"]
    assert weights["auth:dmarc-fail"] > 0 and weights["auth:spf-fail"] > 0

    other = tmp_path / "other.eml"  # a different message, with the same results
    other.write_bytes(message("mx.example.org; dkim=fail header.d=shop.example; spf=fail; dmarc=fail",
                              sender="orders@store.example").replace(b"invoice 4711", b"order 815"))
    model_cfg = tmp_path / "with-model.toml"
    model_cfg.write_text(f'[classifier]\nmodel = "{model}"\ntrusted_authserv_id = ["mx.example.org"]\n')
    plain_cfg = tmp_path / "plain.toml"
    plain_cfg.write_text(f'[classifier]\nmodel = "{model}"\n')
    scores = {}
    for name, config in (("trusted", model_cfg), ("plain", plain_cfg)):
        proc = run("classify", "--json", "--config", str(config), str(other))
        assert proc.returncode == 0, proc.stderr
        scores[name] = json.loads(proc.stdout)["score"]
    assert scores["trusted"] > scores["plain"] + 0.01


def test_train_reads_them_for_a_site_model_only_with_the_setting(tmp_path):
    """`atlas-milter train` on a site's own verified mail: with trusted_authserv_id the
    verifier's results are features of the trained model; without it they are not."""
    ham_dir, spam_dir = tmp_path / "ham", tmp_path / "spam"
    ham_dir.mkdir(), spam_dir.mkdir()
    topics = ["invoice", "meeting", "report", "delivery", "review", "budget", "travel", "release"]
    for i, topic in enumerate(topics):
        (ham_dir / f"{i}.eml").write_bytes(message("mx.example.org; dkim=pass header.d=shop.example; dmarc=pass")
                                           .replace(b"invoice 4711", f"{topic} {i}".encode()))
        (spam_dir / f"{i}.eml").write_bytes(message("mx.example.org; dkim=fail header.d=shop.example; dmarc=fail",
                                                    sender=f"win{i}@prize{i}.example")
                                            .replace(b"invoice 4711", f"WIN a {topic} now {i}".encode()))
    cfg = tmp_path / "site.toml"
    cfg.write_text('[classifier]\ntrusted_authserv_id = ["mx.example.org"]\n')
    trained = {}
    for name, extra in (("site", ["--config", str(cfg)]), ("plain", [])):
        out = tmp_path / f"{name}.json"
        proc = run("train", "--ham", str(ham_dir), "--spam", str(spam_dir), "-o", str(out), *extra)
        assert proc.returncode == 0, proc.stderr
        trained[name] = json.loads(out.read_text())["weights"]
    assert trained["site"]["auth:dmarc-fail"] > 0 > trained["site"]["auth:dmarc-pass"]
    assert not any(name.startswith("auth:") for name in trained["plain"])
