"""Owns the spam model: features of a `ParsedMessage`, the model file (JSON, data only),
scoring with reasons, and the incremental update of one labelled message (`learn`).
Training a model from corpora is `training.py`; saving and swapping a learned model is
`learning.py`.

Logistic regression over sparse binary features: body words and word pairs, subject
words, sender / reply-to / URL domains, structural signals (HTML-only, links to the sender
or elsewhere, delivery reports, one-click unsubscribe, DKIM signer vs From, invisible and
look-alike characters, how the body is written, attachment types, shouting subjects), and
the results of the admin's own verifier (auth_results.py). Headers that only say which list
or relay a message came through (Received, List-Id, In-Reply-To, To, Delivered-To, other
filters' verdicts) or which software sent it (X-Mailer, ...: forged by spam software) are
deliberately not features: they say where the training mail was collected, not whether
it is spam.

Scoring runs the body block (words, pairs, their weights, the strongest for the reasons)
in the compiled extension `_hotpath` when it is built and `Model.compiled` (ENABLE_COMPILED)
is on; the Python code here is its reference, and tests/test_hotpath.py keeps them equal.

It knows nothing about caches, threads, databases or protocols.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from atlas_milter import auth_results
from atlas_milter.errors import ModelError
from atlas_milter.message import MAX_HEADER_CHARS, ParsedMessage
from atlas_milter.verdict import Score

try:  # the compiled body block; without it (no C compiler at install) the pure-Python reference runs
    from atlas_milter import _hotpath
except ImportError:  # pragma: no cover - depends on the build
    _hotpath = None

MODEL_FORMAT = "atlas-milter-model"
MODEL_FORMAT_VERSION = 1
SHIPPED_MODEL = "default-model.json.gz"

MAX_WORDS = 1500  # body words used per message
MAX_PAIRS = 600  # word pairs used per message
TOP_REASONS = 6
WEIGHT_DECIMALS = 4  # weights are saved with this many decimals

# A word: a letter or digit, then up to 24 more letters, digits or marks ('.$€£-) that sit
# between two of them. _words() finds exactly these, faster.
_WORD_RE = re.compile(r"[^\W_](?:[^\W_]|['.$€£-](?=[^\W_])){1,24}")
# Runs of letters and digits joined by single marks: each run of 2 to 25 characters is one
# word; a longer one is cut by _WORD_RE. The ASCII form is for lowercased ASCII text.
_RUN_RE = re.compile(r"[^\W_]+(?:['.$€£-][^\W_]+)*")
_RUN_RE_ASCII = re.compile(r"[a-z0-9]+(?:['.$-][a-z0-9]+)*")
WORD_SCAN_CHARS = 60_000  # of the body text
_SUBJ_WORD_RE = re.compile(r"[^\W_]{2,24}")
_MONEY_RE = re.compile(r"[$€£]\s?\d")
_DIGITS_RE = re.compile(r"\d")
_IP_URL_RE = re.compile(r"^(?:https?://)?\d{1,3}(?:\.\d{1,3}){3}")
_URL_HOST_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//([^/:?#@]*@)?([\w.-]+)", re.I)  # host: up to the first character no host name has (",", ")", ...)
# Link shorteners: a link through one hides where it goes. Generic public services, not senders.
_SHORTENERS = frozenset({
    "bit.ly", "tinyurl.com", "t.co", "goo.gl", "ow.ly", "is.gd", "buff.ly", "rebrand.ly", "cutt.ly",
    "shorturl.at", "tiny.cc", "rb.gy", "t.ly", "s.id", "v.gd",
})
_DKIM_DOMAIN_RE = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9.-]+)")
# Zero-width and soft-hyphen characters: invisible, used to break words up or pad previews.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# A shouted word: two or more ASCII capitals with no letter either side; written to start
# with the character set, so the engine skips ahead in C (as \b[A-Z]{2,}\b, three times faster).
_CAPS_WORD_RE = re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]+(?!\w)")
_LOOKALIKE_RE = re.compile("[\u0370-\u052f]")  # Greek and Cyrillic
_C1_CONTROL_RE = re.compile("[\x80-\x9f]")  # what a text decoded with the wrong charset shows
_LETTER_RUN_RE = re.compile(r"[^\W\d_]{4,}")
_NAME_DOMAIN_RE = re.compile(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,12}\b")
_SHORT_TLDS = {"uk", "au", "jp", "br", "nz", "za", "cn", "kr", "tw", "in", "il"}


def hot_path() -> str:
    """Which implementation scores: for --version and the logs."""
    built = _hotpath is not None
    return "classifier: compiled" if built else "classifier: pure Python (the compiled extension atlas_milter._hotpath is not built)"


@functools.lru_cache(maxsize=8192)  # the same senders and link hosts recur in every message of a campaign
def _domain_tail(host: str) -> str:
    """The registrable-looking part of a host name: last two labels, three under ccTLD SLDs."""
    labels = [l for l in host.lower().strip(".").split(".") if l]
    if len(labels) >= 3 and labels[-1] in _SHORT_TLDS and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@functools.lru_cache(maxsize=8192)
def _url_facts(url: str) -> tuple[str, bool]:
    """(host, whether the host is a numeric address) of a URL."""
    return _url_host(url), bool(_IP_URL_RE.match(url.lower().removeprefix("http://").removeprefix("https://")))


def _url_host(url: str) -> str:
    url = url.strip()
    if url.lower().startswith("www."):
        url = "http://" + url
    match = _URL_HOST_RE.match(url)
    return match.group(2).lower() if match else ""


def _words(lowered: str) -> list[str]:
    """_WORD_RE.findall(lowered, 0, WORD_SCAN_CHARS), in about two thirds of the time: the
    character-by-character pattern is applied only to runs longer than a word can be."""
    runs = (_RUN_RE_ASCII if lowered.isascii() else _RUN_RE).findall(lowered, 0, WORD_SCAN_CHARS)
    if max(map(len, runs), default=0) <= 25:
        return [run for run in runs if len(run) > 1]
    words: list[str] = []
    for run in runs:
        if len(run) > 25:
            words.extend(_WORD_RE.findall(run))
        elif len(run) > 1:
            words.append(run)
    return words


def _word_token(word: str) -> str:
    # Numbers say little by their value and much by their shape (prices, phone numbers).
    if _DIGITS_RE.search(word):
        return "n:" + _DIGITS_RE.sub("9", word)[:12]
    return word


# English function words are left out of the word features, and word pairs are formed
# across them ("click the link" gives "click link"). They say how a text is written, not what
# it is about: the 2002 training ham is conversation on mailing lists, its spam is sales
# pitch, so "the", "of", "was" learnt strong ham weights, and spam padded with news prose
# (common since) scored as ham. Measured training on spamassassin + modern (3 bags), with
# the learning rate at 0.2: ROC AUC on all of trec07p 0.9700 -> 0.9721, on the spamassassin
# test split unchanged (0.9995); 16% fewer features, and feature extraction 10% faster.
FUNCTION_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just may me might more most must my myself no nor not now of off on once one only
or other our ours ourselves out over own said same shall she should so some still such than
that the their theirs them themselves then there these they this those through to too two
under until up upon very was we were what when where which while who whom why will with would
yet you your yours yourself yourselves
""".split())

