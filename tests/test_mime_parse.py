"""parse_message on the seed corpus: fields, mail-parser bug corrections, fallbacks."""

from __future__ import annotations

import base64
import hashlib
import time
from datetime import UTC, datetime

import pytest

from shardworker.errors import ParseError
from shardworker.mime import Caps, build_payload, iso_utc
from shardworker.mime.addresses import is_zod_email
from shardworker.mime.fixups import html_to_text
from tests.mime_support import (
    GOOD,
    INTERNAL_DATE,
    MAILBOX,
    MALFORMED,
    corpus,
    find_none,
    parse,
)


def test_plain_message_fields() -> None:
    data = parse(corpus("plain.eml")).email_data
    assert data["id"] == "<plain-1@example.com>"
    assert data["subject"] == "Printer on floor 3 is jammed"
    assert data["from"] == {"email": "alice@example.com", "name": "Alice Example"}
    assert data["to"] == [{"email": "support@example.org", "name": "Support"}]
    assert data["body"] == {"text": "Hello,\n\nthe printer on floor 3 is jammed again.\n\nAlice\n"}
    assert data["receivedAt"] == "2026-03-03T09:15:00.000Z"
    assert data["messageSize"] == len(corpus("plain.eml"))
    assert data["headers"]["subject"] == "Printer on floor 3 is jammed"
    assert "attachments" not in data and "importance" not in data and "threadId" not in data


def test_alternative_has_text_html_and_cc() -> None:
    data = parse(corpus("alternative.eml")).email_data
    assert data["body"]["text"] == "The VPN drops every hour — since Monday."
    assert data["body"]["html"] == "<p>The VPN drops every hour — since <b>Monday</b>.</p>"
    assert data["to"] == [
        {"email": "support@example.org"},
        {"email": "carol@example.org", "name": "Carol, Ops"},
    ]
    assert data["cc"] == [{"email": "dave@example.net", "name": "Dave"}]
    assert "bcc" not in data


def test_attachments_metadata_content_and_ids() -> None:
    data = parse(corpus("attachments.eml")).email_data
    names = [(a["name"], a["contentType"], a["size"]) for a in data["attachments"]]
    assert names == [
        ("invoice.pdf", "application/pdf", 2057),
        ("app.log", "text/plain", 18),
        ("€-report.bin", "application/octet-stream", 6),
    ]
    pdf = base64.b64decode(data["attachments"][0]["content"])
    assert pdf.startswith(b"%PDF-1.4\n") and len(pdf) == 2057
    # No Content-ID: the id is mail-parser's checksum, the md5 hex of the content (Alga).
    assert data["attachments"][0]["id"] == hashlib.md5(pdf).hexdigest()
    assert base64.b64decode(data["attachments"][1]["content"]) == "line 1 ✓\r\nline 2".encode()
    assert data["body"]["text"] == "See attached."
    assert all(a["isInline"] is False for a in data["attachments"])


def test_inline_image_uses_content_id() -> None:
    data = parse(corpus("inline-image.eml")).email_data
    [image] = data["attachments"]
    # Alga's mapper: the Content-ID with its angle brackets; inline only by disposition.
    assert image["id"] == "<logo-123@example.com>"
    assert image["contentId"] == "<logo-123@example.com>"
    assert image["isInline"] is False  # a Content-ID but no Content-Disposition
    assert image["contentType"] == "image/png"
    assert image["name"] == "attachment-1"
    assert 'src="cid:logo-123@example.com"' in data["body"]["html"]


def test_reply_threading() -> None:
    data = parse(corpus("reply.eml")).email_data
    assert data["references"] == ["<root-1@example.com>", "<reply-2@example.org>"]
    assert data["threadId"] == "<root-1@example.com>"
    assert data["inReplyTo"] == "<reply-2@example.org>"


def test_thread_id_falls_back_to_in_reply_to() -> None:
    raw = corpus("reply.eml").replace(b"References: <root-1@example.com>\r\n <reply-2", b"X-R: <x")
    data = parse(raw).email_data
    assert "references" not in data
    assert data["threadId"] == data["inReplyTo"] == "<reply-2@example.org>"


def test_encoded_words_split_inside_a_character() -> None:
    data = parse(corpus("nonascii-headers.eml")).email_data
    assert data["subject"] == "Grüße aus Köln — 東京"
    assert data["from"] == {"email": "juergen@example.de", "name": "Jürgen Müller"}
    assert data["to"] == [{"email": "francois@example.fr", "name": "François"}]
    assert data["body"]["text"] == "Grüße!\n"


def test_iso_2022_jp_7bit_body_is_decoded() -> None:
    """mail-parser 4.8 returns the raw escape sequences of a 7-bit ISO-2022-JP body."""
    raw = corpus("iso2022jp.eml")
    data = parse(raw).email_data
    assert data["body"]["text"] == "こんにちは、サポートチーム。\n請求書が届きません。\n"
    assert "\x1b" not in data["body"]["text"]
    assert data["subject"] == "請求書について"
    assert data["from"]["name"] == "山田"


