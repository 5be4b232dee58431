"""Walk a parsed message: text and HTML bodies, and the parts that are attachments.

The walk is iterative with a depth and a part-count cap, so hostile nesting costs a
bounded amount of work.  An attached message (``message/*``) is one attachment whose
content is the bytes that arrived, transfer encoding undone: its own text never leaks into
the body (mail-parser 4.8 merges it into ``text_plain``).  A multipart without parts is
recovered where a reader would still see parts (:mod:`shardworker.mime.recover`); what is
left is its text, or an attachment when it is bare base64, never base64 in the body.

Transfer encodings are read from the stripped, lower-cased value (Python 3.11 compares
``quoted-printable`` unstripped and left a ``quoted-printable `` body encoded).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.message import Message

from shardworker.mime.fixups import clean_filename, decode_bytes, part_charset, raw_header_text
from shardworker.mime.message import BoundedMessage, content_type, wire_payload
from shardworker.mime.recover import opaque_base64, recover_epilogue, recover_parts, repair_part

MAX_DEPTH = 40
MAX_PARTS = 1000
MAX_RECOVERIES = 8  # each re-reads a part's body: bounded work on hostile input
_BODY_TYPES = ("text/plain", "text/html")


@dataclass
class AttachmentPart:
    """An attachment found in the walk; content is decoded only when asked for."""

    part: Message
    name: str
    content_type: str
    content_id: str | None
    inline: bool


@dataclass
class Walked:
    text: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[AttachmentPart] = field(default_factory=list)
    recoveries: int = 0


def walk_message(msg: Message, fallback_charset: str | None, defects: list[str]) -> Walked:
    walked = Walked()
    stack: list[tuple[Message, int, bool]] = [(msg, 0, False)]
    seen = 0
    while stack:
        part, depth, in_attachment = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            defects.append("mime_too_many_parts")
            break
        _note_defects(part, defects)
        if depth and part.defects and walked.recoveries < MAX_RECOVERIES:
            repaired = repair_part(part)
            if repaired is not None:
                walked.recoveries += 1
                defects.append("part_header_repaired")
                part = repaired
        children = _children(part, walked, defects)
        if children is not None:
            if depth >= MAX_DEPTH:
                defects.append("mime_too_deep")
                continue
            inside = in_attachment or _disposition(part) == "attachment"
            stack.extend((child, depth + 1, inside) for child in reversed(children))
            continue
        _visit_leaf(part, in_attachment, walked, fallback_charset, defects)
    return walked


def _children(part: Message, walked: Walked, defects: list[str]) -> list[Message] | None:
    """Sub-parts of a multipart container; None for leaves (attached messages included)."""
    if not content_type(part).startswith("multipart/"):
        return None
    payload = part.get_payload()
    if isinstance(payload, list):
        children = [p for p in payload if isinstance(p, Message)]
        if part.epilogue and walked.recoveries < MAX_RECOVERIES:
            extra = recover_epilogue(part)
            if extra:
                walked.recoveries += 1
                defects.append("mime_parts_after_close")
                children.extend(extra)
        return children
    if walked.recoveries < MAX_RECOVERIES:
        walked.recoveries += 1
        recovered = recover_parts(part)
        if recovered:
            defects.append("mime_boundary_recovered")
            return recovered
    return None


def _note_defects(part: Message, defects: list[str]) -> None:
    for defect in getattr(part, "defects", ()):
        name = f"mime: {type(defect).__name__}"
        if name not in defects:
            defects.append(name)


def _disposition(part: Message) -> str | None:
    try:
        value = part.get_content_disposition()
    except (ValueError, TypeError, IndexError):
        return None
    return value.lower() if isinstance(value, str) else None


def _visit_leaf(
    part: Message,
    in_attachment: bool,
    walked: Walked,
    fallback_charset: str | None,
    defects: list[str],
) -> None:
    ctype = content_type(part)
    disposition = _disposition(part)
    raw_name = _raw_filename(part)
    if ctype.startswith("multipart/"):
        # A multipart whose boundary never appears: its body is all we have.
        defects.append("multipart_without_parts")
        if _looks_base64(wire_payload(part) or b""):
            part, ctype = opaque_base64(part), "application/octet-stream"
        else:
            ctype = "text/plain"
    is_body_type = ctype in _BODY_TYPES and not in_attachment and disposition != "attachment"
    if is_body_type and (not raw_name or disposition == "inline"):
        text = decode_text_part(part, fallback_charset, defects)
        if text:
            (walked.html if ctype == "text/html" else walked.text).append(text)
        if not raw_name:
            part.set_payload("")  # decoded: the wire text is not needed again (memory)
            return
    name = clean_filename(raw_name, defects) if raw_name else ""
    walked.attachments.append(
        AttachmentPart(
            part=part,
            # Alga's mapper: the filename, else attachment-<index+1>.
            name=name or f"attachment-{len(walked.attachments) + 1}",
            content_type=ctype,
            content_id=_content_id(part),
            # Alga's mapper: inline only when the Content-Disposition says so.
            inline=disposition == "inline",
        )
    )


_BASE64_ONLY = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"


def _looks_base64(data: bytes) -> bool:
    """Bare base64 text: base64 characters and line breaks only, a line's worth at least."""
    stripped = data.strip()
    return len(stripped) >= 40 and not stripped.translate(None, _BASE64_ONLY)


