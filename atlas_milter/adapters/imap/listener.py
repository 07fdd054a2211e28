"""Owns the IDLE listener (`run_idle`): one `FolderWatcher` thread per watched folder, each
on its own connection with reconnect backoff, classifying new mail and acting on it, and a
watcher on Junk that learns from what the user puts there (or takes out of it); the shared
`Listener` state (pipeline, login backoff shared by all watchers, model reload).

Threads: the watchers share the pipeline and its model under `Listener.lock`, held only
while classifying or learning (never across an IMAP round trip). The store is thread-safe.

Must not: decide what is spam (the pipeline does), or act on a verdict before it is
recorded durably (a crash between the two is repaired at the next start by
`redo_pending_moves`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from imapclient.exceptions import IMAPClientError, LoginError

from atlas_milter import cluster_sync, pg_ship, shared_records, signals
from atlas_milter.shared_records import Lookups
from atlas_milter.adapters.imap.actions import (
    action_for,
    adopt_rows_written_before_accounts,
    apply_actions,
    redo_pending_moves,
)
from atlas_milter.adapters.imap.connection import (
    RECOVERABLE,
    ConnectionLost,
    account_key,
    backoff_delay,
    check_connection_settings,
    connect_failure,
    one_line,
    quiet_imapclient_logs,
    read_password,
    resolve_account,
)
from atlas_milter.adapters.imap.session import FolderState, ImapSession, batches
from atlas_milter.classifier import load_model
from atlas_milter.config import Config
from atlas_milter.errors import AtlasError
from atlas_milter.leases import hold_imap_account
from atlas_milter.learning import Learned, learn_and_swap, learned_model_path, with_learned_model
from atlas_milter.message import fingerprint
from atlas_milter.notify import sd_notify
from atlas_milter.pool import ItemError
from atlas_milter.queries import PriorRecord
from atlas_milter.reload import run_reload
from atlas_milter.journal import add_learning_event, save_folder_mark
from atlas_milter.verdict import HAM, SPAM, UNSURE, Action

log = logging.getLogger("atlas_milter.adapters.imap")

QUICK_EMPTY_LIMIT = 3  # idle_check returning nothing at once this often = the server closed the socket


class Listener:
    """Shared state of `run_idle`: the pipeline (under `lock`), the config, the stop event."""

    def __init__(self, config: Config, account: str | None, force_plain: bool, env: Mapping[str, str] | None = None) -> None:
        from atlas_milter.pipeline import Pipeline

        self.imap = resolve_account(config, account)
        as_configured = config
        config = with_learned_model(dataclasses.replace(config, imap=self.imap))
        check_connection_settings(self.imap, force_plain)
        self.config = config
        self.account = account
        self.account_key = account_key(account)  # the account's part of every database key
        self.force_plain = force_plain
        self.env = env
        self.password, self.password_source = read_password(self.imap, account, env)
        log.info("imap: password from %s", self.password_source)
        self.db = config.store.db
        # Earlier records: this host's, and with [store] url every host's (an account taken over)
        self.lookups = Lookups(self.db, self.account_key, shared_records.from_config(config))
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.logged_in_once = threading.Event()
        # Refused logins after the start (password rotated, the server's auth down): shared
        # by every watcher, so the server sees one attempt per backoff delay, not one per folder.
        self.login_lock = threading.Lock()
        self.login_refusals = 0
        self.next_login = 0.0  # time.monotonic() before which nobody tries again
        self.rng = random.Random()
        self.pipeline = Pipeline(config)  # the database exists and is migrated from here on
        adopt_rows_written_before_accounts(as_configured, account)

    def new_session(self) -> ImapSession:
        """A logged-in session. After a refused login every watcher waits for the same
        backoff delay, and the password is read again from its source before each retry
        (the admin may have put the new one there). Raises LoginError while refused."""
        with self.login_lock:
            refused = self.login_refusals > 0
            if refused:
                return self._retry_login()
        try:
            return ImapSession(self.imap, self.password, self.force_plain).connect()
        except LoginError as exc:
            with self.login_lock:
                if self.login_refusals == 0:  # the other watchers' simultaneous failures count once
                    self._refused(exc)
            raise

    def _retry_login(self) -> ImapSession:
        """Under `login_lock`: wait out the shared delay, re-read the password, try once."""
        if self.stop.wait(max(0.0, self.next_login - time.monotonic())):
            raise ConnectionLost("stopping")
        try:
            self.password, self.password_source = read_password(self.imap, self.account, self.env)
            session = ImapSession(self.imap, self.password, self.force_plain).connect()
        except (LoginError, AtlasError) as exc:
            self._refused(exc)
            raise LoginError(str(exc)) from None
        log.warning("imap: login as %s on %s works again after %d refused attempt(s)", self.imap.user,
                    self.imap.host, self.login_refusals)
        self.login_refusals, self.next_login = 0, 0.0
        return session

    def _refused(self, exc: BaseException) -> None:
        imap = self.imap
        delay = backoff_delay(self.login_refusals, imap.reconnect_initial, imap.reconnect_max, self.rng)
        self.login_refusals += 1
        self.next_login = time.monotonic() + delay
        if self.password_source.startswith("file "):
            todo = f"put the new one in the {self.password_source} (read again before every attempt)"
        else:  # the environment and systemd credentials are fixed for the life of the process
            todo = f"update the {self.password_source} and restart the listener"
        log.error("imap: login as %s on %s refused (%s), attempt %d; trying again in %.1f s. If the password "
                  "changed, %s", imap.user, imap.host, one_line(exc), self.login_refusals, delay, todo)

    def reload_model(self) -> bool:
        """SIGHUP or SIGUSR1: the model file again (a bad one keeps the current model;
        logged and counted like the milter's reloads, see atlas_milter/reload.py)."""
        return run_reload("imap", self._reload_model, self.pipeline.metrics)

    def _reload_model(self) -> str:
        if cluster_sync.current() is not None:
            return "learning is shared through [cluster]: the stream's model stays"
        path = learned_model_path(self.config)
        if not Path(path).exists():
            return f"no model file {path} yet; the current model {self.pipeline.model.version} stays"
        model = load_model(path)
        with self.lock:
            self.pipeline.reload_model(model)
        return f"model {model.version} from {path}"

    def learn(self, raw: bytes, is_spam: bool, prior: PriorRecord | None, folder: str, uid: int, message_id: str) -> float:
        """Update the model from one message the user labelled (saved, and in use from now
        on, see learning.py) and record the event. Call with `lock` held."""
        label = SPAM if is_spam else HAM
        cluster = cluster_sync.current()
        if cluster is not None:  # every host learns it (cluster_sync.py); in force here within a moment
            cutoffs = self.pipeline.cutoffs
            before, after = cluster.learn(raw, is_spam, (cutoffs.spam, cutoffs.ham))
            done = Learned(self.pipeline.model, before, after)
            path = "[cluster]"
        else:
            path = learned_model_path(self.config)
            done = learn_and_swap(self.pipeline, raw, is_spam, self.config.classifier.max_bytes, path)
        add_learning_event(self.db, {
            "source": "imap", "account": self.account_key, "message_id": message_id,
            "sender_domain": prior.sender_domain if prior else None, "label": label,
            "previous_verdict": prior.verdict if prior else None, "previous_score": prior.score if prior else None,
            "folder": folder, "uid": uid,
            "note": f"user moved it {'into' if is_spam else 'out of'} Junk; score {done.before:.3f} -> {done.after:.3f}; "
                    f"model {done.model.version}",
        })
        log.info("learned %s as %s (score %.3f -> %.3f); model %s saved to %s", message_id, label, done.before,
                 done.after, done.model.version, path)
        return done.after


class FolderWatcher(threading.Thread):
    """Watches one folder with IDLE on its own connection; reconnects with backoff."""

    def __init__(self, listener: Listener, folder: str, junk_role: bool = False) -> None:
        super().__init__(name=f"imap-idle-{folder}", daemon=True)
        self.listener = listener
        self.folder = folder
        self.junk_role = junk_role  # watching Junk to learn from what the user puts there
        self.high: int | None = None  # highest UID handled (kept across reconnects)
        self.uidvalidity: int | None = None
        self.rng = random.Random()

    def run(self) -> None:
        lst = self.listener
        attempt = 0
        while not lst.stop.is_set():
            session: ImapSession | None = None
            try:
                session = lst.new_session()
                lst.logged_in_once.set()
                attempt = 0
                self.watch(session)
            except LoginError as exc:
                if not lst.logged_in_once.is_set():
                    lst.fatal = str(connect_failure(lst.imap, exc))
                    lst.stop.set()
                    return
                # Logged, and the next try delayed, by new_session for all watchers at once.
            # AtlasError: a CA file gone or STARTTLS withdrawn since the start: one warning line, retried.
            except (ConnectionLost, AtlasError, *RECOVERABLE) as exc:
                if lst.stop.is_set():
                    break
                self._wait(attempt, exc)
                attempt += 1
            except Exception as exc:  # a bug: keep the listener alive, but say so loudly
                log.exception("imap %s: unexpected error", self.folder)
                self._wait(attempt, exc)
                attempt += 1
            finally:
                if session is not None:
                    session.close()

    def _wait(self, attempt: int, exc: BaseException) -> None:
        imap = self.listener.imap
        delay = backoff_delay(attempt, imap.reconnect_initial, imap.reconnect_max, self.rng)
        log.warning("imap %s: connection lost or refused (%s); reconnecting in %.1f s", self.folder, one_line(exc), delay)
        self.listener.stop.wait(delay)

    def watch(self, session: ImapSession) -> None:
        lst = self.listener
        imap = lst.imap
        state = session.select(self.folder)
        if not self.junk_role and imap.spam_action == "move":
            with lst.lock:
                lst.pipeline.flush()
            redo_pending_moves(session, state, lst.lookups.uids_with_action(state.name, state.uidvalidity, Action.MOVE))
            session.select(self.folder)
        self.catch_up(session, state)
        cycle = min(imap.keepalive, imap.idle_renew)
        while not lst.stop.is_set():
            session.c.idle()
            started = time.monotonic()
            news = False
            quick_empty = 0
            while not lst.stop.is_set() and time.monotonic() - started < cycle:
                t0 = time.monotonic()
                responses = session.c.idle_check(timeout=1.0)
                if not responses and time.monotonic() - t0 < 0.2:
                    quick_empty += 1  # readable but nothing parsed: the server closed the socket
                    if quick_empty >= QUICK_EMPTY_LIMIT:
                        raise ConnectionLost("connection closed by the server")
                    continue
                quick_empty = 0
                for resp in responses:
                    if resp and resp[0] == b"BYE":
                        raise ConnectionLost(f"server said BYE: {resp[1:]!r}")
                    if len(resp) >= 2 and resp[1] in (b"EXISTS", b"RECENT"):
                        news = True
                if news:
                    break
            # DONE and NOOP must both be answered within the timeout, else the link is dead.
            session.c.idle_done()
            if lst.stop.is_set():
                break
            session.c.noop()
            state = session.select(self.folder)
            self.catch_up(session, state)

    def catch_up(self, session: ImapSession, state: FolderState) -> None:
        """Handle every message above the highest UID handled (in memory or in the DB)."""
        lst = self.listener
        if self.uidvalidity != state.uidvalidity:
            if self.uidvalidity is not None:
                log.warning("imap %s: UIDVALIDITY changed (%s -> %s); starting over from new mail",
                            self.folder, self.uidvalidity, state.uidvalidity)
            self.uidvalidity, self.high = state.uidvalidity, None
        db_high = None
        if not self.junk_role:
            with lst.lock:
                lst.pipeline.flush()
            db_high = lst.lookups.highest_uid(self.folder, state.uidvalidity)
        if self.high is None:
            # First look at this folder (or a new UIDVALIDITY): earlier mail is backfill's
            # job, unless the DB says where we stopped last time.
            self.high = db_high if db_high is not None else state.uidnext - 1
        low = max(self.high, db_high or 0) + 1
        uids = session.uids(low=low)
        chunk_size = lst.config.performance.chunk_size
        for part in batches(uids, chunk_size):
            raws = session.fetch_raw(part)
            items = [(uid, raws[uid]) for uid in part if uid in raws]
            if self.junk_role:
                self.handle_junk(session, items)
            else:
                self.handle_new(session, state, items)
            self.high = max(self.high, part[-1])
            if self.junk_role:  # learned from: not again after a restart
                save_folder_mark(lst.db, self.folder, state.uidvalidity, self.high, account=lst.account_key)

    def handle_new(self, session: ImapSession, state: FolderState, items: list[tuple[int, bytes]]) -> None:
        lst = self.listener
        imap = lst.imap
        actions: dict[int, tuple[str, str]] = {}
        # The lock guards the pipeline's model, so it is held for the classification (and a
        # learn) only: never across an IMAP round trip, which may take the whole timeout.
        with lst.lock:
            results = lst.pipeline.process_batch([(str(uid), raw) for uid, raw in items])
        for (uid, raw), result in zip(items, results):
            if isinstance(result, ItemError):
                log.error("imap %s: UID %d could not be classified: %s", self.folder, uid, result.error)
                continue
            verdict = result.verdict.verdict
            action = action_for(verdict, imap.spam_action)
            mid = result.summary.message_id
            if imap.learn and mid and imap.spam_action == "move":
                prior = lst.lookups.last_record(mid, Action.DRY_RUN)
                if (prior is not None and prior.action == Action.MOVE and prior.verdict == SPAM
                        and (prior.folder, prior.uid) != (self.folder, uid)
                        and self.folder != session.junk_folder()
                        and not session.contains_message_id(session.junk_folder(), mid)):
                    with lst.lock:
                        lst.learn(raw, False, prior, self.folder, uid, mid)
                    action = Action.LEARNED_HAM
            lst.pipeline.record(result, source="imap", action=action, account=lst.account_key, folder=self.folder,
                                uidvalidity=state.uidvalidity, uid=uid)
            actions[uid] = (action, verdict)
            log.info("imap %s: UID %d %s %.3f -> %s (%s)", self.folder, uid, verdict, result.verdict.score,
                     action, result.summary.subject[:60])
        lst.pipeline.flush()  # the record is durable before we act on it
        apply_actions(session, actions)

    def handle_junk(self, session: ImapSession, items: list[tuple[int, bytes]]) -> None:
        """New arrivals in Junk: the ones we did not move there and had not called spam
        were put there by the user - learn them as spam."""
        lst = self.listener
        for uid, raw in items:
            mid = fingerprint(raw, lst.config.classifier.max_bytes).message_id.strip()
            if not mid:
                continue
            prior = lst.lookups.last_record(mid, Action.DRY_RUN)
            if prior is None:
                continue  # never scored by us (e.g. filed there by the server): not ours to judge
            if prior.action == Action.MOVE:
                continue  # we moved it
            if prior.verdict == SPAM and prior.action != Action.LEARNED_HAM:
                continue  # we already called it spam: nothing to learn
            if prior.verdict not in (HAM, UNSURE, SPAM) or lst.lookups.already_learned(mid, SPAM):
                continue
            with lst.lock:
                lst.learn(raw, True, prior, self.folder, uid, mid)


def run_idle(config: Config, account: str | None = None, force_plain: bool = False,
             env: Mapping[str, str] | None = None) -> int:
    """Watch the configured folders (and Junk, to learn) until SIGTERM/SIGINT; SIGHUP (or
    SIGUSR1, as for the milter) reloads the model file. Returns the exit status."""
    quiet_imapclient_logs()
    listener = Listener(config, account, force_plain, env)
    imap = listener.imap
    # Fail fast on a wrong password or an unreachable server at start; later losses are retried.
    try:
        probe = listener.new_session()
    except Exception as exc:
        listener.pipeline.close()
        error = connect_failure(imap, exc)
        if error is None:
            raise
        raise error from None
    keeper = None
    if listener.config.cluster.enabled:  # one host watches this account: wait for its lease
        probe.close()

        def lease_lost(why: str) -> None:
            listener.fatal = f"imap: stopped watching {imap.user}@{imap.host}: {why}; a standby takes over"
            listener.stop.set()

        keeper = hold_imap_account(listener.config.cluster, imap.user, imap.host, listener.stop, lease_lost)
        if keeper is None:
            listener.pipeline.close()
            return 0
        probe = listener.new_session()
    try:
        if not probe.has("IDLE"):
            raise AtlasError(f"IMAP server {imap.host} does not support IDLE")
        junk = probe.junk_folder() if imap.spam_action == "move" else None
        trash = probe.trash_folder()
        folders = list(dict.fromkeys(imap.folders))
        watchers = [FolderWatcher(listener, f) for f in folders if f not in (junk, trash)]
        if imap.learn and junk is not None:
            watchers.append(FolderWatcher(listener, junk, junk_role=True))
        for w in watchers:  # mail that arrives from now on is ours, even before the watcher connects
            try:
                state = probe.select(w.folder, readonly=True)
            except IMAPClientError as exc:
                raise AtlasError(f"IMAP folder {w.folder!r}: {one_line(exc)}") from None
            # Where the last run stopped (catch up on what came meanwhile, including what the
            # user moved into Junk while we were stopped), else from now on.
            if w.junk_role:
                stored = listener.lookups.folder_mark(w.folder, state.uidvalidity)
            else:
                stored = listener.lookups.highest_uid(w.folder, state.uidvalidity)
            w.uidvalidity, w.high = state.uidvalidity, stored if stored is not None else state.uidnext - 1
            if w.junk_role and stored is None:
                save_folder_mark(listener.db, w.folder, state.uidvalidity, w.high, account=listener.account_key)
    except BaseException:
        if keeper is not None:
            keeper.stop()
        listener.pipeline.close()
        raise
    finally:
        probe.close()
    listener.logged_in_once.set()

    def use_model(model: Any) -> None:  # shared learning's swaps ([cluster])
        with listener.lock:
            listener.pipeline.reload_model(model)

    cluster = cluster_sync.from_config(listener.config, listener.pipeline.model, use_model)
    if cluster is not None:
        cluster.start()
    shipper = pg_ship.from_config(listener.config)  # [store] url: verdicts to PostgreSQL too
    if shipper is not None:
        shipper.start()
    sd_notify("READY=1")  # systemd Type=notify: logged in, folders found

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("imap: signal %d, stopping", signum)
        listener.stop.set()

    def on_reload(_signum: int, _frame: Any) -> None:
        threading.Thread(target=listener.reload_model, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = signals.handle(signals.INTERRUPT_SIGNALS, on_stop)
        previous.update(signals.handle(signals.IDLE_RELOAD_SIGNALS, on_reload))
    log.info("imap: watching %s on %s as %s (spam: %s%s)", ", ".join(w.folder for w in watchers), imap.host,
             imap.user, imap.spam_action, f" to {junk}" if junk else "")
    try:
        for w in watchers:
            w.start()
        while not listener.stop.wait(0.5):
            pass
        for w in watchers:
            w.join(imap.timeout + 5)
    finally:
        signals.restore_handlers(previous)
        if keeper is not None:
            keeper.stop()
        if cluster is not None:
            cluster.stop()
        with listener.lock:
            listener.pipeline.close()
        if shipper is not None:  # after the last records are in SQLite: one more shipment
            shipper.stop()
        if listener.lookups.shared is not None:
            listener.lookups.shared.close()
    if listener.fatal:
        raise AtlasError(listener.fatal)
    return 0

