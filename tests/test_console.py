"""The admin's console over real HTTP from the in-process server: who may see it (token,
session cookie, a reverse proxy's header), CSRF on every action, escaping of what came
from mail, the history JSON and its search, one decision, and the quarantine's actions
and their audit records. The MTA is the edge here: a small in-memory hold queue stands in
for it (test_quarantine_e2e.py drives a real Postfix)."""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
from urllib.parse import urlencode

import pytest

from atlas_milter import web
from atlas_milter.config import load_config
from atlas_milter.console import Console, esc
from atlas_milter.errors import AtlasError
from tests.support.console import HOSTILE, TOKEN, make_site



@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path)


def start(tmp_path, db, queue, token=TOKEN, auth_header="", show_bodies=False, learned=None):
    config = load_config(None, {"store.db": str(db), "http.show_bodies": show_bodies,
                                "classifier.model": str(tmp_path / "learned.json.gz")}, env={})
    console = Console(config, queue, (lambda: learned.append(1)) if learned is not None else None)
    return web.start_http_server("127.0.0.1", 0, lambda: {"messages": 0}, token=token, console=console,
                                 auth_header=auth_header, sample_interval=60)


def request(srv, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{srv.port}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def login(srv) -> dict[str, str]:
    status, headers, _ = request(srv, "GET", f"/history?verdict=spam&token={TOKEN}")
    assert status == 303 and headers["Location"] == "/history?verdict=spam"  # the token leaves the URL
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return {"Cookie": cookie.split(";")[0]}


def csrf_of(page: bytes) -> str:
    return re.search(rb'name="csrf" value="([0-9a-f]+)"', page).group(1).decode()


# -- access ------------------------------------------------------------------------------------

def test_every_console_page_needs_the_token_and_a_session_cookie_carries_it(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue) as srv:
        for path in ("/history", "/history.json", "/decision/1", "/quarantine", "/quarantine/4QAAA00000"):
            assert request(srv, "GET", path)[0] == 401, path
            assert request(srv, "GET", path, {"Authorization": "Bearer wrong"})[0] == 401, path
            assert request(srv, "GET", path, {"Cookie": "atlas_console=forged"})[0] == 401, path
            assert request(srv, "GET", path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
        assert request(srv, "GET", "/history?token=wrong")[0] == 401
        cookie = login(srv)
        assert request(srv, "GET", "/history", cookie)[0] == 200
        assert request(srv, "GET", "/performance.json", cookie)[0] == 200  # the same session opens /performance
        assert request(srv, "GET", "/performance.json")[0] == 401
    with start(tmp_path, db, queue) as srv:  # a new run: the old cookie is void
        assert request(srv, "GET", "/history", cookie)[0] == 401


def test_without_a_token_or_proxy_header_the_console_is_off_but_performance_stays(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue, token="") as srv:
        status, _, body = request(srv, "GET", "/history")
        assert status == 403 and b"token_file" in body
        assert request(srv, "GET", "/performance.json")[0] == 200


def test_a_reverse_proxys_header_names_the_admin_and_is_only_trusted_on_loopback(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue, token="", auth_header="X-Remote-User") as srv:
        assert request(srv, "GET", "/quarantine")[0] == 401
        status, _, page = request(srv, "GET", "/quarantine", {"X-Remote-User": "alice"})
        assert status == 200
        status, headers, _ = request(srv, "POST", "/quarantine/4QAAA00004/release",
                                     {"X-Remote-User": "alice", "Content-Type": "application/x-www-form-urlencoded"},
                                     urlencode({"csrf": csrf_of(page)}))
        assert status == 303, headers
    assert queue.released == ["4QAAA00004"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT actor, action, queue_id, outcome FROM quarantine_actions").fetchall() == [
            ("alice (via X-Remote-User)", "release", "4QAAA00004", "done")]
    with pytest.raises(AtlasError, match="auth_header"):
        web.start_http_server("0.0.0.0", 0, lambda: {}, token=TOKEN, auth_header="X-Remote-User")


def test_token_from_file_environment_or_credential(tmp_path):
    http = load_config(None, {"http.token_file": str(tmp_path / "tok")}, env={}).http
    with pytest.raises(AtlasError, match="token_file"):
        web.read_token(http)
    (tmp_path / "tok").write_text("from-file\n")
    assert web.read_token(http) == "from-file"
    plain = load_config(None, {}, env={}).http
    assert web.read_token(plain, {"ATLAS_HTTP_TOKEN": "from-env"}) == "from-env"
    (tmp_path / "http-token").write_text("from-cred")
    assert web.read_token(plain, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "from-cred"
    assert web.read_token(plain, {}) == ""


# -- actions and CSRF ----------------------------------------------------------------------------

def post_form(srv, path, cookie, fields, extra=None):
    return request(srv, "POST", path, {**cookie, "Content-Type": "application/x-www-form-urlencoded", **(extra or {})},
                   urlencode(fields))


def test_actions_need_the_csrf_token_of_the_session_and_a_same_origin_request(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue) as srv:
        cookie = login(srv)
        _, _, page = request(srv, "GET", "/quarantine", cookie)
        csrf = csrf_of(page)
        assert post_form(srv, "/quarantine/4QAAA00004/delete", cookie, {})[0] == 403
        assert post_form(srv, "/quarantine/4QAAA00004/delete", cookie, {"csrf": "0" * 64})[0] == 403
        assert post_form(srv, "/quarantine/4QAAA00004/delete", cookie, {"csrf": csrf},
                         {"Origin": "http://evil.example"})[0] == 403
        assert post_form(srv, "/quarantine/4QAAA00004/delete", cookie, {"csrf": csrf},
                         {"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert queue.deleted == []
        assert request(srv, "GET", "/quarantine/4QAAA00004/delete", cookie)[0] == 405  # never by GET
        status, headers, _ = post_form(srv, "/quarantine/4QAAA00004/delete", cookie, {"csrf": csrf},
                                       {"Origin": f"http://127.0.0.1:{srv.port}", "Sec-Fetch-Site": "same-origin"})
        assert status == 303 and headers["Location"].startswith("/quarantine?done=")
        assert queue.deleted == ["4QAAA00004"]
        # Bearer clients carry their credential themselves: no CSRF token needed.
        status, _, _ = request(srv, "POST", "/quarantine/4QAAA00000/release", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 303 and queue.released == ["4QAAA00000"]
        status, _, body = request(srv, "POST", "/quarantine/4QAAA00000/release", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 409 and b"not in the memory hold queue" in body  # already released: said so
        _, _, page = request(srv, "GET", "/quarantine", cookie)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT actor, action, queue_id, outcome FROM quarantine_actions ORDER BY id").fetchall()
    assert rows == [("token from 127.0.0.1", "delete", "4QAAA00004", "done"),
                    ("token from 127.0.0.1", "release", "4QAAA00000", "done")]
    assert b"token from 127.0.0.1" in page and page.count(b"<tr data-queue-id=") == 1


def test_release_and_learn_releases_teaches_the_model_and_asks_for_a_reload(tmp_path, site):
    db, queue = site
    learned: list[int] = []
    with start(tmp_path, db, queue, learned=learned) as srv:
        status, headers, _ = request(srv, "POST", "/quarantine/4QAAA00004/learn", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 303, headers
    assert queue.released == ["4QAAA00004"] and learned == [1]
    assert (tmp_path / "learned.json.gz").exists()
    with sqlite3.connect(db) as conn:
        (detail,) = conn.execute("SELECT detail FROM quarantine_actions").fetchone()
        assert conn.execute("SELECT source, label FROM learning_events").fetchall() == [("quarantine", "ham")]
    before, after = map(float, re.search(r"score (\d\.\d+) -> (\d\.\d+)", detail).groups())
    assert after < before and after < 0.3  # learned toward the ham cutoff in force


# -- what the pages show -------------------------------------------------------------------------

def test_history_json_is_newest_first_filtered_and_searchable_by_reference(tmp_path, site):
    db, queue = site
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with start(tmp_path, db, queue) as srv:
        data = json.loads(request(srv, "GET", "/history.json", auth)[2])
        assert [r["id"] for r in data["rows"]] == [6, 5, 4, 3, 2, 1]
        assert data["rows"][0]["front_door"] == "imap" and data["rows"][0]["where"] == "INBOX/12"
        assert data["rows"][1]["reasons"] == "body:viagra +1.25, meta:no_date +0.50"
        data = json.loads(request(srv, "GET", "/history.json?verdict=ham", auth)[2])
        assert [r["subject"] for r in data["rows"]] == ["lunch"]
        assert json.loads(request(srv, "GET", "/history.json?q=REF0000002", auth)[2])["rows"][0]["id"] == 3
        status, headers, _ = request(srv, "GET", "/history?q=ref0000002", auth)  # the search box, one step
        assert status == 303 and headers["Location"] == "/decision/3"
        status, _, body = request(srv, "GET", "/history.json?since=yesterday-ish", auth)
        assert status == 400 and b"--since" in body


def test_hostile_subjects_are_escaped_in_every_page(tmp_path, site):
    db, queue = site
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with start(tmp_path, db, queue) as srv:
        pages = [request(srv, "GET", f"/decision/{i}", auth)[2] for i in range(1, 5)]
        pages.append(request(srv, "GET", "/quarantine", auth)[2])
        pages.append(request(srv, "GET", "/quarantine/4QAAA00001", auth)[2])
        status, headers, history_page = request(srv, "GET", "/history?sender_domain=%22%3E%3Cscript%3E", auth)
    assert status == 200 and "script-src 'sha256-" in headers["Content-Security-Policy"]
    for page in pages + [history_page]:
        text = page.decode()
        assert "<script>document" not in text and "<img" not in text and "<svg" not in text
        assert "\u202e" not in text
        assert text.count("<script>") <= 1  # ours, on /history only
    assert esc(HOSTILE[0]) in pages[0].decode() and esc(HOSTILE[1]) in pages[1].decode()
    assert "?txt.exe? invoice" in pages[2].decode()
    assert '&quot;&gt;&lt;script&gt;' in history_page.decode()


def test_one_decision_shows_score_cutoffs_reasons_model_policy_and_reference(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue) as srv:
        status, _, page = request(srv, "GET", "/decision/5", {"Authorization": f"Bearer {TOKEN}"})
        assert request(srv, "GET", "/decision/99", {"Authorization": f"Bearer {TOKEN}"})[0] == 400
    text = page.decode()
    fields = dict(re.findall(r'<dd data-field="([^"]+)">([^<]*)</dd>', text))
    assert status == 200
    assert fields["score"] == "0.970" and fields["verdict"] == "spam" and fields["model"] == "m-1"
    assert fields["cutoffs"].startswith("spam &gt;= 0.9, ham &lt; 0.3")
    assert fields["reference"] == "REF0000004" and fields["front door"] == "milter  4QAAA00004"
    assert re.findall(r'<td class="num">([^<]+)</td><td>([^<]+)</td>', text) == [("+1.250", "body:viagra"),
                                                                                   ("+0.500", "meta:no_date")]
    assert '<a href="/quarantine/4QAAA00004">' in text


def test_bodies_are_shown_only_when_configured(tmp_path, site):
    db, queue = site
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with start(tmp_path, db, queue) as srv:
        page = request(srv, "GET", "/quarantine/4QAAA00004", auth)[2].decode()
    assert "secret body line" not in page and "show_bodies = false" in page
    assert "Subject: an ordinary subject" in page
    with start(tmp_path, db, queue, show_bodies=True) as srv:
        page = request(srv, "GET", "/quarantine/4QAAA00004", auth)[2].decode()
    assert "Cheap pills, &lt;b&gt;secret body line&lt;/b&gt;" in page


def test_the_listener_has_no_quarantine(tmp_path, site):
    db, _ = site
    with start(tmp_path, db, None) as srv:
        status, _, page = request(srv, "GET", "/quarantine", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"holds no mail" in page
        status, _, _ = request(srv, "POST", "/quarantine/4QAAA00000/release", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 404


def test_our_verdict_headers_are_taken_off_before_learning():
    from atlas_milter.quarantine import strip_our_headers

    raw = b"Subject: a\nX-Atlas-Reasons: x,\n  y\nX-Spam-Flag: YES\nTo: b\n\nX-Atlas-Verdict: in the body stays\n"
    assert strip_our_headers(raw) == b"Subject: a\nTo: b\n\nX-Atlas-Verdict: in the body stays\n"


def test_broken_requests_and_page_bugs_are_answered_not_dropped(tmp_path, site, monkeypatch):
    db, queue = site
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with start(tmp_path, db, queue) as srv:
        status, _, body = request(srv, "POST", "/quarantine/4QAAA00000/release", {**auth, "Content-Length": "x"})
        assert status == 400 and b"Content-Length" in body
        console = srv.httpd.RequestHandlerClass.console
        monkeypatch.setattr(console, "history_data", lambda q: 1 / 0)
        status, _, body = request(srv, "GET", "/history.json", auth)
        assert status == 500 and b"internal error" in body
        assert request(srv, "GET", "/history", auth)[0] == 200  # the server goes on
    assert queue.released == []


def test_a_proxy_that_rewrites_host_keeps_same_origin_posts_working(tmp_path, site):
    db, queue = site
    with start(tmp_path, db, queue, token="", auth_header="X-Remote-User") as srv:
        _, _, page = request(srv, "GET", "/quarantine", {"X-Remote-User": "bob"})
        fields = urlencode({"csrf": csrf_of(page)})
        proxied = {"X-Remote-User": "bob", "Content-Type": "application/x-www-form-urlencoded",
                   "Origin": "https://mail-admin.example.org", "X-Forwarded-Host": "mail-admin.example.org"}
        assert request(srv, "POST", "/quarantine/4QAAA00004/release", proxied, fields)[0] == 303
        proxied["Origin"] = "https://evil.example"
        assert request(srv, "POST", "/quarantine/4QAAA00001/release", proxied, fields)[0] == 403
    assert queue.released == ["4QAAA00004"]
