"""Builders for the issue-13 corpus (tests/corpus/issue13), written by generate_issue13.py.

Every message is built here from its parts, so the manifest states what the message
*is* (subject, sender, recipients, a text excerpt, each attachment's decoded bytes as md5
and size, the Message-ID headers), never what the parser happened to return.  The
``mailparser`` block of an entry is what Alga's mailparser sees (its Message-ID headers,
and per attachment the filename, Content-ID and disposition as written):
tests/test_mime_mapper.py applies Alga's mapper rules to it.  ``tests/test_mime_corpus.py``
checks that the files on disk are what this script writes.

Line endings are CRLF (as IMAP serves mail) unless a case says otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import quopri
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

DATE = "Tue, 03 Mar 2026 10:15:00 +0100"
ME = "support@example.org"


@dataclass
class Att:
    """One attachment as the generator wrote it."""

    content: bytes
    content_type: str
    filename: str | None = None
    content_id: str | None = None
    disposition: str | None = None
    expect_name: str | None = None  # the name a reader shows, when it differs

    def manifest(self, index: int) -> dict[str, Any]:
        return {
            "name": self.expect_name or self.filename or f"attachment-{index + 1}",
            "contentType": self.content_type,
            "size": len(self.content),
            "md5": hashlib.md5(self.content).hexdigest(),
        }

    def mailparser(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "contentType": self.content_type,
            "size": len(self.content),
            "md5": hashlib.md5(self.content).hexdigest(),
        }
        for key, value in (
            ("filename", self.filename),
            ("contentId", self.content_id),
            ("disposition", self.disposition),
        ):
            if value is not None:
                out[key] = value
        return out


@dataclass
class Case:
    slug: str
    item: str  # the issue item or corpus class this message pins
    raw: bytes
    subject: str
    sender: dict[str, str]
    to: list[str]
    text: str = ""  # an excerpt the body text must contain
    html: str | None = None  # an excerpt the HTML must contain
    attachments: list[Att] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    not_in_text: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    exception: str | None = None  # a documented difference from Alga's mapper (docs/mime.md)
    # What mailparser lists when it differs from what a reader sees (the exceptions).
    mailparser_attachments: list[Att] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "file": name,
            "item": self.item,
            "subject": self.subject,
            "from": self.sender,
            "to": self.to,
            "text": self.text,
        }
        if self.html is not None:
            entry["html"] = self.html
        entry["attachments"] = [
            a.manifest(i) for i, a in enumerate(self.attachments) if a.content or not self.exception
        ]
        if self.not_in_text:
            entry["notInText"] = self.not_in_text
        if self.defects:
            entry["defects"] = self.defects
        entry["mailparser"] = {
            "messageIds": self.message_ids,
            "attachments": [
                a.mailparser()
                for a in (
                    self.attachments
                    if self.mailparser_attachments is None
                    else self.mailparser_attachments
                )
            ],
        }
        if self.exception:
            entry["exception"] = self.exception
        entry.update(self.extra)
        return entry


# ------------------------------------------------------------------------- builders


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def head(
    subject: str,
    *,
    sender: str = "Alice Example <alice@example.com>",
    to: str = f"Support <{ME}>",
    msg_id: str | None = "<{slug}@example.com>",
    extra: str = "",
) -> str:
    lines = [f"Date: {DATE}", f"From: {sender}", f"To: {to}", f"Subject: {subject}"]
    if msg_id:
        lines.append(f"Message-ID: {msg_id}")
    lines.append("MIME-Version: 1.0")
    return "\n".join(lines) + "\n" + extra


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").rstrip("\n")


def qp(data: bytes) -> str:
    return quopri.encodestring(data).decode("ascii").rstrip("\n")


def ew(text: str, charset: str = "utf-8", kind: str = "b") -> str:
    """An RFC 2047 encoded word (one, even if long: the parser must not care)."""
    data = text.encode(charset)
    if kind == "b":
        return f"=?{charset}?b?{base64.b64encode(data).decode()}?="
    body = "".join(
        chr(c) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else f"={c:02X}" for c in data
    )
    return f"=?{charset}?q?{body}?="


def leaf(ctype: str, body: str, *, cte: str | None = None, extra: str = "") -> str:
    lines = [f"Content-Type: {ctype}"]
    if cte:
        lines.append(f"Content-Transfer-Encoding: {cte}")
    return "\n".join(lines) + "\n" + extra + "\n" + body


def att_part(a: Att) -> str:
    ctype = a.content_type
    name = a.filename
    extra = ""
    if a.content_id:
        extra += f"Content-ID: {a.content_id}\n"
    if a.disposition:
        extra += f"Content-Disposition: {a.disposition}"
        extra += f'; filename="{name}"\n' if name else "\n"
    elif name:
        ctype += f'; name="{name}"'
    return leaf(ctype, b64(a.content), cte="base64", extra=extra)


def multipart(subtype: str, boundary: str, parts: list[str]) -> str:
    body = "".join(f"--{boundary}\n{p}\n" for p in parts)
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\n\n{body}--{boundary}--\n'


def pdf(n: int) -> bytes:
    return b"%PDF-1.4\n" + bytes((i * 37 + n) % 256 for i in range(600 + n * 13)) + b"\n%%EOF\n"


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def simple(
    slug: str,
    item: str,
    subject_header: str,
    subject: str,
    body: bytes,
    *,
    text: str,
    ctype: str = "text/plain; charset=utf-8",
    cte: str | None = None,
    sender: str = "Alice Example <alice@example.com>",
    expect_from: dict[str, str] | None = None,
    to: str = f"Support <{ME}>",
    expect_to: list[str] | None = None,
    **kwargs: Any,
) -> Case:
    top = head(subject_header, sender=sender, to=to).replace("{slug}", slug)
    top += f"Content-Type: {ctype}\n"
    if cte:
        top += f"Content-Transfer-Encoding: {cte}\n"
    raw = crlf(top + "\n") + body
    return Case(
        slug,
        item,
        raw,
        subject,
        expect_from or {"email": "alice@example.com", "name": "Alice Example"},
        expect_to or [ME],
        text=text,
        message_ids=[f"<{slug}@example.com>"],
        **kwargs,
    )


ALICE = {"email": "alice@example.com", "name": "Alice Example"}
CaseFn = Callable[[], Iterator[Case]]


def iso2022jp_ms(text: str) -> bytes:
    """``text`` as CP50220 ISO-2022-JP (NEC row 13 included), via its CP932 bytes."""
    out = bytearray()
    kanji = False
    for ch in text:
        code = ch.encode("cp932")
        if len(code) == 1:
            if kanji:
                out += b"\x1b(B"
                kanji = False
            out += code
            continue
        if not kanji:
            out += b"\x1b$B"
            kanji = True
        out += _sjis_to_jis(code[0], code[1])
    if kanji:
        out += b"\x1b(B"
    return bytes(out)


def _sjis_to_jis(s1: int, s2: int) -> bytes:
    if s1 >= 0xE0:
        s1 -= 0x40
    j1 = (s1 - 0x81) * 2 + 0x21
    if s2 >= 0x9F:
        return bytes((j1 + 1, s2 - 0x7E))
    return bytes((j1, s2 - 0x1F - (1 if s2 >= 0x80 else 0)))
