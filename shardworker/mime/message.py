"""The stdlib's compat32 ``Message``, hardened against hostile input.

Bounded parameter parsing: ``email.message._parseparam`` is quadratic in the number of
``;`` in a header: for each separator it counts the quotes from the start of the value
again.  A 560 KB Content-Type made of repeated ``; filename=`` took 9 s per lookup, and
the feed parser (``get_boundary``), ``get_filename``, ``get_content_charset`` and the
charset fallbacks each look once per part (found by bench/fuzz_mime.py).  Parameters are
only ever read from Content-Type and Content-Disposition, so those two are cut, for every
lookup made through ``get`` (which all parameter methods use), at the last ``;`` within
``MAX_PARAM_HEADER_CHARS``.  The headers map is built from ``raw_items`` and keeps the
original text.

Bounded nesting: the feed parser checks every line against the boundary of every
enclosing multipart, so its cost is lines x nesting depth (350 KB nested 900 deep took
17 s; 25 MB would take tens of minutes, on every fetch).  ``limit_nesting`` follows the
boundary declarations and delimiter lines in the raw bytes and cuts the message where a
multipart would open deeper than ``MAX_NESTING`` (the walker drops what lies deeper
anyway) or where those checks would pass a budget linear in the message's lines.

Attached messages stay opaque: for the feed parser a ``message/*`` part is a leaf (see
``BoundedMessage.get_content_type``), so its payload is the exact text that arrived (CRLF
kept, a base64 transfer encoding still to undo).  Parsing it as a message, as the stdlib
does, lost the bytes (re-serialised with LF, 193 instead of 199 bytes) and, for a base64
``message/rfc822``, read the base64 text as the message.  :func:`content_type` gives the
real type.

Folded parameters: a boundary folded inside its quotes (``boundary="simple`` CRLF
`` boundary"``, RFC 2046's own example) is unfolded as RFC 5322 says (the CRLF goes, the
space stays) before the parameter is read.

Wire payloads: ``get_payload()`` decodes 8-bit bytes in a leaf's payload with the part's
declared charset, errors replaced, which gives neither the bytes that arrived nor ASCII;
``wire_payload`` returns those bytes.
"""

from __future__ import annotations

import heapq
import re
from email import errors
from email.feedparser import FeedParser
from email.message import Message
from email.utils import unquote
from typing import Any

from shardworker.mime.lean import parse_clean

MAX_PARAM_HEADER_CHARS = 8 * 1024
MAX_NESTING = 40  # the walker's MAX_DEPTH: content below it is dropped either way
# Line checks (lines x enclosing multiparts) the feed parser may make: this many, or four
# per line of the message if that is more.  So the parse stays linear in the input, and a
# message nested four deep or less is never cut (~0.5 us per check on a busy core).
MIN_LINE_CHECKS = 1_000_000
CHECKS_PER_LINE = 4
# The boundary parameter is read within MAX_PARAM_HEADER_CHARS of its header line.
_LINE_START_WINDOW = MAX_PARAM_HEADER_CHARS + 1024
# A boundary parameter (RFC 2231 pieces included) with its value, quoted or not, possibly
# folded onto the next line.  Values are bounded (RFC 2046 allows 70 characters), so an
# unterminated quote cannot make every match scan to the end of the message.
_DECLARATION = re.compile(
    rb'boundary(\*[0-9]*\*?)?\s*=\s*(?:"((?:[^"\r\n]|\r?\n[ \t]){0,200})"|([^;\s]{0,200}))',
    re.IGNORECASE,
)
_LINE_BREAK = re.compile(rb"\r?\n")
# Lines end at CR, LF or CRLF, as in the feed parser (a CR-only message is still parsed).
_DELIMITER = re.compile(rb"(?:\A|(?<=[\r\n]))--[^\r\n]*")
# A case-insensitive regex scans 2 MB of base64 in 12 ms; lower-casing a window and
# counting with ``bytes.count`` (memchr-fast) takes under 1 ms.
_COUNT_WINDOW = 1024 * 1024
_PARAM_HEADERS = frozenset({"content-type", "content-disposition"})
_MISSING = object()
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# What the feed parser is told a message/* part is, so that it keeps the part as text.
_OPAQUE_TYPE = "application/x-shardworker-message"
# The message is fed to the parser in pieces: ``message_from_bytes`` copies the whole
# text into a StringIO first, four bytes per character (2.2 MB of mail held 9 MB there).
FEED_CHUNK_BYTES = 64 * 1024


class ParamHeaderTruncated(errors.MessageDefect):
    """A Content-Type or Content-Disposition too long to parse was cut for parsing."""