# Structural and header features are few beside hundreds of body words; each block is
# normalised on its own and the header block weighted by this factor, so signals that
# mean spam anywhere (HTML-only, reply-to elsewhere, numeric URLs) keep their say. Cross-
# validated on the train split: ROC AUC 0.9995 -> 0.9997 (factor 1.5; 1 and 2 do a little worse).
META_BLOCK_WEIGHT = 1.5

FeatureSets = tuple[set[str], set[str]]  # (body words and pairs, header and structure signals)


def features(msg: ParsedMessage, trusted: tuple[str, ...] = ()) -> FeatureSets:
    """The (body, meta) feature sets of one message; `trusted`: see auth_results.py."""
    text = msg.text.lower()
    words = _body_words(text)
    tokens = [w if w.isalpha() else _word_token(w) for w in words if w not in FUNCTION_WORDS]
    body = set(tokens)
    pairs = tokens[: MAX_PAIRS + 1]
    body.update(map(" ".join, zip(pairs, pairs[1:])))
    body.update(_named_tokens(msg))
    return body, _meta_features(msg, text, len(words), trusted=trusted)


def _body_words(lowered_text: str) -> list[str]:
    words = _words(lowered_text)
    return words[:MAX_WORDS] if len(words) > MAX_WORDS else words


def _named_tokens(msg: ParsedMessage) -> list[str]:
    """The body block's words of the subject ("s:") and of the sender's display name ("fn:")."""
    named = ["s:" + _word_token(w) for w in _SUBJ_WORD_RE.findall(msg.subject.lower())]
    if msg.sender_name:
        named += ["fn:" + _word_token(w) for w in _SUBJ_WORD_RE.findall(msg.sender_name.lower())[:6]]
    return named


