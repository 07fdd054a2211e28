"""What a test needs before it can run: a server binary, root, a server that starts. Missing,
it SKIPS the test, except when ATLAS_REQUIRE_SERVERS=1 (set by .ci/run; for the corpus
ATLAS_REQUIRE_CORPUS=1), where it FAILS: CI must never pass on a skip."""

from __future__ import annotations

import os

import pytest

from tests.support.servers import ServerError, find_binary


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(reason: str, require_env: str = "ATLAS_REQUIRE_SERVERS"):
    if _env_flag(require_env):
        pytest.fail(f"{reason} ({require_env}=1, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Path of server binary ``name``; skips the test when absent (fails under ATLAS_REQUIRE_SERVERS=1)."""
    path = find_binary(name)
    if path is None:
        _unavailable(f"{name} is not installed (run: bash scripts/bootstrap.sh --system)")
    return path


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        _unavailable(f"{what} needs root to run a private instance")


def start_or_fail(server, what: str):
    """``server.start()``, or a test failure (not an error with a traceback) naming `what`."""
    try:
        server.start()
    except ServerError as exc:
        pytest.fail(f"{what} failed to start: {exc}", pytrace=False)
    return server
