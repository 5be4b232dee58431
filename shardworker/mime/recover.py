"""Structure recovery: what a mail reader still shows when the MIME structure is broken.

Each repair runs only when the stdlib parser reported the matching defect, so clean mail
pays nothing for it:

* **header block** (``MissingHeaderBodySeparatorDefect``, or a UTF-8 BOM): the parser ends
  the header block at the first line that is not a header, and From, To, Message-ID and
  Content-Type fall into the body.  :func:`repair_header_block` drops a leading BOM,
  rewrites the obsolete ``Subject : x`` form (RFC 5322 section 4.5.3 allows whitespace
  before the colon) and turns a line that breaks the block, but is followed by more
  headers or ends a header that expects more (``;`` or ``,``), into a continuation line.
  A line followed by no further header is where the body starts, as before.
  The same repair applies to the header block of a body part.
* **a multipart whose boundary never appears** (no parts): when its body holds delimiter
  lines of another boundary followed by part headers, the parts are read with that
  boundary; when it starts with part headers, it is read as one part.
* **a nested multipart that reuses its parent's boundary**: the inner one closes the outer
  one early and the remaining parts land in the outer epilogue; they are read from there.
"""

from __future__ import annotations

import re
from email.message import Message

from shardworker.mime.message import BoundedMessage, content_type, parse_bytes, wire_payload

BOM = b"\xef\xbb\xbf"
MAX_REPAIR_LINES = 2000
MAX_EPILOGUES = 8
_LOOKAHEAD_LINES = 5
# The stdlib's header line (headerRE in email.feedparser), less the From_ and WSP cases.
_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_NAMES = (
    rb"(?:from|to|cc|bcc|subject|date|message-id|in-reply-to|references|reply-to|sender"
    rb"|mime-version|received|return-path|delivered-to|importance|priority|sensitivity"
    rb"|thread-topic|thread-index|authentication-results|dkim-signature|organization"
    rb"|user-agent|(?:x|content|list|arc|resent|accept)-[a-z0-9-]+)"
)
_KNOWN = re.compile(_NAMES + rb"[ \t]*:", re.IGNORECASE)
_OBSOLETE = re.compile(rb"(" + _NAMES + rb")[ \t]+:", re.IGNORECASE)
_DELIMITER = re.compile(rb"--([^\r\n]{1,70}?)(?:--)?[ \t]*(?:\r\n|\r|\n)")
_PART_HEADER = re.compile(rb"content-[a-z-]+[ \t]*:", re.IGNORECASE)


_REPAIRABLE = frozenset({"MissingHeaderBodySeparatorDefect", "MisplacedEnvelopeHeaderDefect"})
_OBSOLETE_FROM = re.compile(r"From[ \t]+:")


def needs_header_repair(msg: Message, raw: bytes) -> bool:
    """Whether the parse shows a broken header block (``From :`` reads as an mbox line)."""
    if raw.startswith(BOM):
        return True
    unixfrom = msg.get_unixfrom()
    if unixfrom and _OBSOLETE_FROM.match(unixfrom):
        return True
    return any(type(d).__name__ in _REPAIRABLE for d in msg.defects)


def repair_header_block(raw: bytes) -> bytes | None:
    """``raw`` with its header block repaired, or None when there is nothing to repair."""
    start = len(BOM) if raw.startswith(BOM) else 0
    lines = _head_lines(raw, start)
    out: list[bytes] = []
    changed = start > 0
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n", b"\r") or not line:
            break
        obsolete = _OBSOLETE.match(line)
        if not obsolete and (
            line[:1] in (b" ", b"\t") or _HEADER.match(line) or (i == 0 and line[:5] == b"From ")
        ):
            out.append(line)
            continue
        if obsolete:
            out.append(obsolete.group(1).rstrip() + b":" + line[obsolete.end() :])
        elif _continues(out, lines, i):
            out.append(b" " + line)
        else:
            break  # the body starts here (a missing blank line, as the parser reads it)
        changed = True
    if not changed:
        return None
    tail_start = start + sum(len(line) for line in lines[: len(out)])
    return b"".join(out) + raw[tail_start:]


