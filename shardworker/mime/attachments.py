"""Attachment records and Alga's caps.

Every non-empty attachment keeps its metadata.  Its ``content`` (base64) is added only
when the caps allow; otherwise an ``ingressSkipReasons`` entry says which cap applied.
Caps are applied in message order, and the first one that applies wins: the count cap
(``attachment_count_exceeded``), then the per-attachment cap
(``attachment_over_max_bytes``), then the running total of included content
(``attachment_total_bytes_exceeded``).

Ids follow Alga's mapper (``contentId || checksum || "<msgId>-att-<i>"``): the Content-ID
as written (angle brackets kept), else mail-parser's checksum, the md5 hex of the decoded
content, else ``<msgId>-att-<i>`` (only on the large-message path, where the content is
never fetched).  Like the mapper, two identical attachments share one id.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from shardworker.mime.body import AttachmentPart, part_bytes
from shardworker.mime.model import Caps


@dataclass(frozen=True)
class AttachmentMeta:
    """What is known about one attachment before the caps are applied."""

    name: str
    content_type: str
    size: int
    content_id: str | None
    inline: bool


def cap_reason(index: int, size: int, total: int, caps: Caps) -> tuple[str, int] | None:
    """The first cap that keeps this attachment's content out, with the cap's value."""
    if index >= caps.max_attachments:
        return "attachment_count_exceeded", caps.max_attachments
    if size > caps.max_attachment_bytes:
        return "attachment_over_max_bytes", caps.max_attachment_bytes
    if total + size > caps.max_total_attachment_bytes:
        return "attachment_total_bytes_exceeded", caps.max_total_attachment_bytes
    return None


def _entry(meta: AttachmentMeta, att_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": att_id,
        "name": meta.name,
        "contentType": meta.content_type,
        "size": meta.size,
    }
    if meta.content_id:
        entry["contentId"] = meta.content_id
    entry["isInline"] = meta.inline
    return entry


def _skip(reason: str, cap: int, att_id: str, meta: AttachmentMeta) -> dict[str, Any]:
    return {
        "type": "attachment",
        "reason": reason,
        "attachmentId": att_id,
        "attachmentName": meta.name,
        "size": meta.size,
        "cap": cap,
    }


def build_attachments(
    parts: list[AttachmentPart], caps: Caps, defects: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attachment entries (content within caps) and the skip reasons, from full MIME."""
    entries: list[dict[str, Any]] = []
    skips: list[dict[str, Any]] = []
    total = 0
    for ap in parts:
        data = part_bytes(ap.part, defects)
        if not data:
            # Alga's domain schema requires size > 0: an empty attachment is not listed.
            defects.append("attachment_empty")
            continue
        meta = AttachmentMeta(ap.name, ap.content_type, len(data), ap.content_id, ap.inline)
        att_id = ap.content_id or hashlib.md5(data, usedforsecurity=False).hexdigest()
        entry = _entry(meta, att_id)
        if caps.include_attachment_content:
            blocked = cap_reason(len(entries), meta.size, total, caps)
            if blocked:
                skips.append(_skip(blocked[0], blocked[1], att_id, meta))
            else:
                entry["content"] = base64.b64encode(data).decode("ascii")
                total += meta.size
        entries.append(entry)
        del data
    return entries, skips


def describe_attachments(
    metas: list[AttachmentMeta], message_id: str, caps: Caps
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Entries without content (the content was never fetched), and the caps that apply."""
    entries: list[dict[str, Any]] = []
    skips: list[dict[str, Any]] = []
    total = 0
    for meta in metas:
        index = len(entries)
        att_id = meta.content_id or f"{message_id}-att-{index}"
        if caps.include_attachment_content:
            blocked = cap_reason(index, meta.size, total, caps)
            if blocked:
                skips.append(_skip(blocked[0], blocked[1], att_id, meta))
            else:
                total += meta.size
        entries.append(_entry(meta, att_id))
    return entries, skips
