"""Walk a parsed message: text and HTML bodies, and the parts that are attachments.

The walk is iterative with a depth and a part-count cap, so hostile nesting costs a
bounded amount of work.  An attached message (``message/*``) is one attachment: its own
text never leaks into the body (mail-parser 4.8 merges it into ``text_plain``).
"""

from __future__ import annotations

import binascii
import mimetypes
import re
from dataclasses import dataclass, field
from email.message import Message

from shardworker.mime.fixups import clean_filename, decode_bytes, part_charset, raw_header_text
from shardworker.mime.message import BoundedMessage, wire_payload

MAX_DEPTH = 40
MAX_PARTS = 1000
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
        children = _children(part)
        if children is not None:
            if depth >= MAX_DEPTH:
                defects.append("mime_too_deep")
                continue
            inside = in_attachment or _disposition(part) == "attachment"
            stack.extend((child, depth + 1, inside) for child in reversed(children))
            continue
        _visit_leaf(part, in_attachment, walked, fallback_charset, defects)
    return walked


def _children(part: Message) -> list[Message] | None:
    """Sub-parts of a multipart container; None for leaves (attached messages included)."""
    if part.get_content_maintype() != "multipart":
        return None
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
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
    ctype = part.get_content_type()
    disposition = _disposition(part)
    raw_name = _raw_filename(part)
    if ctype.startswith("multipart/"):
        # A multipart whose boundary never appears: its body is all we have.
        defects.append("multipart_without_parts")
        ctype = "text/plain"
    is_body_type = ctype in _BODY_TYPES and not in_attachment and disposition != "attachment"
    if is_body_type and (not raw_name or disposition == "inline"):
        text = decode_text_part(part, fallback_charset, defects)
        if text:
            (walked.html if ctype == "text/html" else walked.text).append(text)
        if not raw_name:
            return
    name = clean_filename(raw_name, defects) if raw_name else ""
    if not name:
        name = _default_name(part, ctype, len(walked.attachments) + 1, defects)
    walked.attachments.append(
        AttachmentPart(
            part=part,
            name=name,
            content_type=ctype,
            content_id=_content_id(part),
            inline=disposition == "inline"
            or (disposition is None and _content_id(part) is not None),
        )
    )


def decode_text_part(part: Message, fallback_charset: str | None, defects: list[str]) -> str:
    """A text part's bytes decoded with its own charset (never the raw 7-bit payload)."""
    data = part_bytes(part, defects)
    return decode_bytes(data, part_charset(part) or fallback_charset, defects)


def part_bytes(part: Message, defects: list[str]) -> bytes:
    """The decoded content of a leaf part; a flattened message for ``message/*``."""
    if part.get_content_maintype() == "message":
        return _flatten(part, defects)
    if _transfer_encoding(part) == "base64":
        return _lenient_base64(part, defects)
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # compat32 decoders on hostile transfer encodings
        defects.append("transfer_decoding_failed")
        return b""
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _transfer_encoding(part: Message) -> str:
    value = part.get("content-transfer-encoding")
    return str(value).strip().lower() if value is not None else ""


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


def _flatten(part: Message, defects: list[str]) -> bytes:
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("ascii", "surrogateescape")
    inner = payload[0] if isinstance(payload, list) and payload else None
    if not isinstance(inner, Message):
        return b""
    try:
        return inner.as_bytes()
    except Exception:  # the generator re-encodes with declared charsets; some refuse
        defects.append("attached_message_unflattenable")
        return inner.as_string().encode("utf-8", "surrogateescape")


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
    value = part.get("content-id")
    if value is None:
        return None
    text = raw_header_text(str(value), None, []).strip().strip("<>").strip()
    return text[:998] or None


def _default_name(part: Message, ctype: str, n: int, defects: list[str]) -> str:
    if ctype.startswith("message/"):
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            subject = inner[0].get("subject")
            title = clean_filename(str(subject), defects) if subject else ""
            if title:
                return f"{title[:120]}.eml"
        return f"attached-message-{n}.eml"
    ext = mimetypes.guess_extension(ctype, strict=False) or ".bin"
    return f"attachment-{n}{ext}"