def test_windows_1252_8bit_subject_keeps_every_character() -> None:
    """mail-parser 4.8 drops the non-UTF-8 bytes of a raw 8-bit windows-1252 Subject."""
    parsed = parse(corpus("windows1252-subject.eml"))
    assert parsed.email_data["subject"] == "Caf\u00e9 \u2013 \u201cquoted\u201d \u20ac5 na\u00efve"
    assert parsed.email_data["from"] == {"email": "rene@example.fr", "name": "René"}
    assert parsed.email_data["body"]["text"] == "Prix: 5€ — déjà payé.\n"
    assert "header_8bit_non_utf8" in parsed.defects


def test_attached_message_is_not_merged_into_the_body() -> None:
    """mail-parser 4.8 appends an attached message/rfc822's text to text_plain."""
    raw = corpus("rfc822-attachment.eml")
    data = parse(raw).email_data
    assert data["body"] == {"text": "Please look at the attached message."}
    [attached] = data["attachments"]
    assert attached["contentType"] == "message/rfc822"
    assert attached["name"] == "attachment-1"
    inner = base64.b64decode(attached["content"])
    assert b"INNER MESSAGE TEXT" in inner and b"Subject: You won" in inner
    assert b"\r\n" in inner and b"\n" not in inner.replace(b"\r\n", b"")


def test_unterminated_quoted_filename_loses_its_quote() -> None:
    parsed = parse(corpus("unterminated-filename.eml"))
    [report] = parsed.email_data["attachments"]
    assert report["name"] == "report.pdf"
    assert "filename_unbalanced_quote" in parsed.defects


def test_missing_message_id_gives_stable_synthetic_id() -> None:
    raw = corpus("no-message-id.eml")
    first = parse(raw, uid=42)
    again = parse(raw, uid=42)
    digest = hashlib.sha256(raw).hexdigest()
    assert first.message_id == again.message_id == f"imap-hash-{digest}-42"
    assert first.email_data["id"] == first.message_id
    assert "message_id_synthetic" in first.defects


def test_duplicated_message_id_takes_the_last() -> None:
    """mail-parser (under Alga's mapper) reports the last Message-ID header."""
    parsed = parse(corpus("duplicated-message-id.eml"))
    assert parsed.message_id == "<second-id@example.com>"
    assert parsed.email_data["headers"]["message-id"] == (
        "<first-id@example.com>, <second-id@example.com>"
    )


def test_message_id_without_brackets_gets_them() -> None:
    raw = corpus("plain.eml").replace(b"<plain-1@example.com>", b"plain-1@example.com")
    assert parse(raw).message_id == "<plain-1@example.com>"


def test_missing_to_falls_back_to_the_mailbox() -> None:
    parsed = parse(corpus("no-to.eml"))
    assert parsed.email_data["to"] == [{"email": MAILBOX}]
    assert "to_fallback" in parsed.defects
    invalid = parse(corpus("no-to.eml"), mailbox="not a mailbox").email_data
    assert invalid["to"] == [{"email": "undisclosed-recipients@invalid.invalid"}]


def test_invalid_from_falls_back_and_keeps_the_header() -> None:
    parsed = parse(corpus("bad-from.eml"))
    assert parsed.email_data["from"] == {
        "email": "unknown-sender@invalid.invalid",
        "name": '"Printer Daemon" <not an address>',
    }
    assert parsed.email_data["headers"]["from"] == '"Printer Daemon" <not an address>'
    no_from = parse(
        corpus("plain.eml").replace(b"From: Alice Example <alice@example.com>\r\n", b"")
    )
    assert no_from.email_data["from"] == {"email": "unknown-sender@invalid.invalid"}


def test_single_unambiguous_address_is_recovered() -> None:
    raw = corpus("plain.eml").replace(b"Alice Example <alice@example.com>", b"Alice alice@x.com")
    parsed = parse(raw)
    assert parsed.email_data["from"] == {"email": "alice@x.com", "name": "Alice"}
    assert "address_recovered: from" in parsed.defects


def test_ambiguous_address_is_not_guessed() -> None:
    raw = corpus("plain.eml").replace(
        b"Alice Example <alice@example.com>", b"alice@example.org)<bob@example.org>"
    )
    assert parse(raw).email_data["from"]["email"] == "unknown-sender@invalid.invalid"


def test_idn_domain_becomes_punycode() -> None:
    data = parse(corpus("idn-from.eml")).email_data
    assert data["from"] == {"email": "info@xn--bcher-kva.de", "name": "Bücher"}


