"""Owns chaining the stages, the one place where they meet:

    fingerprint → cache → parse + classify (worker pool, deadline) → policy → record (store)

every stage timed by `performance_monitor`. Front doors (milter, IMAP, backfill, the CLI)
call `Pipeline.classify` / `Pipeline.record` for one message, or `process_batch` /
`process_source` for many. Each `ENABLE_*` flag turns its optimisation off and leaves
the plain path: inline scoring, no cache, one INSERT and COMMIT per record, whole source
loaded before processing, no timers.

Worker processes score with a model they received once at start (`init_worker`); the
parent process owns the cache, the store and the metrics.

Reloading: the model and what derives from it (cutoffs, worker pool, cache) form one
immutable `Scorer`; `reload_model`/`use` swap it in one assignment. A call reads the scorer
once and finishes with it, so a message is never scored by one model and labelled by
another's cutoffs, and the old model's scores never land in the new cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from atlas_milter.cache import ClassificationCache, configure_cache
from atlas_milter.classifier import Model, load_model
from atlas_milter.config import ClassifierConfig, Config
from atlas_milter.errors import ModelError
from atlas_milter.message import Summary, fingerprint, parse_message, summarise
from atlas_milter.monitor import (
    STAGE_CACHE_LOOKUP,
    STAGE_CLASSIFY,
    STAGE_PARSE,
    STAGE_TOTAL,
    configure_from_config,
    performance_monitor,
    verdict_counter,
)
from atlas_milter.policy import Cutoffs, decide, resolve_cutoffs
from atlas_milter.pool import ItemError, ParallelEmailProcessor, start_worker_server
from atlas_milter.store import BulkOperationManager, DirectRecordWriter, configure_store
from atlas_milter.stream import StreamingEmailProcessor, StreamStats
from atlas_milter.verdict import Score, Verdict

log = logging.getLogger(__name__)

SLICE = 50  # messages prepared by the parent while the workers score the previous slice


@dataclass(frozen=True, slots=True)
class Analysis:
    """What scoring one message found; small and picklable (crosses process boundaries)."""

    score: Score
    defects: tuple[str, ...] = ()
    truncated: bool = False
    size: int = 0
    parse_s: float = 0.0
    classify_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Result:
    """One message through the pipeline."""

    key: str
    verdict: Verdict
    summary: Summary
    elapsed_ms: float
    defects: tuple[str, ...] = ()
    stage_ms: str = ""  # JSON: where the time went (parse, classify, the rest; or a cache hit), for the record


def analyse(raw: bytes, model: Model, max_bytes: int) -> Analysis:
    """Parse and score one message. Never raises on message content."""
    t0 = time.perf_counter()
    parsed = parse_message(raw, max_bytes, model.compiled)
    t1 = time.perf_counter()
    score = model.score(parsed)
    t2 = time.perf_counter()
    return Analysis(score, tuple(parsed.defects[:5]), parsed.truncated, parsed.size, t1 - t0, t2 - t1)


# --- worker-process side -------------------------------------------------------------
_worker_model: Model | None = None
_worker_max_bytes: int = 0


def init_worker(model_pickle: bytes, max_bytes: int) -> None:
    """Pool initializer: keep the model for every later call in this worker process. It
    arrives pickled already (pickle.dumps in the parent, ~50 ms once): the process start
    then hands over one bytes object, and the unpickling (~0.2 s for 100,000 weights) runs
    here, in every worker at once, instead of holding the parent at each worker's start."""
    global _worker_model, _worker_max_bytes
    model = pickle.loads(model_pickle)
    model.prepare()
    _worker_model, _worker_max_bytes = model, max_bytes


def analyse_in_worker(raw: bytes) -> Analysis:
    if _worker_model is None:
        raise RuntimeError("worker not initialised with a model")
    return analyse(raw, _worker_model, _worker_max_bytes)


@dataclass(frozen=True)
class Scorer:
    """One model with everything derived from it, swapped as a whole on reload."""

    model: Model
    cutoffs: Cutoffs
    pool: ParallelEmailProcessor | None
    cache: ClassificationCache | None


class UnavailableModel:
    """Stands in for a model that could not be loaded at start: every classification
    raises ModelError (a front door then applies its failure action), and the pipeline
    still records verdict rows. Its cutoffs only keep Cutoffs valid; nothing is scored."""

    spam_cutoff = 0.9
    ham_cutoff = 0.1
    meta: dict = {"version": "unavailable"}
    version = "unavailable"
    scorable = False  # the pipeline starts no worker pool for it
    compiled = True

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def score(self, msg: Any) -> Any:
        raise ModelError(self.reason)


