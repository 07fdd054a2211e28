"""The pipeline chains the stages the same way on the optimised and the plain path."""

import sqlite3
from pathlib import Path

import pytest

from atlas_milter.config import load_config
from atlas_milter.pipeline import Pipeline
from atlas_milter.sources import LocalSource

CAMPAIGN = b"From: Deals <deals@shop.example>\nTo: %s\nSubject: FREE prize!!!\nMessage-ID: <%s@shop.example>\nContent-Type: text/html\n\n<p>Click here to claim your FREE prize now!</p>\n"
HAM = b"From: Ann <ann@work.example>\nSubject: Re: notes\nMessage-ID: <n%d@work.example>\n\nThanks, the notes from today look right to me. %d\n"


def make_pipeline(tmp_path, **flags):
    env = {f"ENABLE_{k.upper()}": "true" if v else "false" for k, v in flags.items()}
    config = load_config(None, overrides={"store.db": str(tmp_path / "v.db"), "statsd.enabled": False}, env=env)
    return Pipeline(config)


def rows(tmp_path):
    con = sqlite3.connect(tmp_path / "v.db")
    try:
        return con.execute("select message_id, verdict, cache_hit, source from processed_emails order by id").fetchall()
    finally:
        con.close()


def items():
    out = [(f"c{i}", CAMPAIGN % (f"user{i}@x.example".encode(), str(i).encode())) for i in range(5)]
    out += [(f"h{i}", HAM % (i, i)) for i in range(5)]
    return out


@pytest.mark.parametrize("optimised", [True, False])
def test_batch_verdicts_and_records(tmp_path, optimised):
    flags = dict(caching=optimised, parallel=optimised, bulk_ops=optimised, streaming=optimised, monitoring=optimised)
    pipeline = make_pipeline(tmp_path, **flags)
    try:
        results = pipeline.process_batch(items())
        for r in results:
            pipeline.record(r, source="test")
        assert pipeline.flush(timeout=10)
    finally:
        pipeline.close()
    assert [r.key for r in results] == [k for k, _ in items()]
    campaign = [r.verdict for r in results[:5]]
    assert len({v.score for v in campaign}) == 1  # one campaign, one verdict
    stored = rows(tmp_path)
    assert len(stored) == 10
    assert {row[1] for row in stored[:5]} == {campaign[0].verdict}
    if optimised:
        # scored once: the other four copies come from the chunk or the cache
        assert sum(1 for r in campaign if r.cache_hit) == 4
    else:
        assert not any(r.cache_hit for r in campaign)


def test_cache_answers_a_repeat_across_calls(tmp_path):
    pipeline = make_pipeline(tmp_path)
    try:
        first = pipeline.classify(CAMPAIGN % (b"a@x", b"1"))
        second = pipeline.classify(CAMPAIGN % (b"b@x", b"2"))
        different = pipeline.classify((CAMPAIGN % (b"b@x", b"3")).replace(b"prize", b"gift"))
    finally:
        pipeline.close()
    assert not first.verdict.cache_hit and second.verdict.cache_hit and not different.verdict.cache_hit
    assert second.summary.message_id == "<2@shop.example>"


def test_process_source_streams_a_directory(tmp_path):
    mail = tmp_path / "mail"
    mail.mkdir()
    for i, (_, raw) in enumerate(items()):
        (mail / f"{i}.eml").write_bytes(raw)
    seen = []
    pipeline = make_pipeline(tmp_path)
    try:
        stats = pipeline.process_source(LocalSource(), str(mail), lambda r: seen.append(r) or r)
    finally:
        pipeline.close()
    assert stats.processed == 10 and stats.errors == 0 and len(seen) == 10


def test_reload_model_clears_the_cache(tmp_path):
    from atlas_milter.classifier import load_model

    pipeline = make_pipeline(tmp_path, parallel=False)
    try:
        pipeline.classify(CAMPAIGN % (b"a@x", b"1"))
        pipeline.reload_model(load_model())
        again = pipeline.classify(CAMPAIGN % (b"a@x", b"1"))
    finally:
        pipeline.close()
    assert not again.verdict.cache_hit


def test_the_milter_benchs_classifier_stub_scores_nothing(tmp_path):
    """scripts/milter_bench.py --stub-classifier runs STUB_CLASSIFIER in the milter: every
    message then gets its fixed ham score, unparsed and unscored, through the same pipeline."""
    import subprocess
    import sys

    from scripts.milter_bench import STUB_CLASSIFIER

    code = STUB_CLASSIFIER + (
        "\nfrom atlas_milter.config import load_config\nfrom atlas_milter.pipeline import Pipeline\n"
        f"config = load_config(None, overrides={{'store.db': {str(tmp_path / 'v.db')!r}, 'statsd.enabled': False}}, "
        "env={'ENABLE_PARALLEL': 'false'})\n"
        "p = Pipeline(config)\n"
        "r = p.classify(b'Subject: FREE cash prize!!!\\n\\nClick here to claim your prize now!\\n')\n"
        "print(r.verdict.score, r.verdict.verdict, r.verdict.model_version)\np.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.1", "ham", "stub"]
