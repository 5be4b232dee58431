"""Issue 13 repairs, pinned on small inputs beside the corpus: where each one must stop."""

from __future__ import annotations

import base64
import time

import pytest

from shardworker.mime.body import MAX_RECOVERIES
from shardworker.mime.fixups import decode_bytes, resolve_charset
from shardworker.mime.message import parse_bytes
from shardworker.mime.recover import repair_header_block
from tests.mime_support import corpus, parse

HEAD = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nMessage-ID: <x@example.com>\r\n"


def test_a_missing_separator_still_starts_the_body() -> None:
    """A stray line followed by no header is where the body starts, as before."""
    parsed = parse(corpus("missing-separator.eml"))
    assert parsed.email_data["subject"] == "no blank line"
    assert "this line is not a header" in parsed.email_data["body"]["text"]
    assert "header_block_repaired" not in parsed.defects


def test_clean_mail_is_not_rewritten() -> None:
    assert repair_header_block(HEAD + b"Subject: x\r\n\r\nbody\r\n") is None
    assert "header_block_repaired" not in parse(HEAD + b"Subject: x\r\n\r\nbody\r\n").defects


def test_obsolete_form_only_for_header_names() -> None:
    """``Hello :)`` after the header block is body text, not an obsolete header."""
    raw = HEAD + b"Subject: hi\r\nHello :)\r\nsecond line\r\n"
    data = parse(raw).email_data
    assert data["subject"] == "hi"
    assert "Hello :)" in data["body"]["text"]


def test_from_obsolete_form_on_the_first_line() -> None:
    """``From :`` first reads as an mbox From_ line to the stdlib parser."""
    raw = b"From : Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nb\r\n"
    assert parse(raw).email_data["from"] == {"email": "alice@example.com", "name": "Alice"}


def test_idn_sender_keeps_the_original_in_the_headers() -> None:
    raw = "From: Bücher <info@bücher.de>\r\nTo: b@example.org\r\nSubject: s\r\n\r\nb\r\n"
    data = parse(raw.encode()).email_data
    assert data["from"]["email"] == "info@xn--bcher-kva.de"
    assert data["headers"]["from"] == "Bücher <info@bücher.de>"


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("x-mac-cyrillic", "mac-cyrillic"),
        ("X-MAC-CE", "mac-latin2"),
        ("ks_c_5601-1987", "cp949"),
        ("x-user-defined", "cp1252"),
        ("unicode-1-1-utf-7", "utf-7"),
        ("cp-850", "cp850"),
        ("CP 1252", "cp1252"),
        ("iso-8859-8-i", "iso8859-8"),
        ('"windows-874"', "cp874"),
        ("x-cp1251", "cp1251"),
        ("cp65001", "utf-8"),
        ("zip", None),
        ("x-klingon", None),
    ],
)
def test_charset_labels(label: str, codec: str | None) -> None:
    assert resolve_charset(label) == codec


def test_iso2022jp_nec_row13_in_an_encoded_word() -> None:
    word = base64.b64encode(b'\x1b$B-!-"\x1b(B').decode()
    data = parse(HEAD + f"Subject: =?iso-2022-jp?b?{word}?=\r\n\r\nb\r\n".encode()).email_data
    assert data["subject"] == "①②"


def test_large_decode_in_pieces_is_the_same_text() -> None:
    text = "日本語のテキスト ✓\n" * 200_000
    data = text.encode()
    assert decode_bytes(data, "utf-8", []) == text
    broken = data[:-2]  # "✓" cut in half: the strict decoder must notice
    assert decode_bytes(broken, "utf-8", []).endswith("\ufffd")


def test_transfer_encoding_token_is_normalised() -> None:
    for value in ('"base64"', "BASE64 ", "base64 (comment)"):
        raw = HEAD + f"Content-Transfer-Encoding: {value}\r\n\r\nSGVsbG8gd29ybGQ=\r\n".encode()
        assert parse(raw).email_data["body"]["text"] == "Hello world"


def test_boundary_recovery_is_bounded() -> None:
    """Multiparts whose boundaries never appear, nested: each recovery re-reads a body."""
    levels = 60
    raw = HEAD + b"Subject: nest\r\n"
    for i in range(levels):
        raw += b'Content-Type: multipart/mixed; boundary="never%d"\r\n\r\n--real%d\r\n' % (i, i)
    raw += b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    started = time.monotonic()
    parsed = parse(raw)
    assert time.monotonic() - started < 5
    assert parsed.defects.count("mime_boundary_recovered") <= 1
    assert levels > MAX_RECOVERIES


def test_single_part_fast_path_matches_the_feed_parser() -> None:
    raw = (
        HEAD
        + b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nline\r\n\xe2\x9c\x93\r\n"
    )
    fast = parse_bytes(raw)
    import email

    slow = email.message_from_bytes(raw)
    assert fast.get_payload() == slow.get_payload()
    assert fast.items() == slow.items()