def _meta_features(msg: ParsedMessage, text: str, n_words: int, compiled: bool = False,
                   trusted: tuple[str, ...] = ()) -> set[str]:
    """The header and structure signals of a message whose lowercased body text is `text`
    and has `n_words` body words (`compiled`: count with the compiled extension)."""
    feats: set[str] = set()
    add = feats.add

    subject = msg.subject
    if not subject:
        add("sig:no-subject")
    else:
        letters = list(filter(str.isalpha, subject))
        if len(letters) >= 8 and sum(map(str.isupper, letters)) > 0.7 * len(letters):
            add("sig:subject-shouts")
        if "!" in subject:
            add("sig:subject-exclaims")
        if _MONEY_RE.search(subject):
            add("sig:subject-money")
        if "\ufffd" in subject or _C1_CONTROL_RE.search(subject):
            add("sig:subject-garbled")

    if msg.sender_domain:
        add("from:" + _domain_tail(msg.sender_domain))
        add("fromtld:" + msg.sender_domain.rsplit(".", 1)[-1])
    else:
        add("sig:no-from-address")
    if msg.sender_name and "@" in msg.sender_name:
        add("sig:from-name-has-address")
    if msg.reply_to_domain:
        if _domain_tail(msg.reply_to_domain) != _domain_tail(msg.sender_domain or ""):
            add("sig:reply-to-elsewhere")
    if not msg.message_id:
        add("sig:no-message-id")
    _sender_signals(msg, add)
    if trusted:
        feats |= auth_results.features(msg.headers, msg.sender_domain, trusted, _domain_tail)
    if not msg.header("date"):
        add("sig:no-date")
    if subject.lower().startswith("re:") and not (msg.header("in-reply-to") or msg.header("references")):
        add("sig:reply-without-thread")

    hosts: dict[str, None] = {}  # distinct, in order of appearance: the same features in every process
    for url in msg.urls[:200]:
        host, numeric = _url_facts(url)
        if host:
            hosts[host] = None
        if numeric:
            add("sig:url-numeric-host")
    sender_tail = _domain_tail(msg.sender_domain) if msg.sender_domain else ""
    tails = set()
    for host in list(hosts)[:50]:
        tail = _domain_tail(host)
        tails.add(tail)
        add("url:" + tail)
        add("urltld:" + tail.rsplit(".", 1)[-1])
        if host in _SHORTENERS or tail in _SHORTENERS:
            add("sig:url-shortener")
    if tails and sender_tail:
        add("sig:links-to-sender" if sender_tail in tails else "sig:links-elsewhere")
    n_urls = len(msg.urls)
    add("sig:urls-" + ("0" if n_urls == 0 else "1-2" if n_urls <= 2 else "3-9" if n_urls < 10 else "10+"))

    if msg.html_parts and not msg.text_parts:
        add("sig:html-only")
    elif msg.html_parts:
        add("sig:html-and-text")
    if msg.image_tags:
        add("sig:images-" + ("1" if msg.image_tags == 1 else "2+"))
        if n_words < 40:
            add("sig:images-little-text")
    _body_style(msg.text, n_words, add, compiled)
    # A body without words is not a feature: in 2002 that was image spam, today it is as
    # often a notification or an invoice sent as an attachment (trec07p ROC AUC 0.9721 ->
    # 0.9797 without it; the spamassassin and modern test splits within 0.0001).
    if 0 < n_words < 20:
        add("sig:short-body")
    for name, ctype in msg.attachments[:20]:
        add("att:" + ctype)
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext:
            add("attext:" + ext[:10])
    if msg.defects:
        add("sig:mime-defects")
    if "multipart/report" in msg.content_types or "message/delivery-status" in msg.content_types:
        add("sig:delivery-report")
    _text_tricks(msg.subject, text, add)
    return feats


