"""The feed parser's tree for well-formed mail, without its per-line work.

``email.feedparser`` reads a message one line at a time: every line becomes a string that
Python code checks against the boundary of every enclosing multipart, and every multipart
compiles a regex for its boundary.  Each message has its own boundary, so the ``re``
cache never helps: the compile alone was 13 % of the CPU per message in the drain.

:func:`parse_clean` builds the same ``BoundedMessage`` tree from the bytes directly: only
header blocks are split into lines; a body is found by looking for the next line that
starts with ``--`` and matches a boundary, and becomes one slice.  It does so only where
the result is certain to be the feed parser's.  On any input where the feed parser would
record a defect, or take one of its rarer paths, it gives up (``None``) and the caller
runs the feed parser:

* a header line that is not a header (a missing blank line, a leading continuation, a
  line starting with ``:``), or any ``From `` line;
* a bare CR in a multipart message (the feed parser ends lines there too);
* a multipart without a usable boundary, with a transfer encoding other than 7bit, 8bit
  or binary, with no first or no close delimiter, or with a delimiter line right after
  another;
* a line that closes an enclosing multipart early (a boundary reused inside);
* ``multipart/digest`` (its parts default to ``message/rfc822``), nesting deeper than
  ``MAX_DEPTH``, or any defect the message classes record on the way (a Content-Type
  too long to parse).

The rules it mirrors (``email/feedparser.py``, ``_parsegen``): a delimiter line is
``--boundary``, then ``--`` for the close delimiter, then spaces or tabs only; a line
that matches an enclosing boundary ends the part; the line break before a delimiter
belongs to it (one is taken off the preamble, each payload and each inner epilogue); an
inner epilogue that is empty becomes ``None``.  tests/test_mime_fastpath.py compares the
two trees, attribute by attribute, over the corpus and the fuzzer's mutations of it.
"""

from __future__ import annotations

import re
from email.message import Message
from email.policy import compat32

MAX_DEPTH = 8
# The feed parser's header line (headerRE), less the From_ and continuation cases.
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
# The common header block, read in one match: header lines (a name not starting with "-",
# so never a delimiter line) with their continuation lines, no bare CR, then the blank
# line.  Anything else is read line by line.
_CLEAN_BLOCK = re.compile(
    rb"(?:[\x21-\x2c\x2e-\x39\x3b-\x7e][\x21-\x39\x3b-\x7e]*+:[^\r\n]*+\r?\n"
    rb"(?:[ \t][^\r\n]*+\r?\n)*+)*+\r?\n"
)
_FIELD = re.compile(r"[^ \t\r\n][^\n]*\n(?:[ \t][^\n]*\n)*")
_MULTIPART_ENCODINGS = ("7bit", "8bit", "binary")


class _GiveUp(Exception):
    """The input needs the feed parser."""


def parse_clean(raw: bytes, factory: type[Message]) -> Message | None:
    """``FeedParser(_factory=factory)``'s tree for ``raw``, or None when only the feed
    parser can tell."""
    try:
        root, end = _Reader(raw, factory).entity(0, (), None, 0)
    except _GiveUp:
        return None
    return root if end == len(raw) else None


def _text(view: memoryview) -> str:
    return str(view, "ascii", "surrogateescape")


