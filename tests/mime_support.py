"""Shared helpers of the MIME tests: corpus access and message builders."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shardworker.mime import Caps, ParsedMail, build_payload, parse_message

CORPUS = Path(__file__).resolve().parent / "corpus"
GOOD = sorted((CORPUS / "good").glob("*.eml"))
MALFORMED = sorted((CORPUS / "malformed").glob("*.eml"))
# The issue-13 corpus: messages and a manifest written by tests/corpus/generate_issue13.py.
ISSUE13 = CORPUS / "issue13"
ISSUE13_ENTRIES: list[dict[str, Any]] = json.loads((ISSUE13 / "manifest.json").read_text())
MAILBOX = "support@example.org"
TENANT = "3f0e6a52-7a43-4d55-9a7e-6c1f1f5f0b11"
PROVIDER = "9b1c2d3e-4f50-4a6b-8c7d-0e1f2a3b4c5d"
INTERNAL_DATE = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)


def corpus(name: str) -> bytes:
    for path in (CORPUS / "good" / name, CORPUS / "malformed" / name):
        if path.exists():
            return path.read_bytes()
    raise FileNotFoundError(name)


def issue13_raw(entry: dict[str, Any]) -> bytes:
    return (ISSUE13 / entry["file"]).read_bytes()


def parse(raw: bytes, caps: Caps | None = None, **overrides: Any) -> ParsedMail:
    kwargs: dict[str, Any] = {
        "uid": 7,
        "mailbox": MAILBOX,
        "internal_date": INTERNAL_DATE,
        "caps": caps or Caps(),
    }
    kwargs.update(overrides)
    return parse_message(raw, **kwargs)


def payload(parsed: ParsedMail) -> dict[str, Any]:
    return build_payload(
        tenant=TENANT,
        provider_id=PROVIDER,
        email_data=parsed.email_data,
        occurred_at=INTERNAL_DATE,
    )


def find_none(value: object, path: str = "") -> list[str]:
    """Paths of every None in a JSON-like value (Alga must never see null)."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_none(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in find_none(v, f"{path}[{i}]")]
    return []


def multipart(
    attachments: list[tuple[str, str, bytes]],
    *,
    text: str = "See attachments.",
    headers: str = "From: a@example.com\r\nTo: b@example.org\r\nSubject: files\r\n",
) -> bytes:
    """A multipart/mixed message with base64 attachments ``(name, type, content)``."""
    boundary = "b0undary"
    chunks = [
        f"{headers}Message-ID: <files@example.com>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n".encode()
    ]
    for name, ctype, content in attachments:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {ctype}\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n".encode()
        )
        chunks.append(base64.encodebytes(content).replace(b"\n", b"\r\n"))
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)