def _style_counts(text: str, scan_chars: int) -> tuple[int, int, int, int]:
    """Shouted words, '!', money amounts and '%' in text[:scan_chars] (_hotpath.style_counts' reference)."""
    return (len(_CAPS_WORD_RE.findall(text, 0, scan_chars)), text.count("!", 0, scan_chars),
            len(_MONEY_RE.findall(text, 0, scan_chars)), text.count("%", 0, scan_chars))


def _body_style(text: str, n_words: int, add, compiled: bool = False) -> None:
    """How the body is written, whatever its words: shouting, '!', money, '%' per 100 words."""
    if n_words < 20:
        return
    counts = _hotpath.style_counts if compiled else _style_counts
    caps, exclaims, amounts, percentages = counts(text, WORD_SCAN_CHARS)
    per_100_words = 100 / n_words
    if caps * per_100_words >= 30:
        add("sig:body-shouts")
    # one of each is ordinary ("Thanks!", a price): a few, densely, is a sales pitch
    if exclaims >= 3 and exclaims * per_100_words >= 2:
        add("sig:body-exclaims")
    if amounts >= 2 and amounts * per_100_words >= 1:
        add("sig:body-money")
    if percentages >= 2 and percentages * per_100_words >= 1:
        add("sig:body-percentages")


def _sender_signals(msg: ParsedMessage, add) -> None:
    """What the headers say about who sent the message and how, in ways that hold across
    years and sources: a bounce's sender, a one-click unsubscribe (RFC 8058, what bulk
    senders people subscribed to must offer), whether a DKIM signature claims the From
    domain, and a display name naming another domain. The signature is not verified here
    (that is the job of an OpenDKIM in front); a claim still separates mail that signs as
    its sender from mail that signs as someone else. Which software sent the message
    (X-Mailer, X-MimeOLE, ...) is deliberately not a feature: spam software forges the
    popular clients' headers, so those say which year a corpus was collected in."""
    sender_tail = _domain_tail(msg.sender_domain) if msg.sender_domain else ""
    if msg.sender.split("@", 1)[0] in ("mailer-daemon", "postmaster"):
        add("sig:from-mailer-daemon")
    names = msg._first  # every header name, lowercased
    signers = set()
    if "dkim-signature" in names:
        for value in (value for name, value in msg.headers if name == "dkim-signature"):
            match = _DKIM_DOMAIN_RE.search(str(value)[:MAX_HEADER_CHARS].replace("\n", " "))
            if match:
                signers.add(_domain_tail(match.group(1)))
    if "list-unsubscribe" in names and "list-unsubscribe-post" in names:
        add("sig:one-click-unsubscribe")
    if signers:
        add("dkim:from-domain" if sender_tail in signers else "dkim:other-domain")
    if msg.sender_name and sender_tail:
        for named in _NAME_DOMAIN_RE.findall(msg.sender_name.lower()):
            if _domain_tail(named) != sender_tail:
                add("sig:from-name-other-domain")
                break


