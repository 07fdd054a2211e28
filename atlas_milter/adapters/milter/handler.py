"""Owns one milter connection: `AtlasMilter`, a pymilter `Milter.Base` subclass that
collects one message per MAIL FROM (envelope, headers, body up to the analysis cap), has
it classified at end of message through the engine (with a deadline), asks the policy for
the Action and answers the MTA through the reply table (replies.py): tag (headers), reject
(550 5.7.1 + reference id), tempfail (451 4.7.1), quarantine (Postfix hold / Sendmail
quarantine) or discard. Both transports (loop.py and libmilter) drive the same callbacks.

One instance per connection holds that connection's message state and nothing else;
shared state is the engine's.

Must not: let an exception reach the transport (every callback is wrapped; a failure
becomes the configured on_error action), put message bytes unsanitised into a header or
an SMTP reply, or decide thresholds or actions itself.

Wire economy (see conf/postfix-main.cf): only envfrom, envrcpt, header (all no-reply),
DATA, body and eom are negotiated; only the actions used are requested; the only macros
asked for are {i}, {auth_authen} and {client_addr}, at end of message (Sendmail needs its
confMILTER_MACROS_EOM for them, see negotiate()). The DATA step is negotiated *with* a
reply (`data()`), because the MTA's side stalled every message ~40 ms on inet sockets:
Postfix writes the DATA-stage macros as a small packet that gets no answer, then its
first header waits under Nagle's algorithm for our kernel's delayed ACK. Answering DATA
sends that ACK at once (measured with one client: inet 22 -> 217 messages/s, the same as
unix).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import Milter

from atlas_milter.adapters.milter import libmilter, wire
from atlas_milter.adapters.milter.engine import ClassifyFailed, MilterEngine
from atlas_milter.adapters.milter.metrics import (
    COUNTER_ACTION_PREFIX,
    COUNTER_DENY_LISTED,
    COUNTER_ERROR_PREFIX,
    COUNTER_FORGED,
    COUNTER_MESSAGES,
    COUNTER_MIXED,
    COUNTER_RECORD_REFUSED,
    COUNTER_SKIP_PREFIX,
    COUNTER_TRUNCATED,
    ERR_BUSY,
    ERR_CLASSIFY,
    ERR_INTERNAL,
    STAGE_MILTER_EOM,
    STAGE_MILTER_MESSAGE,
)
from atlas_milter.adapters.milter.replies import (
    FORGED_PREFIXES,
    HDR_REASONS,
    HDR_SCORE,
    HDR_SPAM_FLAG,
    HDR_SPAM_STATUS,
    HDR_VERDICT,
    QUARANTINE_REASON,
    REASONS_SHOWN,
    REPLIES,
    Reply,
    clean_header_value,
    clean_reply_text,
    join_notes,
    new_ref,
)
from atlas_milter.pipeline import Result
from atlas_milter.policy import Decision, deny_listed_verdict, skipped_verdict, unchecked_verdict
from atlas_milter.verdict import SPAM, UNCHECKED, Action, Verdict, format_reasons

log = logging.getLogger(__name__)

EOM_MACROS = ("{i}", "{auth_authen}", "{client_addr}")
WANTED_ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
MAX_RECIPIENTS = 1000  # recipients remembered per message (Postfix's default limit)


class AtlasMilter(Milter.Base):
    """One SMTP connection; one message at a time (state reset at MAIL FROM)."""

    def __init__(self, engine: MilterEngine) -> None:
        self.engine = engine
        self._held = 0  # bytes reserved from the engine's budget
        self._reset()

    def _reset(self) -> None:
        if self._held:
            self.engine.release(self._held)
            self._held = 0
        self.sender = ""
        self.recipients: list[str] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.over_budget = False
        self.forged: list[tuple[str, int]] = []  # (header name, 1-based index among that name)
        self._name_counts: dict[str, int] = {}
        self.failed = ""
        self.cb_seconds = 0.0
        self.in_body = False
        self._state = self.engine.state  # replaced at end of message by the state then in force

    # -- negotiation ----------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        try:
            offered_actions, offered_protocol = opts[0], opts[1]
            self._actions = offered_actions & WANTED_ACTIONS
            if self._actions & Milter.SETSYMLIST:
                # Straight to the context: pymilter 1.0.5's Base.setsymlist hands the C
                # module bytes where it wants str.
                # No end-of-header list, although Sendmail (8.17.1) honours this one only when a
                # milter sets both: Postfix sends the end-of-header macros with *every header*,
                # one more packet each (~0.1 ms of milter CPU per message). Sendmail gets the
                # macros from conf/sendmail.mc's confMILTER_MACROS_EOM; without it, eom warns.
                self._ctx.setsymlist(Milter.M_EOM, " ".join(EOM_MACROS))
            opts[0] = self._actions
            opts[1] = self._protocol = offered_protocol & ~self.protocol_mask()
            opts[2] = opts[3] = 0
            if self.engine.negotiated is None:
                self.engine.negotiated = (opts[0], opts[1])
                log.info("milter negotiated actions 0x%x, protocol 0x%x (MTA offered 0x%x, 0x%x)",
                         opts[0], opts[1], offered_actions, offered_protocol)
            return Milter.CONTINUE
        except Exception as exc:  # never leave libmilter with an exception
            self.engine.log_failure(ERR_INTERNAL, f"negotiate: {exc}", exc_info=True)
            return Milter.ALL_OPTS

    def _fail(self, where: str, exc: BaseException) -> None:
        self.failed = self.failed or f"{where}: {type(exc).__name__}: {exc}"
        self.engine.log_failure(ERR_INTERNAL, f"{where}: {type(exc).__name__}: {exc}", exc_info=True)

    # -- envelope (no reply: Postfix sends them on without waiting) ----------------------------
    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        t0 = time.perf_counter()
        try:
            self._reset()
            self.sender = mailfrom
        except Exception as exc:
            self._fail("envfrom", exc)
        self.cb_seconds += time.perf_counter() - t0
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to: str, *params: str) -> int:
        t0 = time.perf_counter()
        try:
            if len(self.recipients) < MAX_RECIPIENTS:
                self.recipients.append(to)
        except Exception as exc:
            self._fail("envrcpt", exc)
        self.cb_seconds += time.perf_counter() - t0
        return Milter.CONTINUE

    # -- content ------------------------------------------------------------------------------
    def data(self) -> int:
        """Negotiated only for its reply, which ends the inet stall (see the module docstring)."""
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: Any) -> int:
        """Negotiates the header step (no reply); the work is in header_bytes."""
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        self._header(name, value)
        return Milter.CONTINUE

    def header_bytes(self, name: Any, value: bytes) -> int:
        # Called by pymilter with the raw value: skips its decode/encode round trip.
        self._header(name, value)
        return Milter.NOREPLY if self._protocol & Milter.P_NR_HDR else Milter.CONTINUE

    def _header(self, name: Any, value: bytes) -> None:
        t0 = time.perf_counter()
        try:
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if name.lower().startswith(FORGED_PREFIXES):
                self._note_forged(name)
            if not self.truncated:
                self._add(wire.header_line(name.encode("latin-1", "replace"), value))
        except Exception as exc:
            self._fail("header", exc)
        self.cb_seconds += time.perf_counter() - t0

    def header_block(self, block: bytes, forged: list[bytes]) -> bool:
        """Several headers at once, as the loop transport gathers them (wire.py): `block` their
        "Name: value\\r\\n" lines, `forged` the names among them that start with one of
        FORGED_PREFIXES, in order. Taken whole (True) only when all of it fits under the size
        cap and the memory budget; else (False) the caller hands them over one by one, so the
        cap cuts exactly where it would."""
        t0 = time.perf_counter()
        try:
            if self.truncated or self.size + len(block) >= self.engine.max_bytes or not self.engine.reserve(len(block)):
                return False
            self._held += len(block)
            self.parts.append(block)
            self.size += len(block)
            for name in forged:
                self._note_forged(name.decode("latin-1"))
        except Exception as exc:
            self._fail("header", exc)
        finally:
            self.cb_seconds += time.perf_counter() - t0
        return True

    def _note_forged(self, name: str) -> None:
        """A verdict header the sender wrote (FORGED_PREFIXES): deleted at end of message by
        its 1-based index among the headers of that name."""
        lname = name.lower()
        n = self._name_counts[lname] = self._name_counts.get(lname, 0) + 1
        self.forged.append((name, n))

    def _add(self, data: bytes) -> None:
        room = self.engine.max_bytes - self.size
        if len(data) >= room:
            data = data[: max(room, 0)]
            self.truncated = True
        if not data:
            return
        if not self.engine.reserve(len(data)):
            self.over_budget = True
            self.truncated = True
            return
        self._held += len(data)
        self.parts.append(data)
        self.size += len(data)

    def body(self, chunk: bytes) -> int:
        t0 = time.perf_counter()
        try:
            if not self.in_body:
                self.in_body = True
                if not self.truncated:
                    self._add(b"\r\n")
            if not self.truncated:
                self._add(chunk)
        except Exception as exc:
            self._fail("body", exc)
            self.truncated = True
        self.cb_seconds += time.perf_counter() - t0
        if self.truncated and self._protocol & Milter.P_SKIP:
            return Milter.SKIP  # enough to classify: the MTA stops sending body chunks
        return Milter.CONTINUE

    # -- end of message --------------------------------------------------------------------
    def eom(self, busy: str = "") -> int:
        """End of message: classify, decide, reply. `busy` (from the loop transport: no
        end-of-message thread was free in time) says why classification fails as busy, as when
        no classification slot is free: skips and the deny list still apply, then on_busy."""
        t0 = time.perf_counter()
        engine = self.engine
        try:
            rc = self._eom(t0, busy)
        except Exception as exc:  # a bug here must still give the MTA an answer
            self._fail("eom", exc)
            try:
                rc = self._apply_error(ERR_INTERNAL, self.failed, t0)
            except Exception as exc2:
                engine.log_failure(ERR_INTERNAL, f"eom fallback: {exc2}", exc_info=True)
                rc = Milter.TEMPFAIL if self._state.mc.on_error == Action.TEMPFAIL else Milter.ACCEPT
        took = time.perf_counter() - t0
        metrics = engine.metrics
        metrics.record(STAGE_MILTER_EOM, took)
        metrics.record(STAGE_MILTER_MESSAGE, self.cb_seconds + took)
        try:
            self._reset()
        except Exception as exc:
            engine.log_failure(ERR_INTERNAL, f"reset: {exc}", exc_info=True)
        return rc

    def _raw(self) -> bytes:
        if not self.in_body and not self.truncated:
            self._add(b"\r\n")  # header-only message: still a valid RFC 5322 shape
        return b"".join(self.parts)

    def _eom(self, t0: float, busy: str = "") -> int:
        engine = self.engine
        state = self._state = engine.state  # this message's policy and model, whatever reloads meanwhile
        engine.incr(COUNTER_MESSAGES)
        raw = self._raw()
        if self.truncated:
            engine.incr(COUNTER_TRUNCATED)
        if self.failed:
            return self._apply_error(ERR_INTERNAL, self.failed, t0)
        if self.over_budget:
            return self._apply_error(ERR_BUSY, f"over max_buffered_mb ({engine.config.milter.max_buffered_mb} MB in memory)", t0)
        queue_id = self.getsymval("{i}") or ""
        client_addr = self.getsymval("{client_addr}")
        if client_addr is None:
            engine.warn_missing_macros()
        policy = state.policy
        model_version = state.scorer.model.version
        skip = policy.skip_reason(self.sender, bool(self.getsymval("{auth_authen}")), client_addr)
        if skip:
            engine.incr(COUNTER_SKIP_PREFIX + skip)
            result = engine.pipeline.unscored(raw, queue_id, skipped_verdict(model_version), t0)
            self._record(result, Action.ACCEPT, f"skipped: {skip}")
            engine.incr(COUNTER_ACTION_PREFIX + Action.ACCEPT)
            return Milter.ACCEPT
        if policy.deny_listed(self.sender):
            engine.incr(COUNTER_DENY_LISTED)
            result = engine.pipeline.unscored(raw, queue_id, deny_listed_verdict(model_version), t0)
            note = "deny-listed sender"
        else:
            try:
                result = engine.classify(raw, queue_id, state, busy)
            except ClassifyFailed as exc:
                if exc.kind != ERR_CLASSIFY:  # classify failures were logged with their traceback
                    engine.log_failure(exc.kind, exc.detail)
                return self._apply_error(exc.kind, exc.detail, t0)
            note = ""
        verdict = result.verdict
        decision = policy.decide(self.recipients, verdict.score)
        if decision.mixed:
            engine.incr(COUNTER_MIXED)
        return self._act(decision, result, queue_id, join_notes(note, decision.note))

    def _act(self, decision: Decision, result: Result, queue_id: str, note: str) -> int:
        engine = self.engine
        verdict = result.verdict
        action = decision.action
        reply = REPLIES[action]
        engine.incr(COUNTER_ACTION_PREFIX + action)
        if reply.smtp:  # refused or deferred
            self._record(result, action, join_notes(note, f"ref={self._set_reply(reply)}"))
            return reply.code
        if not reply.tag:
            self._record(result, action, note)
            return reply.code
        if reply.quarantine and not self._actions & Milter.QUARANTINE:
            engine.log_failure("quarantine", "the MTA did not offer SMFIF_QUARANTINE; tagging instead")
            action, note = Action.TAG, join_notes(note, "quarantine not offered by the MTA: tagged")
            reply = REPLIES[action]
        self._remove_forged()
        self._add_verdict_headers(verdict, decision.required)
        if reply.quarantine:
            ref = new_ref()
            self.quarantine(clean_header_value(QUARANTINE_REASON.format(score=verdict.score, ref=ref)))
            note = join_notes(note, f"ref={ref}")
        self._record(result, action, note)
        return reply.code

    def _set_reply(self, reply: Reply) -> str:
        """The SMTP reply of a refusal or deferral, with the [milter] text; returns the
        reference id it names, which the record's note carries too."""
        assert reply.smtp is not None
        ref = new_ref()
        self.setreply(*reply.smtp, clean_reply_text(getattr(self._state.mc, reply.text).format(ref=ref)))
        return ref

    def _add_verdict_headers(self, verdict: Verdict, required: float) -> None:
        is_spam = verdict.verdict == SPAM
        reasons = format_reasons(verdict.reasons, REASONS_SHOWN)
        self._add_header(HDR_VERDICT, clean_header_value(verdict.verdict))
        self._add_header(HDR_SCORE, f"{verdict.score:.3f}")
        if reasons:
            self._add_header(HDR_REASONS, clean_header_value(reasons))
        self._add_header(HDR_SPAM_FLAG, "YES" if is_spam else "NO")
        self._add_header(HDR_SPAM_STATUS, f"{'Yes' if is_spam else 'No'}, score={verdict.score:.3f} required={required:.3f}")

    def _add_header(self, name: str, value: str) -> None:
        """addheader, through libmilter with the GIL held where possible (libmilter.add_header)."""
        if not (self._actions & Milter.ADDHDRS and libmilter.add_header(self._ctx, name, value)):
            self.addheader(name, value)

    def _remove_forged(self) -> None:
        if not self.forged or not self._actions & Milter.CHGHDRS:
            return
        # Highest index first: deleting one occurrence never renumbers those still to delete.
        for name, index in sorted(self.forged, key=lambda item: (item[0].lower(), -item[1])):
            self.chgheader(name, index, "")
        self.engine.metrics.incr(COUNTER_FORGED, len(self.forged))

    def _apply_error(self, kind: str, detail: str, t0: float) -> int:
        """The on_error (or on_busy) action for a message we could not classify."""
        engine = self.engine
        engine.incr(COUNTER_ERROR_PREFIX + kind)
        action = self._state.policy.failure_action(busy=kind == ERR_BUSY)
        queue_id = ""
        try:
            queue_id = self.getsymval("{i}") or ""
        except Exception:
            pass
        try:
            verdict = unchecked_verdict(f"{kind}: {detail}"[:500], self._state.scorer.model.version)
            result = engine.pipeline.unscored(b"".join(self.parts), queue_id, verdict, t0)
        except Exception:
            result = None
        engine.incr(COUNTER_ACTION_PREFIX + action)
        if action == Action.TEMPFAIL:
            reply = REPLIES[action]
            ref = self._set_reply(reply)
            if result is not None:
                self._record(result, action, f"{kind}; ref={ref}")
            return reply.code
        if self._actions & Milter.CHGHDRS:
            self._remove_forged()
        self._add_header(HDR_VERDICT, UNCHECKED)
        self._add_header(HDR_REASONS, clean_header_value(f"not checked: {kind}"))
        if result is not None:
            self._record(result, Action.ACCEPT, f"{kind}; delivered unchecked")
        return Milter.ACCEPT

    def _record(self, result: Result, action: Action, note: str) -> None:
        try:
            client = self.getsymval("{client_addr}")
            ok = self.engine.pipeline.record(
                result, source="milter", action=action,
                queue_id=result.key or None,
                client_ip=client or None,
                recipients_count=len(self.recipients),
                note=note or None,
            )
            if not ok:
                self.engine.incr(COUNTER_RECORD_REFUSED)
        except Exception as exc:  # the reply matters more than the record
            self.engine.log_failure("record", f"{type(exc).__name__}: {exc}", exc_info=True)

    # -- end of connection ---------------------------------------------------------------------
    def abort(self) -> int:
        return self._end("abort")

    def close(self) -> int:
        return self._end("close")

    def _end(self, where: str) -> int:
        """Drop the message in progress (and give back its bytes); never raises."""
        try:
            self._reset()
        except Exception as exc:
            self.engine.log_failure(ERR_INTERNAL, f"{where}: {exc}", exc_info=True)
        return Milter.CONTINUE

