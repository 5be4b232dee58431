"""Builders shared by the full parse and the large-message path."""

from __future__ import annotations

import base64
from datetime import datetime
from email.message import Message
from typing import Any

from shardworker.mime import addresses, headers
from shardworker.mime.fixups import html_to_text, part_charset, scrub_strings
from shardworker.mime.model import Caps, ParsedMail
from shardworker.mime.payload import iso_utc

MAX_DEFECTS = 64


def first_charset(msg: Message) -> str | None:
    """The first declared charset, used to read raw 8-bit header bytes."""
    part: Message = msg
    for _ in range(8):
        found = part_charset(part)
        if found:
            return found
        payload = part.get_payload() if part.is_multipart() else None
        if not isinstance(payload, list) or not payload or not isinstance(payload[0], Message):
            return None
        part = payload[0]
    return None


def envelope(
    index: dict[str, list[str]],
    *,
    msg_id: str,
    mailbox: str,
    internal_date: datetime | None,
    charset: str | None,
    defects: list[str],
) -> dict[str, Any]:
    """``id``, ``subject``, ``from``, ``to``, ``cc``, ``bcc`` and ``receivedAt``."""
    data: dict[str, Any] = {
        "id": msg_id,
        "subject": headers.subject(index, charset, defects),
        "from": addresses.sender(index.get("from", []), charset, defects),
        "to": addresses.recipients(index.get("to", []), mailbox, charset, defects),
    }
    for name in ("cc", "bcc"):
        found = addresses.parse_address_headers(index.get(name, []), charset, defects, name)
        if found:
            data[name] = found
    date = headers.received_at(index.get("date", []), internal_date, defects)
    data["receivedAt"] = iso_utc(date)
    return data


def body(text: list[str], html: list[str], defects: list[str]) -> dict[str, str]:
    """``{text, html?}``; ``text`` is derived from the HTML when there is no plain part."""
    out: dict[str, str] = {}
    html_joined = "\n".join(html).replace("\r\n", "\n")
    if text:
        out["text"] = "\n".join(text).replace("\r\n", "\n")
    elif html_joined:
        defects.append("text_from_html")
        out["text"] = html_to_text(html_joined, defects)
    else:
        out["text"] = ""
    if html_joined:
        out["html"] = html_joined
    return out


def extras(index: dict[str, list[str]], charset: str | None, defects: list[str]) -> dict[str, Any]:
    """Threading fields, the headers map, importance and sensitivity."""
    out = headers.threading(index)
    out["headers"] = headers.headers_map(index, charset, defects)
    importance = headers.importance(index)
    if importance:
        out["importance"] = importance
    sensitivity = headers.sensitivity(index)
    if sensitivity:
        out["sensitivity"] = sensitivity
    return out


def raw_mime(data: dict[str, Any], raw: bytes, caps: Caps) -> list[dict[str, Any]]:
    """Add ``rawMimeBase64`` when wanted and within the cap; else say why it is missing."""
    if not caps.include_raw_mime:
        return []
    if len(raw) > caps.max_raw_bytes:
        return [raw_mime_skip(len(raw), caps)]
    data["rawMimeBase64"] = base64.b64encode(raw).decode("ascii")
    return []


def raw_mime_skip(size: int, caps: Caps) -> dict[str, Any]:
    return {
        "type": "raw_mime",
        "reason": "raw_mime_over_max_bytes",
        "size": size,
        "cap": caps.max_raw_bytes,
    }


def finish(msg_id: str, data: dict[str, Any], defects: list[str]) -> ParsedMail:
    """Scrub strings, dedupe defects and freeze the result."""
    clean = scrub_strings(data, defects)
    assert isinstance(clean, dict)
    unique = tuple(dict.fromkeys(defects))[:MAX_DEFECTS]
    return ParsedMail(message_id=str(clean["id"]), email_data=clean, defects=unique)
