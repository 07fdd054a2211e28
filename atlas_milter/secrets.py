"""Owns reading a secret the way every part of atlas-milter takes one: from a file named in
the config, else an environment variable, else a systemd credential (LoadCredential=),
never from the command line, never logged. (The IMAP password adds per-account credential
names and a warning for a world-readable file: adapters/imap/connection.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from atlas_milter.errors import AtlasError


def read_secret(file: str, env_name: str, credential: str, what: str, env: Mapping[str, str] | None = None) -> str:
    """The secret from `file`, else $`env_name`, else the credential `credential` in
    $CREDENTIALS_DIRECTORY; "" when none is given. A named file that cannot be read, or
    is empty, is an AtlasError that names `what`."""
    env = os.environ if env is None else env
    if file:
        try:
            secret = Path(file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AtlasError(f"{what} {file}: {exc.strerror or exc}") from None
        if not secret:
            raise AtlasError(f"{what} {file} is empty")
        return secret
    if env.get(env_name):
        return env[env_name].strip()
    if env.get("CREDENTIALS_DIRECTORY"):
        try:
            return (Path(env["CREDENTIALS_DIRECTORY"]) / credential).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise AtlasError(f"systemd credential {credential}: {exc.strerror or exc}") from None
    return ""