def _text_tricks(subject: str, text: str, add) -> None:
    """Characters that hide what the text says: invisible ones, and words that mix Latin
    letters with look-alikes from Cyrillic or Greek."""
    if text.isascii() and subject.isascii():  # most mail: every character looked for is outside ASCII
        return
    if _has_invisible(subject, len(subject)) or _has_invisible(text, WORD_SCAN_CHARS):
        add("sig:invisible-characters")
    head = subject + " " + text[: WORD_SCAN_CHARS // 3]
    if head.isascii() or not _LOOKALIKE_RE.search(head):
        return
    for word in _LETTER_RUN_RE.findall(head):
        if not word.isascii() and _mixes_scripts(word):
            add("sig:mixed-script-word")
            break


def _has_invisible(text: str, end: int) -> bool:
    """Whether text[:end] holds an invisible character (what re.search("[" + _INVISIBLE + "]")
    finds), looked for one character at a time with str.find: several times faster."""
    return any(text.find(ch, 0, end) >= 0 for ch in _INVISIBLE)


def _mixes_scripts(word: str) -> bool:
    latin = lookalike = False
    for ch in word:
        if ch < "\u0250":
            latin = latin or ch.isalpha()
        elif "\u0370" <= ch < "\u0530":  # Greek and Cyrillic
            lookalike = True
    return latin and lookalike


@dataclass
class Model:
    """Weights of the logistic regression plus the cutoffs that turn a score into a verdict."""

    weights: dict[str, float]
    bias: float = 0.0
    spam_cutoff: float = 0.9
    ham_cutoff: float = 0.1
    temperature: float = 1.0  # divides the margin: calibrates scores (fitted at training)
    meta: dict = field(default_factory=dict)
    # score() through the compiled extension when it is built (ENABLE_COMPILED); not saved
    compiled: bool = field(default=True, compare=False)
    trusted_authserv: tuple[str, ...] = field(default=(), compare=False)  # [classifier] trusted_authserv_id; not saved
    _table: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def version(self) -> str:
        return self.meta.get("version", "unversioned")

    def margin(self, feats: FeatureSets) -> float:
        return _margin(self.weights, self.bias, feats)

    def probability(self, margin: float) -> float:
        z = margin / self.temperature
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-min(z, 700.0)))
        e = math.exp(max(z, -700.0))
        return e / (1.0 + e)

    def score(self, msg: ParsedMessage) -> Score:
        table = self._compiled_table()
        if table is None:  # the reference
            margin, blocks = _weigh(self.weights, self.bias, features(msg, self.trusted_authserv))
            prob = self.probability(margin)
            toward_spam = prob >= 0.5
            candidates = [c for names, found, scale in blocks for c in _candidates(names, found, scale, toward_spam)]
            return Score(score=prob, reasons=_top_reasons(candidates, toward_spam), model_version=self.version)
        # The same sums in the same order of operations as _weigh, the body block compiled.
        text = msg.text.lower()
        n_words, body_sum, body_known, toward_spam_body, toward_ham_body = table.score_body(text, _named_tokens(msg))
        meta_names, meta_found, meta_scale = _weigh_block(
            self.weights, _meta_features(msg, text, n_words, True, self.trusted_authserv), META_BLOCK_WEIGHT)
        margin = self.bias
        margin += 1.0 / math.sqrt(body_known + 1) * body_sum
        margin += meta_scale * sum(filter(None, meta_found))
        prob = self.probability(margin)
        toward_spam = prob >= 0.5
        candidates = (toward_spam_body if toward_spam else toward_ham_body) + list(
            _candidates(meta_names, meta_found, meta_scale, toward_spam))
        return Score(score=prob, reasons=_top_reasons(candidates, toward_spam), model_version=self.version)

    def _compiled_table(self):
        """The weights as the compiled extension's hash table, built on first use and again
        after the weights change (a learn gives a new version; training, a new dict), or None
        when the compiled path is off or not built."""
        if not (self.compiled and _hotpath is not None):
            return None
        key = (id(self.weights), len(self.weights), self.version)
        cached = self._table
        if cached is None or cached[0] != key:
            cached = self._table = (key, _hotpath.Table(
                self.weights, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS))
        return cached[1]

    def prepare(self, previous: "Model | None" = None, changed: Iterable[str] | None = None) -> None:
        """Build the compiled table now (~10 ms), not on the first message; from `previous`'s (~2 ms)
        when this model's weights are `previous`'s with the `changed` ones set or added."""
        built = previous._table if previous is not None and changed is not None and self.compiled else None
        if built is not None and built[0] == (id(previous.weights), len(previous.weights), previous.version):
            self._table = ((id(self.weights), len(self.weights), self.version),
                           built[1].updated({f: self.weights[f] for f in changed}))
        self._compiled_table()

    def __getstate__(self) -> dict:
        """Pickled (to worker processes) without the compiled table: each process builds its own."""
        return {**self.__dict__, "_table": None}

    # --- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "meta": self.meta,
            "bias": self.bias,
            "temperature": self.temperature,
            "spam_cutoff": self.spam_cutoff,
            "ham_cutoff": self.ham_cutoff,
            "weights": {f: round(w, WEIGHT_DECIMALS) for f, w in sorted(self.weights.items())},
        }


