"""Owns reading Authentication-Results header fields (RFC 8601) written by the admin's own
verifier -- the OpenDKIM, OpenDMARC or SPF milter in front of atlas-milter, or the MTA that
delivers to the mailbox -- into classifier features: `auth:dkim-pass`, `auth:spf-fail`,
`auth:dmarc-pass`, ..., and `auth:dkim-pass-from-domain` for a passing signature of the
From domain's organisation.

Only fields whose authserv-id (the first word) is listed in `[classifier] trusted_authserv_id`
count. Every other server's results are ignored: anyone can write such a field, and in a
corpus they say which provider collected the mail, not whether it is spam. RFC 8601 section 5
has the receiving MTA delete incoming fields that carry its own authserv-id (OpenDKIM does,
unless KeepAuthResults is set); where that is not done, a sender can forge these features.

The shipped model was trained without them (no training corpus was verified by the admin's
server), so their weights start at zero; the learn path (Junk moves, `atlas-milter learn`) and
`atlas-milter train` with the setting weigh them for the mail of the site that configures them.

Must not: read a field whose authserv-id is not trusted, or raise on any header value.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

METHODS = frozenset(("dkim", "spf", "dmarc", "arc"))
RESULTS = frozenset(("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"))
MAX_FIELD_CHARS = 4000  # of one field: a verifier writes a few hundred
MAX_FIELDS = 8  # trusted fields read per message

_EQUALS_RE = re.compile(r"\s*=\s*")  # RFC 8601 allows CFWS around "="


def _without_comments(text: str) -> str:
    """`text` with its (possibly nested) parenthesised comments removed."""
    if "(" not in text:
        return text
    out, depth = [], 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)


def results(headers: Iterable[tuple[str, str]], trusted: Iterable[str]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(method, result, properties such as {"header.d": "example.com"}) of every known method
    in the trusted fields among `headers` ((lowercased name, value) pairs)."""
    trusted = {t.lower() for t in trusted}
    seen = 0
    for name, value in headers:
        if name != "authentication-results" or seen >= MAX_FIELDS:
            continue
        parts = _without_comments(str(value)[:MAX_FIELD_CHARS]).split(";")
        ident = parts[0].split()
        if not ident or ident[0].lower() not in trusted:
            continue
        seen += 1
        for part in parts[1:]:
            tokens = _EQUALS_RE.sub("=", part).split()
            if not tokens:
                continue
            method, eq, result = tokens[0].partition("=")
            method, result = method.split("/", 1)[0].lower(), result.lower()
            if not eq or method not in METHODS or result not in RESULTS:
                continue
            props = {}
            for token in tokens[1:]:
                key, eq, val = token.partition("=")
                if eq and "." in key:
                    props[key.lower()] = val.strip('"').lower()
            yield method, result, props


def features(headers: Iterable[tuple[str, str]], sender_domain: str, trusted: Iterable[str],
             organisation: Callable[[str], str]) -> set[str]:
    """The `auth:` features of a message; `organisation(host)` maps a host to the part that
    names its owner (the classifier's domain tail), for the From alignment of a signature."""
    if not trusted:
        return set()
    out = set()
    for method, result, props in results(headers, trusted):
        out.add(f"auth:{method}-{result}")
        if method == "dkim" and result == "pass" and sender_domain:
            signer = props.get("header.d") or props.get("header.i", "").rpartition("@")[2]
            if signer and organisation(signer) == organisation(sender_domain):
                out.add("auth:dkim-pass-from-domain")
    return out
