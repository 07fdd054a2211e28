"""Owns the benchmark behind `atlas-milter bench`: it builds a fixed workload (a Maildir of
the shared corpus plus each spam re-sent to five recipients, a campaign), runs the whole
pipeline over it into a fresh on-disk database once on the plain path (every `ENABLE_*`
off: one message at a time, uncached, one INSERT and COMMIT per record, the folder loaded
first) and once optimised, each side in its own process so that peak memory is its own,
and reports medians and ratios.

Both sides use the same SQLite settings (WAL, synchronous=FULL), so the commit ratio
measures batching, not weaker durability. It knows nothing about the front doors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from atlas_milter.errors import AtlasError

CAMPAIGN_COPIES = 5
ALL_ON = {"monitoring": True, "caching": True, "bulk_ops": True, "parallel": True, "streaming": True, "compiled": True}
ALL_OFF = {name: False for name in ALL_ON}
_TO_RE = re.compile(rb"(?im)^to:[^\n]*\n(?:[ \t][^\n]*\n)*")
_MSGID_RE = re.compile(rb"(?im)^message-id:[^\n]*\n(?:[ \t][^\n]*\n)*")


def find_corpus(explicit: str | None = None) -> Path:
    """The corpus folder: `explicit` (an error when it holds no index.csv), else $ATLAS_CORPUS,
    else ../shared/corpus/spamassassin."""
    if explicit:
        if (Path(explicit) / "index.csv").is_file():
            return Path(explicit)
        raise AtlasError(f"no corpus at {explicit}: --corpus names the folder holding index.csv")
    for candidate in (os.environ.get("ATLAS_CORPUS"), "../shared/corpus/spamassassin"):
        if candidate and (Path(candidate) / "index.csv").is_file():
            return Path(candidate)
    raise AtlasError("shared corpus not found: pass --corpus DIR (the folder holding index.csv) or set ATLAS_CORPUS")


def recipient_copy(raw: bytes, n: int) -> bytes:
    """The same message as delivered to another recipient: new To: and Message-ID."""
    head_end = raw.find(b"\n\n")
    head, body = (raw, b"") if head_end < 0 else (raw[: head_end + 1], raw[head_end + 1 :])
    head = _TO_RE.sub(b"", head)
    head = _MSGID_RE.sub(b"", head)
    head += b"To: recipient%d@campaign.example\nMessage-ID: <campaign-%d-%08x@bench.example>\n" % (n, n, zlib.crc32(raw))
    return head + body


def build_workload(corpus: Path, target: Path, copies: int = CAMPAIGN_COPIES, repeat_to: int = 0) -> Path:
    """A Maildir with every corpus message and `copies` recipient copies of each spam.
    With `repeat_to`, the corpus is instead repeated (each copy a new Message-ID) until the
    Maildir holds that many messages (for the memory runs). Reused when already built."""
    import csv

    stamp = target / ".complete"
    if stamp.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True)
    with open(corpus / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    written = 0

    def put(raw: bytes) -> None:
        nonlocal written
        (target / "cur" / f"{written:07d}.bench:2,").write_bytes(raw)
        written += 1

    if repeat_to:
        round_no = 0
        while written < repeat_to:
            for row in rows:
                if written >= repeat_to:
                    break
                raw = (corpus / row["path"]).read_bytes()
                put(recipient_copy(raw, round_no) if round_no else raw)
            round_no += 1
    else:
        for row in rows:
            raw = (corpus / row["path"]).read_bytes()
            put(raw)
            if row["label"] == "spam":
                for n in range(copies):
                    put(recipient_copy(raw, n + 1))
    stamp.write_text(str(written))
    return target


def run_side(maildir: str, db: str, features: dict[str, bool], config_path: str | None = None) -> dict[str, Any]:
    """One side of the benchmark in this process: the whole pipeline over the Maildir."""
    from atlas_milter.config import load_config
    from atlas_milter.pipeline import Pipeline
    from atlas_milter.sources import LocalSource
    from atlas_milter.stream import peak_rss_mb

    env = {f"ENABLE_{name.upper()}": "true" if on else "false" for name, on in features.items()}
    for suffix in ("", "-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)
    config = load_config(config_path, overrides={"store.db": db, "statsd.enabled": False}, env=env)
    started = time.perf_counter()
    pipeline = Pipeline(config)
    counts = {"messages": 0}

    def record(result):
        pipeline.record(result, source="bench", folder="bench", action="record")
        counts["messages"] += 1
        return result

    try:
        stats = pipeline.process_source(LocalSource(), maildir, record)
        pipeline.flush()
        store_stats = pipeline.store.stats() if pipeline.store else {}
    finally:
        pipeline.close()
    seconds = time.perf_counter() - started
    return {
        "features": features,
        "messages": counts["messages"],
        "errors": stats.errors,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(counts["messages"] / seconds, 1),
        "commits": store_stats.get("commits", 0),
        "rows_written": store_stats.get("written", 0),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _side_in_subprocess(maildir: Path, db: Path, features: dict[str, bool], config_path: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "atlas_milter", "bench", "--run-side", json.dumps(features),
           "--maildir", str(maildir), "--db", str(db)]
    if config_path:
        cmd += ["--config", config_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AtlasError(f"benchmark side failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key in ("seconds", "msgs_per_s", "commits", "peak_rss_mb"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = len(runs)
    out["all_msgs_per_s"] = [r["msgs_per_s"] for r in runs]
    return out


def compare(workdir: Path, corpus: Path, repeat: int, config_path: str | None, baseline_file: Path | None,
            include_plain: bool = True, progress=print) -> dict[str, Any]:
    """Plain and optimised sides on the same workload, `repeat` runs each, interleaved."""
    maildir = build_workload(corpus, workdir / "workload")
    db = workdir / "bench.db"
    plain_runs, optimised_runs = [], []
    for i in range(repeat):
        if include_plain:
            plain_runs.append(_side_in_subprocess(maildir, db, ALL_OFF, config_path))
            progress(f"run {i + 1}/{repeat} plain:     {plain_runs[-1]['msgs_per_s']:8.1f} msg/s, {plain_runs[-1]['commits']} commits")
        optimised_runs.append(_side_in_subprocess(maildir, db, ALL_ON, config_path))
        progress(f"run {i + 1}/{repeat} optimised: {optimised_runs[-1]['msgs_per_s']:8.1f} msg/s, {optimised_runs[-1]['commits']} commits")
    if include_plain:
        plain = _median_side(plain_runs)
    else:
        if not baseline_file or not baseline_file.is_file():
            raise AtlasError("no baseline to compare with: run `atlas-milter bench --baseline` first, or drop --no-plain")
        plain = json.loads(baseline_file.read_text())
    optimised = _median_side(optimised_runs)
    return {
        "workload": {"maildir": str(maildir), "messages": optimised["messages"]},
        "plain": plain,
        "optimised": optimised,
        "ratios": {
            "throughput": round(optimised["msgs_per_s"] / plain["msgs_per_s"], 2),
            "commits": round(plain["commits"] / max(1, optimised["commits"]), 1),
            "peak_rss": round(optimised["peak_rss_mb"] / plain["peak_rss_mb"], 2),
        },
    }


def baseline(workdir: Path, corpus: Path, repeat: int, config_path: str | None, progress=print) -> dict[str, Any]:
    maildir = build_workload(corpus, workdir / "workload")
    runs = []
    for i in range(repeat):
        runs.append(_side_in_subprocess(maildir, workdir / "bench.db", ALL_OFF, config_path))
        progress(f"run {i + 1}/{repeat} plain: {runs[-1]['msgs_per_s']:8.1f} msg/s")
    return _median_side(runs)


def monitoring_cost(workdir: Path, corpus: Path, repeat: int, config_path: str | None, progress=print) -> dict[str, Any]:
    """Optimised path with monitoring on and off, interleaved: the throughput it costs."""
    maildir = build_workload(corpus, workdir / "workload")
    on_runs, off_runs = [], []
    for i in range(repeat):
        on_runs.append(_side_in_subprocess(maildir, workdir / "bench.db", ALL_ON, config_path))
        off_runs.append(_side_in_subprocess(maildir, workdir / "bench.db", {**ALL_ON, "monitoring": False}, config_path))
        progress(f"run {i + 1}/{repeat}: monitoring on {on_runs[-1]['msgs_per_s']:.1f}, off {off_runs[-1]['msgs_per_s']:.1f} msg/s")
    on, off = _median_side(on_runs), _median_side(off_runs)
    return {"monitoring_on": on, "monitoring_off": off,
            "cost": round(1 - on["msgs_per_s"] / off["msgs_per_s"], 4)}


def memory(workdir: Path, corpus: Path, sizes: list[int], config_path: str | None, progress=print) -> dict[str, Any]:
    """Peak resident memory: streaming over Maildirs of each size, and load-everything over
    the largest. Classification runs as in production (cache, pool, bulk writer)."""
    out: dict[str, Any] = {"streaming": {}, "load_everything": {}}
    for size in sizes:
        maildir = build_workload(corpus, workdir / f"maildir-{size}", repeat_to=size)
        side = _side_in_subprocess(maildir, workdir / "mem.db", ALL_ON, config_path)
        out["streaming"][str(size)] = side["peak_rss_mb"]
        progress(f"streaming over {size}: peak {side['peak_rss_mb']} MB ({side['msgs_per_s']} msg/s)")
    largest = max(sizes)
    side = _side_in_subprocess(workdir / f"maildir-{largest}", workdir / "mem.db", {**ALL_ON, "streaming": False}, config_path)
    out["load_everything"][str(largest)] = side["peak_rss_mb"]
    progress(f"load everything over {largest}: peak {side['peak_rss_mb']} MB")
    smallest = min(sizes)
    out["ratios"] = {
        "streaming_vs_load_everything": round(out["streaming"][str(largest)] / side["peak_rss_mb"], 3),
        "streaming_growth": round(out["streaming"][str(largest)] / out["streaming"][str(smallest)] - 1, 3),
    }
    return out