def _head_lines(raw: bytes, start: int) -> list[bytes]:
    """The first lines of ``raw`` from ``start``, line endings kept (bounded)."""
    lines: list[bytes] = []
    pos = start
    while pos < len(raw) and len(lines) < MAX_REPAIR_LINES:
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        lines.append(raw[pos:end])
        if end - pos <= 2 and raw[pos:end].strip() == b"":
            break
        pos = end
    return lines


def _continues(out: list[bytes], lines: list[bytes], i: int) -> bool:
    """Whether the stray line ``lines[i]`` belongs to the header before it."""
    if not out:
        return False
    if out[-1].rstrip().endswith((b";", b",")):
        return True
    for later in lines[i + 1 : i + 1 + _LOOKAHEAD_LINES]:
        if later.strip() == b"":
            return False
        if _KNOWN.match(later):
            return True
    return False


def repair_part(part: Message) -> Message | None:
    """A body part whose header block broke (as above), re-read repaired; else None."""
    if not any(type(d).__name__ == "MissingHeaderBodySeparatorDefect" for d in part.defects):
        return None
    body = wire_payload(part)
    if body is None:
        return None
    items = "".join(f"{name}: {value}\r\n" for name, value in part.raw_items())
    repaired = repair_header_block(items.encode("ascii", "surrogateescape") + body)
    return parse_bytes(repaired) if repaired is not None else None


def recover_parts(part: Message) -> list[Message] | None:
    """The parts of a multipart whose declared boundary never appears, or None."""
    body = wire_payload(part)
    if not body:
        return None
    boundary = _inferred_boundary(body)
    if boundary is not None:
        return _read_parts(content_type(part), boundary, body)
    if _PART_HEADER.match(body.lstrip(b"\r\n")):
        return [parse_bytes(body.lstrip(b"\r\n"))]
    return None


def recover_epilogue(part: Message) -> list[Message]:
    """Parts after an early close delimiter of ``part``'s own boundary (reused by a child).

    Each child that reuses the boundary closes it once more, so the parts read from the
    epilogue may leave an epilogue of their own: followed up to ``MAX_EPILOGUES`` times.
    """
    boundary = part.get_boundary() if part.epilogue else None
    found: list[Message] = []
    holder = part
    for _ in range(MAX_EPILOGUES):
        epilogue = holder.epilogue
        if not epilogue or not boundary or f"--{boundary}" not in epilogue:
            break
        data = epilogue.encode("ascii", "surrogateescape")
        inferred = _inferred_boundary(data)
        if inferred is None or inferred.decode("ascii", "surrogateescape") != boundary:
            break
        holder.epilogue = None
        container = _container(content_type(part), inferred, data)
        found.extend(_parts_of(container))
        holder = container
    return found


def _inferred_boundary(body: bytes) -> bytes | None:
    """The first delimiter line that is followed by a part header."""
    for match in _DELIMITER.finditer(body):
        start = match.start()
        if start and body[start - 1 : start] not in (b"\n", b"\r"):
            continue
        if _PART_HEADER.match(body, match.end()) and b'"' not in match.group(1):
            return match.group(1).rstrip()
    return None


def _container(ctype: str, boundary: bytes, body: bytes) -> Message:
    head = f'Content-Type: {ctype}; boundary="'.encode() + boundary + b'"\r\n\r\n'
    return parse_bytes(head + body)


def _parts_of(container: Message) -> list[Message]:
    payload = container.get_payload()
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _read_parts(ctype: str, boundary: bytes, body: bytes) -> list[Message] | None:
    return _parts_of(_container(ctype, boundary, body)) or None


def opaque_base64(part: Message) -> Message:
    """A leaf for base64 text found where no structure says what it is."""
    leaf = BoundedMessage()
    leaf["Content-Type"] = "application/octet-stream"
    leaf["Content-Transfer-Encoding"] = "base64"
    payload = wire_payload(part) or b""
    leaf.set_payload(payload.decode("ascii", "surrogateescape"))
    return leaf