class Pipeline:
    """The classification pipeline configured once from a `Config`."""

    def __init__(self, config: Config, model: Model | None = None, with_store: bool = True,
                 pool_in_flight: int | None = None) -> None:
        """`pool_in_flight`: calls the worker pool accepts at once before PoolBusy (default
        4 per worker; the milter passes its [milter] max_in_flight)."""
        self.config = config
        self.features = config.features
        self.perf = config.performance.resolved()
        self.max_bytes = config.classifier.max_bytes
        self.pool_in_flight = pool_in_flight or self.perf.workers * 4
        if self.features.parallel and self.perf.workers > 1:
            start_worker_server()  # it boots while the model loads
        model = model if model is not None else load_model(config.classifier.model or None)
        self.metrics = configure_from_config(config)
        self.store: BulkOperationManager | DirectRecordWriter | None = None
        if with_store:
            self.store = configure_store(
                config.store.db,
                batch_size=self.perf.batch_size,
                flush_interval=self.perf.flush_interval,
                queue_size=self.perf.queue_size,
                bulk=self.features.bulk_ops,
            )
        self.scorer = self.make_scorer(model)

    # The current scorer's parts, for callers that classify nothing themselves.
    model = property(lambda self: self.scorer.model)
    cutoffs = property(lambda self: self.scorer.cutoffs)
    pool = property(lambda self: self.scorer.pool)
    cache = property(lambda self: self.scorer.cache)

    def make_scorer(self, model: Model, classifier: ClassifierConfig | None = None) -> Scorer:
        """A scorer for `model` (cutoffs from `classifier`, default this pipeline's config,
        else the model's): its own worker pool and an empty cache. Not in use until `use`."""
        classifier = classifier or self.config.classifier
        cutoffs = resolve_cutoffs(classifier, model)
        if isinstance(model, Model):
            model.compiled = self.features.compiled
            model.trusted_authserv = classifier.trusted_authserv_id
            model.prepare()
        cache = configure_cache(self.perf.cache_size, self.perf.cache_ttl) if self.features.caching else None
        return Scorer(model, cutoffs, self._make_pool(model), cache)

    def _make_pool(self, model: Model) -> ParallelEmailProcessor | None:
        if not (self.features.parallel and self.perf.workers > 1):
            return None
        if not getattr(model, "scorable", True):  # a stand-in for a model that failed to load
            return None
        return ParallelEmailProcessor(
            self.perf.workers,
            use_processes=True,
            initializer=init_worker,
            initargs=(pickle.dumps(model, pickle.HIGHEST_PROTOCOL), self.max_bytes),
            max_in_flight=self.pool_in_flight,
        )

    def reload_model(self, model: Model) -> None:
        """Switch to a new model (after learning or a reload signal): new cutoffs, an empty
        cache (its verdicts came from the old model) and fresh workers."""
        self.use(self.make_scorer(model))

    def use(self, scorer: Scorer, retire_after: float = 0.0) -> None:
        """Make `scorer` the current one. Calls in flight finish with the old scorer; its
        workers are stopped `retire_after` seconds later (for callers that may still
        submit to a scorer they read just before the swap), after its queued work."""
        old, self.scorer = self.scorer, scorer
        if old.pool is None or old.pool is scorer.pool:
            return
        if retire_after <= 0:
            old.pool.shutdown(wait=False)
            return

        def retire() -> None:
            time.sleep(retire_after)
            old.pool.shutdown(wait=True)

        threading.Thread(target=retire, name="atlas-retire-pool", daemon=True).start()

    # --- one message ---------------------------------------------------------------
    def _lookup(self, s: Scorer, raw: bytes) -> tuple[Any, Score | None]:
        with performance_monitor(STAGE_CACHE_LOOKUP):
            fp = fingerprint(raw, self.max_bytes)
            hit = s.cache.get(fp.sender, fp.subject, fp.body_digest) if s.cache is not None else None
        return fp, hit

    def _finish(self, s: Scorer, key: str, fp: Any, analysis: Analysis | None, cached: Score | None,
                started: float) -> Result:
        if analysis is not None:
            self.metrics.record(STAGE_PARSE, analysis.parse_s)
            self.metrics.record(STAGE_CLASSIFY, analysis.classify_s)
            score = analysis.score
            if s.cache is not None:
                s.cache.set(fp.sender, fp.subject, score, fp.body_digest)
        else:
            assert cached is not None
            score = cached
        verdict = decide(score, s.cutoffs, cache_hit=analysis is None)
        self.metrics.incr(verdict_counter(verdict.verdict))
        elapsed = time.perf_counter() - started
        self.metrics.record(STAGE_TOTAL, elapsed)
        return Result(
            key=key,
            verdict=verdict,
            summary=summarise(fp),
            elapsed_ms=elapsed * 1000.0,
            defects=analysis.defects if analysis else (),
            stage_ms=_stage_ms(analysis, elapsed),
        )

    def classify(self, raw: bytes, key: str = "", timeout: float | None = None, scorer: Scorer | None = None) -> Result:
        """Classify one message with `scorer` (default: the current one, read once). With
        the pool, `timeout` bounds the wait (TimeoutError, or PoolBusy when too much is in
        flight): the caller applies its failure action."""
        s = scorer or self.scorer
        started = time.perf_counter()
        fp, cached = self._lookup(s, raw)
        analysis = None
        if cached is None:
            if s.pool is not None:
                analysis = s.pool.run(analyse_in_worker, raw, timeout=timeout)
            else:
                analysis = analyse(raw, s.model, self.max_bytes)
        return self._finish(s, key, fp, analysis, cached, started)

    def unscored(self, raw: bytes, key: str, verdict: Verdict, started: float) -> Result:
        """The Result of a message the classifier did not score, with a verdict from the
        policy (skipped, deny-listed, unchecked): summarised for its record like any other.
        `started`: perf_counter() when the message's handling began."""
        summary = summarise(fingerprint(raw, self.max_bytes))
        return Result(key=key, verdict=verdict, summary=summary, elapsed_ms=(time.perf_counter() - started) * 1000.0)

    # --- many messages -------------------------------------------------------------
    def process_batch(
        self, items: list[tuple[str, bytes]], on_result: Callable[[Result], Any] | None = None
    ) -> list[Any]:
        """Classify a chunk: cache hits answered at once, identical messages in the chunk
        scored once (when caching is on), the rest spread over the pool. Works through the
        chunk in slices and prepares slice k+1 while the workers score slice k, so the
        parent's share (reading, fingerprints, records) overlaps the scoring. Returns one
        result per item, in order: `on_result(result)`'s return value when given, else
        the Result; an ItemError for a message that could not be scored."""
        s = self.scorer  # one scorer for the whole chunk
        results: list[Any] = []
        analyses: dict[tuple, Analysis | ItemError] = {}  # dedup key -> its analysis, once collected
        submitted: set[tuple] = set()
        pending: tuple | None = None
        for offset in range(0, len(items), SLICE):
            started = time.perf_counter()
            piece = items[offset : offset + SLICE]
            looked_up = [self._lookup(s, raw) for _, raw in piece]
            keys = [self._dedup_key(s, fp, offset + i) for i, (fp, _) in enumerate(looked_up)]
            new = []
            for i, (fp, cached) in enumerate(looked_up):
                if cached is None and keys[i] not in submitted:
                    submitted.add(keys[i])
                    new.append(i)
            batch = self._score_async(s, [piece[i][1] for i in new])
            if pending is not None:
                results.extend(self._complete(*pending, analyses, on_result))
            pending = (s, offset, piece, looked_up, keys, [keys[i] for i in new], batch, started)
        if pending is not None:
            results.extend(self._complete(*pending, analyses, on_result))
        return results

    def _score_async(self, s: Scorer, raws: list[bytes]) -> Any:
        if s.pool is not None and len(raws) > 1:
            return s.pool.submit_batch(analyse_in_worker, raws)
        return [self._analyse_inline(s, i, raw) for i, raw in enumerate(raws)]

    def _complete(self, s, offset, piece, looked_up, keys, new_keys, batch, started, analyses, on_result) -> list[Any]:
        scored = batch if isinstance(batch, list) else batch.results()
        analyses.update(zip(new_keys, scored))
        first_use = set(new_keys)
        share = (time.perf_counter() - started) / max(1, len(piece))
        out: list[Any] = []
        for i, ((key, _), (fp, cached), dkey) in enumerate(zip(piece, looked_up, keys)):
            t0 = time.perf_counter() - share
            if cached is not None:
                result: Any = self._finish(s, key, fp, None, cached, t0)
            else:
                analysis = analyses[dkey]
                if isinstance(analysis, ItemError):
                    out.append(ItemError(offset + i, analysis.error))
                    continue
                if dkey in first_use:
                    first_use.discard(dkey)
                    result = self._finish(s, key, fp, analysis, None, t0)
                else:  # a copy of a message scored earlier in this chunk
                    result = self._finish(s, key, fp, None, analysis.score, t0)
            out.append(on_result(result) if on_result is not None else result)
        return out

    def _dedup_key(self, s: Scorer, fp: Any, index: int) -> tuple:
        return (fp.sender, fp.subject, fp.body_digest) if s.cache is not None else (index,)

    def _analyse_inline(self, s: Scorer, index: int, raw: bytes) -> Analysis | ItemError:
        try:
            return analyse(raw, s.model, self.max_bytes)
        except Exception as exc:  # a bug, not bad mail: report it for this item only
            log.exception("classification failed")
            return ItemError(index, f"{type(exc).__name__}: {exc}")

    def process_source(
        self,
        source: Any,
        folder: str,
        on_result: Callable[[Result], Any],
        on_chunk: Callable[[StreamStats], None] | None = None,
    ) -> StreamStats:
        """Run every message of `source.iter_messages(folder)` through the pipeline and
        hand each Result to `on_result` (which records or prints it). Streams in chunks
        when ENABLE_STREAMING is on; otherwise loads the whole folder first (the plain path)."""

        def batch(chunk: list[tuple[str, bytes]]) -> list[Any]:
            return self.process_batch(chunk, on_result)

        chunk_size = self.perf.chunk_size
        if self.features.streaming:
            streamer = StreamingEmailProcessor(chunk_size, self.perf.memory_limit_mb)
            return streamer.process_email_stream(source, folder, None, on_chunk=on_chunk, batch_fn=batch)
        everything = list(source.iter_messages(folder))
        loaded = _ListSource(everything)
        streamer = StreamingEmailProcessor(max(1, len(everything)), 1e9)
        return streamer.process_email_stream(loaded, folder, None, on_chunk=on_chunk, batch_fn=batch)

    # --- recording -----------------------------------------------------------------
    def record(self, result: Result, source: str, action: str = "", **meta: Any) -> bool:
        """Queue the verdict record of one message (returns False when the store refused it)."""
        if self.store is None:
            return True
        verdict = result.verdict
        row = {
            "source": source,
            "message_id": result.summary.message_id[:300] or None,
            "sender": result.summary.sender or None,
            "sender_domain": result.summary.sender_domain or None,
            "subject": result.summary.subject,
            "score": round(verdict.score, 6),
            "verdict": verdict.verdict,
            "action": action or None,
            "reasons": _reasons_json(verdict.reasons),
            "model_version": verdict.model_version,
            "cache_hit": int(verdict.cache_hit),
            "elapsed_ms": round(result.elapsed_ms, 3),
            "error": verdict.error or None,
            "stage_ms": result.stage_ms or None,
            "spam_cutoff": verdict.spam_cutoff or None,
            "ham_cutoff": verdict.ham_cutoff if verdict.spam_cutoff else None,
            **meta,
        }
        return self.store.add_email_record(row)

    def flush(self, timeout: float | None = None) -> bool:
        return self.store.flush_all(timeout) if self.store is not None else True

    def close(self) -> None:
        """Stop the workers, flush and close the store (every accepted record is written)."""
        if self.scorer.pool is not None:
            self.scorer.pool.shutdown()
            self.scorer = dataclasses.replace(self.scorer, pool=None)
        if self.store is not None:
            self.store.close()
            self.store = None
        self.metrics.flush()


def _stage_ms(analysis: Analysis | None, elapsed: float) -> str:
    """Where one message's time went, as the JSON object its record keeps: parse, classify
    and the rest (fingerprint, cache lookup, the pool's queue), or all of it a cache hit."""
    if analysis is None:
        return f'{{"cache hit": {elapsed * 1000.0:.3f}}}'
    parse, classify = analysis.parse_s * 1000.0, analysis.classify_s * 1000.0
    rest = max(elapsed * 1000.0 - parse - classify, 0.0)
    return f'{{"parse": {parse:.3f}, "classify": {classify:.3f}, "rest": {rest:.3f}}}'


@functools.lru_cache(maxsize=4096)
def _reasons_json(reasons: tuple[tuple[str, float], ...]) -> str:
    """The reasons column: JSON, memoised (a cached verdict repeats the same reasons)."""
    return json.dumps([[name, round(weight, 4)] for name, weight in reasons])


class _ListSource:
    def __init__(self, items: list[tuple[str, bytes]]) -> None:
        self.items = items

    def iter_messages(self, folder: str) -> Iterable[tuple[str, bytes]]:
        return iter(self.items)