class BoundedMessage(Message):
    def get(self, name: str, failobj: Any = None) -> Any:
        # Message.get's loop, inlined: the parser and the walker look headers up ~30
        # times per message.
        wanted = name.lower()
        for key, raw in self.raw_items():
            if key.lower() == wanted:
                value = self.policy.header_fetch_parse(key, raw)
                break
        else:
            return failobj
        if wanted not in _PARAM_HEADERS:
            return value
        # A header with 8-bit bytes comes back as an email.header.Header; the parameter
        # parser stringifies it, so its length counts the same way.
        text = value if isinstance(value, str) else str(value)
        if "\n" in text:
            text = value = _FOLD.sub("", text)
        if len(text) <= MAX_PARAM_HEADER_CHARS:
            return value
        if not any(isinstance(d, ParamHeaderTruncated) for d in self.defects):
            self.defects.append(ParamHeaderTruncated())
        cut = text.rfind(";", 0, MAX_PARAM_HEADER_CHARS)
        return text[: cut if cut > 0 else MAX_PARAM_HEADER_CHARS]

    def get_param(
        self, param: str, failobj: Any = None, header: str = "content-type", unquote: bool = True
    ) -> Any:
        """``Message.get_param``, each header's parameter list parsed once.

        The stdlib parses the whole header again for each parameter asked for (boundary,
        charset, name, filename): nine parses for a two-part message.  The list is kept
        per header text, so a changed header is parsed again.
        """
        params = self._param_list(header)
        if params is None:
            return failobj
        wanted = param.lower()
        for name, value in params:
            if name.lower() == wanted:
                return _unquote_param(value) if unquote else value
        return failobj

    def _param_list(self, header: str) -> list[tuple[str, Any]] | None:
        value = self.get(header, _MISSING)
        if value is _MISSING:
            return None
        key = (header.lower(), value if isinstance(value, str) else str(value))
        cache: dict[tuple[str, str], list[tuple[str, Any]]] = self.__dict__.setdefault(
            "_sw_params", {}
        )
        found = cache.get(key)
        if found is None:
            found = cache[key] = list(super().get_params([], header, unquote=False))
        return found

    def get_content_type(self) -> str:
        """The type the feed parser acts on: ``message/*`` is reported as an opaque leaf."""
        ctype = super().get_content_type()
        return _OPAQUE_TYPE if ctype.startswith("message/") else ctype


def _unquote_param(value: Any) -> Any:
    """``email.message._unquotevalue``: RFC 2231 triples keep their charset and language."""
    if isinstance(value, tuple):
        return value[0], value[1], unquote(value[2])
    return unquote(value)


def content_type(part: Message) -> str:
    """The part's real content type (``message/*`` included), lower case."""
    return Message.get_content_type(part)


def parse_bytes(raw: bytes) -> Message:
    """``email.message_from_bytes(raw, _class=BoundedMessage)`` without the text copies.

    Fast paths: well-formed mail is read by :func:`~shardworker.mime.lean.parse_clean`,
    which gives the feed parser's tree without its per-line work.  Otherwise a message
    that is one part has only its header block parsed; the body is the rest of the text,
    which is exactly what the feed parser would have joined from its lines (at 50-90
    bytes of line objects per line: a 2 MB body of short lines peaked at 7 times its size).
    """
    clean = parse_clean(raw, BoundedMessage)
    if clean is not None:
        return clean
    single = _single_part(raw)
    if single is not None:
        return single
    return _feed(raw)


def _feed(raw: bytes) -> Message:
    parser = FeedParser(_factory=BoundedMessage)
    view = memoryview(raw)
    for start in range(0, len(raw), FEED_CHUNK_BYTES):
        parser.feed(str(view[start : start + FEED_CHUNK_BYTES], "ascii", "surrogateescape"))
    return parser.close()


def _single_part(raw: bytes) -> Message | None:
    """The message with only its headers parsed, when it is one clean part; else None."""
    end = _header_end(raw)
    if end is None or end > _LINE_START_WINDOW * 8:
        return None
    msg = _feed(raw[:end])
    if msg.defects or msg.get_payload() or msg.get_content_maintype() == "multipart":
        return None
    if content_type(msg).startswith("message/"):
        return None
    msg.set_payload(str(memoryview(raw)[end:], "ascii", "surrogateescape"))
    return msg


def _header_end(raw: bytes) -> int | None:
    """Where the body starts: after the first empty line (CRLF, LF or CR line ends)."""
    found = [
        (pos, len(sep))
        for sep in (b"\r\n\r\n", b"\n\n", b"\r\r")
        if (pos := raw.find(sep, 0, _LINE_START_WINDOW * 8)) >= 0
    ]
    if not found:
        return None
    pos, size = min(found)
    return pos + size


def wire_payload(part: Message) -> bytes | None:
    """A leaf's payload as the bytes that arrived; None when it is not text (a container).

    One 8-bit byte in a base64 attachment used to make the whole message a dead letter:
    the charset-decoded text was not ASCII (UnicodeEncodeError, found by the fuzzer).
    """
    # The stdlib has no accessor for the undecoded text; the attribute is as old as compat32.
    payload = getattr(part, "_payload", None)
    return payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else None


