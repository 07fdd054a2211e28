"""Owns how the IMAP side gets connected, short of the session itself: the settings
check (plain IMAP only to loopback unless forced), the TLS context and what a failed
handshake means, the password (file, ATLAS_IMAP_PASSWORD or the systemd credential
`imap-password`), which account's settings apply, reconnect backoff, and the one-line
error for a failed connect.

Must not: put a password in argv, a log line or the Config; hold a connection (that is
`session.py`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import ssl
import stat
from pathlib import Path
from typing import Any, Mapping

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from atlas_milter.config import Config, ImapConfig
from atlas_milter.errors import AtlasError
from atlas_milter.netaddr import is_loopback

log = logging.getLogger("atlas_milter.adapters.imap")

PASSWORD_ENV = "ATLAS_IMAP_PASSWORD"
CREDENTIAL_NAME = "imap-password"  # systemd LoadCredential=imap-password:/path

IMAP_COMMAND_ERROR = IMAPClientError  # a command the server answered NO/BAD (for callers without imapclient)

# What a lost or broken connection raises; all of them mean "reconnect".
RECOVERABLE = (OSError, IMAPClientError, IMAPClientAbortError, EOFError)


class ConnectionLost(Exception):
    """The server said BYE or closed the connection."""



# --- connection settings (pure, unit-tested) --------------------------------------------

def check_connection_settings(imap: ImapConfig, force_plain: bool = False) -> None:
    """Refuse, with one line, what would connect badly: no host or user, or a password sent
    unencrypted to a server that is not on this machine."""
    if not imap.host:
        raise AtlasError("no IMAP server: give --host HOST (or [imap] host in the config file)")
    if not imap.user:
        raise AtlasError("no IMAP user: give --user NAME (or [imap] user in the config file)")
    if imap.security == "plain" and not force_plain and not is_loopback(imap.host):
        raise AtlasError(
            f"--plain would send the password unencrypted to {imap.host}: plain IMAP is allowed only to "
            "loopback; use --tls or --starttls, or add --force-plain if you really mean it"
        )
    if imap.security != "plain":
        tls_context(imap)  # a bad --ca-file is said at start, not at the first connection


def tls_context(imap: ImapConfig) -> ssl.SSLContext:
    """The context for --tls and --starttls: the system's trusted CAs plus those in [imap]
    ca_file (--ca-file), certificate and host name always verified."""
    context = ssl.create_default_context()
    if imap.ca_file:
        path = Path(imap.ca_file).expanduser()
        try:
            context.load_verify_locations(cafile=str(path))
        except OSError as exc:  # ssl.SSLError (not PEM, no certificate in it) is an OSError too
            reason = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else one_line(exc)
            reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", reason)
            raise AtlasError(f"CA file {path} (--ca-file, [imap] ca_file): cannot load it ({reason}); give a readable PEM file holding the "
                             "CA certificate that signed the server's certificate (or the self-signed certificate itself)") from None
    return context


# OpenSSL verify codes (X509_V_ERR_*) for "issued by a CA you do not trust": fixed by --ca-file.
_UNTRUSTED_ISSUER = {2, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH


def tls_failure(imap: ImapConfig, exc: ssl.SSLError) -> str:
    """One line for a failed TLS handshake: what is wrong with the certificate and what to do."""
    where = f"{imap.host}:{resolve_port(imap)}"
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS with {where} failed: {one_line(exc)} (is it a TLS port? try --starttls or --port)"
    reason = (exc.verify_message or one_line(exc)).rstrip(".")
    if exc.verify_code in _NAME_MISMATCH:
        return (f"the TLS certificate of {where} is not valid for the name {imap.host!r} ({reason}): "
                "give --host the name the certificate was issued for")
    if exc.verify_code in _UNTRUSTED_ISSUER:
        if imap.ca_file:
            todo = f"--ca-file {imap.ca_file} does not hold the CA that signed it; give the right CA certificate"
        else:
            todo = ("if the server uses a private CA or a self-signed certificate, give that CA certificate "
                    "with --ca-file FILE ([imap] ca_file)")
        return f"the TLS certificate of {where} is not trusted ({reason}): {todo}"
    return f"the TLS certificate of {where} was rejected ({reason}): the server's certificate needs fixing"


def resolve_port(imap: ImapConfig) -> int:
    return imap.port or (993 if imap.security == "tls" else 143)


def read_password(
    imap: ImapConfig, account: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(password, where it came from). Order: the password file, ATLAS_IMAP_PASSWORD, the
    systemd credential (`imap-password-<account>`, then `imap-password`). A password file
    that every user can read is used, with a warning."""
    env = os.environ if env is None else env
    if imap.password_file:
        path = Path(imap.password_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AtlasError(f"password file {path}: {exc.strerror or exc}") from None
        if mode & stat.S_IROTH:
            log.warning("password file %s is readable by every user (mode %03o); run: chmod 600 %s",
                        path, stat.S_IMODE(mode), path)
        password = text.rstrip("\r\n")
        if not password:
            raise AtlasError(f"password file {path} is empty")
        return password, f"file {path}"
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV], f"environment {PASSWORD_ENV}"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        names = ([f"{CREDENTIAL_NAME}-{account}"] if account else []) + [CREDENTIAL_NAME]
        for name in names:
            path = Path(cred_dir) / name
            try:
                password = path.read_text(encoding="utf-8").rstrip("\r\n")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise AtlasError(f"systemd credential {path}: {exc.strerror or exc}") from None
            if password:
                return password, f"systemd credential {name}"
    raise AtlasError(
        f"no IMAP password: give --password-file FILE, set {PASSWORD_ENV}, "
        f"or pass the systemd credential {CREDENTIAL_NAME} (LoadCredential=)"
    )


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect number `attempt` (0-based): initial * 2**attempt, capped at
    `maximum`, then jittered to between half and all of it, so many listeners that lost the
    same server do not come back in lockstep."""
    base = min(maximum, initial * (2 ** min(attempt, 30)))
    return base * (0.5 + 0.5 * (rng or random).random())


def connect_failure(imap: ImapConfig, exc: BaseException) -> AtlasError | None:
    """The one-line error for a failed connect and login to `imap`, or None when `exc` is
    not such a failure (a bug: let it propagate)."""
    if isinstance(exc, AtlasError):
        return exc
    if isinstance(exc, LoginError):
        return AtlasError(f"IMAP login as {imap.user} on {imap.host} refused: {one_line(exc)}")
    if isinstance(exc, ssl.SSLError):
        return AtlasError(tls_failure(imap, exc))
    if isinstance(exc, (OSError, IMAPClientError)):
        return AtlasError(f"cannot reach IMAP server {imap.host}:{resolve_port(imap)}: {one_line(exc)}")
    return None


def account_key(account: str | None) -> str:
    """How the database names an account: its --account NAME, '' for [imap] itself. Part of
    every mailbox key, since accounts share the database and may have same-named folders
    with the same UIDVALIDITY."""
    return account or ""


def resolve_account(config: Config, account: str | None) -> ImapConfig:
    # A config already resolved for an account has no account tables left.
    return config.imap.for_account(account) if account and config.imap.accounts else config.imap


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text.splitlines()[0]


def quietly(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass


def quiet_imapclient_logs() -> None:
    # imapclient logs every command and response at DEBUG: message bodies (and, were its
    # redaction ever to miss, a secret) must not reach our logs; at INFO it says "Connection
    # closed" for every reconnect, which our own lines already say.
    logging.getLogger("imapclient").setLevel(max(logging.WARNING, logging.getLogger("imapclient").level))
