"""The atlas-milter command as a user runs it: real processes, real files, one-line errors."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path


SAMPLE = Path(__file__).resolve().parents[1] / "atlas_milter" / "data" / "sample"
SPAM = b"From: x@deals.example\nSubject: FREE cash prize!!!\nContent-Type: text/html\n\n<p>Click here to claim your prize now!</p>\n"
HAM = b"From: ann@work.example\nSubject: Re: review\n\nThanks for the review, the tests pass on my machine now.\n"


def run(*args, input=None, cwd=None):
    env = dict(os.environ, ENABLE_PARALLEL="false")
    return subprocess.run([sys.executable, "-m", "atlas_milter", *args], input=input, capture_output=True, cwd=cwd, env=env, timeout=300)


def test_classify_json_for_file_dir_mbox_and_stdin(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.eml").write_bytes(SPAM)
    (tmp_path / "box.mbox").write_bytes(b"From a@b Mon Jan 1 00:00:00 2002\n" + SPAM + b"\nFrom a@b Mon Jan 1 00:00:00 2002\n" + HAM)
    proc = run("classify", "--json", str(tmp_path / "d"), str(tmp_path / "box.mbox"), "-", input=HAM)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [l["path"] for l in lines] == [str(tmp_path / "d" / "a.eml"), f"{tmp_path / 'box.mbox'}:0", f"{tmp_path / 'box.mbox'}:1", "-"]
    for line in lines:
        assert line["verdict"] in ("spam", "ham", "unsure") and 0 <= line["score"] <= 1 and line["reasons"]
    assert lines[0]["verdict"] == "spam" and lines[3]["verdict"] == "ham"


def test_classify_human_output_and_garbage_input(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(50_000))
    proc = run("classify", str(junk))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith(f"{junk}: ")


def test_classify_missing_file_is_one_line_error(tmp_path):
    proc = run("classify", str(tmp_path / "nope.eml"))
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().count("\n") == 0
    assert proc.stderr.decode().startswith("Error: ") and "no such file" in proc.stderr.decode()


def test_bad_config_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[classifier]\nspam_cutof = 0.9\n")
    proc = run("classify", "--config", str(cfg), str(SAMPLE))
    assert proc.returncode == 1 and "spam_cutof" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_train_learn_eval_round_trip(tmp_path):
    ham, spam = tmp_path / "ham", tmp_path / "spam"
    ham.mkdir()
    spam.mkdir()
    for i in range(12):
        (ham / f"{i}.eml").write_bytes(HAM.replace(b"review", b"review %d" % i))
        (spam / f"{i}.eml").write_bytes(SPAM.replace(b"prize", b"prize %d" % i))
    model = tmp_path / "m.json.gz"
    proc = run("train", "--ham", str(ham), "--spam", str(spam), "-o", str(model))
    assert proc.returncode == 0, proc.stderr
    assert model.exists()
    proc = run("eval", "--ham", str(ham), "--spam", str(spam), "--model", str(model), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("n", "spam_recall", "ham_fpr", "auc", "unsure_rate", "msgs_per_s"):
        assert key in report
    assert report["n"] == 24 and report["auc"] > 0.9
    target = tmp_path / "learned.json.gz"
    sneaky = tmp_path / "sneaky.eml"
    sneaky.write_bytes(b"Subject: quarterly partner update\n\nPlease see the quarterly update from our partners.\n")
    before = json.loads(run("classify", "--json", "--model", str(model), str(sneaky)).stdout)["score"]
    proc = run("learn", "--spam", str(sneaky), "--model", str(target))
    assert proc.returncode == 0, proc.stderr
    after = json.loads(run("classify", "--json", "--model", str(target), str(sneaky)).stdout)["score"]
    assert after > before


def test_train_on_several_indexes_with_a_source_weight(tmp_path):
    for corpus, word in (("old", "review"), ("new", "invoice")):
        folder = tmp_path / corpus
        folder.mkdir()
        rows = ["path,label,group,split"]
        for i in range(8):
            (folder / f"h{i}.eml").write_bytes(HAM.replace(b"review", b"%s %d" % (word.encode(), i)))
            (folder / f"s{i}.eml").write_bytes(SPAM.replace(b"prize", b"prize %d" % i))
            rows += [f"h{i}.eml,ham,g,train", f"s{i}.eml,spam,g,train"]
        (folder / "index.csv").write_text("\n".join(rows) + "\n")
    indexes = ["--index", str(tmp_path / "old" / "index.csv"), "--index", str(tmp_path / "new" / "index.csv")]
    model = tmp_path / "m.json"
    proc = run("train", *indexes, "--split", "train", "--weight", "new=3", "-o", str(model))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(model.read_text())
    assert saved["meta"]["trained_on"] == {"ham": 16, "spam": 16}
    assert saved["meta"]["options"]["source_weights"] == {"new": 3.0}
    for bad, says in ((["--weight", "new"], "expected SOURCE=N"), (["--weight", "new=0"], "expected SOURCE=N"),
                      (["--weight", "newer=2"], "not a training source")):
        proc = run("train", *indexes, "--split", "train", *bad, "-o", str(model))
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.startswith("Error: ") and says in err and err.count("\n") == 1, err


def test_demo_writes_the_database(tmp_path):
    proc = run("demo", "--db", str(tmp_path / "demo.db"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "SPAM" in out and "HAM" in out and "messages in" in out
    con = sqlite3.connect(tmp_path / "demo.db")
    count = con.execute("select count(*) from processed_emails").fetchone()[0]
    con.close()
    assert count == len(list(SAMPLE.iterdir()))


def test_migrate_stats_and_rollback(tmp_path):
    db = str(tmp_path / "s.db")
    assert run("migrate", "--db", db).returncode == 0
    assert "up to date" in run("migrate", "--db", db).stdout.decode()
    assert run("classify", "--db", db, str(SAMPLE)).returncode == 0
    stats = json.loads(run("stats", "--db", db, "--json").stdout)
    assert stats["total"] == len(list(SAMPLE.iterdir()))
    proc = run("migrate", "--db", db, "--rollback")
    assert proc.returncode == 0 and "rolled back" in proc.stdout.decode()
    assert "pending" in run("migrate", "--db", db, "--status").stdout.decode()


def test_stats_without_database_is_one_line_error(tmp_path):
    proc = run("stats", "--db", str(tmp_path / "none.db"))
    assert proc.returncode == 1 and proc.stderr.decode().startswith("Error: ")


def test_version_names_the_package_the_shipped_model_and_the_classifier():
    from atlas_milter import __version__
    from atlas_milter.classifier import hot_path, load_model

    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"atlas-milter {__version__}, shipped model {load_model().version}, {hot_path()}\n"


def test_version_without_a_readable_model_says_so(tmp_path):
    code = ("import sys, atlas_milter.classifier as c; from atlas_milter.cli import main\n"
            "c.SHIPPED_MODEL = 'missing.json.gz'\nsys.exit(main(['--version']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.startswith("atlas-milter ") and "no usable shipped model (model shipped model missing.json.gz: no such file" in proc.stdout


def test_unknown_flag_exits_non_zero():
    proc = run("classify", "--bogus", "x")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr.decode()


def test_sigterm_flushes_every_recorded_verdict(tmp_path):
    import signal
    import time

    mail = tmp_path / "mail"
    mail.mkdir()
    for i in range(3000):
        (mail / f"{i:05d}.eml").write_bytes(HAM.replace(b"review", b"review %d" % i))
    db = tmp_path / "t.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas_milter", "classify", "--json", "--db", str(db), str(mail)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, ENABLE_PARALLEL="false"),
    )
    for _ in range(200):  # wait until it is well under way
        if proc.stdout.readline() and db.exists():
            break
    for _ in range(50):
        proc.stdout.readline()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 128 + signal.SIGTERM
    recorded = int(err.decode().split("stopped: ")[1].split()[0])
    con = sqlite3.connect(db)
    try:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        rows = con.execute("select count(*) from processed_emails").fetchone()[0]
    finally:
        con.close()
    assert 0 < recorded < 3000
    assert rows == recorded


def test_check_config_prints_effective_config_without_secrets(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\ntoken = "s3cret-token"\n[performance]\nprofile = "medium"\n')
    proc = run("check-config", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["performance"]["workers"] == 4
    assert "s3cret-token" not in proc.stdout.decode() + proc.stderr.decode()
    bad = tmp_path / "bad.toml"
    bad.write_text('[milter]\nspam_action = "bounce"\n')
    proc = run("check-config", "--config", str(bad))
    assert proc.returncode == 1 and "spam_action" in proc.stderr.decode()
