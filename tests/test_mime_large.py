"""Messages above max_raw_bytes: plan from BODYSTRUCTURE, fetch text parts, parse_large."""

from __future__ import annotations

import base64
import os

from imapclient.response_parser import parse_fetch_response

from shardworker.mime import Caps, parse_large, parts_from_fetch, plan_large_fetch
from shardworker.mime.large import MAX_TEXT_PART_BYTES
from tests.harness.dovecot import Dovecot, ImapUser
from tests.mime_support import INTERNAL_DATE, MAILBOX, corpus, find_none, parse, payload
from tests.zodcheck import validate_payloads

MiB = 1024 * 1024


def _big_message() -> bytes:
    pdf = os.urandom(3 * MiB)
    logo = os.urandom(2000)
    inner = corpus("plain.eml")
    parts = [
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nTo: support@example.org\r\n"
        b"Subject: big one\r\nMessage-ID: <big-1@example.de>\r\n"
        b"Date: Tue, 03 Mar 2026 10:15:00 +0100\r\nReferences: <root@example.de>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n',
        b'--m\r\nContent-Type: multipart/related; boundary="r"\r\n\r\n',
        b'--r\r\nContent-Type: multipart/alternative; boundary="a"\r\n\r\n',
        b"--a\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe, see the files.\r\n",
        b"--a\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("<p>Grüße, see the files.</p>".encode()).replace(b"\n", b"\r\n"),
        b"--a--\r\n",
        b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(logo).replace(b"\n", b"\r\n"),
        b"--r--\r\n",
        b"--m\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC-invoice.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(pdf).replace(b"\n", b"\r\n"),
        b"--m\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n" + inner,
        b'--m\r\nContent-Type: text/plain; name="notes.txt"\r\n'
        b'Content-Disposition: attachment; filename="notes.txt"\r\n\r\nnot the body\r\n',
        b"--m--\r\n",
    ]
    return b"".join(parts)


def test_large_message_from_a_real_dovecot(dovecot: Dovecot, imap_user: ImapUser) -> None:
    raw = _big_message()
    uid = dovecot.append(imap_user.name, "INBOX", raw)
    client = dovecot.connect(imap_user.name)
    try:
        client.select_folder("INBOX", readonly=True)
        meta = client.fetch([uid], ["BODYSTRUCTURE", "RFC822.SIZE", "INTERNALDATE"])[uid]
        plan = plan_large_fetch(meta[b"BODYSTRUCTURE"])
        assert plan.text_sections == ["1.1.1", "1.1.2"]
        fetched = client.fetch([uid], plan.fetch_items())[uid]
    finally:
        client.logout()
    caps = Caps(max_raw_bytes=1 * MiB, max_attachment_bytes=2 * MiB)
    parsed = parse_large(
        fetched[b"BODY[HEADER]"],
        plan,
        parts_from_fetch(plan, fetched),
        size=meta[b"RFC822.SIZE"],
        uid=uid,
        mailbox=MAILBOX,
        internal_date=meta[b"INTERNALDATE"],
        caps=caps,
    )
    data = parsed.email_data
    assert parsed.message_id == "<big-1@example.de>"
    assert data["from"] == {"email": "j@example.de", "name": "Jürgen"}
    assert data["body"] == {
        "text": "Grüße, see the files.",
        "html": "<p>Grüße, see the files.</p>",
    }
    assert data["threadId"] == "<root@example.de>"
    assert data["messageSize"] == len(raw)
    listed = [(a["name"], a["contentType"], a.get("contentId")) for a in data["attachments"]]
    assert listed == [
        ("attachment-1", "image/png", "<logo@x>"),
        ("€-invoice.pdf", "application/pdf", None),
        ("attachment-3", "message/rfc822", None),
        ("notes.txt", "text/plain", None),
    ]
    assert all("content" not in a for a in data["attachments"])
    pdf_size = data["attachments"][1]["size"]
    assert abs(pdf_size - 3 * MiB) < 3 * MiB // 100, "decoded size estimate off by > 1 %"
    assert data["attachments"][1]["id"] == "<big-1@example.de>-att-1"
    assert data["ingressSkipReasons"] == [
        {
            "type": "attachment",
            "reason": "attachment_over_max_bytes",
            "attachmentId": "<big-1@example.de>-att-1",
            "attachmentName": "€-invoice.pdf",
            "size": pdf_size,
            "cap": 2 * MiB,
        },
        {"type": "raw_mime", "reason": "raw_mime_over_max_bytes", "size": len(raw), "cap": MiB},
    ]
    assert find_none(data) == []
    [result] = validate_payloads([payload(parsed)])
    assert result["shapeA"] and result["shapeB"], result
    # The full parse of the same bytes agrees on everything the structure can tell.
    full = parse(raw, caps=caps).email_data
    assert full["body"] == data["body"]
    assert [a["name"] for a in full["attachments"]] == [a["name"] for a in data["attachments"]]


