"""Owns the admin's console pages, served by a daemon's HTTP server next to /performance:
`/history` (the latest decisions, filtered, keyset-paged, kept live by a small script that
polls `/history.json`), `/decision/<id>` (everything recorded about one decision) and
`/quarantine` (the held messages beside the decisions that held them, with release,
release-and-learn and delete).

Every page is built here as text; web.py authenticates the request and passes who asks
(`Caller`). All text that came from mail or from the database passes `esc()` (HTML
escaping, and control and bidi characters made visible) before it is put into markup; the
script fills the history table with textContent only. The CSP allows only our own style
and script (by hash), so even markup that slipped through could not run.

State-changing requests are POSTs that carry the caller's CSRF token (web.py checks it).
No message body is shown unless [http] show_bodies is true.

Must not: query the database itself (history.py, queries.py), talk to the MTA itself
(quarantine.py), or authenticate (web.py).
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode

from atlas_milter import cluster_sync, history, queries, quarantine
from atlas_milter.config import Config
from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import HoldQueue
from atlas_milter.performance_page import csp_hash
from atlas_milter.verdict import Action, format_reasons

log = logging.getLogger(__name__)

PAGE_ROWS = 50
_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{history.REORDERING}]")  # history's, but tabs and line ends kept
_DECISION_PATH = re.compile(r"^/decision/(\d{1,18})(\.json)?$")
_QUARANTINE_PATH = re.compile(r"^/quarantine/([0-9A-Za-z]{5,32})(?:/(release|learn|delete))?$")
VERDICTS = ("", "spam", "unsure", "ham", "unchecked")
ACTIONS = ("", *(a.value for a in Action))


def visible(text: object) -> str:
    """`text` with every control and bidi character shown as '?' (tabs and line ends kept),
    so nothing reorders or hides what follows: for text the script puts on the page."""
    return _UNSAFE.sub("?", "" if text is None else str(text))


def esc(text: object) -> str:
    """`visible(text)` safe inside HTML text and quoted attributes."""
    return html.escape(visible(text), quote=True)


@dataclass(frozen=True)
class Caller:
    """Who asks, as web.py authenticated them."""

    actor: str  # for the audit record: the proxy's user, or "token" and the client address
    csrf: str  # the token a form must send back; "" when the request carries its own credential


@dataclass
class Page:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Page:
    return Page(status, json.dumps(data, allow_nan=False, default=str).encode(), "application/json")


def _redirect(location: str) -> Page:
    return Page(303, b"", "text/plain", {"Location": location})


class Console:
    """The pages of one daemon. `queue`: the MTA's hold queue (the milter), None where
    nothing is held (the IMAP listener). `after_learn`: what makes the running daemon
    use a model a release-and-learn just wrote (the milter: its own reload)."""

    def __init__(self, config: Config, queue: HoldQueue | None = None,
                 after_learn: Callable[[], None] | None = None) -> None:
        self.config = config
        self.db = config.store.db
        self.queue = queue
        self.after_learn = after_learn
        self.show_bodies = config.http.show_bodies

    def handles(self, path: str) -> bool:
        return path in ("/history", "/history.json", "/quarantine", "/quarantine.json") or bool(
            _DECISION_PATH.match(path) or _QUARANTINE_PATH.match(path))

    # -- GET ----------------------------------------------------------------------------------

    def get(self, path: str, query: dict[str, list[str]], caller: Caller) -> Page:
        q = {k: v[0] for k, v in query.items() if v}
        try:
            if path == "/history":
                return self.history_page(q)
            if path == "/history.json":
                return _json(self.history_data(q))
            if path == "/quarantine":
                return self.quarantine_page(caller, q.get("done", ""))
            if path == "/quarantine.json":
                return _json([quarantine.entry_record(e) for e in self._entries()])
            if m := _DECISION_PATH.match(path):
                return self.decision_page(int(m.group(1)), bool(m.group(2)))
            if (m := _QUARANTINE_PATH.match(path)) and not m.group(2):
                return self.held_page(m.group(1), caller)
        except AtlasError as exc:
            return self.error_page(400, str(exc), path.endswith(".json"))
        return self.error_page(405 if path.startswith("/quarantine/") else 404, "not found")

    # -- POST: the quarantine's actions -----------------------------------------------------

    def post(self, path: str, caller: Caller) -> Page:
        m = _QUARANTINE_PATH.match(path)
        if not m or not m.group(2):
            return self.error_page(404, "not found")
        if self.queue is None:
            return self.error_page(404, "this daemon holds no mail: the quarantine is the milter's")
        queue_id, what = m.group(1), m.group(2)
        try:
            if what == "release":
                outcome = quarantine.release(self.config, self.queue, queue_id, caller.actor)
            elif what == "delete":
                outcome = quarantine.delete(self.config, self.queue, queue_id, caller.actor)
            else:
                outcome = quarantine.release_and_learn(self.config, self.queue, queue_id, caller.actor)
                if self.after_learn is not None and cluster_sync.current() is None:  # shared learning swaps itself
                    self.after_learn()
        except AtlasError as exc:
            return self.error_page(409, str(exc))
        return _redirect("/quarantine?" + urlencode({"done": f"{outcome.queue_id}: {outcome.detail}"}))

    # -- history ------------------------------------------------------------------------------

    def _search(self, key: str) -> list[dict[str, Any]]:
        """The decisions the search box's `key` names (reference, queue id, Message-ID); none found: []."""
        try:
            return history.explain(self.db, key).matches
        except AtlasError:
            return []

    def history_data(self, q: dict[str, str]) -> dict[str, Any]:
        if q.get("q", "").strip():
            return {"rows": [self._row(r) for r in self._search(q["q"])], "next_before": None, "search": q["q"]}
        before = q.get("before", "")
        if before and not before.isdigit():
            raise AtlasError(f"before={before[:20]!r}: give a decision id")
        page = history.history(self.db, limit=PAGE_ROWS, since=q.get("since") or None, verdict=q.get("verdict") or None,
                               action=q.get("action") or None, sender_domain=q.get("sender_domain") or None,
                               before=int(before) if before else None)
        return {"rows": [self._row(r) for r in page.rows], "next_before": page.next_before}

    @staticmethod
    def _row(row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "time": (row.get("created_at") or "")[:19].replace("T", " "),
                "front_door": visible(history.front_door(row)), "where": visible(history.where(row)),
                "sender": visible(row.get("sender")), "recipients": row.get("recipients_count"),
                "subject": visible(row.get("subject")), "score": row.get("score"),
                "verdict": visible(row.get("verdict")), "action": visible(row.get("action")),
                "reasons": visible(format_reasons(row.get("reasons") or [], history.TOP_REASONS))}

    def history_page(self, q: dict[str, str]) -> Page:
        if q.get("q", "").strip() and len(matches := self._search(q["q"])) == 1:  # the search box: one match at once
            return _redirect(f"/decision/{matches[0]['id']}")
        history.history(self.db, limit=1)  # a missing database or bad filter is an error page, not an empty table
        if q.get("since"):
            history.parse_since(q["since"])

        def select(name: str, options: tuple[str, ...]) -> str:
            chosen = q.get(name, "")
            opts = "".join(f'<option value="{esc(o)}"{" selected" if o == chosen else ""}>{esc(o or "any")}</option>'
                           for o in options)
            return f'<label>{name} <select name="{name}">{opts}</select></label>'

        form = (f'<form method="get" action="/history" class="filters">{select("verdict", VERDICTS)}'
                f'{select("action", ACTIONS)}<label>sender domain <input name="sender_domain" '
                f'value="{esc(q.get("sender_domain", ""))}" size="18"></label><label>since <input name="since" '
                f'value="{esc(q.get("since", ""))}" size="8" placeholder="1h, 2d, 2026-12-01"></label>'
                f'<button>filter</button></form><form method="get" action="/history" class="filters">'
                f'<label>find <input name="q" id="search" value="{esc(q.get("q", ""))}" size="34" '
                f'placeholder="reference of a 550 reply, queue id or Message-ID"></label><button>find</button></form>')
        params = {k: q[k] for k in ("verdict", "action", "sender_domain", "since", "before", "q") if q.get(k)}
        table = ('<table id="history"><thead><tr><th>id</th><th>time (UTC)</th><th>front door</th><th>queue id / UID</th>'
                 '<th>sender</th><th>rcpt</th><th>subject</th><th>score</th><th>verdict</th><th>action</th>'
                 '<th>top reasons</th></tr></thead><tbody id="rows"></tbody></table>')
        body = (f'{form}<p class="note" id="status" data-query="{esc(urlencode(params))}" '
                f'data-live="{"no" if q.get("before") or q.get("q") else "yes"}">loading</p>{table}'
                f'<p><a id="older" hidden>older &rarr;</a></p>'
                f'<noscript><p>This table needs JavaScript; the same rows are at '
                f'<a href="/history.json?{esc(urlencode(params))}">history.json</a>.</p></noscript>')
        return self._html("history", body, script=HISTORY_SCRIPT)

    # -- one decision -------------------------------------------------------------------------

    def decision_page(self, row_id: int, as_json: bool) -> Page:
        found = history.explain(self.db, None, row_id)
        row = found.matches[0]
        if as_json:
            return _json(row)
        score = f"{row['score']:.3f}" if isinstance(row.get("score"), (int, float)) else "not scored"
        items = [
            ("time (UTC)", row.get("created_at")),
            ("front door", f"{history.front_door(row)}  {history.where(row)}"),
            ("client", row.get("client_ip") or "-"),
            ("message-id", row.get("message_id") or "-"),
            ("sender", row.get("sender") or "-"),
            ("recipients", row.get("recipients_count") if row.get("recipients_count") is not None else "-"),
            ("subject", row.get("subject") or ""),
            ("score", score),
            ("verdict", row.get("verdict") or "-"),
            ("cutoffs", history.cutoffs_text(row)),
            ("model", row.get("model_version") or "not recorded"),
            ("action", row.get("action") or "-"),
            ("policy", history.policy_notes(row) or "no note recorded (skips, the deny list, mixed recipients and "
                                                    "failures are noted; a rule applying to every recipient is not)"),
            ("reference", row.get("ref") or "-"),
            ("error", row.get("error") or "-"),
            ("time taken", history.time_taken(row)),
        ]
        dl = "".join(f'<dt>{esc(k)}</dt><dd data-field="{esc(k)}">{esc(v)}</dd>' for k, v in items)
        reasons = "".join(f'<tr><td class="num">{w:+.3f}</td><td>{esc(n)}</td></tr>' for n, w in row["reasons"])
        held = ""
        if self.queue is not None and row.get("action") == "quarantine" and row.get("queue_id"):
            held = (f'<p><a href="/quarantine/{esc(row["queue_id"])}">this message in the quarantine</a> '
                    f'(if it is still held)</p>')
        body = (f'<h2>decision #{row["id"]}</h2><dl id="decision">{dl}</dl>{held}'
                f'<h3>reasons ({len(row["reasons"])})</h3><table id="reasons"><thead><tr><th>weight</th>'
                f'<th>reason</th></tr></thead><tbody>{reasons or "<tr><td></td><td>none recorded</td></tr>"}'
                f'</tbody></table><p class="note"><a href="/decision/{row["id"]}.json">decision.json</a></p>')
        return self._html(f"decision #{row['id']}", body)

    # -- the quarantine -----------------------------------------------------------------------

    def _entries(self) -> list[quarantine.Entry]:
        if self.queue is None:
            return []
        return quarantine.entries(self.config, self.queue)

    def _buttons(self, queue_id: str, caller: Caller) -> str:
        token = f'<input type="hidden" name="csrf" value="{esc(caller.csrf)}">'
        return "".join(f'<form method="post" action="/quarantine/{esc(queue_id)}/{what}" class="act">{token}'
                       f'<button name="do" value="{what}" class="{what}">{label}</button></form>'
                       for what, label in (("release", "release"), ("learn", "release + learn as ham"),
                                           ("delete", "delete")))

    def quarantine_page(self, caller: Caller, done: str) -> Page:
        if self.queue is None:
            return self._html("quarantine", "<p>This daemon holds no mail: the quarantine belongs to the milter "
                                            "(spam_action = \"quarantine\").</p>")
        rows = []
        for e in self._entries():
            d = e.decision or {}
            score = f"{d['score']:.3f}" if isinstance(d.get("score"), (int, float)) else "-"
            link = f'<a href="/decision/{d["id"]}">{esc(e.ref or d["id"])}</a>' if d else "no decision recorded"
            rows.append(f'<tr data-queue-id="{esc(e.held.queue_id)}"><td class="id"><a href="/quarantine/{esc(e.held.queue_id)}">'
                        f'{esc(e.held.queue_id)}</a></td><td>{esc(quarantine.utc_time(e.held.arrival))}</td>'
                        f'<td>{esc(e.held.sender or "<>")}</td><td>{esc(", ".join(e.held.recipients))}</td>'
                        f'<td>{esc(d.get("subject") or "")}</td><td class="num">{esc(score)}</td><td class="id">{link}</td>'
                        f'<td>{esc(format_reasons(d.get("reasons") or [], history.TOP_REASONS))}</td>'
                        f'<td>{self._buttons(e.held.queue_id, caller)}</td></tr>')
        table = ('<table id="held"><thead><tr><th>queue id</th><th>held since (UTC)</th><th>sender</th>'
                 '<th>recipients</th><th>subject</th><th>score</th><th>decision</th><th>top reasons</th>'
                 '<th>actions</th></tr></thead><tbody>' + ("".join(rows) or '<tr><td colspan="9">nothing held</td></tr>')
                 + '</tbody></table>')
        acts = "".join(f'<tr><td>{esc(a["created_at"][:19])}</td><td>{esc(a["actor"])}</td><td>{esc(a["action"])}</td>'
                       f'<td>{esc(a["queue_id"])}</td><td>{esc(a["outcome"])}</td><td>{esc(a.get("detail") or "")}</td></tr>'
                       for a in queries.quarantine_actions(self.db))
        flash = f'<p class="done" id="done">{esc(done)}</p>' if done else ""
        body = (f'{flash}<h2>held by {esc(self.queue.name)}</h2>{table}<h3>latest actions</h3><table id="actions"><thead>'
                f'<tr><th>time (UTC)</th><th>by</th><th>action</th><th>queue id</th><th>outcome</th><th>detail</th></tr>'
                f'</thead><tbody>{acts}</tbody></table>')
        return self._html("quarantine", body)

    def held_page(self, queue_id: str, caller: Caller) -> Page:
        if self.queue is None:
            return self.error_page(404, "this daemon holds no mail")
        shown = quarantine.show(self.config, self.queue, queue_id, self.show_bodies)
        d = shown["decision"]
        decision = (f'<p>held by <a href="/decision/{d["id"]}">decision #{d["id"]}</a> (score {d["score"]:.3f}, '
                    f'ref {esc(d.get("ref") or "-")}): {esc(format_reasons(d["reasons"], history.TOP_REASONS))}</p>'
                    if d else "<p>no decision recorded for this queue id</p>")
        body_part = (f'<h3>body</h3><pre id="body">{esc(shown["body"])}</pre>' if shown["body"] is not None
                     else '<p class="note">The body is not shown ([http] show_bodies = false).</p>')
        body = (f'<h2>held message {esc(queue_id)}</h2>{decision}<p>envelope from {esc(shown["sender"] or "<>")} to '
                f'{esc(", ".join(shown["recipients"]))}</p>{self._buttons(queue_id, caller)}'
                f'<h3>headers as queued</h3><pre id="headers">{esc(shown["headers"])}</pre>{body_part}')
        return self._html(f"held {queue_id}", body)

    # -- page frame ---------------------------------------------------------------------------

    def error_page(self, status: int, text: str, as_json: bool = False) -> Page:
        if as_json:
            return _json({"error": text}, status)
        page = self._html("error", f'<p class="error" id="error">{esc(text)}</p>')
        page.status = status
        return page

    def _html(self, title: str, body: str, script: str = "") -> Page:
        nav = ('<nav><a href="/history">history</a><a href="/quarantine">quarantine</a>'
               '<a href="/performance">performance</a></nav>')
        doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
               f'content="width=device-width, initial-scale=1"><title>atlas-milter &middot; {esc(title)}</title>'
               f'<style>{STYLE}</style></head><body><header><h1>atlas-milter &middot; {esc(title)}</h1>{nav}</header>'
               f'<main>{body}</main>{f"<script>{script}</script>" if script else ""}</body></html>')
        csp = (f"default-src 'none'; style-src {csp_hash(STYLE)}; script-src {csp_hash(script) if script else chr(39) + 'none' + chr(39)}; "
               "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
        return Page(200, doc.encode(), headers={"Content-Security-Policy": csp})


STYLE = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #1d2330; background: #f3f5f9; }
header { display: flex; gap: 1.4em; align-items: baseline; padding: 12px 22px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
nav a { color: #c9d1e0; margin-right: 1em; }
main { padding: 14px 22px; }
table { border-collapse: collapse; width: 100%; margin-top: 10px; background: #fff; }
th, td { padding: 5px 8px; text-align: left; border-bottom: 1px solid #edf0f5; vertical-align: top; overflow-wrap: anywhere; }
th { font-size: 12px; text-transform: uppercase; color: #667085; background: #fafbfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th, td.num, td.id { white-space: nowrap; overflow-wrap: normal; }
#reasons th:first-child { width: 7em; }
tr[data-verdict="spam"] td:nth-child(9) { color: #c8362d; font-weight: 600; }
tr[data-verdict="ham"] td:nth-child(9) { color: #16803c; }
.filters { display: inline-flex; gap: .8em; margin: 0 1.5em 6px 0; align-items: center; }
form.act { display: inline; }
button.delete { color: #c8362d; }
dl { display: grid; grid-template-columns: 11em 1fr; gap: 4px 12px; background: #fff; padding: 10px 14px; }
dt { color: #667085; } dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #fff; padding: 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { color: #667085; font-size: 12px; } .error { color: #c8362d; font-weight: 600; } .done { color: #16803c; font-weight: 600; }
"""

# Fills the history table from history.json with textContent only, and keeps the first
# page live (a poll every 3 s); the filters come from the page's data-query.
HISTORY_SCRIPT = """
"use strict";
const status = document.getElementById("status");
const query = status.dataset.query;
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); }
function render(d) {
  const body = document.getElementById("rows"); const rows = [];
  for (const r of d.rows) {
    const tr = document.createElement("tr"); tr.dataset.id = String(r.id); tr.dataset.verdict = r.verdict;
    const td = document.createElement("td"); const a = document.createElement("a");
    a.href = "/decision/" + encodeURIComponent(r.id); a.textContent = String(r.id); td.appendChild(a); tr.appendChild(td);
    cell(tr, r.time); cell(tr, r.front_door); cell(tr, r.where); cell(tr, r.sender);
    cell(tr, r.recipients === null ? "-" : String(r.recipients), "num"); cell(tr, r.subject);
    cell(tr, typeof r.score === "number" ? r.score.toFixed(3) : "-", "num"); cell(tr, r.verdict); cell(tr, r.action); cell(tr, r.reasons);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const older = document.getElementById("older");
  if (d.next_before !== null) {
    const p = new URLSearchParams(query); p.set("before", String(d.next_before));
    older.href = "/history?" + p.toString(); older.hidden = false;
  } else { older.hidden = true; }
  status.textContent = (d.rows.length ? d.rows.length + " decisions" : "no decisions match") +
    (status.dataset.live === "yes" ? " \\u00b7 live, updated " + new Date().toLocaleTimeString() : "");
  status.dataset.state = "live";
}
async function poll() {
  try {
    const r = await fetch("/history.json?" + query, { cache: "no-store", credentials: "same-origin" });
    const d = await r.json();
    if (!r.ok) throw new Error(d.error || ("HTTP " + r.status));
    render(d);
  } catch (e) {
    status.textContent = "stale: " + e.message; status.dataset.state = "stale";
  } finally {
    if (status.dataset.live === "yes") setTimeout(poll, 3000);
  }
}
poll();
"""