def test_invalid_recipients_are_dropped_not_fatal() -> None:
    raw = corpus("plain.eml").replace(
        b"To: Support <support@example.org>", b"To: o'brien@example.org, x@y, ok@example.org"
    )
    parsed = parse(raw)
    assert parsed.email_data["to"] == [{"email": "ok@example.org"}]
    assert "address_invalid: to" in parsed.defects


def test_date_fallbacks() -> None:
    bad = parse(corpus("bad-date.eml"))
    assert bad.email_data["receivedAt"] == iso_utc(INTERNAL_DATE)
    assert "date_invalid" in bad.defects
    before = datetime.now(UTC).replace(microsecond=0)
    now = parse(corpus("header-only.eml"), internal_date=None)
    stamp = datetime.strptime(now.email_data["receivedAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamp.replace(tzinfo=UTC) >= before
    assert "date_now" in now.defects


def test_html_only_gets_a_derived_text_body() -> None:
    data = parse(corpus("html-only.eml")).email_data
    assert data["body"]["text"] == "Hello\n\nFirst & second\n\n- one\n- two"
    assert data["body"]["html"].startswith("<html>")


def test_importance_and_sensitivity_only_when_stated() -> None:
    data = parse(corpus("importance.eml")).email_data
    assert data["importance"] == "high"
    assert data["sensitivity"] == "confidential"
    low = parse(corpus("plain.eml").replace(b"Subject:", b"X-Priority: 5\r\nSubject:"))
    assert low.email_data["importance"] == "low"
    assert "sensitivity" not in low.email_data


def test_headers_map_joins_repeats_and_received_with_newlines() -> None:
    extra = b"Received: from a by b\r\nReceived: from c\r\n by d\r\nX-Tag: one\r\nX-Tag: two\r\n"
    data = parse(extra + corpus("plain.eml")).email_data
    assert data["headers"]["received"] == "from a by b\nfrom c by d"
    assert data["headers"]["x-tag"] == "one, two"
    assert all(isinstance(v, str) for v in data["headers"].values())


def test_raw_mime_included_when_wanted() -> None:
    raw = corpus("plain.eml")
    data = parse(raw, caps=Caps(include_raw_mime=True)).email_data
    assert base64.b64decode(data["rawMimeBase64"]) == raw
    assert "ingressSkipReasons" not in data
    over = parse(raw, caps=Caps(include_raw_mime=True, max_raw_bytes=100)).email_data
    assert "rawMimeBase64" not in over
    assert over["ingressSkipReasons"] == [
        {"type": "raw_mime", "reason": "raw_mime_over_max_bytes", "size": len(raw), "cap": 100}
    ]


@pytest.mark.parametrize("path", GOOD + MALFORMED, ids=lambda p: p.name)
def test_no_null_and_valid_addresses_everywhere(path: object) -> None:
    data = parse(corpus(path.name)).email_data  # type: ignore[attr-defined]
    assert find_none(data) == []
    assert is_zod_email(data["from"]["email"])
    assert data["to"] and all(is_zod_email(a["email"]) for a in data["to"])
    assert isinstance(data["body"]["text"], str)
    assert data["receivedAt"].endswith("Z") and len(data["receivedAt"]) == 24
    assert all(a["size"] > 0 for a in data.get("attachments", []))


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.name)
def test_malformed_input_gives_an_event_with_defects(path: object) -> None:
    parsed = parse(corpus(path.name))  # type: ignore[attr-defined]
    assert parsed.defects, "a malformed message should report what was repaired"


def test_specific_malformed_repairs() -> None:
    broken = parse(corpus("broken-boundary.eml"))
    assert "text under a boundary that was never declared" in broken.email_data["body"]["text"]
    nul = parse(corpus("nul-bytes.eml"))
    assert nul.email_data["subject"] == "nulinside"
    assert nul.email_data["body"]["text"] == "bodywithnuls\n"
    charsets = parse(corpus("bad-charsets.eml"))
    assert charsets.email_data["body"]["html"] == "<p>ascii bytes labelled utf-16</p>"
    eight = parse(corpus("8bit-everywhere.eml"))
    assert eight.email_data["attachments"][0]["name"] == "résumé.txt"
    empty = parse(corpus("empty-attachment.eml"))
    assert "attachments" not in empty.email_data
    assert "attachment_empty" in empty.defects


def test_empty_input_raises_parse_error() -> None:
    with pytest.raises(ParseError):
        parse(b"")
    with pytest.raises(ParseError):
        parse(b"\r\n \r\n")


def _nested(depth: int) -> bytes:
    head = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ndeepest text" + closing


@pytest.mark.parametrize("depth", [30, 300, 3000])
def test_deep_nesting_is_bounded(depth: int) -> None:
    started = time.monotonic()
    parsed = parse(_nested(depth))
    assert time.monotonic() - started < 5
    assert parsed.email_data["subject"] == "deep"
    if depth <= 30:
        assert parsed.email_data["body"]["text"] == "deepest text"
    else:
        assert "mime_too_deep" in parsed.defects


def test_huge_headers_are_bounded() -> None:
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(20000))
    huge_subject = b"Subject: " + b"=?utf-8?q?a?= " * 50000 + b"\r\n"
    to = b"To: " + b", ".join(b"user%d@example.org" % i for i in range(5000)) + b"\r\n"
    raw = b"From: a@example.com\r\n" + to + huge_subject + many + b"\r\nbody\r\n"
    started = time.monotonic()
    parsed = parse(raw)
    assert time.monotonic() - started < 5
    assert parsed.email_data["subject"].startswith("aaaa")
    assert 100 < len(parsed.email_data["to"]) < 5000
    assert "headers_truncated" in parsed.defects
    assert "address_header_truncated: to" in parsed.defects