def _candidates(names: list[str], weights: list, scale: float, toward_spam: bool):
    """(share of the margin, name) of a block's known features on the verdict's side."""
    sign = 1.0 if toward_spam else -1.0
    return ((w * scale, name) for name, w in zip(names, weights) if w is not None and w * sign > 0)


def _top_reasons(candidates: list[tuple[float, str]], toward_spam: bool) -> tuple[tuple[str, float], ...]:
    """The features that pushed hardest toward the verdict's side, with their share of the margin."""
    if len(candidates) > 8 * TOP_REASONS:  # the reference path: every feature of the message
        top = heapq.nlargest(TOP_REASONS, candidates) if toward_spam else heapq.nsmallest(TOP_REASONS, candidates)
    else:  # the same (names are distinct, so no two candidates tie), faster for a few
        top = sorted(candidates, reverse=toward_spam)[:TOP_REASONS]
    # Interned: the same few thousand feature names recur in every cached verdict.
    return tuple([(sys.intern(name), round(w, 4)) for w, name in top])


def _stamp_version(model: Model) -> None:
    digest = hashlib.sha256(json.dumps(model.weights, sort_keys=True).encode()).hexdigest()[:10]
    model.meta["version"] = f"{model.meta.get('name', 'model')}-{digest}"


def save_model(model: Model, path: str | os.PathLike) -> None:
    """Write the model as JSON (gzip-compressed when the name ends in .gz), atomically."""
    data = json.dumps(model.to_json(), separators=(",", ":")).encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(gzip.compress(data, 6, mtime=0) if path.name.endswith(".gz") else data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelError(f"cannot write model {path}: {exc.strerror or exc}") from None


def model_from_json(obj: object, where: str) -> Model:
    """Validate decoded JSON and build a Model. Data only: nothing in the file is executed."""
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ModelError(f"{where}: not an atlas-milter model file")
    if obj.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelError(
            f"{where}: model format version {obj.get('format_version')!r} is not supported "
            f"(this atlas-milter reads version {MODEL_FORMAT_VERSION}); retrain it with `atlas-milter train`"
        )
    weights = obj.get("weights")
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) for v in weights.values()):
        raise ModelError(f"{where}: model weights are missing or not numbers")
    try:
        model = Model(
            weights={str(k): float(v) for k, v in weights.items()},
            bias=float(obj.get("bias", 0.0)),
            spam_cutoff=float(obj["spam_cutoff"]),
            ham_cutoff=float(obj["ham_cutoff"]),
            temperature=float(obj.get("temperature", 1.0)),
            meta=dict(obj.get("meta") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: model field missing or malformed ({exc})") from None
    if not (0 <= model.ham_cutoff <= model.spam_cutoff <= 1) or model.temperature <= 0:
        raise ModelError(f"{where}: model cutoffs or temperature out of range")
    return model


def load_model(path: str | os.PathLike | None = None) -> Model:
    """Load a model file; None or "" loads the model shipped inside the package."""
    try:
        if not path:
            where = f"shipped model {SHIPPED_MODEL}"
            data = resources.files("atlas_milter").joinpath("data", SHIPPED_MODEL).read_bytes()
        else:
            where = str(path)
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model {where}: no such file (give an existing --model or train one)") from None
    except OSError as exc:
        raise ModelError(f"model {where}: cannot read it: {exc.strerror or exc}") from None
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        obj = json.loads(data)
    except (OSError, EOFError, ValueError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"model {where}: not an atlas-milter model file (not JSON)") from None
    return model_from_json(obj, f"model {where}")


def _weigh(weights: dict[str, float], bias: float, feats: FeatureSets) -> tuple[float, list]:
    """The margin of a message, and per block its (feature names, weights or None for
    unknown features, scale): each block's known weights summed and normalised to unit
    length, the structure block weighted by META_BLOCK_WEIGHT."""
    margin = bias
    blocks = []
    for block, factor in zip(feats, (1.0, META_BLOCK_WEIGHT)):
        names, found, scale = _weigh_block(weights, block, factor)
        margin += scale * sum(filter(None, found))
        blocks.append((names, found, scale))
    return margin, blocks


def _weigh_block(weights: dict[str, float], block: set[str], factor: float) -> tuple[list[str], list, float]:
    """One block's (feature names, weights or None for unknown features, scale): the scale
    normalises the known weights' sum to unit length, times `factor`."""
    names = list(block)
    found = list(map(weights.get, names))
    return names, found, factor / math.sqrt(len(found) - found.count(None) + 1)


def _margin(weights: dict[str, float], bias: float, feats: FeatureSets) -> float:
    return _weigh(weights, bias, feats)[0]


def learn(model: Model, msg: ParsedMessage, is_spam: bool, max_rounds: int = 8,
          cutoffs: tuple[float, float] | None = None) -> float:
    """Incremental update from one message the user labelled ("train until no error"):
    shift the weights of the message's features, all by the same amount, until the model
    scores it a clear 0.05 past the cutoff on the label's side. Returns the new score.
    `cutoffs` (spam, ham): the ones in force when they are not the model's own."""
    body, meta = features(msg, model.trusted_authserv)
    spam_cutoff, ham_cutoff = cutoffs if cutoffs is not None else (model.spam_cutoff, model.ham_cutoff)
    goal = min(0.99, spam_cutoff + 0.05) if is_spam else max(0.01, ham_cutoff - 0.05)
    goal_margin = math.log(goal / (1.0 - goal)) * model.temperature
    changed = False
    for _ in range(max_rounds):
        margin = model.margin((body, meta))
        if (margin >= goal_margin) if is_spam else (margin <= goal_margin):
            break
        changed = True
        # d moves the margin by d * sensitivity once every feature of the message is known.
        sensitivity = len(body) / math.sqrt(len(body) + 1) + META_BLOCK_WEIGHT * len(meta) / math.sqrt(len(meta) + 1)
        step = 1.1 * (goal_margin - margin) / max(sensitivity, 1e-9)
        for f in body | meta:
            # rounded as the file keeps them, so a learned model scores the same before and after a save
            model.weights[f] = round(model.weights.get(f, 0.0) + step, WEIGHT_DECIMALS)
    model.meta["learned"] = int(model.meta.get("learned", 0)) + 1
    if changed:  # unchanged weights keep their version (and the verdicts cached under it)
        _stamp_learned(model, body | meta, is_spam)
    return model.probability(model.margin((body, meta)))


def _stamp_learned(model: Model, feats: set[str], is_spam: bool) -> None:
    """A new version after a learn that changed weights, chained from the old version and
    what was learnt: the same model taught the same message gets the same version (re-hashing
    every weight, as _stamp_version does, took ~0.5 s a learn; this, well under 1 ms)."""
    seed = f"{model.version}\0{int(is_spam)}\0" + "\0".join(sorted(feats))
    model.meta["version"] = f"{model.meta.get('name', 'model')}-{hashlib.sha256(seed.encode()).hexdigest()[:10]}"
