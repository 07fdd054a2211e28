"""Owns turning raw message bytes into a `ParsedMessage`: headers (decoded when asked for), body text
extracted (plain and HTML), URLs, attachments, sender domains, and the body digest that
keys the verdict cache.

It must survive anything: mbox `From ` lines, CRLF or LF, broken or missing MIME
boundaries, unknown or lying charsets, base64/QP errors, NUL bytes, megabyte lines,
deep nesting. Only the first `max_bytes` of a message are analysed; a message that cannot
be parsed as MIME at all is read as plain text, and the reason is kept in `defects`.
It knows nothing about scoring.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
from dataclasses import dataclass, field
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from atlas_milter import mime

try:  # the compiled hot path; without it the pure-Python code below runs
    from atlas_milter import _hotpath
except ImportError:  # pragma: no cover - depends on the build
    _hotpath = None

DEFAULT_MAX_BYTES = 512 * 1024
MAX_PARTS = 200  # MIME parts walked per message; the rest are counted, not read
MAX_TEXT_CHARS = 200_000  # decoded text kept per message
MAX_PART_BYTES = 256 * 1024  # bytes of one text part decoded
MAX_HEADERS = 500  # headers kept per message
MAX_HEADER_CHARS = 2000  # of one decoded header value
MAX_NESTING_MARKERS = 200  # multipart/ and message/rfc822 mentions beyond which MIME is not parsed


class _IndexedMessage(Message):
    """A compat32 Message whose get() and `in` find a header in an index of first occurrences
    instead of lowercasing every name on every call (the walk asks a dozen times per part),
    and which works out its content type once.
    The index follows the header list as the parser appends to it; parsed messages are not
    edited afterwards."""

    _index: dict[str, tuple[str, str]] | None = None
    _indexed = -1
    _ctype = ""
    _ctype_key: tuple | None = None

    def _header_index(self) -> dict[str, tuple[str, str]]:
        headers = self._headers
        if self._indexed != len(headers):
            index: dict[str, tuple[str, str]] = {}
            for pair in headers:
                index.setdefault(pair[0].lower(), pair)
            self._index, self._indexed = index, len(headers)
        return self._index

    def __contains__(self, name):
        return name.lower() in self._header_index()

    def get(self, name, failobj=None):
        pair = self._header_index().get(name.lower())
        if pair is None:
            return failobj
        value = pair[1]
        # compat32's header_fetch_parse returns an ASCII str as it is (only surrogates make a Header)
        return value if value.__class__ is str and value.isascii() else self.policy.header_fetch_parse(*pair)

    def get_content_type(self):
        """Message.get_content_type(), worked out once per header list and default type."""
        key = (len(self._headers), self._default_type)
        if self._ctype_key != key:
            self._ctype, self._ctype_key = super().get_content_type(), key
        return self._ctype


_PARSER = BytesParser(_class=_IndexedMessage, policy=compat32)
_NESTING_MARKERS = (b"multipart/", b"message/rfc822")  # counted in the ASCII-lowercased message
_HEADER_LINE_RE = re.compile(r"([\041-\071\073-\176]+):")
_ADDR_RE = re.compile(r"[\w.+'=~!#$%&*/?^`{|}-]+@([\w-]+(?:\.[\w-]+)+)", re.UNICODE)
_ANGLE_ADDR_RE = re.compile(r"<\s*([^<>\s]*@[^<>\s]*)\s*>")
# URLs and link targets: what (?i)\b(?:https?://|www\.)... and (?i)\b(?:href|src)... match,
# written to start with a plain character set (the letters that match h, w or s
# case-insensitively, U+017F included), so the regex engine skips ahead to candidates in C
# instead of trying every position: three times faster. The look-behind is the \b.
_URL_RE = re.compile(r"""[hHwW](?<!\w[hHwW])(?:(?<=[hH])(?i:ttps?://)|(?<=[wW])(?i:ww\.))[^\s"'<>()\[\]{}\\^`|]{2,300}""")
# What html_to_text removes, as regular expressions: the definition (the tests hold the code
# to them), but not the code, because on hostile markup they take quadratic time: every
# unclosed "<script" or "<!--" scans to the end of the part again, and every "<" in a long
# run without ">" scans 4,000 characters (a 256 KB part: minutes, then seconds).
_SCRIPT_STYLE_RE = re.compile(r"(?is)<(script|style)\b.*?</\1\s*>|<!--.*?-->")
_TAG_RE = re.compile(r"(?s)<[^>]{0,4000}>")
_OPENER_RE = re.compile(r"(?i)<(?:(script|style)\b|!--)")  # where a _SCRIPT_STYLE_RE match can start
MAX_TAG_CHARS = 4000
_HREF_RE = re.compile(r"""[hHsS\u017f](?<!\w[hHsS\u017f])(?:(?<=[hH])(?i:ref)|(?<=[sS\u017f])(?i:rc))\s*=\s*["']?\s*([^"'\s>]{1,300})""")
_IMG_RE = re.compile(r"(?i)<img\b")


@dataclass(slots=True)
class ParsedMessage:
    """What the classifier and the policy need to know about one message."""

    subject: str = ""
    sender: str = ""  # envelope-free From: address, lowercased
    sender_name: str = ""  # display name of From:
    sender_domain: str = ""
    reply_to_domain: str = ""
    return_path_domain: str = ""
    message_id: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # (lowercased name, value as received)
    text: str = ""  # plain text of the body (HTML converted), capped
    html_parts: int = 0
    text_parts: int = 0
    image_tags: int = 0
    urls: list[str] = field(default_factory=list)
    attachments: list[tuple[str, str]] = field(default_factory=list)  # (filename, content type)
    content_types: list[str] = field(default_factory=list)
    charsets: list[str] = field(default_factory=list)
    encodings: list[str] = field(default_factory=list)  # transfer encodings of text parts
    defects: list[str] = field(default_factory=list)
    size: int = 0  # bytes of the raw message
    truncated: bool = False  # only the first max_bytes were analysed

    _first: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # name -> first value

    def header(self, name: str, default: str = "") -> str:
        """The first `name:` header, RFC 2047 decoded (only the headers asked for are decoded)."""
        value = self._first.get(name.lower())
        return default if value is None else decode_header_value(value)[:MAX_HEADER_CHARS]


def _to_text(data: bytes, charset: str | None) -> str:
    """Decode bytes with the declared charset, falling back when it is unknown or lies."""
    if charset:
        charset = charset.strip().strip('"').lower()
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError, ValueError, TypeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _str_from_surrogates(value: str) -> str:
    """compat32 keeps non-ASCII header bytes as surrogate escapes: turn them back into text."""
    if value.isascii():
        return value
    try:
        value.encode("ascii")
        return value
    except UnicodeEncodeError:
        raw = value.encode("ascii", errors="surrogateescape") if _has_surrogates(value) else value.encode("utf-8", "replace")
        return _to_text(raw, None)


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def decode_header_value(value: object) -> str:
    """Decode RFC 2047 encoded words, tolerating unknown charsets and garbage."""
    value = str(value) if not isinstance(value, str) else value
    value = _str_from_surrogates(value)
    if "=?" not in value:
        return _squeeze_white_space(value)
    try:
        parts = decode_header(value)
    except Exception:  # email.errors.HeaderParseError and friends on hostile input
        return _squeeze_white_space(value)
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            out.append(_to_text(chunk, charset))
        else:
            out.append(chunk)
    return _squeeze_white_space("".join(out))


def _squeeze_white_space(text: str) -> str:
    r"""Runs of white space as one space, none at either end: re.sub(r"\s+", " ", text).strip(),
    as str.split() splits on exactly what \s matches."""
    return " ".join(text.split())


def _domain_of(address_field: str) -> tuple[str, str, str]:
    """(address, display name, domain) of a From:/Reply-To: value, lowercased address."""
    angle = _ANGLE_ADDR_RE.search(address_field)
    if angle:
        addr = angle.group(1)
        name = address_field[: angle.start()].strip().strip('"').strip()
    else:
        addr = address_field.strip()
        name = ""
        paren = addr.find("(")
        if paren > 0:
            name = addr[paren:].strip("() ")
            addr = addr[:paren].strip()
    addr = addr.lower()
    match = _ADDR_RE.search(addr)
    domain = match.group(1).strip(".").lower() if match else ""
    return addr[:254], name[:200], domain[:253]


def html_to_text(markup: str, compiled: bool = False) -> tuple[str, list[str], int]:
    """Text, link targets and the number of <img> tags of an HTML body, as the regular
    expressions above define them, in linear time (`compiled`: by the compiled extension,
    where it is built)."""
    if compiled and _hotpath is not None:
        text, links, images = _hotpath.html_parts(markup)
    else:
        links = _HREF_RE.findall(markup)
        images = len(_IMG_RE.findall(markup))
        text = _strip_tags(_strip_scripts_styles_comments(markup))
    return html.unescape(text), links, images


def _strip_scripts_styles_comments(markup: str) -> str:
    """_SCRIPT_STYLE_RE.sub(" ", markup) in linear time: each opener's closer is looked for
    from where the last search for that closer left off (a closer found after one start is
    the first after every later start up to it; none found means none after any later one)."""
    out: list[str] = []
    copied = 0
    searches: dict[str, tuple[int, int, int]] = {}  # closer -> (searched from, found at, end)
    for opener in _OPENER_RE.finditer(markup):
        at = opener.start()
        if at < copied:  # inside the last match
            continue
        name = opener.group(1)
        closer = "-->" if name is None else "</" + "".join(map(_simple_lower, name))
        start = at + 4 if name is None else opener.end()
        searched_from, found_at, end = searches.get(closer, (-1, -1, -1))
        if not (searched_from >= 0 and start >= searched_from and (found_at < 0 or start <= found_at)):
            found_at, end = _find_closer(markup, closer, start)
            searches[closer] = (start, found_at, end)
        if found_at < 0:
            continue
        out += (markup[copied:at], " ")
        copied = end
    if not out:
        return markup
    out.append(markup[copied:])
    return "".join(out)


def _simple_lower(ch: str) -> str:
    """The one-character lowercase re compares a backreference with under IGNORECASE
    (str.lower() of U+0130 is two characters; its simple lowercase is "i")."""
    return "i" if ch == "\u0130" else ch.lower()


def _find_closer(markup: str, closer: str, start: int) -> tuple[int, int]:
    """(where, end) of the first `closer` at or after `start`: "-->", or "</" and a name
    equal letter for letter after _simple_lower, white space, ">"; (-1, -1) when none."""
    if closer == "-->":
        at = markup.find("-->", start)
        return (at, at + 3) if at >= 0 else (-1, -1)
    name = closer[2:]
    at = markup.find("</", start)
    while at >= 0:
        end = at + 2 + len(name)
        if end <= len(markup) and all(map(str.__eq__, map(_simple_lower, markup[at + 2:end]), name)):
            while end < len(markup) and markup[end].isspace():
                end += 1
            if markup.startswith(">", end):
                return at, end + 1
        at = markup.find("</", at + 1)
    return -1, -1


def _strip_tags(text: str) -> str:
    """_TAG_RE.sub(" ", text) in linear time: a "<" starts a tag when the next ">" is at
    most MAX_TAG_CHARS characters after it. The regex itself where no run between two ">"
    is longer than that (nearly all markup: it then never scans further than one run)."""
    if max(map(len, text.split(">"))) <= MAX_TAG_CHARS:
        return _TAG_RE.sub(" ", text)
    out: list[str] = []
    copied = 0
    close = -1  # the next ">" after the current "<" (found once per ">", not per "<")
    at = text.find("<")
    while at >= 0:
        if close <= at:
            close = text.find(">", at + 1)
            if close < 0:
                break
        if close - at - 1 <= MAX_TAG_CHARS:
            out += (text[copied:at], " ")
            copied = close + 1
            at = text.find("<", close + 1)
        else:
            at = text.find("<", at + 1)
    out.append(text[copied:])
    return "".join(out)


def _strip_mbox_from(raw: bytes) -> bytes:
    if raw.startswith(b"From "):
        nl = raw.find(b"\n")
        return raw[nl + 1 :] if nl >= 0 else b""
    return raw


def _may_have_param(part: Message, header: str, param: str) -> bool:
    """False when `header` cannot carry `param` (nor filename=, filename*0*= and the like):
    the email package's parameter parsing is then skipped, its answer being None anyway."""
    value = part.get(header)
    return value is not None and param in str(value).lower()


def _content_charset(part: Message) -> str | None:
    """part.get_content_charset(): it depends on the Content-Type value alone, and the same
    few values recur in every mailbox, so the email package's parameter parsing (~10 µs) is
    done once per distinct plain value."""
    value = part.get("content-type")
    if value.__class__ is str:
        return _charset_of_content_type(value)
    return part.get_content_charset()


@functools.lru_cache(maxsize=1024)
def _charset_of_content_type(value: str) -> str | None:
    holder = Message()
    holder._headers = [("Content-Type", value)]
    return holder.get_content_charset()


def _read_part_text(part: Message, parsed: ParsedMessage) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception as exc:  # broken base64/QP, odd transfer encodings
        parsed.defects.append(f"payload: {type(exc).__name__}")
        payload = None
    if payload is None:
        raw = part.get_payload()
        payload = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    if len(payload) > MAX_PART_BYTES:
        payload = payload[:MAX_PART_BYTES]
        parsed.truncated = True
    try:
        charset = _content_charset(part) if _may_have_param(part, "content-type", "charset") else None
    except Exception:
        charset = None
    if charset:
        parsed.charsets.append(charset[:40])
    encoding = str(part.get("Content-Transfer-Encoding") or "").strip().lower()
    if encoding:
        parsed.encodings.append(encoding[:30])
    return _to_text(payload.replace(b"\x00", b" "), charset)


def _walk(msg: Message, parsed: ParsedMessage, compiled: bool) -> list[str]:
    texts: list[str] = []
    stack = [msg]
    seen = 0
    while stack:
        part = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            parsed.defects.append("too many MIME parts")
            break
        ctype = part.get_content_type()
        parsed.content_types.append(ctype)
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed(payload))
            continue
        filename = None
        try:
            if _may_have_param(part, "content-disposition", "name") or _may_have_param(part, "content-type", "name"):
                filename = part.get_filename()
        except Exception:
            parsed.defects.append("bad filename")
        disposition = (part.get("Content-Disposition") or "")
        disposition = str(disposition).lower()
        maintype = part.get_content_maintype()
        if filename or "attachment" in disposition or maintype not in ("text", "message", "multipart"):
            parsed.attachments.append((decode_header_value(filename or "")[:200], ctype))
            # Attached HTML is read too (and stays an attachment): mail clients show it, and
            # notifications and today's phishing send their whole content that way.
            if ctype == "text/html":
                text, links, _images = html_to_text(_read_part_text(part, parsed), compiled)
                parsed.urls.extend(links)
                texts.append(text)
            continue
        if ctype == "text/html":
            markup = _read_part_text(part, parsed)
            text, links, images = html_to_text(markup, compiled)
            parsed.html_parts += 1
            parsed.image_tags += images
            parsed.urls.extend(links)
            texts.append(text)
        elif maintype == "text":
            parsed.text_parts += 1
            texts.append(_read_part_text(part, parsed))
        elif ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed(payload))
    return texts