def test_build_payload_shape_and_key_order() -> None:
    data = parse(corpus("plain.eml")).email_data
    when = datetime(2026, 3, 3, 12, 0, 1, 234567, tzinfo=UTC)
    out = build_payload(tenant="t-1", provider_id="p-1", email_data=data, occurred_at=when)
    assert list(out) == ["tenantId", "tenant", "providerId", "occurredAt", "emailData"]
    assert out["occurredAt"] == "2026-03-03T12:00:01.234Z"
    assert out["emailData"]["tenant"] == "t-1" and out["emailData"]["providerId"] == "p-1"
    assert "tenant" not in data, "build_payload must not modify the parsed emailData"


def test_iso_utc_converts_and_truncates() -> None:
    from datetime import timedelta, timezone

    east = datetime(2026, 1, 1, 1, 30, 0, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert iso_utc(east) == "2025-12-31T23:30:00.999Z"
    assert iso_utc(datetime(2026, 1, 1)) == "2026-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("alice@example.com", True),
        ("a.b+tag@sub.example.co.uk", True),
        ("o'brien@example.com", False),  # zod 3.22.4 (Alga's worker) rejects the apostrophe
        ("a,b@example.com", False),  # zod 3.23+ rejects the comma
        (".alice@example.com", False),
        ("al..ice@example.com", False),
        ("alice@localhost", False),
        ("alice@example.c", False),
        ("alice@-example.com", False),
        ("jü@example.de", False),
        ("info@xn--bcher-kva.de", True),  # an IDN domain in A-label form passes
        ("ivan@xn--80aswg.xn--p1ai", False),  # zod's top-level domain is letters only
        ("ivan@сайт.рф", False),
        ("alice@example.com\n", False),
        ("\u017f@example.com", False),  # Python's Unicode case folding must not widen [A-Z]
    ],
)
def test_zod_email_regex(value: str, ok: bool) -> None:
    assert is_zod_email(value) is ok


@pytest.mark.parametrize(
    "markup",
    ["<!--" * 300_000, "<a " * 300_000, "<script>" * 150_000, "<" * 300_000, "&#" * 500_000],
    ids=["unclosed-comments", "unclosed-tags", "unclosed-scripts", "bare-lt", "entities"],
)
def test_html_to_text_is_linear_on_hostile_markup(markup: str) -> None:
    started = time.monotonic()
    html_to_text(markup, [])
    assert time.monotonic() - started < 3


def test_html_to_text_keeps_structure_and_drops_invisible_parts() -> None:
    markup = (
        "<html><head><title>T</title></head><body><TABLE><tr><td>a</td><TD>b</td></tr>"
        "</table>line<BR>next<!-- hidden --><style>x{}</style><pre>p</pre>&lt;ok&gt;</body>"
    )
    assert html_to_text(markup, []) == "a b\n\nline\nnext\n\np\n\n<ok>"


@pytest.mark.parametrize(
    "value",
    [
        b" " * 16000 + b"x",
        b"a" + b" " * 16000 + b"b",
        b'"' + b" " * 16000,
        b"a@" * 8000,
        b"a" * 16000,
        b"x@y.co " + b" " * 16000 + b"<",
        b'"x" ' * 4000 + b"<a@b.co>",
        b"=?utf-8?q?" * 3000,
    ],
    ids=[
        "spaces",
        "spaced-name",
        "open-quote",
        "at-signs",
        "one-token",
        "open-angle",
        "quoted-names",
        "open-encoded-words",
    ],
)
def test_hostile_address_and_date_headers_stay_fast(value: bytes) -> None:
    raw = b"From: " + value + b"\r\nTo: " + value + b"\r\nCc: " + value + b"\r\nDate: "
    raw += value + b"\r\nSubject: " + value + b"\r\n\r\nbody\r\n"
    started = time.monotonic()
    parsed = parse(raw)
    assert time.monotonic() - started < 5
    assert is_zod_email(parsed.email_data["from"]["email"])
