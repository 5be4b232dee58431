"""Messages above ``max_raw_bytes``: never fetched whole.

The engine fetches ``BODYSTRUCTURE`` first; :func:`plan_large_fetch` picks the text/plain
and text/html body parts to fetch by section (each at most ``MAX_TEXT_PART_BYTES`` on the
wire, at most ``MAX_TEXT_PARTS`` of them) and describes every attachment from the
structure alone.  The engine then fetches ``BODY.PEEK[HEADER]`` and those sections
(:meth:`LargePlan.fetch_items`; :func:`parts_from_fetch` maps the response back) and
:func:`parse_large` builds ``emailData``: attachment metadata without content, the
``raw_mime_over_max_bytes`` skip reason always, and per-attachment cap reasons.

Attachment sizes come from BODYSTRUCTURE, which gives the transfer-encoded size; for
base64 the decoded size is estimated (76-character lines, CRLF).  ``BodyData`` from
imapclient nests sub-parts of a ``multipart`` in a list, and leaves attached messages'
own structures as raw tuples; both are handled, and attached messages are not entered.
"""

from __future__ import annotations

import binascii
import email
import quopri
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from typing import Any

from shardworker.errors import ParseError
from shardworker.mime import headers
from shardworker.mime.assemble import (
    body,
    envelope,
    extras,
    finish,
    first_charset,
    raw_mime_skip,
)
from shardworker.mime.attachments import AttachmentMeta, describe_attachments
from shardworker.mime.fixups import clean_filename, decode_bytes
from shardworker.mime.listsender import resolve_list_sender
from shardworker.mime.message import BoundedMessage
from shardworker.mime.model import Caps, ParsedMail

MAX_TEXT_PART_BYTES = 4 * 1024 * 1024
MAX_TEXT_PARTS = 8
MAX_DEPTH = 40
MAX_NODES = 1000


@dataclass(frozen=True)
class TextPart:
    section: str
    subtype: str  # "plain" or "html"
    charset: str | None
    encoding: str
    size: int


@dataclass(frozen=True)
class LargePlan:
    """What to fetch of a large message, and what its structure already tells."""

    text_parts: tuple[TextPart, ...] = ()
    attachments: tuple[AttachmentMeta, ...] = ()
    text_sections: list[str] = field(default_factory=list)
    defects: tuple[str, ...] = ()

    def fetch_items(self) -> list[str]:
        """FETCH items for imapclient: the header block and each text section."""
        return ["BODY.PEEK[HEADER]", *(f"BODY.PEEK[{s}]" for s in self.text_sections)]