def parse_message(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES, compiled: bool = True) -> ParsedMessage:
    """Parse raw message bytes. Never raises on message content. `compiled` (ENABLE_COMPILED):
    split the header block, strip HTML and find the text's URLs with the compiled extension
    where it is built, and build the MIME tree with mime.py; else the email package's own
    parser and the regexes (the reference)."""
    parsed = ParsedMessage(size=len(raw))
    if len(raw) > max_bytes:
        raw = raw[:max_bytes]
        parsed.truncated = True
    raw = _strip_mbox_from(raw)
    if b"\x00" in raw:
        raw = raw.replace(b"\x00", b" ")
        parsed.defects.append("NUL bytes")
    try:
        # each marker holds a "/": counting those first spares most messages a lowercased copy
        if raw.count(b"/") > MAX_NESTING_MARKERS and sum(map(raw.lower().count, _NESTING_MARKERS)) > MAX_NESTING_MARKERS:
            # The email package recurses (Python and C frames) per nesting level: bounded
            # by RecursionError on big stacks, a segfault on small thread stacks. Refuse.
            raise RecursionError("MIME nested too deep")
        msg = _parse_mime(raw, compiled)
        texts = _fill_from_mime(msg, parsed, compiled)
    except (RecursionError, Exception) as exc:  # the email package can fail on hostile structure
        parsed.defects.append(f"unparseable MIME ({type(exc).__name__}); read as plain text")
        head, _, body = raw.partition(b"\n\n")
        texts = [_to_text(body, None)]
    text = "\n".join(texts)
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS]
        parsed.truncated = True
    parsed.text = text
    parsed.urls.extend(_hotpath.find_urls(text) if compiled and _hotpath is not None else _URL_RE.findall(text))
    return parsed