def decode_text_part(part: Message, fallback_charset: str | None, defects: list[str]) -> str:
    """A text part's bytes decoded with its own charset (never the raw 7-bit payload)."""
    data = part_bytes(part, defects)
    return decode_bytes(data, part_charset(part) or fallback_charset, defects)


def part_bytes(part: Message, defects: list[str]) -> bytes:
    """The decoded content of a leaf part; the bytes that arrived for ``message/*``."""
    encoding = transfer_encoding(part)
    if encoding == "base64":
        return _lenient_base64(part, defects)
    if encoding == "quoted-printable":
        wire = wire_payload(part)
        return binascii.a2b_qp(wire) if wire else b""
    if content_type(part).startswith("message/"):
        return wire_payload(part) or b""
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # compat32 decoders on hostile transfer encodings
        defects.append("transfer_decoding_failed")
        return b""
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def transfer_encoding(part: Message) -> str:
    """The Content-Transfer-Encoding token: stripped, unquoted, lower case."""
    value = part.get("content-transfer-encoding")
    if value is None:
        return ""
    words = str(value).strip().strip("\"'").lower().split(None, 1)
    return words[0].split(";", 1)[0].split("(", 1)[0] if words else ""


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_BASE64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "


def _lenient_base64(part: Message, defects: list[str]) -> bytes:
    """Decode base64 the way mail clients do: junk ignored, padding ends the stream.

    compat32 hands back the undecoded text when the payload has a stray character.
    """
    data = wire_payload(part)
    if data is None:
        return b""
    if not data.translate(None, _BASE64_TEXT):
        try:
            return binascii.a2b_base64(data)
        except (binascii.Error, ValueError):
            pass
    else:
        defects.append("base64_invalid_characters")
    cleaned = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4 if len(cleaned) % 4 == 1 else None]
    try:
        return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        defects.append("transfer_decoding_failed")
        return b""


def _raw_filename(part: Message) -> str:
    source = part
    if any(_has_8bit(v) for k, v in part.raw_items() if k.lower() in _PARAM_HEADERS):
        # The stdlib turns 8-bit parameter bytes into U+FFFD; decode them first instead.
        source = BoundedMessage()  # its parameters are parsed too: bounded
        for key, value in part.raw_items():
            if key.lower() in _PARAM_HEADERS:
                source[key] = raw_header_text(str(value), None, [])
    try:
        name = source.get_filename() or source.get_param("name")
    except (ValueError, TypeError, IndexError, LookupError):
        return ""
    if isinstance(name, tuple):
        name = name[2]
    return str(name) if name else ""


_PARAM_HEADERS = frozenset({"content-type", "content-disposition"})


def _has_8bit(value: object) -> bool:
    return isinstance(value, str) and not value.isascii()


def _content_id(part: Message) -> str | None:
    """The Content-ID as written (angle brackets kept, as mail-parser gives it to Alga)."""
    value = part.get("content-id")
    if value is None:
        return None
    text = " ".join(raw_header_text(str(value), None, []).split())
    return text[:998] or None