def limit_nesting(raw: bytes, defects: list[str]) -> bytes:
    """``raw`` cut where its multipart nesting would cost the feed parser too much."""
    if _declarations_at_most(raw, min(CHECKS_PER_LINE, MAX_NESTING)):
        # Each open multipart is one declaration, so at most this many are ever open:
        # the line checks stay within CHECKS_PER_LINE per line and nothing is cut (the
        # common case: a plain, alternative or mixed-with-alternative message).
        return raw
    cut = _NestingScan(raw).cut_at()
    if cut is None:
        return raw
    defects.append("mime_too_deep")
    return raw[:cut]


def _boundary_name(match: re.Match[bytes]) -> bytes:
    quoted = match.group(2)
    if quoted is None:
        return bytes(match.group(3))
    return _LINE_BREAK.sub(b"", quoted) if b"\n" in quoted else bytes(quoted)


def _declarations_at_most(raw: bytes, limit: int) -> bool:
    """At most ``limit`` ``boundary`` (any case) in ``raw``, counted window by window."""
    found = 0
    overlap = len(b"boundary") - 1
    for start in range(0, len(raw), _COUNT_WINDOW):
        window = raw[max(0, start - overlap) : start + _COUNT_WINDOW].lower()
        found += window.count(b"boundary")
        if found > limit:
            return False
    return True


def _lines(raw: bytes, start: int, end: int) -> int:
    """Line breaks in ``raw[start:end]``: CR, LF and CRLF each count once."""
    crlf = raw.count(b"\r\n", start, end)
    return raw.count(b"\n", start, end) + raw.count(b"\r", start, end) - crlf


def _line_start(raw: bytes, pos: int) -> int:
    """Where the line holding ``pos`` starts."""
    return max(raw.rfind(b"\n", 0, pos), raw.rfind(b"\r", 0, pos)) + 1


class _NestingScan:
    """Follows boundary declarations and delimiter lines in the raw bytes.

    Two limits: no multipart opens deeper than ``MAX_NESTING``, and the feed parser's
    work (each line checked once per enclosing multipart) stays within the budget.
    Only declarations on a Content-Type line or a continuation line count (a body that
    merely mentions ``boundary=`` is not cut); an RFC 2231 piece cannot be matched to
    its delimiter and stays open: the count errs high, never low.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.open: list[bytes | None] = []
        self.checks = 0
        self.last = 0  # where line checks were last charged up to
        self.budget = max(MIN_LINE_CHECKS, CHECKS_PER_LINE * _lines(raw, 0, len(raw)))

    def cut_at(self) -> int | None:
        raw = self.raw
        declarations = ((m.start(), 0, m) for m in _DECLARATION.finditer(raw))
        delimiters = ((m.start(), 1, m) for m in _DELIMITER.finditer(raw))
        for pos, kind, match in heapq.merge(declarations, delimiters, key=lambda e: e[:2]):
            over = self._charge(pos)
            if over is not None:
                return over
            if kind == 1:
                self._close(match.group(0).rstrip())
            elif self._in_header(pos):
                self.open.append(None if match.group(1) else _boundary_name(match))
                if len(self.open) > MAX_NESTING:
                    return _line_start(raw, pos)
        return self._charge(len(raw))

    def _charge(self, pos: int) -> int | None:
        """Count the line checks up to ``pos``; where to cut once over the budget."""
        lines = _lines(self.raw, self.last, pos)
        cost = lines * len(self.open)
        if self.checks + cost > self.budget:
            share = (self.budget - self.checks) / cost
            return _line_start(self.raw, self.last + int((pos - self.last) * share))
        self.checks += cost
        self.last = pos
        return None

    def _in_header(self, pos: int) -> bool:
        # The search is bounded, or a long line of declarations would be quadratic; a
        # declaration that far into a line counts (errs high).
        low = max(0, pos - _LINE_START_WINDOW)
        found = max(self.raw.rfind(b"\n", low, pos), self.raw.rfind(b"\r", low, pos))
        if found < 0 and low > 0:
            return True
        head = self.raw[found + 1 : found + 14]
        return head[:1] in (b" ", b"\t") or head.lower() == b"content-type:"

    def _close(self, line: bytes) -> None:
        """A delimiter of an open boundary ends every multipart inside it (and itself when
        it is the close delimiter ``--b--``), as the feed parser does."""
        for closing, name in ((True, line[2:-2]), (False, line[2:])):
            if (closing and not line.endswith(b"--")) or name not in self.open:
                continue
            at = len(self.open) - 1 - self.open[::-1].index(name)
            del self.open[at if closing else at + 1 :]
            return