def _parse_mime(raw: bytes, compiled: bool = True) -> Message:
    """compat32 parse. Most mail is a single part with plain header lines: for those the
    header block is split here and the body set as the payload as is, exactly as the
    email package would leave them, without its per-line Python loop; anything else
    (multipart, continuation oddities, lines that are not headers) gets the FeedParser's
    tree, from mime.py when `compiled`, else from the email package."""
    head_end, body_start = _head_end(raw)
    if head_end < body_start:  # there is a blank line
        msg = _quick_headers(raw[:head_end].decode("ascii", "surrogateescape"), compiled)
        if msg is not None and msg.get_content_maintype() not in ("multipart", "message"):
            msg.set_payload(raw[body_start:].decode("ascii", "surrogateescape"))
            return msg
    if compiled:  # the FeedParser's tree, built faster (mime.py); None where only the FeedParser will do
        msg = mime.parse(raw.decode("ascii", "surrogateescape"), _IndexedMessage)
        if msg is not None:
            return msg
    return _PARSER.parsebytes(raw)


def _quick_headers(head: str, compiled: bool = True) -> Message | None:
    """A Message holding the header block's (name, value) pairs as compat32 stores them,
    or None when the block has anything the simple rules do not cover."""
    split = _hotpath.split_headers if compiled and _hotpath is not None else _split_headers_reference
    headers = split(head)
    if headers is None:
        return None
    msg = _IndexedMessage()
    msg._headers = headers
    return msg