def _structure(literal: bytes) -> object:
    return parse_fetch_response([b"1 (BODYSTRUCTURE " + literal + b")"])[1][b"BODYSTRUCTURE"]


def test_single_part_message_is_section_one() -> None:
    plan = plan_large_fetch(
        _structure(b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 1200 30 NIL NIL NIL NIL)')
    )
    assert plan.text_sections == ["1"]
    assert plan.fetch_items() == ["BODY.PEEK[HEADER]", "BODY.PEEK[1]"]
    assert plan.attachments == ()


def test_oversized_text_part_is_not_fetched() -> None:
    size = MAX_TEXT_PART_BYTES + 1
    plan = plan_large_fetch(
        _structure(
            b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" %d 9 NIL NIL NIL NIL)'
            b'("TEXT" "HTML" NIL NIL NIL "7BIT" 10 1 NIL NIL NIL NIL) "ALTERNATIVE")' % size
        )
    )
    assert plan.text_sections == ["2"]
    assert "text_part_over_max_bytes" in plan.defects
    parsed = parse_large(
        b"From: a@example.com\r\nSubject: s\r\n\r\n",
        plan,
        {"2": b"<p>Hi <b>there</b></p>"},
        size=size + 100,
        uid=3,
        mailbox=MAILBOX,
        internal_date=INTERNAL_DATE,
        caps=Caps(),
    )
    assert parsed.email_data["body"] == {"text": "Hi there", "html": "<p>Hi <b>there</b></p>"}
    assert parsed.email_data["to"] == [{"email": MAILBOX}]
    assert parsed.message_id.startswith("imap-hash-") and parsed.message_id.endswith("-3")


def test_missing_part_and_malformed_structure_still_give_an_event() -> None:
    for structure in (None, (), (b"junk",), [[], b"MIXED"], ((1, 2), b"X")):
        plan = plan_large_fetch(structure)
        parsed = parse_large(
            b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\n",
            plan,
            {},
            size=50 * MiB,
            uid=1,
            mailbox=MAILBOX,
            internal_date=None,
            caps=Caps(),
        )
        assert parsed.email_data["body"]["text"] == ""
        assert parsed.email_data["ingressSkipReasons"][-1]["reason"] == "raw_mime_over_max_bytes"


def test_parts_from_fetch_maps_response_keys() -> None:
    plan = plan_large_fetch(
        _structure(
            b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 5 1 NIL NIL NIL NIL)'
            b'("TEXT" "HTML" NIL NIL NIL "7BIT" 5 1 NIL NIL NIL NIL) "ALTERNATIVE")'
        )
    )
    fetched = {b"BODY[HEADER]": b"h", b"BODY[1]": b"t", b"BODY[2]<0>": b"h2", b"BODY[9]": b"x"}
    assert parts_from_fetch(plan, fetched) == {"1": b"t", "2": b"h2"}
