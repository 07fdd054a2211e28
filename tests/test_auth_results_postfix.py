"""The milter front door with the admin's own verifier in front, through a real Postfix:
smtpd_milters = verifier, atlas-milter. The verifier (tests/support/verifier_milter.py, in
OpenDKIM's place) inserts an Authentication-Results field; atlas-milter, with
[classifier] trusted_authserv_id naming it and a model that has learned a weight for
`auth:dmarc-fail`, scores with it, and without the setting it does not."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_milter.classifier import load_model, save_model
from tests.support.milter_process import MilterProcess, milter_workdir, unix_spec
from tests.support.servers import wait_until
from tests.support.smtp import delivered_by_token, header, new_token, send_one, with_token

pytestmark = pytest.mark.integration

VERIFIER = Path(__file__).resolve().parent / "support" / "verifier_milter.py"
HAM = (b"From: Ann <ann@work.example>\nTo: user@example.test\nSubject: minutes of the review\n"
       b"Date: Wed, 2 Dec 2026 10:00:00 +0000\nMessage-ID: <m1@work.example>\n\n"
       b"Thanks for the review yesterday, the notes are in the shared folder.\n")


@pytest.fixture(scope="module")
def workdir():
    path = milter_workdir("atlas-milter-authres-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def verifier(workdir):
    sock = workdir / "verifier.sock"
    proc = subprocess.Popen([sys.executable, str(VERIFIER), f"unix:{sock}",
                             "mx.atlas.test; dkim=none; spf=fail smtp.mailfrom=work.example; dmarc=fail header.from=work.example"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(sock.exists, timeout=20, what="verifier milter socket", proc=proc)
    yield f"unix:{sock}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def atlas(workdir: Path, name: str, trusted: bool) -> MilterProcess:
    model = load_model()
    model.weights["auth:dmarc-fail"] = 8.0  # as learning would give it at a site whose users junk such mail
    model_path = workdir / "site-model.json.gz"
    save_model(model, model_path)
    lib, _ = unix_spec(workdir / f"{name}.sock")
    trust = 'trusted_authserv_id = ["mx.atlas.test"]\n' if trusted else ""
    config = (f'[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\n'
              f'[classifier]\nmodel = "{model_path}"\n{trust}')
    return MilterProcess(workdir, lib, config_text=config, name=name).start()


@pytest.mark.parametrize("trusted", [True, False])
def test_the_verifiers_results_reach_the_score_only_when_trusted(postfix, workdir, verifier, trusted):
    proc = atlas(workdir, f"atlas-{'trusted' if trusted else 'plain'}", trusted)
    try:
        with postfix.milter_set(f"{verifier}, {proc.socket_spec}"):
            token = new_token()
            code, text = send_one(postfix.host, postfix.smtp_port, with_token(HAM, token), [postfix.user])
            assert code == 250, text
            delivered = delivered_by_token(postfix, {token})[token]
    finally:
        proc.stop()
    assert header(delivered, "Authentication-Results") == [
        "mx.atlas.test; dkim=none; spf=fail smtp.mailfrom=work.example; dmarc=fail header.from=work.example"]
    reasons = header(delivered, "X-Atlas-Reasons")[0]
    if trusted:
        assert "auth:dmarc-fail" in reasons and header(delivered, "X-Atlas-Verdict") == ["spam"]
    else:
        assert "auth:" not in reasons and header(delivered, "X-Atlas-Verdict") == ["ham"]