def _split_headers_reference(head: str) -> list[tuple[str, str]] | None:
    """The header block's (name, value) pairs, or None when a line is neither a `name:` line
    nor a continuation of one (the reference of the compiled _hotpath.split_headers)."""
    headers: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t"):
            if not headers:
                return None
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line.rstrip("\r"))
            continue
        match = _HEADER_LINE_RE.match(line)
        if match is None:
            return None
        headers.append((match.group(1), line[match.end() :].lstrip(" \t").rstrip("\r")))
    return headers


def _fill_from_mime(msg: Message, parsed: ParsedMessage, compiled: bool) -> list[str]:
    # raw (name, value) pairs, in order; decoded when asked for (most never are)
    headers = parsed.headers = [(name.lower(), value) for name, value in msg._headers[:MAX_HEADERS]]
    parsed._first = dict(reversed(headers))
    if len(msg._headers) > MAX_HEADERS:
        parsed.defects.append("too many headers")
    parsed.subject = parsed.header("subject")[:500]
    parsed.sender, parsed.sender_name, parsed.sender_domain = _domain_of(parsed.header("from"))
    parsed.reply_to_domain = _domain_of(parsed.header("reply-to"))[2]
    parsed.return_path_domain = _domain_of(parsed.header("return-path"))[2]
    parsed.message_id = parsed.header("message-id")[:300]
    if msg.defects:
        parsed.defects.extend(type(d).__name__ for d in msg.defects[:5])
    return _walk(msg, parsed, compiled)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Cheap identity of a message for the verdict cache, computed without MIME parsing."""

    sender: str  # raw From: value
    subject: str  # raw Subject: value
    message_id: str
    body_digest: str


_FINGERPRINT_HEADERS = (b"from", b"subject", b"message-id")
# The body as the digest sees it, in one C pass: ASCII letters lowercased and the ASCII
# white space that bytes.split() splits on removed (the same bytes as
# b"".join(body.lower().split()), without a list of every word).
_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_ASCII_SPACE = b" \t\n\r\x0b\x0c"


def _head_end(raw: bytes) -> tuple[int, int]:
    """(end of the header block, start of the body): the first blank line, LF or CRLF;
    the span of the first match of rb"\r?\n\r?\n", found with two (memchr-fast) bytes.find."""
    lf = raw.find(b"\n\n")
    # only a CRLF blank line before the LF one counts: search no further (on LF mail this
    # spares a scan of the whole message for a needle that is not there)
    crlf = raw.find(b"\n\r\n", 0, lf + 2) if lf >= 0 else raw.find(b"\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        at, end = crlf, crlf + 3
    elif lf >= 0:
        at, end = lf, lf + 2
    else:
        return len(raw), len(raw)
    return (at - 1 if at and raw[at - 1] == 13 else at), end


def _header_value(head: bytes, lowered: bytes, name: bytes) -> bytes:
    """The first `name:` header of the block, with its continuation lines."""
    at = 0 if lowered.startswith(name + b":") else lowered.find(b"\n" + name + b":")
    if at < 0:
        return b""
    start = at + len(name) + (1 if at == 0 else 2)
    end = head.find(b"\n", start)
    while end >= 0 and head[end + 1 : end + 2] in (b" ", b"\t"):
        end = head.find(b"\n", end + 1)
    return head[start : end if end >= 0 else len(head)]


def fingerprint(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Fingerprint:
    """Sender, subject and a digest of the normalised body (case and white space folded),
    read straight from the bytes: a campaign re-sent to many recipients, with different
    envelope and To: headers, maps to one fingerprint."""
    raw = _strip_mbox_from(raw[:max_bytes])
    head_end, body_start = _head_end(raw)
    head = raw[:head_end]
    lowered = head.lower()
    sender, subject, message_id = (
        _header_value(head, lowered, name).decode("latin-1").strip() for name in _FINGERPRINT_HEADERS
    )
    return Fingerprint(
        sender=sender[:300],
        subject=subject[:500],
        message_id=message_id[:300],
        body_digest=hashlib.blake2b(raw[body_start:].translate(_ASCII_LOWER, _ASCII_SPACE), digest_size=16).hexdigest(),
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """The few header facts a verdict record keeps, decoded from a fingerprint."""

    sender: str
    sender_domain: str
    subject: str
    message_id: str


def summarise(fp: Fingerprint) -> Summary:
    sender, domain, subject = _decode_sender_subject(fp.sender, fp.subject)
    return Summary(sender=sender, sender_domain=domain, subject=subject, message_id=fp.message_id.strip())


@functools.lru_cache(maxsize=4096)
def _decode_sender_subject(raw_sender: str, raw_subject: str) -> tuple[str, str, str]:
    """Decoded sender address, its domain and the subject; memoised, because the copies of
    a campaign (and every message of a mailing list) repeat them."""
    sender, _, domain = _domain_of(decode_header_value(_to_text(raw_sender.encode("latin-1"), None)))
    subject = decode_header_value(_to_text(raw_subject.encode("latin-1"), None))
    return sender, domain, subject[:500]
