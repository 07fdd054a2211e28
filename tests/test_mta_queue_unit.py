"""SendmailQueue on hand-written queue files (no Sendmail): held() and read() parse the hf file
(the qf format with a `q` quarantine reason) and the df body, delete() removes the files, and
bad or unknown ids are refused. The files copy what Sendmail 8.17 wrote in
tests/test_mta_queue_sendmail.py's instance, 8-bit quoting and an unexpanded macro included."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import Held, SendmailQueue

QID = "6B3EW93B014340"
HF = (
    b"V8\nT1796308329\nK1796308329\nN1\nP60116\nMDeferred: Connection refused by [127.0.0.1]\nF8bs\n"
    b"$_localhost [127.0.0.1]\n$rESMTP\n$sclient.test\n${daemon_flags}\n"
    b"qatlas-milter: spam score 0.991\n\t(ref 0123456789)\n"
    b"S<>\n"
    b"rRFC822; user@example.test\nRPFD:<user@example.test>\n"
    b"rRFC822; other@example.test\nRPFD:other@example.test\n"
    b"H?P?Return-Path: <\x81g>\n"
    b"H??Received: from client.test (localhost [127.0.0.1])\n"
    b"\tby mx.atlas.test (8.17.1.9/8.17.1.9) with ESMTP id 6B3EW93B014340;\n"
    b"\tThu, 3 Dec 2026 14:32:09 GMT\n"
    b"H?D?Date: Thu, 3 Dec 2026 14:32:09 GMT\n"
    b"H??From: a@example.test\n"
    b"H??Subject: caf\xc3\xa9 \xe2\xff\x80\xa6\n"
    b"H??X-Long: first part\n second part\n"
    b"H??X-Atlas-Verdict: spam\n"
    b".\n"
)
DF = b"body line one\n\xe2\x80\xa6\n"


def write_pair(directory: Path, qid: str = QID, hf: bytes = HF, df: bytes = DF) -> None:
    (directory / f"hf{qid}").write_bytes(hf)
    (directory / f"df{qid}").write_bytes(df)


@pytest.fixture
def queue(tmp_path) -> SendmailQueue:
    write_pair(tmp_path)
    (tmp_path / "qfAAAAAAAA000001").write_bytes(b"V8\nT1\nSx@y\nRPFD:z@y\n.\n")  # a normal queue item: not held
    (tmp_path / "dfAAAAAAAA000001").write_bytes(b"x\n")
    return SendmailQueue(queue_dir=str(tmp_path), sendmail="/nonexistent/sendmail")


def test_held_parses_the_hf_file(queue):
    assert queue.held() == [Held(
        queue_id=QID, arrival=1796308329.0, size=len(DF), sender="",
        recipients=("user@example.test", "other@example.test"),
        reason="atlas-milter: spam score 0.991 (ref 0123456789)",  # the continuation line joined on
    )]


def test_read_gives_headers_and_body(queue):
    assert queue.read(QID) == (
        b"Received: from client.test (localhost [127.0.0.1])\n"
        b"\tby mx.atlas.test (8.17.1.9/8.17.1.9) with ESMTP id 6B3EW93B014340;\n"
        b"\tThu, 3 Dec 2026 14:32:09 GMT\n"
        b"Date: Thu, 3 Dec 2026 14:32:09 GMT\n"
        b"From: a@example.test\n"
        b"Subject: caf\xc3\xa9 \xe2\x80\xa6\n"  # Sendmail's 0xff quote before 0x80 undone
        b"X-Long: first part\n second part\n"
        b"X-Atlas-Verdict: spam\n"
        b"\n"
        + DF
    )  # no Return-Path: its <$g> is filled in only at delivery


def test_queue_subdirectories(tmp_path):
    for sub in ("qf", "df", "xf"):
        (tmp_path / sub).mkdir()
    (tmp_path / "qf" / f"hf{QID}").write_bytes(HF)
    (tmp_path / "df" / f"df{QID}").write_bytes(DF)
    (tmp_path / "xf" / f"xf{QID}").write_bytes(b"transcript\n")
    queue = SendmailQueue(queue_dir=str(tmp_path))
    assert [h.queue_id for h in queue.held()] == [QID]
    assert queue.read(QID).endswith(b"\n\n" + DF)
    queue.delete(QID)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_delete_removes_only_that_message(queue, tmp_path):
    other = "6B3EW93B014999"
    write_pair(tmp_path, other)
    (tmp_path / f"xf{QID}").write_bytes(b"transcript\n")
    queue.delete(QID)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f"df{other}", f"hf{other}", "dfAAAAAAAA000001", "qfAAAAAAAA000001"])
    assert [h.queue_id for h in queue.held()] == [other]
    with pytest.raises(AtlasError, match=f"{QID}: not in the Sendmail quarantine"):
        queue.delete(QID)


@pytest.mark.parametrize("call", ["read", "release", "delete"])
def test_unknown_and_normal_queue_ids_are_not_held(queue, call):
    for qid in ("ZZZZZZZZ999999", "AAAAAAAA000001"):  # unknown; in the normal queue, not quarantined
        with pytest.raises(AtlasError, match=f"^{qid}: not in the Sendmail quarantine"):
            getattr(queue, call)(qid)


@pytest.mark.parametrize("call", ["read", "release", "delete"])
@pytest.mark.parametrize("bad", ["../x", "a;b", "", f"{QID}/../{QID}", f"-C/tmp/x{QID}", f"{QID}\n"])
def test_bad_ids_are_refused(queue, tmp_path, call, bad):
    with pytest.raises(AtlasError, match="is not a queue id"):
        getattr(queue, call)(bad)
    assert (tmp_path / f"hf{QID}").exists()


def test_release_without_sendmail_is_one_atlas_error(queue, tmp_path):
    with pytest.raises(AtlasError, match=r"^releasing 6B3EW93B014340: /nonexistent/sendmail not found"):
        queue.release(QID)
    assert (tmp_path / f"hf{QID}").exists()


def test_missing_queue_directory(tmp_path):
    with pytest.raises(AtlasError, match="listing the Sendmail quarantine: .*: No such file or directory"):
        SendmailQueue(queue_dir=str(tmp_path / "missing")).held()
