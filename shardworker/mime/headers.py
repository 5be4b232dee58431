"""Header-derived fields: the headers map, message ids, threading, date, importance."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from mailparser.dates import parse_mail_date

from shardworker import loops
from shardworker.mime.fixups import decode_header_value, raw_header_text

_MSG_ID = re.compile(r"<[^<>\s]+>")
_MAX_ID_CHARS = 998
_MAX_REFERENCES = 200
_MAX_DATE_CHARS = 256
_HEADERS_BUDGET_CHARS = 256 * 1024
_MAX_HEADER_VALUE_CHARS = 64 * 1024
# Always kept in the headers map, whatever the budget: the fallbacks point at them.
_ESSENTIAL = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "reply-to",
        "sender",
    }
)
_ESSENTIAL |= loops.SIGNAL_HEADERS  # so a message stuffed with headers cannot hide its class


def header_values(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Lower-cased name → raw values in order (compat32 raw, 8-bit bytes as surrogates)."""
    index: dict[str, list[str]] = {}
    for name, value in items:
        index.setdefault(name.strip().lower(), []).append(str(value))
    return index


def headers_map(
    index: dict[str, list[str]], fallback_charset: str | None, defects: list[str]
) -> dict[str, str]:
    """``Record<string,string>``: repeats joined with ``", "``, Received with newlines."""
    out: dict[str, str] = {}
    used = 0
    truncated = False
    for name, values in index.items():
        if not name:
            continue
        if used > _HEADERS_BUDGET_CHARS and name not in _ESSENTIAL:
            truncated = True
            continue
        decoded = [decode_header_value(v, fallback_charset, defects) for v in values]
        joined = ("\n" if name == "received" else ", ").join(decoded)
        if len(joined) > _MAX_HEADER_VALUE_CHARS and name not in _ESSENTIAL:
            defects.append(f"header_value_truncated: {name[:40]}")
            joined = joined[:_MAX_HEADER_VALUE_CHARS]
        out[name] = joined
        used += len(name) + len(joined)
    if truncated:
        defects.append("headers_truncated")
    return out


def _unfold(value: str) -> str:
    return re.sub(r"\s+", " ", raw_header_text(value, None, [])).strip()


def message_id(values: list[str], defects: list[str]) -> str | None:
    """The last Message-ID (as mail-parser reports it to Alga), angle brackets kept (added
    when the sender left them out)."""
    if not values:
        return None
    if len(values) > 1:
        defects.append("message_id_duplicated")
    text = _unfold(values[-1])
    match = _MSG_ID.search(text)
    if match:
        found = match.group(0)
    else:
        token = text.split(" ")[0].strip("<>") if text else ""
        if not token:
            return None
        defects.append("message_id_without_brackets")
        found = f"<{token}>"
    if len(found) > _MAX_ID_CHARS:
        defects.append("message_id_too_long")
        return None
    return found


def synthetic_id(data: bytes, uid: int) -> str:
    """Alga's stable id for a message without Message-ID."""
    return f"imap-hash-{hashlib.sha256(data).hexdigest()}-{uid}"


def references(values: list[str]) -> list[str]:
    ids = [m for v in values for m in _MSG_ID.findall(_unfold(v)) if len(m) <= _MAX_ID_CHARS]
    if len(ids) > _MAX_REFERENCES:
        # The root and the most recent ancestors are the ones threading needs.
        ids = ids[:1] + ids[-(_MAX_REFERENCES - 1) :]
    return ids


def in_reply_to(values: list[str]) -> str | None:
    if not values:
        return None
    text = _unfold(values[0])
    match = _MSG_ID.search(text)
    if match:
        return match.group(0)
    return text[:_MAX_ID_CHARS] or None


def received_at(values: list[str], internal_date: datetime | None, defects: list[str]) -> datetime:
    """Date header in UTC; an invalid or missing one falls back to INTERNALDATE, then now."""
    if values:
        try:
            # A real Date is ~31 characters; the cap bounds the third-party parser's work.
            result = parse_mail_date(_unfold(values[0])[:_MAX_DATE_CHARS])
        except Exception:  # third-party parser on hostile input
            result = None
        if result is not None and result.value is not None:
            return _as_utc(result.value)
        defects.append("date_invalid")
    else:
        defects.append("date_missing")
    if internal_date is not None:
        return _as_utc(internal_date)
    defects.append("date_now")
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


_IMPORTANCE = {
    "high": "high",
    "urgent": "high",
    "normal": "normal",
    "low": "low",
    "non-urgent": "low",
}
_X_PRIORITY = {"1": "high", "2": "high", "3": "normal", "4": "low", "5": "low"}
_SENSITIVITY = {
    "normal": "normal",
    "personal": "personal",
    "private": "private",
    "company-confidential": "confidential",
    "confidential": "confidential",
}


def importance(index: dict[str, list[str]]) -> str | None:
    """``low|normal|high`` from Importance, X-Priority or Priority, when one says so."""
    for name, table in (("importance", _IMPORTANCE), ("priority", _IMPORTANCE)):
        for value in index.get(name, [])[:1]:
            found = table.get(_unfold(value).lower())
            if found:
                return found
    for value in index.get("x-priority", [])[:1]:
        digits = _unfold(value)[:1]
        if digits in _X_PRIORITY:
            return _X_PRIORITY[digits]
    return None


def sensitivity(index: dict[str, list[str]]) -> str | None:
    for value in index.get("sensitivity", [])[:1]:
        return _SENSITIVITY.get(_unfold(value).lower())
    return None


def subject(index: dict[str, list[str]], fallback_charset: str | None, defects: list[str]) -> str:
    values = index.get("subject")
    return decode_header_value(values[0], fallback_charset, defects) if values else ""


def threading(index: dict[str, list[str]]) -> dict[str, Any]:
    """``threadId`` (first References entry, else In-Reply-To), ``inReplyTo``, ``references``."""
    out: dict[str, Any] = {}
    refs = references(index.get("references", []))
    reply_to = in_reply_to(index.get("in-reply-to", []))
    thread = refs[0] if refs else reply_to
    if thread:
        out["threadId"] = thread
    if reply_to:
        out["inReplyTo"] = reply_to
    if refs:
        out["references"] = refs
    return out