def _strip_eol(text: str) -> str:
    """One line break off the end (the feed parser's ``NLCRE_eol``)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(("\n", "\r")) else text


def _delimiter(line: bytes, separator: bytes) -> int:
    """0: not a delimiter of ``separator``; 1: a delimiter; 2: the close delimiter."""
    if not line.startswith(separator):
        return 0
    tail = line[len(separator) :].rstrip(b"\r\n")
    closing = tail.startswith(b"--")
    if closing:
        tail = tail[2:]
    if tail.strip(b" \t"):
        return 0
    return 2 if closing else 1


class _Reader:
    def __init__(self, raw: bytes, factory: type[Message]) -> None:
        self.raw = raw
        self.factory = factory
        self.view = memoryview(raw)
        self.size = len(raw)
        self.crlf_checked = False

    def line_end(self, pos: int) -> int:
        found = self.raw.find(b"\n", pos)
        return self.size if found < 0 else found + 1

    def ends_part(self, pos: int, separators: tuple[bytes, ...]) -> bool:
        line = self.raw[pos : self.line_end(pos)]
        return any(_delimiter(line, sep) for sep in separators)

    def next_stop(self, pos: int, separators: tuple[bytes, ...]) -> int:
        """The start of the first line at or after ``pos`` that ends the part, or the end."""
        if not separators:
            return self.size
        raw = self.raw
        if pos < self.size and raw.startswith(b"--", pos) and self.ends_part(pos, separators):
            return pos
        while True:
            found = raw.find(b"\n--", pos)
            if found < 0:
                return self.size
            pos = found + 1
            if self.ends_part(pos, separators):
                return pos

    def entity(
        self, pos: int, separators: tuple[bytes, ...], parent: Message | None, depth: int
    ) -> tuple[Message, int]:
        """One message or part from ``pos``: the tree and where its text ends."""
        msg = self.factory()
        if parent is not None:
            parent.attach(msg)
        pos = self.headers(msg, pos, separators)
        maintype = msg.get_content_maintype()
        if maintype == "message":
            # The feed parser reads the part as a message (BoundedMessage's message/*
            # parts are opaque leaves and never get here).
            raise _GiveUp
        if maintype == "multipart":
            end = self.multipart(msg, pos, separators, depth)
        else:
            end = self.next_stop(pos, separators)
            msg.set_payload(_text(self.view[pos:end]))
        if msg.defects:
            raise _GiveUp  # e.g. BoundedMessage's ParamHeaderTruncated
        return msg, end

    def headers(self, msg: Message, pos: int, separators: tuple[bytes, ...]) -> int:
        """Read the header block at ``pos`` into ``msg``; where its body starts."""
        block = _CLEAN_BLOCK.match(self.raw, pos)
        if block is not None:
            # One field's lines joined are what header_source_parse makes of the list.
            text = _text(self.view[pos : block.end()])
            for field in _FIELD.finditer(text):
                msg.set_raw(*compat32.header_source_parse([field.group()]))
            return block.end()
        raw = self.raw
        fields: list[list[str]] = []
        while pos < self.size:
            end = self.line_end(pos)
            line = raw[pos:end]
            if line.startswith(b"--") and any(_delimiter(line, sep) for sep in separators):
                break  # the part ends inside its header block: no body
            if line in (b"\r\n", b"\n"):
                pos = end
                break
            if b"\r" in (line[:-2] if line.endswith(b"\r\n") else line):
                raise _GiveUp  # a bare CR ends a line for the feed parser
            if line[:1] in (b" ", b"\t"):
                if not fields:
                    raise _GiveUp
                fields[-1].append(_text(self.view[pos:end]))
            elif line.startswith(b"From ") or not _HEADER_LINE.match(line):
                raise _GiveUp
            else:
                fields.append([_text(self.view[pos:end])])
            pos = end
        for lines in fields:
            msg.set_raw(*compat32.header_source_parse(lines))
        return pos

    def multipart(self, msg: Message, pos: int, separators: tuple[bytes, ...], depth: int) -> int:
        """Read the parts of ``msg`` from ``pos``; where its epilogue ends."""
        if msg.get_content_type() == "multipart/digest":
            raise _GiveUp  # the feed parser gives its parts the default type message/rfc822
        separator = self.separator(msg, depth)
        inner = (*separators, separator)
        first = self.next_stop(pos, inner)
        if first == self.size or self.delimiter_at(first, separators, separator) != 1:
            raise _GiveUp  # no first delimiter, or a close or an outer one before it
        if first > pos:
            msg.preamble = _strip_eol(_text(self.view[pos:first]))
        at = first
        while True:
            start = self.line_end(at)
            if start == self.size or self.next_stop(start, inner) == start:
                raise _GiveUp  # a delimiter at the end, or right after another
            child, at = self.entity(start, inner, msg, depth + 1)
            _strip_child(child)
            if at == self.size:
                raise _GiveUp  # no close delimiter
            kind = self.delimiter_at(at, separators, separator)
            if kind == 2:
                break
            if kind != 1:
                raise _GiveUp  # an enclosing boundary closes this multipart early
        start = self.line_end(at)
        end = self.next_stop(start, separators)
        msg.epilogue = _text(self.view[start:end])
        return end

    def separator(self, msg: Message, depth: int) -> bytes:
        if depth >= MAX_DEPTH:
            raise _GiveUp
        boundary = msg.get_boundary()
        encoding = str(msg.get("content-transfer-encoding", "8bit")).lower()
        if not boundary or encoding not in _MULTIPART_ENCODINGS:
            raise _GiveUp
        if not self.crlf_checked:
            if self.raw.count(b"\r") != self.raw.count(b"\r\n"):
                raise _GiveUp  # a bare CR can start a delimiter line for the feed parser
            self.crlf_checked = True
        try:
            separator = b"--" + boundary.encode("ascii", "surrogateescape")
        except UnicodeError:
            raise _GiveUp from None
        if b"\r" in separator or b"\n" in separator:
            raise _GiveUp
        return separator

    def delimiter_at(self, pos: int, separators: tuple[bytes, ...], separator: bytes) -> int:
        """What the line at ``pos`` is for this multipart; -1 when it ends an outer one."""
        line = self.raw[pos : self.line_end(pos)]
        if any(_delimiter(line, sep) for sep in separators):
            return -1
        return _delimiter(line, separator)


def _strip_child(child: Message) -> None:
    """The line break before a delimiter belongs to the delimiter."""
    if child.get_content_maintype() == "multipart":
        epilogue = child.epilogue
        child.epilogue = _strip_eol(epilogue) if epilogue else None
        return
    # get_payload() would decode 8-bit bytes with the part's charset: the feed parser
    # trims the text it stored.
    payload = getattr(child, "_payload", None)
    if isinstance(payload, str):
        child.set_payload(_strip_eol(payload))