def plan_large_fetch(bodystructure: object) -> LargePlan:
    """Plan the fetch of a large message from its BODYSTRUCTURE (imapclient ``BodyData``)."""
    walker = _Walker()
    try:
        walker.visit(bodystructure, "", 0, False)
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        walker.defects.append(f"bodystructure_malformed: {type(exc).__name__}")
    texts = tuple(walker.texts[:MAX_TEXT_PARTS])
    if len(walker.texts) > MAX_TEXT_PARTS:
        walker.defects.append("text_parts_capped")
    return LargePlan(
        text_parts=texts,
        attachments=tuple(walker.attachments),
        text_sections=[t.section for t in texts],
        defects=tuple(walker.defects),
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else ""


def _params(value: object, header: str = "Content-Type") -> Message:
    """BODYSTRUCTURE parameter pairs as a header, so the stdlib applies RFC 2231."""
    holder = BoundedMessage()  # a hostile server's parameter list: parsed bounded
    if not isinstance(value, Sequence) or isinstance(value, bytes | str):
        return holder
    pairs = [(_text(value[i]), _text(value[i + 1])) for i in range(0, len(value) - 1, 2)]
    rendered = "; ".join(f'{k}="{v.replace(chr(34), "")}"' for k, v in pairs if k)
    holder[header] = f"x; {rendered}" if rendered else "x"
    return holder


def _disposition(value: object) -> tuple[str | None, Message]:
    if isinstance(value, Sequence) and not isinstance(value, bytes | str) and value:
        params = _params(value[1] if len(value) > 1 else None, "Content-Disposition")
        return _text(value[0]).lower() or None, params
    if isinstance(value, bytes | str):
        return _text(value).lower() or None, Message()
    return None, Message()


def _is_multipart(node: Sequence[Any]) -> bool:
    return bool(node) and isinstance(node[0], list | tuple)


class _Walker:
    def __init__(self) -> None:
        self.texts: list[TextPart] = []
        self.attachments: list[AttachmentMeta] = []
        self.defects: list[str] = []
        self.nodes = 0

    def visit(self, node: object, section: str, depth: int, in_attachment: bool) -> None:
        self.nodes += 1
        if not isinstance(node, Sequence) or isinstance(node, bytes | str) or not node:
            self.defects.append("bodystructure_malformed")
            return
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            self.defects.append("bodystructure_too_large")
            return
        if _is_multipart(node):
            self._multipart(node, section, depth, in_attachment)
        else:
            self._leaf(node, section or "1", in_attachment)

    def _multipart(self, node: Sequence[Any], section: str, depth: int, inside: bool) -> None:
        children = (
            node[0] if isinstance(node[0], list) else [p for p in node if isinstance(p, tuple)]
        )
        rest = node[1:] if isinstance(node[0], list) else node[len(children) :]
        disposition, _ = _disposition(rest[2] if len(rest) > 2 else None)
        inside = inside or disposition == "attachment"
        for i, child in enumerate(children, 1):
            self.visit(child, f"{section}.{i}" if section else str(i), depth + 1, inside)

    def _leaf(self, node: Sequence[Any], section: str, in_attachment: bool) -> None:
        maintype, subtype = _text(node[0]).lower(), _text(node[1]).lower()
        ctype = f"{maintype}/{subtype}"
        params = _params(node[2] if len(node) > 2 else None)
        encoding = _text(node[5] if len(node) > 5 else b"").lower()
        size = node[6] if len(node) > 6 and isinstance(node[6], int) else 0
        ext = (
            8 if maintype == "text" else 10 if ctype in ("message/rfc822", "message/global") else 7
        )
        disposition, dparams = _disposition(node[ext + 1] if len(node) > ext + 1 else None)
        name = dparams.get_filename() or params.get_param("name") or ""
        name = name[2] if isinstance(name, tuple) else name
        is_body = subtype in ("plain", "html") and maintype == "text"
        if is_body and not in_attachment and disposition != "attachment" and not name:
            self._add_text(section, subtype, params, encoding, size)
            return
        content_id = " ".join(_text(node[3] if len(node) > 3 else None).split())
        self.attachments.append(
            AttachmentMeta(
                # Alga's mapper: the filename, else attachment-<index+1>.
                name=clean_filename(str(name), self.defects)
                or f"attachment-{len(self.attachments) + 1}",
                content_type=ctype,
                size=max(1, _decoded_size(size, encoding)),
                content_id=content_id or None,
                inline=disposition == "inline",
            )
        )

    def _add_text(self, section: str, subtype: str, params: Message, enc: str, size: int) -> None:
        if size > MAX_TEXT_PART_BYTES:
            self.defects.append("text_part_over_max_bytes")
            return
        charset = params.get_param("charset")
        charset = charset[2] if isinstance(charset, tuple) else charset
        self.texts.append(TextPart(section, subtype, str(charset) if charset else None, enc, size))


def _decoded_size(size: int, encoding: str) -> int:
    if encoding == "base64":
        # 76 base64 characters + CRLF per 57 decoded bytes.
        return (size - (size // 78) * 2) * 3 // 4
    return size


def parts_from_fetch(plan: LargePlan, fetch_data: Mapping[Any, Any]) -> dict[str, bytes]:
    """Map an imapclient FETCH response (``b"BODY[1.2]"`` keys) to ``{section: bytes}``."""
    out: dict[str, bytes] = {}
    for key, value in fetch_data.items():
        name = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        match = re.fullmatch(r"BODY\[([0-9.]+)\](?:<\d+>)?", name.upper())
        if match and match.group(1) in plan.text_sections and isinstance(value, bytes):
            out[match.group(1)] = value
    return out


def _decode_transfer(data: bytes, encoding: str, defects: list[str]) -> bytes:
    try:
        if encoding == "base64":
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            cleaned = cleaned[: len(cleaned) - len(cleaned) % 4]
            return binascii.a2b_base64(cleaned)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        defects.append("transfer_decoding_failed")
    return data


def parse_large(
    header: bytes,
    plan: LargePlan,
    parts: Mapping[str, bytes],
    *,
    size: int,
    uid: int,
    mailbox: str,
    internal_date: datetime | None,
    caps: Caps,
) -> ParsedMail:
    """``emailData`` for a message too large to fetch: header block + text parts only."""
    if not header or not header.strip():
        raise ParseError(f"uid {uid}: empty header block")
    try:
        return _parse_large(
            header,
            plan=plan,
            parts=parts,
            size=size,
            uid=uid,
            mailbox=mailbox,
            internal_date=internal_date,
            caps=caps,
        )
    except (ParseError, MemoryError):
        raise
    except Exception as exc:  # last line of defence, as in parse_message
        raise ParseError(f"uid {uid}: unparseable large message ({type(exc).__name__})") from exc


def _parse_large(
    header: bytes,
    *,
    plan: LargePlan,
    parts: Mapping[str, bytes],
    size: int,
    uid: int,
    mailbox: str,
    internal_date: datetime | None,
    caps: Caps,
) -> ParsedMail:
    defects = list(plan.defects)
    msg = email.message_from_bytes(header, _class=BoundedMessage)
    index = headers.header_values(msg.raw_items())
    charset = first_charset(msg) or next((t.charset for t in plan.text_parts if t.charset), None)
    msg_id = headers.message_id(index.get("message-id", []), defects)
    if msg_id is None:
        defects.append("message_id_synthetic")
        msg_id = headers.synthetic_id(header, uid)
    data = envelope(
        index,
        msg_id=msg_id,
        mailbox=mailbox,
        internal_date=internal_date,
        charset=charset,
        defects=defects,
    )
    texts, htmls = _texts(plan, parts, defects)
    data["body"] = body(texts, htmls, defects)
    attachments, skips = describe_attachments(list(plan.attachments), msg_id, caps)
    if attachments:
        data["attachments"] = attachments
    data.update(extras(index, charset, defects))
    if caps.resolve_list_sender:
        resolve_list_sender(index, data, charset, defects)
    data["messageSize"] = size
    skips.append(raw_mime_skip(size, caps))
    data["ingressSkipReasons"] = skips
    return finish(msg_id, data, defects)


def _texts(
    plan: LargePlan, parts: Mapping[str, bytes], defects: list[str]
) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    htmls: list[str] = []
    for part in plan.text_parts:
        data = parts.get(part.section)
        if data is None:
            defects.append(f"text_part_missing: {part.section}")
            continue
        if len(data) > MAX_TEXT_PART_BYTES:
            defects.append("text_part_truncated")
            data = data[:MAX_TEXT_PART_BYTES]
        decoded = _decode_transfer(data, part.encoding, defects)
        text = decode_bytes(decoded, part.charset, defects)
        (htmls if part.subtype == "html" else texts).append(text)
    return texts, htmls
